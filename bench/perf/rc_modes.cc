#include "bench/perf/rc_modes.h"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "base/error.h"
#include "bench/perf/clock.h"
#include "bench/perf/codec.h"
#include "bench/perf/modes.h"
#include "bench/perf/options.h"
#include "bench/perf/rc_session.h"
#include "bench/perf/report.h"

namespace rxio::perf {
namespace {

using namespace std::chrono_literals;

constexpr auto kStall = 10s;
// The server waits this long for the client's result while the client runs. The
// client bounds its own stalls, and a client that dies is noticed at once.
constexpr auto kPeerRun = std::chrono::hours(1);
constexpr uint64_t kMaxPeakIterations = 20000;  // perftest's limit: the peak search is quadratic
constexpr uint32_t kSendBwRecvs = 512;          // perftest's rx depth
constexpr int kPollBatch = 16;
enum : uint8_t { kReady = 1, kResult = 2, kBye = 3 };

std::string nth(uint64_t index, uint64_t count) {
  return std::to_string(index + 1) + (count ? " of " + std::to_string(count) : std::string());
}

// Fails a wait after kStall without progress. Reads the TSC every few hundred idle
// polls and never clock_gettime, which is a system call in a TCG guest: spinning
// stays cheap and undisturbed.
class StallGuard {
 public:
  explicit StallGuard(const TickClock& clock)
      : stall_ticks_(static_cast<int64_t>(static_cast<double>(std::chrono::nanoseconds(kStall).count()) /
                                          clock.ns_per_tick())) {}
  void progress() noexcept {
    idle_ = 0;
    idle_since_ = 0;
  }
  // Waiting for "<waiting_for> [<op> ]<index + 1> of <count>" (count 0: unknown).
  void idle(const Link& link, const char* waiting_for, const char* op, uint64_t index, uint64_t count) {
    if (++idle_ < 256) return;
    idle_ = 0;
    const int64_t now = TickClock::now();
    if (idle_since_ == 0) {
      idle_since_ = now;
    } else if (now - idle_since_ > stall_ticks_) {
      throw Error(ETIMEDOUT,
                  std::string("no progress for 10 s waiting for ") + waiting_for + " " + op + (*op ? " " : "") +
                      nth(index, count),
                  link.device, "is the peer still running? its own output says why it stopped");
    }
  }

 private:
  int64_t stall_ticks_;
  uint32_t idle_ = 0;
  int64_t idle_since_ = 0;
};

[[noreturn]] void completion_failed(const Link& link, const ibv_wc& wc, const char* what, uint64_t index) {
  char vendor[32];
  std::snprintf(vendor, sizeof vendor, "%#x", wc.vendor_err);
  const bool peer_gone = wc.status == IBV_WC_RETRY_EXC_ERR || wc.status == IBV_WC_RNR_RETRY_EXC_ERR;
  throw Error(EIO, std::string(what) + " " + std::to_string(index + 1) + " completed with " +
                       ibv_wc_status_str(wc.status) + " (vendor error " + vendor + ")",
              link.device, peer_gone ? "the peer stopped answering: is it still running?" : "");
}

int poll(const Link& link, verbs::CompletionQueue& cq, std::span<ibv_wc> wcs) {
  const int got = cq.poll(wcs);
  if (got < 0) throw Error(EIO, "polling a completion queue (ibv_poll_cq)", link.device);
  return got;
}

const char* name_of(ibv_wr_opcode opcode) {
  switch (opcode) {
    case IBV_WR_RDMA_WRITE: return "RDMA WRITE";
    case IBV_WR_RDMA_READ: return "RDMA READ";
    default: return "SEND";
  }
}

// One work request, built once and posted over and over.
class SendWr {
 public:
  SendWr(const Link& link, ibv_wr_opcode opcode, std::size_t size, bool inline_data)
      : link_(link), flags_(inline_data ? IBV_SEND_INLINE : 0) {
    sge_.addr = reinterpret_cast<uint64_t>(link.buffer + link.half);
    sge_.length = static_cast<uint32_t>(size);
    sge_.lkey = link.lkey;
    wr_.sg_list = &sge_;
    wr_.num_sge = 1;
    wr_.opcode = opcode;
    if (opcode == IBV_WR_RDMA_WRITE || opcode == IBV_WR_RDMA_READ) {
      wr_.wr.rdma.remote_addr = link.remote_addr;
      wr_.wr.rdma.rkey = link.rkey;
    }
  }
  SendWr(const SendWr&) = delete;  // wr_ points at sge_
  SendWr& operator=(const SendWr&) = delete;

  // The receiver of a SEND_WITH_IMM knows it was the last (for duration mode).
  void mark_last() noexcept { wr_.opcode = IBV_WR_SEND_WITH_IMM; }

  void post(uint64_t id, bool signaled) {
    wr_.wr_id = id;
    wr_.send_flags = signaled ? flags_ | IBV_SEND_SIGNALED : flags_;
    ibv_send_wr* bad = nullptr;
    if (int rc = ibv_post_send(link_.qp, &wr_, &bad); rc != 0)
      throw Error(rc, std::string("posting ") + name_of(wr_.opcode) + " " + std::to_string(id + 1) + " (ibv_post_send)",
                  link_.device);
  }

 private:
  const Link& link_;
  unsigned flags_;
  ibv_sge sge_{};
  ibv_send_wr wr_{};
};

// What one side needs through the whole run, allocated before any timed loop.
struct Run {
  Run(const Options& o, Link& l, const TickClock& c, uint32_t recvs)
      : options(o), link(l), clock(c), recv_target(recvs), stall(c) {
    const uint64_t n = o.iterations;
    if (o.mode->kind == Kind::latency) {
      stamps.resize(n);
      samples.resize(n);
    } else if (o.duration_s == 0 && n <= kMaxPeakIterations) {
      posted.resize(n);
      completed.resize(n);
    }
    recv_sge.addr = reinterpret_cast<uint64_t>(l.buffer);
    recv_sge.length = static_cast<uint32_t>(l.half);  // fits every size of --all
    recv_sge.lkey = l.lkey;
    recv_wr.sg_list = &recv_sge;
    recv_wr.num_sge = 1;
  }
  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;

  void top_up_receives() {
    for (; recvs_posted < recv_target; ++recvs_posted) {
      ibv_recv_wr* bad = nullptr;
      if (int rc = ibv_post_recv(link.qp, &recv_wr, &bad); rc != 0)
        throw Error(rc, "posting a receive (ibv_post_recv)", link.device);
    }
  }

  const Options& options;
  Link& link;
  const TickClock& clock;
  std::vector<int64_t> posted, completed;  // bandwidth peak, when it is computed: ticks
  std::vector<int64_t> stamps;             // latency: when each iteration began, in ticks
  std::vector<double> samples;
  ibv_sge recv_sge{};
  ibv_recv_wr recv_wr{};
  uint32_t recv_target;
  uint32_t recvs_posted = 0;
  StallGuard stall;
};

// Signaled sends of the latency modes: at most tx depth in flight. The ping-pongs
// reap completions while they wait for the peer (as perftest does, the ACK comes
// first), so no CQ poll sits between the peer's message and the next post.
class SendCredits {
 public:
  SendCredits(Run& run, ibv_wr_opcode opcode) : run_(run), what_(name_of(opcode)) {}
  void take(uint64_t index) {
    run_.stall.progress();
    while (outstanding_ >= run_.options.tx_depth)
      if (!reap())
        run_.stall.idle(run_.link, "the completion of", what_, index, run_.options.iterations);
    ++outstanding_;
  }
  // One poll, and only while a send is in flight.
  void reap_while_waiting() {
    if (outstanding_ != 0) reap();
  }
  void drain(uint64_t index) {
    run_.stall.progress();
    while (outstanding_ > 0)
      if (!reap())
        run_.stall.idle(run_.link, "the completion of", what_, index, run_.options.iterations);
  }

 private:
  bool reap() {
    ibv_wc wcs[kPollBatch];
    const int got = poll(run_.link, *run_.link.send_cq, wcs);
    for (int i = 0; i < got; ++i)
      if (wcs[i].status != IBV_WC_SUCCESS) completion_failed(run_.link, wcs[i], what_, wcs[i].wr_id);
    outstanding_ -= static_cast<uint32_t>(got);
    return got != 0;
  }
  Run& run_;
  const char* what_;
  uint32_t outstanding_ = 0;
};

// Before each size, on both sides: receives posted, write_lat's flag byte cleared
// (the server before it says ready, the client before its first write).
void prepare(Run& run, std::size_t size) {
  std::atomic_ref<std::byte>(run.link.buffer[size - 1]).store(std::byte{0}, std::memory_order_relaxed);
  run.top_up_receives();
}

// perftest's bandwidth loop: keep tx depth in flight, a completion every cq_mod sends.
BandwidthResult bandwidth_client(Run& run, std::size_t size, ibv_wr_opcode opcode) {
  const Options& o = run.options;
  const Link& link = run.link;
  const bool timed = o.duration_s != 0;
  const uint64_t n = timed ? 0 : o.iterations;
  const bool peak = !run.posted.empty();
  if (peak) std::fill(run.completed.begin(), run.completed.end(), 0);
  SendWr wr(link, opcode, size, size <= o.inline_size);
  const char* what = name_of(opcode);

  ibv_wc wcs[kPollBatch];
  uint64_t posted = 0, completed = 0;
  bool last_posted = false;
  const double ns_per_tick = run.clock.ns_per_tick();  // the set-up gave it time to settle
  const int64_t start = TickClock::now();
  const int64_t end = start + static_cast<int64_t>(o.duration_s * 1e9 / ns_per_tick);
  int64_t last_completion = start;
  run.stall.progress();
  while (!last_posted || completed < posted) {
    while (!last_posted && posted - completed < o.tx_depth) {
      const int64_t t = peak || timed ? TickClock::now() : 0;
      last_posted = timed ? t >= end : posted + 1 == n;
      if (last_posted && opcode == IBV_WR_SEND) wr.mark_last();
      if (peak) run.posted[posted] = t;
      wr.post(posted, last_posted || (posted + 1) % o.cq_moderation == 0);
      ++posted;
    }
    const int got = poll(link, *link.send_cq, wcs);
    if (got == 0) {
      run.stall.idle(link, "the completion of", what, completed, n);
      continue;
    }
    last_completion = TickClock::now();
    run.stall.progress();
    for (int i = 0; i < got; ++i) {
      if (wcs[i].status != IBV_WC_SUCCESS) completion_failed(link, wcs[i], what, wcs[i].wr_id);
      completed = wcs[i].wr_id + 1;
      if (peak) run.completed[wcs[i].wr_id] = last_completion;
    }
  }

  BandwidthResult r;
  r.bytes = size;
  r.iterations = posted;
  const double seconds = static_cast<double>(last_completion - start) * run.clock.ns_per_tick() / 1e9;
  r.average_bytes_per_s = static_cast<double>(size) * static_cast<double>(posted) / seconds;
  r.messages_per_s = static_cast<double>(posted) / seconds;
  if (peak)
    r.peak_bytes_per_s = peak_bytes_per_s(size, std::span(run.posted).first(posted),
                                          std::span(run.completed).first(posted), run.clock.ns_per_tick());
  return r;
}

// The receiving side of send_bw, as perftest's server reports it: from the first
// message to the last (which carries an immediate), no peak.
BandwidthResult send_bw_server(Run& run, std::size_t size) {
  const Link& link = run.link;
  const uint64_t n = run.options.duration_s ? 0 : run.options.iterations;
  ibv_wc wcs[kPollBatch];
  uint64_t received = 0;
  int64_t first = 0, last = 0;
  bool done = false;
  run.stall.progress();
  while (!done) {
    const int got = poll(link, *link.recv_cq, wcs);
    if (got == 0) {
      run.stall.idle(link, "the client's SEND", "", received, n);
      continue;
    }
    last = TickClock::now();
    run.stall.progress();
    for (int i = 0; i < got; ++i) {
      if (wcs[i].status != IBV_WC_SUCCESS) completion_failed(link, wcs[i], "receive", received);
      if (wcs[i].byte_len != size)
        throw Error(EPROTO, "message " + std::to_string(received + 1) + " has " + std::to_string(wcs[i].byte_len) +
                                " bytes, not " + std::to_string(size), link.device);
      if (received++ == 0) first = last;
      done = done || (wcs[i].wc_flags & IBV_WC_WITH_IMM);
    }
    run.recvs_posted -= static_cast<uint32_t>(got);
    run.top_up_receives();
  }
  BandwidthResult r;
  r.bytes = size;
  r.iterations = received;
  if (received > 1 && last > first) {
    const double seconds = static_cast<double>(last - first) * run.clock.ns_per_tick() / 1e9;
    r.average_bytes_per_s = static_cast<double>(size) * static_cast<double>(received - 1) / seconds;
    r.messages_per_s = static_cast<double>(received - 1) / seconds;
  }
  return r;
}

// perftest's latency figures: the time between the starts of consecutive iterations,
// divided by `legs` (2 for a ping-pong's half round trip).
LatencyResult latency_from_stamps(Run& run, std::size_t size, double legs) {
  const std::size_t n = run.stamps.size();
  const double us_per_tick = run.clock.ns_per_tick() / 1e3;
  for (std::size_t i = 0; i + 1 < n; ++i)
    run.samples[i] = static_cast<double>(run.stamps[i + 1] - run.stamps[i]) * us_per_tick / legs;
  return latency_result(size, n, std::span(run.samples).first(n - 1));
}

void wait_for_receive(Run& run, SendCredits& credits, std::size_t size, uint64_t index) {
  const Link& link = run.link;
  ibv_wc wc{};
  run.stall.progress();
  while (poll(link, *link.recv_cq, {&wc, 1}) == 0) {
    credits.reap_while_waiting();
    run.stall.idle(link, "the peer's SEND", "", index, run.options.iterations);
  }
  if (wc.status != IBV_WC_SUCCESS) completion_failed(link, wc, "receive", index);
  if (wc.byte_len != size)
    throw Error(EPROTO, "message " + std::to_string(index + 1) + " has " + std::to_string(wc.byte_len) +
                            " bytes, not " + std::to_string(size), link.device);
  --run.recvs_posted;
  run.top_up_receives();
}

// Ping-pong of RDMA WRITEs: each side polls the last byte of its receive half for
// the iteration number (the client writes first).
LatencyResult write_lat(Run& run, std::size_t size) {
  const Link& link = run.link;
  const uint64_t n = run.options.iterations;
  const bool server = run.options.is_server();
  SendWr wr(link, IBV_WR_RDMA_WRITE, size, size <= run.options.inline_size);
  SendCredits credits(run, IBV_WR_RDMA_WRITE);
  std::atomic_ref<std::byte> incoming(link.buffer[size - 1]);
  std::byte& outgoing = link.buffer[link.half + size - 1];
  const auto wait_for = [&](std::byte expected, uint64_t i) {
    run.stall.progress();
    while (incoming.load(std::memory_order_acquire) != expected) {
      credits.reap_while_waiting();
      run.stall.idle(link, "the peer's RDMA WRITE", "", i, n);
    }
  };
  for (uint64_t i = 0; i < n; ++i) {
    const auto mark = static_cast<std::byte>(i + 1);
    if (server) wait_for(mark, i);
    run.stamps[i] = TickClock::now();
    outgoing = mark;
    credits.take(i);
    wr.post(i, true);
    if (!server) wait_for(mark, i);
  }
  credits.drain(n - 1);
  return latency_from_stamps(run, size, 2);
}

// Ping-pong of SENDs; each side keeps one receive posted.
LatencyResult send_lat(Run& run, std::size_t size) {
  const uint64_t n = run.options.iterations;
  const bool server = run.options.is_server();
  SendWr wr(run.link, IBV_WR_SEND, size, size <= run.options.inline_size);
  SendCredits credits(run, IBV_WR_SEND);
  for (uint64_t i = 0; i < n; ++i) {
    if (server) wait_for_receive(run, credits, size, i);
    run.stamps[i] = TickClock::now();
    credits.take(i);
    wr.post(i, true);
    if (!server) wait_for_receive(run, credits, size, i);
  }
  credits.drain(n - 1);
  return latency_from_stamps(run, size, 2);
}

// One RDMA READ at a time, each timed whole.
LatencyResult read_lat(Run& run, std::size_t size) {
  SendWr wr(run.link, IBV_WR_RDMA_READ, size, false);
  SendCredits credits(run, IBV_WR_RDMA_READ);
  for (uint64_t i = 0; i < run.options.iterations; ++i) {
    run.stamps[i] = TickClock::now();
    credits.take(i);
    wr.post(i, true);
    credits.drain(i);
  }
  return latency_from_stamps(run, size, 1);
}

struct RcTest {
  Result (*client)(Run&, std::size_t size);
  Result (*server)(Run&, std::size_t size);  // null: the server only serves; it reports the client's result
  uint32_t client_recvs;
  uint32_t server_recvs;
};

std::vector<std::byte> message(uint8_t type, std::span<const std::byte> body = {}) {
  Writer w;
  w.u8(type).bytes(body);
  return w.data();
}

std::span<const std::byte> expect_message(std::span<const std::byte> data, uint8_t type, const char* what) {
  if (data.empty() || std::to_integer<uint8_t>(data[0]) != type)
    throw Error(EPROTO, std::string("expected ") + what + " from the peer, got message type " +
                            (data.empty() ? "(empty)" : std::to_string(std::to_integer<int>(data[0]))),
                {}, "run the same rxio-perf version on both sides");
  return data.subspan(1);
}

void run_rc(const Options& o, const RcTest& test) {
  const TickClock clock;
  const bool server = o.is_server();
  const uint32_t recvs = server ? test.server_recvs : test.client_recvs;
  auto session = RcSession::open(o, QueueSizes{o.tx_depth, std::max(recvs, 1u)});
  Reporter reporter(o, *o.mode);
  reporter.banner(session->fields(), session->address_lines());
  Run run(o, session->link(), clock, recvs);
  for (std::size_t size : o.sizes) {
    prepare(run, size);
    if (server) {
      Writer ready;
      ready.u8(kReady).u64(size);
      session->send(ready.data());
      std::optional<Result> own;
      if (test.server) own = test.server(run, size);
      const auto data = session->receive(kPeerRun, "the client's result");
      const Result peer = decode_result(expect_message(data, kResult, "a result"));
      reporter.add(own ? *own : peer);
    } else {
      const auto data = session->receive(kStall, "the server to get ready");
      Reader r(expect_message(data, kReady, "ready"), "the server's ready");
      if (const uint64_t ready_size = r.u64(); ready_size != size)
        throw Error(EPROTO, "the server got ready for " + std::to_string(ready_size) + " bytes, this side runs " +
                                std::to_string(size));
      const Result own = test.client(run, size);
      session->send(message(kResult, encode(own)));
      reporter.add(own);
    }
  }
  if (server)
    session->send(message(kBye));
  else
    expect_message(session->receive(kStall, "the server's goodbye"), kBye, "goodbye");
  reporter.finish();
}

Result write_bw_client(Run& run, std::size_t size) { return bandwidth_client(run, size, IBV_WR_RDMA_WRITE); }
Result read_bw_client(Run& run, std::size_t size) { return bandwidth_client(run, size, IBV_WR_RDMA_READ); }
Result send_bw_client(Run& run, std::size_t size) { return bandwidth_client(run, size, IBV_WR_SEND); }
Result send_bw_receiver(Run& run, std::size_t size) { return send_bw_server(run, size); }
Result write_lat_side(Run& run, std::size_t size) { return write_lat(run, size); }
Result send_lat_side(Run& run, std::size_t size) { return send_lat(run, size); }
Result read_lat_client(Run& run, std::size_t size) { return read_lat(run, size); }

}  // namespace

void run_write_bw(const Options& o) { run_rc(o, {write_bw_client, nullptr, 0, 0}); }
void run_read_bw(const Options& o) { run_rc(o, {read_bw_client, nullptr, 0, 0}); }
void run_send_bw(const Options& o) { run_rc(o, {send_bw_client, send_bw_receiver, 0, kSendBwRecvs}); }
void run_write_lat(const Options& o) { run_rc(o, {write_lat_side, write_lat_side, 0, 0}); }
void run_send_lat(const Options& o) { run_rc(o, {send_lat_side, send_lat_side, 1, 1}); }
void run_read_lat(const Options& o) { run_rc(o, {read_lat_client, nullptr, 0, 0}); }

}  // namespace rxio::perf
