#include "transport/verbs_port.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace rxio::transport {
namespace {

class VerbsRegion final : public Region {
 public:
  VerbsRegion(const verbs::ProtectionDomain& pd, std::size_t size, int access)
      : memory_(size), mr_(verbs::MemoryRegion::register_host(pd, memory_.data(), memory_.size(), access)) {
    data_ = memory_.data();
    size_ = size;
    keys_ = {mr_.lkey(), mr_.rkey()};
  }

 private:
  std::vector<std::byte> memory_;
  verbs::MemoryRegion mr_;
};

}  // namespace

std::unique_ptr<Region> VerbsPort::allocate(std::size_t size, bool peer_writes) {
  int access = IBV_ACCESS_LOCAL_WRITE | (peer_writes ? IBV_ACCESS_REMOTE_WRITE : 0);
  return std::make_unique<VerbsRegion>(pd_, size, access);
}

Keys VerbsPort::keys_for(const void* address, std::size_t length, int access) {
  const verbs::MemoryRegion& mr = cache_.get(address, length, access);
  return {mr.lkey(), mr.rkey()};
}

int VerbsPort::post_send(const ibv_send_wr& wr) noexcept {
  ibv_send_wr one = wr;
  one.next = nullptr;
  ibv_send_wr* bad = nullptr;
  if (!raw_qp) return EIO;  // shut
  return ibv_post_send(raw_qp, &one, &bad);
}

int VerbsPort::post_recv(uint64_t wr_id) noexcept {
  ibv_recv_wr wr{};
  wr.wr_id = wr_id;
  ibv_recv_wr* bad = nullptr;
  if (!raw_qp) return EIO;  // shut
  return ibv_post_recv(raw_qp, &wr, &bad);
}

int VerbsPort::liveness_fd() const noexcept {
  if (channel) return channel->native_fd();
  if (cm_events) return cm_events->fd();
  return -1;
}

std::string VerbsPort::check_liveness() noexcept {
  if (channel) {
    char byte;
    ssize_t n = ::recv(channel->native_fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return "the peer process closed its side (it exited or was killed)";
    if (n < 0 && errno != EAGAIN && errno != EINTR) return std::string("the peer's socket failed: ") + std::strerror(errno);
    return {};
  }
  if (cm_events) {
    try {
      while (auto event = cm_events->next(std::chrono::milliseconds(0))) {
        auto type = event->type();
        if (type == RDMA_CM_EVENT_DISCONNECTED || type == RDMA_CM_EVENT_DEVICE_REMOVAL ||
            type == RDMA_CM_EVENT_TIMEWAIT_EXIT || type == RDMA_CM_EVENT_UNREACHABLE ||
            type == RDMA_CM_EVENT_CONNECT_ERROR || type == RDMA_CM_EVENT_REJECTED)
          return "rdma_cm: " + event->describe();
      }
    } catch (const std::exception& e) {
      return e.what();
    }
  }
  return {};
}

void VerbsPort::shut() noexcept {
  // The QP in error stops the peer's access to our memory; the peer sees its writes fail.
  if (raw_qp) {
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_ERR;
    ibv_modify_qp(raw_qp, &attr, IBV_QP_STATE);
  }
  if (channel) ::shutdown(channel->native_fd(), SHUT_RDWR);
  if (cm_id) rdma_disconnect(cm_id->get());
  // Destroyed now, not with the engine: a QP in error can still hold a reference to
  // the region a write was landing in (Soft-RoCE's responder does), and the kernel's
  // deregistration of that region then waits on it, at process exit too. Completions
  // already queued name the link, which the engine keeps.
  raw_qp = nullptr;
  cm_qp.reset();
  qp.reset();
}

}  // namespace rxio::transport
