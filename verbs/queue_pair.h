// Reliable-connected queue pairs with explicit state changes, and shared receive queues.
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <memory>

namespace rxio::verbs {

class CompletionQueue;
class ProtectionDomain;

struct QueueCaps {
  uint32_t max_send_wr = 128;
  uint32_t max_recv_wr = 128;
  uint32_t max_send_sge = 1;
  uint32_t max_recv_sge = 1;
  uint32_t max_inline_data = 64;
};

class SharedReceiveQueue {
 public:
  SharedReceiveQueue(const ProtectionDomain& pd, uint32_t max_wr, uint32_t max_sge = 1);

  ibv_srq* get() const noexcept { return srq_.get(); }
  int post_recv(ibv_recv_wr* wr, ibv_recv_wr** bad) noexcept {
    return ibv_post_srq_recv(get(), wr, bad);
  }

 private:
  struct Destroy {
    void operator()(ibv_srq* srq) const noexcept;
  };
  std::unique_ptr<ibv_srq, Destroy> srq_;
};

// What the remote side of an RC connection tells us (out of band) to reach RTR.
struct RemoteQp {
  uint32_t qp_num = 0;
  uint32_t psn = 0;
  ibv_gid gid{};       // RoCE and routed IB
  uint16_t lid = 0;    // InfiniBand
};

struct PathParams {
  uint8_t port = 1;
  uint8_t sgid_index = 0;
  bool global = true;  // required on RoCE
  ibv_mtu mtu = IBV_MTU_1024;
  uint8_t hop_limit = 64;
  uint8_t traffic_class = 0;
  uint8_t service_level = 0;
};

struct ReliabilityParams {
  uint8_t timeout = 14;       // 4.096 µs * 2^14 ≈ 67 ms per try
  uint8_t retry_count = 7;
  uint8_t rnr_retry = 7;      // 7 = retry forever on receiver-not-ready
  uint8_t min_rnr_timer = 12; // 0.64 ms
  uint8_t max_rd_atomic = 16;       // outstanding READ/atomic we issue
  uint8_t max_dest_rd_atomic = 16;  // outstanding READ/atomic we accept
};

const char* to_string(ibv_qp_state state) noexcept;

class QueuePair {
 public:
  // An RC QP in RESET; with `srq`, receives come from the shared queue.
  QueuePair(const ProtectionDomain& pd, CompletionQueue& send_cq, CompletionQueue& recv_cq,
            const QueueCaps& caps, SharedReceiveQueue* srq = nullptr);

  ibv_qp* get() const noexcept { return qp_.get(); }
  uint32_t qp_num() const noexcept { return qp_->qp_num; }
  // What the device actually granted, which may exceed what was asked for.
  const QueueCaps& caps() const noexcept { return caps_; }

  // RESET → INIT → RTR → RTS. Each throws rxio::Error naming the QP, the device and
  // the transition when the device refuses.
  void to_init(uint8_t port, int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
                                          IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC);
  void to_rtr(const RemoteQp& remote, const PathParams& path, const ReliabilityParams& rel = {});
  void to_rts(uint32_t local_psn, const ReliabilityParams& rel = {});
  // Moves the QP to ERR: outstanding work requests complete with IBV_WC_WR_FLUSH_ERR.
  void to_error();
  void to_reset();

  ibv_qp_state state() const;

  // Data path: 0 or an errno value, as libibverbs returns them.
  int post_send(ibv_send_wr* wr, ibv_send_wr** bad) noexcept { return ibv_post_send(get(), wr, bad); }
  int post_recv(ibv_recv_wr* wr, ibv_recv_wr** bad) noexcept { return ibv_post_recv(get(), wr, bad); }

 private:
  struct Destroy {
    void operator()(ibv_qp* qp) const noexcept;
  };
  void modify(ibv_qp_attr& attr, int mask, const char* transition);

  std::unique_ptr<ibv_qp, Destroy> qp_;
  QueueCaps caps_;
};

}  // namespace rxio::verbs
