#include "transport/wire.h"

#include <endian.h>

#include <cstring>

#include "base/bytes.h"
#include "transport/engine.h"

namespace rxio::transport::wire {
namespace {

using bytes::get16;
using bytes::get32;
using bytes::get64;
using bytes::put16;
using bytes::put32;
using bytes::put64;

void put_ring(std::byte* out, const RingInfo& ring) {
  put64(out, ring.address);
  put32(out + 8, ring.rkey);
  put32(out + 12, ring.slots);
  put32(out + 16, ring.slot_size);
}

bool get_ring(const std::byte* in, RingInfo& ring, Fault& fault) {
  ring = RingInfo{get64(in), get32(in + 8), get32(in + 12), get32(in + 16)};
  if (ring.slots == 0 || ring.slots > kMaxRingSlots || ring.slot_size <= kSlotHeaderSize ||
      ring.slot_size > kMaxSlotSize) {
    fault = Fault::bad_length;
    return false;
  }
  return true;
}

bool long_enough(std::span<const std::byte> in, std::size_t size, Fault& fault) {
  if (in.size() >= size) return true;
  fault = Fault::truncated;
  return false;
}

}  // namespace

std::string_view to_string(Fault fault) {
  switch (fault) {
    case Fault::truncated: return "truncated message";
    case Fault::bad_magic: return "not an rxio peer (bad magic)";
    case Fault::bad_version: return "unsupported protocol version";
    case Fault::bad_kind: return "unknown message kind";
    case Fault::bad_length: return "length out of range";
    case Fault::bad_connection: return "unknown connection id";
    case Fault::ring_overflow: return "peer wrote past its credits";
    case Fault::credit_overflow: return "peer returned more credits than slots";
    case Fault::bad_rendezvous: return "unknown rendezvous id";
    case Fault::count_: break;
  }
  return "?";
}

namespace {

// Magic and version start every bootstrap message.
void put_preamble(std::byte* out) {
  put32(out, kMagic);
  put16(out + 4, kVersion);
}

bool check_preamble(std::span<const std::byte> in, std::size_t size, Fault& fault) {
  if (!long_enough(in, size, fault)) return false;
  if (get32(in.data()) != kMagic) {
    fault = Fault::bad_magic;
    return false;
  }
  if (get16(in.data() + 4) != kVersion) {
    fault = Fault::bad_version;
    return false;
  }
  return true;
}

constexpr uint8_t kKnownBackends = 0x7;  // verbs, shm, tcp

}  // namespace

uint32_t encode(const Imm& imm) {
  return (uint32_t(imm.type) << 28) | ((imm.connection & (kMaxConnections - 1)) << 8) | imm.value;
}

std::optional<Imm> decode_imm(uint32_t raw, Fault& fault) {
  auto type = static_cast<ImmType>(raw >> 28);
  if (type < ImmType::slot || type > ImmType::rndv) {
    fault = Fault::bad_kind;
    return std::nullopt;
  }
  return Imm{type, (raw >> 8) & (kMaxConnections - 1), static_cast<uint8_t>(raw & 0xff)};
}

void encode(const SlotHeader& header, std::byte* out) {
  out[0] = static_cast<std::byte>(header.kind);
  out[1] = out[2] = out[3] = std::byte{0};
  put32(out + 4, header.length);
  put64(out + 8, header.tag);
}

std::optional<SlotHeader> decode_slot_header(std::span<const std::byte> slot, uint32_t max_payload,
                                             Fault& fault) {
  if (!long_enough(slot, kSlotHeaderSize, fault)) return std::nullopt;
  SlotHeader header{static_cast<SlotKind>(slot[0]), get32(slot.data() + 4), get64(slot.data() + 8)};
  std::size_t fixed = 0;  // payload size the kind requires, 0 when it varies
  switch (header.kind) {
    case SlotKind::eager:
    case SlotKind::stream: break;
    case SlotKind::connect: fixed = kConnectRequestSize; break;
    case SlotKind::accept: fixed = kConnectReplySize; break;
    case SlotKind::release: fixed = kReleaseSize; break;
    case SlotKind::close:
      if (header.length != 0) {
        fault = Fault::bad_length;
        return std::nullopt;
      }
      break;
    default: fault = Fault::bad_kind; return std::nullopt;
  }
  if (header.length > max_payload || header.length > slot.size() - kSlotHeaderSize ||
      (fixed && header.length != fixed)) {
    fault = Fault::bad_length;
    return std::nullopt;
  }
  return header;
}

void encode(const RndvEntry& m, std::byte* out) {
  std::memset(out, 0, kRndvEntrySize);
  out[0] = static_cast<std::byte>(m.kind);
  put32(out + 4, m.id);
  if (m.kind == RndvKind::request) {
    put64(out + 8, m.size);
    put64(out + 16, m.tag);
  } else if (m.kind == RndvKind::ready) {
    put64(out + 8, m.target.address);
    put32(out + 16, m.target.rkey);
    put32(out + 20, m.target.length);
  }
}

void encode(const ConnectRequest& m, std::byte* out) {
  put32(out, m.connection);
  put_ring(out + 4, m.ring);
  put64(out + 24, m.rndv.address);
  put32(out + 32, m.rndv.rkey);
}

void encode(const ConnectReply& m, std::byte* out) {
  put32(out, m.connection);
  put32(out + 4, m.peer_connection);
  put_ring(out + 8, m.ring);
  put64(out + 28, m.rndv.address);
  put32(out + 36, m.rndv.rkey);
}

std::array<std::byte, kHelloSize> encode(const Hello& m) {
  std::array<std::byte, kHelloSize> out{};
  put_preamble(out.data());
  put32(out.data() + 8, m.qp_num);
  put32(out.data() + 12, m.psn);
  std::memcpy(out.data() + 16, m.gid.raw, 16);
  put16(out.data() + 32, m.lid);
  out[34] = static_cast<std::byte>(m.mtu);
  put_ring(out.data() + 36, m.control);
  return out;
}

std::optional<RndvEntry> decode_rndv_entry(std::span<const std::byte, kRndvEntrySize> in, Fault& fault) {
  RndvEntry m;
  m.kind = static_cast<RndvKind>(in[0]);
  m.id = get32(in.data() + 4);
  if (m.kind < RndvKind::request || m.kind > RndvKind::written) {
    fault = Fault::bad_kind;
    return std::nullopt;
  }
  if (m.id >= kMaxRendezvous) {
    fault = Fault::bad_rendezvous;
    return std::nullopt;
  }
  if (m.kind == RndvKind::request) {
    m.size = get64(in.data() + 8);
    m.tag = get64(in.data() + 16);
    if (m.size == 0) {
      fault = Fault::bad_length;
      return std::nullopt;
    }
  } else if (m.kind == RndvKind::ready) {
    m.target = {get64(in.data() + 8), get32(in.data() + 16), get32(in.data() + 20)};
  }
  return m;
}

std::optional<ConnectRequest> decode_connect_request(std::span<const std::byte> in, Fault& fault) {
  if (!long_enough(in, kConnectRequestSize, fault)) return std::nullopt;
  ConnectRequest m{get32(in.data()), {}, {get64(in.data() + 24), get32(in.data() + 32)}};
  if (m.connection >= kMaxConnections) {
    fault = Fault::bad_connection;
    return std::nullopt;
  }
  if (!get_ring(in.data() + 4, m.ring, fault)) return std::nullopt;
  return m;
}

std::optional<ConnectReply> decode_connect_reply(std::span<const std::byte> in, Fault& fault) {
  if (!long_enough(in, kConnectReplySize, fault)) return std::nullopt;
  ConnectReply m{get32(in.data()), get32(in.data() + 4), {}, {get64(in.data() + 28), get32(in.data() + 36)}};
  if (m.connection >= kMaxConnections || m.peer_connection >= kMaxConnections) {
    fault = Fault::bad_connection;
    return std::nullopt;
  }
  if (!get_ring(in.data() + 8, m.ring, fault)) return std::nullopt;
  return m;
}


std::array<std::byte, kOfferSize> encode(const Offer& m) {
  std::array<std::byte, kOfferSize> out{};
  put_preamble(out.data());
  out[6] = static_cast<std::byte>(m.backends);
  std::memcpy(out.data() + 8, m.host.data(), 16);
  put32(out.data() + 24, m.uid);
  put32(out.data() + 28, m.pid);
  put64(out.data() + 32, m.net_ns);
  put64(out.data() + 40, m.pid_ns);
  return out;
}

std::optional<Offer> decode_offer(std::span<const std::byte> in, Fault& fault) {
  if (!check_preamble(in, kOfferSize, fault)) return std::nullopt;
  Offer m;
  m.backends = static_cast<uint8_t>(in[6]);
  if (m.backends == 0 || (m.backends & ~kKnownBackends)) {
    fault = Fault::bad_kind;
    return std::nullopt;
  }
  std::memcpy(m.host.data(), in.data() + 8, 16);
  m.uid = get32(in.data() + 24);
  m.pid = get32(in.data() + 28);
  m.net_ns = get64(in.data() + 32);
  m.pid_ns = get64(in.data() + 40);
  return m;
}

std::array<std::byte, kChoiceSize> encode(const Choice& m) {
  std::array<std::byte, kChoiceSize> out{};
  put_preamble(out.data());
  out[6] = static_cast<std::byte>(m.backend);
  put32(out.data() + 8, m.pid);
  put64(out.data() + 16, m.nonce);
  std::memcpy(out.data() + 24, m.token.data(), 16);
  return out;
}

std::optional<Choice> decode_choice(std::span<const std::byte> in, Fault& fault) {
  if (!check_preamble(in, kChoiceSize, fault)) return std::nullopt;
  Choice m;
  m.backend = static_cast<uint8_t>(in[6]);
  if (m.backend != kNoBackend && !((1u << m.backend) & kKnownBackends)) {
    fault = Fault::bad_kind;
    return std::nullopt;
  }
  m.pid = get32(in.data() + 8);
  m.nonce = get64(in.data() + 16);
  std::memcpy(m.token.data(), in.data() + 24, 16);
  return m;
}

std::array<std::byte, kShmHelloSize> encode(const ShmHello& m) {
  std::array<std::byte, kShmHelloSize> out{};
  put_preamble(out.data());
  std::memcpy(out.data() + 8, m.token.data(), 16);
  put32(out.data() + 24, m.pid);
  put64(out.data() + 32, m.arena_base);
  put64(out.data() + 40, m.arena_size);
  put64(out.data() + 48, m.probe_address);
  put64(out.data() + 56, m.probe_value);
  put_ring(out.data() + 64, m.control);
  return out;
}

std::optional<ShmHello> decode_shm_hello(std::span<const std::byte> in, Fault& fault) {
  if (!check_preamble(in, kShmHelloSize, fault)) return std::nullopt;
  ShmHello m;
  std::memcpy(m.token.data(), in.data() + 8, 16);
  m.pid = get32(in.data() + 24);
  m.arena_base = get64(in.data() + 32);
  m.arena_size = get64(in.data() + 40);
  m.probe_address = get64(in.data() + 48);
  m.probe_value = get64(in.data() + 56);
  // The arena must hold at least its doorbell, and fit the address space.
  if (m.arena_size < (64u << 10) || m.arena_size > (uint64_t(1) << 40) || m.arena_base + m.arena_size < m.arena_base) {
    fault = Fault::bad_length;
    return std::nullopt;
  }
  if (!get_ring(in.data() + 64, m.control, fault)) return std::nullopt;
  return m;
}

std::array<std::byte, kTcpHelloSize> encode(const TcpHello& m) {
  std::array<std::byte, kTcpHelloSize> out{};
  put_preamble(out.data());
  put_ring(out.data() + 8, m.control);
  return out;
}

std::optional<TcpHello> decode_tcp_hello(std::span<const std::byte> in, Fault& fault) {
  if (!check_preamble(in, kTcpHelloSize, fault)) return std::nullopt;
  TcpHello m;
  if (!get_ring(in.data() + 8, m.control, fault)) return std::nullopt;
  return m;
}

std::optional<Hello> decode_hello(std::span<const std::byte> in, Fault& fault) {
  if (!check_preamble(in, kHelloSize, fault)) return std::nullopt;
  Hello m;
  m.qp_num = get32(in.data() + 8) & 0xffffff;
  m.psn = get32(in.data() + 12) & 0xffffff;
  std::memcpy(m.gid.raw, in.data() + 16, 16);
  m.lid = get16(in.data() + 32);
  m.mtu = static_cast<uint8_t>(in[34]);
  if (m.mtu < IBV_MTU_256 || m.mtu > IBV_MTU_4096) {
    fault = Fault::bad_length;
    return std::nullopt;
  }
  if (!get_ring(in.data() + 36, m.control, fault)) return std::nullopt;
  return m;
}

}  // namespace rxio::transport::wire

namespace rxio::transport {

std::array<std::byte, RemoteRegion::kEncodedSize> RemoteRegion::encode() const {
  std::array<std::byte, kEncodedSize> out{};
  bytes::put64(out.data(), address);
  bytes::put64(out.data() + 8, length);
  bytes::put32(out.data() + 16, rkey);
  return out;
}

std::optional<RemoteRegion> RemoteRegion::decode(std::span<const std::byte> in) {
  if (in.size() != kEncodedSize) return std::nullopt;
  RemoteRegion r{bytes::get64(in.data()), bytes::get64(in.data() + 8), bytes::get32(in.data() + 16)};
  if (r.length == 0 || r.address + r.length < r.address) return std::nullopt;
  return r;
}

}  // namespace rxio::transport
