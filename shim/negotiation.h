// The messages two shims exchange to move a TCP connection onto an rxio link, on a
// unix seqpacket socket beside the TCP connection (never inside it: a plain-TCP peer
// must not see a byte of this). docs/shim.md has the sequence.
//
//   client (stops writing to TCP)             server (listening)
//   Request + its TCP socket (SCM_RIGHTS) ->
//                                          <- Answer: accept (engine port, cookie) or refuse
//   engine connection, cookie as its first 8 stream bytes
//   (waits until the server's kernel acknowledged every TCP byte it sent)
//   Confirm (or Abort: stay on TCP)       ->
//                                             (stops writing to TCP, waits likewise)
//                                          <- Switched (or Abort: stay on TCP)
//   Each side then takes what its kernel still holds of the TCP stream, and reads the
//   engine connection after it.
//
//   A client whose engine connection fails before the server's word comes asks where
//   the switch stands, on a new negotiation connection:
//   Query (a Request with the cookie)     ->
//                                          <- Switched (it had switched: as above) or
//                                             Abort (it had not, and now never will)
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace rxio::shim {

// One end of a TCP connection, as either family.
struct Endpoint {
  uint8_t family = 0;  // AF_INET or AF_INET6
  std::array<uint8_t, 16> address{};
  uint16_t port = 0;  // host order

  static std::optional<Endpoint> from(const sockaddr* address) noexcept;
  bool operator==(const Endpoint&) const = default;
  std::string to_string() const;
};

// The connection as the client sees it: (client, server).
struct Tuple {
  Endpoint client, server;
  bool operator==(const Tuple&) const = default;
};
struct TupleHash {
  std::size_t operator()(const Tuple& t) const noexcept;
};

namespace negotiation {

inline constexpr uint32_t kMagic = 0x474e5852;  // "RXNG"
inline constexpr uint8_t kVersion = 4;

enum class Kind : uint8_t {
  request = 1,
  accept = 2,
  refuse = 3,
  confirm = 4,
  abort = 5,
  switched = 6,
  resume = 7,
  hand_over = 8,
  redirect = 9,
  query = 10,
};

// Why a server refused; the client counts it as a fallback. not_yet: no process of a
// listener shared after fork has accepted the connection yet; the client asks again.
enum class Refusal : uint8_t { policy = 1, not_owner = 2, closing = 3, unavailable = 4, bad_message = 5, not_yet = 6 };

struct Request {
  Tuple tuple;
  uint32_t pid = 0;
  // Not 0: a Query, about the move the server accepted with this cookie.
  uint64_t query = 0;
};
struct Answer {
  bool accepted = false;
  Refusal refusal = Refusal::policy;
  uint16_t engine_port = 0;
  uint64_t cookie = 0;
  // Not accepted, but another process of a listener shared after fork holds the
  // connection: ask it, at its own endpoint (a remote client: at its own rdma_cm port
  // on the server's address).
  uint32_t redirect = 0;
  uint16_t redirect_port = 0;
};

inline constexpr std::size_t kRequestSize = 48;
inline constexpr std::size_t kQuerySize = 56;  // rdma_cm's limit for a connect's private data
inline constexpr std::size_t kAnswerSize = 24;
// The client's word on an accepted request (confirm, abort) and the server's on the
// switch (switched, abort). A Switched says how many bytes the server had sent on the
// TCP connection, every one acknowledged, when it switched (kSentUnknown where its
// kernel does not say): the client tells them from a Resume that came right after
// (docs/shim.md, "The switch"). The others carry 0.
inline constexpr std::size_t kNoticeSize = 16;
inline constexpr uint64_t kSentUnknown = ~uint64_t{0};
struct Notice {
  Kind kind = Kind::confirm;
  uint64_t sent = 0;
};

// Back to TCP (docs/shim.md, "Back to TCP"): the first bytes either side writes into the
// TCP connection after a move. The bytes that follow it are the writer's stream from
// byte `from` of what it wrote over rxio: `kept` bytes it kept of that (some of which
// the reader may have read already), then whatever it writes next.
//
// A hand-over (docs/shim.md, "fork and exec") is a Resume its writer sends while its
// link works, because another process (a forked child, a new program image) goes on
// with the socket: `read` says how much of the reader's stream the writer's program
// read, and the reader answers with its bytes from there.
struct Resume {
  uint64_t from = 0;
  uint64_t kept = 0;
  bool hand_over = false;
  uint64_t read = 0;  // hand-overs only
};
inline constexpr std::size_t kResumeSize = 32;

// A Request, or a Query (kQuerySize bytes) when it has one.
struct RequestBytes {
  std::array<std::byte, kQuerySize> bytes{};
  std::size_t size = 0;
  std::span<const std::byte> span() const noexcept { return std::span(bytes).first(size); }
};
RequestBytes encode(const Request& request);
std::array<std::byte, kAnswerSize> encode(const Answer& answer);
std::array<std::byte, kNoticeSize> encode(const Notice& notice);
std::array<std::byte, kResumeSize> encode(const Resume& resume);

// nullopt for anything malformed, truncated, of another version or of the wrong kind.
std::optional<Request> decode_request(std::span<const std::byte> bytes) noexcept;
// How many of `bytes` (a message padded with zeros) the request is: by its kind.
std::size_t request_size(std::span<const std::byte> bytes) noexcept;
std::optional<Answer> decode_answer(std::span<const std::byte> bytes) noexcept;
std::optional<Notice> decode_notice(std::span<const std::byte> bytes) noexcept;
std::optional<Resume> decode_resume(std::span<const std::byte> bytes) noexcept;

// The abstract unix name a listener on `port` answers at, per network namespace; with
// `pid`, the name that one process of a listener shared after fork answers at.
std::string endpoint_name(uint16_t port, uint32_t pid = 0);

}  // namespace negotiation
}  // namespace rxio::shim
