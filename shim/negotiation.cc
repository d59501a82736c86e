#include "shim/negotiation.h"

#include <arpa/inet.h>

#include <cstring>

#include "base/bytes.h"

namespace rxio::shim {

std::optional<Endpoint> Endpoint::from(const sockaddr* address) noexcept {
  Endpoint e;
  if (address->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(address);
    e.family = AF_INET;
    std::memcpy(e.address.data(), &in->sin_addr, 4);
    e.port = ntohs(in->sin_port);
    return e;
  }
  if (address->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(address);
    e.port = ntohs(in6->sin6_port);
    // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; the peer sees plain IPv4.
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
      e.family = AF_INET;
      std::memcpy(e.address.data(), in6->sin6_addr.s6_addr + 12, 4);
      return e;
    }
    e.family = AF_INET6;
    std::memcpy(e.address.data(), &in6->sin6_addr, 16);
    return e;
  }
  return std::nullopt;
}

std::string Endpoint::to_string() const {
  char text[INET6_ADDRSTRLEN] = "?";
  inet_ntop(family == AF_INET6 ? AF_INET6 : AF_INET, address.data(), text, sizeof text);
  return family == AF_INET6 ? "[" + std::string(text) + "]:" + std::to_string(port)
                            : std::string(text) + ":" + std::to_string(port);
}

std::size_t TupleHash::operator()(const Tuple& t) const noexcept {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const Endpoint& e) {
    for (uint8_t b : e.address) h = (h ^ b) * 1099511628211ull;
    h = (h ^ e.port) * 1099511628211ull;
    h = (h ^ e.family) * 1099511628211ull;
  };
  mix(t.client);
  mix(t.server);
  return h;
}

namespace negotiation {
namespace {

void put_header(std::byte* out, Kind kind) {
  bytes::put32(out, kMagic);
  out[4] = std::byte{kVersion};
  out[5] = static_cast<std::byte>(kind);
}

bool header_is(std::span<const std::byte> in, std::size_t size, Kind kind) {
  return in.size() == size && bytes::get32(in.data()) == kMagic && in[4] == std::byte{kVersion} &&
         in[5] == static_cast<std::byte>(kind);
}

void put_endpoint(std::byte* out, const Endpoint& e) {
  std::memcpy(out, e.address.data(), 16);
  bytes::put16(out + 16, e.port);
}

Endpoint get_endpoint(const std::byte* in, uint8_t family) {
  Endpoint e;
  e.family = family;
  std::memcpy(e.address.data(), in, 16);
  e.port = bytes::get16(in + 16);
  return e;
}

}  // namespace

RequestBytes encode(const Request& r) {
  RequestBytes encoded;
  std::byte* out = encoded.bytes.data();
  put_header(out, r.query ? Kind::query : Kind::request);
  out[6] = std::byte{r.tuple.client.family};
  put_endpoint(out + 8, r.tuple.client);
  put_endpoint(out + 26, r.tuple.server);
  bytes::put32(out + 44, r.pid);
  if (r.query) bytes::put64(out + 48, r.query);
  encoded.size = r.query ? kQuerySize : kRequestSize;
  return encoded;
}

std::size_t request_size(std::span<const std::byte> in) noexcept {
  return in.size() > 5 && in[5] == static_cast<std::byte>(Kind::query) ? kQuerySize : kRequestSize;
}

std::optional<Request> decode_request(std::span<const std::byte> in) noexcept {
  const bool query = header_is(in, kQuerySize, Kind::query);
  if (!query && !header_is(in, kRequestSize, Kind::request)) return std::nullopt;
  auto family = static_cast<uint8_t>(in[6]);
  if (family != AF_INET && family != AF_INET6) return std::nullopt;
  if (in[7] != std::byte{0}) return std::nullopt;
  Request r;
  r.tuple.client = get_endpoint(in.data() + 8, family);
  r.tuple.server = get_endpoint(in.data() + 26, family);
  r.pid = bytes::get32(in.data() + 44);
  if (query) {
    r.query = bytes::get64(in.data() + 48);
    if (r.query == 0) return std::nullopt;
  }
  if (r.tuple.server.port == 0 || r.tuple.client.port == 0 || r.pid == 0) return std::nullopt;
  return r;
}

std::array<std::byte, kAnswerSize> encode(const Answer& a) {
  std::array<std::byte, kAnswerSize> out{};
  if (!a.accepted && a.redirect) {
    put_header(out.data(), Kind::redirect);
    bytes::put32(out.data() + 8, a.redirect);
    bytes::put16(out.data() + 12, a.redirect_port);
    return out;
  }
  put_header(out.data(), a.accepted ? Kind::accept : Kind::refuse);
  out[6] = a.accepted ? std::byte{0} : static_cast<std::byte>(a.refusal);
  bytes::put16(out.data() + 8, a.engine_port);
  bytes::put64(out.data() + 16, a.cookie);
  return out;
}

std::optional<Answer> decode_answer(std::span<const std::byte> in) noexcept {
  Answer a;
  if (header_is(in, kAnswerSize, Kind::accept)) {
    a.accepted = true;
    a.engine_port = bytes::get16(in.data() + 8);
    a.cookie = bytes::get64(in.data() + 16);
    if (in[6] != std::byte{0} || a.engine_port == 0) return std::nullopt;
    return a;
  }
  if (header_is(in, kAnswerSize, Kind::refuse)) {
    auto why = static_cast<uint8_t>(in[6]);
    if (why < static_cast<uint8_t>(Refusal::policy) || why > static_cast<uint8_t>(Refusal::not_yet))
      return std::nullopt;
    a.refusal = static_cast<Refusal>(why);
    return a;
  }
  if (header_is(in, kAnswerSize, Kind::redirect)) {
    a.redirect = bytes::get32(in.data() + 8);
    a.redirect_port = bytes::get16(in.data() + 12);
    for (std::size_t i = 14; i < kAnswerSize; ++i)
      if (in[i] != std::byte{0}) return std::nullopt;
    if (in[6] != std::byte{0} || a.redirect == 0) return std::nullopt;
    return a;
  }
  return std::nullopt;
}

std::array<std::byte, kNoticeSize> encode(const Notice& notice) {
  std::array<std::byte, kNoticeSize> out{};
  put_header(out.data(), notice.kind);
  bytes::put64(out.data() + 8, notice.kind == Kind::switched ? notice.sent : 0);
  return out;
}

std::optional<Notice> decode_notice(std::span<const std::byte> in) noexcept {
  for (Kind kind : {Kind::confirm, Kind::abort, Kind::switched}) {
    if (!header_is(in, kNoticeSize, kind) || in[6] != std::byte{0} || in[7] != std::byte{0}) continue;
    const uint64_t sent = bytes::get64(in.data() + 8);
    if (kind != Kind::switched ? sent != 0 : sent > (uint64_t(1) << 62) && sent != kSentUnknown) return std::nullopt;
    return Notice{kind, sent};
  }
  return std::nullopt;
}

std::array<std::byte, kResumeSize> encode(const Resume& r) {
  std::array<std::byte, kResumeSize> out{};
  put_header(out.data(), r.hand_over ? Kind::hand_over : Kind::resume);
  bytes::put64(out.data() + 8, r.from);
  bytes::put64(out.data() + 16, r.kept);
  bytes::put64(out.data() + 24, r.hand_over ? r.read : 0);
  return out;
}

std::optional<Resume> decode_resume(std::span<const std::byte> in) noexcept {
  const bool hand_over = header_is(in, kResumeSize, Kind::hand_over);
  if ((!hand_over && !header_is(in, kResumeSize, Kind::resume)) || in[6] != std::byte{0} || in[7] != std::byte{0})
    return std::nullopt;
  Resume r{bytes::get64(in.data() + 8), bytes::get64(in.data() + 16), hand_over, bytes::get64(in.data() + 24)};
  // A stream position past 2^62 bytes is no sane peer's.
  constexpr uint64_t kLimit = uint64_t(1) << 62;
  if (r.from > kLimit || r.kept > kLimit || r.read > kLimit || (!hand_over && r.read != 0)) return std::nullopt;
  return r;
}

std::string endpoint_name(uint16_t port, uint32_t pid) {
  return "rxio-shim." + std::to_string(port) + (pid ? "." + std::to_string(pid) : "");
}

}  // namespace negotiation
}  // namespace rxio::shim
