// Everything rxio puts on the wire between two processes, with defensive decoders: a
// peer's bytes are never trusted. Multi-byte fields are little-endian.
#pragma once

#include <infiniband/verbs.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace rxio::transport::wire {

inline constexpr uint32_t kMagic = 0x31495852;  // "RXI1"
inline constexpr uint16_t kVersion = 1;

// Why a peer's bytes were refused; counted per link and shown to the user.
enum class Fault : uint8_t {
  truncated,
  bad_magic,
  bad_version,
  bad_kind,
  bad_length,
  bad_connection,
  ring_overflow,
  credit_overflow,
  bad_rendezvous,
  count_,  // number of faults, not a fault
};
std::string_view to_string(Fault fault);

// Immediate data of RDMA WRITE_WITH_IMM: [type:4][connection:20][value:8].
inline constexpr uint32_t kMaxConnections = 1u << 20;
// Rendezvous ids fit the 8-bit value: at most this many large sends in flight per
// connection.
inline constexpr uint32_t kMaxRendezvous = 256;
enum class ImmType : uint8_t {
  slot = 1,          // a slot was written
  credit = 2,        // value: credits returned
  rndv_ready = 3,    // receiver to sender: mailbox entry `value` says where to write
  rndv_failed = 4,   // receiver to sender: it gave up on rendezvous `value`
  rndv_written = 5,  // sender to receiver: the data of rendezvous `value` is in place
};
struct Imm {
  ImmType type;
  uint32_t connection;  // the receiver's id for the connection
  uint8_t value;
};
uint32_t encode(const Imm& imm);
std::optional<Imm> decode_imm(uint32_t raw, Fault& fault);

// At the start of every ring slot.
inline constexpr std::size_t kSlotHeaderSize = 16;
enum class SlotKind : uint8_t {
  eager = 1,         // a whole message
  stream = 2,        // bytes of the byte stream
  rndv_request = 3,  // a large message waits for a matching receive (payload: RndvRequest)
  // 4 is unused: rendezvous answers travel as immediate data, so they need no credit
  // and cannot wait behind the application.
  connect = 5,       // control connection only (payload: ConnectRequest)
  accept = 6,        // control connection only (payload: ConnectReply)
  close = 7,         // the sender will send no more (no payload)
};
struct SlotHeader {
  SlotKind kind;
  uint32_t length;  // payload bytes after the header
  uint64_t tag;
};
void encode(const SlotHeader& header, std::byte* out);
// Refuses unknown kinds and lengths over `max_payload`, or wrong for the kind.
std::optional<SlotHeader> decode_slot_header(std::span<const std::byte> slot, uint32_t max_payload,
                                             Fault& fault);

// Where a receiver's ring lives, for the sender's RDMA writes.
struct RingInfo {
  uint64_t address = 0;
  uint32_t rkey = 0;
  uint32_t slots = 0;
  uint32_t slot_size = 0;
};
inline constexpr std::size_t kRingInfoSize = 20;

struct RndvRequest {
  uint64_t size;
  uint32_t id;  // below kMaxRendezvous
};
inline constexpr std::size_t kRndvRequestSize = 16;

// Where a receiver wants a rendezvous written: RDMA-written by the receiver into the
// sender's mailbox entry for the id, announced by ImmType::rndv_ready.
struct RndvTarget {
  uint64_t address;
  uint32_t rkey;
  uint32_t length;
};
inline constexpr std::size_t kRndvTargetSize = 16;

// A connection's mailbox: kMaxRendezvous entries of kRndvTargetSize bytes.
struct MailboxInfo {
  uint64_t address = 0;
  uint32_t rkey = 0;
};

struct ConnectRequest {
  uint32_t connection;  // the requester's id
  RingInfo ring;        // the requester's receive ring
  MailboxInfo mailbox;
};
inline constexpr std::size_t kConnectRequestSize = 4 + kRingInfoSize + 12;

struct ConnectReply {
  uint32_t connection;       // the acceptor's id
  uint32_t peer_connection;  // the requester's id, echoed
  RingInfo ring;
  MailboxInfo mailbox;
};
inline constexpr std::size_t kConnectReplySize = 8 + kRingInfoSize + 12;

// The first message of a link, both ways: over the out-of-band channel or as rdma_cm
// private data (which allows 56 bytes on connect: this is exactly that).
struct Hello {
  uint32_t qp_num = 0;
  uint32_t psn = 0;
  ibv_gid gid{};
  uint16_t lid = 0;
  uint8_t mtu = 0;       // enum ibv_mtu
  RingInfo control;      // the link's control connection ring
};
inline constexpr std::size_t kHelloSize = 56;

void encode(const RndvRequest& m, std::byte* out);
void encode(const RndvTarget& m, std::byte* out);
void encode(const ConnectRequest& m, std::byte* out);
void encode(const ConnectReply& m, std::byte* out);
std::array<std::byte, kHelloSize> encode(const Hello& m);

// Each decoder refuses short input, and rings no sane peer would offer (zero or
// oversized slots, more slots than a connection may have).
std::optional<RndvRequest> decode_rndv_request(std::span<const std::byte> in, Fault& fault);
RndvTarget decode_rndv_target(std::span<const std::byte, kRndvTargetSize> in);
std::optional<ConnectRequest> decode_connect_request(std::span<const std::byte> in, Fault& fault);
std::optional<ConnectReply> decode_connect_reply(std::span<const std::byte> in, Fault& fault);
std::optional<Hello> decode_hello(std::span<const std::byte> in, Fault& fault);

inline constexpr uint32_t kMaxRingSlots = 4096;
inline constexpr uint32_t kMaxSlotSize = 1u << 20;

}  // namespace rxio::transport::wire
