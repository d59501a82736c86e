// Little-endian integers in byte buffers, for everything rxio puts on a wire.
#pragma once

#include <endian.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace rxio::bytes {

inline void put16(std::byte* out, uint16_t v) {
  v = htole16(v);
  std::memcpy(out, &v, 2);
}
inline void put32(std::byte* out, uint32_t v) {
  v = htole32(v);
  std::memcpy(out, &v, 4);
}
inline void put64(std::byte* out, uint64_t v) {
  v = htole64(v);
  std::memcpy(out, &v, 8);
}
inline uint16_t get16(const std::byte* in) {
  uint16_t v;
  std::memcpy(&v, in, 2);
  return le16toh(v);
}
inline uint32_t get32(const std::byte* in) {
  uint32_t v;
  std::memcpy(&v, in, 4);
  return le32toh(v);
}
inline uint64_t get64(const std::byte* in) {
  uint64_t v;
  std::memcpy(&v, in, 8);
  return le64toh(v);
}

}  // namespace rxio::bytes
