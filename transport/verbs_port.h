// Internal: the verbs backend's port, an RC QP (ours with the TCP bootstrap, rdma_cm's
// otherwise). The control path (connect.cc) sets the QP up; the data path only sees
// the Port interface.
#pragma once

#include <optional>

#include "transport/oob.h"
#include "transport/port.h"
#include "transport/reg_cache.h"
#include "verbs/cm.h"
#include "verbs/memory.h"
#include "verbs/queue_pair.h"

namespace rxio::transport {

class VerbsPort final : public Port {
 public:
  VerbsPort(const verbs::ProtectionDomain& pd, RegistrationCache& cache) : pd_(pd), cache_(cache) {}

  Backend backend() const noexcept override { return Backend::verbs; }
  std::unique_ptr<Region> allocate(std::size_t size, bool peer_writes) override;
  Keys keys_for(const void* address, std::size_t length, int access) override;
  int post_send(const ibv_send_wr& wr) noexcept override;
  int post_recv(uint64_t wr_id) noexcept override;
  uint32_t max_inline() const noexcept override { return max_inline_; }
  int poll(std::span<ibv_wc>) noexcept override { return 0; }  // the engine's CQ has them
  int wake_fd() const noexcept override { return -1; }
  bool arm() noexcept override { return true; }
  int liveness_fd() const noexcept override;
  std::string check_liveness() noexcept override;
  void shut() noexcept override;

  // Set up by the control path.
  std::optional<verbs::QueuePair> qp;
  std::optional<verbs::cm::EventChannel> cm_events;
  std::optional<verbs::cm::Id> cm_id;
  std::optional<verbs::cm::QueuePair> cm_qp;
  std::optional<oob::Channel> channel;  // tcp bootstrap: stays open to tell peer death
  ibv_qp* raw_qp = nullptr;
  uint32_t max_inline_ = 0;

 private:
  const verbs::ProtectionDomain& pd_;
  RegistrationCache& cache_;
};

}  // namespace rxio::transport
