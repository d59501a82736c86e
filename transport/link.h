// Internal: the engine's state, links and connection rings. Not installed.
#pragma once

#include <poll.h>

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/fd.h"
#include "transport/engine.h"
#include "transport/oob.h"
#include "transport/port.h"
#include "transport/reg_cache.h"
#include "transport/ring.h"
#include "transport/shm_connect.h"
#include "transport/tcp_port.h"
#include "transport/verbs_port.h"
#include "verbs/cm.h"
#include "verbs/completion.h"
#include "verbs/device.h"
#include "verbs/gid.h"
#include "verbs/memory.h"

namespace rxio::transport {

// The low bits of a work request id say what it is; the rest is a pointer.
inline constexpr uint64_t kWrRequest = 0;  // a Request (READ or WRITE)
inline constexpr uint64_t kWrSlot = 1;     // a slot write (Link)
inline constexpr uint64_t kWrLink = 2;     // a link's own write: credits, rendezvous entries
inline constexpr uint64_t kWrReceive = 3;  // a posted receive (Link)
inline constexpr uint64_t kWrKindMask = 3;

// A queue of fixed capacity, allocated once at set-up.
template <typename T>
class FixedQueue {
 public:
  explicit FixedQueue(std::size_t capacity = 0) : items_(capacity) {}
  bool empty() const noexcept { return count_ == 0; }
  std::size_t size() const noexcept { return count_; }
  bool full() const noexcept { return count_ == items_.size(); }
  T& at(std::size_t i) noexcept { return items_[(head_ + i) % items_.size()]; }
  T& front() noexcept { return at(0); }
  void push(const T& item) noexcept {
    items_[(head_ + count_) % items_.size()] = item;
    ++count_;
  }
  void pop() noexcept {
    head_ = (head_ + 1) % items_.size();
    --count_;
  }
  void erase(std::size_t i) noexcept {
    for (; i + 1 < count_; ++i) at(i) = at(i + 1);
    --count_;
  }

 private:
  std::vector<T> items_;
  std::size_t head_ = 0;
  std::size_t count_ = 0;
};

// A message that arrived and waits for the application: a slot, with its header as it
// was then (the peer can rewrite its ring at any time; only this copy is trusted), or a
// rendezvous request.
struct Arrival {
  uint64_t seq = 0;
  wire::SlotHeader header{};
  std::optional<wire::RndvEntry> rndv;  // set for a rendezvous request (no slot)
  uint64_t tag() const noexcept { return rndv ? rndv->tag : header.tag; }
};

// An intrusive FIFO of caller-owned requests.
struct RequestList {
  Request* head = nullptr;
  Request* tail = nullptr;
  bool empty() const noexcept { return head == nullptr; }
};

struct Connection::Ring {
  Ring(Port& port, uint32_t slots, uint32_t slot_size);

  uint32_t slot_size;
  std::unique_ptr<Region> memory;  // slots * slot_size, the peer writes here
  RecvRing recv;
  SendRing send;
  wire::RingInfo peer{};
  RequestList posted;                 // receives waiting for a message
  RequestList sends;                  // sends waiting for credits, in order
  FixedQueue<Arrival> unexpected;     // arrived messages nobody asked for yet
  FixedQueue<Arrival> stream;         // arrived stream slots
  std::size_t stream_offset = 0;      // bytes of stream.front() already read
  std::vector<Request*> rndv_sends;   // our large sends, by rendezvous id
  std::vector<Request*> rndv_recvs;   // receives waiting for the peer's write, by its id
  // The peer appends rendezvous entries here; we read them from rndv_in_next on.
  std::unique_ptr<Region> rndv_in;
  uint64_t rndv_in_next = 0;
  // Our entries, at the positions they take in the peer's queue: staged, then written
  // (several per write) when the link next drains.
  std::unique_ptr<Region> rndv_out;
  uint64_t rndv_out_staged = 0;
  uint64_t rndv_out_written = 0;
  wire::RndvQueueInfo peer_rndv{};
  bool close_to_send = false;
  bool waiting = false;  // listed in Link::waiting

  std::byte* slot(uint64_t seq) noexcept { return memory->data() + std::size_t(recv.index(seq)) * slot_size; }
  wire::RingInfo info() const noexcept;
  wire::RndvQueueInfo rndv_info() const noexcept;
};

class Link {
 public:
  Link(Engine::Impl& engine, std::string peer, std::unique_ptr<Port> port);
  ~Link();

  Engine::Impl& engine;
  std::string peer;
  std::unique_ptr<Port> port;
  VerbsPort& verbs() noexcept { return static_cast<VerbsPort&>(*port); }  // verbs links only

  std::unique_ptr<Region> staging;  // copies of outgoing slots while their writes fly
  uint32_t staging_slots = 0;
  uint64_t staging_next = 0;
  uint64_t staging_done = 0;
  uint64_t slots_written = 0;  // for RXIO_FAULT_LINK_AFTER
  uint32_t sq_depth = 0;
  uint32_t sq_used = 0;

  uint64_t max_message = 0;  // one RDMA operation at most (verbs: the port's max_msg_sz)
  std::vector<Connection*> connections;  // by our id; [0] is the control connection
  std::vector<std::unique_ptr<Connection>> owned;
  std::vector<Connection*> waiting;      // connections with queued work (each at most once)
  std::vector<Connection*> draining;     // the list being drained, swapped with `waiting`
  RequestList deferred;                  // reads and writes waiting for send-queue room
  std::vector<wire::ConnectReply> replies_to_send;  // accepted connections, not yet answered
  // Released connections: our release not posted yet; then those both sides released,
  // freed when the link next drains. Capacity for every connection, reserved, so that
  // the data path never grows them.
  std::vector<Connection*> releases_to_send;
  std::vector<Connection*> to_free;
  std::vector<uint32_t> free_ids;  // of connections freed, for the next ones
  int error = 0;
  std::string error_text;

  Connection& control() noexcept { return *connections[0]; }
  Connection& add_connection();
  // -1 once failed, so that poll() ignores it.
  int liveness_fd() const noexcept { return error ? -1 : port->liveness_fd(); }
  // Asks the port after poll() said the liveness fd is readable; call with the
  // completions drained, since a departing peer's last messages come before its EOF.
  void check_liveness() noexcept;
  // Fails every connection and tears the link down so the peer sees it too.
  void fail(int err, const std::string& why) noexcept;
  void post_receives(uint32_t count);

  // Data path (datapath.cc).
  bool can_post_slot(Connection& c) const noexcept;
  // A signaled RDMA WRITE_WITH_IMM of `sge` (none: zero-length); fails the link and
  // returns false if it cannot be posted.
  bool post_write_imm(uint64_t kind, ibv_sge* sge, uint64_t remote, uint32_t rkey, const wire::Imm& imm,
                      const char* what) noexcept;
  void post_imm(Connection& c, wire::ImmType type, uint8_t value) noexcept;
  void post_slot(Connection& c, wire::SlotKind kind, uint64_t tag, std::span<const std::byte> payload) noexcept;
  void return_credits(Connection& c, bool force) noexcept;
  // Posts what waits on `c`; its rendezvous entries only with `write`, so that
  // the application's sends between two progress calls share one write.
  void drain(Connection& c, bool write) noexcept;
  void drain_waiting() noexcept;
  void mark_waiting(Connection& c) noexcept;
  // Queues our release of `c` once the application released it and both sides closed
  // it with nothing of ours in flight.
  void release_when_done(Connection& c) noexcept;
  void free_released() noexcept;
  void post_request(Request& request) noexcept;  // a READ or WRITE, or deferred
  void on_send_completion(const ibv_wc& wc) noexcept;
  void on_arrival(const ibv_wc& wc) noexcept;
  void on_rndv_entries(Connection& c, uint32_t count) noexcept;
  void on_rndv_entry(Connection& c, const wire::RndvEntry& entry) noexcept;
  void stage(Connection& c, const wire::RndvEntry& entry) noexcept;
  void write_entries(Connection& c) noexcept;
  // Takes the first posted receive that wants `tag`, if any.
  static Request* take_posted(Connection::Ring& r, uint64_t tag) noexcept;
  void deliver(Connection& c, const Arrival& arrival, Request& request) noexcept;
  void on_control(const wire::SlotHeader& header, std::span<const std::byte> payload) noexcept;
  void count_fault(wire::Fault fault, const char* where) noexcept;
  void on_request_completion(Request& request) noexcept;
  void on_failed_completion(const ibv_wc& wc, Request* request) noexcept;

  static Link& of(Request& request) noexcept { return *request.connection_->link_; }
  static void push(RequestList& list, Request& request) noexcept;
  static Request* pop(RequestList& list) noexcept;
  static void complete(Request& request, Status status, std::size_t bytes) noexcept;
  static uint32_t eager_limit(const Connection::Ring& ring, uint32_t configured) noexcept;
};

struct Engine::Impl {
  explicit Impl(Options options);

  Options options;
  // tcp bootstrap: a device we open; rdma_cm: the context rdma_cm opened for the
  // address we bound to.
  std::optional<verbs::Context> context;
  std::optional<verbs::cm::EventChannel> bind_events;
  std::optional<verbs::cm::Id> bound_id;
  ibv_context* device = nullptr;
  std::string device_name;
  verbs::Endpoint endpoint;
  ibv_mtu mtu = IBV_MTU_1024;

  std::optional<verbs::ProtectionDomain> pd;
  std::optional<verbs::CompletionChannel> channel;
  std::optional<verbs::CompletionQueue> cq;
  std::optional<RegistrationCache> cache;
  std::optional<TcpKeys> tcp_keys;  // regions exposed to tcp peers
  uint8_t backends = 0;  // 1 << Backend for each one this engine allows
  std::array<uint8_t, 16> host_id;  // the kernel's boot id
  uint64_t net_ns = 0, pid_ns = 0;

  std::optional<oob::Listener> listener;
  std::optional<verbs::cm::EventChannel> listen_events;
  std::optional<verbs::cm::Id> cm_listener;
  uint16_t port = 0;

  std::vector<std::unique_ptr<Link>> links;
  // Links whose set-up failed after receives were posted: kept until the engine goes,
  // so that their flushed completions never name freed memory.
  std::vector<std::unique_ptr<Link>> retired;
  bool poll_fds_stale = false;
  // When an idle progress() next looks at the links' liveness (a poll of their fds);
  // the clock is read every 64th idle poll only (a system call in some VMs).
  uint32_t idle_polls = 0;
  std::chrono::steady_clock::time_point next_liveness_check{};
  uint64_t max_message = 0;  // verbs: the port's max_msg_sz
  uint8_t rd_atomic = 16;    // RDMA READs in flight per QP, both ways
  std::map<std::string, Link*> links_by_peer;
  std::vector<Connection*> accepted;  // opened by peers, not yet returned by accept()
  // What to sleep on, and what each fd is for.
  struct Watch {
    enum Kind : uint8_t { completions, liveness, wake, device_events } kind;
    Link* link;
  };
  std::vector<pollfd> poll_fds;
  std::vector<Watch> watches;
  // wait_fd(): the same fds in an epoll set (plus the listener), made on first use.
  UniqueFd wait_epoll;
  std::vector<int> wait_registered;
  void sync_wait_epoll() noexcept;
  uint64_t faults[static_cast<int>(wire::Fault::count_)] = {};
  uint64_t handled_count = 0;  // Engine::handled()
  uint64_t link_failures = 0;  // Engine::link_failures()
  uint64_t faulted_links = 0;  // links RXIO_FAULT_LINK_AFTER failed

  bool allows(Backend b) const noexcept { return backends & (1u << static_cast<int>(b)); }
  Link& link_to(const std::string& host, uint16_t peer_port);
  std::unique_ptr<Link> new_verbs_link(const std::string& peer);
  std::unique_ptr<Link> new_shm_link(const std::string& peer);
  // The bootstrap connection becomes the link; the hellos cross on it first.
  std::unique_ptr<Link> new_tcp_link(oob::Channel channel, bool accepting);
  void open_verbs(bool required);
  void connect_verbs_link(Link& link, oob::Channel channel);
  void accept_verbs_link(Link& link, oob::Channel channel);
  void set_up_cm_link(Link& link, const std::string& host, uint16_t peer_port);
  void set_up_shm_link(Link& link, shm::Listener* unix_listener, const wire::Choice& choice, uint32_t peer_pid);
  // The backend for a peer's offer, or kNoBackend, and why, for the log.
  uint8_t choose(const wire::Offer& offer) const;
  std::string explain(const wire::Offer& offer, uint8_t chosen) const;
  void accept_next_link(std::chrono::milliseconds timeout);
  Link& accept_tcp_link(oob::Channel channel);
  Link& accept_cm_link(verbs::cm::Event& request);
  void poll_listener(std::chrono::milliseconds timeout) noexcept;
  void prepare_link(Link& link);
  verbs::ReliabilityParams reliability() const;
  void rebuild_poll_fds();
  // Takes ownership of a link whose set-up is failing.
  void retire(std::unique_ptr<Link> link) noexcept;
  // Lets go of links that failed (their peer went away) once the application has
  // released all their connections.
  void reap_links() noexcept;
  // Polls the CQ and the software ports, and handles what completed.
  int poll_cq() noexcept;
  void handle(const ibv_wc& wc, Link* port_link) noexcept;
  int progress() noexcept;
  // The device's asynchronous events: a QP in error, the port down, the device lost.
  // The links they concern fail (the shim moves their connections back to TCP). With
  // the rdma_cm bootstrap the context is librdmacm's, shared by the process's engines:
  // an event is read by one of them.
  void read_device_events() noexcept;
  bool device_events_ended = false;  // the device is lost: its event fd is not watched
  // Waits up to `timeout_ms` for a completion or a liveness event and handles it.
  int check_links(int timeout_ms) noexcept;  // events handled
  // Sleeps until a completion, a liveness event or `timeout`; what woke it is handled.
  void block(std::chrono::milliseconds timeout) noexcept;
  // Closes every open connection and lets what was sent leave, within a time limit.
  void shutdown() noexcept;
  template <typename Done>
  void wait_until(Done&& done, std::chrono::milliseconds timeout, const std::string& what,
                  const std::string& peer);
};

}  // namespace rxio::transport
