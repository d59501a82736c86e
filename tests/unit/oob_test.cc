// The out-of-band TCP channel: framing, timeouts and the errors users see.
#include "transport/oob.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include "base/error.h"

namespace rxio::transport::oob {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;
constexpr milliseconds kTimeout{2000};

std::vector<std::byte> pattern(std::size_t size) {
  std::vector<std::byte> data(size);
  for (std::size_t i = 0; i < size; ++i) data[i] = static_cast<std::byte>(i * 7 + 3);
  return data;
}

struct Pair {
  Listener listener{"127.0.0.1", 0};
  // The kernel completes the handshake from its backlog, so connect returns before
  // accept is called: no second thread needed.
  Channel client = Channel::connect("127.0.0.1", listener.port(), kTimeout);
  Channel server = listener.accept(kTimeout);
};

// Runs `action`, which must throw rxio::Error; returns it for inspection.
template <typename Action>
Error error_from(Action&& action) {
  try {
    action();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "no rxio::Error was thrown";
  return Error(0, "nothing thrown");
}

// A port nobody listens on: one a listener just had.
uint16_t closed_port() { return Listener("127.0.0.1", 0).port(); }

TEST(OobChannel, RoundTripsFramesOfZeroOneAnd64KiBBothWays) {
  Pair p;
  for (std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{64 * 1024}}) {
    SCOPED_TRACE(size);
    const auto data = pattern(size);
    p.client.send(data);
    EXPECT_EQ(p.server.receive(kTimeout), data);
    p.server.send(data);
    EXPECT_EQ(p.client.receive(kTimeout), data);
  }
}

TEST(OobChannel, KeepsFrameBoundariesWhenFramesArriveTogether) {
  Pair p;
  p.client.send(pattern(3));
  p.client.send(pattern(0));
  p.client.send(pattern(5));
  EXPECT_EQ(p.server.receive(kTimeout), pattern(3));
  EXPECT_EQ(p.server.receive(kTimeout), pattern(0));
  EXPECT_EQ(p.server.receive(kTimeout), pattern(5));
}

TEST(OobChannel, NamesThePeerAndDisablesNagle) {
  Pair p;
  EXPECT_EQ(p.client.peer(), "127.0.0.1:" + std::to_string(p.listener.port()));
  EXPECT_THAT(p.server.peer(), HasSubstr("127.0.0.1:"));
  for (const Channel* channel : {&p.client, &p.server}) {
    int flag = 0;
    socklen_t length = sizeof flag;
    ASSERT_GE(channel->native_fd(), 0);
    ASSERT_EQ(getsockopt(channel->native_fd(), IPPROTO_TCP, TCP_NODELAY, &flag, &length), 0);
    EXPECT_NE(flag, 0);
  }
}

TEST(OobChannel, ReceiveTimesOutAndTheChannelStaysUsable) {
  Pair p;
  Error e = error_from([&] { p.server.receive(milliseconds(100)); });
  EXPECT_EQ(e.code().value(), ETIMEDOUT);
  EXPECT_EQ(e.where(), p.server.peer());
  EXPECT_THAT(e.what(), HasSubstr("100 ms"));
  p.client.send(pattern(9));
  EXPECT_EQ(p.server.receive(kTimeout), pattern(9));
}

TEST(OobChannel, RefusedConnectAsksWhetherTheServerRuns) {
  const uint16_t port = closed_port();
  Error e = error_from([&] { Channel::connect("127.0.0.1", port, kTimeout); });
  EXPECT_EQ(e.code().value(), ECONNREFUSED);
  EXPECT_EQ(e.where(), "127.0.0.1:" + std::to_string(port));
  EXPECT_EQ(e.fix(), "is the server running? (port " + std::to_string(port) + ")");
}

TEST(OobChannel, PeerCloseIsReportedAsSuch) {
  Pair p;
  p.server = Channel::connect("127.0.0.1", p.listener.port(), kTimeout);  // drops the accepted one
  Error e = error_from([&] { p.client.receive(kTimeout); });
  EXPECT_EQ(e.code().value(), ECONNRESET);
  EXPECT_THAT(e.fix(), HasSubstr("peer closed the connection"));
  EXPECT_EQ(p.client.native_fd(), -1);
}

TEST(OobChannel, OversizedFrameIsRefusedAndClosesTheChannel) {
  Pair p;
  p.client.send(pattern(100));
  Error e = error_from([&] { p.server.receive(kTimeout, 99); });
  EXPECT_EQ(e.code().value(), EMSGSIZE);
  EXPECT_THAT(e.what(), HasSubstr("100 bytes (at most 99"));
  EXPECT_EQ(p.server.native_fd(), -1);
  EXPECT_EQ(error_from([&] { p.server.receive(kTimeout); }).code().value(), EBADF);
  // The client sees the close.
  EXPECT_THAT(error_from([&] { p.client.receive(kTimeout); }).fix(), HasSubstr("peer closed"));
}

TEST(OobChannel, TruncatedHeaderIsAnEofInsideAFrame) {
  Listener listener("127.0.0.1", 0);
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(listener.port());
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
  const unsigned char half_header[2] = {0, 0};
  ASSERT_EQ(::write(fd, half_header, sizeof half_header), 2);
  ::close(fd);

  Channel server = listener.accept(kTimeout);
  Error e = error_from([&] { server.receive(kTimeout); });
  EXPECT_EQ(e.code().value(), ECONNRESET);
  EXPECT_THAT(e.what(), HasSubstr("after 2 of 4 bytes"));
  EXPECT_THAT(e.fix(), HasSubstr("peer closed the connection"));
}

TEST(OobListener, AcceptTimesOut) {
  Listener listener("127.0.0.1", 0);
  Error e = error_from([&] { listener.accept(milliseconds(50)); });
  EXPECT_EQ(e.code().value(), ETIMEDOUT);
  EXPECT_EQ(e.where(), "127.0.0.1:" + std::to_string(listener.port()));
}

TEST(OobListener, FdTurnsReadableWhenAClientWaits) {
  Listener listener("127.0.0.1", 0);
  pollfd pfd{.fd = listener.native_fd(), .events = POLLIN, .revents = 0};
  ASSERT_GE(pfd.fd, 0);
  EXPECT_EQ(::poll(&pfd, 1, 0), 0);
  Channel client = Channel::connect("127.0.0.1", listener.port(), kTimeout);
  EXPECT_EQ(::poll(&pfd, 1, 1000), 1);
  Channel server = listener.accept(milliseconds(0));
  client.send(pattern(4));
  EXPECT_EQ(server.receive(kTimeout), pattern(4));
}

TEST(OobListener, RebindsAPortWhoseConnectionsLingerInTimeWait) {
  uint16_t port = 0;
  {
    Pair p;
    port = p.listener.port();
    p.client.send(pattern(1));
    EXPECT_EQ(p.server.receive(kTimeout), pattern(1));
    p.server = Channel::connect("127.0.0.1", port, kTimeout);  // the server side closes first
    EXPECT_THAT(error_from([&] { p.client.receive(kTimeout); }).fix(), HasSubstr("peer closed"));
  }
  Listener again("127.0.0.1", port);  // SO_REUSEADDR, or EADDRINUSE here
  EXPECT_EQ(again.port(), port);
}

TEST(OobListener, BusyPortAndForeignAddressGiveTheirFix) {
  Listener first("127.0.0.1", 0);
  Error busy = error_from([&] { Listener("127.0.0.1", first.port()); });
  EXPECT_EQ(busy.code().value(), EADDRINUSE);
  EXPECT_THAT(busy.fix(), HasSubstr("another process listens on port"));
  EXPECT_EQ(error_from([] { Listener("not an address", 0); }).code().value(), EINVAL);
}

TEST(OobChannel, MovedFromChannelRefusesToWork) {
  Pair p;
  Channel moved = std::move(p.client);
  EXPECT_EQ(p.client.native_fd(), -1);  // NOLINT(bugprone-use-after-move): the point
  EXPECT_EQ(error_from([&] { p.client.send(pattern(1)); }).code().value(), EBADF);
  moved.send(pattern(2));
  EXPECT_EQ(p.server.receive(kTimeout), pattern(2));
}

}  // namespace
}  // namespace rxio::transport::oob
