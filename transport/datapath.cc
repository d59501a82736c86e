// The data path: slots, credits, tag matching, rendezvous, one-sided operations and
// progress. Nothing here allocates, locks or throws; failures become statuses.
#include <arpa/inet.h>
#include <poll.h>
#include <sys/epoll.h>

#include <algorithm>
#include <cstring>

#include "base/bytes.h"
#include "transport/link.h"

namespace rxio::transport {
namespace {

bool matches(uint64_t wanted, uint64_t tag) { return wanted == kAnyTag || wanted == tag; }

// Sends stay below this many outstanding work requests, so that credit returns, reads
// and writes always find room.
constexpr uint32_t kSendQueueReserve = 16;

}  // namespace

// ---- posting -----------------------------------------------------------------------

void Link::push(RequestList& list, Request& r) noexcept {
  r.next_ = nullptr;
  if (list.tail) list.tail->next_ = &r;
  else list.head = &r;
  list.tail = &r;
}

Request* Link::pop(RequestList& list) noexcept {
  Request* r = list.head;
  if (r) {
    list.head = r->next_;
    if (!list.head) list.tail = nullptr;
    r->next_ = nullptr;
  }
  return r;
}

void Link::complete(Request& r, Status status, std::size_t bytes) noexcept {
  r.bytes_ = bytes;
  r.status_ = status;
}


uint32_t Link::eager_limit(const Connection::Ring& r, uint32_t configured) noexcept {
  return std::min<uint32_t>(configured, r.peer.slot_size - wire::kSlotHeaderSize);
}

bool Link::can_post_slot(Connection& c) const noexcept {
  return !error && c.established_ && c.ring_->send.credits() > 0 &&
         sq_used + kSendQueueReserve < sq_depth && staging_next - staging_done < staging_slots;
}

void Link::post_slot(Connection& c, wire::SlotKind kind, uint64_t tag,
                     std::span<const std::byte> payload) noexcept {
  write_entries(c);  // rendezvous requests sent before this slot stay before it
  Connection::Ring& r = *c.ring_;
  const uint32_t stage_size = engine.options.slot_size;
  std::byte* stage = staging->data() + std::size_t(staging_next % staging_slots) * stage_size;
  wire::encode(wire::SlotHeader{kind, static_cast<uint32_t>(payload.size()), tag}, stage);
  if (!payload.empty()) std::memcpy(stage + wire::kSlotHeaderSize, payload.data(), payload.size());
  const uint32_t length = static_cast<uint32_t>(wire::kSlotHeaderSize + payload.size());
  const uint32_t slot = r.send.take();

  ibv_sge sge{reinterpret_cast<uint64_t>(stage), length, staging->keys().lkey};
  if (!post_write_imm(kWrSlot, &sge, r.peer.address + uint64_t(slot) * r.peer.slot_size, r.peer.rkey,
                      wire::Imm{wire::ImmType::slot, c.peer_id_, 0}, "a slot"))
    return;
  ++staging_next;
  if (++slots_written == engine.options.fault_link_after &&
      (engine.options.fault_links == 0 || engine.faulted_links++ < engine.options.fault_links))
    fail(EIO, "fault injected (RXIO_FAULT_LINK_AFTER=" + std::to_string(slots_written) + ")");
}

bool Link::post_write_imm(uint64_t kind, ibv_sge* sge, uint64_t remote, uint32_t rkey, const wire::Imm& imm,
                          const char* what) noexcept {
  ibv_send_wr wr{};
  wr.wr_id = reinterpret_cast<uint64_t>(this) | kind;
  wr.sg_list = sge;
  wr.num_sge = sge ? 1 : 0;
  wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
  wr.send_flags = IBV_SEND_SIGNALED | (sge && sge->length <= port->max_inline() ? IBV_SEND_INLINE : 0);
  wr.imm_data = htonl(wire::encode(imm));
  wr.wr.rdma.remote_addr = remote;
  wr.wr.rdma.rkey = rkey;
  if (int rc = port->post_send(wr); rc != 0) {
    fail(rc, std::string("posting ") + what + " failed: " + std::strerror(rc));
    return false;
  }
  ++sq_used;
  return true;
}

void Link::post_imm(Connection& c, wire::ImmType type, uint8_t value) noexcept {
  // A zero-length write: it carries only the immediate, needs no credit and touches no
  // memory at the peer.
  post_write_imm(kWrLink, nullptr, c.ring_->peer.address, c.ring_->peer.rkey, wire::Imm{type, c.peer_id_, value},
                 "an immediate");
}

void Link::return_credits(Connection& c, bool force) noexcept {
  Connection::Ring& r = *c.ring_;
  uint32_t threshold = std::max<uint32_t>(1, r.recv.slots() / 2);
  // Once released, the peer needs no credit: it sends nothing more.
  if (error || c.release_queued_ || r.recv.unreturned() == 0 || (!force && r.recv.unreturned() < threshold)) return;
  if (sq_used >= sq_depth) {
    mark_waiting(c);  // retried when the send queue drains
    return;
  }
  post_imm(c, wire::ImmType::credit, static_cast<uint8_t>(r.recv.take_unreturned(255)));
}

void Link::post_request(Request& q) noexcept {
  if (error) {
    complete(q, Status::failed, 0);
    return;
  }
  if (sq_used >= sq_depth) {
    push(deferred, q);
    return;
  }
  try {
    const Keys keys = port->keys_for(q.buffer_, q.capacity_, IBV_ACCESS_LOCAL_WRITE);
    ibv_sge sge{reinterpret_cast<uint64_t>(q.buffer_), static_cast<uint32_t>(q.capacity_), keys.lkey};
    // A rendezvous writes its data with a plain RDMA WRITE: large writes with
    // immediate take Soft-RoCE's slower receive-queue path. The `written` entry that
    // follows on the same QP lands after the data.
    ibv_send_wr wr{};
    wr.wr_id = reinterpret_cast<uint64_t>(&q) | kWrRequest;
    wr.sg_list = &sge;
    wr.num_sge = q.capacity_ ? 1 : 0;
    wr.opcode = q.op_ == Request::Op::read ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = q.remote_address_;
    wr.wr.rdma.rkey = q.rkey_;
    if (int rc = port->post_send(wr); rc != 0) {
      fail(rc, std::string("posting an RDMA operation failed: ") + std::strerror(rc));
      complete(q, Status::failed, 0);
      return;
    }
    ++sq_used;
    if (q.op_ == Request::Op::send) {
      stage(*q.connection_, {wire::RndvKind::written, q.rndv_id_});
      mark_waiting(*q.connection_);
    }
  } catch (const std::exception& e) {
    // Registration failed (the message says why, e.g. the memlock limit).
    q.connection_->error_text_ = e.what();
    complete(q, Status::failed, 0);
  }
}

void Link::mark_waiting(Connection& c) noexcept {
  if (c.ring_->waiting || error) return;
  c.ring_->waiting = true;
  waiting.push_back(&c);
}

void Link::stage(Connection& c, const wire::RndvEntry& entry) noexcept {
  Connection::Ring& r = *c.ring_;
  const std::size_t at = std::size_t(r.rndv_out_staged % wire::kRndvQueueEntries) * wire::kRndvEntrySize;
  wire::encode(entry, r.rndv_out->data() + at);
  ++r.rndv_out_staged;
}

void Link::write_entries(Connection& c) noexcept {
  Connection::Ring& r = *c.ring_;
  while (r.rndv_out_written < r.rndv_out_staged && !error && sq_used < sq_depth) {
    // One write per run that does not wrap around the peer's queue.
    const uint32_t first = static_cast<uint32_t>(r.rndv_out_written % wire::kRndvQueueEntries);
    const uint32_t count = static_cast<uint32_t>(std::min<uint64_t>(
        {r.rndv_out_staged - r.rndv_out_written, wire::kMaxRndvBatch, wire::kRndvQueueEntries - first}));
    const uint64_t offset = uint64_t(first) * wire::kRndvEntrySize;
    const uint32_t length = static_cast<uint32_t>(count * wire::kRndvEntrySize);
    ibv_sge sge{reinterpret_cast<uint64_t>(r.rndv_out->data()) + offset, length, r.rndv_out->keys().lkey};
    if (!post_write_imm(kWrLink, &sge, r.peer_rndv.address + offset, r.peer_rndv.rkey,
                        wire::Imm{wire::ImmType::rndv, c.peer_id_, static_cast<uint8_t>(count)}, "rendezvous entries"))
      return;
    r.rndv_out_written += count;
  }
}

void Link::drain(Connection& c, bool write) noexcept {
  Connection::Ring& r = *c.ring_;
  if (c.id_ == 0) {
    std::size_t sent = 0;
    while (sent < replies_to_send.size() && can_post_slot(c)) {
      std::array<std::byte, wire::kConnectReplySize> payload;
      wire::encode(replies_to_send[sent++], payload.data());
      post_slot(c, wire::SlotKind::accept, 0, payload);
    }
    replies_to_send.erase(replies_to_send.begin(), replies_to_send.begin() + static_cast<std::ptrdiff_t>(sent));
    sent = 0;
    while (sent < releases_to_send.size() && can_post_slot(c)) {
      Connection& done = *releases_to_send[sent++];
      std::array<std::byte, wire::kReleaseSize> payload;
      bytes::put32(payload.data(), done.peer_id_);
      post_slot(c, wire::SlotKind::release, 0, payload);
      done.release_sent_ = true;
      if (done.peer_released_) to_free.push_back(&done);
    }
    releases_to_send.erase(releases_to_send.begin(), releases_to_send.begin() + static_cast<std::ptrdiff_t>(sent));
  }
  const uint32_t limit = eager_limit(r, engine.options.eager_limit);
  while (!r.sends.empty() && !error) {
    Request& q = *r.sends.head;
    if (q.capacity_ <= limit) {
      if (!can_post_slot(c)) break;
      post_slot(c, wire::SlotKind::eager, q.tag_, {q.buffer_, q.capacity_});
      pop(r.sends);
      complete(q, Status::ok, q.capacity_);
      continue;
    }
    auto free_id = std::find(r.rndv_sends.begin(), r.rndv_sends.end(), nullptr);
    if (free_id == r.rndv_sends.end()) break;  // as many large sends in flight as ids
    pop(r.sends);
    try {
      // Registered now, so that a failure shows here and the write later cannot fail.
      port->keys_for(q.buffer_, q.capacity_, IBV_ACCESS_LOCAL_WRITE);
    } catch (const std::exception& e) {
      c.error_text_ = e.what();
      complete(q, Status::failed, 0);
      continue;
    }
    const uint32_t id = static_cast<uint32_t>(free_id - r.rndv_sends.begin());
    *free_id = &q;
    q.rndv_id_ = id;
    stage(c, {wire::RndvKind::request, id, q.capacity_, q.tag_});
  }
  if (r.close_to_send && r.sends.empty() && can_post_slot(c)) {
    r.close_to_send = false;
    post_slot(c, wire::SlotKind::close, 0, {});
    release_when_done(c);
  }
  return_credits(c, false);
  if (write) write_entries(c);
  bool more = !r.sends.empty() || r.close_to_send || r.rndv_out_written != r.rndv_out_staged ||
              (c.id_ == 0 && (!replies_to_send.empty() || !releases_to_send.empty()));
  if (more && !error) mark_waiting(c);
}

void Link::drain_waiting() noexcept {
  while (Request* q = (sq_used + 2 <= sq_depth ? pop(deferred) : nullptr)) post_request(*q);
  // Connections drained now may list themselves again: drain a swapped-out list. Both
  // vectors hold at most every connection once, and their capacity was reserved.
  draining.swap(waiting);
  for (Connection* c : draining) c->ring_->waiting = false;
  for (Connection* c : draining) drain(*c, true);
  draining.clear();
  if (!to_free.empty()) free_released();
}

void Link::release_when_done(Connection& c) noexcept {
  const Connection::Ring& r = *c.ring_;
  if (!c.released_ || c.release_queued_ || error || !c.established_ || !c.closed_ || !c.peer_closed_ ||
      r.close_to_send || !r.sends.empty() || r.rndv_out_written != r.rndv_out_staged ||
      std::any_of(r.rndv_sends.begin(), r.rndv_sends.end(), [](const Request* q) { return q != nullptr; }))
    return;
  c.release_queued_ = true;
  releases_to_send.push_back(&c);
  mark_waiting(control());
}

void Link::free_released() noexcept {
  for (Connection* c : to_free) {
    std::erase(waiting, c);
    free_ids.push_back(c->id_);
    connections[c->id_] = nullptr;
    owned[c->id_].reset();  // its rings go back to the port
  }
  to_free.clear();
}

// ---- arrivals ----------------------------------------------------------------------

Request* Link::take_posted(Connection::Ring& r, uint64_t tag) noexcept {
  Request* prev = nullptr;
  for (Request* q = r.posted.head; q; prev = q, q = q->next_) {
    if (!matches(q->tag_, tag)) continue;
    if (prev) prev->next_ = q->next_;
    else r.posted.head = q->next_;
    if (r.posted.tail == q) r.posted.tail = prev;
    q->next_ = nullptr;
    return q;
  }
  return nullptr;
}

void Link::deliver(Connection& c, const Arrival& arrival, Request& q) noexcept {
  Connection::Ring& r = *c.ring_;
  q.tag_ = arrival.tag();
  if (!arrival.rndv) {
    const std::byte* payload = r.slot(arrival.seq) + wire::kSlotHeaderSize;
    std::size_t n = std::min<std::size_t>(arrival.header.length, q.capacity_);
    std::memcpy(q.buffer_, payload, n);
    r.recv.release(arrival.seq);
    complete(q, arrival.header.length > q.capacity_ ? Status::truncated : Status::ok, arrival.header.length);
    return;
  }
  const wire::RndvEntry& rndv = *arrival.rndv;
  if (r.rndv_recvs[rndv.id]) {
    complete(q, Status::failed, 0);
    count_fault(wire::Fault::bad_rendezvous, "a rendezvous request reusing a busy id");
    return;
  }
  mark_waiting(c);  // the answer goes out when the link next drains
  // The peer writes what fits; a larger message leaves the buffer holding its start.
  const std::size_t length = std::min<std::size_t>(q.capacity_, rndv.size);
  if (length > max_message) {
    complete(q, Status::failed, 0);
    stage(c, {wire::RndvKind::failed, rndv.id});
    return;
  }
  try {
    q.rkey_ = port->keys_for(q.buffer_, length, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE).rkey;
  } catch (const std::exception& e) {
    c.error_text_ = e.what();
    complete(q, Status::failed, 0);
    stage(c, {wire::RndvKind::failed, rndv.id});
    return;
  }
  q.rndv_id_ = rndv.id;
  q.bytes_ = rndv.size;
  q.capacity_ = length;
  r.rndv_recvs[rndv.id] = &q;
  wire::RndvEntry ready{wire::RndvKind::ready, rndv.id};
  ready.target = {reinterpret_cast<uint64_t>(q.buffer_), q.rkey_, static_cast<uint32_t>(length)};
  stage(c, ready);
}

void Link::on_rndv_entries(Connection& c, uint32_t count) noexcept {
  Connection::Ring& r = *c.ring_;
  if (c.id_ == 0) return count_fault(wire::Fault::bad_connection, "rendezvous entries");
  if (count == 0) return count_fault(wire::Fault::bad_length, "rendezvous entries");
  for (uint32_t i = 0; i < count && !error; ++i) {
    // A copy: the peer may rewrite its entries at any time.
    std::array<std::byte, wire::kRndvEntrySize> entry;
    const std::size_t at = std::size_t(r.rndv_in_next++ % wire::kRndvQueueEntries) * wire::kRndvEntrySize;
    std::memcpy(entry.data(), r.rndv_in->data() + at, entry.size());
    wire::Fault fault{};
    auto decoded = wire::decode_rndv_entry(entry, fault);
    if (!decoded) return count_fault(fault, "a rendezvous entry");
    on_rndv_entry(c, *decoded);
  }
}

void Link::on_rndv_entry(Connection& c, const wire::RndvEntry& entry) noexcept {
  Connection::Ring& r = *c.ring_;
  switch (entry.kind) {
    case wire::RndvKind::request: {
      Arrival arrival{0, {}, entry};
      if (Request* q = take_posted(r, entry.tag)) return deliver(c, arrival, *q);
      if (r.unexpected.full()) return count_fault(wire::Fault::bad_rendezvous, "more rendezvous requests than ids");
      r.unexpected.push(arrival);
      return;
    }
    case wire::RndvKind::ready:
    case wire::RndvKind::failed: {
      Request* q = r.rndv_sends[entry.id];
      if (!q || q->answered_) return count_fault(wire::Fault::bad_rendezvous, "a rendezvous answer");
      if (entry.kind == wire::RndvKind::failed) {
        r.rndv_sends[entry.id] = nullptr;
        complete(*q, Status::failed, 0);
        mark_waiting(c);  // a rendezvous id is free again
        return;
      }
      q->answered_ = true;
      q->capacity_ = std::min<std::size_t>(entry.target.length, q->capacity_);
      q->remote_address_ = entry.target.address;
      q->rkey_ = entry.target.rkey;
      post_request(*q);
      return;
    }
    case wire::RndvKind::written: {
      Request* q = r.rndv_recvs[entry.id];
      if (!q) return count_fault(wire::Fault::bad_rendezvous, "a rendezvous write");
      r.rndv_recvs[entry.id] = nullptr;
      port->release(q->rkey_);
      complete(*q, q->bytes_ > q->capacity_ ? Status::truncated : Status::ok, q->bytes_);
      return;
    }
  }
}

void Link::on_control(const wire::SlotHeader& header, std::span<const std::byte> payload) noexcept {
  wire::Fault fault{};
  if (header.kind == wire::SlotKind::connect) {
    auto request = wire::decode_connect_request(payload, fault);
    if (!request) return count_fault(fault, "a connect request");
    try {
      Connection& c = add_connection();
      c.peer_id_ = request->connection;
      c.ring_->peer = request->ring;
      c.ring_->send = SendRing(request->ring.slots);
      c.ring_->peer_rndv = request->rndv;
      c.established_ = true;
      replies_to_send.push_back({c.id_, request->connection, c.ring_->info(), c.ring_->rndv_info()});
      engine.accepted.push_back(&c);
      mark_waiting(control());
    } catch (const std::exception& e) {
      fail(ENOMEM, std::string("accepting a connection: ") + e.what());
    }
    return;
  }
  if (header.kind == wire::SlotKind::accept) {
    auto reply = wire::decode_connect_reply(payload, fault);
    if (!reply) return count_fault(fault, "a connect reply");
    if (reply->peer_connection == 0 || reply->peer_connection >= connections.size() ||
        !connections[reply->peer_connection] || connections[reply->peer_connection]->established_)
      return count_fault(wire::Fault::bad_connection, "a connect reply");
    Connection& c = *connections[reply->peer_connection];
    c.peer_id_ = reply->connection;
    c.ring_->peer = reply->ring;
    c.ring_->send = SendRing(reply->ring.slots);
    c.ring_->peer_rndv = reply->rndv;
    c.established_ = true;
    return;
  }
  if (header.kind == wire::SlotKind::release) {
    uint32_t id = bytes::get32(payload.data());
    if (id == 0 || id >= connections.size() || !connections[id] || !connections[id]->peer_closed_ ||
        connections[id]->peer_released_)
      return count_fault(wire::Fault::bad_connection, "a release");
    Connection& c = *connections[id];
    c.peer_released_ = true;
    if (c.release_sent_) {
      to_free.push_back(&c);
      mark_waiting(control());  // freed when the link next drains
    }
    return;
  }
  count_fault(wire::Fault::bad_kind, "the control connection");
}

void Link::on_arrival(const ibv_wc& wc) noexcept {
  if (error) return;  // torn down: what still arrives is not trusted
  if (int rc = port->post_recv(reinterpret_cast<uint64_t>(this) | kWrReceive); rc != 0)
    return fail(rc, std::string("re-posting a receive failed: ") + std::strerror(rc));

  wire::Fault fault{};
  auto imm = wire::decode_imm(ntohl(wc.imm_data), fault);
  if (!imm) return count_fault(fault, "immediate data");
  if (imm->connection >= connections.size() || !connections[imm->connection])
    return count_fault(wire::Fault::bad_connection, "immediate data");
  Connection& c = *connections[imm->connection];
  Connection::Ring& r = *c.ring_;
  if (imm->type == wire::ImmType::credit) {
    if (!r.send.give_back(imm->value)) return count_fault(wire::Fault::credit_overflow, "a credit return");
    mark_waiting(c);
    return;
  }
  if (imm->type == wire::ImmType::rndv) return on_rndv_entries(c, imm->value);
  uint64_t seq = 0;
  if (!r.recv.arrive(seq)) return count_fault(wire::Fault::ring_overflow, "a slot write");
  auto header = wire::decode_slot_header({r.slot(seq), r.slot_size}, r.slot_size - wire::kSlotHeaderSize, fault);
  if (!header) return count_fault(fault, "a slot header");
  std::span<const std::byte> payload{r.slot(seq) + wire::kSlotHeaderSize, header->length};
  const Arrival arrival{seq, *header};

  if (c.id_ == 0) {
    on_control(*header, payload);
    r.recv.release(seq);
    return_credits(c, false);
    return;
  }
  switch (header->kind) {
    case wire::SlotKind::eager:
      if (Request* q = take_posted(r, header->tag)) {
        deliver(c, arrival, *q);
        return_credits(c, false);
        return;
      }
      r.unexpected.push(arrival);
      return;
    case wire::SlotKind::stream:
      r.stream.push(arrival);
      ++c.stream_events_;
      return;
    case wire::SlotKind::close:
      r.recv.release(seq);
      c.peer_closed_ = true;
      ++c.stream_events_;
      // Anything sent before the close has been matched already: what still waits
      // will never be matched.
      while (Request* q = pop(r.posted)) complete(*q, Status::closed, 0);
      return_credits(c, false);
      release_when_done(c);
      return;
    default:
      count_fault(wire::Fault::bad_kind, "a data connection");
  }
}

void Link::on_send_completion(const ibv_wc& wc) noexcept {
  --sq_used;
  if ((wc.wr_id & kWrKindMask) == kWrSlot) ++staging_done;
}

void Link::on_request_completion(Request& request) noexcept {
  --sq_used;
  Connection& c = *request.connection_;
  if (request.op_ == Request::Op::send) {  // a rendezvous write landed
    c.ring_->rndv_sends[request.rndv_id_] = nullptr;
    mark_waiting(c);  // a rendezvous id is free again
  }
  complete(request, Status::ok, request.capacity_);
}

void Link::on_failed_completion(const ibv_wc& wc, Request* request) noexcept {
  if ((wc.wr_id & kWrKindMask) != kWrReceive) --sq_used;
  if (request) complete(*request, Status::failed, 0);
  fail(EIO, std::string("a work request completed with ") + ibv_wc_status_str(wc.status) + " (vendor error " +
                std::to_string(wc.vendor_err) + ")");
}

// ---- progress ----------------------------------------------------------------------

void Engine::Impl::handle(const ibv_wc& wc, Link* port_link) noexcept {
  ++handled_count;
  const uint64_t kind = wc.wr_id & kWrKindMask;
  Request* request = kind == kWrRequest ? reinterpret_cast<Request*>(wc.wr_id) : nullptr;
  Link& link = port_link ? *port_link
                         : request ? Link::of(*request) : *reinterpret_cast<Link*>(wc.wr_id & ~kWrKindMask);
  if (wc.status != IBV_WC_SUCCESS) return link.on_failed_completion(wc, request);
  if (kind == kWrReceive) link.on_arrival(wc);
  else if (request) link.on_request_completion(*request);
  else link.on_send_completion(wc);
}

int Engine::Impl::poll_cq() noexcept {
  ibv_wc wcs[32];
  int total = 0;
  if (cq) {
    int n = cq->poll(wcs);
    for (int i = 0; i < n; ++i) handle(wcs[i], nullptr);
    total += std::max(n, 0);
  }
  // Software ports (shm, tcp) report per link; a verbs port returns nothing here.
  for (std::size_t l = 0; l < links.size(); ++l) {
    Link& link = *links[l];
    int n = link.port->poll(wcs);
    for (int i = 0; i < n; ++i) handle(wcs[i], &link);
    total += n;
  }
  return total;
}

int Engine::Impl::progress() noexcept {
  int n = poll_cq();
  for (auto& link : links)
    if (!link->waiting.empty() || !link->deferred.empty()) link->drain_waiting();
  // Callers that only poll (the stream API, a program that spins on a non-blocking
  // read, or asks FIONREAD now and then) must still learn that a peer went away: a look
  // at every 64th idle poll, at most every 10 ms.
  if (n == 0 && ++idle_polls % 64 == 0) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= next_liveness_check) {
      next_liveness_check = now + std::chrono::milliseconds(10);
      n += check_links(0);
    }
  }
  return n;
}

int Engine::Impl::check_links(int timeout_ms) noexcept {
  if (poll_fds_stale) rebuild_poll_fds();
  int ready = ::poll(poll_fds.data(), poll_fds.size(), timeout_ms);
  if (ready <= 0) return 0;
  for (std::size_t i = 0; i < poll_fds.size(); ++i)
    if (poll_fds[i].revents && watches[i].kind == Watch::completions) cq->wait(std::chrono::milliseconds(0));
  // Arrivals first: a departing peer's last messages precede its EOF.
  int handled = 0;
  for (int n; (n = poll_cq()) > 0;) handled += n;
  for (std::size_t i = 0; i < poll_fds.size(); ++i) {
    if (!poll_fds[i].revents) continue;
    if (watches[i].kind == Watch::liveness) watches[i].link->check_liveness();
    if (watches[i].kind == Watch::device_events) read_device_events();
  }
  return handled;
}

void Engine::Impl::block(std::chrono::milliseconds timeout) noexcept {
  // Arm, then look once more: what came in between must not wait for the timeout.
  if (cq && cq->arm() != 0) return;
  if (progress() > 0) return;
  for (auto& link : links)
    if (!link->error && !link->port->arm()) return;
  if (poll_fds_stale) rebuild_poll_fds();
  for (std::size_t i = 0; i < poll_fds.size(); ++i)
    if (watches[i].kind == Watch::wake) poll_fds[i].events = watches[i].link->port->wake_events();
  check_links(static_cast<int>(timeout.count()));
}

int Engine::progress() noexcept { return impl_->progress(); }

uint64_t Engine::handled() const noexcept { return impl_->handled_count; }

uint64_t Engine::link_failures() const noexcept { return impl_->link_failures; }

bool Engine::arm() noexcept {
  Impl& e = *impl_;
  if (e.cq && e.cq->arm() != 0) return false;
  if (e.progress() > 0) return false;
  for (auto& link : e.links)
    if (!link->error && !link->port->arm()) return false;
  if (e.poll_fds_stale) e.rebuild_poll_fds();
  // A tcp port waits for POLLOUT only while it has output queued.
  for (std::size_t i = 0; i < e.poll_fds.size(); ++i) {
    if (e.watches[i].kind != Impl::Watch::wake) continue;
    auto events = static_cast<short>(e.watches[i].link->port->wake_events());
    if (events == e.poll_fds[i].events) continue;
    e.poll_fds[i].events = events;
    epoll_event ev{};
    ev.events = static_cast<uint32_t>(events);
    ev.data.fd = e.poll_fds[i].fd;
    if (e.wait_epoll) ::epoll_ctl(e.wait_epoll.get(), EPOLL_CTL_MOD, e.poll_fds[i].fd, &ev);
  }
  return true;
}

Status Engine::wait(Request& request, std::chrono::milliseconds timeout) noexcept {
  Impl& e = *impl_;
  auto start = std::chrono::steady_clock::now();
  auto deadline = start + timeout;
  auto spin_until = start + e.options.poll_time;
  while (!request.done()) {
    if (e.progress() > 0) {
      spin_until = std::chrono::steady_clock::now() + e.options.poll_time;
      continue;
    }
    auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return Status::timed_out;
    if (now < spin_until) continue;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
    e.block(std::clamp(left, std::chrono::milliseconds(1), std::chrono::milliseconds(100)));
  }
  return request.status();
}

// ---- the connection API ------------------------------------------------------------

Status Connection::send(std::span<const std::byte> data, uint64_t tag, Request& q) noexcept {
  q = Request{};
  if (error_) return q.status_ = Status::failed;
  if (closed_) return q.status_ = Status::closed;
  q.op_ = Request::Op::send;
  q.tag_ = tag;
  q.buffer_ = const_cast<std::byte*>(data.data());  // only read from
  q.capacity_ = data.size();
  q.connection_ = this;
  if (data.size() > link_->max_message) return q.status_ = Status::failed;
  q.status_ = Status::pending;
  Ring& r = *ring_;
  if (r.sends.empty() && data.size() <= Link::eager_limit(r, link_->engine.options.eager_limit) &&
      link_->can_post_slot(*this)) {
    link_->post_slot(*this, wire::SlotKind::eager, tag, data);
    Link::complete(q, error_ ? Status::failed : Status::ok, data.size());
    return q.status_;
  }
  Link::push(r.sends, q);
  link_->drain(*this, false);
  return q.status_;
}

Status Connection::recv(std::span<std::byte> buffer, uint64_t tag, Request& q) noexcept {
  q = Request{};
  q.op_ = Request::Op::recv;
  q.tag_ = tag;
  q.buffer_ = buffer.data();
  q.capacity_ = buffer.size();
  q.connection_ = this;
  q.status_ = Status::pending;
  Ring& r = *ring_;
  // What already arrived is delivered even after a failure: it was sent before it.
  for (std::size_t i = 0; i < r.unexpected.size(); ++i) {
    Arrival arrival = r.unexpected.at(i);
    if (!matches(tag, arrival.tag())) continue;
    r.unexpected.erase(i);
    link_->deliver(*this, arrival, q);
    link_->return_credits(*this, false);
    return q.status_;
  }
  if (peer_closed_) return q.status_ = Status::closed;
  if (error_) return q.status_ = Status::failed;
  Link::push(r.posted, q);
  return q.status_;
}

std::size_t Connection::stream_write(std::span<const std::byte> data) noexcept {
  if (error_ || closed_) return 0;
  const uint32_t limit = Link::eager_limit(*ring_, link_->engine.options.eager_limit);
  std::size_t sent = 0;
  while (sent < data.size() && link_->can_post_slot(*this)) {
    std::size_t n = std::min<std::size_t>(limit, data.size() - sent);
    link_->post_slot(*this, wire::SlotKind::stream, 0, data.subspan(sent, n));
    sent += n;
  }
  return sent;
}

std::size_t Connection::stream_read(std::span<std::byte> buffer) noexcept {
  Ring& r = *ring_;
  std::size_t copied = 0;
  while (copied < buffer.size() && !r.stream.empty()) {
    const uint64_t seq = r.stream.front().seq;
    const std::size_t length = r.stream.front().header.length;
    std::size_t n = std::min(length - r.stream_offset, buffer.size() - copied);
    std::memcpy(buffer.data() + copied, r.slot(seq) + wire::kSlotHeaderSize + r.stream_offset, n);
    copied += n;
    r.stream_offset += n;
    if (r.stream_offset == length) {
      r.stream.pop();
      r.stream_offset = 0;
      r.recv.release(seq);
    }
  }
  if (copied) link_->return_credits(*this, false);
  return copied;
}

std::size_t Connection::stream_window() const noexcept {
  return std::size_t(ring_->send.slots()) * Link::eager_limit(*ring_, link_->engine.options.eager_limit);
}

bool Connection::stream_closed() const noexcept { return peer_closed_ && ring_->stream.empty(); }

bool Connection::stream_readable() const noexcept { return !ring_->stream.empty() || peer_closed_ || error_; }

bool Connection::stream_writable() const noexcept {
  return !error_ && !closed_ && link_->can_post_slot(const_cast<Connection&>(*this));
}

std::size_t Connection::stream_peek(std::span<std::byte> buffer) const noexcept {
  Ring& r = *ring_;
  std::size_t copied = 0;
  std::size_t offset = r.stream_offset;
  for (std::size_t i = 0; i < r.stream.size() && copied < buffer.size(); ++i, offset = 0) {
    const Arrival& a = r.stream.at(i);
    std::size_t n = std::min(a.header.length - offset, buffer.size() - copied);
    std::memcpy(buffer.data() + copied, r.slot(a.seq) + wire::kSlotHeaderSize + offset, n);
    copied += n;
  }
  return copied;
}

std::size_t Connection::stream_available() const noexcept {
  Ring& r = *ring_;
  std::size_t total = 0;
  for (std::size_t i = 0; i < r.stream.size(); ++i) total += r.stream.at(i).header.length;
  return total - r.stream_offset;
}

const char* Connection::backend_name() const noexcept { return to_string(link_->port->backend()); }

Status Connection::one_sided(bool write, std::byte* local, std::size_t size, const RemoteRegion& remote,
                             uint64_t offset, Request& q) noexcept {
  q = Request{};
  if (error_) return q.status_ = Status::failed;
  if (offset > remote.length || size > remote.length - offset) return q.status_ = Status::truncated;
  if (size > link_->max_message) return q.status_ = Status::failed;
  q.op_ = write ? Request::Op::write : Request::Op::read;
  q.buffer_ = local;
  q.capacity_ = size;
  q.connection_ = this;
  q.remote_address_ = remote.address + offset;
  q.rkey_ = remote.rkey;
  q.status_ = Status::pending;
  link_->post_request(q);
  return q.status_;
}

Status Connection::write(std::span<const std::byte> local, const RemoteRegion& remote, uint64_t offset,
                         Request& q) noexcept {
  // Only read from: the device takes the bytes from here.
  return one_sided(true, const_cast<std::byte*>(local.data()), local.size(), remote, offset, q);
}

Status Connection::read(std::span<std::byte> local, const RemoteRegion& remote, uint64_t offset,
                        Request& q) noexcept {
  return one_sided(false, local.data(), local.size(), remote, offset, q);
}

void Connection::close() noexcept {
  if (closed_ || error_) return;
  closed_ = true;
  ring_->close_to_send = true;
  link_->drain(*this, false);
}

void Connection::release() noexcept {
  close();
  released_ = true;
  link_->release_when_done(*this);
}

}  // namespace rxio::transport
