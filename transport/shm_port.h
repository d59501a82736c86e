// Internal: the shm backend's port, for two processes on one host.
//
// Each side of a link owns an arena: a memfd mapped shared into both processes. It
// holds the owner's doorbell and the memory the peer writes (rings, rendezvous queues).
// A write into the peer's arena is a memcpy into its mapping here; a write into or a
// read from the peer's private memory (the buffer of a posted receive, an exposed
// region) is one cross-memory-attach copy (process_vm_writev/readv), so large messages
// are copied once. An immediate goes onto the peer's doorbell, and its eventfd is
// written only when it sleeps. Work requests complete when their bytes are in place.
#pragma once

#include <sys/types.h>

#include <array>
#include <atomic>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/fd.h"
#include "transport/port.h"

namespace rxio::transport {

// The head of every arena; the owner consumes, the peer produces.
struct Doorbell {
  static constexpr uint32_t kSlots = 4096;
  alignas(64) std::atomic<uint64_t> tail;      // written by the peer
  alignas(64) std::atomic<uint64_t> head;      // written by the owner
  alignas(64) std::atomic<uint32_t> sleeping;  // the owner may be asleep on its eventfd
  std::array<uint32_t, kSlots> imm;            // network order, as in ibv_wc
};

// A shared mapping, unmapped when it goes.
class Mapping {
 public:
  Mapping() = default;
  Mapping(int fd, std::size_t size);  // throws rxio::Error
  Mapping(Mapping&& other) noexcept : data_(std::exchange(other.data_, nullptr)), size_(other.size_) {}
  Mapping& operator=(Mapping&& other) noexcept;
  ~Mapping();
  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// Ranges of an arena that freed regions gave back, by size (a link's rings come in a
// few sizes), for the next allocation of that size. Shared with the regions, which may
// outlive their port.
struct ArenaFreeRanges {
  std::unordered_map<std::size_t, std::vector<std::size_t>> by_size;  // size -> offsets
};

class ShmPort final : public Port {
 public:
  static constexpr std::size_t kArenaReserved = 64 * 1024;  // the doorbell's page(s)
  // Creates this side's arena (sparse: pages cost memory only once touched) and eventfd.
  explicit ShmPort(std::size_t arena_size);

  int arena_fd() const noexcept { return arena_fd_.get(); }
  int event_fd() const noexcept { return event_fd_.get(); }
  uint64_t arena_base() const noexcept { return reinterpret_cast<uint64_t>(arena_.data()); }
  std::size_t arena_size() const noexcept { return arena_size_; }
  // A word of private memory with a random value: the peer reads it to prove that
  // cross-memory attach works between the two processes.
  uint64_t probe_address() const noexcept { return reinterpret_cast<uint64_t>(&probe_); }
  uint64_t probe_value() const noexcept { return probe_; }

  // Maps the peer's arena and takes its eventfd; `socket` then tells whether it lives.
  // Throws rxio::Error when the arena cannot be mapped or is not what the peer says.
  void attach(pid_t peer, UniqueFd arena, std::size_t size, uint64_t base, UniqueFd event, UniqueFd socket);
  // Reads the peer's probe word; an empty string if it matches, else why not.
  std::string probe_peer(uint64_t address, uint64_t value) const;

  Backend backend() const noexcept override { return Backend::shm; }
  std::unique_ptr<Region> allocate(std::size_t size, bool peer_writes) override;
  Keys keys_for(const void*, std::size_t, int) override { return {}; }  // nothing to register
  int post_send(const ibv_send_wr& wr) noexcept override;
  int post_recv(uint64_t wr_id) noexcept override;
  uint32_t max_inline() const noexcept override { return kMaxInline; }
  int poll(std::span<ibv_wc> out) noexcept override;
  int wake_fd() const noexcept override { return event_fd_.get(); }
  bool arm() noexcept override;
  int liveness_fd() const noexcept override { return socket_.get(); }
  std::string check_liveness() noexcept override;
  void shut() noexcept override;

 private:
  static constexpr uint32_t kMaxInline = 256;
  static constexpr uint32_t kQueued = 512;  // more than a link's send queue
  struct Queued {
    ibv_send_wr wr;
    ibv_sge sge;
    std::array<std::byte, kMaxInline> inline_data;
  };
  // Carries out `wr`; false if the peer's doorbell is full (try again later).
  bool execute(const ibv_send_wr& wr) noexcept;
  bool copy(std::byte* local, std::size_t length, uint64_t remote, bool to_peer) const noexcept;
  void complete(const ibv_send_wr& wr, ibv_wc_status status) noexcept;
  bool retry_queued() noexcept;
  // As a QP going to error: what waits is flushed, nothing more is carried out.
  void break_down() noexcept;

  std::size_t arena_size_;
  UniqueFd arena_fd_;
  Mapping arena_;
  UniqueFd event_fd_;
  Doorbell* doorbell_ = nullptr;  // ours: the peer pushes, we pop
  std::size_t used_ = kArenaReserved;
  std::shared_ptr<ArenaFreeRanges> free_ = std::make_shared<ArenaFreeRanges>();
  uint64_t probe_ = 0;

  pid_t peer_ = 0;
  UniqueFd peer_pidfd_;  // tells whether `peer_` is still the peer, not a reused pid
  Mapping peer_arena_;
  uint64_t peer_base_ = 0;
  Doorbell* peer_doorbell_ = nullptr;
  UniqueFd peer_event_;
  UniqueFd socket_;
  bool shut_ = false;
  bool broken_ = false;  // a request failed: later ones are flushed, as after a QP error
  bool armed_ = false;

  std::array<Queued, kQueued> queued_{};
  uint32_t queued_head_ = 0, queued_count_ = 0;
  std::array<ibv_wc, kQueued> done_{};
  uint32_t done_head_ = 0, done_count_ = 0;
  uint64_t recv_wr_id_ = 0;
  uint32_t recvs_posted_ = 0;
};

}  // namespace rxio::transport
