// The control path: engine set-up, links (bootstrap over TCP or rdma_cm), opening and
// accepting connections, failure. The data path is in datapath.cc.
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>

#include "base/config.h"
#include "base/error.h"
#include "base/log.h"
#include "transport/link.h"

namespace rxio::transport {
namespace {

using std::chrono::milliseconds;

constexpr uint32_t kSendDepth = 128;
constexpr uint32_t kRecvDepth = 256;
constexpr int kCqEntries = 16384;
// Every link may fill the shared CQ with its whole send and receive queues.
constexpr std::size_t kMaxLinks = kCqEntries / (kSendDepth + kRecvDepth);

uint32_t random_psn() {
  static std::mt19937 rng{std::random_device{}()};
  return rng() & 0xffffff;
}

// The option if set, else the knob's value, refused unless within [low, high].
template <typename T>
T pick(T given, T unset, const char* knob, uint64_t (*read)(std::string_view), uint64_t low, uint64_t high) {
  uint64_t value = given != unset ? given : read(knob);
  if (value < low || value > high)
    throw Error(EINVAL, std::string("using ") + knob + "=" + std::to_string(value), {},
                "it must be " + std::to_string(low) + " to " + std::to_string(high));
  return static_cast<T>(value);
}

Options resolve(Options o) {
  o.ring_slots = pick<uint32_t>(o.ring_slots, 0, "RXIO_RING_SLOTS", config::get_count, 2, wire::kMaxRingSlots);
  o.slot_size = pick<uint32_t>(o.slot_size, 0, "RXIO_SLOT_SIZE", config::get_bytes, 64, wire::kMaxSlotSize);
  o.eager_limit = pick<uint32_t>(o.eager_limit, 0, "RXIO_EAGER_LIMIT", config::get_bytes, 0, wire::kMaxSlotSize);
  if (o.poll_time.count() < 0) o.poll_time = std::chrono::microseconds(config::get_count("RXIO_POLL_US"));
  if (o.connect_timeout.count() < 0) o.connect_timeout = milliseconds(config::get_count("RXIO_CONNECT_TIMEOUT_MS"));
  o.qp_timeout = pick<uint8_t>(o.qp_timeout, 0, "RXIO_QP_TIMEOUT", config::get_count, 1, 31);
  o.qp_retry_count = pick<uint8_t>(o.qp_retry_count, 0xff, "RXIO_QP_RETRY_COUNT", config::get_count, 0, 7);
  o.shm_arena = pick<uint64_t>(o.shm_arena, 0, "RXIO_SHM_ARENA", config::get_bytes, 1u << 20, uint64_t(1) << 40);
  config::get_choice("RXIO_LOG", {"warn", "info"});  // a typo is an error here, not a silent default
  if (o.fault_link_after == ~0ull) o.fault_link_after = config::get_count("RXIO_FAULT_LINK_AFTER");
  if (o.fault_links == ~0ull) o.fault_links = config::get_count("RXIO_FAULT_LINKS");
  if (o.device.empty()) {
    o.device = config::get_text("RXIO_DEVICE");
    if (o.device == "auto") o.device.clear();
  }
  if (o.tcp_io.empty()) o.tcp_io = config::get_choice("RXIO_TCP_IO", {"uring", "plain"});
  if (o.tcp_io != "uring" && o.tcp_io != "plain")
    throw Error(EINVAL, "using tcp_io '" + o.tcp_io + "'", {}, "it must be uring or plain");
  if (o.backend == BackendChoice::from_environment) {
    std::string b = config::get_choice("RXIO_BACKEND", {"auto", "verbs", "shm", "tcp"});
    o.backend = b == "verbs" ? BackendChoice::verbs
                : b == "shm" ? BackendChoice::shm
                : b == "tcp" ? BackendChoice::tcp
                             : BackendChoice::automatic;
  }
  uint32_t payload = o.slot_size - wire::kSlotHeaderSize;
  if (o.eager_limit == 0 || o.eager_limit > payload) o.eager_limit = payload;
  return o;
}

constexpr uint8_t bit(Backend b) { return static_cast<uint8_t>(1u << static_cast<int>(b)); }

}  // namespace

const char* to_string(Backend backend) {
  switch (backend) {
    case Backend::verbs: return "verbs";
    case Backend::shm: return "shm";
    case Backend::tcp: return "tcp";
  }
  return "?";
}

const char* to_string(Status status) {
  switch (status) {
    case Status::ok: return "ok";
    case Status::pending: return "pending";
    case Status::truncated: return "truncated";
    case Status::closed: return "closed";
    case Status::failed: return "failed";
    case Status::timed_out: return "timed out";
  }
  return "?";
}

// ---- connections -------------------------------------------------------------------

Connection::Ring::Ring(Port& port, uint32_t slots, uint32_t size)
    : slot_size(size),
      memory(port.allocate(std::size_t(slots) * size, true)),
      recv(slots),
      send(0),
      unexpected(slots + wire::kMaxRendezvous),
      stream(slots),
      rndv_sends(wire::kMaxRendezvous, nullptr),
      rndv_recvs(wire::kMaxRendezvous, nullptr),
      rndv_in(port.allocate(std::size_t(wire::kRndvQueueEntries) * wire::kRndvEntrySize, true)),
      rndv_out(port.allocate(rndv_in->size(), false)) {}

wire::RingInfo Connection::Ring::info() const noexcept {
  return {reinterpret_cast<uint64_t>(memory->data()), memory->keys().rkey, recv.slots(), slot_size};
}

wire::RndvQueueInfo Connection::Ring::rndv_info() const noexcept {
  return {reinterpret_cast<uint64_t>(rndv_in->data()), rndv_in->keys().rkey};
}

Connection::Connection(Link& link, uint32_t id) : link_(&link), id_(id) {
  const Options& o = link.engine.options;
  ring_ = std::make_unique<Ring>(*link.port, o.ring_slots, o.slot_size);
}

Connection::~Connection() = default;

// ---- links -------------------------------------------------------------------------

Link::Link(Engine::Impl& e, std::string peer_name, std::unique_ptr<Port> p)
    : engine(e), peer(std::move(peer_name)), port(std::move(p)) {
  staging_slots = kSendDepth;
  staging = port->allocate(std::size_t(staging_slots) * e.options.slot_size, false);
  add_connection();  // the control connection, id 0
}

Link::~Link() {
  // The port first: what it still has in flight may name the rings and staging memory.
  port.reset();
}

Connection& Link::add_connection() {
  uint32_t id = 0;
  if (!free_ids.empty()) {
    // A released connection's id: both sides freed it, and nothing names it any more.
    id = free_ids.back();
    owned[id].reset(new Connection(*this, id));
    free_ids.pop_back();
    connections[id] = owned[id].get();
  } else {
    id = static_cast<uint32_t>(connections.size());
    if (id >= wire::kMaxConnections)
      throw Error(EMFILE, "opening connection " + std::to_string(id) + " to " + peer, {},
                  "a link carries at most " + std::to_string(wire::kMaxConnections) + " connections at once");
    owned.push_back(std::unique_ptr<Connection>(new Connection(*this, id)));
    connections.push_back(owned.back().get());
    // So that the data path never grows them.
    waiting.reserve(connections.size());
    draining.reserve(connections.size());
    releases_to_send.reserve(connections.size());
    to_free.reserve(connections.size());
    free_ids.reserve(connections.size());
  }
  Connection& c = *owned[id];
  c.error_ = error;
  c.error_text_ = error_text;
  return c;
}

void Link::check_liveness() noexcept {
  if (error) return;
  if (std::string why = port->check_liveness(); !why.empty()) fail(ECONNRESET, why);
}

void Link::fail(int err, const std::string& why) noexcept {
  if (error) return;
  error = err;
  error_text = "link to " + peer + " failed: " + why;
  ++engine.link_failures;
  for (Connection* c : connections) {
    if (!c) continue;  // freed
    c->error_ = err;
    c->error_text_ = error_text;
    Connection::Ring& r = *c->ring_;
    auto fail_all = [&](RequestList& list) {
      for (Request* q = list.head; q; q = q->next_) q->status_ = Status::failed;
      list = {};
    };
    fail_all(r.posted);
    fail_all(r.sends);
    for (auto* table : {&r.rndv_sends, &r.rndv_recvs})
      for (Request*& q : *table)
        if (q) std::exchange(q, nullptr)->status_ = Status::failed;
  }
  for (Request* q = deferred.head; q; q = q->next_) q->status_ = Status::failed;
  deferred = {};
  waiting.clear();
  // Tear down, so the peer fails too and can no longer reach our memory.
  port->shut();
  engine.poll_fds_stale = true;
}

void Engine::Impl::read_device_events() noexcept {
  auto fail_verbs_links = [&](const std::string& why, const ibv_qp* only) {
    for (auto& link : links) {
      if (link->error || link->port->backend() != Backend::verbs) continue;
      if (!only || link->verbs().raw_qp == only) link->fail(EIO, why);
    }
  };
  // The fd stays as it is (with the rdma_cm bootstrap it is librdmacm's context, the
  // program's too): each read only once poll says an event is there.
  for (;;) {
    pollfd ready{device->async_fd, POLLIN, 0};
    if (::poll(&ready, 1, 0) != 1) return;
    ibv_async_event event;
    if ((ready.revents & (POLLERR | POLLHUP | POLLNVAL)) || ibv_get_async_event(device, &event) != 0) {
      // A device that is gone reports an error for good: nothing more to read there.
      device_events_ended = true;
      poll_fds_stale = true;
      return fail_verbs_links(device_name + "'s event fd failed (the device is gone)", nullptr);
    }
    const ibv_event_type type = event.event_type;
    const bool qp_error = type == IBV_EVENT_QP_FATAL || type == IBV_EVENT_QP_REQ_ERR || type == IBV_EVENT_QP_ACCESS_ERR;
    const ibv_qp* qp = qp_error ? event.element.qp : nullptr;
    const bool port_down = type == IBV_EVENT_PORT_ERR && event.element.port_num == endpoint.port;
    ibv_ack_async_event(&event);
    if (type == IBV_EVENT_DEVICE_FATAL) {
      device_events_ended = true;
      poll_fds_stale = true;
    }
    if (!qp_error && !port_down && type != IBV_EVENT_DEVICE_FATAL && type != IBV_EVENT_CQ_ERR) continue;
    std::string why = device_name + " reported " + ibv_event_type_str(type);
    if (port_down) why += " (port " + std::to_string(endpoint.port) + " is down)";
    fail_verbs_links(why, qp);
  }
}

void Link::post_receives(uint32_t count) {
  for (uint32_t i = 0; i < count; ++i) {
    if (int rc = port->post_recv(reinterpret_cast<uint64_t>(this) | kWrReceive); rc != 0)
      throw Error(rc, "posting receives on the link to " + peer, engine.device_name);
  }
}

void Link::count_fault(wire::Fault fault, const char* where) noexcept {
  ++engine.faults[static_cast<int>(fault)];
  fail(EPROTO, std::string(where) + ": " + std::string(wire::to_string(fault)));
}

// ---- the engine --------------------------------------------------------------------

Engine::Impl::Impl(Options o) : options(resolve(std::move(o))),
      host_id(shm::host_id()),
      net_ns(shm::namespace_id("net")),
      pid_ns(shm::namespace_id("pid")) {
  BackendChoice choice = options.backend;
  if (options.bootstrap == Bootstrap::rdma_cm) {
    if (choice == BackendChoice::shm)
      throw Error(EINVAL, "starting an engine with the rdma_cm bootstrap and RXIO_BACKEND=shm", {},
                  "rdma_cm sets up verbs links only: use the tcp bootstrap for shm");
    choice = BackendChoice::verbs;
  }
  const bool any = choice == BackendChoice::automatic;
  if (any || choice == BackendChoice::verbs) open_verbs(choice == BackendChoice::verbs);
  if (any || choice == BackendChoice::shm) backends |= bit(Backend::shm);
  if (any || choice == BackendChoice::tcp) {
    backends |= bit(Backend::tcp);
    tcp_keys.emplace();
  }
}

void Engine::Impl::open_verbs(bool required) {
  if (options.bootstrap == Bootstrap::tcp) {
    verbs::DeviceList devices;
    if (devices.empty()) {
      if (required) throw Error(ENODEV, verbs::no_device_message());
      return;  // shm only
    }
    std::string name = options.device.empty() ? ibv_get_device_name(devices[0]) : options.device;
    endpoint = verbs::select_by_device(name);
    context.emplace(verbs::Context::open_by_name(endpoint.device));
    device = context->get();
  } else {
    if (options.local_address.empty())
      throw Error(EINVAL, "starting an rdma_cm engine without a local address", {},
                  "set Options::local_address to this host's IP on the RDMA interface");
    bind_events.emplace();
    bound_id.emplace(*bind_events);
    bound_id->bind(verbs::cm::SocketAddress::parse(options.local_address, 0));
    device = bound_id->verbs();
    if (!device)
      throw Error(ENODEV, "binding rdma_cm to " + options.local_address, {},
                  "no RDMA device serves that address; `rdma link` lists devices and netdevs");
    endpoint = verbs::select_by_ip(options.local_address);
  }
  device_name = verbs::device_name(device);
  ibv_port_attr port_attr{};
  if (int rc = ibv_query_port(device, endpoint.port, &port_attr); rc != 0)
    throw Error(rc, "querying port " + std::to_string(endpoint.port), device_name);
  mtu = port_attr.active_mtu;
  max_message = port_attr.max_msg_sz;
  ibv_device_attr device_attr{};
  if (int rc = ibv_query_device(device, &device_attr); rc != 0)
    throw Error(rc, "querying the device (ibv_query_device)", device_name);
  rd_atomic = static_cast<uint8_t>(std::clamp(std::min(device_attr.max_qp_rd_atom, device_attr.max_qp_init_rd_atom), 1, 128));
  pd.emplace(device);
  channel.emplace(device);
  cq.emplace(device, kCqEntries, &*channel);
  cache.emplace(*pd);
  backends |= bit(Backend::verbs);
}

Engine::Engine(Options options) : impl_(std::make_unique<Impl>(std::move(options))) {}

Engine::~Engine() { impl_->shutdown(); }

void Engine::Impl::shutdown() noexcept {
  for (auto& link : links)
    for (Connection* c : link->connections)
      if (c && c->id_ != 0 && c->established_) c->close();
  // Eager sends completed when posted: let them, and the closes, reach the peer.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  auto busy = [&] {
    for (auto& link : links)
      if (!link->error && (link->sq_used > 0 || !link->waiting.empty())) return true;
    return false;
  };
  while (busy() && std::chrono::steady_clock::now() < deadline) progress();
}

void Engine::Impl::retire(std::unique_ptr<Link> link) noexcept {
  link->fail(ECANCELED, "its set-up failed");
  // Only the engine's CQ may still name a failed link; an shm port has nothing queued
  // there and goes at once, its memory and descriptors with it.
  if (link->port->backend() == Backend::shm) return;
  try {
    retired.push_back(std::move(link));
  } catch (...) {
    // Out of memory here: leak the link rather than free what the CQ still names.
    (void)link.release();
  }
}

void Engine::Impl::reap_links() noexcept {
  for (std::size_t i = 0; i < links.size();) {
    Link* link = links[i].get();
    // Opened by the peer before it went, never taken: nobody will take, or release, them now.
    if (link->error)
      std::erase_if(accepted, [link](Connection* c) {
        if (c->link_ != link) return false;
        c->released_ = true;
        return true;
      });
    bool done = link->error && std::all_of(link->connections.begin() + 1, link->connections.end(),
                                           [](const Connection* c) { return !c || c->released_; });
    if (!done) {
      ++i;
      continue;
    }
    std::erase_if(links_by_peer, [link](const auto& entry) { return entry.second == link; });
    std::unique_ptr<Link> gone = std::move(links[i]);
    links.erase(links.begin() + static_cast<std::ptrdiff_t>(i));
    poll_fds_stale = true;
    retire(std::move(gone));
  }
}

const std::string& Engine::device_name() const { return impl_->device_name; }

std::size_t Engine::qp_count() const {
  return std::count_if(impl_->links.begin(), impl_->links.end(), [](const auto& link) {
    return link->port->backend() == Backend::verbs && link->verbs().raw_qp;
  });
}
uint16_t Engine::listen_port() const { return impl_->port; }

EngineStats Engine::stats() const {
  EngineStats s;
  s.links = impl_->links.size();
  for (const auto& link : impl_->links) {
    s.connections += link->connections.size() - 1 - link->free_ids.size();
    if (link->port->backend() == Backend::shm) ++s.shm_links;
    if (link->port->backend() == Backend::tcp) ++s.tcp_links;
    if (link->error) ++s.failed_links;
  }
  s.registrations = impl_->cache ? impl_->cache->misses() : 0;
  std::copy(std::begin(impl_->faults), std::end(impl_->faults), s.faults);
  return s;
}

RemoteRegion Engine::expose(void* address, std::size_t length) {
  // shm peers reach any of this process's memory by cross-memory attach; verbs peers
  // need the registration's key.
  uint32_t rkey = 0;
  constexpr int kAccess = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  if (impl_->cache) rkey = impl_->cache->get(address, length, kAccess).rkey();
  // tcp peers are checked against a key of ours: the same one, so one region serves all.
  if (impl_->tcp_keys) rkey = rkey ? impl_->tcp_keys->add_as(address, length, kAccess, rkey).rkey
                                   : impl_->tcp_keys->add(address, length, kAccess).rkey;
  return {reinterpret_cast<uint64_t>(address), length, rkey};
}

void Engine::forget(const void* address, std::size_t length) {
  if (impl_->cache) impl_->cache->invalidate(address, length);
  if (impl_->tcp_keys) impl_->tcp_keys->forget(address, length);
}

void Engine::listen(const std::string& address, uint16_t port) {
  Impl& e = *impl_;
  if (e.options.bootstrap == Bootstrap::tcp) {
    e.listener.emplace(address, port);
    e.port = e.listener->port();
  } else {
    e.listen_events.emplace();
    e.cm_listener.emplace(*e.listen_events);
    e.cm_listener->bind(verbs::cm::SocketAddress::parse(address, port));
    e.cm_listener->listen(128);
    e.port = e.cm_listener->local_port();
  }
}

verbs::ReliabilityParams Engine::Impl::reliability() const {
  verbs::ReliabilityParams rel;
  rel.timeout = options.qp_timeout;
  rel.retry_count = options.qp_retry_count;
  rel.max_rd_atomic = rd_atomic;
  rel.max_dest_rd_atomic = rd_atomic;
  return rel;
}

void Engine::Impl::prepare_link(Link& link) {
  link.sq_depth = kSendDepth;
  link.post_receives(kRecvDepth);
}

std::unique_ptr<Link> Engine::Impl::new_verbs_link(const std::string& peer) {
  auto link = std::make_unique<Link>(*this, peer, std::make_unique<VerbsPort>(*pd, *cache));
  link->max_message = max_message;
  return link;
}

std::unique_ptr<Link> Engine::Impl::new_shm_link(const std::string& peer) {
  auto link = std::make_unique<Link>(*this, peer, std::make_unique<ShmPort>(options.shm_arena));
  link->max_message = UINT32_MAX;  // rendezvous entries carry 32-bit lengths
  prepare_link(*link);
  return link;
}

std::unique_ptr<Link> Engine::Impl::new_tcp_link(oob::Channel ch, bool accepting) {
  const std::string peer = ch.peer();
  UniqueFd socket(::fcntl(ch.native_fd(), F_DUPFD_CLOEXEC, 0));
  if (!socket) throw Error(errno, "taking over the connection to " + peer);
  auto link = std::make_unique<Link>(*this, peer, std::make_unique<TcpPort>(*tcp_keys, std::move(socket), options.tcp_io == "uring"));
  link->max_message = UINT32_MAX;  // rendezvous entries carry 32-bit lengths
  log::info("tcp link with " + peer + ": " +
            (static_cast<TcpPort&>(*link->port).uses_uring() ? "io_uring" : "plain system calls"));
  prepare_link(*link);
  wire::Fault fault{};
  std::optional<wire::TcpHello> hello;
  auto mine = wire::encode(wire::TcpHello{link->control().ring_->info()});
  if (!accepting) ch.send(mine);
  hello = wire::decode_tcp_hello(ch.receive(options.connect_timeout), fault);
  if (!hello) {
    ++faults[static_cast<int>(fault)];
    throw Error(EPROTO, "reading the tcp hello of " + peer + ": " + std::string(wire::to_string(fault)));
  }
  if (accepting) ch.send(mine);
  link->control().ring_->peer = hello->control;
  link->control().ring_->send = SendRing(hello->control.slots);
  link->control().established_ = true;
  return link;
}

uint8_t Engine::Impl::choose(const wire::Offer& offer) const {
  const uint8_t common = offer.backends & backends;
  // shm: one host, one user, and the namespaces in which unix sockets and pids mean
  // the same to both.
  if ((common & bit(Backend::shm)) && offer.host == host_id && offer.uid == geteuid() && offer.net_ns == net_ns &&
      offer.pid_ns == pid_ns && net_ns != 0)
    return static_cast<uint8_t>(Backend::shm);
  if (common & bit(Backend::verbs)) return static_cast<uint8_t>(Backend::verbs);
  if (common & bit(Backend::tcp)) return static_cast<uint8_t>(Backend::tcp);
  return wire::kNoBackend;
}

std::string Engine::Impl::explain(const wire::Offer& offer, uint8_t chosen) const {
  const uint8_t common = offer.backends & backends;
  std::string not_shm;
  if (!(common & bit(Backend::shm))) not_shm = "shm not allowed at both ends";
  else if (offer.host != host_id) not_shm = "another host";
  else if (offer.uid != geteuid()) not_shm = "another user";
  else not_shm = "other namespaces";
  std::string not_verbs = (common & bit(Backend::verbs)) ? ""
                          : !(backends & bit(Backend::verbs)) ? "no RDMA device here (or verbs not allowed)"
                                                              : "none at the peer (or verbs not allowed there)";
  switch (chosen) {
    case static_cast<uint8_t>(Backend::shm): return "shm: same host, user and namespaces";
    case static_cast<uint8_t>(Backend::verbs): return "verbs on " + device_name + ": " + not_shm;
    case static_cast<uint8_t>(Backend::tcp): return "tcp: " + not_shm + "; verbs: " + not_verbs;
    default: return "none: " + not_shm + "; verbs: " + not_verbs + "; tcp not allowed at both ends";
  }
}

Link& Engine::Impl::accept_tcp_link(oob::Channel ch) {
  if (links.size() >= kMaxLinks)
    throw Error(EMFILE, "accepting a link from " + ch.peer(), device_name,
                "an engine serves at most " + std::to_string(kMaxLinks) + " peers");
  wire::Fault fault{};
  auto offer = wire::decode_offer(ch.receive(options.connect_timeout), fault);
  if (!offer) {
    ++faults[static_cast<int>(fault)];
    throw Error(EPROTO, "reading the offer of " + ch.peer() + ": " + std::string(wire::to_string(fault)));
  }
  wire::Choice choice;
  choice.backend = choose(*offer);
  log::info("link from " + ch.peer() + ": " + explain(*offer, choice.backend));
  std::optional<shm::Listener> unix_listener;
  if (choice.backend == static_cast<uint8_t>(Backend::shm)) {
    unix_listener.emplace();
    choice.pid = static_cast<uint32_t>(getpid());
    choice.nonce = unix_listener->nonce();
    choice.token = shm::random_token();
  }
  ch.send(wire::encode(choice));
  if (choice.backend == wire::kNoBackend)
    throw Error(EPROTONOSUPPORT, "refusing " + ch.peer() + ": no backend both ends allow", {},
                "shm needs both on one host, verbs an RDMA device on both; check RXIO_BACKEND on each side");
  std::unique_ptr<Link> link;
  try {
    if (choice.backend == static_cast<uint8_t>(Backend::shm)) {
      link = new_shm_link(ch.peer());
      set_up_shm_link(*link, &*unix_listener, choice, offer->pid);
    } else if (choice.backend == static_cast<uint8_t>(Backend::tcp)) {
      link = new_tcp_link(std::move(ch), true);
    } else {
      link = new_verbs_link(ch.peer());
      accept_verbs_link(*link, std::move(ch));
    }
  } catch (...) {
    if (link) retire(std::move(link));
    throw;
  }
  links.push_back(std::move(link));
  rebuild_poll_fds();
  return *links.back();
}

void Engine::Impl::accept_verbs_link(Link& link, oob::Channel ch) {
  wire::Fault fault{};
  auto frame = ch.receive(options.connect_timeout);
  auto hello = wire::decode_hello(frame, fault);
  if (!hello) {
    ++faults[static_cast<int>(fault)];
    throw Error(EPROTO, "reading the hello of " + ch.peer() + ": " + std::string(wire::to_string(fault)));
  }
  VerbsPort& vp = link.verbs();
  verbs::QueueCaps caps{kSendDepth, kRecvDepth, 1, 1, 64};
  vp.qp.emplace(*pd, *cq, *cq, caps);
  vp.raw_qp = vp.qp->get();
  vp.max_inline_ = vp.qp->caps().max_inline_data;
  uint32_t psn = random_psn();
  verbs::ReliabilityParams rel = reliability();
  verbs::PathParams path{endpoint.port, static_cast<uint8_t>(endpoint.gid.index), true,
                         std::min(mtu, static_cast<ibv_mtu>(hello->mtu))};
  vp.qp->to_init(endpoint.port);
  vp.qp->to_rtr({hello->qp_num, hello->psn, hello->gid, hello->lid}, path, rel);
  prepare_link(link);
  vp.qp->to_rts(psn, rel);
  link.control().ring_->peer = hello->control;
  link.control().ring_->send = SendRing(hello->control.slots);
  link.control().established_ = true;
  wire::Hello mine{vp.raw_qp->qp_num, psn, endpoint.gid.gid, 0, static_cast<uint8_t>(mtu),
                   link.control().ring_->info()};
  ch.send(wire::encode(mine));
  vp.channel.emplace(std::move(ch));
}

void Engine::Impl::set_up_shm_link(Link& link, shm::Listener* unix_listener, const wire::Choice& choice,
                                   uint32_t peer_pid) {
  auto& sp = static_cast<ShmPort&>(*link.port);
  wire::ShmHello mine{choice.token,      static_cast<uint32_t>(getpid()), sp.arena_base(),
                      sp.arena_size(),   sp.probe_address(),              sp.probe_value(),
                      link.control().ring_->info()};
  wire::ShmHello theirs;
  if (unix_listener) shm::accept_peer(sp, *unix_listener, peer_pid, mine, options.connect_timeout, theirs);
  else shm::connect_peer(sp, choice, mine, options.connect_timeout, theirs);
  link.control().ring_->peer = theirs.control;
  link.control().ring_->send = SendRing(theirs.control.slots);
  link.control().established_ = true;
}

Link& Engine::Impl::accept_cm_link(verbs::cm::Event& request) {
  wire::Fault fault{};
  auto data = request.private_data();
  auto hello = wire::decode_hello(data, fault);
  rdma_cm_id* raw = request.id();
  verbs::cm::Id id = verbs::cm::Id::adopt(raw);
  if (!hello) {
    ++faults[static_cast<int>(fault)];
    id.reject({});
    throw Error(EPROTO, "refusing an rdma_cm peer: " + std::string(wire::to_string(fault)));
  }
  if (id.verbs() != device)
    throw Error(EXDEV, "a peer connected through " + verbs::device_name(id.verbs()), device_name,
                "listen on an address of the engine's device");
  if (links.size() >= kMaxLinks)
    throw Error(EMFILE, "accepting an rdma_cm link", device_name,
                "an engine serves at most " + std::to_string(kMaxLinks) + " peers");
  std::string peer = verbs::cm::SocketAddress::of_peer(id).to_string();
  auto link = new_verbs_link(peer);
  link->verbs().cm_events.emplace();
  link->verbs().cm_id.emplace(std::move(id));
  link->verbs().cm_id->set_ack_timeout(options.qp_timeout);
  verbs::QueueCaps caps{kSendDepth, kRecvDepth, 1, 1, 64};
  link->verbs().cm_qp.emplace(*link->verbs().cm_id, *pd, *cq, *cq, caps);
  link->verbs().raw_qp = link->verbs().cm_qp->get();
  link->verbs().max_inline_ = caps.max_inline_data;
  prepare_link(*link);
  try {
    link->control().ring_->peer = hello->control;
    link->control().ring_->send = SendRing(hello->control.slots);
    link->control().established_ = true;
    wire::Hello mine{};
    mine.mtu = static_cast<uint8_t>(mtu);
    mine.control = link->control().ring_->info();
    auto bytes = wire::encode(mine);
    link->verbs().cm_id->accept({.private_data = bytes, .responder_resources = rd_atomic, .initiator_depth = rd_atomic,
                         .retry_count = options.qp_retry_count, .rnr_retry_count = 7});
  } catch (...) {
    retire(std::move(link));
    throw;
  }
  links.push_back(std::move(link));
  return *links.back();
}

void Engine::Impl::poll_listener(milliseconds timeout) noexcept {
  // A peer that fails its set-up is the peer's problem: report it, keep listening.
  try {
    accept_next_link(timeout);
  } catch (const std::exception& e) {
    log::warn(std::string("refused a link: ") + e.what());
  }
}

void Engine::Impl::accept_next_link(milliseconds timeout) {
  if (listener) {
    pollfd pfd{listener->native_fd(), POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(timeout.count())) == 1)
      accept_tcp_link(listener->accept(options.connect_timeout));
  } else if (listen_events) {
    if (auto event = listen_events->next(timeout)) {
      if (event->type() == RDMA_CM_EVENT_CONNECT_REQUEST) {
        Link& link = accept_cm_link(*event);
        rdma_cm_id* raw = link.verbs().cm_id->get();
        event.reset();  // acknowledged before the id moves to its own channel
        if (rdma_migrate_id(raw, link.verbs().cm_events->get()) != 0)
          throw Error(errno, "moving an rdma_cm id to its link's channel (rdma_migrate_id)", device_name);
        rebuild_poll_fds();
      }
    }
  }
}

Link& Engine::Impl::link_to(const std::string& host, uint16_t peer_port) {
  std::string key = host + ":" + std::to_string(peer_port);
  if (auto it = links_by_peer.find(key); it != links_by_peer.end() && !it->second->error) return *it->second;
  if (links.size() >= kMaxLinks)
    throw Error(EMFILE, "opening a link to " + key, device_name,
                "an engine serves at most " + std::to_string(kMaxLinks) + " peers");
  std::unique_ptr<Link> link;
  if (options.bootstrap == Bootstrap::rdma_cm) {
    link = new_verbs_link(key);
    try {
      set_up_cm_link(*link, host, peer_port);
    } catch (...) {
      retire(std::move(link));
      throw;
    }
  }
  // The tcp bootstrap: offer what this engine allows, the acceptor chooses. When shm
  // fails (cross-memory attach refused, say) and verbs or tcp is allowed, offer again
  // without it.
  for (uint8_t offered = backends; !link;) {
    auto ch = oob::Channel::connect(host, peer_port, options.connect_timeout);
    ch.send(wire::encode(wire::Offer{offered, host_id, static_cast<uint32_t>(geteuid()),
                                     static_cast<uint32_t>(getpid()), net_ns, pid_ns}));
    wire::Fault fault{};
    auto choice = wire::decode_choice(ch.receive(options.connect_timeout), fault);
    if (!choice) {
      ++faults[static_cast<int>(fault)];
      throw Error(EPROTO, "reading the answer of " + key + ": " + std::string(wire::to_string(fault)), {},
                  "is an rxio engine listening there?");
    }
    if (choice->backend == wire::kNoBackend)
      throw Error(EPROTONOSUPPORT, "finding a backend both ends allow to reach " + key, {},
                  "shm needs both on one host, verbs an RDMA device on both; check RXIO_BACKEND on each side");
    if (!(offered & (1u << choice->backend))) {
      ++faults[static_cast<int>(wire::Fault::bad_kind)];
      throw Error(EPROTO, key + " chose a backend that was not offered");
    }
    log::info("link to " + key + ": " + to_string(static_cast<Backend>(choice->backend)) +
              ", the peer's choice (its log says why)");
    if (choice->backend == static_cast<uint8_t>(Backend::tcp)) {
      link = new_tcp_link(std::move(ch), false);
      break;
    }
    if (choice->backend == static_cast<uint8_t>(Backend::verbs)) {
      link = new_verbs_link(key);
      try {
        connect_verbs_link(*link, std::move(ch));
      } catch (...) {
        retire(std::move(link));
        throw;
      }
      break;
    }
    link = new_shm_link(key);
    try {
      set_up_shm_link(*link, nullptr, *choice, choice->pid);
    } catch (const std::exception& e) {
      retire(std::move(link));
      offered &= static_cast<uint8_t>(~bit(Backend::shm));
      if (!(offered & (bit(Backend::verbs) | bit(Backend::tcp)))) throw;
      log::warn("an shm link to " + key + " failed (" + e.what() + "); offering the other backends");
    }
  }
  Link& result = *link;
  links.push_back(std::move(link));
  links_by_peer[key] = &result;
  rebuild_poll_fds();
  return result;
}

void Engine::Impl::connect_verbs_link(Link& link, oob::Channel ch) {
  const std::string& key = link.peer;
  VerbsPort& vp = link.verbs();
  verbs::QueueCaps caps{kSendDepth, kRecvDepth, 1, 1, 64};
  verbs::ReliabilityParams rel = reliability();
  wire::Fault fault{};
  vp.qp.emplace(*pd, *cq, *cq, caps);
  vp.raw_qp = vp.qp->get();
  vp.max_inline_ = vp.qp->caps().max_inline_data;
  vp.qp->to_init(endpoint.port);
  uint32_t psn = random_psn();
  wire::Hello mine{vp.raw_qp->qp_num, psn, endpoint.gid.gid, 0, static_cast<uint8_t>(mtu),
                   link.control().ring_->info()};
  ch.send(wire::encode(mine));
  auto frame = ch.receive(options.connect_timeout);
  auto hello = wire::decode_hello(frame, fault);
  if (!hello) {
    ++faults[static_cast<int>(fault)];
    throw Error(EPROTO, "reading the hello of " + key + ": " + std::string(wire::to_string(fault)), {},
                "is an rxio engine listening there?");
  }
  verbs::PathParams path{endpoint.port, static_cast<uint8_t>(endpoint.gid.index), true,
                         std::min(mtu, static_cast<ibv_mtu>(hello->mtu))};
  vp.qp->to_rtr({hello->qp_num, hello->psn, hello->gid, hello->lid}, path, rel);
  prepare_link(link);
  vp.qp->to_rts(psn, rel);
  link.control().ring_->peer = hello->control;
  link.control().ring_->send = SendRing(hello->control.slots);
  vp.channel.emplace(std::move(ch));
  link.control().established_ = true;
}

void Engine::Impl::set_up_cm_link(Link& link, const std::string& host, uint16_t peer_port) {
  const std::string& key = link.peer;
  VerbsPort& vp = link.verbs();
  verbs::QueueCaps caps{kSendDepth, kRecvDepth, 1, 1, 64};
  wire::Fault fault{};
  vp.cm_events.emplace();
  vp.cm_id.emplace(*vp.cm_events);
  auto source = verbs::cm::SocketAddress::parse(options.local_address, 0);
  vp.cm_id->resolve_address(*vp.cm_events, verbs::cm::SocketAddress::parse(host, peer_port),
                               options.connect_timeout, &source);
  vp.cm_id->resolve_route(*vp.cm_events, options.connect_timeout);
  if (vp.cm_id->verbs() != device)
    throw Error(EXDEV, "the route to " + key + " leaves through " + verbs::device_name(vp.cm_id->verbs()),
                device_name, "give the engine the local address on that device");
  vp.cm_id->set_ack_timeout(options.qp_timeout);
  vp.cm_qp.emplace(*vp.cm_id, *pd, *cq, *cq, caps);
  vp.raw_qp = vp.cm_qp->get();
  vp.max_inline_ = caps.max_inline_data;
  prepare_link(link);
  wire::Hello mine{};
  mine.mtu = static_cast<uint8_t>(mtu);
  mine.control = link.control().ring_->info();
  auto bytes = wire::encode(mine);
  vp.cm_id->connect({.private_data = bytes, .responder_resources = rd_atomic, .initiator_depth = rd_atomic,
                        .retry_count = std::min<uint8_t>(options.qp_retry_count, 7), .rnr_retry_count = 7});
  auto established = vp.cm_events->expect(RDMA_CM_EVENT_ESTABLISHED, options.connect_timeout, key);
  auto hello = wire::decode_hello(established.private_data(), fault);
  if (!hello) {
    ++faults[static_cast<int>(fault)];
    throw Error(EPROTO, "reading the hello of " + key + ": " + std::string(wire::to_string(fault)));
  }
  link.control().ring_->peer = hello->control;
  link.control().ring_->send = SendRing(hello->control.slots);
  link.control().established_ = true;
}

void Engine::Impl::rebuild_poll_fds() {
  poll_fds.clear();
  watches.clear();
  if (channel) {
    poll_fds.push_back({channel->fd(), POLLIN, 0});
    watches.push_back({Watch::completions, nullptr});
  }
  if (device && !device_events_ended) {
    poll_fds.push_back({device->async_fd, POLLIN, 0});
    watches.push_back({Watch::device_events, nullptr});
  }
  for (const auto& link : links) {
    poll_fds.push_back({link->liveness_fd(), POLLIN, 0});
    watches.push_back({Watch::liveness, link.get()});
    if (int fd = link->error ? -1 : link->port->wake_fd(); fd >= 0) {
      poll_fds.push_back({fd, POLLIN, 0});
      watches.push_back({Watch::wake, link.get()});
    }
  }
  poll_fds_stale = false;
  if (wait_epoll) sync_wait_epoll();
}

void Engine::Impl::sync_wait_epoll() noexcept {
  for (int fd : wait_registered) ::epoll_ctl(wait_epoll.get(), EPOLL_CTL_DEL, fd, nullptr);
  wait_registered.clear();
  auto add = [&](int fd, uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    if (fd >= 0 && ::epoll_ctl(wait_epoll.get(), EPOLL_CTL_ADD, fd, &ev) == 0) wait_registered.push_back(fd);
  };
  for (const pollfd& p : poll_fds) add(p.fd, p.events);
  if (listener) add(listener->native_fd(), EPOLLIN);
}

int Engine::wait_fd() {
  Impl& e = *impl_;
  if (!e.wait_epoll) {
    e.wait_epoll.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!e.wait_epoll) throw Error(errno, "creating the engine's wait set (epoll_create1)");
    e.rebuild_poll_fds();
  }
  return e.wait_epoll.get();
}

int Engine::on_wake() noexcept {
  Impl& e = *impl_;
  int handled = e.check_links(0);
  e.reap_links();
  if (e.listener) e.poll_listener(std::chrono::milliseconds(0));
  return handled + e.progress();
}

Connection* Engine::try_accept() noexcept {
  Impl& e = *impl_;
  if (e.accepted.empty()) e.progress();
  if (e.accepted.empty()) return nullptr;
  Connection* c = e.accepted.front();
  e.accepted.erase(e.accepted.begin());
  return c;
}

template <typename Done>
void Engine::Impl::wait_until(Done&& done, milliseconds timeout, const std::string& what, const std::string& peer) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  // The peer usually answers within microseconds: look again before sleeping.
  auto spin_until = std::chrono::steady_clock::now() + options.poll_time;
  while (!done()) {
    if (progress() > 0 || std::chrono::steady_clock::now() < spin_until) continue;
    auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) throw Error(ETIMEDOUT, what + " (no answer within " + std::to_string(timeout.count()) + " ms)", peer);
    block(std::min(left, milliseconds(10)));
  }
}

Connection& Engine::connect(const std::string& host, uint16_t port) {
  Impl& e = *impl_;
  Link& link = e.link_to(host, port);
  Connection& c = link.add_connection();
  wire::ConnectRequest request{c.id_, c.ring_->info(), c.ring_->rndv_info()};
  std::array<std::byte, wire::kConnectRequestSize> payload;
  wire::encode(request, payload.data());
  e.wait_until([&] { return link.error || link.can_post_slot(link.control()); }, e.options.connect_timeout,
               "waiting for credit to open a connection", link.peer);
  if (link.error) throw Error(link.error, link.error_text);
  link.post_slot(link.control(), wire::SlotKind::connect, 0, payload);
  e.wait_until([&] { return link.error || c.established_; }, e.options.connect_timeout,
               "waiting for the peer to accept the connection", link.peer);
  if (link.error) throw Error(link.error, "opening a connection: " + link.error_text);
  return c;
}

Connection& Engine::accept(milliseconds timeout) {
  Impl& e = *impl_;
  if (!e.listener && !e.listen_events) throw Error(EINVAL, "accepting before listen()");
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (!e.accepted.empty()) {
      Connection* c = e.accepted.front();
      e.accepted.erase(e.accepted.begin());
      return *c;
    }
    if (e.progress() > 0) continue;
    auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      throw Error(ETIMEDOUT, "accepting a connection (none within " + std::to_string(timeout.count()) + " ms)",
                  "port " + std::to_string(e.port));
    // New links come through the listener; new connections on links come as
    // completions. Look at the first briefly, then sleep on the second.
    e.poll_listener(milliseconds(0));
    e.block(std::min(left, milliseconds(5)));
  }
}

}  // namespace rxio::transport
