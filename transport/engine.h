// The transport engine: ordered, reliable connections between processes, over RDMA
// verbs, shared memory (same host) or TCP, behind one API (docs/transport.md).
//
// Threading model: an Engine and everything made from it belong to one thread at a
// time (as a NCCL communicator does); nothing inside takes a lock. Progress happens
// only inside calls on the engine (progress(), wait(), the blocking helpers): there is
// no background thread, and never a thread per connection. Busy-polling lasts
// RXIO_POLL_US, then a waiting call sleeps on the completion channel, the shm
// eventfds, the tcp sockets and each link's liveness fd, so an idle process costs
// nothing.
//
// Links, not queue pairs per connection: every connection between the same two
// engines shares one link. Each connection has a receive ring on each side; the
// sender writes a slot with an immediate and spends a credit, the receiver returns
// credits as the application consumes slots. Messages over the eager limit go by
// rendezvous: the sender writes them straight into the receiver's posted buffer once
// the receiver says where.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "transport/wire.h"

namespace rxio::transport {

class Connection;
class Link;

// Outcome of an operation. Data paths return these instead of throwing.
enum class Status : uint8_t {
  ok,
  pending,    // started; completes in progress()/wait()
  truncated,  // the message was larger than the receive buffer (the buffer holds its start)
  closed,     // the peer closed the connection: no more messages will come
  failed,     // the link or connection failed; Connection::error() says why
  timed_out,  // a blocking call's time ran out with nothing lost
};
const char* to_string(Status status);

inline constexpr uint64_t kAnyTag = ~uint64_t{0};

// One send, receive, read or write in flight. Owned by the caller and left in place
// until done(): the engine links it into its queues instead of allocating. A wait()
// that times out leaves it in flight: keep it alive until it completes or its
// connection fails.
class Request {
 public:
  bool done() const noexcept { return status_ != Status::pending; }
  Status status() const noexcept { return status_; }
  std::size_t bytes() const noexcept { return bytes_; }  // received or sent
  uint64_t tag() const noexcept { return tag_; }           // the matched message's tag

 private:
  friend class Connection;
  friend class Link;
  enum class Op : uint8_t { send, recv, read, write };
  Status status_ = Status::ok;
  Op op_ = Op::send;
  uint64_t tag_ = 0;
  std::size_t bytes_ = 0;
  std::byte* buffer_ = nullptr;
  std::size_t capacity_ = 0;
  Connection* connection_ = nullptr;
  Request* next_ = nullptr;
  uint32_t rndv_id_ = 0;
  bool answered_ = false;         // a rendezvous send told where to write
  uint64_t remote_address_ = 0;   // where a write or read goes in the peer
  uint32_t rkey_ = 0;             // its key; for a rendezvous receive, our buffer's key
};

// A region of this process's memory that a peer may read or write directly. Send the
// encoded form to the peer in a message.
struct RemoteRegion {
  uint64_t address = 0;
  uint64_t length = 0;
  uint32_t rkey = 0;

  static constexpr std::size_t kEncodedSize = 20;
  std::array<std::byte, kEncodedSize> encode() const;
  static std::optional<RemoteRegion> decode(std::span<const std::byte> bytes);
};

enum class Bootstrap { tcp, rdma_cm };

// Which backends may carry links. automatic: shm to a peer on the same host, else verbs
// where both ends have an RDMA device, else tcp; both ends must allow the one chosen.
// The rdma_cm bootstrap is verbs only.
enum class BackendChoice : uint8_t { from_environment, automatic, verbs, shm, tcp };

struct Options {
  Bootstrap bootstrap = Bootstrap::tcp;
  BackendChoice backend = BackendChoice::from_environment;  // RXIO_BACKEND
  std::string device;         // tcp bootstrap: RDMA device (empty: the first one)
  std::string local_address;  // rdma_cm: this host's IP on the RDMA netdev (required)
  // The rest default to their RXIO_* settings (see base/config.cc).
  uint32_t ring_slots = 0;
  uint32_t slot_size = 0;
  uint32_t eager_limit = 0;
  std::chrono::microseconds poll_time{-1};
  std::chrono::milliseconds connect_timeout{-1};
  uint8_t qp_timeout = 0;
  uint8_t qp_retry_count = 0xff;
  uint64_t shm_arena = 0;  // RXIO_SHM_ARENA
  std::string tcp_io;      // RXIO_TCP_IO: "uring" or "plain"
  uint64_t fault_link_after = ~0ull;  // RXIO_FAULT_LINK_AFTER (0: never)
  uint64_t fault_links = ~0ull;       // RXIO_FAULT_LINKS (0: every link)
};

struct EngineStats {
  std::size_t links = 0;
  std::size_t shm_links = 0;
  std::size_t tcp_links = 0;
  std::size_t failed_links = 0;  // links that failed (their connections report why)
  std::size_t connections = 0;
  uint64_t registrations = 0;  // registration cache misses
  uint64_t faults[static_cast<int>(wire::Fault::count_)] = {};
};

class Engine {
 public:
  explicit Engine(Options options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Server side: listens on `port` (0: any; see listen_port()) at `address`.
  void listen(const std::string& address, uint16_t port);
  uint16_t listen_port() const;
  // The next connection a peer opened; throws rxio::Error on timeout.
  Connection& accept(std::chrono::milliseconds timeout);
  // Opens a connection to an engine listening at host:port, over the existing link to
  // it when there is one. Throws rxio::Error naming the peer on failure.
  Connection& connect(const std::string& host, uint16_t port);

  // Polls completions and handles what arrived; returns how many events were handled.
  int progress() noexcept;
  // Progresses until `request` is done or `timeout` passes (Status::timed_out).
  Status wait(Request& request, std::chrono::milliseconds timeout) noexcept;

  // For callers that sleep in their own poll or epoll (the socket shim) rather than in
  // wait(): an epoll fd that turns readable when the engine has work, once arm()ed.
  int wait_fd();
  // Asks every source to signal wait_fd(); false when work came in meanwhile, so that
  // the caller progresses instead of sleeping.
  bool arm() noexcept;
  // After wait_fd() turned readable: acknowledges what signalled, notices peers that
  // went away (and lets go of their links once every connection on them is released),
  // takes in links that peers opened, and progresses.
  int on_wake() noexcept;
  // The next connection a peer opened, without waiting; nullptr when there is none.
  Connection* try_accept() noexcept;
  // Completions and arrivals handled so far: a change means some connection moved.
  uint64_t handled() const noexcept;
  // Links that failed so far (never goes down, unlike EngineStats::failed_links, which
  // counts those not yet let go of): a change means some connection failed.
  uint64_t link_failures() const noexcept;

  // Registers memory for one-sided access by peers.
  RemoteRegion expose(void* address, std::size_t length);
  // Drops cached registrations of a range; call before freeing memory rxio has used.
  void forget(const void* address, std::size_t length);

  EngineStats stats() const;
  std::size_t qp_count() const;  // one per verbs link that has not failed
  const std::string& device_name() const;  // the verbs device; empty without one

 private:
  friend class Connection;
  friend class Link;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Connection {
 public:
  // Messages, matched by tag in order (kAnyTag receives anything). The send buffer may
  // be reused when the request is done; eager sends are done at once.
  Status send(std::span<const std::byte> data, uint64_t tag, Request& request) noexcept;
  Status recv(std::span<std::byte> buffer, uint64_t tag, Request& request) noexcept;

  // The byte stream, beside the messages: non-blocking, like send(2)/recv(2) with
  // MSG_DONTWAIT. write returns the bytes accepted (0: no credit now); read the bytes
  // copied (0: nothing yet; check stream_closed() for the end).
  std::size_t stream_write(std::span<const std::byte> data) noexcept;
  std::size_t stream_read(std::span<std::byte> buffer) noexcept;
  bool stream_closed() const noexcept;
  // Readiness, for poll and epoll over connections: bytes to read (or the end), and
  // credit to write now.
  bool stream_readable() const noexcept;
  bool stream_writable() const noexcept;
  // Copies without consuming (MSG_PEEK); bytes ready to read (FIONREAD).
  std::size_t stream_peek(std::span<std::byte> buffer) const noexcept;
  std::size_t stream_available() const noexcept;
  // The most stream bytes written that the peer may not have read yet: its ring's
  // slots times the bytes one slot carries (credits come back only for slots it read).
  // A writer that keeps its last stream_window() bytes can give the peer whatever it
  // did not read, whatever becomes of the link.
  std::size_t stream_window() const noexcept;
  // Counts stream arrivals and the peer's close: a change is an edge for epoll.
  uint64_t stream_events() const noexcept { return stream_events_; }
  // What carries the connection.
  const char* backend_name() const noexcept;

  // One-sided: moves bytes between local memory and a peer's exposed region.
  Status write(std::span<const std::byte> local, const RemoteRegion& remote, uint64_t offset,
               Request& request) noexcept;
  Status read(std::span<std::byte> local, const RemoteRegion& remote, uint64_t offset,
              Request& request) noexcept;

  // Tells the peer no more will be sent; its receives end with Status::closed once
  // everything sent before has been delivered.
  void close() noexcept;
  // The application is done with the connection: it closes if it had not, and the
  // engine frees it (its rings and its id, for later connections) once the peer has
  // closed and released it too. It must not be used afterwards, and must have no
  // request in flight (a one-sided read or write completes on the connection).
  void release() noexcept;

  bool failed() const noexcept { return error_ != 0; }
  // errno-style reason when failed(), and its text.
  int error() const noexcept { return error_; }
  const std::string& error_text() const noexcept { return error_text_; }
  uint32_t id() const noexcept { return id_; }

 private:
  friend class Engine;
  friend class Link;
  struct Ring;
  Connection(Link& link, uint32_t id);
  Status one_sided(bool write, std::byte* local, std::size_t size, const RemoteRegion& remote, uint64_t offset,
                   Request& request) noexcept;

 public:
  ~Connection();

 private:

  Link* link_;
  uint32_t id_;
  uint32_t peer_id_ = 0;
  bool established_ = false;
  bool peer_closed_ = false;
  bool closed_ = false;
  bool released_ = false;       // by the application
  bool release_queued_ = false;  // both sides closed: our release is due; we write nothing more
  bool release_sent_ = false;
  bool peer_released_ = false;   // the peer writes nothing more
  uint64_t stream_events_ = 0;
  int error_ = 0;
  std::string error_text_;
  std::unique_ptr<Ring> ring_;
};

}  // namespace rxio::transport
