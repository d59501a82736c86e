// The RC connection between rxio-perf's server and client: a QP on each side, a
// registered buffer, and a control channel beside the data path. QP numbers and
// buffer keys travel over a TCP connection (perftest's default) or in rdma_cm's
// private data (-R), where control messages are then RDMA-written into a mailbox.
//
// Buffer layout on both sides, `half` being the largest message rounded up to a page:
//   [0, half)                  the peer's WRITEs and SENDs land here; its READs read here
//   [half, 2 half)             this side's WRITEs and SENDs come from here; READs land here
//   [2 half, + kSlot)          control inbox (-R)
//   [2 half + kSlot, + kSlot)  control outbox (-R)
#pragma once

#include <infiniband/verbs.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "bench/perf/report.h"
#include "verbs/completion.h"

namespace rxio::perf {

struct Options;

// What the data path uses; owned by the session.
struct Link {
  ibv_qp* qp = nullptr;
  verbs::CompletionQueue* send_cq = nullptr;
  verbs::CompletionQueue* recv_cq = nullptr;
  std::byte* buffer = nullptr;
  std::size_t half = 0;
  uint32_t lkey = 0;
  uint64_t remote_addr = 0;  // the peer's buffer (its receive half)
  uint32_t rkey = 0;
  std::string device;        // for messages
};

struct QueueSizes {
  uint32_t send = 1;
  uint32_t recv = 1;
};

class RcSession {
 public:
  // The server waits for a client; a client connects to options.server. Both check
  // that the other side runs the same test. Throws rxio::Error.
  static std::unique_ptr<RcSession> open(const Options& options, const QueueSizes& sizes);
  virtual ~RcSession() = default;

  Link& link() noexcept { return link_; }
  const std::vector<Field>& fields() const noexcept { return fields_; }
  const std::vector<std::string>& address_lines() const noexcept { return address_lines_; }

  // Control messages, used only while no data operation is in flight. receive waits
  // up to `timeout`, failing at once if the peer goes away.
  virtual void send(std::span<const std::byte> message) = 0;
  virtual std::vector<std::byte> receive(std::chrono::milliseconds timeout, const char* waiting_for) = 0;

 protected:
  RcSession() = default;
  // Fills the banner from the connected QP.
  void describe(const Options& options, const QueueSizes& sizes, ibv_context* context, uint8_t port,
                uint32_t local_rkey);

  Link link_;
  std::vector<Field> fields_;
  std::vector<std::string> address_lines_;
  std::string gid_index_;  // the source GID index the QP uses
};

// The buffer half for the options' largest message.
std::size_t buffer_half(const Options& options);

}  // namespace rxio::perf
