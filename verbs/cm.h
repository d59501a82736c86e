// rdma_cm: event channels, ids, and connection set-up with private data.
#pragma once

#include <rdma/rdma_cma.h>
#include <sys/socket.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace rxio::verbs {
class CompletionQueue;
class ProtectionDomain;
struct QueueCaps;
}  // namespace rxio::verbs

namespace rxio::verbs::cm {

// An IPv4 or IPv6 address with a port, parsed from text.
struct SocketAddress {
  sockaddr_storage storage{};

  static SocketAddress parse(std::string_view ip, uint16_t port);
  static SocketAddress of_peer(const class Id& id);
  const sockaddr* get() const noexcept { return reinterpret_cast<const sockaddr*>(&storage); }
  sockaddr* get() noexcept { return reinterpret_cast<sockaddr*>(&storage); }
  std::string to_string() const;  // "192.0.2.1:7471", "[fe80::1]:7471"
};

class Event;

class EventChannel {
 public:
  EventChannel();

  rdma_event_channel* get() const noexcept { return channel_.get(); }
  int fd() const noexcept { return channel_->fd; }

  // The next event, or nullopt after `timeout` without one.
  std::optional<Event> next(std::chrono::milliseconds timeout);
  // The next event, which must be of type `expected`; otherwise throws rxio::Error
  // saying what came instead (a reject with its reason, an unreachable peer, a timeout).
  Event expect(rdma_cm_event_type expected, std::chrono::milliseconds timeout,
               std::string_view peer);

 private:
  struct Destroy {
    void operator()(rdma_event_channel* channel) const noexcept { rdma_destroy_event_channel(channel); }
  };
  std::unique_ptr<rdma_event_channel, Destroy> channel_;
};

// One rdma_cm event, acknowledged when this object goes away. An id cannot be
// destroyed while events naming it are unacknowledged, so keep Events short-lived.
class Event {
 public:
  explicit Event(rdma_cm_event* event) noexcept : event_(event) {}

  rdma_cm_event_type type() const noexcept { return event_->event; }
  int status() const noexcept { return event_->status; }
  rdma_cm_id* id() const noexcept { return event_->id; }
  rdma_cm_id* listen_id() const noexcept { return event_->listen_id; }
  std::span<const std::byte> private_data() const noexcept;
  std::string describe() const;

 private:
  struct Ack {
    void operator()(rdma_cm_event* event) const noexcept { rdma_ack_cm_event(event); }
  };
  std::unique_ptr<rdma_cm_event, Ack> event_;
};

struct ConnectParams {
  std::span<const std::byte> private_data;  // at most 56 bytes on connect, 196 on accept
  uint8_t responder_resources = 16;
  uint8_t initiator_depth = 16;
  uint8_t retry_count = 7;
  uint8_t rnr_retry_count = 7;
  uint32_t qp_num = 0;  // connect without a QP of the id's own: the number the peer is told
};

class Id {
 public:
  explicit Id(EventChannel& channel, rdma_port_space space = RDMA_PS_TCP);
  // Takes ownership of the id a CONNECT_REQUEST event carries.
  static Id adopt(rdma_cm_id* id) noexcept { return Id(id); }

  rdma_cm_id* get() const noexcept { return id_.get(); }
  // The device the id is bound to, once an address is bound or resolved.
  ibv_context* verbs() const noexcept { return id_->verbs; }
  uint16_t local_port() const noexcept;
  // RC ack timeout exponent for the QP rdma_cm will set up (4.096 us * 2^timeout).
  void set_ack_timeout(uint8_t timeout);

  void bind(const SocketAddress& address);
  void listen(int backlog);
  // Each waits on `channel` for its completion event.
  void resolve_address(EventChannel& channel, const SocketAddress& destination,
                       std::chrono::milliseconds timeout, const SocketAddress* source = nullptr);
  void resolve_route(EventChannel& channel, std::chrono::milliseconds timeout);
  // Starts connecting; ESTABLISHED, REJECTED or UNREACHABLE follows on the channel.
  void connect(const ConnectParams& params);
  void accept(const ConnectParams& params);
  void reject(std::span<const std::byte> private_data);
  void disconnect();

 private:
  explicit Id(rdma_cm_id* id) noexcept : id_(id) {}
  struct Destroy {
    void operator()(rdma_cm_id* id) const noexcept;
  };
  std::string where() const;

  std::unique_ptr<rdma_cm_id, Destroy> id_;
};

// The RC QP of an id, which rdma_cm drives through its states on connect and accept.
// Destroy it before its Id, and before the PD and CQs it was made from (declare it
// after them).
class QueuePair {
 public:
  QueuePair(Id& id, const ProtectionDomain& pd, CompletionQueue& send_cq, CompletionQueue& recv_cq,
            const QueueCaps& caps);

  ibv_qp* get() const noexcept { return id_->qp; }
  int post_send(ibv_send_wr* wr, ibv_send_wr** bad) noexcept { return ibv_post_send(get(), wr, bad); }
  int post_recv(ibv_recv_wr* wr, ibv_recv_wr** bad) noexcept { return ibv_post_recv(get(), wr, bad); }

 private:
  struct Destroy {
    void operator()(rdma_cm_id* id) const noexcept { rdma_destroy_qp(id); }
  };
  std::unique_ptr<rdma_cm_id, Destroy> id_;
};

}  // namespace rxio::verbs::cm
