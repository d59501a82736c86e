#include "transport/tcp_uring.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "base/error.h"

namespace rxio::transport {
namespace {

constexpr uint64_t kSend = 1;
constexpr uint64_t kReceive = 2;
constexpr uint64_t kCancel = 3;
constexpr std::size_t kZeroCopyFrom = 64 * 1024;

}  // namespace

TcpUring::TcpUring(int socket, std::span<std::byte> read_ahead, bool zero_copy)
    : socket_(socket), fixed_(read_ahead.data()), fixed_size_(read_ahead.size()) {
  std::ifstream disabled("/proc/sys/kernel/io_uring_disabled");
  int value = 0;
  if (disabled >> value && value == 2) throw Error(EPERM, "io_uring is disabled (kernel.io_uring_disabled=2)");
  // Completions run when the engine next asks for them (it polls, or sleeps on the
  // ring's fd), not through an interrupt of a spinning thread: an inter-processor
  // interrupt per message costs more than the message on a virtual machine.
  int rc = io_uring_queue_init(8, &ring_, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
  if (rc == -EINVAL) rc = io_uring_queue_init(8, &ring_, IORING_SETUP_COOP_TASKRUN);
  if (rc == -EINVAL) rc = io_uring_queue_init(8, &ring_, 0);
  if (rc < 0)
    throw Error(-rc, std::string("setting up io_uring") +
                         (value == 1 ? " (kernel.io_uring_disabled=1: only for its group)" : ""));
  iovec fixed{fixed_, fixed_size_};
  if (int registered = io_uring_register_buffers(&ring_, &fixed, 1); registered < 0) {
    io_uring_queue_exit(&ring_);
    throw Error(-registered, "registering the read-ahead buffer with io_uring", {}, "raise `ulimit -l`");
  }
  if (io_uring_probe* probe = io_uring_get_probe_ring(&ring_)) {
    zero_copy_ = zero_copy && io_uring_opcode_supported(probe, IORING_OP_SENDMSG_ZC);
    io_uring_free_probe(probe);
  }
}

TcpUring::~TcpUring() {
  // Nothing may land in our memory after we are gone: cancel, and wait for the ends.
  if (send_.in_flight || recv_.in_flight) {
    if (io_uring_sqe* sqe = io_uring_get_sqe(&ring_)) {
      io_uring_prep_cancel(sqe, nullptr, IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL);
      io_uring_sqe_set_data64(sqe, kCancel);
      io_uring_submit(&ring_);
    }
    for (int i = 0; i < 100 && (send_.in_flight || recv_.in_flight); ++i) {
      __kernel_timespec wait{0, 10'000'000};
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe_timeout(&ring_, &cqe, &wait) == 0) reap();
    }
  }
  io_uring_queue_exit(&ring_);
}

bool TcpUring::start(io_uring_sqe* sqe, uint64_t tag) noexcept {
  io_uring_sqe_set_data64(sqe, tag);
  return io_uring_submit(&ring_) >= 0;
}

ssize_t TcpUring::send(const iovec* iov, int count, std::size_t bytes) noexcept {
  if (send_.done) {
    send_.done = false;
    // Nothing moved and nothing wrong: start it again rather than report a stall.
    if (send_.result != -EAGAIN && send_.result != -EINTR) return send_.result;
  }
  if (send_.in_flight) return -EAGAIN;
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (!sqe) return -EAGAIN;
  count = std::min<int>(count, int(iov_.size()));
  std::copy(iov, iov + count, iov_.begin());
  msg_ = msghdr{};
  msg_.msg_iov = iov_.data();
  msg_.msg_iovlen = static_cast<std::size_t>(count);
  if (zero_copy_ && bytes >= kZeroCopyFrom) io_uring_prep_sendmsg_zc(sqe, socket_, &msg_, MSG_NOSIGNAL);
  else io_uring_prep_sendmsg(sqe, socket_, &msg_, MSG_NOSIGNAL);
  if (!start(sqe, kSend)) return -EIO;
  send_.in_flight = true;
  return -EAGAIN;
}

ssize_t TcpUring::recv(std::byte* where, std::size_t length) noexcept {
  if (recv_.done) {
    recv_.done = false;
    if (recv_.result != -EAGAIN && recv_.result != -EINTR) return recv_.result;
  }
  if (recv_.in_flight) return -EAGAIN;
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (!sqe) return -EAGAIN;
  recv_where_ = where;
  recv_length_ = length;
  // The read-ahead buffer is registered: no page pinning per receive.
  if (where >= fixed_ && where + length <= fixed_ + fixed_size_)
    io_uring_prep_read_fixed(sqe, socket_, where, static_cast<unsigned>(length), 0, 0);
  else io_uring_prep_recv(sqe, socket_, where, length, 0);
  if (!start(sqe, kReceive)) return -EIO;
  recv_.in_flight = true;
  return -EAGAIN;
}

void TcpUring::reap() noexcept {
  if (send_.in_flight || recv_.in_flight) io_uring_get_events(&ring_);
  io_uring_cqe* cqe = nullptr;
  while (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe) {
    const uint64_t tag = io_uring_cqe_get_data64(cqe);
    Op* op = tag == kSend ? &send_ : tag == kReceive ? &recv_ : nullptr;
    if (op) {
      if (cqe->flags & IORING_CQE_F_NOTIF) {
        op->waiting_notification = false;  // the kernel is done with the buffers
      } else {
        op->result = cqe->res;
        op->has_result = true;
        op->waiting_notification = (cqe->flags & IORING_CQE_F_MORE) != 0;
      }
      if (op->has_result && !op->waiting_notification) {
        op->has_result = false;
        op->in_flight = false;
        op->done = true;
      }
    }
    io_uring_cqe_seen(&ring_, cqe);
  }
}

}  // namespace rxio::transport
