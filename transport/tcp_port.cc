// The tcp backend's port: RDMA-style operations as frames on a TCP connection.
#include "transport/tcp_port.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "base/bytes.h"
#include "base/error.h"
#include "base/log.h"

namespace rxio::transport {
namespace {

using bytes::get32;
using bytes::get64;
using bytes::put32;
using bytes::put64;

bool on_loopback(int socket) {
  sockaddr_storage peer{};
  socklen_t length = sizeof peer;
  if (getpeername(socket, reinterpret_cast<sockaddr*>(&peer), &length) != 0) return false;
  if (peer.ss_family == AF_INET)
    return (ntohl(reinterpret_cast<sockaddr_in&>(peer).sin_addr.s_addr) >> 24) == 127;
  if (peer.ss_family == AF_INET6) {
    const in6_addr& a = reinterpret_cast<sockaddr_in6&>(peer).sin6_addr;
    return IN6_IS_ADDR_LOOPBACK(&a) || (IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127);
  }
  return false;
}

class TcpRegion final : public Region {
 public:
  TcpRegion(TcpKeys& keys, std::size_t size, bool peer_writes) : memory_(size) {
    data_ = memory_.data();
    size_ = size;
    if (peer_writes) keys_ = keys.add(data_, size, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  }

 private:
  std::vector<std::byte> memory_;
};

}  // namespace

// ---- keys --------------------------------------------------------------------------

TcpKeys::TcpKeys() : random_(std::random_device{}()) {}

Keys TcpKeys::add(const void* address, std::size_t length, int access) {
  if (length == 0) return {};
  uint32_t key;
  do key = static_cast<uint32_t>(random_());
  while (key == 0 || by_key_.count(key));
  return add_as(address, length, access, key);
}

Keys TcpKeys::add_as(const void* address, std::size_t length, int access, uint32_t key) {
  if (length == 0 || key == 0) return {};
  auto start = reinterpret_cast<uintptr_t>(address);
  by_key_[key] = Entry{start, start + length, access};
  return {key, key};
}

void TcpKeys::remove(uint32_t key) noexcept { by_key_.erase(key); }

std::size_t TcpKeys::forget(const void* address, std::size_t length) {
  auto start = reinterpret_cast<uintptr_t>(address);
  uintptr_t end = start + length;
  return std::erase_if(by_key_, [&](const auto& item) { return item.second.start < end && item.second.end > start; });
}

bool TcpKeys::allows(uint32_t key, uint64_t address, uint64_t length, int access) const noexcept {
  auto found = by_key_.find(key);
  if (found == by_key_.end()) return false;
  const Entry& e = found->second;
  return (e.access & access) == access && address >= e.start && address <= e.end && length <= e.end - address;
}

// ---- the port ----------------------------------------------------------------------

TcpPort::TcpPort(const TcpKeys& exposed, UniqueFd socket, bool use_uring)
    : exposed_(exposed), socket_(std::move(socket)), in_(kInputBuffer) {
  int one = 1;
  setsockopt(socket_.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int flags = fcntl(socket_.get(), F_GETFL);
  if (flags < 0) throw Error(errno, "reading the tcp backend's socket flags");
  if (use_uring) {
    try {
      uring_.emplace(socket_.get(), std::span(in_), !on_loopback(socket_.get()));
    } catch (const std::exception& e) {
      // Said once per process: every tcp link would say the same.
      static bool said = false;
      if (!std::exchange(said, true)) log::warn(std::string("tcp backend without io_uring: ") + e.what());
    }
  }
  flags = flags | O_NONBLOCK;  // io_uring too: sockets then complete without a worker thread
  if (fcntl(socket_.get(), F_SETFL, flags) != 0) throw Error(errno, "setting the tcp backend's socket flags");
}

TcpPort::~TcpPort() {
  // A dead or stuck peer must not hold the ring's teardown: end the connection first.
  if (uring_) {
    ::shutdown(socket_.get(), SHUT_RDWR);
    uring_.reset();
  }
}

ssize_t TcpPort::receive(std::byte* where, std::size_t length) noexcept {
  if (uring_) return uring_->recv(where, length);
  ssize_t got = ::recv(socket_.get(), where, length, 0);
  return got >= 0 ? got : -errno;
}

void TcpPort::receive_failed(ssize_t got) noexcept {
  if (got == 0) close_with("the peer process closed its side (it exited or was killed)");
  else if (got != -EAGAIN && got != -EINTR) close_with(std::string("reading from the peer failed: ") + std::strerror(int(-got)));
}

std::unique_ptr<Region> TcpPort::allocate(std::size_t size, bool peer_writes) {
  return std::make_unique<TcpRegion>(keys_, size, peer_writes);
}

Keys TcpPort::keys_for(const void* address, std::size_t length, int access) {
  // Only what a peer may reach needs a key, a fresh one taken back by release();
  // local buffers are used as they are.
  if (!(access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ))) return {};
  return keys_.add(address, length, access);
}

// ---- the data path: no allocation; system calls only to move bytes ---------------

void TcpPort::push_done(uint64_t wr_id, ibv_wc_status status, ibv_wc_opcode opcode) noexcept {
  ibv_wc& wc = done_[(done_head_ + done_count_++) % kDone];
  wc = ibv_wc{};
  wc.wr_id = wr_id;
  wc.status = status;
  wc.opcode = opcode;
}

void TcpPort::close_with(std::string why) noexcept {
  if (closed_) return;
  closed_ = true;
  why_ = std::move(why);
  ::shutdown(socket_.get(), SHUT_RDWR);
  // As a QP in error: what waits is flushed.
  for (; out_count_ > 0; --out_count_) {
    Out& o = out_[out_head_];
    if (o.signaled) push_done(o.wr_id, IBV_WC_WR_FLUSH_ERR, IBV_WC_RDMA_WRITE);
    out_head_ = (out_head_ + 1) % kQueued;
  }
  for (PendingRead& r : reads_)
    if (r.in_use) {
      r.in_use = false;
      push_done(r.wr_id, IBV_WC_WR_FLUSH_ERR, IBV_WC_RDMA_READ);
    }
}

TcpPort::Out* TcpPort::queue(uint8_t op, uint32_t imm, uint32_t length, uint32_t key, uint64_t remote,
                             uint64_t tag) noexcept {
  if (out_count_ == kQueued) return nullptr;
  Out& o = out_[(out_head_ + out_count_) % kQueued];
  std::byte* h = o.head.data();
  std::memset(h, 0, tcp_frame::kHeaderSize);
  h[0] = static_cast<std::byte>(op);
  std::memcpy(h + 4, &imm, 4);  // as given: network order, as in ibv_wc
  put32(h + 8, length);
  put32(h + 12, key);
  put64(h + 16, remote);
  put64(h + 24, tag);
  o.head_length = tcp_frame::kHeaderSize;
  o.payload = nullptr;
  o.payload_length = 0;
  o.sent = 0;
  o.wr_id = 0;
  o.signaled = false;
  ++out_count_;
  return &o;
}

int TcpPort::post_send(const ibv_send_wr& wr) noexcept {
  if (closed_) return EIO;
  if (wr.num_sge > 1) return EINVAL;
  const std::byte* local = wr.num_sge ? reinterpret_cast<const std::byte*>(wr.sg_list[0].addr) : nullptr;
  const uint32_t length = wr.num_sge ? wr.sg_list[0].length : 0;
  Out* o = nullptr;
  if (wr.opcode == IBV_WR_RDMA_READ) {
    // Reads take the next free slot of the table; their id travels as the tag.
    uint32_t id = 0;
    for (; id < kMaxReads && reads_[(next_read_ + id) % kMaxReads].in_use; ++id) {
    }
    if (id == kMaxReads) return ENOMEM;
    id = (next_read_ + id) % kMaxReads;
    next_read_ = (id + 1) % kMaxReads;
    o = queue(tcp_frame::read_request, 0, length, wr.wr.rdma.rkey, wr.wr.rdma.remote_addr, id);
    if (!o) return ENOMEM;
    reads_[id] = {const_cast<std::byte*>(local), length, wr.wr_id, true};
  } else {
    const bool imm = wr.opcode == IBV_WR_RDMA_WRITE_WITH_IMM;
    o = queue(imm ? tcp_frame::write_imm : tcp_frame::write, imm ? wr.imm_data : 0, length, wr.wr.rdma.rkey,
              wr.wr.rdma.remote_addr, 0);
    if (!o) return ENOMEM;
    if (length <= kMaxInline) {
      // Small payloads are copied now, as verbs does for inline data.
      if (length) std::memcpy(o->head.data() + o->head_length, local, length);
      o->head_length += length;
    } else {
      o->payload = local;
      o->payload_length = length;
    }
    o->wr_id = wr.wr_id;
    o->signaled = (wr.send_flags & IBV_SEND_SIGNALED) != 0;
  }
  flush();
  return 0;
}

void TcpPort::flush() noexcept {
  while (out_count_ > 0 && !closed_) {
    // As many queued frames as fit in one system call (or one io_uring submission).
    constexpr int kMaxIov = 64;
    iovec iov[kMaxIov];
    int n = 0;
    for (uint32_t i = 0; i < out_count_ && n + 2 <= kMaxIov; ++i) {
      Out& o = out_[(out_head_ + i) % kQueued];
      uint64_t skip = o.sent;
      if (skip < o.head_length) {
        iov[n++] = {o.head.data() + skip, o.head_length - skip};
        skip = 0;
      } else {
        skip -= o.head_length;
      }
      if (o.payload_length > skip)
        iov[n++] = {const_cast<std::byte*>(o.payload) + skip, o.payload_length - skip};
    }
    ssize_t written;
    if (uring_) {
      std::size_t bytes = 0;
      for (int i = 0; i < n; ++i) bytes += iov[i].iov_len;
      written = uring_->send(iov, n, bytes);
    } else {
      // sendmsg, not writev: a peer that is gone must fail the link, not raise SIGPIPE.
      msghdr message{};
      message.msg_iov = iov;
      message.msg_iovlen = static_cast<std::size_t>(n);
      written = ::sendmsg(socket_.get(), &message, MSG_NOSIGNAL);
      if (written < 0) written = -errno;
    }
    if (written < 0) {
      if (written == -EAGAIN || written == -EINTR) return;
      return close_with(std::string("writing to the peer failed: ") + std::strerror(int(-written)));
    }
    uint64_t left = static_cast<uint64_t>(written);
    while (out_count_ > 0) {
      Out& o = out_[out_head_];
      uint64_t total = uint64_t(o.head_length) + o.payload_length;
      uint64_t take = std::min(left, total - o.sent);
      o.sent += take;
      left -= take;
      if (o.sent < total) break;
      if (o.signaled) push_done(o.wr_id, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE);
      out_head_ = (out_head_ + 1) % kQueued;
      --out_count_;
    }
  }
}

int TcpPort::post_recv(uint64_t wr_id) noexcept {
  recv_wr_id_ = wr_id;
  ++recvs_posted_;
  return 0;
}

bool TcpPort::frame_ready() const noexcept {
  if (in_frame_) return remaining_ == 0 || in_end_ > in_begin_;
  return in_end_ - in_begin_ >= tcp_frame::kHeaderSize;
}

// Takes the header at in_begin_ (whole); false after closing on a bad frame.
bool TcpPort::start_frame() noexcept {
  const std::byte* h = in_.data() + in_begin_;
  in_begin_ += tcp_frame::kHeaderSize;
  op_ = static_cast<uint8_t>(h[0]);
  std::memcpy(&imm_, h + 4, 4);
  const uint32_t length = get32(h + 8);
  const uint32_t key = get32(h + 12);
  const uint64_t remote = get64(h + 16);
  tag_ = get64(h + 24);
  target_ = nullptr;
  remaining_ = 0;
  switch (op_) {
    case tcp_frame::write:
    case tcp_frame::write_imm:
      // Only into memory we gave the peer a key for.
      if (length && !keys_.allows(key, remote, length, IBV_ACCESS_REMOTE_WRITE) &&
          !exposed_.allows(key, remote, length, IBV_ACCESS_REMOTE_WRITE)) {
        close_with("the peer wrote where it has no key (" + std::to_string(length) + " bytes, key " +
                   std::to_string(key) + ")");
        return false;
      }
      target_ = reinterpret_cast<std::byte*>(remote);
      remaining_ = length;
      break;
    case tcp_frame::read_request: {
      // Answered at once, with the bytes themselves when the key allows it.
      const bool allowed = length == 0 || keys_.allows(key, remote, length, IBV_ACCESS_REMOTE_READ) ||
                           exposed_.allows(key, remote, length, IBV_ACCESS_REMOTE_READ);
      Out* o = queue(allowed ? tcp_frame::read_response : tcp_frame::read_refused, 0, allowed ? length : 0, 0, 0, tag_);
      if (!o) {
        close_with("the peer asked for more reads than it may have in flight");
        return false;
      }
      if (allowed) {
        o->payload = reinterpret_cast<const std::byte*>(remote);
        o->payload_length = length;
      }
      break;
    }
    case tcp_frame::read_response:
    case tcp_frame::read_refused: {
      if (tag_ >= kMaxReads || !reads_[tag_].in_use || (op_ == tcp_frame::read_response && length != reads_[tag_].length)) {
        close_with("the peer answered a read that was not asked for");
        return false;
      }
      target_ = reads_[tag_].local;
      remaining_ = op_ == tcp_frame::read_response ? length : 0;
      break;
    }
    default:
      close_with("the peer sent an unknown frame (" + std::to_string(op_) + ")");
      return false;
  }
  in_frame_ = true;
  return true;
}

int TcpPort::take_input(std::span<ibv_wc> out) noexcept {
  int n = 0;
  while (n < int(out.size()) && !closed_) {
    if (!in_frame_) {
      if (in_end_ - in_begin_ >= tcp_frame::kHeaderSize) {
        if (!start_frame()) break;
        continue;
      }
      // Keep a partial header at the front and read more behind it.
      if (in_begin_ > 0) {
        std::memmove(in_.data(), in_.data() + in_begin_, in_end_ - in_begin_);
        in_end_ -= in_begin_;
        in_begin_ = 0;
      }
      ssize_t got = receive(in_.data() + in_end_, in_.size() - in_end_);
      if (got > 0) {
        in_end_ += static_cast<std::size_t>(got);
        continue;
      }
      receive_failed(got);
      break;
    }
    if (remaining_ > 0) {
      // First what was read ahead, then straight from the socket into the target.
      std::size_t have = std::min<uint64_t>(remaining_, in_end_ - in_begin_);
      if (have > 0) {
        std::memcpy(target_, in_.data() + in_begin_, have);
        in_begin_ += have;
        target_ += have;
        remaining_ -= have;
        continue;
      }
      if (remaining_ < in_.size() / 4) {
        // Small: read ahead into the buffer, with the frames behind it.
        in_begin_ = in_end_ = 0;
        ssize_t got = receive(in_.data(), in_.size());
        if (got > 0) {
          in_end_ = static_cast<std::size_t>(got);
          continue;
        }
        receive_failed(got);
        break;
      }
      ssize_t got = receive(target_, remaining_);
      if (got > 0) {
        target_ += got;
        remaining_ -= static_cast<uint64_t>(got);
        continue;
      }
      receive_failed(got);
      break;
    }
    // The frame is complete.
    if (op_ == tcp_frame::write_imm) {
      if (recvs_posted_ == 0) break;  // as an RNR: delivered once a receive is posted
      --recvs_posted_;
      out[n++] = arrival(recv_wr_id_, imm_);
    } else if (op_ == tcp_frame::read_response || op_ == tcp_frame::read_refused) {
      PendingRead& r = reads_[tag_];
      r.in_use = false;
      ibv_wc& wc = out[n++];
      wc = ibv_wc{};
      wc.wr_id = r.wr_id;
      wc.status = op_ == tcp_frame::read_response ? IBV_WC_SUCCESS : IBV_WC_REM_ACCESS_ERR;
      wc.opcode = IBV_WC_RDMA_READ;
    }
    in_frame_ = false;
  }
  return n;
}

int TcpPort::poll(std::span<ibv_wc> out) noexcept {
  if (uring_) uring_->reap();
  if (out_count_ > 0) flush();
  int n = 0;
  while (n < int(out.size()) && done_count_ > 0) {
    out[n++] = done_[done_head_];
    done_head_ = (done_head_ + 1) % kDone;
    --done_count_;
  }
  n += take_input(out.subspan(n));
  if (out_count_ > 0) flush();  // read responses queued on the way
  return n;
}

void TcpPort::shut() noexcept {
  if (!closed_) close_with("the link was shut down");
}

}  // namespace rxio::transport
