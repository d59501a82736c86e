#include "verbs/cm.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>

#include <cerrno>
#include <cstring>

#include "base/error.h"
#include "base/log.h"
#include "verbs/completion.h"
#include "verbs/memory.h"
#include "verbs/queue_pair.h"

namespace rxio::verbs::cm {
namespace {

// Reject reasons of the IB CM (IBTA 12.6.7.2) that rdma_cm passes up as the status.
std::string reject_reason(int status) {
  switch (status) {
    case 8: return "no listener on that port (invalid service ID)";
    case 28: return "refused by the peer application";
    default: return "reject reason " + std::to_string(status);
  }
}

}  // namespace

SocketAddress SocketAddress::parse(std::string_view ip, uint16_t port) {
  SocketAddress address;
  std::string text(ip);
  auto* in = reinterpret_cast<sockaddr_in*>(&address.storage);
  auto* in6 = reinterpret_cast<sockaddr_in6*>(&address.storage);
  if (inet_pton(AF_INET, text.c_str(), &in->sin_addr) == 1) {
    in->sin_family = AF_INET;
    in->sin_port = htons(port);
  } else if (inet_pton(AF_INET6, text.c_str(), &in6->sin6_addr) == 1) {
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(port);
  } else {
    throw Error(EINVAL, "parsing '" + text + "' as an IPv4 or IPv6 address");
  }
  return address;
}

std::string SocketAddress::to_string() const {
  char text[INET6_ADDRSTRLEN] = {};
  if (storage.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&storage);
    inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
    return std::string(text) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (storage.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&storage);
    inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
    return "[" + std::string(text) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  return "(address family " + std::to_string(storage.ss_family) + ")";
}

EventChannel::EventChannel() : channel_(rdma_create_event_channel()) {
  if (!channel_)
    throw Error(errno, "creating an rdma_cm event channel (rdma_create_event_channel)", {},
                "check that the rdma_ucm module is loaded and /dev/infiniband/rdma_cm exists");
  int flags = fcntl(channel_->fd, F_GETFL);
  if (flags < 0 || fcntl(channel_->fd, F_SETFL, flags | O_NONBLOCK) < 0)
    throw Error(errno, "making an rdma_cm event channel non-blocking");
}

std::optional<Event> EventChannel::next(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    rdma_cm_event* event = nullptr;
    if (rdma_get_cm_event(get(), &event) == 0) return Event(event);
    if (errno != EAGAIN && errno != EINTR) throw Error(errno, "reading an rdma_cm event");
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::nullopt;
    pollfd pfd{.fd = fd(), .events = POLLIN, .revents = 0};
    if (::poll(&pfd, 1, static_cast<int>(left.count())) < 0 && errno != EINTR)
      throw Error(errno, "waiting for an rdma_cm event");
  }
}

Event EventChannel::expect(rdma_cm_event_type expected, std::chrono::milliseconds timeout,
                           std::string_view peer) {
  std::string waiting_for = std::string("waiting for ") + rdma_event_str(expected);
  std::optional<Event> event = next(timeout);
  if (!event)
    throw Error(ETIMEDOUT, waiting_for + " (none within " + std::to_string(timeout.count()) + " ms)",
                peer, "check that the peer is running and its RDMA device is up");
  if (event->type() != expected)
    throw Error(event->type() == RDMA_CM_EVENT_REJECTED ? ECONNREFUSED : EHOSTUNREACH,
                waiting_for + ", got " + event->describe(), peer);
  return std::move(*event);
}

std::span<const std::byte> Event::private_data() const noexcept {
  const auto& conn = event_->param.conn;
  return {static_cast<const std::byte*>(conn.private_data), conn.private_data_len};
}

std::string Event::describe() const {
  std::string text = rdma_event_str(type());
  if (type() == RDMA_CM_EVENT_REJECTED) return text + " (" + reject_reason(status()) + ")";
  if (status() != 0) text += " (status " + std::to_string(status()) + ": " + std::strerror(-status()) + ")";
  return text;
}

void Id::Destroy::operator()(rdma_cm_id* id) const noexcept {
  if (rdma_destroy_id(id) != 0)
    log::warn(std::string("destroying an rdma_cm id failed: ") + std::strerror(errno));
}

Id::Id(EventChannel& channel, rdma_port_space space) {
  rdma_cm_id* id = nullptr;
  if (rdma_create_id(channel.get(), &id, nullptr, space) != 0)
    throw Error(errno, "creating an rdma_cm id (rdma_create_id)");
  id_.reset(id);
}

uint16_t Id::local_port() const noexcept { return ntohs(rdma_get_src_port(get())); }

void Id::set_ack_timeout(uint8_t timeout) {
  if (rdma_set_option(get(), RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &timeout, sizeof timeout) != 0)
    throw Error(errno, "setting the ack timeout (rdma_set_option)", where());
}

SocketAddress SocketAddress::of_peer(const Id& id) {
  SocketAddress address;
  if (const sockaddr* peer = rdma_get_peer_addr(id.get())) {
    std::size_t size = peer->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
    std::memcpy(&address.storage, peer, size);
  }
  return address;
}

std::string Id::where() const {
  return id_->verbs ? device_name(id_->verbs) : std::string("rdma_cm");
}

void Id::bind(const SocketAddress& address) {
  if (rdma_bind_addr(get(), const_cast<sockaddr*>(address.get())) != 0)
    throw Error(errno, "binding rdma_cm to " + address.to_string() + " (rdma_bind_addr)", {},
                errno == EADDRNOTAVAIL || errno == ENODEV
                    ? "no RDMA device is attached to the interface with that address"
                    : "");
}

void Id::listen(int backlog) {
  if (rdma_listen(get(), backlog) != 0)
    throw Error(errno, "listening (rdma_listen)", where());
}

void Id::resolve_address(EventChannel& channel, const SocketAddress& destination,
                         std::chrono::milliseconds timeout, const SocketAddress* source) {
  if (rdma_resolve_addr(get(), source ? const_cast<sockaddr*>(source->get()) : nullptr,
                        const_cast<sockaddr*>(destination.get()),
                        static_cast<int>(timeout.count())) != 0)
    throw Error(errno, "resolving the RDMA address (rdma_resolve_addr)", destination.to_string());
  channel.expect(RDMA_CM_EVENT_ADDR_RESOLVED, timeout * 2, destination.to_string());
}

void Id::resolve_route(EventChannel& channel, std::chrono::milliseconds timeout) {
  if (rdma_resolve_route(get(), static_cast<int>(timeout.count())) != 0)
    throw Error(errno, "resolving the RDMA route (rdma_resolve_route)", where(),
                "rdma_cm needs an RDMA device on a real network interface, not on lo");
  channel.expect(RDMA_CM_EVENT_ROUTE_RESOLVED, timeout * 2, where());
}

QueuePair::QueuePair(Id& id, const ProtectionDomain& pd, CompletionQueue& send_cq,
                     CompletionQueue& recv_cq, const QueueCaps& caps) {
  ibv_qp_init_attr attr{};
  attr.send_cq = send_cq.get();
  attr.recv_cq = recv_cq.get();
  attr.qp_type = IBV_QPT_RC;
  attr.cap.max_send_wr = caps.max_send_wr;
  attr.cap.max_recv_wr = caps.max_recv_wr;
  attr.cap.max_send_sge = caps.max_send_sge;
  attr.cap.max_recv_sge = caps.max_recv_sge;
  attr.cap.max_inline_data = caps.max_inline_data;
  if (rdma_create_qp(id.get(), pd.get(), &attr) != 0) {
    int err = errno;
    throw Error(err, "creating the QP of an rdma_cm id (rdma_create_qp)", device_name(pd.context()),
                memlock_fix(err, 0));
  }
  id_.reset(id.get());
}

namespace {
rdma_conn_param to_conn_param(const ConnectParams& params) {
  rdma_conn_param conn{};
  conn.private_data = params.private_data.data();
  conn.private_data_len = static_cast<uint8_t>(params.private_data.size());
  conn.responder_resources = params.responder_resources;
  conn.initiator_depth = params.initiator_depth;
  conn.retry_count = params.retry_count;
  conn.rnr_retry_count = params.rnr_retry_count;
  conn.qp_num = params.qp_num;
  return conn;
}

void check_private_data(std::span<const std::byte> data, std::size_t limit, const char* what) {
  if (data.size() > limit)
    throw Error(EINVAL, std::string(what) + " with " + std::to_string(data.size()) +
                            " bytes of private data (at most " + std::to_string(limit) + ")");
}
}  // namespace

void Id::connect(const ConnectParams& params) {
  check_private_data(params.private_data, 56, "connecting");
  rdma_conn_param conn = to_conn_param(params);
  if (rdma_connect(get(), &conn) != 0) throw Error(errno, "connecting (rdma_connect)", where());
}

void Id::accept(const ConnectParams& params) {
  check_private_data(params.private_data, 196, "accepting");
  rdma_conn_param conn = to_conn_param(params);
  if (rdma_accept(get(), &conn) != 0) throw Error(errno, "accepting (rdma_accept)", where());
}

void Id::reject(std::span<const std::byte> private_data) {
  check_private_data(private_data, 148, "rejecting");
  if (rdma_reject(get(), private_data.data(), static_cast<uint8_t>(private_data.size())) != 0)
    throw Error(errno, "rejecting (rdma_reject)", where());
}

void Id::disconnect() {
  if (rdma_disconnect(get()) != 0) throw Error(errno, "disconnecting (rdma_disconnect)", where());
}

}  // namespace rxio::verbs::cm
