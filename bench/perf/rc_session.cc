#include "bench/perf/rc_session.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <thread>

#include "base/error.h"
#include "bench/perf/codec.h"
#include "bench/perf/modes.h"
#include "bench/perf/options.h"
#include "transport/oob.h"
#include "verbs/cm.h"
#include "verbs/device.h"
#include "verbs/gid.h"
#include "verbs/memory.h"
#include "verbs/queue_pair.h"

namespace rxio::perf {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr auto kClientWait = 120s;  // what the usage text promises
constexpr auto kSetupTimeout = 10s;
constexpr std::size_t kSlot = 256;  // one control message: length, payload, sequence number
constexpr std::size_t kSlotPayload = kSlot - 8;
constexpr uint64_t kControlWrId = ~uint64_t{0};
constexpr uint32_t kMagic = 0x52585046;  // "RXPF"
constexpr uint8_t kVersion = 1;
constexpr std::size_t kModeWidth = 12;

std::size_t round_up(std::size_t value, std::size_t to) { return (value + to - 1) / to * to; }

// Page-aligned and zeroed up front, so the timed loops take no page faults.
class Buffer {
 public:
  explicit Buffer(std::size_t size)
      : size_(round_up(size, 4096)), data_(static_cast<std::byte*>(std::aligned_alloc(4096, size_))) {
    if (!data_) throw Error(ENOMEM, "allocating a " + format_bytes(size_) + " buffer");
    std::memset(data_.get(), 0, size_);
  }
  std::byte* data() const noexcept { return data_.get(); }
  std::size_t size() const noexcept { return size_; }

 private:
  struct Free {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::size_t size_;
  std::unique_ptr<std::byte, Free> data_;
};

// Everything but the QP, in destruction-safe order.
struct Resources {
  Resources(ibv_context* context, std::size_t half, const QueueSizes& sizes)
      : pd(context),
        send_cq(context, static_cast<int>(sizes.send + 1)),
        recv_cq(context, static_cast<int>(sizes.recv)),
        buffer(2 * half + 2 * kSlot),
        mr(verbs::MemoryRegion::register_host(pd, buffer.data(), buffer.size(), verbs::kRemoteAll)) {}

  verbs::ProtectionDomain pd;
  verbs::CompletionQueue send_cq;
  verbs::CompletionQueue recv_cq;
  Buffer buffer;
  verbs::MemoryRegion mr;
};

verbs::QueueCaps caps(const QueueSizes& sizes, const Options& options) {
  verbs::QueueCaps caps;
  caps.max_send_wr = sizes.send;
  caps.max_recv_wr = sizes.recv;
  caps.max_inline_data = options.inline_size;
  return caps;
}

ibv_device_attr query_device(ibv_context* context) {
  ibv_device_attr attr{};
  if (int rc = ibv_query_device(context, &attr); rc != 0)
    throw Error(rc, "querying device attributes (ibv_query_device)", verbs::device_name(context));
  return attr;
}

uint8_t clamp_u8(int value) { return static_cast<uint8_t>(std::clamp(value, 0, 255)); }

// What each side tells the other before the test; both must run the same one.
struct Hello {
  std::string mode;
  uint32_t size = 0;  // 0: --all
  uint32_t iterations = 0;
  uint32_t duration_s = 0;
  uint64_t addr = 0;
  uint32_t rkey = 0;
  // Over TCP only: what rdma_cm negotiates by itself.
  uint32_t qp_num = 0;
  uint32_t psn = 0;
  uint16_t lid = 0;
  ibv_gid gid{};
  uint8_t mtu = 0;  // ibv_mtu
};

Hello hello_for(const Options& options, const Resources& res) {
  Hello h;
  h.mode = std::string(options.mode->name);
  h.size = options.all_sizes ? 0 : static_cast<uint32_t>(options.sizes.front());
  h.iterations = options.iterations;
  h.duration_s = options.duration_s;
  h.addr = reinterpret_cast<uint64_t>(res.buffer.data());
  h.rkey = res.mr.rkey();
  return h;
}

// 41 bytes without the QP part: within the 56 an rdma_cm connect request carries.
std::vector<std::byte> encode(const Hello& h, bool with_qp) {
  Writer w;
  w.u32(kMagic).u8(kVersion).text(h.mode, kModeWidth).u32(h.size).u32(h.iterations).u32(h.duration_s);
  w.u64(h.addr).u32(h.rkey);
  if (with_qp) {
    w.u32(h.qp_num).u32(h.psn).u16(h.lid);
    w.bytes(std::as_bytes(std::span(h.gid.raw)));
    w.u8(h.mtu);
  }
  return w.data();
}

Hello decode_hello(std::span<const std::byte> data, bool with_qp, const std::string& peer) {
  Reader r(data, "the greeting from " + peer);
  if (r.u32() != kMagic)
    throw Error(EPROTO, "the peer at " + peer + " is not rxio-perf", {},
                "point the client at an rxio-perf server (and perftest at perftest)");
  if (uint8_t version = r.u8(); version != kVersion)
    throw Error(EPROTO, "the peer speaks rxio-perf protocol " + std::to_string(version) + ", this side " +
                            std::to_string(kVersion), peer, "run the same rxio-perf version on both sides");
  Hello h;
  h.mode = r.text(kModeWidth);
  h.size = r.u32();
  h.iterations = r.u32();
  h.duration_s = r.u32();
  h.addr = r.u64();
  h.rkey = r.u32();
  if (with_qp) {
    h.qp_num = r.u32();
    h.psn = r.u32();
    h.lid = r.u16();
    auto gid = r.bytes(sizeof h.gid.raw);
    std::memcpy(h.gid.raw, gid.data(), gid.size());
    h.mtu = r.u8();
  }
  return h;
}

std::string test_text(const Hello& h) {
  return h.mode + (h.size ? " -s " + std::to_string(h.size) : std::string(" -a")) +
         (h.duration_s ? " -D " + std::to_string(h.duration_s) : " -n " + std::to_string(h.iterations));
}

void check_same_test(const Hello& mine, const Hello& peer, const std::string& peer_name) {
  if (test_text(mine) != test_text(peer))
    throw Error(EINVAL, "the peer runs `" + test_text(peer) + "`, this side `" + test_text(mine) + "`", peer_name,
                "give both sides the same subcommand and -s/-a, -n, -D");
}

uint32_t random_psn() { return std::random_device{}() & 0xffffff; }

void print_waiting() {
  std::printf("\n************************************\n"
              "* Waiting for client to connect... *\n"
              "************************************\n");
  std::fflush(stdout);
}

verbs::Endpoint choose_endpoint(const Options& options) {
  std::string device = options.device;
  if (device.empty()) {
    verbs::DeviceList devices;
    if (devices.empty()) throw Error(ENODEV, verbs::no_device_message());
    device = ibv_get_device_name(devices[0]);
  }
  return verbs::select_by_device(device, options.ib_port, options.gid_index);
}

transport::oob::Channel accept_client(const Options& options) {
  transport::oob::Listener listener("0.0.0.0", options.port);
  print_waiting();
  return listener.accept(kClientWait);
}

// Perftest's exchange: QP numbers, PSNs and GIDs over TCP, then RESET→INIT→RTR→RTS.
class OobSession final : public RcSession {
 public:
  OobSession(const Options& options, const QueueSizes& sizes)
      : endpoint_(choose_endpoint(options)),
        context_(verbs::Context::open_by_name(endpoint_.device)),
        res_(context_.get(), buffer_half(options), sizes),
        qp_(res_.pd, res_.send_cq, res_.recv_cq, caps(sizes, options)),
        channel_(options.is_server() ? accept_client(options)
                                     : transport::oob::Channel::connect(options.server, options.port, kSetupTimeout)) {
    const ibv_device_attr device = context_.query_device();
    const ibv_port_attr port = context_.query_port(endpoint_.port);
    qp_.to_init(endpoint_.port);

    Hello mine = hello_for(options, res_);
    mine.qp_num = qp_.qp_num();
    mine.psn = random_psn();
    mine.lid = port.lid;
    mine.gid = endpoint_.gid.gid;
    mine.mtu = static_cast<uint8_t>(port.active_mtu);
    if (!options.is_server()) channel_.send(encode(mine, true));  // the client speaks first
    const Hello peer = decode_hello(channel_.receive(kSetupTimeout), true, channel_.peer());
    if (options.is_server()) channel_.send(encode(mine, true));
    check_same_test(mine, peer, channel_.peer());

    verbs::PathParams path;
    path.port = endpoint_.port;
    path.sgid_index = static_cast<uint8_t>(endpoint_.gid.index);
    path.mtu = static_cast<ibv_mtu>(std::min(mine.mtu, peer.mtu));
    verbs::ReliabilityParams reliability;
    reliability.timeout = options.qp_timeout;
    reliability.max_rd_atomic = clamp_u8(device.max_qp_init_rd_atom);
    reliability.max_dest_rd_atomic = clamp_u8(device.max_qp_rd_atom);
    qp_.to_rtr(verbs::RemoteQp{peer.qp_num, peer.psn, peer.gid, peer.lid}, path, reliability);
    qp_.to_rts(mine.psn, reliability);

    link_ = Link{qp_.get(), &res_.send_cq, &res_.recv_cq, res_.buffer.data(), buffer_half(options),
                 res_.mr.lkey(), peer.addr, peer.rkey, context_.name()};
    describe(options, sizes, context_.get(), endpoint_.port, res_.mr.rkey());
  }

  void send(std::span<const std::byte> message) override { channel_.send(message); }

  std::vector<std::byte> receive(std::chrono::milliseconds timeout, const char* waiting_for) override {
    try {
      return channel_.receive(timeout, kSlotPayload);
    } catch (const Error& e) {
      throw Error(e.code().value(), std::string(waiting_for) + ": " + e.operation(), e.where(), e.fix());
    }
  }

 private:
  verbs::Endpoint endpoint_;
  verbs::Context context_;
  Resources res_;
  verbs::QueuePair qp_;
  transport::oob::Channel channel_;
};

// What rdma_cm has set up before the QP exists.
struct CmStart {
  verbs::cm::EventChannel events;
  std::optional<verbs::cm::Id> listener;
  verbs::cm::Id id;
  std::string peer;
  std::vector<std::byte> request_data;  // the server's copy of the client's greeting
};

CmStart cm_wait_for_client(const Options& options) {
  verbs::cm::EventChannel events;
  verbs::cm::Id listener(events);
  listener.bind(verbs::cm::SocketAddress::parse("0.0.0.0", options.port));
  listener.listen(1);
  print_waiting();
  verbs::cm::Event request = events.expect(RDMA_CM_EVENT_CONNECT_REQUEST, kClientWait,
                                           "rdma_cm port " + std::to_string(options.port));
  verbs::cm::SocketAddress peer;
  std::memcpy(&peer.storage, rdma_get_peer_addr(request.id()), sizeof peer.storage);
  auto data = request.private_data();
  verbs::cm::Id id = verbs::cm::Id::adopt(request.id());
  return CmStart{std::move(events), std::move(listener), std::move(id), peer.to_string(),
                 std::vector<std::byte>(data.begin(), data.end())};
}

CmStart cm_resolve_server(const Options& options) {
  verbs::cm::EventChannel events;
  verbs::cm::Id id(events);
  const auto address = verbs::cm::SocketAddress::parse(options.server, options.port);
  id.resolve_address(events, address, kSetupTimeout / 2);
  id.resolve_route(events, kSetupTimeout / 2);
  return CmStart{std::move(events), std::nullopt, std::move(id), address.to_string(), {}};
}

// rdma_cm connects the QPs; the greetings ride in the private data, and control
// messages are RDMA-written into the peer's inbox slot (no TCP connection at all).
class CmSession final : public RcSession {
 public:
  CmSession(const Options& options, const QueueSizes& sizes, CmStart start)
      : events_(std::move(start.events)),
        listener_(std::move(start.listener)),
        id_(std::move(start.id)),
        peer_(std::move(start.peer)),
        res_(id_.verbs(), buffer_half(options), sizes),
        qp_(id_, res_.pd, res_.send_cq, res_.recv_cq, caps(sizes, options)) {
    const ibv_device_attr device = query_device(id_.verbs());
    const Hello mine = hello_for(options, res_);
    const std::vector<std::byte> mine_data = encode(mine, false);
    verbs::cm::ConnectParams params;
    params.private_data = mine_data;
    params.responder_resources = clamp_u8(device.max_qp_rd_atom);
    params.initiator_depth = clamp_u8(device.max_qp_init_rd_atom);
    id_.set_ack_timeout(options.qp_timeout);
    std::vector<std::byte> peer_data;
    if (options.is_server()) {
      id_.accept(params);
      events_.expect(RDMA_CM_EVENT_ESTABLISHED, kSetupTimeout, peer_);
      peer_data = std::move(start.request_data);
    } else {
      id_.connect(params);
      verbs::cm::Event established = events_.expect(RDMA_CM_EVENT_ESTABLISHED, kSetupTimeout, peer_);
      const auto data = established.private_data();
      peer_data.assign(data.begin(), data.end());
    }
    const Hello peer = decode_hello(peer_data, false, peer_);
    check_same_test(mine, peer, peer_);

    const std::string device_name = verbs::device_name(id_.verbs());
    link_ = Link{qp_.get(), &res_.send_cq, &res_.recv_cq, res_.buffer.data(), buffer_half(options),
                 res_.mr.lkey(), peer.addr, peer.rkey, device_name};
    describe(options, sizes, id_.verbs(), id_.get()->port_num, res_.mr.rkey());
    check_chosen_path(options, device_name);
  }

  void send(std::span<const std::byte> message) override {
    if (message.size() > kSlotPayload)
      throw Error(EMSGSIZE, "a control message of " + std::to_string(message.size()) + " bytes");
    std::byte* out = link_.buffer + 2 * link_.half + kSlot;
    const auto length = static_cast<uint32_t>(message.size());
    std::memcpy(out, &length, sizeof length);
    std::memcpy(out + 4, message.data(), message.size());
    ++sent_;
    std::memcpy(out + kSlot - 4, &sent_, sizeof sent_);

    ibv_sge sge{reinterpret_cast<uint64_t>(out), static_cast<uint32_t>(kSlot), link_.lkey};
    ibv_send_wr wr{};
    wr.wr_id = kControlWrId;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = link_.remote_addr + 2 * link_.half;
    wr.wr.rdma.rkey = link_.rkey;
    ibv_send_wr* bad = nullptr;
    if (int rc = ibv_post_send(link_.qp, &wr, &bad); rc != 0)
      throw Error(rc, "posting a control message (ibv_post_send)", link_.device);
    // Waiting for the ack keeps the slot ours until the peer has it, and lets the
    // last message reach the peer before this side tears the QP down.
    const auto deadline = Clock::now() + kSetupTimeout;
    ibv_wc wc{};
    int got = 0;
    while ((got = link_.send_cq->poll({&wc, 1})) == 0) {
      if (Clock::now() > deadline)
        throw Error(ETIMEDOUT, "sending a control message (no completion within 10 s)", peer_,
                    "is the peer still running? its own output says why it stopped");
    }
    if (got < 0) throw Error(EIO, "polling the send completion queue", link_.device);
    if (wc.status != IBV_WC_SUCCESS || wc.wr_id != kControlWrId)
      throw Error(EIO, std::string("sending a control message: ") + ibv_wc_status_str(wc.status), peer_,
                  wc.status == IBV_WC_RETRY_EXC_ERR ? "the peer is gone" : "");
  }

  std::vector<std::byte> receive(std::chrono::milliseconds timeout, const char* waiting_for) override {
    std::byte* in = link_.buffer + 2 * link_.half;
    const uint32_t expected = received_ + 1;
    std::atomic_ref<uint32_t> sequence(*reinterpret_cast<uint32_t*>(in + kSlot - 4));
    const auto deadline = Clock::now() + timeout;
    auto nap = 20us;
    // Placement of one RDMA WRITE ends with its last bytes (as perftest's latency test
    // relies on too), so a new sequence number means the whole slot has arrived.
    while (sequence.load(std::memory_order_acquire) != expected) {
      if (auto event = events_.next(0ms))
        throw Error(ECONNRESET, std::string(waiting_for) + ": rdma_cm reported " + event->describe(), peer_,
                    "the peer went away; its own output says why");
      if (Clock::now() > deadline)
        throw Error(ETIMEDOUT,
                    std::string(waiting_for) + " (nothing within " +
                        std::to_string(std::chrono::duration_cast<std::chrono::seconds>(timeout).count()) + " s)",
                    peer_, "is the peer still running? its own output says why it stopped");
      std::this_thread::sleep_for(nap);  // control messages are rare: leave the CPUs to the test
      nap = std::min<std::chrono::microseconds>(nap * 2, 1ms);
    }
    received_ = expected;
    uint32_t length = 0;
    std::memcpy(&length, in, sizeof length);
    if (length > kSlotPayload)
      throw Error(EPROTO, std::string(waiting_for) + ": a control message of " + std::to_string(length) + " bytes", peer_);
    return {in + 4, in + 4 + length};
  }

 private:
  // rdma_cm picks the device and GID from the address; -d and -x must agree with it.
  void check_chosen_path(const Options& options, const std::string& device_name) {
    const std::string chosen = device_name + " GID index " + gid_index_;
    if ((!options.device.empty() && options.device != device_name) ||
        (options.gid_index >= 0 && std::to_string(options.gid_index) != gid_index_))
      throw Error(EINVAL, "rdma_cm chose " + chosen + " for " + peer_ + ", not what -d/-x asked for", {},
                  "with -R, drop -d and -x or give the address of the device you want");
  }

  verbs::cm::EventChannel events_;
  std::optional<verbs::cm::Id> listener_;
  verbs::cm::Id id_;
  std::string peer_;
  Resources res_;
  verbs::cm::QueuePair qp_;
  uint32_t sent_ = 0;
  uint32_t received_ = 0;
};

std::string perftest_gid(const ibv_gid& gid) {
  std::string text;
  for (uint8_t byte : gid.raw) {
    char part[8];
    std::snprintf(part, sizeof part, "%s%02d", text.empty() ? "" : ":", byte);
    text += part;
  }
  return text;
}

}  // namespace

std::size_t buffer_half(const Options& options) { return round_up(options.max_size(), 4096); }

std::unique_ptr<RcSession> RcSession::open(const Options& options, const QueueSizes& sizes) {
  if (!options.rdma_cm) return std::make_unique<OobSession>(options, sizes);
  return std::make_unique<CmSession>(options, sizes,
                                     options.is_server() ? cm_wait_for_client(options) : cm_resolve_server(options));
}

void RcSession::describe(const Options& options, const QueueSizes& sizes, ibv_context* context, uint8_t port,
                         uint32_t local_rkey) {
  ibv_qp_attr attr{};
  ibv_qp_init_attr init{};
  if (int rc = ibv_query_qp(link_.qp, &attr,
                            IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_SQ_PSN |
                                IBV_QP_MAX_QP_RD_ATOMIC,
                            &init);
      rc != 0)
    throw Error(rc, "querying the connected QP (ibv_query_qp)", link_.device);
  ibv_port_attr port_attr{};
  if (int rc = ibv_query_port(context, port, &port_attr); rc != 0)
    throw Error(rc, "querying port " + std::to_string(port) + " (ibv_query_port)", link_.device);
  ibv_gid local_gid{};
  if (int rc = ibv_query_gid(context, port, attr.ah_attr.grh.sgid_index, &local_gid); rc != 0)
    throw Error(rc, "querying the source GID (ibv_query_gid)", link_.device);

  const Mode& mode = *options.mode;
  const bool bandwidth = mode.kind == Kind::bandwidth;
  gid_index_ = std::to_string(attr.ah_attr.grh.sgid_index);
  const char* transport = context->device->transport_type == IBV_TRANSPORT_IB      ? "IB"
                          : context->device->transport_type == IBV_TRANSPORT_IWARP ? "IW"
                                                                                   : "unknown";
  fields_ = {{"Device", "Device", link_.device, "", false},
             {"Number of qps", "Number_of_qps", "1", "", true},
             {"Transport type", "Transport_type", transport, "", false},
             {"Connection type", "Connection_type", "RC", "", false},
             {"Using SRQ", "Using_SRQ", "OFF", "", false},
             {"TX depth", "TX_depth", std::to_string(options.tx_depth), "", true}};
  if (sizes.recv > 1) fields_.push_back({"RX depth", "RX_depth", std::to_string(sizes.recv), "", true});
  if (bandwidth)
    fields_.push_back({"CQ Moderation", "CQ_Moderation", std::to_string(options.cq_moderation), "", true});
  fields_.push_back({"Mtu", "Mtu", std::to_string(128 << attr.path_mtu), "[B]", true});
  fields_.push_back({"Link type", "Link_type",
                     port_attr.link_layer == IBV_LINK_LAYER_ETHERNET ? "Ethernet" : "IB", "", false});
  fields_.push_back({"GID index", "GID_index", gid_index_, "", true});
  if (mode.can_inline)
    fields_.push_back({"Max inline data", "Max_inline_data", std::to_string(options.inline_size), "[B]", true});
  else
    fields_.push_back({"Outstand reads", "Outstand_reads", std::to_string(attr.max_rd_atomic), "", true});
  fields_.push_back({"rdma_cm QPs", "rdma_cm_QPs", options.rdma_cm ? "ON" : "OFF", "", false});
  fields_.push_back({"Data ex. method", "Data_ex_method", options.rdma_cm ? "rdma_cm" : "TCP", "", false});

  char line[160];
  std::snprintf(line, sizeof line, "local address: LID %04x QPN %#06x PSN %#06x RKey %#08x VAddr %#016" PRIx64,
                port_attr.lid, link_.qp->qp_num, attr.sq_psn, local_rkey,
                reinterpret_cast<uint64_t>(link_.buffer));
  address_lines_ = {line, "GID: " + perftest_gid(local_gid)};
  std::snprintf(line, sizeof line, "remote address: LID %04x QPN %#06x PSN %#06x RKey %#08x VAddr %#016" PRIx64,
                attr.ah_attr.dlid, attr.dest_qp_num, attr.rq_psn, link_.rkey, link_.remote_addr);
  address_lines_.push_back(line);
  address_lines_.push_back("GID: " + perftest_gid(attr.ah_attr.grh.dgid));
}

}  // namespace rxio::perf
