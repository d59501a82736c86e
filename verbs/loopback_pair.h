// Two RC QPs on one device, connected to each other, each with a registered buffer:
// the smallest complete RC set-up, for self-checks, tests and the round-trip demo.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "verbs/completion.h"
#include "verbs/device.h"
#include "verbs/gid.h"
#include "verbs/memory.h"
#include "verbs/queue_pair.h"

namespace rxio::verbs {

struct LoopbackSide {
  LoopbackSide(const ProtectionDomain& pd, ibv_context* context, std::size_t buffer_size,
               const QueueCaps& caps, SharedReceiveQueue* srq);
  // The CQ points at the channel beside it: the side stays where it was built.
  LoopbackSide(const LoopbackSide&) = delete;
  LoopbackSide& operator=(const LoopbackSide&) = delete;

  CompletionChannel channel;  // so tests can also block instead of polling
  CompletionQueue cq;
  QueuePair qp;
  std::vector<std::byte> buffer;
  MemoryRegion mr;
};

class LoopbackPair {
 public:
  // Opens `device`, picks its default GID (see choose_default_gid) and connects.
  explicit LoopbackPair(const std::string& device, std::size_t buffer_size = 1 << 20,
                        QueueCaps caps = {}, bool with_srq = false);
  LoopbackPair(const LoopbackPair&) = delete;
  LoopbackPair& operator=(const LoopbackPair&) = delete;

  LoopbackSide& a() { return a_; }
  LoopbackSide& b() { return b_; }
  ProtectionDomain& pd() { return pd_; }
  Context& context() { return context_; }
  const Endpoint& endpoint() const { return endpoint_; }
  SharedReceiveQueue* srq() { return srq_.get(); }

 private:
  void connect(LoopbackSide& local, uint32_t local_psn, LoopbackSide& remote, uint32_t remote_psn);

  Endpoint endpoint_;
  Context context_;
  ProtectionDomain pd_;
  std::unique_ptr<SharedReceiveQueue> srq_;
  LoopbackSide a_;
  LoopbackSide b_;
};

}  // namespace rxio::verbs
