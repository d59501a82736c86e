// Internal: what the link protocol needs from the fabric under one link. The protocol
// (rings, credits, rendezvous; datapath.cc) is written once against RDMA semantics:
// writes into memory the peer registered, writes that carry a 32-bit immediate to the
// peer, reads. The verbs backend maps a port onto an RC QP; the shm backend performs
// the same operations with shared memory and cross-memory attach, the tcp backend as
// frames on a socket, so every backend speaks the same protocol and passes the same
// tests.
#pragma once

#include <infiniband/verbs.h>
#include <poll.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace rxio::transport {

enum class Backend : uint8_t { verbs, shm, tcp };
const char* to_string(Backend backend);

struct Keys {
  uint32_t lkey = 0;  // for this side's work requests
  uint32_t rkey = 0;  // for the peer's
};

// Memory of one link: written by the peer (rings, rendezvous queues) or staged for
// sending. Zeroed, and stays where it is until the link goes.
class Region {
 public:
  virtual ~Region() = default;
  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  Keys keys() const noexcept { return keys_; }

 protected:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  Keys keys_;
};

// The completion of an immediate's arrival, as a device reports it.
inline ibv_wc arrival(uint64_t wr_id, uint32_t imm_data) noexcept {
  ibv_wc wc{};
  wc.wr_id = wr_id;
  wc.status = IBV_WC_SUCCESS;
  wc.opcode = IBV_WC_RECV_RDMA_WITH_IMM;
  wc.wc_flags = IBV_WC_WITH_IMM;
  wc.imm_data = imm_data;
  return wc;
}

class Port {
 public:
  virtual ~Port() = default;
  virtual Backend backend() const noexcept = 0;

  // Throw rxio::Error saying what to fix (the memlock limit, the arena size).
  virtual std::unique_ptr<Region> allocate(std::size_t size, bool peer_writes) = 0;
  // Keys for the application's memory, cached where registering costs.
  virtual Keys keys_for(const void* address, std::size_t length, int access) = 0;
  // The peer is done with a key keys_for() gave for it (its rendezvous landed): a
  // port that can take the key back does.
  virtual void release(uint32_t rkey) noexcept { (void)rkey; }

  // One work request (wr.next is ignored): RDMA WRITE, WRITE_WITH_IMM or READ, as
  // ibv_post_send would take it. Returns 0 or an errno value.
  virtual int post_send(const ibv_send_wr& wr) noexcept = 0;
  // Room for one more arriving immediate.
  virtual int post_recv(uint64_t wr_id) noexcept = 0;
  virtual uint32_t max_inline() const noexcept = 0;
  // Completions and arrivals of this link as ibv_wc, for ports whose completions do
  // not come through the engine's CQ; those return 0.
  virtual int poll(std::span<ibv_wc> out) noexcept = 0;
  // Readable when poll() may have something to say after a sleep (-1: none).
  virtual int wake_fd() const noexcept = 0;
  // The poll(2) events to wait for on wake_fd(): POLLOUT too while sends wait for room.
  virtual short wake_events() const noexcept { return POLLIN; }
  // Arms wake_fd() before a sleep; false if something arrived meanwhile (do not sleep).
  virtual bool arm() noexcept = 0;

  // Readable when the peer may have gone away (-1: none); check_liveness() then says
  // why, or returns an empty string while the peer lives.
  virtual int liveness_fd() const noexcept = 0;
  virtual std::string check_liveness() noexcept = 0;
  // Cuts the peer off for good: nothing more arrives or leaves, and the peer notices.
  virtual void shut() noexcept = 0;
};

}  // namespace rxio::transport
