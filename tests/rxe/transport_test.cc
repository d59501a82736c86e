// The transport over Soft-RoCE: the conformance suite (tests/transport/conformance.cc)
// on the verbs backend, the rdma_cm bootstrap, and a link whose RDMA path dies.
#include <signal.h>

#include <cstdlib>
#include <thread>

#include "tests/transport/conformance.h"

namespace rxio::test {

INSTANTIATE_TEST_SUITE_P(Verbs, Conformance, ::testing::Values(transport::BackendChoice::verbs),
                         [](const auto&) { return std::string("verbs"); });

namespace {

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

// Brings the veth end of cm device A back, with its route (tests/rxe/guest/link-up.sh),
// and waits until its RDMA port is ACTIVE. Soft-RoCE still carries no new connection
// on a device whose port went down under one (it receives nothing more), and the
// device cannot be made anew while this process has it open: a test that takes the
// port down is the last one on that device in its guest (tests/rxe/meson.build).
void restore_interface_a() {
  const std::string up = env_or("RXIO_GUEST_LINK_UP", "false") + " v1";
  EXPECT_EQ(std::system(up.c_str()), 0);
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
        bool all_failed = ping_pong_until_failure(engine, accepted, true, [&](int round) {
          // The RDMA path dies under live connections; their TCP-level routes would not.
          if (round == 20) {
            EXPECT_EQ(std::system("ip link set v1 down"), 0);
          }
        });
        EXPECT_TRUE(all_failed) << "a connection on the failed link still works";
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
  restore_interface_a();
  EXPECT_EQ(rc, 0);
}

// An idle link has nothing in flight whose retries could fail: only the device's
// asynchronous event (IBV_EVENT_PORT_ERR when the netdev under rxe goes down) tells.
TEST(Transport, PortDownFailsAnIdleLink) {
  RXIO_REQUIRE_DEVICE(cm_device_a());
  if (!std::getenv("RXIO_IN_GUEST")) GTEST_SKIP() << "takes a network interface down: only inside the guest";
  auto options = [] {
    transport::Options o;
    o.bootstrap = transport::Bootstrap::rdma_cm;
    return o;
  };
  pid_t client_pid = 0;
  int rc = run_pair(
      options,
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        std::array<std::byte, 64> in{};
        Request first, second;
        c.recv(in, transport::kAnyTag, first);
        if (engine.wait(first, 20s) != Status::ok) {
          ADD_FAILURE() << "the client's message did not come";
          ::kill(client_pid, SIGTERM);
          return;
        }
        c.recv(in, transport::kAnyTag, second);  // the client sends nothing more
        EXPECT_EQ(std::system("ip link set v1 down"), 0);
        // Nothing in flight times out within the wait: the error text names the event.
        EXPECT_EQ(engine.wait(second, 20s), Status::failed);
        EXPECT_TRUE(c.failed());
        EXPECT_NE(c.error_text().find(cm_device_a() + " reported port error (port 1 is down)"), std::string::npos)
            << c.error_text();
        ::kill(client_pid, SIGTERM);  // it waits on its side of the link, which has no way to tell
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect(cm_address_a(), port);
        std::array<std::byte, 64> out{}, in{};
        Request send, recv;
        c.send(out, 1, send);
        CLIENT_CHECK(engine.wait(send, 20s) == Status::ok);
        c.recv(in, transport::kAnyTag, recv);
        engine.wait(recv, 120s);
        return 0;
      },
      cm_address_a(), &client_pid);
  restore_interface_a();
  EXPECT_TRUE(rc == 0 || rc == 128 + SIGTERM) << rc;
}

}  // namespace
}  // namespace rxio::test
