// The shm backend's data operations: the Port interface over shared memory and
// cross-memory attach. The hand-shake that sets a link up is in shm_connect.cc.
#include "transport/shm_port.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>

#include "base/error.h"

namespace rxio::transport {
namespace {

// A range of the arena; gives it back when freed, for the next connection's rings.
class ArenaRegion final : public Region {
 public:
  ArenaRegion(std::byte* base, std::size_t offset, std::size_t size, std::shared_ptr<ArenaFreeRanges> free)
      : offset_(offset), free_(std::move(free)) {
    data_ = base + offset;
    size_ = size;
  }
  ~ArenaRegion() override {
    try {
      free_->by_size[size_].push_back(offset_);
    } catch (const std::bad_alloc&) {
      // The range stays unused.
    }
  }

 private:
  std::size_t offset_;
  std::shared_ptr<ArenaFreeRanges> free_;
};

}  // namespace

Mapping::Mapping(int fd, std::size_t size) : size_(size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw Error(errno, "mapping " + format_bytes(size) + " of shared memory", {}, "lower RXIO_SHM_ARENA");
  data_ = static_cast<std::byte*>(p);
}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
  if (this != &other) {
    if (data_) munmap(data_, size_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = other.size_;
  }
  return *this;
}

Mapping::~Mapping() {
  if (data_) munmap(data_, size_);
}

ShmPort::ShmPort(std::size_t arena_size) : arena_size_(arena_size) {
  arena_fd_.reset(memfd_create("rxio-shm-arena", MFD_CLOEXEC));
  if (!arena_fd_) throw Error(errno, "creating a shared-memory arena (memfd_create)");
  if (ftruncate(arena_fd_.get(), static_cast<off_t>(arena_size_)) != 0)
    throw Error(errno, "sizing the shared-memory arena to " + format_bytes(arena_size_), {},
                "lower RXIO_SHM_ARENA");
  arena_ = Mapping(arena_fd_.get(), arena_size_);
  doorbell_ = new (arena_.data()) Doorbell{};
  event_fd_.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!event_fd_) throw Error(errno, "creating an eventfd for the shm backend");
  std::random_device random;
  probe_ = (uint64_t(random()) << 32) | random();
}

void ShmPort::attach(pid_t peer, UniqueFd arena, std::size_t size, uint64_t base, UniqueFd event, UniqueFd socket) {
  // A file shorter than it claims would fault (SIGBUS) on the first copy past its end.
  struct stat st{};
  if (size < kArenaReserved || fstat(arena.get(), &st) != 0 || !S_ISREG(st.st_mode) || uint64_t(st.st_size) < size)
    throw Error(EPROTO, "attaching the shm peer's arena: it is not the " + format_bytes(size) + " of memory it claims");
  // Never block on the peer's eventfd, whatever it really is.
  if (fcntl(event.get(), F_SETFL, O_NONBLOCK) != 0) throw Error(errno, "setting up the shm peer's eventfd");
  peer_pidfd_.reset(static_cast<int>(syscall(SYS_pidfd_open, peer, 0)));
  if (!peer_pidfd_ && errno != ENOSYS) throw Error(errno, "opening a pidfd for shm peer process " + std::to_string(peer));
  peer_arena_ = Mapping(arena.get(), size);
  peer_ = peer;
  peer_base_ = base;
  peer_doorbell_ = reinterpret_cast<Doorbell*>(peer_arena_.data());
  peer_event_ = std::move(event);
  socket_ = std::move(socket);
}

std::string ShmPort::probe_peer(uint64_t address, uint64_t value) const {
  uint64_t seen = 0;
  iovec local{&seen, sizeof seen};
  iovec remote{reinterpret_cast<void*>(address), sizeof seen};
  ssize_t n = process_vm_readv(peer_, &local, 1, &remote, 1, 0);
  if (n != ssize_t(sizeof seen))
    return std::string("cross-memory attach to process ") + std::to_string(peer_) + " failed: " +
           std::strerror(n < 0 ? errno : EIO);
  if (seen != value) return "cross-memory attach read the wrong word from process " + std::to_string(peer_);
  return {};
}

std::unique_ptr<Region> ShmPort::allocate(std::size_t size, bool) {
  if (auto it = free_->by_size.find(size); it != free_->by_size.end() && !it->second.empty()) {
    std::size_t offset = it->second.back();
    it->second.pop_back();
    return std::make_unique<ArenaRegion>(arena_.data(), offset, size, free_);
  }
  constexpr std::size_t kAlign = 64;
  std::size_t start = (used_ + kAlign - 1) & ~(kAlign - 1);
  if (start + size > arena_size_)
    throw Error(ENOMEM, "allocating " + format_bytes(size) + " in the shared-memory arena of " +
                            format_bytes(arena_size_), {}, "raise RXIO_SHM_ARENA, or open fewer connections per peer");
  used_ = start + size;
  return std::make_unique<ArenaRegion>(arena_.data(), start, size, free_);
}

// ---- the data path: no allocation, no locks; system calls only for cross-memory
// attach and for waking a sleeping peer --------------------------------------------

bool ShmPort::copy(std::byte* local, std::size_t length, uint64_t remote, bool to_peer) const noexcept {
  if (length == 0) return true;
  // The peer's arena is mapped here: copy directly. Anything else is the peer's
  // private memory, reached by cross-memory attach.
  const std::size_t peer_size = peer_arena_.size();
  if (remote >= peer_base_ && remote - peer_base_ <= peer_size && length <= peer_size - (remote - peer_base_)) {
    std::byte* there = peer_arena_.data() + (remote - peer_base_);
    if (to_peer) std::memcpy(there, local, length);
    else std::memcpy(local, there, length);
    return true;
  }
  // The pid must still be the peer's: once it has exited, a reused pid could name
  // another process. (A pidfd signals 0 fine only while its process lives.)
  if (peer_pidfd_ && syscall(SYS_pidfd_send_signal, peer_pidfd_.get(), 0, nullptr, 0) != 0) return false;
  iovec mine{local, length};
  iovec theirs{reinterpret_cast<void*>(remote), length};
  ssize_t n = to_peer ? process_vm_writev(peer_, &mine, 1, &theirs, 1, 0)
                      : process_vm_readv(peer_, &mine, 1, &theirs, 1, 0);
  return n == ssize_t(length);
}

void ShmPort::complete(const ibv_send_wr& wr, ibv_wc_status status) noexcept {
  if (!(wr.send_flags & IBV_SEND_SIGNALED) && status == IBV_WC_SUCCESS) return;
  ibv_wc& wc = done_[(done_head_ + done_count_++) % kQueued];
  wc = ibv_wc{};
  wc.wr_id = wr.wr_id;
  wc.status = status;
  wc.opcode = wr.opcode == IBV_WR_RDMA_READ ? IBV_WC_RDMA_READ : IBV_WC_RDMA_WRITE;
}

bool ShmPort::execute(const ibv_send_wr& wr) noexcept {
  const bool imm = wr.opcode == IBV_WR_RDMA_WRITE_WITH_IMM;
  if (imm) {
    // Room on the peer's doorbell first, so that a write is never half done.
    uint64_t tail = peer_doorbell_->tail.load(std::memory_order_relaxed);
    uint64_t head = peer_doorbell_->head.load(std::memory_order_acquire);
    if (tail - head >= Doorbell::kSlots) return false;
  }
  std::size_t length = 0;
  for (int i = 0; i < wr.num_sge; ++i) length += wr.sg_list[i].length;
  bool ok = true;
  uint64_t remote = wr.wr.rdma.remote_addr;
  for (int i = 0; i < wr.num_sge && ok; ++i) {
    ok = copy(reinterpret_cast<std::byte*>(wr.sg_list[i].addr), wr.sg_list[i].length, remote,
              wr.opcode != IBV_WR_RDMA_READ);
    remote += wr.sg_list[i].length;
  }
  if (!ok) {
    complete(wr, IBV_WC_REM_ACCESS_ERR);
    break_down();
    return true;
  }
  if (imm) {
    uint64_t tail = peer_doorbell_->tail.load(std::memory_order_relaxed);
    peer_doorbell_->imm[tail % Doorbell::kSlots] = wr.imm_data;
    // Sequentially consistent, against the peer's sleeping flag (set, then tail read).
    peer_doorbell_->tail.store(tail + 1, std::memory_order_seq_cst);
    if (peer_doorbell_->sleeping.load(std::memory_order_seq_cst)) {
      uint64_t one = 1;
      ssize_t ignored = ::write(peer_event_.get(), &one, sizeof one);
      (void)ignored;  // a full counter still wakes the peer
    }
  }
  complete(wr, IBV_WC_SUCCESS);
  return true;
}

bool ShmPort::retry_queued() noexcept {
  while (queued_count_ > 0) {
    Queued& q = queued_[queued_head_];
    if (!execute(q.wr)) return false;
    queued_head_ = (queued_head_ + 1) % kQueued;
    --queued_count_;
  }
  return true;
}

void ShmPort::break_down() noexcept {
  broken_ = true;
  for (; queued_count_ > 0; --queued_count_) {
    complete(queued_[queued_head_].wr, IBV_WC_WR_FLUSH_ERR);
    queued_head_ = (queued_head_ + 1) % kQueued;
  }
}

int ShmPort::post_send(const ibv_send_wr& wr) noexcept {
  if (shut_ || broken_ || !peer_arena_.data()) return EIO;
  if (wr.num_sge > 1) return EINVAL;
  // In order behind anything that already waits for the peer's doorbell.
  if ((queued_count_ == 0 || retry_queued()) && execute(wr)) return 0;
  if (queued_count_ == kQueued) return ENOMEM;
  Queued& q = queued_[(queued_head_ + queued_count_) % kQueued];
  q.wr = wr;
  q.wr.next = nullptr;
  if (wr.num_sge == 1) {
    q.sge = wr.sg_list[0];
    if ((wr.send_flags & IBV_SEND_INLINE) && wr.opcode != IBV_WR_RDMA_READ) {
      // Inline data may be gone once the caller returns, as with verbs.
      if (q.sge.length > kMaxInline) return EINVAL;
      std::memcpy(q.inline_data.data(), reinterpret_cast<const void*>(q.sge.addr), q.sge.length);
      q.sge.addr = reinterpret_cast<uint64_t>(q.inline_data.data());
    }
    q.wr.sg_list = &q.sge;
  }
  ++queued_count_;
  return 0;
}

int ShmPort::post_recv(uint64_t wr_id) noexcept {
  recv_wr_id_ = wr_id;
  ++recvs_posted_;
  return 0;
}

int ShmPort::poll(std::span<ibv_wc> out) noexcept {
  if (armed_) {
    armed_ = false;
    doorbell_->sleeping.store(0, std::memory_order_relaxed);
    uint64_t count;
    ssize_t ignored = ::read(event_fd_.get(), &count, sizeof count);
    (void)ignored;  // EAGAIN: nobody wrote it
  }
  if (queued_count_ > 0 && !broken_) retry_queued();
  std::size_t n = 0;
  while (n < out.size() && done_count_ > 0) {
    out[n++] = done_[done_head_];
    done_head_ = (done_head_ + 1) % kQueued;
    --done_count_;
  }
  if (shut_) return static_cast<int>(n);
  uint64_t head = doorbell_->head.load(std::memory_order_relaxed);
  uint64_t tail = doorbell_->tail.load(std::memory_order_acquire);
  if (tail - head > Doorbell::kSlots) {
    // The peer broke its side of the doorbell: fail the link as a device would.
    if (n < out.size()) {
      out[n] = ibv_wc{};
      out[n].wr_id = recv_wr_id_;
      out[n].status = IBV_WC_REM_INV_REQ_ERR;
      ++n;
    }
    shut();
    return static_cast<int>(n);
  }
  while (n < out.size() && head != tail && recvs_posted_ > 0) {
    out[n++] = arrival(recv_wr_id_, doorbell_->imm[head % Doorbell::kSlots]);
    ++head;
    --recvs_posted_;
  }
  doorbell_->head.store(head, std::memory_order_release);
  return static_cast<int>(n);
}

bool ShmPort::arm() noexcept {
  if (shut_) return true;
  // A wake-up that raced with the last poll (the peer saw the flag just before it was
  // cleared) must not leave the eventfd readable for a sleeper that has nothing to do.
  if (!armed_) {
    uint64_t count;
    ssize_t ignored = ::read(event_fd_.get(), &count, sizeof count);
    (void)ignored;
  }
  armed_ = true;
  doorbell_->sleeping.store(1, std::memory_order_seq_cst);
  bool idle = doorbell_->tail.load(std::memory_order_seq_cst) == doorbell_->head.load(std::memory_order_relaxed) &&
              done_count_ == 0 && queued_count_ == 0;
  return idle;
}

std::string ShmPort::check_liveness() noexcept {
  char byte;
  ssize_t n = ::recv(socket_.get(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0) return "the peer process closed its side (it exited or was killed)";
  if (n < 0 && errno != EAGAIN && errno != EINTR) return std::string("the peer's socket failed: ") + std::strerror(errno);
  return {};
}

void ShmPort::shut() noexcept {
  if (shut_) return;
  break_down();
  shut_ = true;
  if (socket_) ::shutdown(socket_.get(), SHUT_RDWR);
}

}  // namespace rxio::transport
