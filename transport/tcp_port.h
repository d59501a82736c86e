// Internal: the tcp backend's port, for peers with neither shared memory nor an RDMA
// route. The link protocol's RDMA operations travel as frames on the bootstrap's own
// TCP connection: a 32-byte header (what, where, which key, how long) and the bytes.
// The receiver checks every write and read against the keys it gave out (TcpKeys)
// and reads payloads straight into their target: the rendezvous still lands in the
// posted buffer with the kernel's one copy, as with any socket. Sends complete when
// the kernel has their bytes. io_uring (tcp_uring.h) or non-blocking calls.
#pragma once

#include <poll.h>

#include <array>
#include <random>
#include <optional>
#include <unordered_map>
#include <vector>

#include "base/fd.h"
#include "transport/port.h"
#include "transport/tcp_uring.h"

namespace rxio::transport {

// Keys for memory tcp peers may write or read: random, so that a peer cannot guess
// one it was not given. Each link has its own (rings, rendezvous targets, taken back
// when the rendezvous lands); the engine has one more for regions it exposed.
class TcpKeys {
 public:
  TcpKeys();
  // A fresh key for [address, address + length); none ({}) for an empty range.
  Keys add(const void* address, std::size_t length, int access);
  // The range under `key` (an exposed region's verbs key, so that one RemoteRegion
  // serves both backends), replacing what that key named before.
  Keys add_as(const void* address, std::size_t length, int access, uint32_t key);
  void remove(uint32_t key) noexcept;
  std::size_t forget(const void* address, std::size_t length);
  // Whether `key` covers [address, address + length) with `access`.
  bool allows(uint32_t key, uint64_t address, uint64_t length, int access) const noexcept;

 private:
  struct Entry {
    uintptr_t start;
    uintptr_t end;
    int access;
  };
  std::unordered_map<uint32_t, Entry> by_key_;
  std::mt19937 random_;
};

namespace tcp_frame {
enum Op : uint8_t { write = 1, write_imm = 2, read_request = 3, read_response = 4, read_refused = 5 };
inline constexpr std::size_t kHeaderSize = 32;
}  // namespace tcp_frame

class TcpPort final : public Port {
 public:
  // Takes over the connected socket (Nagle off). Uses io_uring when `use_uring` and the
  // kernel allows it, non-blocking system calls otherwise. `exposed`: the engine's
  // exposed regions, which every tcp peer may reach too.
  TcpPort(const TcpKeys& exposed, UniqueFd socket, bool use_uring);
  ~TcpPort() override;
  bool uses_uring() const noexcept { return uring_.has_value(); }

  Backend backend() const noexcept override { return Backend::tcp; }
  std::unique_ptr<Region> allocate(std::size_t size, bool peer_writes) override;
  Keys keys_for(const void* address, std::size_t length, int access) override;
  void release(uint32_t rkey) noexcept override { keys_.remove(rkey); }
  int post_send(const ibv_send_wr& wr) noexcept override;
  int post_recv(uint64_t wr_id) noexcept override;
  uint32_t max_inline() const noexcept override { return kMaxInline; }
  int poll(std::span<ibv_wc> out) noexcept override;
  int wake_fd() const noexcept override { return closed_ ? -1 : uring_ ? uring_->fd() : socket_.get(); }
  short wake_events() const noexcept override { return out_count_ && !uring_ ? POLLIN | POLLOUT : POLLIN; }
  bool arm() noexcept override { return done_count_ == 0 && !frame_ready() && !(uring_ && uring_->ready()); }
  int liveness_fd() const noexcept override { return socket_.get(); }
  std::string check_liveness() noexcept override { return closed_ ? why_ : std::string(); }
  void shut() noexcept override;

 private:
  static constexpr uint32_t kMaxInline = 256;
  static constexpr uint32_t kQueued = 512;  // a link's send queue plus read responses
  static constexpr uint32_t kMaxReads = 256;
  static constexpr std::size_t kInputBuffer = 64 * 1024;
  struct Out {
    std::array<std::byte, tcp_frame::kHeaderSize + kMaxInline> head;
    uint32_t head_length;
    const std::byte* payload;  // large payloads stay where they are until sent
    uint32_t payload_length;
    uint64_t sent;
    uint64_t wr_id;
    bool signaled;  // complete it when sent (responses are internal: never)
  };
  struct PendingRead {
    std::byte* local = nullptr;
    uint32_t length = 0;
    uint64_t wr_id = 0;
    bool in_use = false;
  };
  Out* queue(uint8_t op, uint32_t imm, uint32_t length, uint32_t key, uint64_t remote, uint64_t tag) noexcept;
  void flush() noexcept;
  // Reads what the socket has and turns whole frames into completions (how many).
  int take_input(std::span<ibv_wc> out) noexcept;
  bool start_frame() noexcept;
  bool frame_ready() const noexcept;
  void push_done(uint64_t wr_id, ibv_wc_status status, ibv_wc_opcode opcode) noexcept;
  void close_with(std::string why) noexcept;
  // Bytes read into `where`, 0 at EOF, -EAGAIN for not yet, -errno on failure.
  ssize_t receive(std::byte* where, std::size_t length) noexcept;
  // A receive that did not move bytes: closes the link on EOF or failure.
  void receive_failed(ssize_t got) noexcept;

  const TcpKeys& exposed_;
  TcpKeys keys_;
  UniqueFd socket_;
  bool closed_ = false;
  std::string why_;

  std::array<Out, kQueued> out_{};
  uint32_t out_head_ = 0, out_count_ = 0;
  std::array<PendingRead, kMaxReads> reads_{};
  uint32_t next_read_ = 0;
  static constexpr uint32_t kDone = kQueued + kMaxReads;  // every send and read flushed at once
  std::array<ibv_wc, kDone> done_{};
  uint32_t done_head_ = 0, done_count_ = 0;
  uint64_t recv_wr_id_ = 0;
  uint32_t recvs_posted_ = 0;

  std::vector<std::byte> in_;  // bytes read ahead, so that small frames cost no system call each
  std::size_t in_begin_ = 0, in_end_ = 0;
  bool in_frame_ = false;  // a header was taken; its payload goes to `target_`
  uint8_t op_ = 0;
  uint32_t imm_ = 0;
  uint64_t tag_ = 0;
  std::byte* target_ = nullptr;
  uint64_t remaining_ = 0;
  // Last: goes first, so that nothing in flight outlives the buffers above.
  std::optional<TcpUring> uring_;
};

}  // namespace rxio::transport
