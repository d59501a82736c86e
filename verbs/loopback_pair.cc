#include "verbs/loopback_pair.h"

namespace rxio::verbs {
namespace {
// Each side's first send PSN; a receiver expects the sender's.
constexpr uint32_t kPsnA = 0x1000, kPsnB = 0x2000;
}  // namespace

LoopbackSide::LoopbackSide(const ProtectionDomain& pd, ibv_context* context, std::size_t buffer_size,
                           const QueueCaps& caps, SharedReceiveQueue* srq)
    : channel(context),
      cq(context, 256, &channel),
      qp(pd, cq, cq, caps, srq),
      buffer(buffer_size),
      mr(MemoryRegion::register_host(pd, buffer.data(), buffer.size(), kRemoteAll)) {}

LoopbackPair::LoopbackPair(const std::string& device, std::size_t buffer_size, QueueCaps caps,
                           bool with_srq)
    : endpoint_(select_by_device(device)),
      context_(Context::open_by_name(endpoint_.device)),
      pd_(context_.get()),
      srq_(with_srq ? std::make_unique<SharedReceiveQueue>(pd_, 64) : nullptr),
      a_(pd_, context_.get(), buffer_size, caps, srq_.get()),
      b_(pd_, context_.get(), buffer_size, caps, srq_.get()) {
  connect(a_, kPsnA, b_, kPsnB);
  connect(b_, kPsnB, a_, kPsnA);
}

void LoopbackPair::connect(LoopbackSide& local, uint32_t local_psn, LoopbackSide& remote,
                           uint32_t remote_psn) {
  PathParams path;
  path.port = endpoint_.port;
  path.sgid_index = static_cast<uint8_t>(endpoint_.gid.index);
  path.mtu = context_.query_port(endpoint_.port).active_mtu;
  local.qp.to_init(endpoint_.port);
  local.qp.to_rtr(RemoteQp{remote.qp.qp_num(), remote_psn, endpoint_.gid.gid, 0}, path);
  local.qp.to_rts(local_psn);
}

}  // namespace rxio::verbs
