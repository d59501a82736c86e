// The control path: engine set-up, links (bootstrap over TCP or rdma_cm), opening and
// accepting connections, failure. The data path is in datapath.cc.
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
  uint32_t payload = o.slot_size - wire::kSlotHeaderSize;
  if (o.eager_limit == 0 || o.eager_limit > payload) o.eager_limit = payload;
  return o;
}

}  // namespace

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

Connection::Ring::Ring(verbs::ProtectionDomain& pd, uint32_t slots, uint32_t size)
    : slot_size(size),
      memory(std::size_t(slots) * size),
      mr(verbs::MemoryRegion::register_host(pd, memory.data(), memory.size(),
                                            IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE)),
      recv(slots),
      send(0),
      unexpected(slots + wire::kMaxRendezvous),
      stream(slots),
      rndv_sends(wire::kMaxRendezvous, nullptr),
      rndv_recvs(wire::kMaxRendezvous, nullptr),
      rndv_in(std::size_t(wire::kRndvQueueEntries) * wire::kRndvEntrySize),
      rndv_in_mr(verbs::MemoryRegion::register_host(pd, rndv_in.data(), rndv_in.size(),
                                                    IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE)),
      rndv_out(rndv_in.size()),
      rndv_out_mr(verbs::MemoryRegion::register_host(pd, rndv_out.data(), rndv_out.size(), IBV_ACCESS_LOCAL_WRITE)) {}

wire::RingInfo Connection::Ring::info() const noexcept {
  return {reinterpret_cast<uint64_t>(memory.data()), mr.rkey(), recv.slots(), slot_size};
}

wire::RndvQueueInfo Connection::Ring::rndv_info() const noexcept {
  return {reinterpret_cast<uint64_t>(rndv_in.data()), rndv_in_mr.rkey()};
}

Connection::Connection(Link& link, uint32_t id) : link_(&link), id_(id) {
  const Options& o = link.engine.options;
  ring_ = std::make_unique<Ring>(*link.engine.pd, o.ring_slots, o.slot_size);
}

Connection::~Connection() = default;

// ---- links -------------------------------------------------------------------------

Link::Link(Engine::Impl& e, std::string peer_name) : engine(e), peer(std::move(peer_name)) {
  staging_slots = kSendDepth;
  staging.resize(std::size_t(staging_slots) * e.options.slot_size);
  staging_mr.emplace(verbs::MemoryRegion::register_host(*e.pd, staging.data(), staging.size(),
                                                        IBV_ACCESS_LOCAL_WRITE));
  add_connection();  // the control connection, id 0
}

Link::~Link() = default;

Connection& Link::add_connection() {
  auto id = static_cast<uint32_t>(connections.size());
  if (id >= wire::kMaxConnections)
    throw Error(EMFILE, "opening connection " + std::to_string(id) + " to " + peer, {},
                "a link carries at most " + std::to_string(wire::kMaxConnections) + " connections");
  owned.push_back(std::unique_ptr<Connection>(new Connection(*this, id)));
  connections.push_back(owned.back().get());
  // So that the data path never grows them.
  waiting.reserve(connections.size());
  draining.reserve(connections.size());
  Connection& c = *owned.back();
  c.error_ = error;
  c.error_text_ = error_text;
  return c;
}

int Link::liveness_fd() const noexcept {
  if (error) return -1;
  if (channel) return channel->native_fd();
  if (cm_events) return cm_events->fd();
  return -1;
}

void Link::check_liveness() noexcept {
  if (error) return;
  if (channel) {
    char byte;
    ssize_t n = ::recv(channel->native_fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) fail(ECONNRESET, "the peer process closed its side (it exited or was killed)");
    else if (n < 0 && errno != EAGAIN && errno != EINTR) fail(errno, std::string("the peer's socket failed: ") + std::strerror(errno));
    return;
  }
  if (cm_events) {
    try {
      while (auto event = cm_events->next(milliseconds(0))) {
        auto type = event->type();
        if (type == RDMA_CM_EVENT_DISCONNECTED || type == RDMA_CM_EVENT_DEVICE_REMOVAL ||
            type == RDMA_CM_EVENT_TIMEWAIT_EXIT || type == RDMA_CM_EVENT_UNREACHABLE ||
            type == RDMA_CM_EVENT_CONNECT_ERROR || type == RDMA_CM_EVENT_REJECTED)
          fail(ECONNRESET, "rdma_cm: " + event->describe());
      }
    } catch (const std::exception& e) {
      fail(EIO, e.what());
    }
  }
}

void Link::fail(int err, const std::string& why) noexcept {
  if (error) return;
  error = err;
  error_text = "link to " + peer + " failed: " + why;
  for (Connection* c : connections) {
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
  if (raw_qp) {
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_ERR;
    ibv_modify_qp(raw_qp, &attr, IBV_QP_STATE);
  }
  if (channel) ::shutdown(channel->native_fd(), SHUT_RDWR);
  if (cm_id) rdma_disconnect(cm_id->get());
  engine.poll_fds_stale = true;
}

void Link::post_receives(uint32_t count) {
  for (uint32_t i = 0; i < count; ++i) {
    ibv_recv_wr wr{};
    wr.wr_id = reinterpret_cast<uint64_t>(this) | kWrReceive;
    ibv_recv_wr* bad = nullptr;
    if (int rc = ibv_post_recv(raw_qp, &wr, &bad); rc != 0)
      throw Error(rc, "posting receives on the link to " + peer, engine.device_name);
  }
}

void Link::count_fault(wire::Fault fault, const char* where) noexcept {
  ++engine.faults[static_cast<int>(fault)];
  fail(EPROTO, std::string(where) + ": " + std::string(wire::to_string(fault)));
}

// ---- the engine --------------------------------------------------------------------

Engine::Impl::Impl(Options o) : options(resolve(std::move(o))) {
  if (options.bootstrap == Bootstrap::tcp) {
    verbs::DeviceList devices;
    if (devices.empty()) throw Error(ENODEV, verbs::no_device_message());
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
  // Rendezvous are RDMA READs: let as many be in flight as the device allows.
  ibv_device_attr device_attr{};
  if (int rc = ibv_query_device(device, &device_attr); rc != 0)
    throw Error(rc, "querying the device (ibv_query_device)", device_name);
  rd_atomic = static_cast<uint8_t>(std::clamp(std::min(device_attr.max_qp_rd_atom, device_attr.max_qp_init_rd_atom), 1, 128));
  pd.emplace(device);
  channel.emplace(device);
  cq.emplace(device, kCqEntries, &*channel);
  cache.emplace(*pd);
}

Engine::Engine(Options options) : impl_(std::make_unique<Impl>(std::move(options))) {}

Engine::~Engine() { impl_->shutdown(); }

void Engine::Impl::shutdown() noexcept {
  for (auto& link : links)
    for (Connection* c : link->connections)
      if (c->id_ != 0 && c->established_) c->close();
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
  try {
    retired.push_back(std::move(link));
  } catch (...) {
    // Out of memory here: leak the link rather than free what the CQ still names.
    (void)link.release();
  }
}

const std::string& Engine::device_name() const { return impl_->device_name; }
std::size_t Engine::qp_count() const { return impl_->links.size(); }
uint16_t Engine::listen_port() const { return impl_->port; }

EngineStats Engine::stats() const {
  EngineStats s;
  s.links = impl_->links.size();
  for (const auto& link : impl_->links) s.connections += link->connections.size() - 1;
  s.registrations = impl_->cache->misses();
  std::copy(std::begin(impl_->faults), std::end(impl_->faults), s.faults);
  return s;
}

RemoteRegion Engine::expose(void* address, std::size_t length) {
  const auto& mr = impl_->cache->get(address, length,
                                     IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ);
  return {reinterpret_cast<uint64_t>(address), length, mr.rkey()};
}

void Engine::forget(const void* address, std::size_t length) { impl_->cache->invalidate(address, length); }

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

Link& Engine::Impl::accept_tcp_link(oob::Channel ch) {
  if (links.size() >= kMaxLinks)
    throw Error(EMFILE, "accepting a link from " + ch.peer(), device_name,
                "an engine serves at most " + std::to_string(kMaxLinks) + " peers");
  auto link = std::make_unique<Link>(*this, ch.peer());
  wire::Fault fault{};
  auto frame = ch.receive(options.connect_timeout);
  auto hello = wire::decode_hello(frame, fault);
  if (!hello) {
    ++faults[static_cast<int>(fault)];
    throw Error(EPROTO, "reading the hello of " + ch.peer() + ": " + std::string(wire::to_string(fault)));
  }
  verbs::QueueCaps caps{kSendDepth, kRecvDepth, 1, 1, 64};
  link->qp.emplace(*pd, *cq, *cq, caps);
  link->raw_qp = link->qp->get();
  link->max_inline = link->qp->caps().max_inline_data;
  uint32_t psn = random_psn();
  verbs::ReliabilityParams rel = reliability();
  verbs::PathParams path{endpoint.port, static_cast<uint8_t>(endpoint.gid.index), true,
                         std::min(mtu, static_cast<ibv_mtu>(hello->mtu))};
  link->qp->to_init(endpoint.port);
  link->qp->to_rtr({hello->qp_num, hello->psn, hello->gid, hello->lid}, path, rel);
  prepare_link(*link);
  try {
    link->qp->to_rts(psn, rel);
    link->control().ring_->peer = hello->control;
    link->control().ring_->send = SendRing(hello->control.slots);
    link->control().established_ = true;
    wire::Hello mine{link->raw_qp->qp_num, psn, endpoint.gid.gid, 0, static_cast<uint8_t>(mtu),
                     link->control().ring_->info()};
    ch.send(wire::encode(mine));
  } catch (...) {
    retire(std::move(link));
    throw;
  }
  link->channel.emplace(std::move(ch));
  links.push_back(std::move(link));
  rebuild_poll_fds();
  return *links.back();
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
  auto link = std::make_unique<Link>(*this, peer);
  link->cm_events.emplace();
  link->cm_id.emplace(std::move(id));
  link->cm_id->set_ack_timeout(options.qp_timeout);
  verbs::QueueCaps caps{kSendDepth, kRecvDepth, 1, 1, 64};
  link->cm_qp.emplace(*link->cm_id, *pd, *cq, *cq, caps);
  link->raw_qp = link->cm_qp->get();
  link->max_inline = caps.max_inline_data;
  prepare_link(*link);
  try {
    link->control().ring_->peer = hello->control;
    link->control().ring_->send = SendRing(hello->control.slots);
    link->control().established_ = true;
    wire::Hello mine{};
    mine.mtu = static_cast<uint8_t>(mtu);
    mine.control = link->control().ring_->info();
    auto bytes = wire::encode(mine);
    link->cm_id->accept({.private_data = bytes, .responder_resources = rd_atomic, .initiator_depth = rd_atomic,
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
        rdma_cm_id* raw = link.cm_id->get();
        event.reset();  // acknowledged before the id moves to its own channel
        if (rdma_migrate_id(raw, link.cm_events->get()) != 0)
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

  auto link = std::make_unique<Link>(*this, key);
  try {
    set_up_link(*link, host, peer_port);
  } catch (...) {
    retire(std::move(link));
    throw;
  }
  Link& result = *link;
  links.push_back(std::move(link));
  links_by_peer[key] = &result;
  rebuild_poll_fds();
  return result;
}

void Engine::Impl::set_up_link(Link& link, const std::string& host, uint16_t peer_port) {
  const std::string& key = link.peer;
  verbs::QueueCaps caps{kSendDepth, kRecvDepth, 1, 1, 64};
  verbs::ReliabilityParams rel = reliability();
  wire::Fault fault{};
  if (options.bootstrap == Bootstrap::tcp) {
    auto ch = oob::Channel::connect(host, peer_port, options.connect_timeout);
    link.qp.emplace(*pd, *cq, *cq, caps);
    link.raw_qp = link.qp->get();
    link.max_inline = link.qp->caps().max_inline_data;
    link.qp->to_init(endpoint.port);
    uint32_t psn = random_psn();
    wire::Hello mine{link.raw_qp->qp_num, psn, endpoint.gid.gid, 0, static_cast<uint8_t>(mtu),
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
    link.qp->to_rtr({hello->qp_num, hello->psn, hello->gid, hello->lid}, path, rel);
    prepare_link(link);
    link.qp->to_rts(psn, rel);
    link.control().ring_->peer = hello->control;
    link.control().ring_->send = SendRing(hello->control.slots);
    link.channel.emplace(std::move(ch));
  } else {
    link.cm_events.emplace();
    link.cm_id.emplace(*link.cm_events);
    auto source = verbs::cm::SocketAddress::parse(options.local_address, 0);
    link.cm_id->resolve_address(*link.cm_events, verbs::cm::SocketAddress::parse(host, peer_port),
                                 options.connect_timeout, &source);
    link.cm_id->resolve_route(*link.cm_events, options.connect_timeout);
    if (link.cm_id->verbs() != device)
      throw Error(EXDEV, "the route to " + key + " leaves through " + verbs::device_name(link.cm_id->verbs()),
                  device_name, "give the engine the local address on that device");
    link.cm_id->set_ack_timeout(options.qp_timeout);
    link.cm_qp.emplace(*link.cm_id, *pd, *cq, *cq, caps);
    link.raw_qp = link.cm_qp->get();
    link.max_inline = caps.max_inline_data;
    prepare_link(link);
    wire::Hello mine{};
    mine.mtu = static_cast<uint8_t>(mtu);
    mine.control = link.control().ring_->info();
    auto bytes = wire::encode(mine);
    link.cm_id->connect({.private_data = bytes, .responder_resources = rd_atomic, .initiator_depth = rd_atomic,
                          .retry_count = std::min<uint8_t>(options.qp_retry_count, 7), .rnr_retry_count = 7});
    auto established = link.cm_events->expect(RDMA_CM_EVENT_ESTABLISHED, options.connect_timeout, key);
    auto hello = wire::decode_hello(established.private_data(), fault);
    if (!hello) {
      ++faults[static_cast<int>(fault)];
      throw Error(EPROTO, "reading the hello of " + key + ": " + std::string(wire::to_string(fault)));
    }
    link.control().ring_->peer = hello->control;
    link.control().ring_->send = SendRing(hello->control.slots);
  }
  link.control().established_ = true;
}

void Engine::Impl::rebuild_poll_fds() {
  poll_fds.clear();
  poll_fds.push_back({channel->fd(), POLLIN, 0});
  for (const auto& link : links) poll_fds.push_back({link->liveness_fd(), POLLIN, 0});
}

template <typename Done>
void Engine::Impl::wait_until(Done&& done, milliseconds timeout, const std::string& what, const std::string& peer) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (progress() > 0) continue;
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
