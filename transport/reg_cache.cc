#include "transport/reg_cache.h"

namespace rxio::transport {

const verbs::MemoryRegion& RegistrationCache::get(const void* address, std::size_t length, int access) {
  auto start = reinterpret_cast<uintptr_t>(address);
  uintptr_t end = start + (length ? length : 1);
  // Entries may overlap (a registration in use is never replaced, as a peer may hold
  // its key), so look at the few nearest entries starting at or before `start`.
  constexpr int kLookBack = 16;
  auto it = entries_.upper_bound(start);
  for (int i = 0; i < kLookBack && it != entries_.begin(); ++i) {
    --it;
    const Entry& entry = it->second;
    if (entry.end >= end && (entry.access & access) == access) {
      ++hits_;
      return entry.mr;
    }
  }
  ++misses_;
  // Exactly the buffer, not its pages: a key given to a peer must not reach the
  // neighbouring heap (the device checks memory-region bounds per byte).
  auto mr = verbs::MemoryRegion::register_host(*pd_, const_cast<void*>(address), end - start, access);
  auto inserted = entries_.emplace(start, Entry{end, access, std::move(mr)});
  return inserted->second.mr;
}

std::size_t RegistrationCache::invalidate(const void* address, std::size_t length) {
  auto start = reinterpret_cast<uintptr_t>(address);
  uintptr_t end = start + length;
  std::size_t dropped = 0;
  for (auto i = entries_.begin(); i != entries_.end();) {
    if (i->first < end && i->second.end > start) {
      i = entries_.erase(i);
      ++dropped;
    } else {
      ++i;
    }
  }
  return dropped;
}

}  // namespace rxio::transport
