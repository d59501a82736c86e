// Internal: the tcp backend's io_uring path. One send and one receive in flight at a
// time, as the stream needs: a send is every queued frame in one SENDMSG (zero-copy,
// SENDMSG_ZC, for batches carrying 64 KiB or more where the kernel has it and the peer
// is not on loopback, where zero-copy only waits for the reader), a receive goes into
// the read-ahead buffer or straight into a large payload's target. Receives are
// single-shot: a multishot receive would land payloads in provided buffers and cost
// them a second copy. The ring defers completion work to the engine's own calls
// (DEFER_TASKRUN) rather than interrupting a spinning thread for each.
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <array>
#include <cstddef>
#include <span>

namespace rxio::transport {

class TcpUring {
 public:
  // Throws rxio::Error saying why io_uring cannot be used here.
  TcpUring(int socket, std::span<std::byte> read_ahead, bool zero_copy);
  ~TcpUring();
  TcpUring(const TcpUring&) = delete;
  TcpUring& operator=(const TcpUring&) = delete;

  int fd() const noexcept { return ring_.ring_fd; }
  // Bytes moved by the operation these arguments started, once it completed; -EAGAIN
  // while it is in flight (it is started by the first call); 0 (receive: EOF) or
  // -errno otherwise. Call again with the same arguments until it is not -EAGAIN.
  ssize_t send(const iovec* iov, int count, std::size_t bytes) noexcept;
  ssize_t recv(std::byte* where, std::size_t length) noexcept;
  // Enters the kernel for what completed and takes it.
  void reap() noexcept;
  // A result waits to be taken: the port is not idle.
  bool ready() const noexcept { return send_.done || recv_.done; }

 private:
  struct Op {
    bool in_flight = false;
    bool done = false;
    bool has_result = false;
    bool waiting_notification = false;  // zero-copy: the buffers are the kernel's until then
    ssize_t result = 0;
  };
  bool start(io_uring_sqe* sqe, uint64_t tag) noexcept;

  io_uring ring_{};
  int socket_;
  std::byte* fixed_;
  std::size_t fixed_size_;
  bool zero_copy_ = false;
  Op send_, recv_;
  std::array<iovec, 64> iov_{};
  msghdr msg_{};
  std::byte* recv_where_ = nullptr;
  std::size_t recv_length_ = 0;
};

}  // namespace rxio::transport
