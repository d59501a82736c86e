#include "transport/reg_cache.h"

#include <unistd.h>

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
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t first = start & ~(page - 1);
  uintptr_t last = (end + page - 1) & ~(page - 1);
  auto mr = verbs::MemoryRegion::register_host(*pd_, reinterpret_cast<void*>(first), last - first, access);
  auto inserted = entries_.emplace(first, Entry{last, access, std::move(mr)});
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
