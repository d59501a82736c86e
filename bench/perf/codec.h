// Big-endian fields for rxio-perf's own messages between server and client.
#pragma once

#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.h"

namespace rxio::perf {

class Writer {
 public:
  Writer& u8(uint8_t v) { return put(v, 1); }
  Writer& u16(uint16_t v) { return put(v, 2); }
  Writer& u32(uint32_t v) { return put(v, 4); }
  Writer& u64(uint64_t v) { return put(v, 8); }
  Writer& f64(double v) { return put(std::bit_cast<uint64_t>(v), 8); }
  Writer& bytes(std::span<const std::byte> data) {
    out_.insert(out_.end(), data.begin(), data.end());
    return *this;
  }
  // Exactly `width` bytes, zero-padded; longer text is cut.
  Writer& text(std::string_view s, std::size_t width) {
    for (std::size_t i = 0; i < width; ++i) out_.push_back(static_cast<std::byte>(i < s.size() ? s[i] : 0));
    return *this;
  }
  const std::vector<std::byte>& data() const noexcept { return out_; }

 private:
  Writer& put(uint64_t v, int width) {
    for (int i = width - 1; i >= 0; --i) out_.push_back(static_cast<std::byte>(v >> (8 * i)));
    return *this;
  }
  std::vector<std::byte> out_;
};

// Throws rxio::Error (EPROTO) naming `what` when the message is too short.
class Reader {
 public:
  Reader(std::span<const std::byte> in, std::string what) : in_(in), what_(std::move(what)) {}
  uint8_t u8() { return static_cast<uint8_t>(get(1)); }
  uint16_t u16() { return static_cast<uint16_t>(get(2)); }
  uint32_t u32() { return static_cast<uint32_t>(get(4)); }
  uint64_t u64() { return get(8); }
  double f64() { return std::bit_cast<double>(get(8)); }
  std::span<const std::byte> bytes(std::size_t n) {
    need(n);
    auto out = in_.subspan(at_, n);
    at_ += n;
    return out;
  }
  std::string text(std::size_t width) {
    auto raw = bytes(width);
    std::string s;
    for (std::byte b : raw) {
      if (b == std::byte{0}) break;
      s.push_back(static_cast<char>(b));
    }
    return s;
  }

 private:
  void need(std::size_t n) const {
    if (in_.size() - at_ < n)
      throw Error(EPROTO, "decoding " + what_ + ": " + std::to_string(in_.size()) + " bytes is too short", {},
                  "run the same rxio-perf version on both sides");
  }
  uint64_t get(int width) {
    need(static_cast<std::size_t>(width));
    uint64_t v = 0;
    for (int i = 0; i < width; ++i) v = (v << 8) | std::to_integer<uint64_t>(in_[at_++]);
    return v;
  }
  std::span<const std::byte> in_;
  std::size_t at_ = 0;
  std::string what_;
};

}  // namespace rxio::perf
