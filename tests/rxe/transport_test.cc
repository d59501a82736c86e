// The transport engine between two processes on Soft-RoCE: integrity both ways at
// once, many connections on one link, rendezvous, a slow receiver, a killed peer, the
// byte stream, one-sided access, and both bootstraps.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "base/error.h"
#include "tests/rxe/rxe_env.h"
#include "transport/engine.h"

namespace rxio::test {
namespace {

using namespace std::chrono_literals;
using transport::Connection;
using transport::Engine;
using transport::Request;
using transport::Status;

// Deterministic bytes for message `index` from `side`, so the receiver can check them.
void fill(std::vector<std::byte>& buffer, std::size_t size, uint32_t side, uint32_t index) {
  uint64_t x = (uint64_t(side) << 32 | index) * 0x9E3779B97F4A7C15ull + size;
  for (std::size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    buffer[i] = static_cast<std::byte>(x);
  }
}

bool intact(const std::vector<std::byte>& got, std::size_t size, uint32_t side, uint32_t index) {
  std::vector<std::byte> want(size);
  fill(want, size, side, index);
  return std::memcmp(got.data(), want.data(), size) == 0;
}

transport::Options tcp_options() {
  transport::Options o;
  o.device = loopback_device();
  return o;
}

// tcp_options with small rings, to run out of credits (or memory) quickly.
std::function<transport::Options()> tcp_options_with_ring(uint32_t slots, uint32_t slot_size) {
  return [=] {
    transport::Options o = tcp_options();
    o.ring_slots = slots;
    o.slot_size = slot_size;
    return o;
  };
}

// Runs `server` here and `client` in a child process (fork before any verbs use, so
// neither inherits the other's resources). The client learns the port through a pipe.
// Returns the client's exit status; the client reports failures on stderr.
int run_pair(const std::function<transport::Options()>& options, const std::function<void(Engine&)>& server,
             const std::function<int(Engine&, uint16_t)>& client, const std::string& listen_address,
             pid_t* child_out = nullptr) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[1]);
    uint16_t port = 0;
    if (read(fds[0], &port, sizeof port) != sizeof port) _exit(90);
    int rc = 91;
    try {
      transport::Options o = options();
      if (o.bootstrap == transport::Bootstrap::rdma_cm) o.local_address = cm_address_b();
      Engine engine(o);
      rc = client(engine, port);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "client: %s\n", e.what());
    }
    _exit(rc);
  }
  close(fds[0]);
  if (child_out) *child_out = pid;
  transport::Options o = options();
  if (o.bootstrap == transport::Bootstrap::rdma_cm) o.local_address = cm_address_a();
  {
    Engine engine(o);
    engine.listen(listen_address, 0);
    uint16_t port = engine.listen_port();
    EXPECT_EQ(write(fds[1], &port, sizeof port), ssize_t(sizeof port));
    close(fds[1]);
    server(engine);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

#define CLIENT_CHECK(cond)                                                        \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "client: %s:%d: %s failed\n", __FILE__, __LINE__, #cond); \
      return 1;                                                                   \
    }                                                                             \
  } while (0)

// Both sides send `sizes` to each other at the same time and check what they receive.
bool exchange(Engine& engine, Connection& c, const std::vector<std::size_t>& sizes, uint32_t me) {
  std::size_t largest = *std::max_element(sizes.begin(), sizes.end());
  std::vector<std::byte> out(largest), in(largest);
  bool ok = true;
  for (uint32_t i = 0; i < sizes.size(); ++i) {
    Request send, recv;
    c.recv(in, i, recv);
    fill(out, sizes[i], me, i);
    c.send({out.data(), sizes[i]}, i, send);
    Status s = engine.wait(send, 30s);
    Status r = engine.wait(recv, 30s);
    if (s != Status::ok || r != Status::ok || recv.bytes() != sizes[i] || recv.tag() != i ||
        !intact(in, sizes[i], 1 - me, i)) {
      std::fprintf(stderr, "side %u message %u (%zu B): send %s, recv %s, %zu B, %s\n", me, i, sizes[i],
                   transport::to_string(s), transport::to_string(r), recv.bytes(), c.error_text().c_str());
      ok = false;
      break;
    }
  }
  return ok;
}

std::vector<std::size_t> integrity_sizes() {
  std::vector<std::size_t> sizes = {1, 2, 8 * 1024 - 16, 8 * 1024 - 15, 64 * 1024, 8 << 20};
  std::mt19937 rng(42);
  for (int i = 0; i < 24; ++i) sizes.push_back(1 + rng() % (i % 3 == 0 ? (8u << 20) : 20000u));
  return sizes;
}

TEST(Transport, IntegrityBothWaysAtOnceTcpBootstrap) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  auto sizes = integrity_sizes();
  int rc = run_pair(
      tcp_options,
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        EXPECT_TRUE(exchange(engine, c, sizes, 0));
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect("127.0.0.1", port);
        return exchange(engine, c, sizes, 1) ? 0 : 1;
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

TEST(Transport, IntegrityOverRdmaCmBootstrap) {
  RXIO_REQUIRE_DEVICE(cm_device_a());
  std::vector<std::size_t> sizes = {1, 100, 8 * 1024, 300 * 1024, 2 << 20};
  auto options = [] {
    transport::Options o;
    o.bootstrap = transport::Bootstrap::rdma_cm;
    return o;
  };
  int rc = run_pair(
      options,
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        EXPECT_EQ(engine.device_name(), cm_device_a());
        EXPECT_TRUE(exchange(engine, c, sizes, 0));
      },
      [&](Engine& engine, uint16_t port) {
        CLIENT_CHECK(engine.device_name() == cm_device_b());
        Connection& c = engine.connect(cm_address_a(), port);
        return exchange(engine, c, sizes, 1) ? 0 : 1;
      },
      cm_address_a());
  EXPECT_EQ(rc, 0);
}

TEST(Transport, ThousandConnectionsShareOneQp) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  constexpr int kConnections = 1000;
  int rc = run_pair(
      tcp_options_with_ring(2, 128),
      [&](Engine& engine) {
        std::vector<Connection*> accepted;
        for (int i = 0; i < kConnections; ++i) accepted.push_back(&engine.accept(30s));
        EXPECT_EQ(engine.qp_count(), 1u);
        // Echo one message on each, so both ends prove each connection works.
        for (Connection* c : accepted) {
          std::array<std::byte, 8> buffer;
          Request recv, send;
          c->recv(buffer, transport::kAnyTag, recv);
          ASSERT_EQ(engine.wait(recv, 30s), Status::ok);
          c->send(buffer, recv.tag(), send);
          ASSERT_EQ(engine.wait(send, 30s), Status::ok);
        }
        EXPECT_EQ(engine.stats().connections, std::size_t(kConnections));
      },
      [&](Engine& engine, uint16_t port) {
        std::vector<Connection*> opened;
        for (int i = 0; i < kConnections; ++i) opened.push_back(&engine.connect("127.0.0.1", port));
        CLIENT_CHECK(engine.qp_count() == 1);
        for (int i = 0; i < kConnections; ++i) {
          uint64_t value = 1000000 + i;
          std::array<std::byte, 8> out, in;
          std::memcpy(out.data(), &value, 8);
          Request send, recv;
          opened[i]->send(out, i, send);
          opened[i]->recv(in, transport::kAnyTag, recv);
          CLIENT_CHECK(engine.wait(send, 30s) == Status::ok);
          CLIENT_CHECK(engine.wait(recv, 30s) == Status::ok);
          CLIENT_CHECK(recv.tag() == uint64_t(i) && std::memcmp(in.data(), out.data(), 8) == 0);
        }
        return 0;
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

TEST(Transport, SlowReceiverLosesNothing) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  constexpr uint32_t kMessages = 300;
  int rc = run_pair(
      tcp_options_with_ring(4, 1024),
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        std::this_thread::sleep_for(500ms);  // the sender runs out of credits meanwhile
        std::vector<std::byte> in(4096);
        for (uint32_t i = 0; i < kMessages; ++i) {
          Request recv;
          c.recv(in, transport::kAnyTag, recv);
          ASSERT_EQ(engine.wait(recv, 30s), Status::ok) << c.error_text();
          ASSERT_EQ(recv.tag(), i) << "out of order";
          ASSERT_TRUE(intact(in, recv.bytes(), 1, i)) << "message " << i;
        }
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect("127.0.0.1", port);
        std::vector<std::vector<std::byte>> out(kMessages, std::vector<std::byte>(4096));
        std::vector<Request> sends(kMessages);
        for (uint32_t i = 0; i < kMessages; ++i) {
          std::size_t size = 1 + (i * 37) % 4000;  // eager and rendezvous mixed
          fill(out[i], size, 1, i);
          c.send({out[i].data(), size}, i, sends[i]);
        }
        for (auto& s : sends) CLIENT_CHECK(engine.wait(s, 30s) == Status::ok);
        return 0;
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

// Three tags, small and large messages mixed, all sent at once; the receiver posts
// the first half of its receives before anything arrives and the rest after, some of
// them for any tag: each tag's messages still match in the order they were sent.
TEST(Transport, RepeatedTagsMatchInOrderPostedOrNot) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  constexpr uint32_t kMessages = 120;
  std::vector<std::size_t> sizes(kMessages);
  std::vector<uint64_t> tags(kMessages);
  std::mt19937 rng(7);
  for (uint32_t i = 0; i < kMessages; ++i) {
    sizes[i] = rng() % 2 ? 1 + rng() % 8000 : 8200 + rng() % 90000;
    tags[i] = 1 + rng() % 3;
  }
  const std::size_t largest = *std::max_element(sizes.begin(), sizes.end());
  int rc = run_pair(
      tcp_options,
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        std::vector<std::vector<std::byte>> in(kMessages, std::vector<std::byte>(largest));
        std::vector<Request> recvs(kMessages);
        auto post = [&](uint32_t i) {
          // Posted in sending order, so receive i must get message i.
          uint64_t tag = i >= kMessages * 3 / 4 ? transport::kAnyTag : tags[i];
          c.recv(in[i], tag, recvs[i]);
        };
        for (uint32_t i = 0; i < kMessages / 2; ++i) post(i);
        std::this_thread::sleep_for(500ms);  // the rest arrives unexpected meanwhile
        for (uint32_t i = kMessages / 2; i < kMessages; ++i) post(i);
        for (uint32_t i = 0; i < kMessages; ++i) {
          ASSERT_EQ(engine.wait(recvs[i], 30s), Status::ok) << "receive " << i << ": " << c.error_text();
          ASSERT_EQ(recvs[i].tag(), tags[i]) << "receive " << i;
          ASSERT_EQ(recvs[i].bytes(), sizes[i]) << "receive " << i;
          ASSERT_TRUE(intact(in[i], sizes[i], 1, i)) << "message " << i;
        }
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect("127.0.0.1", port);
        std::vector<std::vector<std::byte>> out(kMessages);
        std::vector<Request> sends(kMessages);
        for (uint32_t i = 0; i < kMessages; ++i) {
          out[i].resize(sizes[i]);
          fill(out[i], sizes[i], 1, i);
          c.send(out[i], tags[i], sends[i]);
        }
        for (auto& s : sends) CLIENT_CHECK(engine.wait(s, 30s) == Status::ok);
        return 0;
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

TEST(Transport, KilledPeerFailsCallsInBoundedTime) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  pid_t child = 0;
  int rc = run_pair(
      tcp_options,
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        std::vector<std::byte> in(1 << 20);
        Request first;
        c.recv(in, transport::kAnyTag, first);
        ASSERT_EQ(engine.wait(first, 30s), Status::ok);
        kill(child, SIGKILL);
        auto start = std::chrono::steady_clock::now();
        Status last = Status::ok;
        for (int i = 0; i < 100000 && last == Status::ok; ++i) {
          Request recv;
          c.recv(in, transport::kAnyTag, recv);
          last = engine.wait(recv, 20s);
        }
        auto took = std::chrono::steady_clock::now() - start;
        EXPECT_EQ(last, Status::failed) << transport::to_string(last);
        EXPECT_TRUE(c.failed());
        EXPECT_NE(c.error_text().find("link to"), std::string::npos) << c.error_text();
        EXPECT_LT(took, 15s);
        // Every later call reports the failure at once.
        Request after;
        EXPECT_EQ(c.send(std::span<const std::byte>(in.data(), 10), 1, after), Status::failed);
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect("127.0.0.1", port);
        std::vector<std::byte> out(64 * 1024);
        for (uint64_t i = 0;; ++i) {  // until killed
          Request send;
          c.send(out, i, send);
          if (engine.wait(send, 30s) != Status::ok) return 1;
        }
      },
      "127.0.0.1", &child);
  EXPECT_EQ(rc, 128 + SIGKILL);
}

TEST(Transport, ByteStreamAndOneSidedAccess) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  constexpr std::size_t kStream = 1 << 20;
  int rc = run_pair(
      tcp_options,
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        // One-sided: expose a region, tell the peer where it is, wait for its "done".
        std::vector<std::byte> region(256 * 1024, std::byte{0});
        auto key = engine.expose(region.data(), region.size()).encode();
        Request send, done;
        c.send(key, 7, send);
        ASSERT_EQ(engine.wait(send, 30s), Status::ok);
        std::array<std::byte, 1> ack;
        c.recv(ack, 8, done);
        ASSERT_EQ(engine.wait(done, 30s), Status::ok);
        EXPECT_TRUE(intact(region, 100000, 1, 77)) << "the peer's RDMA WRITE landed wrong";

        // Stream: read until the peer closes, then check every byte.
        std::vector<std::byte> got;
        std::array<std::byte, 3000> chunk;
        auto deadline = std::chrono::steady_clock::now() + 60s;
        while (!c.stream_closed() && std::chrono::steady_clock::now() < deadline) {
          std::size_t n = c.stream_read(chunk);
          got.insert(got.end(), chunk.begin(), chunk.begin() + static_cast<std::ptrdiff_t>(n));
          if (n == 0) engine.progress();
        }
        ASSERT_EQ(got.size(), kStream);
        EXPECT_TRUE(intact(got, kStream, 1, 5));
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect("127.0.0.1", port);
        std::array<std::byte, transport::RemoteRegion::kEncodedSize> key;
        Request recv;
        c.recv(key, 7, recv);
        CLIENT_CHECK(engine.wait(recv, 30s) == Status::ok);
        auto region = transport::RemoteRegion::decode(key);
        CLIENT_CHECK(region && region->length == 256 * 1024);
        std::vector<std::byte> out(100000), back(100000);
        fill(out, out.size(), 1, 77);
        Request write, read, ack;
        c.write(out, *region, 0, write);
        CLIENT_CHECK(engine.wait(write, 30s) == Status::ok);
        c.read(back, *region, 0, read);
        CLIENT_CHECK(engine.wait(read, 30s) == Status::ok);
        CLIENT_CHECK(std::memcmp(out.data(), back.data(), out.size()) == 0);
        Request bad;
        CLIENT_CHECK(c.write(out, *region, region->length - 10, bad) == Status::truncated);
        std::array<std::byte, 1> one{};
        c.send(one, 8, ack);
        CLIENT_CHECK(engine.wait(ack, 30s) == Status::ok);

        std::vector<std::byte> stream(kStream);
        fill(stream, kStream, 1, 5);
        std::size_t sent = 0;
        auto deadline = std::chrono::steady_clock::now() + 60s;
        while (sent < kStream && std::chrono::steady_clock::now() < deadline) {
          sent += c.stream_write(std::span(stream).subspan(sent));
          engine.progress();
        }
        CLIENT_CHECK(sent == kStream);
        c.close();
        // Stay until the peer has read everything (it answers by closing too).
        Request end;
        std::array<std::byte, 1> none;
        c.recv(none, 9, end);
        Status s = engine.wait(end, 60s);
        CLIENT_CHECK(s == Status::closed || s == Status::failed);
        return 0;
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

// Brings the veth end of cm device A back and waits until its RDMA port is ACTIVE.
void restore_interface_a() {
  EXPECT_EQ(std::system("ip link set v1 up"), 0);
  std::string state_file = "/sys/class/infiniband/" + cm_device_a() + "/ports/1/state";
  for (int i = 0; i < 300; ++i) {
    FILE* f = std::fopen(state_file.c_str(), "r");
    char state[64] = {};
    if (f) {
      std::fgets(state, sizeof state, f);
      std::fclose(f);
    }
    if (std::strstr(state, "ACTIVE")) return;
    std::this_thread::sleep_for(100ms);
  }
  ADD_FAILURE() << cm_device_a() << " did not come back";
}

// Ping-pong on every connection until the link fails; true if every one failed.
bool ping_pong_until_failure(Engine& engine, std::vector<Connection*>& connections, bool serve,
                             const std::function<void(int)>& after_round) {
  std::array<std::byte, 512> out{}, in{};
  auto deadline = std::chrono::steady_clock::now() + 60s;
  for (int round = 0; std::chrono::steady_clock::now() < deadline; ++round) {
    bool any_ok = false;
    for (Connection* c : connections) {
      Request send, recv;
      c->recv(in, transport::kAnyTag, recv);
      if (!serve) c->send(out, 1, send);
      Status r = engine.wait(recv, 20s);
      if (serve && r == Status::ok) c->send(out, 1, send);
      Status s = send.done() ? send.status() : engine.wait(send, 20s);
      any_ok |= r == Status::ok && s == Status::ok;
    }
    after_round(round);
    if (!any_ok) break;
  }
  return std::all_of(connections.begin(), connections.end(), [](Connection* c) { return c->failed(); });
}

TEST(Transport, LinkFailureFailsEveryConnection) {
  RXIO_REQUIRE_DEVICE(cm_device_a());
  if (!std::getenv("RXIO_IN_GUEST")) GTEST_SKIP() << "takes a network interface down: only inside the guest";
  constexpr int kConnections = 3;
  auto options = [] {
    transport::Options o;
    o.bootstrap = transport::Bootstrap::rdma_cm;
    o.qp_timeout = 12;  // about 17 ms per try: the failure shows within a second
    o.qp_retry_count = 3;
    return o;
  };
  int rc = run_pair(
      options,
      [&](Engine& engine) {
        std::vector<Connection*> accepted;
        for (int i = 0; i < kConnections; ++i) accepted.push_back(&engine.accept(30s));
        auto start = std::chrono::steady_clock::time_point{};
        bool all_failed = ping_pong_until_failure(engine, accepted, true, [&](int round) {
          if (round == 20) {
            // The RDMA path dies under live connections; their TCP-level routes would not.
            EXPECT_EQ(std::system("ip link set v1 down"), 0);
            start = std::chrono::steady_clock::now();
          }
        });
        auto took = std::chrono::steady_clock::now() - start;
        restore_interface_a();
        EXPECT_TRUE(all_failed) << "a connection on the failed link still works";
        EXPECT_LT(took, 30s);
        for (Connection* c : accepted) {
          EXPECT_TRUE(c->failed());
          EXPECT_NE(c->error_text().find("link to"), std::string::npos) << c->error_text();
          Request after;
          std::array<std::byte, 1> one{};
          EXPECT_EQ(c->send(one, 1, after), Status::failed) << "every later call reports it";
        }
      },
      [&](Engine& engine, uint16_t port) {
        std::vector<Connection*> opened;
        for (int i = 0; i < kConnections; ++i) opened.push_back(&engine.connect(cm_address_a(), port));
        return ping_pong_until_failure(engine, opened, false, [](int) {}) ? 0 : 1;
      },
      cm_address_a());
  EXPECT_EQ(rc, 0);
}

}  // namespace
}  // namespace rxio::test
