// The shim's control path: which sockets it tracks, the negotiation on both sides,
// and the moves to rxio or back to plain TCP. Runs with Shim::mutex held.
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>

#include "base/config.h"
#include "base/error.h"
#include "base/log.h"
#include "base/bytes.h"
#include "shim/calls.h"
#include "shim/real.h"
#include "shim/state.h"

namespace rxio::shim {

thread_local bool t_inside = false;

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr uint64_t kWaitSetMagic = 0x7278696f77616974ull;  // "rxiowait"
constexpr auto kNoShimMemory = std::chrono::seconds(10);

std::string command_name() {
  std::ifstream comm("/proc/self/comm");
  std::string name;
  std::getline(comm, name);
  return name;
}

std::optional<Tuple> tuple_of(int fd, bool server) noexcept {
  sockaddr_storage local{}, peer{};
  socklen_t ll = sizeof local, pl = sizeof peer;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &ll) != 0) return std::nullopt;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0) return std::nullopt;
  auto l = Endpoint::from(reinterpret_cast<sockaddr*>(&local));
  auto p = Endpoint::from(reinterpret_cast<sockaddr*>(&peer));
  if (!l || !p) return std::nullopt;
  return server ? Tuple{*p, *l} : Tuple{*l, *p};
}

sockaddr_storage to_sockaddr(const Endpoint& e) {
  sockaddr_storage out{};
  if (e.family == AF_INET6) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&out);
    in6->sin6_family = AF_INET6;
    std::memcpy(&in6->sin6_addr, e.address.data(), 16);
    in6->sin6_port = htons(e.port);
  } else {
    auto* in = reinterpret_cast<sockaddr_in*>(&out);
    in->sin_family = AF_INET;
    std::memcpy(&in->sin_addr, e.address.data(), 4);
    in->sin_port = htons(e.port);
  }
  return out;
}

// The peer is on this host when it is a loopback address or the socket's own address
// (the kernel routes a connection to one of the host's addresses through loopback).
bool same_host(const Tuple& t) {
  const auto& a = t.server.address;
  if (t.server.family == AF_INET && a[0] == 127) return true;
  if (t.server.family == AF_INET6) {
    static const std::array<uint8_t, 16> loopback6{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    if (a == loopback6) return true;
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (std::memcmp(a.data(), mapped, 12) == 0 && a[12] == 127) return true;
  }
  return t.server.address == t.client.address;
}

sockaddr_un abstract_address(uint16_t port, socklen_t& length) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string name = negotiation::endpoint_name(port);
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return addr;
}

bool send_all(int fd, std::span<const std::byte> bytes, int pass_fd = -1) {
  iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (pass_fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cm), &pass_fd, sizeof(int));
  }
  return real().sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) == static_cast<ssize_t>(bytes.size());
}

// One message and, when one came with it, the fd passed along (owned by the caller).
ssize_t receive_message(int fd, std::span<std::byte> buffer, UniqueFd* passed) {
  iovec iov{buffer.data(), buffer.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n = real().recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0) return n;
  for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    std::size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int got;
      std::memcpy(&got, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
      if (passed && i == 0 && !*passed) passed->reset(got);
      else real().close(got);
    }
  }
  if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) return -2;  // longer than any valid message
  return n;
}

uint64_t random_cookie() {
  static thread_local std::mt19937_64 generator{std::random_device{}()};
  uint64_t c = 0;
  while (c == 0) c = generator();
  return c;
}

Fallback fallback_for(negotiation::Refusal refusal) {
  switch (refusal) {
    case negotiation::Refusal::not_owner: return Fallback::impostor;
    case negotiation::Refusal::bad_message: return Fallback::bad_message;
    case negotiation::Refusal::policy:
    case negotiation::Refusal::closing:
    case negotiation::Refusal::unavailable: break;
  }
  return Fallback::peer_refused;
}

Backend backend_of(const transport::Connection& c) {
  std::string_view name = c.backend_name();
  if (name == "shm") return Backend::shm;
  if (name == "verbs") return Backend::verbs;
  return Backend::tcp;
}

}  // namespace

std::atomic<Shim*> Shim::current_{nullptr};

Shim& Shim::get() {
  // Never destroyed: other threads may still be in a call at exit.
  static Shim* shim = [] {
    auto* made = new Shim();
    current_.store(made, std::memory_order_release);
    return made;
  }();
  return *shim;
}

Shim::Shim() {
  try {
    policy = Policy::from_environment();
  } catch (const std::exception& e) {
    // A rule that does not parse must not move connections its author meant to keep.
    log::warn(std::string("shim: ") + e.what() + "; every connection stays on TCP");
    policy = Policy::parse("deny *", "the shim's fallback");
  }
  try {
    board.emplace(command_name());
    // The Shim outlives main (threads may still call in), so the board's file goes at
    // exit, in this process only: a forked child leaves its parent's board alone.
    static pid_t owner = getpid();
    std::atexit([] {
      Shim* sh = current();
      if (sh && sh->board && getpid() == owner) ::unlink(sh->board->path().c_str());
    });
  } catch (const std::exception& e) {
    log::info(std::string("shim: no statistics board: ") + e.what());
  }
  try {
    negotiate_timeout = milliseconds(config::get_count("RXIO_SHIM_TIMEOUT_MS"));
    poll_time = std::chrono::microseconds(config::get_count("RXIO_POLL_US"));
    move_after = static_cast<uint32_t>(std::min<uint64_t>(config::get_count("RXIO_SHIM_MOVE_AFTER"), UINT32_MAX));
  } catch (const std::exception& e) {
    log::warn(std::string("shim: ") + e.what());
  }
  wait_set.reset(::epoll_create1(EPOLL_CLOEXEC));
}

transport::Engine* Shim::engine() noexcept {
  if (engine_) return engine_;
  if (engine_failed && Clock::now() < engine_retry_at) return nullptr;
  try {
    auto* e = new transport::Engine(transport::Options{});
    e->listen("127.0.0.1", 0);
    add_to_wait_set(e->wait_fd());
    engine_ = e;
    engine_failed = false;
  } catch (const std::exception& e) {
    if (!engine_failed) log::warn(std::string("shim: connections stay on TCP: ") + e.what());
    engine_failed = true;
    engine_retry_at = Clock::now() + kNoShimMemory;
  }
  return engine_;
}

void Shim::out_of_credit(int fd, Socket& s) noexcept {
  for (int ep : s.epolls)
    if (EpollSet* set = epoll_of(ep))
      if (auto it = set->interests.find(fd); it != set->interests.end()) it->second.reported &= ~uint32_t{EPOLLOUT};
}

void Shim::add_to_wait_set(int fd) noexcept {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = fd;
  ::epoll_ctl(wait_set.get(), EPOLL_CTL_ADD, fd, &ev);
}

void Shim::remove_from_wait_set(int fd) noexcept { ::epoll_ctl(wait_set.get(), EPOLL_CTL_DEL, fd, nullptr); }

int Shim::progress() noexcept { return engine_ ? engine_->progress() : 0; }

void ShimMutex::unlock() noexcept {
  shim_.hand_over();
  mutex_.unlock();
}

void Shim::hand_over() noexcept {
  if (!engine_ || sleeping.empty()) return;
  // Progress disarms the engine's wake-ups (a shm port tells its peer it is awake),
  // and what this thread took in may be what another one sleeps for.
  bool moved = engine_->handled() != handed_over_at_;
  if (!engine_->arm() || moved) {
    handed_over_at_ = engine_->handled();
    wake_sleepers();
  }
}

void Shim::wake_sleepers() noexcept {
  uint64_t one = 1;
  for (int waker : sleeping) [[maybe_unused]] ssize_t n = real().write(waker, &one, sizeof one);
}

int Shim::my_waker() noexcept {
  static thread_local UniqueFd waker(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  return waker.get();
}

void Socket::reset() noexcept {
  mode = Mode::fresh;
  calls = 0;
  tried = false;
  refs = 1;
  connection = nullptr;
  record = nullptr;
  tuple = Tuple{};
  server = read_shut = write_shut = false;
  ahead.clear();
  ahead.shrink_to_fit();
  ahead_read = 0;
  ahead_left = 0;
  epolls.clear();
  holds = 0;
  gone = closed = false;
  port = 0;
}

Socket* Shim::new_socket() noexcept {
  if (spare_sockets.empty()) return new (std::nothrow) Socket();
  Socket* s = spare_sockets.back();
  spare_sockets.pop_back();
  return s;
}

void Shim::recycle(Socket* s) noexcept {
  s->reset();
  try {
    spare_sockets.push_back(s);
  } catch (const std::bad_alloc&) {
    // Kept out of the spares: leaked rather than freed under a reader.
  }
}

void Shim::track(int fd) {
  if (fd < 0 || fd >= kMaxFds) return;
  Socket* s = new_socket();
  if (!s) throw std::bad_alloc();
  sockets[fd].store(s, std::memory_order_release);
}

void Shim::forget(int fd) noexcept {
  Socket* s = socket_of(fd);
  if (!s) return;
  sockets[fd].store(nullptr, std::memory_order_release);
  for (int ep : s->epolls)
    if (EpollSet* set = epoll_of(ep)) set->interests.erase(fd);
  if (--s->refs > 0) return;
  if (s->mode == Socket::Mode::rxio && s->connection) {
    s->connection->close();
    closing.push_back(s->connection);
  }
  if (s->record && board) board->close(s->record);
  if (s->mode == Socket::Mode::listening) {
    if (auto it = endpoints.find(s->port); it != endpoints.end() && --it->second.listeners == 0) {
      remove_from_wait_set(it->second.fd.get());
      endpoints.erase(it);
    }
  }
  if (s->server && s->mode != Socket::Mode::rxio) {
    if (auto it = accepted.find(s->tuple); it != accepted.end() && it->second == fd) accepted.erase(it);
    // Closed before its switch: nothing may land on its fd number.
    if (auto it = committed.find(s->tuple); it != committed.end() && it->second.fd == fd) it->second.fd = -1;
  }
  if (s->holds > 0) {
    s->gone = true;  // the thread waiting on it frees it
    return;
  }
  recycle(s);
}

void Shim::release(Socket* s) noexcept {
  if (--s->holds == 0 && s->gone) recycle(s);
}

void Shim::fall_back(int fd, Fallback reason) noexcept {
  if (board) board->count(reason);
  log::info(std::string("shim: fd ") + std::to_string(fd) + " stays on TCP: " + to_string(reason));
  Socket* s = socket_of(fd);
  if (s && s->has_ahead()) {
    // Bytes taken from the kernel during the attempt still come first.
    s->tried = true;
    s->mode = Socket::Mode::tcp;
  } else {
    forget(fd);
  }
  wake_sleepers();  // calls that waited for the switch
}

void Shim::become_rxio(int fd, Socket& s, transport::Connection& c) noexcept {
  s.mode = Socket::Mode::rxio;
  s.connection = &c;
  Backend backend = backend_of(c);
  if (board) {
    board->count_moved(backend);
    sockaddr_storage local = to_sockaddr(s.server ? s.tuple.server : s.tuple.client);
    sockaddr_storage peer = to_sockaddr(s.server ? s.tuple.client : s.tuple.server);
    s.record = board->open(fd, reinterpret_cast<sockaddr*>(&local), reinterpret_cast<sockaddr*>(&peer), backend,
                           ConnState::established, s.server);
  }
  // The kernel socket no longer tells readiness: watch the connection instead.
  for (int ep : s.epolls) {
    EpollSet* set = epoll_of(ep);
    if (!set) continue;
    real().epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
    if (auto it = set->interests.find(fd); it != set->interests.end()) it->second.in_kernel = false;
    watch_wait_set(ep, *set);
  }
  log::info(std::string("shim: fd ") + std::to_string(fd) + " (" + s.tuple.client.to_string() + " -> " +
            s.tuple.server.to_string() + ") moved to " + c.backend_name());
  wake_sleepers();
}

void Shim::watch_wait_set(int epfd, EpollSet& set) noexcept {
  if (set.has_wait_set) return;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWaitSetMagic;
  if (real().epoll_ctl(epfd, EPOLL_CTL_ADD, wait_set.get(), &ev) == 0 || errno == EEXIST) set.has_wait_set = true;
}

bool Shim::is_wait_set_event(const epoll_event& ev) const noexcept { return ev.data.u64 == kWaitSetMagic; }

// ---- the switch, both sides -------------------------------------------------------

namespace {

// Bytes this side's kernel sent on the TCP connection that the peer's kernel has not
// acknowledged yet; -1 when the socket cannot say.
int unacknowledged(int fd) noexcept {
  int n = 0;
  return real().ioctl(fd, SIOCOUTQ, &n) == 0 ? n : -1;
}

// Acknowledges what came in now, rather than after the delayed-ACK timer: the peer
// waits for it before it switches.
void acknowledge_now(int fd) noexcept {
  int one = 1;
  real().setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
}

// Takes what the kernel holds of the TCP stream into s.ahead, so that the peer's
// bytes never wait for a program that is not reading. False when the stream ended.
bool take_ahead(int fd, Socket& s) noexcept {
  if (!s.has_ahead()) {
    s.ahead.clear();
    s.ahead_read = 0;
  }
  static thread_local std::array<std::byte, 64 * 1024> chunk;
  for (;;) {
    ssize_t n = real().recv(fd, chunk.data(), chunk.size(), MSG_DONTWAIT);
    if (n <= 0) return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    try {
      s.ahead.insert(s.ahead.end(), chunk.data(), chunk.data() + n);
    } catch (const std::bad_alloc&) {
      // What was read is lost: the connection must end rather than go on without it.
      log::warn("shim: out of memory while switching fd " + std::to_string(fd) + ": the connection is reset");
      real().shutdown(fd, SHUT_RDWR);
      return false;
    }
    s.ahead_left = s.ahead.size() - s.ahead_read;
  }
}

// With the socket in moving mode, waits for the calls that went to the kernel without
// the mutex to come back. False when one stays (a blocking sendfile).
bool quiesce(Socket& s) noexcept {
  auto until = Clock::now() + milliseconds(10);
  while (s.kernel_calls.load() > 0) {
    if (Clock::now() > until) return false;
    sched_yield();
  }
  return true;
}

// Waits until the peer's kernel acknowledged every byte this side sent, taking in
// what arrives meanwhile (the peer may be waiting for the same). False at `deadline`
// or when the stream ended.
bool wait_acknowledged(int fd, Socket& s, Clock::time_point deadline) noexcept {
  for (;;) {
    if (!take_ahead(fd, s)) return false;
    acknowledge_now(fd);
    int left = unacknowledged(fd);
    if (left == 0) return true;
    if (left < 0 || Clock::now() > deadline) return false;
    timespec pause{0, 20'000};
    nanosleep(&pause, nullptr);
  }
}

}  // namespace

// ---- the client side ---------------------------------------------------------------

void Shim::finish_connect(int fd, Socket& s) noexcept {
  pollfd p{fd, POLLOUT, 0};
  if (real().poll(&p, 1, 0) != 1) return;  // still connecting
  sockaddr_storage peer{};
  socklen_t length = sizeof peer;
  // Failed: the error stays in SO_ERROR for the program to read.
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) != 0) return forget(fd);
  s.mode = Socket::Mode::tcp;
}

void Shim::move_as_client(int fd, Socket& s, std::unique_lock<ShimMutex>& lock) noexcept {
  s.tried = true;
  if (s.read_shut || s.write_shut) return fall_back(fd, Fallback::not_supported);
  auto tuple = tuple_of(fd, false);
  if (!tuple) return forget(fd);
  s.tuple = *tuple;
  sockaddr_storage server = to_sockaddr(tuple->server);
  if (!policy.allows(reinterpret_cast<sockaddr*>(&server))) return fall_back(fd, Fallback::policy);
  // Across hosts the negotiation would go through rdma_cm; this version moves
  // connections between processes of one host.
  if (!same_host(*tuple)) return fall_back(fd, Fallback::not_supported);
  std::string key = tuple->server.to_string();
  if (auto it = no_shim.find(key); it != no_shim.end()) {
    if (Clock::now() < it->second) return fall_back(fd, Fallback::no_peer_shim);
    no_shim.erase(it);
  }
  transport::Engine* e = engine();
  if (!e) return fall_back(fd, Fallback::no_backend);

  UniqueFd unix_fd(real().socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!unix_fd) return fall_back(fd, Fallback::no_backend);
  socklen_t length = 0;
  sockaddr_un where = abstract_address(tuple->server.port, length);
  if (real().connect(unix_fd.get(), reinterpret_cast<sockaddr*>(&where), length) != 0) {
    if (errno == EAGAIN) return fall_back(fd, Fallback::timeout);  // its backlog is full
    no_shim[key] = Clock::now() + kNoShimMemory;
    return fall_back(fd, Fallback::no_peer_shim);
  }
  ucred cred{};
  socklen_t cred_length = sizeof cred;
  if (real().getsockopt(unix_fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cred_length) != 0 ||
      cred.pid == getpid())
    // Our own listener: its engine cannot answer while this thread waits in it.
    return fall_back(fd, Fallback::not_supported);

  // From here the program's calls on the socket wait, so that this side's TCP bytes
  // end where the switch says.
  s.mode = Socket::Mode::moving;
  if (!quiesce(s)) return fall_back(fd, Fallback::busy);
  if (!send_all(unix_fd.get(), negotiation::encode(negotiation::Request{*tuple, static_cast<uint32_t>(getpid())}),
                fd))
    return fall_back(fd, Fallback::peer_refused);

  const auto deadline = Clock::now() + negotiate_timeout;
  // One message from the server, waited for without the mutex so that this process's
  // other threads go on; with `take_in`, what TCP brings meanwhile is taken ahead.
  std::array<std::byte, 64> buffer;
  auto next_message = [&](bool take_in) -> ssize_t {
    auto spin_until = Clock::now() + poll_time;
    for (;;) {
      ssize_t n = receive_message(unix_fd.get(), buffer, nullptr);
      if (n >= 0 || n == -2 || errno != EAGAIN) return n;
      if (take_in) {
        if (!take_ahead(fd, s)) return -1;
        acknowledge_now(fd);
      }
      auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return -1;
      pollfd p[2] = {{unix_fd.get(), POLLIN, 0}, {take_in ? fd : -1, POLLIN, 0}};
      lock.unlock();
      real().poll(p, 2, Clock::now() < spin_until ? 0 : static_cast<int>(std::min<long>(left, 10)));
      lock.lock();
      if (s.gone) return -1;
    }
  };
  ++s.holds;
  ssize_t n = next_message(false);
  auto answer = n < 0 ? std::nullopt : negotiation::decode_answer(std::span(buffer.data(), std::size_t(n)));
  bool gone = s.gone;
  release(&s);
  if (gone) return;
  if (n < 0 && n != -2) return fall_back(fd, errno == EAGAIN ? Fallback::timeout : Fallback::peer_refused);
  if (!answer) {
    send_all(unix_fd.get(), negotiation::encode_notice(negotiation::Kind::abort));
    return fall_back(fd, Fallback::bad_message);
  }
  if (!answer->accepted) return fall_back(fd, fallback_for(answer->refusal));

  transport::Connection* c = nullptr;
  auto give_up = [&](Fallback why) {
    send_all(unix_fd.get(), negotiation::encode_notice(negotiation::Kind::abort));
    if (c) {
      c->close();
      closing.push_back(c);
    }
    fall_back(fd, why);
  };
  try {
    c = &e->connect("127.0.0.1", answer->engine_port);
  } catch (const std::exception& error) {
    log::info(std::string("shim: ") + error.what());
    return give_up(Fallback::link_failed);
  }
  std::array<std::byte, 8> cookie;
  bytes::put64(cookie.data(), answer->cookie);
  if (c->stream_write(cookie) != cookie.size()) return give_up(Fallback::link_failed);
  // The server reads the TCP stream to its end before the engine connection: all of
  // it must be in its kernel first.
  if (!wait_acknowledged(fd, s, deadline)) return give_up(Fallback::busy);
  if (!send_all(unix_fd.get(), negotiation::encode_notice(negotiation::Kind::confirm)))
    return give_up(Fallback::link_failed);

  ++s.holds;
  n = next_message(true);
  auto notice = n > 0 ? negotiation::decode_notice(std::span(buffer.data(), std::size_t(n))) : std::nullopt;
  gone = s.gone;
  release(&s);
  if (gone) {
    c->close();
    closing.push_back(c);
    return;
  }
  if (notice != negotiation::Kind::switched) {
    c->close();
    closing.push_back(c);
    return fall_back(fd, notice == negotiation::Kind::abort ? Fallback::busy : Fallback::timeout);
  }
  // The server's kernel had every byte it sent acknowledged: they are all here now.
  if (!take_ahead(fd, s)) {
    c->close();
    closing.push_back(c);
    return fall_back(fd, Fallback::link_failed);
  }
  become_rxio(fd, s, *c);
}

// ---- the server side ---------------------------------------------------------------

void Shim::start_listening(int fd, Socket& s) noexcept {
  sockaddr_storage local{};
  socklen_t length = sizeof local;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) != 0) return forget(fd);
  auto endpoint = Endpoint::from(reinterpret_cast<sockaddr*>(&local));
  if (!endpoint) return forget(fd);
  if (!policy.allows(reinterpret_cast<sockaddr*>(&local))) return fall_back(fd, Fallback::policy);
  if (!engine()) return fall_back(fd, Fallback::no_backend);
  auto it = endpoints.find(endpoint->port);
  if (it == endpoints.end()) {
    UniqueFd unix_fd(real().socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    socklen_t unix_length = 0;
    sockaddr_un where = abstract_address(endpoint->port, unix_length);
    if (!unix_fd || real().bind(unix_fd.get(), reinterpret_cast<sockaddr*>(&where), unix_length) != 0 ||
        real().listen(unix_fd.get(), 1024) != 0) {
      // Another process answers for this port (its own address on the same port).
      return fall_back(fd, Fallback::not_supported);
    }
    add_to_wait_set(unix_fd.get());
    it = endpoints.emplace(endpoint->port, Listening{std::move(unix_fd), 0}).first;
  }
  ++it->second.listeners;
  s.mode = Socket::Mode::listening;
  s.port = endpoint->port;
}

void Shim::adopt_accepted(int fd) noexcept {
  auto tuple = tuple_of(fd, true);
  if (!tuple) return;
  Socket* s = new_socket();
  if (!s) return;
  s->server = true;
  s->tuple = *tuple;
  s->mode = Socket::Mode::tcp;
  sockets[fd].store(s, std::memory_order_release);
  accepted[*tuple] = fd;
  // A request that came before the program accepted the connection is answered now.
  for (std::size_t i = 0; i < peers.size();) {
    if (peers[i].parked != *tuple || answer(peers[i])) {
      ++i;
      continue;
    }
    remove_from_wait_set(peers[i].fd.get());
    peers.erase(peers.begin() + static_cast<long>(i));
  }
}

void Shim::serve_endpoint(int endpoint) noexcept {
  for (;;) {
    int fd = real().accept4(endpoint, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    peers.push_back(Peer{UniqueFd(fd)});
    add_to_wait_set(fd);
  }
}

// False when the peer is done with (answered for good, or gone).
bool Shim::answer(Peer& peer) noexcept {
  const Tuple tuple = *peer.parked;
  auto refuse = [&](negotiation::Refusal why, Fallback counted) {
    if (board) board->count(counted);
    send_all(peer.fd.get(), negotiation::encode(negotiation::Answer{false, why, 0, 0}));
    return false;
  };
  // Only a connection this process accepted: with SO_REUSEPORT, or a listener shared
  // with other processes, the kernel may have given it to someone else.
  auto held = accepted.find(tuple);
  if (held == accepted.end()) {
    if (Clock::now() < peer.until) return true;
    return refuse(negotiation::Refusal::unavailable, Fallback::not_supported);
  }
  Socket* s = socket_of(held->second);
  if (!s || s->mode != Socket::Mode::tcp || s->read_shut || s->write_shut)
    return refuse(negotiation::Refusal::closing, Fallback::not_supported);
  transport::Engine* e = engine();
  if (!e) return refuse(negotiation::Refusal::unavailable, Fallback::no_backend);
  peer.parked.reset();
  peer.tuple = tuple;
  uint64_t cookie = random_cookie();
  committed[tuple] = Committed{cookie, nullptr, held->second};
  // The client's last TCP bytes are acknowledged at once: it waits for that.
  acknowledge_now(held->second);
  if (!send_all(peer.fd.get(), negotiation::encode(negotiation::Answer{true, {}, e->listen_port(), cookie}))) {
    drop_committed(tuple);
    return false;
  }
  return true;
}

bool Shim::serve_peer(Peer& peer) noexcept {
  if (peer.parked) return answer(peer);
  std::array<std::byte, 64> buffer;
  UniqueFd passed;
  ssize_t n = receive_message(peer.fd.get(), buffer, &passed);
  if (n == -1 && errno == EAGAIN) return true;
  auto refuse = [&](negotiation::Refusal why, Fallback counted) {
    if (board) board->count(counted);
    send_all(peer.fd.get(), negotiation::encode(negotiation::Answer{false, why, 0, 0}));
    return false;
  };
  if (!peer.tuple) {
    if (n <= 0) return false;  // gone before asking
    auto request = negotiation::decode_request(std::span(buffer.data(), std::size_t(n)));
    if (!request) return refuse(negotiation::Refusal::bad_message, Fallback::bad_message);
    // The proof: the client handed over its TCP socket, whose ends must be the ones it
    // names, from the process it claims to be.
    ucred cred{};
    socklen_t cred_length = sizeof cred;
    auto owned = passed ? tuple_of(passed.get(), false) : std::nullopt;
    if (!owned || *owned != request->tuple ||
        real().getsockopt(peer.fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cred_length) != 0 ||
        static_cast<uint32_t>(cred.pid) != request->pid)
      return refuse(negotiation::Refusal::not_owner, Fallback::impostor);
    if (!endpoints.contains(request->tuple.server.port)) return refuse(negotiation::Refusal::not_owner, Fallback::impostor);
    sockaddr_storage client = to_sockaddr(request->tuple.client);
    if (!policy.allows(reinterpret_cast<sockaddr*>(&client)))
      return refuse(negotiation::Refusal::policy, Fallback::policy);
    peer.parked = request->tuple;
    peer.until = Clock::now() + negotiate_timeout;
    return answer(peer);
  }
  // Accepted: now the confirm, or an abort (or the client vanishing: the same).
  auto notice = n > 0 ? negotiation::decode_notice(std::span(buffer.data(), std::size_t(n))) : std::nullopt;
  auto it = committed.find(*peer.tuple);
  if (it == committed.end()) return false;
  if (notice == negotiation::Kind::confirm) {
    // The cookie went before the confirm; over verbs it may still be on the wire.
    auto deadline = Clock::now() + negotiate_timeout;
    while (!it->second.connection && Clock::now() < deadline) {
      progress();
      match_cookies();
    }
    switch_as_server(peer, it->second);
  } else if (n > 0 && !notice && board) {
    board->count(Fallback::bad_message);
  }
  drop_committed(*peer.tuple);
  return false;
}

void Shim::switch_as_server(Peer& peer, Committed& entry) noexcept {
  auto abort = [&](Fallback why) {
    send_all(peer.fd.get(), negotiation::encode_notice(negotiation::Kind::abort));
    if (entry.fd >= 0) fall_back(entry.fd, why);
  };
  Socket* s = entry.fd >= 0 ? socket_of(entry.fd) : nullptr;
  if (!s || s->mode != Socket::Mode::tcp || s->tuple != *peer.tuple) return abort(Fallback::not_supported);
  if (!entry.connection) return abort(Fallback::link_failed);
  // The program's calls on the socket wait from here, so that our TCP bytes end now;
  // the client sends none after its confirm.
  s->mode = Socket::Mode::moving;
  if (!quiesce(*s) || !wait_acknowledged(entry.fd, *s, Clock::now() + negotiate_timeout))
    return abort(Fallback::busy);
  if (!send_all(peer.fd.get(), negotiation::encode_notice(negotiation::Kind::switched)))
    return abort(Fallback::link_failed);
  accepted.erase(s->tuple);
  transport::Connection* c = std::exchange(entry.connection, nullptr);
  become_rxio(entry.fd, *s, *c);
}

void Shim::drop_committed(const Tuple& tuple) noexcept {
  auto it = committed.find(tuple);
  if (it == committed.end()) return;
  if (it->second.connection) {
    it->second.connection->close();
    closing.push_back(it->second.connection);
  }
  // The client does not ask twice: its socket needs the shim no more.
  if (Socket* s = it->second.fd >= 0 ? socket_of(it->second.fd) : nullptr;
      s && s->mode == Socket::Mode::tcp && !s->has_ahead()) {
    accepted.erase(tuple);
    forget(it->second.fd);
  }
  committed.erase(it);
}

void Shim::match_cookies() noexcept {
  transport::Engine* e = engine();
  if (!e) return;
  while (transport::Connection* c = e->try_accept()) unmatched.push_back(Unmatched{c, {}, 0});
  for (std::size_t i = 0; i < unmatched.size();) {
    Unmatched& u = unmatched[i];
    u.have += u.connection->stream_read(std::span(u.cookie).subspan(u.have));
    if (u.have < u.cookie.size() && !u.connection->stream_closed() && !u.connection->failed()) {
      ++i;
      continue;
    }
    bool matched = false;
    if (u.have == u.cookie.size()) {
      uint64_t cookie = bytes::get64(u.cookie.data());
      for (auto& [tuple, entry] : committed) {
        if (entry.cookie != cookie || entry.connection) continue;
        entry.connection = u.connection;
        matched = true;
        break;
      }
    }
    if (!matched) {
      u.connection->close();
      closing.push_back(u.connection);
    }
    unmatched.erase(unmatched.begin() + static_cast<long>(i));
  }
}

bool Shim::service() noexcept {
  bool changed = false;
  transport::Engine* e = engine();
  if (e) changed = e->on_wake() > 0;
  for (auto& [port, endpoint] : endpoints) serve_endpoint(endpoint.fd.get());
  for (std::size_t i = 0; i < peers.size();) {
    if (serve_peer(peers[i])) {
      ++i;
      continue;
    }
    remove_from_wait_set(peers[i].fd.get());
    peers.erase(peers.begin() + static_cast<long>(i));
    changed = true;
  }
  if (!unmatched.empty()) match_cookies();
  // Connections the program closed: what still arrives is dropped, as a closed TCP
  // socket would, so that the peer never waits for credit.
  for (std::size_t i = 0; i < closing.size();) {
    transport::Connection* c = closing[i];
    std::array<std::byte, 4096> sink;
    while (c->stream_read(sink) > 0) {
    }
    if (c->stream_closed() || c->failed()) {
      c->release();  // its rings serve later connections
      closing.erase(closing.begin() + static_cast<long>(i));
    } else {
      ++i;
    }
  }
  return changed;
}

// ---- the calls interpose.cc hands over ---------------------------------------------

void created(int fd) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::lock_guard lock(sh.mutex);
  try {
    sh.forget(fd);  // a stale entry, had the fd been closed behind the shim's back
    sh.track(fd);
  } catch (const std::bad_alloc&) {
    // Untracked: the socket stays plain TCP.
  }
}

int listen_on(int fd, int backlog) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::lock_guard lock(sh.mutex);
  if (real().listen(fd, backlog) != 0) return -1;
  if (Socket* s = sh.socket_of(fd); s && s->mode == Socket::Mode::fresh) sh.start_listening(fd, *s);
  return 0;
}

int accept_on(int fd, sockaddr* address, socklen_t* length, int flags) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::unique_lock lock(sh.mutex);
  int fl = real().fcntl(fd, F_GETFL);
  const bool blocking = fl >= 0 && !(fl & O_NONBLOCK);
  for (;;) {
    // A blocking accept sleeps here rather than in the kernel, so that negotiations
    // and the engine still progress while the program waits.
    if (blocking) {
      pollfd p[3] = {{fd, POLLIN, 0}, {}, {}};
      if (real().poll(p, 1, 0) == 0) {
        if (sh.sleep(lock, p, 1, -1, nullptr) < 0 && errno == EINTR) return -1;
        continue;
      }
    }
    int accepted = real().accept4(fd, address, length, flags | (blocking ? SOCK_NONBLOCK : 0));
    if (accepted < 0) {
      if (blocking && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;  // another thread took it
      return -1;
    }
    if (blocking && !(flags & SOCK_NONBLOCK)) {
      int afl = real().fcntl(accepted, F_GETFL);
      real().fcntl(accepted, F_SETFL, afl & ~O_NONBLOCK);
    }
    if (sh.socket_of(fd) && sh.socket_of(fd)->mode == Socket::Mode::listening) sh.adopt_accepted(accepted);
    return accepted;
  }
}

int connect_on(int fd, const sockaddr* address, socklen_t length) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  int rc = real().connect(fd, address, length);
  int saved = errno;
  std::lock_guard lock(sh.mutex);
  Socket* s = sh.socket_of(fd);
  if (s && s->mode == Socket::Mode::fresh) {
    // The move, if any, comes with the program's later calls (RXIO_SHIM_MOVE_AFTER).
    if (rc == 0) s->mode = Socket::Mode::tcp;
    else if (saved == EINPROGRESS) s->mode = Socket::Mode::connecting;
  }
  errno = saved;
  return rc;
}

int shutdown_on(int fd, int how) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::unique_lock lock(sh.mutex);
  Socket* s = sh.socket_of(fd);
  // A switch under way decides where the end goes.
  while (s && s->mode == Socket::Mode::moving) {
    pollfd p[2];
    ++s->holds;
    sh.sleep(lock, p, 0, 10, nullptr);
    sh.release(s);
    s = sh.socket_of(fd);
  }
  if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR) {
    errno = EINVAL;
    return -1;
  }
  if (!s || s->mode != Socket::Mode::rxio) {
    int rc = real().shutdown(fd, how);
    // A half-closed TCP connection stays where it is.
    if (rc == 0 && s && (s->mode == Socket::Mode::tcp || s->mode == Socket::Mode::connecting)) {
      s->tried = true;
      if (how != SHUT_WR) s->read_shut = true;
      if (how != SHUT_RD) s->write_shut = true;
    }
    return rc;
  }
  if (how != SHUT_WR) s->read_shut = true;
  if (how != SHUT_RD && !s->write_shut) {
    s->write_shut = true;
    s->connection->close();
    sh.progress();
  }
  if (s->record) s->record->state = static_cast<uint8_t>(ConnState::closing);
  sh.wake_sleepers();
  return 0;
}

int close_fd(int fd) noexcept {
  Shim& sh = Shim::get();
  {
    Inside inside;
    std::lock_guard lock(sh.mutex);
    if (Socket* s = sh.socket_of(fd)) {
      bool rxio = s->mode == Socket::Mode::rxio;
      if (s->refs == 1) s->closed = true;
      sh.forget(fd);
      // What was written goes out now, as a closing TCP socket would send it.
      if (rxio) sh.progress();
    }
  }
  epoll_closed(fd);
  return real().close(fd);
}

int duplicate(int fd, int result) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::lock_guard lock(sh.mutex);
  if (result == fd || result < 0 || result >= Shim::kMaxFds) return result;
  if (Socket* target = sh.socket_of(result); target && target->refs == 1) target->closed = true;
  sh.forget(result);  // dup2 over a socket of ours closed it
  if (Socket* s = sh.socket_of(fd)) {
    ++s->refs;
    sh.sockets[result].store(s, std::memory_order_release);
  }
  return result;
}

int socket_error(int fd, void* value, socklen_t* length) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::unique_lock lock(sh.mutex);
  Socket* s = sh.socket_of(fd);
  if (s && s->mode == Socket::Mode::connecting) sh.finish_connect(fd, *s);
  s = sh.socket_of(fd);
  if (s && s->mode == Socket::Mode::rxio && s->connection->failed() && value && length &&
      *length >= sizeof(int)) {
    int error = ECONNRESET;
    std::memcpy(value, &error, sizeof error);
    *length = sizeof error;
    return 0;
  }
  return real().getsockopt(fd, SOL_SOCKET, SO_ERROR, value, length);
}

int bytes_readable(int fd, int* count) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::lock_guard lock(sh.mutex);
  Socket* s = sh.socket_of(fd);
  if (!s) return real().ioctl(fd, FIONREAD, count);
  std::size_t ready = s->ahead.size() - s->ahead_read;
  if (s->mode == Socket::Mode::rxio) {
    sh.progress();
    ready += s->connection->stream_available();
  } else {
    int in_kernel = 0;
    if (real().ioctl(fd, FIONREAD, &in_kernel) != 0) return -1;
    ready += std::size_t(in_kernel);
  }
  *count = static_cast<int>(std::min<std::size_t>(ready, INT32_MAX));
  return 0;
}

}  // namespace rxio::shim
