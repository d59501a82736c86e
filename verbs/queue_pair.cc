#include "verbs/queue_pair.h"

#include <cerrno>
#include <cstring>
#include <string>

#include "base/error.h"
#include "base/log.h"
#include "verbs/completion.h"
#include "verbs/memory.h"

namespace rxio::verbs {

const char* to_string(ibv_qp_state state) noexcept {
  switch (state) {
    case IBV_QPS_RESET: return "RESET";
    case IBV_QPS_INIT: return "INIT";
    case IBV_QPS_RTR: return "RTR";
    case IBV_QPS_RTS: return "RTS";
    case IBV_QPS_SQD: return "SQD";
    case IBV_QPS_SQE: return "SQE";
    case IBV_QPS_ERR: return "ERR";
    default: return "UNKNOWN";
  }
}

void SharedReceiveQueue::Destroy::operator()(ibv_srq* srq) const noexcept {
  if (int rc = ibv_destroy_srq(srq); rc != 0)
    log::warn("destroying a shared receive queue on " + device_name(srq->context) +
              " failed: " + std::strerror(rc));
}

SharedReceiveQueue::SharedReceiveQueue(const ProtectionDomain& pd, uint32_t max_wr,
                                       uint32_t max_sge) {
  ibv_srq_init_attr attr{};
  attr.attr.max_wr = max_wr;
  attr.attr.max_sge = max_sge;
  srq_.reset(ibv_create_srq(pd.get(), &attr));
  if (!srq_) {
    int err = errno;
    throw Error(err, "creating a shared receive queue of " + std::to_string(max_wr) +
                         " entries (ibv_create_srq)",
                device_name(pd.context()), memlock_fix(err, 0));
  }
}

void QueuePair::Destroy::operator()(ibv_qp* qp) const noexcept {
  if (int rc = ibv_destroy_qp(qp); rc != 0)
    log::warn("destroying QP " + std::to_string(qp->qp_num) + " on " +
              device_name(qp->context) + " failed: " + std::strerror(rc));
}

QueuePair::QueuePair(const ProtectionDomain& pd, CompletionQueue& send_cq,
                     CompletionQueue& recv_cq, const QueueCaps& caps, SharedReceiveQueue* srq) {
  ibv_qp_init_attr attr{};
  attr.send_cq = send_cq.get();
  attr.recv_cq = recv_cq.get();
  attr.srq = srq ? srq->get() : nullptr;
  attr.qp_type = IBV_QPT_RC;
  attr.cap.max_send_wr = caps.max_send_wr;
  attr.cap.max_recv_wr = srq ? 0 : caps.max_recv_wr;
  attr.cap.max_send_sge = caps.max_send_sge;
  attr.cap.max_recv_sge = srq ? 0 : caps.max_recv_sge;
  attr.cap.max_inline_data = caps.max_inline_data;
  qp_.reset(ibv_create_qp(pd.get(), &attr));
  if (!qp_) {
    int err = errno;
    throw Error(err,
                "creating an RC QP with " + std::to_string(caps.max_send_wr) + " send and " +
                    std::to_string(caps.max_recv_wr) + " receive entries, " +
                    std::to_string(caps.max_inline_data) + " B inline (ibv_create_qp)",
                device_name(pd.context()),
                err == EINVAL ? "the device's limits are in `ibv_devinfo -v`"
                              : memlock_fix(err, 0));
  }
  // ibv_create_qp writes back the capabilities it granted.
  caps_ = QueueCaps{attr.cap.max_send_wr, attr.cap.max_recv_wr, attr.cap.max_send_sge,
                    attr.cap.max_recv_sge, attr.cap.max_inline_data};
}

void QueuePair::modify(ibv_qp_attr& attr, int mask, const char* transition) {
  if (int rc = ibv_modify_qp(get(), &attr, mask); rc != 0)
    throw Error(rc, std::string("moving QP ") + std::to_string(qp_num()) + " " + transition +
                        " (ibv_modify_qp)",
                device_name(get()->context));
}

void QueuePair::to_init(uint8_t port, int access) {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_INIT;
  attr.pkey_index = 0;
  attr.port_num = port;
  attr.qp_access_flags = static_cast<unsigned>(access);
  modify(attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS,
         "RESET→INIT");
}

void QueuePair::to_rtr(const RemoteQp& remote, const PathParams& path,
                       const ReliabilityParams& rel) {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTR;
  attr.path_mtu = path.mtu;
  attr.dest_qp_num = remote.qp_num;
  attr.rq_psn = remote.psn;
  attr.max_dest_rd_atomic = rel.max_dest_rd_atomic;
  attr.min_rnr_timer = rel.min_rnr_timer;
  attr.ah_attr.dlid = remote.lid;
  attr.ah_attr.sl = path.service_level;
  attr.ah_attr.port_num = path.port;
  if (path.global) {
    attr.ah_attr.is_global = 1;
    attr.ah_attr.grh.dgid = remote.gid;
    attr.ah_attr.grh.sgid_index = path.sgid_index;
    attr.ah_attr.grh.hop_limit = path.hop_limit;
    attr.ah_attr.grh.traffic_class = path.traffic_class;
  }
  modify(attr,
         IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
             IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER,
         "INIT→RTR");
}

void QueuePair::to_rts(uint32_t local_psn, const ReliabilityParams& rel) {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTS;
  attr.sq_psn = local_psn;
  attr.timeout = rel.timeout;
  attr.retry_cnt = rel.retry_count;
  attr.rnr_retry = rel.rnr_retry;
  attr.max_rd_atomic = rel.max_rd_atomic;
  modify(attr,
         IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
             IBV_QP_MAX_QP_RD_ATOMIC,
         "RTR→RTS");
}

void QueuePair::to_error() {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_ERR;
  modify(attr, IBV_QP_STATE, "to ERR");
}

void QueuePair::to_reset() {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RESET;
  modify(attr, IBV_QP_STATE, "to RESET");
}

ibv_qp_state QueuePair::state() const {
  ibv_qp_attr attr{};
  ibv_qp_init_attr init{};
  if (int rc = ibv_query_qp(get(), &attr, IBV_QP_STATE, &init); rc != 0)
    throw Error(rc, "querying QP " + std::to_string(qp_num()) + " (ibv_query_qp)",
                device_name(get()->context));
  return attr.qp_state;
}

}  // namespace rxio::verbs
