// The transport conformance suite: what every backend must do, as a test parametrized
// by backend (each test binary instantiates it for the backends it can run).
#include "tests/transport/conformance.h"

#include <signal.h>

#include <thread>

namespace rxio::test {

TEST_P(Conformance, IntegrityBothWaysAtOnce) {
  auto sizes = integrity_sizes();
  int rc = run_pair(
      options(),
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

TEST_P(Conformance, ThousandConnectionsShareOneLink) {
  constexpr int kConnections = 1000;
  int rc = run_pair(
      options(2, 128),
      [&](Engine& engine) {
        std::vector<Connection*> accepted;
        for (int i = 0; i < kConnections; ++i) accepted.push_back(&engine.accept(30s));
        EXPECT_TRUE(one_link(engine));
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
        CLIENT_CHECK(one_link(engine));
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

// Connections opened and released one after another reuse what released ones had:
// an shm arena that holds a few dozen rings at once serves hundreds of connections,
// and every backend frees them.
TEST_P(Conformance, ReleasedConnectionsGiveBackTheirRings) {
  constexpr int kConnections = 400;
  auto small = [base = options(2, 128)] {
    transport::Options o = base();
    o.shm_arena = 4u << 20;  // room for about 60 connections' rings
    return o;
  };
  // Progresses until the engine holds no connection (the last releases are in flight).
  auto all_freed = [](Engine& engine) {
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (engine.stats().connections > 0 && std::chrono::steady_clock::now() < deadline) engine.progress();
    return engine.stats().connections == 0;
  };
  int rc = run_pair(
      small,
      [&](Engine& engine) {
        for (int i = 0; i < kConnections; ++i) {
          Connection& c = engine.accept(30s);
          std::array<std::byte, 8> buffer;
          Request recv, send;
          c.recv(buffer, transport::kAnyTag, recv);
          ASSERT_EQ(engine.wait(recv, 30s), Status::ok) << "connection " << i;
          c.send(buffer, recv.tag(), send);
          ASSERT_EQ(engine.wait(send, 30s), Status::ok) << "connection " << i;
          c.release();
        }
        EXPECT_TRUE(all_freed(engine)) << engine.stats().connections << " connections left";
        EXPECT_TRUE(one_link(engine));
        // The client still waits for this side's last releases: its engine goes first
        // (its link then fails here), rather than this one after its bounded wait
        // for what it sent, which a slow client (a sanitized build) can outlast.
        auto until = std::chrono::steady_clock::now() + 30s;
        while (engine.stats().failed_links == 0 && engine.stats().links > 0 && std::chrono::steady_clock::now() < until)
          engine.on_wake();
      },
      [&](Engine& engine, uint16_t port) {
        for (int i = 0; i < kConnections; ++i) {
          Connection& c = engine.connect("127.0.0.1", port);
          uint64_t value = 7000000 + i;
          std::array<std::byte, 8> out, in;
          std::memcpy(out.data(), &value, 8);
          Request send, recv;
          c.send(out, i, send);
          c.recv(in, transport::kAnyTag, recv);
          CLIENT_CHECK(engine.wait(send, 30s) == Status::ok);
          CLIENT_CHECK(engine.wait(recv, 30s) == Status::ok);
          CLIENT_CHECK(recv.tag() == uint64_t(i) && std::memcmp(in.data(), out.data(), 8) == 0);
          c.release();
        }
        CLIENT_CHECK(all_freed(engine));
        return 0;
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

TEST_P(Conformance, SlowReceiverLosesNothing) {
  constexpr uint32_t kMessages = 300;
  int rc = run_pair(
      options(4, 1024),
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
TEST_P(Conformance, RepeatedTagsMatchInOrderPostedOrNot) {
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
      options(),
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

TEST_P(Conformance, KilledPeerFailsCallsInBoundedTime) {
  pid_t child = 0;
  int rc = run_pair(
      options(),
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
        // Released, the dead peer's link goes, with its descriptors and memory.
        EXPECT_EQ(engine.stats().links, 1u);
        c.release();
        engine.on_wake();
        EXPECT_EQ(engine.stats().links, 0u);
        EXPECT_EQ(engine.stats().connections, 0u);
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

// The receiver's process ends while the sender still writes: the sender's calls fail,
// and its process lives. Two writes with pauses between them and no progress call:
// the first meets the closed socket (and draws a reset), the second the reset, where a
// plain write would raise SIGPIPE.
TEST_P(Conformance, SenderSurvivesAReceiverThatVanishes) {
  int rc = run_pair(
      options(),
      [&](Engine& engine) {
        Connection& c = engine.accept(30s);
        std::array<std::byte, 100> out{};
        Request send;
        c.send(out, 1, send);
        ASSERT_EQ(engine.wait(send, 30s), Status::ok);
        std::this_thread::sleep_for(300ms);  // the receiver is gone by now
        c.stream_write(out);
        std::this_thread::sleep_for(300ms);
        c.stream_write(out);
        Request after;
        c.recv(out, 2, after);
        EXPECT_EQ(engine.wait(after, 20s), Status::failed) << c.error_text();
      },
      [&](Engine& engine, uint16_t port) {
        Connection& c = engine.connect("127.0.0.1", port);
        std::array<std::byte, 100> in;
        Request first;
        c.recv(in, 1, first);
        CLIENT_CHECK(engine.wait(first, 30s) == Status::ok);
        _exit(0);  // no goodbye: the sender finds out by writing
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

TEST_P(Conformance, ByteStreamAndOneSidedAccess) {
  constexpr std::size_t kStream = 1 << 20;
  int rc = run_pair(
      options(),
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

}  // namespace rxio::test
