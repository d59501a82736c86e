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
  slot = 1,    // a slot was written
  credit = 2,  // value: credits returned
  rndv = 3,    // value: entries appended to the receiver's rendezvous queue (1 to 255)
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
  // 3 and 4 are unused: rendezvous traffic has its own queue (RndvEntry), which needs
  // no credit and batches.
  connect = 5,       // control connection only (payload: ConnectRequest)
  accept = 6,        // control connection only (payload: ConnectReply)
  close = 7,         // the sender will send no more (no payload)
  release = 8,       // control connection only (payload: the receiver's id of a connection
                     // both sides closed): the sender will write nothing more for it
};
inline constexpr std::size_t kReleaseSize = 4;
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

// Rendezvous traffic of one direction of a connection: entries appended to a queue of
// kRndvQueueEntries in the receiver's memory, several per RDMA write, announced by
// ImmType::rndv with their number. The writer never overruns the reader: what a side
// may have written and the other not yet read is bounded by the rendezvous ids (two
// entries per id of its own sends, one per id of the peer's), fewer than the entries.
inline constexpr uint32_t kRndvQueueEntries = 1024;
inline constexpr std::size_t kRndvEntrySize = 32;
inline constexpr uint32_t kMaxRndvBatch = 255;  // the immediate's 8-bit count

enum class RndvKind : uint8_t {
  request = 1,  // sender to receiver: a large message waits for a matching receive
  ready = 2,    // receiver to sender: write the message here (target)
  failed = 3,   // receiver to sender: it gave up on the message
  written = 4,  // sender to receiver: the data is in place
};

// Where a receiver wants a rendezvous written.
struct RndvTarget {
  uint64_t address = 0;
  uint32_t rkey = 0;
  uint32_t length = 0;
};

// Layout: kind (1), reserved (3), id (4), then request: size (8), tag (8); ready:
// address (8), rkey (4), length (4); reserved to 32 bytes.
struct RndvEntry {
  RndvKind kind{};
  uint32_t id = 0;     // below kMaxRendezvous: the sender's id for the message
  uint64_t size = 0;   // request
  uint64_t tag = 0;    // request
  RndvTarget target;   // ready
};

// Where a connection's rendezvous queue lives, for the peer's writes.
struct RndvQueueInfo {
  uint64_t address = 0;
  uint32_t rkey = 0;
};

struct ConnectRequest {
  uint32_t connection;  // the requester's id
  RingInfo ring;        // the requester's receive ring
  RndvQueueInfo rndv;   // the requester's rendezvous queue
};
inline constexpr std::size_t kConnectRequestSize = 4 + kRingInfoSize + 12;

struct ConnectReply {
  uint32_t connection;       // the acceptor's id
  uint32_t peer_connection;  // the requester's id, echoed
  RingInfo ring;
  RndvQueueInfo rndv;
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

// The TCP bootstrap's first message, connector to acceptor: the backends the connector
// may use and who it is, so the acceptor can choose (Choice).
struct Offer {
  uint8_t backends = 0;               // 1 << Backend for each one allowed
  std::array<uint8_t, 16> host{};     // the kernel's boot id: equal on the same host
  uint32_t uid = 0;
  uint32_t pid = 0;
  uint64_t net_ns = 0;  // namespaces (inode numbers): shm needs the same network
  uint64_t pid_ns = 0;  // namespace (abstract unix sockets) and pid namespace (pids)
};
inline constexpr std::size_t kOfferSize = 48;
inline constexpr uint8_t kNoBackend = 0xff;

// The acceptor's answer. For shm: where its unix socket is (an abstract name made of
// its pid and a nonce) and the token that proves the connector heard this answer.
struct Choice {
  uint8_t backend = kNoBackend;  // a Backend, or kNoBackend: none both ends can use
  uint32_t pid = 0;
  uint64_t nonce = 0;
  std::array<uint8_t, 16> token{};
};
inline constexpr std::size_t kChoiceSize = 40;

// Both ways over the shm unix socket, with the arena's memfd and the eventfd attached.
struct ShmHello {
  std::array<uint8_t, 16> token{};
  uint32_t pid = 0;
  uint64_t arena_base = 0;
  uint64_t arena_size = 0;
  uint64_t probe_address = 0;  // a private word, read across processes to prove it works
  uint64_t probe_value = 0;
  RingInfo control;
};
inline constexpr std::size_t kShmHelloSize = 96;

// Both ways on the bootstrap connection when it becomes the tcp backend's link.
struct TcpHello {
  RingInfo control;
};
inline constexpr std::size_t kTcpHelloSize = 32;

std::array<std::byte, kOfferSize> encode(const Offer& m);
std::array<std::byte, kTcpHelloSize> encode(const TcpHello& m);
std::array<std::byte, kChoiceSize> encode(const Choice& m);
std::array<std::byte, kShmHelloSize> encode(const ShmHello& m);
void encode(const RndvEntry& m, std::byte* out);
void encode(const ConnectRequest& m, std::byte* out);
void encode(const ConnectReply& m, std::byte* out);
std::array<std::byte, kHelloSize> encode(const Hello& m);

// Each decoder refuses short input, and rings no sane peer would offer (zero or
// oversized slots, more slots than a connection may have).
std::optional<Offer> decode_offer(std::span<const std::byte> in, Fault& fault);
std::optional<Choice> decode_choice(std::span<const std::byte> in, Fault& fault);
std::optional<ShmHello> decode_shm_hello(std::span<const std::byte> in, Fault& fault);
std::optional<TcpHello> decode_tcp_hello(std::span<const std::byte> in, Fault& fault);
// Refuses unknown kinds, ids past kMaxRendezvous and empty requests.
std::optional<RndvEntry> decode_rndv_entry(std::span<const std::byte, kRndvEntrySize> in, Fault& fault);
std::optional<ConnectRequest> decode_connect_request(std::span<const std::byte> in, Fault& fault);
std::optional<ConnectReply> decode_connect_reply(std::span<const std::byte> in, Fault& fault);
std::optional<Hello> decode_hello(std::span<const std::byte> in, Fault& fault);

inline constexpr uint32_t kMaxRingSlots = 4096;
inline constexpr uint32_t kMaxSlotSize = 1u << 20;

}  // namespace rxio::transport::wire
