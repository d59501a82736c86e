// The shm backend, on any Linux machine: the conformance suite, a 4 GiB stress with
// every byte checked, the backend choice, and a local impostor refused.
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <thread>

#include "base/error.h"
#include "tests/transport/conformance.h"
#include "transport/oob.h"
#include "transport/shm_connect.h"
#include "transport/wire.h"

namespace rxio::test {

INSTANTIATE_TEST_SUITE_P(Shm, Conformance, ::testing::Values(transport::BackendChoice::shm),
                         [](const auto&) { return std::string("shm"); });

namespace {

transport::Options shm_options() {
  transport::Options o;
  o.backend = transport::BackendChoice::shm;
  return o;
}

// What a connector does first: connect to the acceptor's abstract name.
UniqueFd connect_unix(uint32_t pid, uint64_t nonce) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::string name = "rxio.shm." + std::to_string(pid) + "." + std::to_string(nonce);
  std::memcpy(a.sun_path + 1, name.data(), name.size());
  UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  auto length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), length) != 0) return UniqueFd();
  return s;
}

// The client's side of a test that needs one small message through: 0 when it went.
int send_one(Engine& engine, Connection& c) {
  std::array<std::byte, 4> out{};
  Request s;
  c.send(out, 1, s);
  CLIENT_CHECK(engine.wait(s, 30s) == Status::ok);
  return 0;
}

// Cheap to make and to check at memory speed: word i of message m.
uint64_t pattern(uint64_t message, uint64_t word) { return (message << 40) ^ (word * 0x9E3779B97F4A7C15ull); }

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr uint64_t kStressBytes = 256ull << 20;  // sanitizers check every access: slower
#else
constexpr uint64_t kStressBytes = 4ull << 30;
#endif

TEST(Shm, StressMovesGibibytesIntact) {
  constexpr std::size_t kMessage = 4 << 20;
  constexpr uint64_t kMessages = kStressBytes / kMessage;
  constexpr std::size_t kWindow = 8;
  constexpr std::size_t kWords = kMessage / 8;
  int rc = run_pair(
      shm_options,
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        std::vector<std::vector<uint64_t>> in(kWindow, std::vector<uint64_t>(kWords));
        std::vector<Request> recvs(kWindow);
        auto post = [&](uint64_t m) {
          c.recv(std::as_writable_bytes(std::span(in[m % kWindow])), m, recvs[m % kWindow]);
        };
        for (uint64_t m = 0; m < std::min<uint64_t>(kWindow, kMessages); ++m) post(m);
        uint64_t bad = 0;
        for (uint64_t m = 0; m < kMessages; ++m) {
          Request& r = recvs[m % kWindow];
          ASSERT_EQ(engine.wait(r, 60s), Status::ok) << "message " << m << ": " << c.error_text();
          ASSERT_EQ(r.bytes(), kMessage);
          const auto& words = in[m % kWindow];
          for (std::size_t w = 0; w < kWords; ++w) bad += words[w] != pattern(m, w);
          if (m + kWindow < kMessages) post(m + kWindow);
        }
        EXPECT_EQ(bad, 0u) << "words that arrived wrong";
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect("127.0.0.1", port);
        CLIENT_CHECK(engine.stats().shm_links == 1);
        std::vector<std::vector<uint64_t>> out(kWindow, std::vector<uint64_t>(kWords));
        std::vector<Request> sends(kWindow);
        for (uint64_t m = 0; m < kMessages; ++m) {
          Request& s = sends[m % kWindow];
          if (m >= kWindow) CLIENT_CHECK(engine.wait(s, 60s) == Status::ok);
          auto& words = out[m % kWindow];
          for (std::size_t w = 0; w < kWords; ++w) words[w] = pattern(m, w);
          c.send(std::as_bytes(std::span(words)), m, s);
        }
        for (auto& s : sends) CLIENT_CHECK(!s.done() ? engine.wait(s, 60s) == Status::ok : s.status() == Status::ok);
        return 0;
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

TEST(Shm, AutomaticChoosesShmOnOneHost) {
  int rc = run_pair(
      [] {
        transport::Options o;
        o.backend = transport::BackendChoice::automatic;
        return o;
      },
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        EXPECT_EQ(engine.stats().shm_links, 1u);
        EXPECT_EQ(engine.qp_count(), 0u);
        std::array<std::byte, 4> in;
        Request r;
        c.recv(in, 1, r);
        EXPECT_EQ(engine.wait(r, 30s), Status::ok);
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect("127.0.0.1", port);
        CLIENT_CHECK(engine.stats().shm_links == 1);
        return send_one(engine, c);
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

TEST(Shm, BackendSettingIsChecked) {
  setenv("RXIO_BACKEND", "infiniband", 1);
  try {
    Engine engine;
    ADD_FAILURE() << "RXIO_BACKEND=infiniband was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected one of auto, verbs, shm, tcp"), std::string::npos) << e.what();
  }
  unsetenv("RXIO_BACKEND");
}

// A local process that heard the acceptor's answer but not its token: it gets nothing
// (no arena), the engine carries on, and the real peer connects afterwards.
TEST(Shm, ImpostorWithoutTheTokenIsRefused) {
  int rc = run_pair(
      shm_options,
      [&](Engine& engine) {
        Connection& c = engine.accept(60s);  // refuses the impostor's link on the way
        std::array<std::byte, 8> in;
        Request r;
        c.recv(in, 1, r);
        EXPECT_EQ(engine.wait(r, 30s), Status::ok);
        EXPECT_EQ(engine.stats().links, 1u);
      },
      [&](Engine& engine, uint16_t port) {
        using namespace transport;
        auto channel = oob::Channel::connect("127.0.0.1", port, 10s);
        wire::Offer offer{1u << static_cast<int>(Backend::shm), shm::host_id(), static_cast<uint32_t>(geteuid()),
                          static_cast<uint32_t>(getpid()), shm::namespace_id("net"), shm::namespace_id("pid")};
        channel.send(wire::encode(offer));
        wire::Fault fault{};
        auto choice = wire::decode_choice(channel.receive(10s), fault);
        CLIENT_CHECK(choice && choice->backend == static_cast<uint8_t>(Backend::shm));
        UniqueFd socket = connect_unix(choice->pid, choice->nonce);
        wire::ShmHello hello;
        hello.token = choice->token;
        hello.token[0] ^= 1;  // not the token
        hello.pid = static_cast<uint32_t>(getpid());
        hello.arena_size = 1 << 20;
        hello.control = {4096, 0, 16, 8192};
        // With two file descriptors, as a peer's hello comes, so that the token is what fails.
        auto bytes = wire::encode(hello);
        UniqueFd a(eventfd(0, EFD_CLOEXEC)), b(eventfd(0, EFD_CLOEXEC));
        const int fds[2] = {a.get(), b.get()};
        CLIENT_CHECK(shm::send_with_fds(socket.get(), bytes, fds));
        // The acceptor closes without a word: no hello, no file descriptors.
        char answer;
        CLIENT_CHECK(::recv(socket.get(), &answer, 1, 0) == 0);

        Connection& c = engine.connect("127.0.0.1", port);
        return send_one(engine, c);
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

}  // namespace
}  // namespace rxio::test
