// The tcp backend, on any Linux machine: the conformance suite, and a peer that writes
// where it has no key.
#include <sys/socket.h>

#include <cstring>

#include "base/error.h"
#include "tests/transport/conformance.h"
#include "transport/oob.h"
#include "transport/tcp_port.h"
#include "transport/wire.h"

namespace rxio::test {

INSTANTIATE_TEST_SUITE_P(Tcp, Conformance, ::testing::Values(transport::BackendChoice::tcp),
                         [](const auto&) { return std::string("tcp"); });

namespace {

// A peer that speaks the bootstrap, then sends one frame writing to an address it was
// never given a key for: the engine must close the link with the reason, not write.
TEST(Tcp, WriteWithoutAKeyFailsTheLink) {
  std::vector<std::byte> victim(64, std::byte{0x11});
  int rc = run_pair(
      [] {
        transport::Options o;
        o.backend = transport::BackendChoice::tcp;
        return o;
      },
      [&](Engine& engine) {
        // No connection ever opens: the link comes and fails while accept() waits.
        EXPECT_THROW(engine.accept(3s), Error);
        EXPECT_EQ(engine.stats().failed_links, 1u);
        EXPECT_EQ(victim[0], std::byte{0x11}) << "the frame was written";
      },
      [&](Engine&, uint16_t port) {
        using namespace transport;
        auto channel = oob::Channel::connect("127.0.0.1", port, 10s);
        channel.send(wire::encode(wire::Offer{1u << static_cast<int>(Backend::tcp)}));
        wire::Fault fault{};
        auto choice = wire::decode_choice(channel.receive(10s), fault);
        CLIENT_CHECK(choice && choice->backend == static_cast<uint8_t>(Backend::tcp));
        channel.send(wire::encode(wire::TcpHello{{4096, 1, 16, 8192}}));
        CLIENT_CHECK(wire::decode_tcp_hello(channel.receive(10s), fault));
        // A write frame: op, imm, length, key, address, tag; then the bytes.
        std::array<std::byte, tcp_frame::kHeaderSize + 8> frame{};
        frame[0] = std::byte{tcp_frame::write};
        uint32_t length = 8, key = 12345;
        uint64_t address = reinterpret_cast<uint64_t>(victim.data());
        std::memcpy(frame.data() + 8, &length, 4);
        std::memcpy(frame.data() + 12, &key, 4);
        std::memcpy(frame.data() + 16, &address, 8);
        CLIENT_CHECK(::send(channel.native_fd(), frame.data(), frame.size(), MSG_NOSIGNAL) == ssize_t(frame.size()));
        char byte;
        CLIENT_CHECK(::recv(channel.native_fd(), &byte, 1, 0) <= 0);  // closed on us (EOF or reset)
        return 0;
      },
      "127.0.0.1");
  EXPECT_EQ(rc, 0);
}

}  // namespace
}  // namespace rxio::test
