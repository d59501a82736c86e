// The shim's fd table and readiness emulation, through the calls interpose.cc hands
// over, on real kernel sockets of this process (no preload: the test calls them
// itself, where a program's call would).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "shim/calls.h"
#include "shim/state.h"

namespace rxio::shim {
namespace {

Shim& sh() { return Shim::get(); }

int tracked_socket() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  created(fd);
  return fd;
}

bool open_fd(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

// A listener on a loopback port, and a client and server connected through the
// shim's listen, connect and accept, all three owned by it.
struct Pair {
  int listener = -1, client = -1, server = -1;

  Pair() {
    listener = tracked_socket();
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof address;
    EXPECT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&address), length), 0);
    EXPECT_EQ(::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length), 0);
    EXPECT_EQ(listen_on(listener, 8), 0);
    client = tracked_socket();
    EXPECT_EQ(connect_on(client, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
    server = accept_on(listener, nullptr, nullptr, SOCK_CLOEXEC);
    EXPECT_GE(server, 0);
  }
  ~Pair() {
    for (int fd : {server, client, listener})
      if (fd >= 0) close_fd(fd);
  }
};

TEST(ShimTable, TracksASocketUntilItsClose) {
  int fd = tracked_socket();
  Socket* s = sh().socket_of(fd);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->mode.load(), Socket::Mode::fresh);
  EXPECT_EQ(s->fds, std::vector<int>{fd});
  EXPECT_EQ(close_fd(fd), 0);
  EXPECT_EQ(sh().socket_of(fd), nullptr);
  EXPECT_FALSE(open_fd(fd)) << "close_fd closes the kernel's fd too";
}

TEST(ShimTable, DupSharesOneSocketUntilTheLastCloseThenItServesTheNext) {
  int fd = tracked_socket();
  Socket* s = sh().socket_of(fd);
  int copy = ::dup(fd);
  ASSERT_GE(copy, 0);
  EXPECT_EQ(duplicate(fd, copy), copy);
  EXPECT_EQ(sh().socket_of(copy), s);
  EXPECT_EQ(s->fds, (std::vector<int>{fd, copy}));

  EXPECT_EQ(close_fd(fd), 0);
  EXPECT_EQ(sh().socket_of(fd), nullptr);
  EXPECT_EQ(sh().socket_of(copy), s) << "the other fd still names it";
  EXPECT_EQ(s->fds, std::vector<int>{copy});
  EXPECT_TRUE(open_fd(copy));

  EXPECT_EQ(close_fd(copy), 0);
  EXPECT_EQ(sh().socket_of(copy), nullptr);
  // Entries are recycled, never freed (the lock-free fast path may still read one),
  // and come back as new.
  int next = tracked_socket();
  EXPECT_EQ(sh().socket_of(next), s);
  EXPECT_EQ(s->fds, std::vector<int>{next});
  EXPECT_EQ(s->mode.load(), Socket::Mode::fresh);
  EXPECT_FALSE(s->tried.load());
  close_fd(next);
}

TEST(ShimTable, Dup2OverAnOwnedSocketForgetsIt) {
  int a = tracked_socket(), b = tracked_socket();
  Socket* sa = sh().socket_of(a);
  // As the interposed dup2 does it: the target is forgotten while it still names its
  // own socket, then replaced.
  replacing(b);
  EXPECT_EQ(sh().socket_of(b), nullptr);
  ASSERT_EQ(::dup2(a, b), b);
  EXPECT_EQ(duplicate(a, b), b);
  EXPECT_EQ(sh().socket_of(b), sa) << "b now names a's socket";
  EXPECT_EQ(sa->fds, (std::vector<int>{a, b}));
  close_fd(b);
  close_fd(a);
  EXPECT_EQ(sh().socket_of(a), nullptr);
}

// Fork, exec, exit and failed links walk the sockets that began a move: each listed
// once, until the socket is recycled.
TEST(ShimTable, SocketsThatBeganAMoveAreListedUntilRecycled) {
  int a = tracked_socket(), b = tracked_socket(), c = tracked_socket();
  Socket *sa = sh().socket_of(a), *sb = sh().socket_of(b), *sc = sh().socket_of(c);
  auto listed = [] {
    std::vector<Socket*> sockets;
    for (Socket* s = sh().moved_sockets; s; s = s->moved_next) sockets.push_back(s);
    return sockets;
  };
  ASSERT_TRUE(listed().empty());
  {
    std::lock_guard lock(sh().mutex);
    for (Socket* s : {sa, sb, sc, sb}) sh().list_moved(*s);
  }
  EXPECT_EQ(listed(), (std::vector<Socket*>{sc, sb, sa}));
  EXPECT_EQ(close_fd(b), 0);
  EXPECT_EQ(listed(), (std::vector<Socket*>{sc, sa})) << "unlisted from the middle";
  EXPECT_EQ(close_fd(c), 0);
  EXPECT_EQ(listed(), (std::vector<Socket*>{sa})) << "unlisted from the head";
  EXPECT_EQ(close_fd(a), 0);
  EXPECT_TRUE(listed().empty());
}

// A client connection back on TCP for a failed link moves again after 16 times
// RXIO_SHIM_MOVE_AFTER more calls, then 256 times, up to RXIO_SHIM_MOVE_AGAIN times;
// one handed over by its peer stays.
TEST(ShimTable, AConnectionBackFromAFailedLinkMovesAgainLater) {
  int fd = tracked_socket();
  Socket* s = sh().socket_of(fd);
  const uint32_t after = sh().move_after, again = sh().move_again;
  sh().move_after = 2;
  sh().move_again = 2;
  s->mode = Socket::Mode::tcp;
  EXPECT_FALSE(due_to_move(sh(), *s));
  EXPECT_TRUE(due_to_move(sh(), *s)) << "the first move, at RXIO_SHIM_MOVE_AFTER";
  auto back_for_a_failed_link = [&] {
    s->back = Returning{};
    s->back.peer_have = s->back.peer.size();  // the peer's Resume read: it resumed itself
    std::lock_guard lock(sh().mutex);
    sh().after_return(*s);
  };
  for (uint32_t threshold : {32u, 512u}) {
    back_for_a_failed_link();
    EXPECT_FALSE(s->tried.load());
    EXPECT_EQ(move_threshold(sh(), *s), threshold);
    uint32_t calls = 1;
    while (!due_to_move(sh(), *s)) ++calls;
    EXPECT_EQ(calls, threshold);
  }
  back_for_a_failed_link();
  EXPECT_TRUE(s->tried.load()) << "RXIO_SHIM_MOVE_AGAIN times, then it stays";
  EXPECT_FALSE(due_to_move(sh(), *s));

  s->failed_links = 0;
  s->back = Returning{};
  s->back.peer_have = s->back.peer.size();
  s->back.peer_hands_over = true;
  {
    std::lock_guard lock(sh().mutex);
    sh().after_return(*s);
  }
  EXPECT_TRUE(s->tried.load()) << "another process of the peer's goes on with it";
  sh().move_after = after;
  sh().move_again = again;
  EXPECT_EQ(close_fd(fd), 0);
}

// A peer that hands its connection over (inetd's parent) writes its Resume, then its
// kept bytes; the process it hands to (the child) writes once this side answers. So
// the answer waits until every kept byte is in: an earlier one let the child's first
// bytes land among the parent's, and this side skipped the child's bytes for them.
TEST(ShimTable, AHandOverIsAnsweredOnlyOnceItsKeptBytesAreIn) {
  Pair p;
  Socket* s = sh().socket_of(p.client);
  s->mode = Socket::Mode::returning;
  s->back = Returning{};
  s->rxio_read = 100;  // the peer's bytes read here over rxio
  s->back.resume = negotiation::encode(negotiation::Resume{0, 0});  // nothing of this side's to send back
  // From byte 40, 100 kept: 60 read here already, 40 new.
  std::vector<unsigned char> kept(100);
  for (std::size_t i = 0; i < kept.size(); ++i) kept[i] = static_cast<unsigned char>(40 + i);
  const auto hand_over = negotiation::encode(negotiation::Resume{40, 100, true, 0});
  ASSERT_EQ(::send(p.server, hand_over.data(), hand_over.size(), 0), ssize_t(hand_over.size()));
  ASSERT_EQ(::send(p.server, kept.data(), 70, 0), 70);
  auto carry_on = [&] {
    std::lock_guard lock(sh().mutex);
    sh().go_on_returning(p.client, *s);
  };
  carry_on();
  EXPECT_FALSE(s->back.in_done);
  EXPECT_EQ(s->back.resume_sent, 0u) << "answered before the last kept bytes were in";
  unsigned char answer[64];
  EXPECT_EQ(::recv(p.server, answer, sizeof answer, MSG_DONTWAIT), -1);
  ASSERT_EQ(::send(p.server, kept.data() + 70, 30, 0), 30);
  for (int i = 0; i < 100 && s->mode == Socket::Mode::returning; ++i) carry_on();
  EXPECT_EQ(s->mode, Socket::Mode::tcp) << "answered and through";
  ASSERT_EQ(s->ahead.size() - s->ahead_read, 40u) << "the kept bytes not read here, for the program";
  EXPECT_EQ(std::memcmp(s->ahead.data() + s->ahead_read, kept.data() + 60, 40), 0);
  pollfd answered{p.server, POLLIN, 0};
  ASSERT_EQ(::poll(&answered, 1, 5000), 1);
  ASSERT_EQ(::recv(p.server, answer, sizeof answer, MSG_DONTWAIT), ssize_t(negotiation::kResumeSize));
  auto resume = negotiation::decode_resume(std::span(reinterpret_cast<const std::byte*>(answer), negotiation::kResumeSize));
  ASSERT_TRUE(resume);
  EXPECT_FALSE(resume->hand_over);
}

// The table processes that share a listener after fork keep in shared memory: who
// accepted which connection, and the rdma_cm port that one answers remote clients at.
TEST(ShimTable, AcceptorsNameTheOwnerAndItsPortUntilErased) {
  Acceptors acceptors;
  ASSERT_TRUE(acceptors.map());
  auto v4 = [](const char* ip, uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    ::inet_pton(AF_INET, ip, &a.sin_addr);
    return *Endpoint::from(reinterpret_cast<sockaddr*>(&a));
  };
  const Tuple one{v4("192.0.2.7", 40000), v4("192.0.2.1", 8080)};
  const Tuple other{v4("192.0.2.7", 40001), v4("192.0.2.1", 8080)};
  const auto me = static_cast<uint32_t>(::getpid());
  EXPECT_EQ(acceptors.owner(one).pid, 0u);
  acceptors.record(one, {me, 51234});
  EXPECT_EQ(acceptors.owner(one).pid, me);
  EXPECT_EQ(acceptors.owner(one).cm_port, 51234u);
  EXPECT_EQ(acceptors.owner(other).pid, 0u);
  acceptors.erase(one, me + 1);  // only its owner erases it
  EXPECT_EQ(acceptors.owner(one).pid, me);
  acceptors.erase(one, me);
  EXPECT_EQ(acceptors.owner(one).pid, 0u);
}

TEST(ShimTable, ListenConnectAcceptAndShutdownSetTheModes) {
  Pair pair;
  Socket* l = sh().socket_of(pair.listener);
  Socket* c = sh().socket_of(pair.client);
  Socket* s = sh().socket_of(pair.server);
  ASSERT_TRUE(l && c && s);
  EXPECT_EQ(l->mode.load(), Socket::Mode::listening);
  EXPECT_EQ(c->mode.load(), Socket::Mode::tcp);
  EXPECT_EQ(s->mode.load(), Socket::Mode::tcp);
  EXPECT_FALSE(c->server);
  EXPECT_TRUE(s->server);

  // A half-closed connection never moves.
  EXPECT_EQ(shutdown_on(pair.client, SHUT_WR), 0);
  EXPECT_TRUE(c->write_shut);
  EXPECT_FALSE(c->read_shut);
  EXPECT_TRUE(c->tried.load());
  char byte;
  iovec iov{&byte, 1};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  EXPECT_EQ(receive(pair.server, &message, 0), 0) << "the server reads the end";
}

// ---- readiness -------------------------------------------------------------------------

short poll_one(int fd, short events, int timeout_ms = 0) {
  pollfd p{fd, events, 0};
  pollfd fds[3] = {p};
  EXPECT_GE(poll_any(fds, 1, timeout_ms, nullptr), 0);
  return fds[0].revents;
}

ssize_t send_bytes(int fd, const char* text) {
  iovec iov{const_cast<char*>(text), std::strlen(text)};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  return transmit(fd, &message, 0);
}

TEST(ShimReadiness, PollAndSelectReportWhatTheKernelSeesOnTcp) {
  Pair pair;
  EXPECT_EQ(poll_one(pair.client, POLLIN | POLLOUT), POLLOUT);
  ASSERT_EQ(send_bytes(pair.server, "ping"), 4);
  EXPECT_EQ(poll_one(pair.client, POLLIN | POLLOUT, 1000), POLLIN | POLLOUT);

  fd_set readable, writable;
  FD_ZERO(&readable);
  FD_ZERO(&writable);
  FD_SET(pair.client, &readable);
  FD_SET(pair.server, &readable);
  FD_SET(pair.server, &writable);
  const int top = std::max(pair.client, pair.server) + 1;
  EXPECT_EQ(select_any(top, &readable, &writable, nullptr, 0, nullptr), 2);
  EXPECT_TRUE(FD_ISSET(pair.client, &readable));
  EXPECT_FALSE(FD_ISSET(pair.server, &readable));
  EXPECT_TRUE(FD_ISSET(pair.server, &writable));
}

TEST(ShimReadiness, EpollLevelEdgeAndOneShot) {
  Pair pair;
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  ASSERT_GE(ep, 0);
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLET;
  ev.data.u64 = 7;
  ASSERT_EQ(epoll_control(ep, EPOLL_CTL_ADD, pair.client, &ev), 0);
  EXPECT_EQ(epoll_control(ep, EPOLL_CTL_ADD, pair.client, &ev), -1);
  EXPECT_EQ(errno, EEXIST);

  epoll_event got[4];
  EXPECT_EQ(epoll_wait_any(ep, got, 4, 0, nullptr), 0);
  ASSERT_EQ(send_bytes(pair.server, "one"), 3);
  ASSERT_EQ(epoll_wait_any(ep, got, 4, 1000, nullptr), 1);
  EXPECT_EQ(got[0].data.u64, 7u);
  EXPECT_EQ(epoll_wait_any(ep, got, 4, 0, nullptr), 0) << "edge-triggered: once per arrival";
  ASSERT_EQ(send_bytes(pair.server, "two"), 3);
  EXPECT_EQ(epoll_wait_any(ep, got, 4, 1000, nullptr), 1);

  ev.events = EPOLLIN | EPOLLONESHOT;
  ASSERT_EQ(epoll_control(ep, EPOLL_CTL_MOD, pair.client, &ev), 0);
  EXPECT_EQ(epoll_wait_any(ep, got, 4, 0, nullptr), 1);
  EXPECT_EQ(epoll_wait_any(ep, got, 4, 0, nullptr), 0) << "one-shot: disarmed after one report";
  ASSERT_EQ(epoll_control(ep, EPOLL_CTL_MOD, pair.client, &ev), 0);
  EXPECT_EQ(epoll_wait_any(ep, got, 4, 0, nullptr), 1) << "rearmed, still readable";

  ASSERT_EQ(epoll_control(ep, EPOLL_CTL_DEL, pair.client, nullptr), 0);
  EXPECT_EQ(epoll_wait_any(ep, got, 4, 0, nullptr), 0);
  epoll_closed(ep);
  ::close(ep);
}

// Bytes the shim took from the kernel (during a switch that did not happen, or a
// return to TCP) come first, and make the socket readable though the kernel holds
// nothing.
TEST(ShimReadiness, ReadAheadIsReadableAndComesFirst) {
  Pair pair;
  Socket* c = sh().socket_of(pair.client);
  {
    std::lock_guard lock(sh().mutex);
    const char early[] = "early ";
    c->ahead.assign(reinterpret_cast<const std::byte*>(early), reinterpret_cast<const std::byte*>(early) + 6);
    c->ahead_read = 0;
    c->ahead_left = 6;
  }
  EXPECT_EQ(poll_one(pair.client, POLLIN), POLLIN);
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ASSERT_EQ(epoll_control(ep, EPOLL_CTL_ADD, pair.client, &ev), 0);
  epoll_event got[2];
  EXPECT_EQ(epoll_wait_any(ep, got, 2, 0, nullptr), 1);
  int count = 0;
  EXPECT_EQ(bytes_readable(pair.client, &count), 0);
  EXPECT_EQ(count, 6);

  ASSERT_EQ(send_bytes(pair.server, "late"), 4);
  ASSERT_EQ(poll_one(pair.client, POLLIN, 1000) & POLLIN, POLLIN);
  char buffer[16] = {};
  iovec iov{buffer, sizeof buffer};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  std::string text;
  while (text.size() < 10) {
    ssize_t n = receive(pair.client, &message, 0);
    ASSERT_GT(n, 0);
    text.append(buffer, std::size_t(n));
  }
  EXPECT_EQ(text, "early late");
  EXPECT_FALSE(c->has_ahead());
  epoll_closed(ep);
  ::close(ep);
}

}  // namespace
}  // namespace rxio::shim
