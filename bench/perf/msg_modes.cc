#include "bench/perf/msg_modes.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <string>
#include <vector>

#include "base/error.h"
#include "bench/perf/modes.h"
#include "bench/perf/options.h"
#include "bench/perf/report.h"
#include "transport/engine.h"
#include "verbs/gid.h"

namespace rxio::perf {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using transport::Connection;
using transport::Engine;
using transport::Request;
using transport::Status;

constexpr uint64_t kDataTag = 1;
constexpr uint64_t kAckTag = 2;
constexpr auto kStall = 30s;
// Receive buffers in flight at the server, capped so that -a stays within memory.
constexpr std::size_t kReceiveBytesBudget = 64u << 20;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void expect_ok(Engine& engine, Request& request, const Connection& c, const char* what, uint64_t index) {
  Status s = engine.wait(request, kStall);
  if (s == Status::ok) return;
  throw Error(s == Status::timed_out ? ETIMEDOUT : EIO,
              std::string(what) + " " + std::to_string(index + 1) + ": " + transport::to_string(s) +
                  (c.failed() ? " (" + c.error_text() + ")" : ""),
              {}, s == Status::timed_out ? "is the peer still running? its own output says why it stopped" : "");
}

// The device's IPv4 address, from its IPv4-mapped RoCE GID: where rdma_cm binds.
std::string device_address(const std::string& device) {
  verbs::Endpoint endpoint = verbs::select_by_device(device);
  if (!verbs::is_ipv4_mapped(endpoint.gid.gid))
    throw Error(EADDRNOTAVAIL, "finding an IPv4 address for rdma_cm (-R)", endpoint.device,
                "give the device's netdev an IPv4 address");
  std::string text = verbs::to_string(endpoint.gid.gid);
  return text.substr(text.rfind(':') + 1);
}

struct Session {
  explicit Session(const Options& o) : engine(engine_options(o)) {
    if (o.is_server()) {
      engine.listen(o.rdma_cm ? device_address(engine.device_name()) : "0.0.0.0", o.port);
      connection = &engine.accept(std::chrono::hours(1));
    } else {
      connection = &engine.connect(o.server, o.port);
    }
  }

  static transport::Options engine_options(const Options& o) {
    if (o.duration_s != 0)
      throw Error(ENOTSUP, std::string(o.mode->name) + " with -D", {}, "use -n ITERATIONS for the msg_* tests");
    transport::Options t;
    t.device = o.device;
    if (o.backend == "verbs") t.backend = transport::BackendChoice::verbs;
    if (o.backend == "shm") t.backend = transport::BackendChoice::shm;
    if (o.backend == "tcp") t.backend = transport::BackendChoice::tcp;
    if (o.rdma_cm) {
      t.bootstrap = transport::Bootstrap::rdma_cm;
      verbs::DeviceList devices;
      if (devices.empty()) throw Error(ENODEV, verbs::no_device_message());
      t.local_address = device_address(o.device.empty() ? ibv_get_device_name(devices[0]) : o.device);
    }
    return t;
  }

  std::vector<Field> fields(const Options& o) {
    auto stats = engine.stats();
    std::string backend = stats.shm_links ? "shm" : stats.tcp_links ? "tcp" : "verbs";
    return {{"Device", "Device", backend == "verbs" ? engine.device_name() : "-", "", false},
            {"Transport", "Transport_type", "rxio Connection (" + backend + " backend)", "", false},
            {"Connection type", "Connection_type", "one link per peer", "", false},
            {"TX depth", "TX_depth", std::to_string(o.tx_depth), "", true},
            {"Data ex. method", "Data_ex_method", o.rdma_cm ? "rdma_cm" : "TCP", "", false}};
  }

  Engine engine;
  Connection* connection = nullptr;
};

// Client: `iterations` messages with up to tx depth in flight, then the server's ack.
BandwidthResult send_bandwidth(Session& s, const Options& o, std::size_t size, std::vector<std::byte>& buffer) {
  Connection& c = *s.connection;
  const uint64_t n = o.iterations;
  std::vector<Request> window(std::max<uint32_t>(1, o.tx_depth));
  Request ack;
  std::array<std::byte, 1> ack_byte;
  c.recv(ack_byte, kAckTag, ack);
  auto start = Clock::now();
  for (uint64_t i = 0; i < n; ++i) {
    Request& slot = window[i % window.size()];
    if (i >= window.size() && !slot.done()) expect_ok(s.engine, slot, c, "send", i - window.size());
    if (c.send({buffer.data(), size}, kDataTag, slot) == Status::failed)
      throw Error(EIO, "send " + std::to_string(i + 1) + ": " + c.error_text());
  }
  for (auto& r : window)
    if (!r.done()) expect_ok(s.engine, r, c, "send", n);
  expect_ok(s.engine, ack, c, "the receiver's acknowledgement after", n);
  double elapsed = seconds_since(start);
  double bytes = double(size) * double(n);
  return {size, n, 0, bytes / elapsed, double(n) / elapsed};
}

// Server: receives with a window of posted buffers, then acknowledges.
BandwidthResult receive_bandwidth(Session& s, const Options& o, std::size_t size, std::vector<std::byte>& buffer,
                                  std::size_t window_size) {
  Connection& c = *s.connection;
  const uint64_t n = o.iterations;
  std::vector<Request> window(window_size);
  uint64_t posted = 0;
  for (; posted < std::min<uint64_t>(n, window.size()); ++posted)
    c.recv({buffer.data() + (posted % window.size()) * size, size}, kDataTag, window[posted % window.size()]);
  Clock::time_point start{};
  for (uint64_t i = 0; i < n; ++i) {
    Request& r = window[i % window.size()];
    expect_ok(s.engine, r, c, "receive", i);
    if (i == 0) start = Clock::now();
    if (posted < n) {
      c.recv({buffer.data() + (posted % window.size()) * size, size}, kDataTag, window[posted % window.size()]);
      ++posted;
    }
  }
  double elapsed = std::max(seconds_since(start), 1e-9);
  Request ack;
  std::array<std::byte, 1> one{};
  c.send(one, kAckTag, ack);
  expect_ok(s.engine, ack, c, "the acknowledgement of", n);
  // The first message starts the clock here, so n - 1 of them are timed.
  double bytes = double(size) * double(n - 1);
  return {size, n, 0, bytes / elapsed, double(n - 1) / elapsed};
}

// Client: a message there, the same size back; half the round trip is the sample.
LatencyResult ping(Session& s, const Options& o, std::size_t size, std::vector<std::byte>& out,
                   std::vector<std::byte>& in, std::vector<double>& samples) {
  Connection& c = *s.connection;
  const uint64_t n = o.iterations;
  for (uint64_t i = 0; i < n; ++i) {
    Request send, recv;
    auto start = Clock::now();
    c.recv({in.data(), size}, kDataTag, recv);
    c.send({out.data(), size}, kDataTag, send);
    expect_ok(s.engine, send, c, "ping", i);
    expect_ok(s.engine, recv, c, "pong", i);
    samples[i] = std::chrono::duration<double, std::micro>(Clock::now() - start).count() / 2;
  }
  return latency_result(size, n, std::span(samples).first(n));
}

// Server: answers every message with one of the same size.
void pong(Session& s, const Options& o, std::size_t size, std::vector<std::byte>& out, std::vector<std::byte>& in) {
  Connection& c = *s.connection;
  for (uint64_t i = 0; i < o.iterations; ++i) {
    Request send, recv;
    c.recv({in.data(), size}, kDataTag, recv);
    expect_ok(s.engine, recv, c, "ping", i);
    c.send({out.data(), size}, kDataTag, send);
    expect_ok(s.engine, send, c, "pong", i);
  }
}

}  // namespace

void run_msg_bw(const Options& o) {
  Session session(o);
  Reporter reporter(o, *o.mode);
  reporter.banner(session.fields(o), {});
  std::vector<std::byte> buffer;
  for (std::size_t size : o.sizes) {
    if (o.is_server()) {
      std::size_t window = std::clamp<std::size_t>(kReceiveBytesBudget / size, 1, std::max<uint32_t>(1, o.tx_depth));
      buffer.resize(window * size);
      reporter.add(receive_bandwidth(session, o, size, buffer, window));
    } else {
      buffer.resize(size, std::byte{0x5a});
      reporter.add(send_bandwidth(session, o, size, buffer));
    }
  }
  reporter.finish();
}

void run_msg_lat(const Options& o) {
  Session session(o);
  Reporter reporter(o, *o.mode);
  reporter.banner(session.fields(o), {});
  std::vector<std::byte> out(o.max_size(), std::byte{0x3c}), in(o.max_size());
  std::vector<double> samples(o.iterations);
  for (std::size_t size : o.sizes) {
    if (o.is_server()) pong(session, o, size, out, in);
    else reporter.add(ping(session, o, size, out, in, samples));
  }
  reporter.finish();
}

}  // namespace rxio::perf
