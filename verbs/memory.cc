#include "verbs/memory.h"

#include <cerrno>
#include <cstring>

#include "base/error.h"
#include "base/log.h"

namespace rxio::verbs {

std::string device_name(const ibv_context* context) {
  return ibv_get_device_name(context->device);
}

void ProtectionDomain::Dealloc::operator()(ibv_pd* pd) const noexcept {
  if (int rc = ibv_dealloc_pd(pd); rc != 0)
    log::warn("freeing a protection domain on " + device_name(pd->context) +
              " failed: " + std::strerror(rc) + " (resources still use it)");
}

ProtectionDomain::ProtectionDomain(ibv_context* context) : pd_(ibv_alloc_pd(context)) {
  if (!pd_) throw Error(errno, "allocating a protection domain (ibv_alloc_pd)", device_name(context));
}

void MemoryRegion::Dereg::operator()(ibv_mr* mr) const noexcept {
  if (int rc = ibv_dereg_mr(mr); rc != 0)
    log::warn("deregistering a memory region on " + device_name(mr->context) +
              " failed: " + std::strerror(rc));
}

MemoryRegion MemoryRegion::register_host(const ProtectionDomain& pd, void* address,
                                         std::size_t length, int access) {
  ibv_mr* mr = ibv_reg_mr(pd.get(), address, length, access);
  if (!mr) {
    int err = errno;
    throw Error(err, "registering " + format_bytes(length) + " of host memory (ibv_reg_mr)",
                device_name(pd.context()), memlock_fix(err, length));
  }
  return MemoryRegion(mr);
}

MemoryRegion MemoryRegion::register_dmabuf(const ProtectionDomain& pd, int fd,
                                           uint64_t offset, std::size_t length,
                                           uint64_t iova, int access) {
  ibv_mr* mr = ibv_reg_dmabuf_mr(pd.get(), offset, length, iova, fd, access);
  if (!mr) {
    int err = errno;
    std::string fix = err == EOPNOTSUPP || err == EPROTONOSUPPORT
                          ? "this device or kernel cannot register dma-buf memory"
                          : memlock_fix(err, length);
    throw Error(err, "registering " + format_bytes(length) + " of dma-buf memory (ibv_reg_dmabuf_mr)",
                device_name(pd.context()), fix);
  }
  return MemoryRegion(mr);
}

}  // namespace rxio::verbs
