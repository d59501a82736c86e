// Protection domains and memory regions (host memory and dma-buf).
#pragma once

#include <infiniband/verbs.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace rxio::verbs {

// Parents (the ibv_context here) must outlive their children, as in libibverbs itself.
class ProtectionDomain {
 public:
  explicit ProtectionDomain(ibv_context* context);

  ibv_pd* get() const noexcept { return pd_.get(); }
  ibv_context* context() const noexcept { return pd_->context; }

 private:
  struct Dealloc {
    void operator()(ibv_pd* pd) const noexcept;
  };
  std::unique_ptr<ibv_pd, Dealloc> pd_;
};

inline constexpr int kLocalWrite = IBV_ACCESS_LOCAL_WRITE;
inline constexpr int kRemoteAll = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
                                  IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;

class MemoryRegion {
 public:
  // Pins and registers [address, address + length). A locked-memory limit that is too
  // small is reported with the fix (`ulimit -l`).
  static MemoryRegion register_host(const ProtectionDomain& pd, void* address,
                                    std::size_t length, int access);
  // Registers `length` bytes at `offset` in the dma-buf `fd` (GPU memory, for example),
  // seen by the peer at `iova`. Devices without dma-buf support answer EOPNOTSUPP.
  static MemoryRegion register_dmabuf(const ProtectionDomain& pd, int fd, uint64_t offset,
                                      std::size_t length, uint64_t iova, int access);

  ibv_mr* get() const noexcept { return mr_.get(); }
  uint32_t lkey() const noexcept { return mr_->lkey; }
  uint32_t rkey() const noexcept { return mr_->rkey; }
  void* address() const noexcept { return mr_->addr; }
  std::size_t length() const noexcept { return mr_->length; }

 private:
  struct Dereg {
    void operator()(ibv_mr* mr) const noexcept;
  };
  explicit MemoryRegion(ibv_mr* mr) : mr_(mr) {}
  std::unique_ptr<ibv_mr, Dereg> mr_;
};

// The device name behind a context, for messages.
std::string device_name(const ibv_context* context);

}  // namespace rxio::verbs
