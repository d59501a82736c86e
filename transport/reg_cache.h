// Memory registrations reused across operations, keyed by address range.
//
// Policy for memory the application frees: a registration pins the pages it covers, so
// freed-and-reused memory would still be the old pages to the device. Call
// Engine::forget(address, length) before freeing or unmapping memory that rxio has
// used (NCCL and UCX users know this as deregistration); the cache never guesses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>

#include "verbs/memory.h"

namespace rxio::transport {

class RegistrationCache {
 public:
  explicit RegistrationCache(const verbs::ProtectionDomain& pd) : pd_(&pd) {}

  // A registration covering [address, address + length) with at least `access`;
  // registers exactly that range on a miss. Throws rxio::Error (with the memlock fix)
  // when the device refuses.
  const verbs::MemoryRegion& get(const void* address, std::size_t length, int access);
  // Drops every registration overlapping the range. Returns how many.
  std::size_t invalidate(const void* address, std::size_t length);

  std::size_t size() const noexcept { return entries_.size(); }
  uint64_t hits() const noexcept { return hits_; }
  uint64_t misses() const noexcept { return misses_; }

 private:
  struct Entry {
    uintptr_t end;
    int access;
    verbs::MemoryRegion mr;
  };
  const verbs::ProtectionDomain* pd_;
  std::multimap<uintptr_t, Entry> entries_;  // by start address
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace rxio::transport
