// The shim's control path: which sockets it tracks, the negotiation on both sides,
// and the moves to rxio or back to plain TCP. Runs with Shim::mutex held.
#include <arpa/inet.h>
#include <fcntl.h>
#include <pthread.h>
#include <linux/sockios.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <string_view>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
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
// Each thread's eventfd for Shim::my_waker(), made on first use.
thread_local UniqueFd t_waker;
}  // namespace

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

sockaddr_un abstract_address(uint16_t port, socklen_t& length, uint32_t pid = 0) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string name = negotiation::endpoint_name(port, pid);
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
    case negotiation::Refusal::not_yet: return Fallback::timeout;
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
std::atomic<bool> Shim::read_ahead_inherited_{false};

namespace {

// RXIO_SHIM_AHEAD as this image started with it; never freed (a call at exit may still
// look), and a plain pointer so that no initializer of the library's runs over it.
const std::string* inherited_memfds = nullptr;

[[gnu::constructor]] void note_at_load() { note_inherited_read_ahead(); }

// Whether `memfd` is one an exec's shim made for this image: a stale or foreign
// RXIO_SHIM_AHEAD must not have the shim read, or close, the program's own fds.
bool is_read_ahead_memfd(int memfd) noexcept {
  char target[64] = {};
  const std::string link = "/proc/self/fd/" + std::to_string(memfd);
  const ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
  return n > 0 && std::string_view(target, std::size_t(n)).starts_with(std::string("/memfd:") + kAheadMemfdName);
}

// One memfd of RXIO_SHIM_AHEAD: its socket becomes the shim's, on TCP, with the bytes
// first. Says why when it cannot; `fd` is then the socket the bytes were for, or -1.
const char* adopt_read_ahead(Shim& sh, int memfd, int& fd) noexcept {
  fd = -1;
  InheritedAhead header;
  struct stat memfd_stat {};
  if (::fstat(memfd, &memfd_stat) != 0 || memfd_stat.st_size < static_cast<off_t>(sizeof header) ||
      ::pread(memfd, &header, sizeof header, 0) != static_cast<ssize_t>(sizeof header) ||
      header.magic != InheritedAhead::kMagic || header.fd_count == 0 || header.fd_count > InheritedAhead::kMaxFds ||
      header.length != static_cast<uint64_t>(memfd_stat.st_size) - sizeof header)
    return "it is not a read-ahead the shim wrote";
  // The fds that still name the socket (device and inode as at the exec).
  auto names_the_socket = [&](int candidate) {
    struct stat st {};
    return ::fstat(candidate, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == header.device &&
           st.st_ino == header.inode;
  };
  const auto named = std::span(header.fds).first(header.fd_count);
  auto first = std::find_if(named.begin(), named.end(), names_the_socket);
  if (first == named.end()) return "no fd names its socket any more";
  fd = *first;
  try {
    std::vector<std::byte> bytes(static_cast<std::size_t>(header.length));
    if (::pread(memfd, bytes.data(), bytes.size(), sizeof header) != static_cast<ssize_t>(bytes.size()))
      return "it could not be read";
    sh.forget(fd);
    sh.track(fd);
    Socket& s = *sh.socket_of(fd);
    s.ahead = std::move(bytes);
    s.ahead_left = s.ahead.size();
    if (auto tuple = tuple_of(fd, false)) s.tuple = *tuple;
    // The image before moved it; this one keeps it on TCP, as any socket it inherits.
    s.tried = true;
    s.mode = Socket::Mode::tcp;
    sh.list_moved(s);  // where a later exec looks for read-aheads to hand on
    for (auto other = first + 1; other != named.end(); ++other) {
      if (!names_the_socket(*other)) continue;
      sh.forget(*other);
      if (!sh.name(*other, s)) return "no memory for it";
    }
  } catch (const std::bad_alloc&) {
    return "no memory for it";
  }
  log::info("shim: fd " + std::to_string(fd) + ": took in " + std::to_string(header.length) +
            " bytes read ahead of the program by the image before");
  return nullptr;
}

}  // namespace

void note_inherited_read_ahead() noexcept {
  const char* named = std::getenv(kAheadVariable);
  if (!named) return;
  inherited_memfds = new (std::nothrow) std::string(named);
  ::unsetenv(kAheadVariable);
  if (inherited_memfds) Shim::read_ahead_inherited_.store(true, std::memory_order_release);
}

Shim* Shim::take_inherited_read_ahead() noexcept {
  static std::once_flag once;
  // Other threads (their current() sees the flag until the end) wait here until the
  // sockets are the shim's.
  std::call_once(once, [] {
    Inside inside;
    Shim* sh = nullptr;
    try {
      sh = &get();
    } catch (const std::exception& e) {
      log::warn(std::string("shim: taking in the read-ahead of the image before: ") + e.what());
    }
    const std::string& list = *inherited_memfds;
    for (std::size_t at = 0; at < list.size();) {
      const std::size_t end = std::min(list.find(',', at), list.size());
      int memfd = -1;
      const auto parsed = std::from_chars(list.data() + at, list.data() + end, memfd);
      at = end + 1;
      if (parsed.ec != std::errc() || parsed.ptr != list.data() + end || !is_read_ahead_memfd(memfd)) continue;
      int fd = -1;
      const char* why = "no shim to take it in";
      if (sh) {
        std::lock_guard lock(sh->mutex);
        why = adopt_read_ahead(*sh, memfd, fd);
      }
      if (why) {
        // The program would read on past bytes it never got: the connection ends loudly.
        log::warn("shim: the read-ahead in fd " + std::to_string(memfd) + " from the image before: " + why +
                  (fd >= 0 ? "; the connection is reset rather than go on with bytes missing" : ""));
        if (fd >= 0) disconnect(fd);
      }
      real().close(memfd);
    }
    read_ahead_inherited_.store(false, std::memory_order_release);
  });
  return current_.load(std::memory_order_acquire);
}

Shim& Shim::get() {
  // Never destroyed: other threads may still be in a call at exit.
  static Shim* shim = [] {
    Inside inside;  // its own calls go straight through (nor take the read-ahead in)
    auto* made = new Shim();
    current_.store(made, std::memory_order_release);
    return made;
  }();
  // A program executed with read-ahead to take in that makes a socket first.
  if (read_ahead_inherited_.load(std::memory_order_acquire) && !t_inside) [[unlikely]]
    take_inherited_read_ahead();
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
  open_board();
  // The Shim outlives main (threads may still call in), so the board's file goes at
  // exit, by the process that made it: a forked child leaves its parent's alone.
  std::atexit([] {
    Shim* sh = current();
    if (sh && sh->board && getpid() == sh->board_owner) ::unlink(sh->board->path().c_str());
  });
  try {
    negotiate_timeout = milliseconds(config::get_count("RXIO_SHIM_TIMEOUT_MS"));
    poll_time = std::chrono::microseconds(config::get_count("RXIO_POLL_US"));
    move_after = static_cast<uint32_t>(std::min<uint64_t>(config::get_count("RXIO_SHIM_MOVE_AFTER"), UINT32_MAX));
    move_again = static_cast<uint32_t>(std::min<uint64_t>(config::get_count("RXIO_SHIM_MOVE_AGAIN"), 7));
    verbs_forced = config::get_choice("RXIO_BACKEND", {"auto", "verbs", "shm", "tcp"}) == "verbs";
  } catch (const std::exception& e) {
    log::warn(std::string("shim: ") + e.what());
  }
  wait_set.reset(::epoll_create1(EPOLL_CLOEXEC));
  state_pid = getpid();
  std::atexit([] {
    if (Shim* sh = current()) sh->at_exit();
  });
  pthread_atfork([] { current()->mutex.lock_for_fork(); },
                 [] {
                   Inside inside;  // its sockets and closes are the shim's own
                   Shim* sh = current();
                   sh->after_fork_in_parent();
                   sh->mutex.unlock_after_fork();
                 },
                 [] {
                   Inside inside;  // the closes below are the shim's own
                   Shim* sh = current();
                   sh->forked_child = true;
                   sh->after_fork_in_child();
                   // The board is the parent's too: the child publishes nothing.
                   sh->board.reset();
                   // The wait set and this thread's waker are shared with the parent:
                   // the child gets its own, so that neither disturbs the other.
                   sh->wait_set.reset(::epoll_create1(EPOLL_CLOEXEC));
                   t_waker.reset();
                   sh->sleeping.clear();
                   sh->mutex.unlock_after_fork();
                 });
}

void Shim::open_board() noexcept {
  try {
    board.emplace(command_name());
    board_owner = getpid();
  } catch (const std::exception& e) {
    log::info(std::string("shim: no statistics board: ") + e.what());
  }
}

transport::Engine* Shim::engine() noexcept {
  if (engine_) return engine_;
  if (forked_child && !board) open_board();  // a child's connections are its own to count
  if (engine_failed && Clock::now() < engine_retry_at) return nullptr;
  try {
    auto* e = new transport::Engine(transport::Options{});
    // Remote clients reach it where RDMA can carry their connections.
    e->listen(e->device_name().empty() ? "127.0.0.1" : "0.0.0.0", 0);
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

int Shim::progress() noexcept {
  if (!engine_) return 0;
  int handled = engine_->progress();
  notice_failures();
  // What came in may be a cookie or a client's word for a move. Any progress call
  // takes in the arrivals, and with them the wake-up that would have come (arm()
  // progresses too): while moves are pending, look at them whatever was handled.
  serve_moves();
  return handled;
}

void Shim::serve_moves() noexcept {
  if (committed.empty() && unmatched.empty()) return;
  match_cookies();
  serve_committed();
}

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
  if (!t_waker) t_waker.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  return t_waker.get();
}

void Socket::reset() noexcept {
  mode = Mode::fresh;
  calls = 0;
  move_at = 0;
  failed_links = 0;
  tried = false;
  fds.clear();
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
  rxio_read = rxio_written = 0;
  kept.clear();
  back = Returning{};
  broken = lingering = shared = inherited = false;
  linger_until = {};
  resume_fd = -1;
}

Socket* Shim::new_socket() noexcept {
  if (spare_sockets.empty()) return new (std::nothrow) Socket();
  Socket* s = spare_sockets.back();
  spare_sockets.pop_back();
  return s;
}

void Shim::list_moved(Socket& s) noexcept {
  if (s.listed) return;
  s.listed = true;
  s.moved_prev = nullptr;
  s.moved_next = moved_sockets;
  if (moved_sockets) moved_sockets->moved_prev = &s;
  moved_sockets = &s;
}

void Shim::recycle(Socket* s) noexcept {
  unwatch_resume(*s);
  unwatch_return(*s);
  if (s->listed) {
    (s->moved_prev ? s->moved_prev->moved_next : moved_sockets) = s->moved_next;
    if (s->moved_next) s->moved_next->moved_prev = s->moved_prev;
    s->moved_prev = s->moved_next = nullptr;
    s->listed = false;
  }
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
  if (!name(fd, *s)) {
    recycle(s);
    throw std::bad_alloc();
  }
}

bool Shim::name(int fd, Socket& s) noexcept {
  try {
    s.fds.push_back(fd);
  } catch (const std::bad_alloc&) {
    return false;
  }
  sockets[fd].store(&s, std::memory_order_release);
  return true;
}

void Shim::forget(int fd) noexcept {
  Socket* s = socket_of(fd);
  if (!s) return;
  const uint32_t return_events = s->back.watched;
  const bool watched_for_return = return_events && std::any_of(returning.begin(), returning.end(), [&](const auto& e) {
    return e.first == fd && e.second == s;
  });
  if (watched_for_return) unwatch_return(fd);
  sockets[fd].store(nullptr, std::memory_order_release);
  for (int ep : s->epolls)
    if (EpollSet* set = epoll_of(ep)) set->interests.erase(fd);
  // The wait set must let go of the fd before it closes: a forked child or another fd
  // may keep the socket open, and the kernel would keep reporting the stale number.
  const bool watched_for_resume = s->resume_fd == fd;
  if (watched_for_resume) unwatch_resume(*s);
  std::erase(s->fds, fd);
  if (!s->fds.empty()) {
    if (const int other = fd_of(*s); other >= 0) {
      if (watched_for_resume) watch_resume(*s, other);
      if (watched_for_return) watch_return(other, *s, return_events);
    }
    return;
  }
  if (s->record && board) board->close(s->record);
  s->record = nullptr;
  if (s->server)
    if (auto it = endpoints.find(s->tuple.server.port); it != endpoints.end() && it->second.acceptors)
      it->second.acceptors->erase(s->tuple, static_cast<uint32_t>(getpid()));
  // A moved socket the program closes lingers, with a private descriptor of its TCP
  // socket, until its connection ends: a link that fails meanwhile still goes back to
  // TCP, so that the peer gets every byte (back.cc). One that a forked child holds too
  // is handed over to the child. In a forked child, the connection is the parent's:
  // closing the child's fd leaves it alone.
  if (s->back.role != Returning::Role::adopted && !s->inherited && (s->mode == Socket::Mode::rxio || s->mode == Socket::Mode::returning)) {
    int kept_fd = real().fcntl(fd, F_DUPFD_CLOEXEC, 0);
    // Shared at a fork: handed over while a child may hold it still.
    const bool hand_over = s->shared && s->mode == Socket::Mode::rxio && kept_fd >= 0 && has_children();
    if (s->connection && !hand_over) s->connection->close();
    if (kept_fd >= 0) {
      try {
        lingering.emplace_back(kept_fd, s);
        s->lingering = true;
        s->epolls.clear();
        if (s->holds > 0) s->gone = true;
        if (hand_over) {
          start_hand_over(kept_fd, *s, Return::fork);
          serve_lingering();
        } else {
          s->write_shut = true;
          if (s->mode == Socket::Mode::rxio) watch_resume(*s, kept_fd);  // the peer may hand over yet
        }
        return;
      } catch (const std::bad_alloc&) {
        real().close(kept_fd);
        if (hand_over) s->connection->close();
      }
    }
    if (s->connection) closing.push_back(s->connection);
    s->connection = nullptr;
  }
  if (s->mode == Socket::Mode::listening) {
    if (auto it = endpoints.find(s->port); it != endpoints.end() && --it->second.listeners == 0) {
      remove_from_wait_set(it->second.fd.get());
      if (it->second.own) remove_from_wait_set(it->second.own.get());
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
  if (--s->holds == 0 && s->gone && !s->lingering) recycle(s);
}

void Shim::fall_back(int fd, Fallback reason) noexcept {
  if (board) board->count(reason);
  log::info(std::string("shim: fd ") + std::to_string(fd) + " stays on TCP: " + to_string(reason));
  Socket* s = socket_of(fd);
  if (s && (s->has_ahead() || s->fds.size() > 1)) {
    // Bytes taken from the kernel during the attempt still come first; other fds
    // (dup) name the socket too. It stays, on TCP, for good.
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
  s.rxio_read = s.rxio_written = 0;
  unwatch_return(s);
  s.back = Returning{};  // a return before this move is through
  if (!s.kept.reserve(c.stream_window()))
    log::warn("shim: fd " + std::to_string(fd) + ": no memory to keep what is written; if its link fails, the " +
              "connection is reset rather than go back to TCP");
  Backend backend = backend_of(c);
  if (board) {
    board->count_moved(backend);
    if (s.record) board->close(s.record);  // its record from the move before
    sockaddr_storage local = to_sockaddr(s.server ? s.tuple.server : s.tuple.client);
    sockaddr_storage peer = to_sockaddr(s.server ? s.tuple.client : s.tuple.server);
    s.record = board->open(fd, reinterpret_cast<sockaddr*>(&local), reinterpret_cast<sockaddr*>(&peer), backend,
                           ConnState::established, s.server);
  }
  // The kernel socket no longer tells readiness: watch the connection instead, for
  // every fd (dup) that names it.
  for (int ep : s.epolls) {
    EpollSet* set = epoll_of(ep);
    if (!set) continue;
    for (auto& [watched, interest] : set->interests) {
      if (!interest.in_kernel || socket_of(watched) != &s) continue;
      real().epoll_ctl(ep, EPOLL_CTL_DEL, watched, nullptr);
      interest.in_kernel = false;
    }
    watch_wait_set(ep, *set);
  }
  // The peer writes into the TCP connection only to go back to it (back.cc).
  watch_resume(s, fd);
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
// bytes never wait for a program that is not reading (up to a limit: past it they
// wait in the kernel). The stream's end is no failure: a peer that switched and then
// closed its socket sent its last bytes on the engine connection. False when the
// socket failed.
bool take_ahead(int fd, Socket& s) noexcept {
  constexpr std::size_t kAheadLimit = 16u << 20;
  if (!s.has_ahead()) {
    s.ahead.clear();
    s.ahead_read = 0;
  }
  static thread_local std::array<std::byte, 64 * 1024> chunk;
  while (s.ahead.size() - s.ahead_read < kAheadLimit) {
    ssize_t n = real().recv(fd, chunk.data(), chunk.size(), MSG_DONTWAIT);
    if (n == 0) return true;
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
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
  return true;
}

// With the socket in moving mode, waits for the calls that went to the kernel without
// the mutex to come back (a thread may be preempted in one). False when one stays (a
// blocking sendfile).
bool quiesce(Socket& s) noexcept {
  auto until = Clock::now() + milliseconds(100);
  while (s.kernel_calls.load() > 0) {
    if (Clock::now() > until) return false;
    sched_yield();
  }
  return true;
}

// Waits until the peer's kernel acknowledged every byte this side sent, taking in
// what arrives meanwhile (the peer may be waiting for the same). False at `deadline`,
// when the stream ended, or (with `lock`, let go of between looks so that the
// process's other threads go on) when the program closed `fd` meanwhile.
bool wait_acknowledged(int fd, Socket& s, Clock::time_point deadline, Shim& sh,
                       std::unique_lock<ShimMutex>* lock = nullptr) noexcept {
  for (;;) {
    if (!take_ahead(fd, s)) return false;
    acknowledge_now(fd);
    int left = unacknowledged(fd);
    if (left == 0) return true;
    if (left < 0 || Clock::now() > deadline) return false;
    timespec pause{0, 20'000};
    if (lock) lock->unlock();
    nanosleep(&pause, nullptr);
    if (lock) {
      lock->lock();
      if (s.gone || sh.socket_of(fd) != &s) return false;
    }
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

namespace {

// The peer's IP as text, for the engine's connect.
std::string address_text(const Endpoint& e) {
  char text[INET6_ADDRSTRLEN] = {};
  inet_ntop(e.family, e.address.data(), text, sizeof text);
  return text;
}

bool loopback(const Endpoint& e) {
  static const std::array<uint8_t, 16> loopback6{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  return e.family == AF_INET ? e.address[0] == 127 : e.address == loopback6;
}

verbs::cm::SocketAddress cm_address(const Endpoint& e) {
  verbs::cm::SocketAddress a;
  a.storage = to_sockaddr(e);
  return a;
}

// A message received over rdma_cm comes padded with zeros to the size the CM gives
// private data: the message is its start.
std::span<const std::byte> unpadded(std::span<const std::byte> data, std::size_t size) {
  if (data.size() < size) return data;
  for (std::byte b : data.subspan(size))
    if (b != std::byte{0}) return data;
  return data.first(size);
}

// An RDMA_CM_EVENT_REJECTED status when the rejecting side's application gave a reason.
constexpr int kRejectedByConsumer = 28;

// Answers a local client on its unix socket, a remote one with a reject that carries
// the answer.
bool send_reply(Peer& peer, std::span<const std::byte> bytes) noexcept {
  if (!peer.cm_id) return send_all(peer.fd.get(), bytes);
  try {
    peer.cm_id->reject(bytes);
    return true;
  } catch (const std::exception& error) {
    log::info(std::string("shim: answering over rdma_cm: ") + error.what());
    return false;
  }
}

bool send_answer(Peer& peer, const negotiation::Answer& answer) noexcept {
  return send_reply(peer, negotiation::encode(answer));
}

// One request through rdma_cm, at `server`: a connect request with the request as its
// private data, which the server's shim answers with a reject that carries its answer.
// Made under the shim's mutex: rdma_cm answers in microseconds, or says at once that
// nobody listens. Without an answer, `why` says why. `channel` is made at the first ask
// and serves the asks that follow it (a redirect, "not yet"). A Request is
// answered with an Answer, a Query with a Notice.
template <typename Reply, std::size_t kReplySize>
std::optional<Reply> ask_over_cm(std::optional<verbs::cm::EventChannel>& channel, const negotiation::Request& request,
                                 const Endpoint& server, Clock::time_point deadline, Fallback& why,
                                 std::optional<Reply> (*decode)(std::span<const std::byte>) noexcept) noexcept {
  try {
    if (!channel) channel.emplace();
    verbs::cm::Id id(*channel);
    auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
    id.resolve_address(*channel, cm_address(server), left);
    id.resolve_route(*channel, left);
    auto bytes = negotiation::encode(request);
    verbs::cm::ConnectParams params;
    params.private_data = bytes.span();
    params.qp_num = 0xffffff & static_cast<uint32_t>(random_cookie());  // no QP: it is refused either way
    id.connect(params);
    auto event = channel->next(std::chrono::duration_cast<milliseconds>(deadline - Clock::now()));
    if (!event) {
      why = Fallback::timeout;
    } else if (event->type() == RDMA_CM_EVENT_REJECTED && event->status() == kRejectedByConsumer) {
      why = Fallback::bad_message;
      return decode(unpadded(event->private_data(), kReplySize));
    } else if (event->type() == RDMA_CM_EVENT_ESTABLISHED) {
      id.disconnect();  // something else listens there: not a shim
      why = Fallback::no_peer_shim;
    } else {
      // Nobody listens on that port for rdma_cm, or the host has no RDMA.
      why = Fallback::no_peer_shim;
    }
  } catch (const std::exception& error) {
    log::info("shim: asking " + server.to_string() + " over rdma_cm: " + error.what());
    why = Fallback::no_peer_shim;
  }
  return std::nullopt;
}

}  // namespace

void Shim::move_as_client(int fd, Socket& s, std::unique_lock<ShimMutex>& lock) noexcept {
  s.tried = true;
  if (s.read_shut || s.write_shut) return fall_back(fd, Fallback::not_supported);
  auto tuple = tuple_of(fd, false);
  if (!tuple) return forget(fd);
  s.tuple = *tuple;
  sockaddr_storage server = to_sockaddr(tuple->server);
  if (!policy.allows(reinterpret_cast<sockaddr*>(&server))) return fall_back(fd, Fallback::policy);
  std::string key = tuple->server.to_string();
  if (auto it = no_shim.find(key); it != no_shim.end()) {
    if (Clock::now() < it->second) return fall_back(fd, Fallback::no_peer_shim);
    no_shim.erase(it);
  }
  transport::Engine* e = engine();
  if (!e) return fall_back(fd, Fallback::no_backend);
  // Another host is asked through rdma_cm; so is this one with RXIO_BACKEND=verbs, as
  // another host would be (but for loopback addresses, which rdma_cm cannot reach).
  const bool remote = !same_host(*tuple) || (verbs_forced && !loopback(tuple->server));
  if (remote && e->device_name().empty()) return fall_back(fd, Fallback::no_backend);

  // From here the program's calls on the socket wait, so that this side's TCP bytes
  // end where the switch says.
  s.mode = Socket::Mode::moving;
  list_moved(s);
  if (!quiesce(s)) return fall_back(fd, Fallback::busy);
  const auto deadline = Clock::now() + negotiate_timeout;
  const negotiation::Request request{*tuple, static_cast<uint32_t>(getpid())};
  std::optional<negotiation::Answer> answer;
  Fallback why = Fallback::peer_refused;

  // A moment without the mutex before asking again; false when the program closed the
  // socket meanwhile.
  auto pause_unlocked = [&] {
    ++s.holds;
    lock.unlock();
    timespec pause{0, 1'000'000};
    nanosleep(&pause, nullptr);
    lock.lock();
    const bool gone = s.gone;
    release(&s);
    return !gone;
  };
  // "Not yet": no process of a listener shared after fork has accepted the connection.
  // Asked again while a new ask still has the time to be answered.
  auto not_yet = [&](const std::optional<negotiation::Answer>& a) {
    return a && !a->accepted && a->refusal == negotiation::Refusal::not_yet && deadline - Clock::now() > milliseconds(10);
  };

  // Who answers: a remote client asks at the listener's port, then, for a listener
  // processes share after fork, at the port of the one that accepted the connection; a
  // local one at the listener's endpoint, then at that process's own.
  Endpoint asked_at = tuple->server;
  uint32_t target = 0;
  if (remote) {
    bool answered = false;  // a shim answers there
    std::optional<verbs::cm::EventChannel> channel;
    for (;;) {
      answer = ask_over_cm<negotiation::Answer, negotiation::kAnswerSize>(channel, request, asked_at, deadline, why,
                                                                          negotiation::decode_answer);
      answered |= answer.has_value();
      if (why == Fallback::no_peer_shim && !answer && answered) why = Fallback::peer_refused;  // the process named went
      if (why == Fallback::no_peer_shim && !answer) no_shim[key] = Clock::now() + kNoShimMemory;
      const bool redirected = asked_at.port != tuple->server.port;
      if (answer && answer->redirect && answer->redirect_port && !redirected) {
        asked_at.port = answer->redirect_port;
        answer.reset();
        continue;
      }
      if (not_yet(answer)) {
        if (!pause_unlocked()) return;
        answer.reset();
        continue;
      }
      break;
    }
  } else {
    int asked = 0;
    UniqueFd unix_fd;
    for (;;) {
      std::array<std::byte, 64> buffer;
      ++s.holds;
      const UnixReply reply = ask_over_unix(unix_fd, tuple->server.port, target, negotiation::encode(request).span(),
                                            fd, s, buffer, deadline, lock);
      release(&s);
      using Outcome = UnixReply::Outcome;
      switch (reply.outcome) {
        case Outcome::gone: return;
        case Outcome::no_socket: return fall_back(fd, Fallback::no_backend);
        case Outcome::backlog: return fall_back(fd, Fallback::timeout);
        case Outcome::no_endpoint:
          if (target) return fall_back(fd, Fallback::peer_refused);  // the process named went
          no_shim[key] = Clock::now() + kNoShimMemory;
          return fall_back(fd, Fallback::no_peer_shim);
        case Outcome::ours: return fall_back(fd, Fallback::not_supported);
        case Outcome::unsent: return fall_back(fd, Fallback::peer_refused);
        default: break;
      }
      ++asked;
      if (reply.outcome == Outcome::replied) answer = negotiation::decode_answer(std::span(buffer).first(reply.length));
      why = reply.outcome == Outcome::replied || reply.outcome == Outcome::ended || reply.outcome == Outcome::too_long
                ? Fallback::bad_message
            : reply.outcome == Outcome::timeout ? Fallback::timeout
                                                : Fallback::peer_refused;
      if (answer && answer->redirect && target == 0) {
        target = answer->redirect;
        answer.reset();
        unix_fd.reset();
        continue;
      }
      // The connection ended without an answer: ask again, on a new one. (After the
      // server forked, an answer has been seen to go missing now and then.)
      const bool unanswered = reply.outcome == Outcome::ended && Clock::now() < deadline && asked < 64;
      if (unanswered) unix_fd.reset();
      if (unanswered || not_yet(answer)) {
        // No process has accepted it yet: a moment, then ask again.
        if (!pause_unlocked()) return;
        answer.reset();
        continue;
      }
      break;
    }
  }
  if (!answer || answer->redirect) return fall_back(fd, answer ? Fallback::bad_message : why);
  if (!answer->accepted) return fall_back(fd, fallback_for(answer->refusal));

  // The engine connection; its first bytes are the cookie, then this side's Confirm
  // (closing it instead is the abort), and from the server its Switched or Abort.
  transport::Connection* c = nullptr;
  auto give_up = [&](Fallback reason) {
    if (c) {
      c->close();
      closing.push_back(c);
    }
    fall_back(fd, reason);
  };
  try {
    c = &e->connect(remote ? address_text(tuple->server) : "127.0.0.1", answer->engine_port);
  } catch (const std::exception& error) {
    log::info(std::string("shim: ") + error.what());
    return give_up(Fallback::link_failed);
  }
  // Across hosts only RDMA is worth the move.
  if (remote && std::string_view(c->backend_name()) != "verbs") return give_up(Fallback::no_backend);
  std::array<std::byte, 8> cookie;
  bytes::put64(cookie.data(), answer->cookie);
  if (c->stream_write(cookie) != cookie.size()) return give_up(Fallback::link_failed);
  // The server reads the TCP stream to its end before the engine connection: all of
  // it must be in its kernel first.
  ++s.holds;
  const bool acknowledged = wait_acknowledged(fd, s, deadline, *this, &lock);
  const bool closed = s.gone;
  const bool renamed = !closed && socket_of(fd) != &s;  // fd closed, another (dup) names it
  if (renamed) {
    s.tried = true;
    s.mode = Socket::Mode::tcp;
  }
  release(&s);
  if (closed || renamed) {
    // No Confirm went out: closing the engine connection tells the server to stay on
    // TCP.
    c->close();
    closing.push_back(c);
    if (board) board->count(Fallback::busy);
    wake_sleepers();
    return;
  }
  if (!acknowledged) return give_up(Fallback::busy);
  if (c->stream_write(negotiation::encode(negotiation::Notice{negotiation::Kind::confirm})) !=
      negotiation::kNoticeSize)
    return give_up(Fallback::link_failed);
  progress();

  // The server's word, taking in what TCP brings meanwhile (the server may be waiting
  // for its own bytes to be acknowledged, for up to its own timeout).
  std::array<std::byte, negotiation::kNoticeSize> word;
  std::size_t have = 0;
  auto spin_until = Clock::now() + poll_time;
  const auto word_deadline = Clock::now() + negotiate_timeout * 2;
  ++s.holds;
  for (;;) {
    progress();
    have += c->stream_read(std::span(word).subspan(have));
    if (have == word.size() || c->stream_closed() || c->failed() || s.gone || Clock::now() > word_deadline) break;
    if (!take_ahead(fd, s)) break;
    acknowledge_now(fd);
    if (Clock::now() < spin_until) {
      lock.unlock();
      lock.lock();
      continue;
    }
    if (!e->arm()) continue;
    pollfd p[2] = {{e->wait_fd(), POLLIN, 0}, {fd, POLLIN, 0}};
    lock.unlock();
    real().poll(p, 2, 1);
    lock.lock();
  }
  std::optional<negotiation::Notice> notice;
  if (have == word.size()) notice = negotiation::decode_notice(word);
  // The link failed before the server's word: this side cannot tell whether the server
  // switched, and asks it on the negotiation channel. The server answers for sure (a
  // switch not made by then never is).
  const bool asked = !notice && !s.gone && c->failed();
  if (asked) {
    negotiation::Request query = request;
    query.query = answer->cookie;
    notice = ask_where_the_switch_stands(fd, s, query, remote, asked_at, target, lock);
    log::info("shim: fd " + std::to_string(fd) + ": its link failed before the server's word on the switch; the " +
              "server says it " + (!notice ? "cannot tell" : notice->kind == negotiation::Kind::switched ? "switched"
                                                                                                          : "stays on TCP"));
    // What came of the word is no program's: the rest of it, had it come, would be
    // read out before the stream's bytes after it.
    if (notice && notice->kind == negotiation::Kind::switched && !s.gone)
      have += c->stream_read(std::span(word).subspan(have));
  }
  bool gone = s.gone;
  release(&s);
  if (gone) {
    c->close();
    closing.push_back(c);
    return;
  }
  // The server's kernel had every byte it sent acknowledged: they are all here now.
  if (notice && notice->kind == negotiation::Kind::switched && take_ahead(fd, s)) {
    become_rxio(fd, s, *c);
    after_switch(fd, s, notice->sent);
    // Switched, after a Query: back to TCP at once (unless the server's Resume, taken
    // in with the TCP bytes, already started it).
    if (s.mode == Socket::Mode::rxio && s.connection == c && c->failed()) start_return(fd, s, Return::link_failed);
    return;
  }
  // Refused, or the connection closed without a word (the server's socket went): both
  // sides stay on TCP.
  if (notice && notice->kind == negotiation::Kind::abort) return give_up(asked ? Fallback::link_failed : Fallback::busy);
  if (have == 0 && c->stream_closed()) return give_up(Fallback::peer_refused);
  // Anything else leaves this side unsure of where the server writes: rather than lose
  // bytes unseen, the connection ends (the kernel's disconnect resets it).
  log::warn("shim: fd " + std::to_string(fd) + ": the server's shim did not finish the switch; the connection is reset");
  disconnect(fd);
  give_up(have < word.size() ? Fallback::timeout : Fallback::bad_message);
}

std::optional<negotiation::Notice> Shim::ask_where_the_switch_stands(int fd, Socket& s,
                                                                     const negotiation::Request& query, bool remote,
                                                                     const Endpoint& asked_at, uint32_t target,
                                                                     std::unique_lock<ShimMutex>& lock) noexcept {
  const auto deadline = Clock::now() + negotiate_timeout;
  if (remote) {
    std::optional<verbs::cm::EventChannel> channel;
    Fallback why = Fallback::timeout;
    return ask_over_cm<negotiation::Notice, negotiation::kNoticeSize>(channel, query, asked_at, deadline, why,
                                                                      negotiation::decode_notice);
  }
  // The listener's endpoint (or the process that answered the request, after a
  // redirect), on a new connection, as for a request. Another process of a listener
  // shared after fork sends the Query on to the one that holds the connection, once.
  for (int hops = 0; hops < 2; ++hops) {
    UniqueFd unix_fd;
    std::array<std::byte, 64> buffer;
    const UnixReply reply = ask_over_unix(unix_fd, query.tuple.server.port, target, negotiation::encode(query).span(),
                                          fd, s, buffer, deadline, lock);
    if (reply.outcome != UnixReply::Outcome::replied) return std::nullopt;
    const auto bytes = std::span<const std::byte>(buffer).first(reply.length);
    if (auto notice = negotiation::decode_notice(bytes)) return notice;
    auto redirect = negotiation::decode_answer(bytes);
    if (!redirect || !redirect->redirect || target) return std::nullopt;
    target = redirect->redirect;
  }
  return std::nullopt;
}

Shim::UnixReply Shim::ask_over_unix(UniqueFd& unix_fd, uint16_t port, uint32_t target,
                                    std::span<const std::byte> message, int fd, Socket& s, std::span<std::byte> reply,
                                    Clock::time_point deadline, std::unique_lock<ShimMutex>& lock) noexcept {
  using Outcome = UnixReply::Outcome;
  if (!unix_fd) {
    unix_fd.reset(real().socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!unix_fd) return {Outcome::no_socket};
    socklen_t length = 0;
    sockaddr_un where = abstract_address(port, length, target);
    if (real().connect(unix_fd.get(), reinterpret_cast<sockaddr*>(&where), length) != 0)
      return {errno == EAGAIN ? Outcome::backlog : Outcome::no_endpoint};
    ucred cred{};
    socklen_t cred_length = sizeof cred;
    if (real().getsockopt(unix_fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cred_length) != 0 || cred.pid == getpid())
      return {Outcome::ours};
  }
  if (!send_all(unix_fd.get(), message, fd)) return {Outcome::unsent};
  // Without the mutex, so that this process's other threads go on.
  const auto spin_until = Clock::now() + poll_time;
  for (;;) {
    const ssize_t n = receive_message(unix_fd.get(), reply, nullptr);
    if (n > 0) return {Outcome::replied, std::size_t(n)};
    if (n == 0) return {Outcome::ended};
    if (n == -2) return {Outcome::too_long};
    if (errno != EAGAIN) return {Outcome::failed};
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return {Outcome::timeout};
    pollfd p{unix_fd.get(), POLLIN, 0};
    lock.unlock();
    real().poll(&p, 1, Clock::now() < spin_until ? 0 : static_cast<int>(left));
    lock.lock();
    if (s.gone) return {Outcome::gone};
  }
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
    auto acceptors = std::make_shared<Acceptors>();
    if (!acceptors->map()) acceptors.reset();
    Listening made;
    made.fd = std::move(unix_fd);
    made.address = *endpoint;
    made.acceptors = std::move(acceptors);
    it = endpoints.emplace(endpoint->port, std::move(made)).first;
    offer_remote_moves(it->second);
  }
  ++it->second.listeners;
  s.mode = Socket::Mode::listening;
  s.port = endpoint->port;
}

std::optional<verbs::cm::Id> Shim::cm_listen(const Endpoint& address, uint16_t for_port) noexcept {
  try {
    if (!cm_events) {
      cm_events.emplace();
      int flags = real().fcntl(cm_events->fd(), F_GETFL);
      real().fcntl(cm_events->fd(), F_SETFL, flags | O_NONBLOCK);
      add_to_wait_set(cm_events->fd());
    }
    verbs::cm::Id listener(*cm_events);
    listener.bind(cm_address(address));
    listener.listen(128);
    return listener;
  } catch (const std::exception& error) {
    log::info("shim: remote clients of port " + std::to_string(for_port) + " stay on TCP: rdma_cm listening on " +
              address.to_string() + ": " + error.what());
    return std::nullopt;
  }
}

void Shim::offer_remote_moves(Listening& endpoint) noexcept {
  transport::Engine* e = engine();
  if (!e || e->device_name().empty()) return;  // no RDMA here: remote clients stay on TCP
  // The same port in rdma_cm's own port space, which the kernel's TCP does not share.
  endpoint.cm_listener = cm_listen(endpoint.address, endpoint.address.port);
  endpoint.remote = endpoint.cm_listener.has_value();
}

void Shim::start_cm_thread() noexcept {
  if (cm_thread_started) return;
  // Every signal stays with the program's threads.
  sigset_t all, before;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &before);
  pthread_t thread;
  const int failed = pthread_create(
      &thread, nullptr,
      [](void* arg) -> void* {
        t_inside = true;  // its calls are the shim's own
        auto* shim = static_cast<Shim*>(arg);
        while (!shim->exiting.load(std::memory_order_acquire)) {
          pollfd p{-1, POLLIN, 0};
          int timeout = -1;
          {
            std::lock_guard lock(shim->mutex);
            if (shim->cm_events) p.fd = shim->cm_events->fd();
            // A parked request is answered or refused in time.
            if (!shim->peers.empty()) timeout = 100;
          }
          if (p.fd < 0 || real().poll(&p, 1, timeout) < 0) {
            timespec pause{0, 100'000'000};
            nanosleep(&pause, nullptr);
          }
          std::lock_guard lock(shim->mutex);
          if (shim->exiting.load(std::memory_order_acquire)) break;
          shim->serve_negotiations();
        }
        return nullptr;
      },
      this);
  pthread_sigmask(SIG_SETMASK, &before, nullptr);
  if (failed) {
    log::warn(std::string("shim: no thread to answer remote clients of pre-forked workers (they stay on TCP, each "
                          "after RXIO_SHIM_TIMEOUT_MS): ") +
              std::strerror(failed));
    return;
  }
  pthread_detach(thread);
  cm_thread_started = true;
}

void Shim::adopt_accepted(int fd) noexcept {
  auto tuple = tuple_of(fd, true);
  if (!tuple) return;
  forget(fd);  // a stale entry, had the fd been closed behind the shim's back
  Socket* s = new_socket();
  if (!s) return;
  s->server = true;
  s->tuple = *tuple;
  s->mode = Socket::Mode::tcp;
  if (!name(fd, *s)) {
    recycle(s);
    return;
  }
  accepted[*tuple] = fd;
  if (auto it = endpoints.find(tuple->server.port); it != endpoints.end() && it->second.acceptors) {
    // A child that accepts on a listener its parent made answers for it too, at an
    // endpoint that exists before any request is sent on to it.
    if (!it->second.shared || serve_shared(it->first, it->second)) {
      const uint16_t cm_port = it->second.own_cm ? it->second.own_cm->local_port() : 0;
      it->second.acceptors->record(*tuple, {static_cast<uint32_t>(getpid()), cm_port});
    }
  }
  // A request that came before the program accepted the connection is answered now.
  answer_parked(*tuple);
}

void Shim::answer_parked(const Tuple& tuple) noexcept {
  if (walking_peers) return;
  walking_peers = true;
  for (std::size_t i = 0; i < peers.size();) {
    if (peers[i].parked != tuple || answer(peers[i])) {
      ++i;
      continue;
    }
    if (peers[i].fd) remove_from_wait_set(peers[i].fd.get());
    peers.erase(peers.begin() + static_cast<long>(i));
  }
  walking_peers = false;
}

bool Shim::serve_shared(uint16_t port, Listening& endpoint) noexcept {
  if (!endpoint.own) {
    UniqueFd unix_fd(real().socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    socklen_t length = 0;
    sockaddr_un where = abstract_address(port, length, static_cast<uint32_t>(getpid()));
    if (!unix_fd || real().bind(unix_fd.get(), reinterpret_cast<sockaddr*>(&where), length) != 0 ||
        real().listen(unix_fd.get(), 1024) != 0)
      return false;
    add_to_wait_set(unix_fd.get());
    endpoint.own = std::move(unix_fd);
  }
  if (endpoint.remote && !endpoint.cm_listener && !endpoint.own_cm) {
    // The listener's maker sends remote clients of this process's connections on to
    // an rdma_cm port of its own.
    Endpoint any_port = endpoint.address;
    any_port.port = 0;
    endpoint.own_cm = cm_listen(any_port, port);
  }
  if (!endpoint.serving) {
    add_to_wait_set(endpoint.fd.get());
    endpoint.serving = true;
  }
  return true;
}

void Shim::serve_endpoint(int endpoint) noexcept {
  for (;;) {
    int fd = real().accept4(endpoint, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    peers.push_back(Peer{UniqueFd(fd)});
    add_to_wait_set(fd);
  }
}

void Shim::serve_cm_events() noexcept {
  while (cm_events) {
    std::optional<verbs::cm::Event> event;
    try {
      event = cm_events->next(milliseconds(0));
    } catch (const std::exception&) {
      return;
    }
    if (!event) return;
    if (event->type() != RDMA_CM_EVENT_CONNECT_REQUEST) continue;
    Peer peer;
    peer.cm_id.emplace(verbs::cm::Id::adopt(event->id()));
    auto request = negotiation::decode_request(
        unpadded(event->private_data(), negotiation::request_size(event->private_data())));
    // The proof a remote client can give: it asks from the address the connection
    // comes from.
    auto from = Endpoint::from(verbs::cm::SocketAddress::of_peer(*peer.cm_id).get());
    event.reset();  // acknowledged before the id is answered or destroyed
    bool keep = false;
    if (!request)
      keep = refuse(peer, negotiation::Refusal::bad_message, Fallback::bad_message);
    else if (!from || from->family != request->tuple.client.family || from->address != request->tuple.client.address)
      keep = refuse(peer, negotiation::Refusal::not_owner, Fallback::impostor);
    else
      keep = take_request(peer, *request);
    if (keep) {
      try {
        peers.push_back(std::move(peer));
      } catch (const std::bad_alloc&) {
      }
    }
  }
}

bool Shim::take_request(Peer& peer, const negotiation::Request& request) noexcept {
  if (!endpoints.contains(request.tuple.server.port))
    return refuse(peer, negotiation::Refusal::not_owner, Fallback::impostor);
  if (request.query) return answer_query(peer, request);
  sockaddr_storage client = to_sockaddr(request.tuple.client);
  if (!policy.allows(reinterpret_cast<sockaddr*>(&client)))
    return refuse(peer, negotiation::Refusal::policy, Fallback::policy);
  peer.parked = request.tuple;
  peer.until = Clock::now() + negotiate_timeout;
  return answer(peer);
}

bool Shim::answer_query(Peer& peer, const negotiation::Request& query) noexcept {
  // Not switched yet: now never, though the client's Confirm may still come.
  if (auto it = committed.find(query.tuple); it != committed.end() && it->second.cookie == query.query)
    drop_committed(query.tuple);
  auto outcome = switch_outcomes.find(query.query);
  if (outcome == switch_outcomes.end() || outcome->second.tuple != query.tuple) {
    // A local Query reaches whichever process of a listener shared after fork serves
    // its endpoint: sent on to the one that accepted the connection.
    auto owner = peer.cm_id ? std::nullopt : other_owner(query.tuple);
    // A forked child knows none of its parent's moves: one it has no record of (the
    // connection came before the fork) is its parent's to answer for.
    if (!peer.cm_id && forked_child && (!owner || owner->pid == 0))
      owner = Acceptors::Owner{static_cast<uint32_t>(getppid()), 0};
    if (owner && owner->pid != 0) {
      send_answer(peer, negotiation::Answer{false, {}, 0, 0, owner->pid, 0});
      return false;
    }
    // Forgotten, or never this side's: the client cannot tell, and resets.
    send_answer(peer, negotiation::Answer{false, negotiation::Refusal::unavailable, 0, 0});
    return false;
  }
  const SwitchOutcome& o = outcome->second;
  send_reply(peer, negotiation::encode(negotiation::Notice{
                       o.switched ? negotiation::Kind::switched : negotiation::Kind::abort, o.switched ? o.sent : 0}));
  return false;
}

bool Shim::refuse(Peer& peer, negotiation::Refusal why, Fallback counted) noexcept {
  if (board) board->count(counted);
  send_answer(peer, negotiation::Answer{false, why, 0, 0});
  return false;
}

std::optional<Acceptors::Owner> Shim::other_owner(const Tuple& tuple) noexcept {
  auto endpoint = endpoints.find(tuple.server.port);
  if (endpoint == endpoints.end() || !endpoint->second.shared || !endpoint->second.acceptors) return std::nullopt;
  const Acceptors::Owner owner = endpoint->second.acceptors->owner(tuple);
  if (owner.pid == static_cast<uint32_t>(getpid())) return std::nullopt;
  return owner;
}

bool Shim::answer_unheld(Peer& peer, const Tuple& tuple) noexcept {
  // Processes share the listener: the one that accepted it answers; until one has, the
  // client asks again (a process here may sleep outside the shim). A remote client's
  // request reaches the listener's maker (only it can read the listener's rdma_cm
  // events), which sends it on to the owner's own rdma_cm port.
  if (auto owner = other_owner(tuple)) {
    if (owner->pid == 0) {
      // Not a fall-back: the client asks again (a local one on this connection).
      if (!send_answer(peer, negotiation::Answer{false, negotiation::Refusal::not_yet, 0, 0})) return false;
      peer.parked.reset();
      return !peer.cm_id;
    }
    if (peer.cm_id && owner->cm_port == 0)
      return refuse(peer, negotiation::Refusal::unavailable, Fallback::not_supported);
    send_answer(peer, negotiation::Answer{false, {}, 0, 0, owner->pid, peer.cm_id ? owner->cm_port : uint16_t{0}});
    return false;
  }
  // With SO_REUSEPORT the kernel may have given it to another listener's process; or
  // this process has not accepted it yet.
  if (Clock::now() < peer.until) return true;
  return refuse(peer, negotiation::Refusal::unavailable, Fallback::not_supported);
}

bool Shim::answer(Peer& peer) noexcept {
  const Tuple tuple = *peer.parked;
  // Only a connection this process accepted.
  auto held = accepted.find(tuple);
  if (held == accepted.end()) return answer_unheld(peer, tuple);
  Socket* s = socket_of(held->second);
  if (s && s->tuple == tuple && s->mode == Socket::Mode::returning) {
    // Moving again, asked by a client that is through with its return before this
    // side is. Once the client's Resume is in, the move may go on: the client takes
    // in this side's kept bytes before it confirms, and the switch waits for them to
    // be out. Until then the request waits (after_return answers it).
    go_on_returning(held->second, *s);
    if (s->mode == Socket::Mode::returning) {
      if (!may_move_again(*s)) return refuse(peer, negotiation::Refusal::closing, Fallback::not_supported);
      if (!s->back.in_done) {
        if (Clock::now() < peer.until) return true;
        return refuse(peer, negotiation::Refusal::closing, Fallback::not_supported);
      }
    }
  }
  const bool usable = s && s->tuple == tuple && !s->read_shut && !s->write_shut &&
                      (s->mode == Socket::Mode::tcp ? !s->tried.load() : s->mode == Socket::Mode::returning);
  if (!usable) return refuse(peer, negotiation::Refusal::closing, Fallback::not_supported);
  transport::Engine* e = engine();
  if (!e) return refuse(peer, negotiation::Refusal::unavailable, Fallback::no_backend);
  uint64_t cookie = random_cookie();
  try {
    committed[tuple] = Committed{cookie, nullptr, held->second, Clock::now() + negotiate_timeout * 2, {}, 0};
  } catch (const std::bad_alloc&) {
    return refuse(peer, negotiation::Refusal::unavailable, Fallback::no_backend);
  }
  // The client's last TCP bytes are acknowledged at once: it waits for that.
  acknowledge_now(held->second);
  if (!send_answer(peer, negotiation::Answer{true, {}, e->listen_port(), cookie})) drop_committed(tuple);
  return false;
}

bool Shim::serve_peers() noexcept {
  bool done_with_one = false;
  walking_peers = true;
  for (std::size_t i = 0; i < peers.size();) {
    if (serve_peer(peers[i])) {
      ++i;
      continue;
    }
    if (peers[i].fd) remove_from_wait_set(peers[i].fd.get());
    peers.erase(peers.begin() + static_cast<long>(i));
    done_with_one = true;
  }
  walking_peers = false;
  return done_with_one;
}

// False when the peer is done with.
bool Shim::serve_peer(Peer& peer) noexcept {
  if (peer.parked) return answer(peer);
  std::array<std::byte, 64> buffer;
  UniqueFd passed;
  ssize_t n = receive_message(peer.fd.get(), buffer, &passed);
  if (n == -1 && errno == EAGAIN) return true;
  if (n <= 0) return false;  // gone before asking
  auto request = negotiation::decode_request(std::span(buffer.data(), std::size_t(n)));
  if (!request) return refuse(peer, negotiation::Refusal::bad_message, Fallback::bad_message);
  // The proof: the client handed over its TCP socket, whose ends must be the ones it
  // names, from the process it claims to be.
  ucred cred{};
  socklen_t cred_length = sizeof cred;
  auto owned = passed ? tuple_of(passed.get(), false) : std::nullopt;
  if (!owned || *owned != request->tuple ||
      real().getsockopt(peer.fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cred_length) != 0 ||
      static_cast<uint32_t>(cred.pid) != request->pid)
    return refuse(peer, negotiation::Refusal::not_owner, Fallback::impostor);
  return take_request(peer, *request);
}

void Shim::serve_committed() noexcept {
  const auto now = Clock::now();
  std::vector<Tuple> done;
  for (auto& [tuple, entry] : committed) {
    transport::Connection* c = entry.connection;
    if (!c) {
      if (now > entry.until) done.push_back(tuple);
      continue;
    }
    entry.have += c->stream_read(std::span(entry.word).subspan(entry.have));
    if (entry.have < entry.word.size()) {
      if (c->stream_closed() || c->failed() || now > entry.until) done.push_back(tuple);  // the client gave up
      continue;
    }
    auto notice = negotiation::decode_notice(entry.word);
    // A client that gave up after its confirm (its time ran out) closed the connection.
    if (notice && notice->kind == negotiation::Kind::confirm && !c->stream_closed() && !c->failed())
      switch_as_server(tuple, entry);
    else if (!notice && board) board->count(Fallback::bad_message);
    done.push_back(tuple);
  }
  for (const Tuple& tuple : done) drop_committed(tuple);
}

void Shim::switch_as_server(const Tuple& tuple, Committed& entry) noexcept {
  transport::Connection& c = *entry.connection;
  Socket* s = entry.fd >= 0 ? socket_of(entry.fd) : nullptr;
  // The fd may name another socket by now (closed, its number reused).
  if (s && (s->tuple != tuple || !s->server)) s = nullptr;
  auto abort = [&](Fallback why) {
    c.stream_write(negotiation::encode(negotiation::Notice{negotiation::Kind::abort}));
    engine_->progress();
    if (s) fall_back(entry.fd, why);
  };
  // Moving again: its return goes first (the client took in its kept bytes).
  if (s && s->mode == Socket::Mode::returning) go_on_returning(entry.fd, *s);
  // Half-closed since the answer: its end went out on TCP, so it stays there.
  if (!s || s->mode != Socket::Mode::tcp || s->tried || s->read_shut || s->write_shut)
    return abort(Fallback::not_supported);
  // The program's calls on the socket wait from here, so that our TCP bytes end now;
  // the client sent none after its confirm.
  s->mode = Socket::Mode::moving;
  list_moved(*s);
  if (!quiesce(*s) || !wait_acknowledged(entry.fd, *s, Clock::now() + negotiate_timeout, *this))
    return abort(Fallback::busy);
  // How many bytes it sent, for the client to tell them from a Resume that follows.
  uint64_t sent = negotiation::kSentUnknown, received = 0;
  if (!tcp_counts(entry.fd, sent, received)) sent = negotiation::kSentUnknown;
  if (c.stream_write(negotiation::encode(negotiation::Notice{negotiation::Kind::switched, sent})) !=
      negotiation::kNoticeSize)
    return abort(Fallback::link_failed);
  accepted.erase(s->tuple);
  entry.connection = nullptr;
  entry.switched = true;
  record_outcome(entry.cookie, SwitchOutcome{tuple, true, sent});
  become_rxio(entry.fd, *s, c);
  engine_->progress();  // the word goes out now (not Shim::progress: it would serve the moves again)
}

void Shim::record_outcome(uint64_t cookie, SwitchOutcome outcome) noexcept {
  const auto now = Clock::now();
  // The oldest go first: each is kept as long.
  while (!outcome_order.empty() && now > outcome_order.front().first) {
    switch_outcomes.erase(outcome_order.front().second);
    outcome_order.pop_front();
  }
  try {
    // Kept well past the client's wait for the word (twice RXIO_SHIM_TIMEOUT_MS).
    outcome_order.emplace_back(now + negotiate_timeout * 4, cookie);
    switch_outcomes[cookie] = outcome;
  } catch (const std::bad_alloc&) {
    // Unrecorded: a client whose link fails before the server's word resets.
  }
}

void Shim::drop_committed(const Tuple& tuple) noexcept {
  auto it = committed.find(tuple);
  if (it == committed.end()) return;
  if (!it->second.switched) record_outcome(it->second.cookie, SwitchOutcome{tuple, false, 0});
  if (it->second.connection) {
    it->second.connection->close();
    closing.push_back(it->second.connection);
  }
  // The client does not ask twice: its socket needs the shim no more. (But for a
  // listener shared after fork: its record names this process, to which another sends
  // the client's Query on.)
  auto endpoint = endpoints.find(tuple.server.port);
  const bool shared = endpoint != endpoints.end() && endpoint->second.shared && endpoint->second.acceptors;
  if (Socket* s = it->second.fd >= 0 ? socket_of(it->second.fd) : nullptr;
      s && !shared && s->tuple == tuple && s->mode == Socket::Mode::tcp && !s->has_ahead() && s->fds.size() == 1) {
    accepted.erase(tuple);
    forget(it->second.fd);
  }
  committed.erase(it);
}

void Shim::match_cookies() noexcept {
  transport::Engine* e = running_engine();
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

bool Shim::service(bool woken) noexcept {
  bool changed = false;
  transport::Engine* e = running_engine();
  if (e) changed = e->on_wake() > 0;
  notice_failures();
  for (auto& [port, endpoint] : endpoints) {
    if (endpoint.serving) serve_endpoint(endpoint.fd.get());
    if (endpoint.own) serve_endpoint(endpoint.own.get());
  }
  changed |= serve_negotiations();
  serve_moves();
  // A Resume keeps the wait set readable: a later wake-up of it finds it, or, for a
  // process whose engine always has work, a look every millisecond.
  if (woken || Clock::now() >= next_resume_look) {
    serve_resumes();
    next_resume_look = Clock::now() + milliseconds(1);
  }
  serve_returning();
  serve_lingering();
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

void exec_prepare(ExecEnvironment& env) noexcept {
  Shim& sh = Shim::get();
  if (getpid() != sh.state_pid) return;  // a vfork() child: the state is its parent's
  Inside inside;
  std::lock_guard lock(sh.mutex);
  sh.before_exec(env);
}

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
        if (sh.sleep(lock, p, 1, -1, nullptr) < 0 && errno == EINTR && !Shim::signals_restart()) return -1;
        continue;
      }
    }
    // Without the lock: another process that shares the listener (pre-forked workers)
    // may take the connection first, and then a blocking accept waits in the kernel,
    // as it would without the shim. (The listener's flags are the processes' to share:
    // no O_NONBLOCK for a moment here.)
    lock.unlock();
    int accepted = real().accept4(fd, address, length, flags | (blocking ? SOCK_NONBLOCK : 0));
    const int saved = errno;
    lock.lock();
    errno = saved;
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
  // A forked child's copy of a socket its parent was switching: neither knows where.
  if (s && s->inherited) {
    errno = ENOTCONN;
    return -1;
  }
  // Going back to TCP with kept bytes still to write: the end goes after them.
  if (s && s->mode == Socket::Mode::returning && !s->back.out_done && how != SHUT_RD) {
    if (how == SHUT_RDWR && real().shutdown(fd, SHUT_RD) == 0) s->read_shut = true;
    s->write_shut = true;
    sh.go_on_returning(fd, *s);
    return 0;
  }
  if (!s || s->mode != Socket::Mode::rxio) {
    int rc = real().shutdown(fd, how);
    // A half-closed TCP connection stays where it is.
    if (rc == 0 && s &&
        (s->mode == Socket::Mode::tcp || s->mode == Socket::Mode::connecting || s->mode == Socket::Mode::returning)) {
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
      if (s->fds.size() == 1) s->closed = true;
      sh.forget(fd);
      // What was written goes out now, as a closing TCP socket would send it.
      if (rxio) sh.progress();
    }
  }
  epoll_closed(fd);
  return real().close(fd);
}

void replacing(int target) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::lock_guard lock(sh.mutex);
  if (Socket* s = sh.socket_of(target)) {
    if (s->fds.size() == 1) s->closed = true;
    sh.forget(target);
  }
}

int duplicate(int fd, int result) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::lock_guard lock(sh.mutex);
  if (result == fd || result < 0 || result >= Shim::kMaxFds) return result;
  if (Socket* target = sh.socket_of(result); target && target->fds.size() == 1) target->closed = true;
  sh.forget(result);  // dup2 over a socket of ours closed it
  if (Socket* s = sh.socket_of(fd); s && !sh.name(result, *s)) {
    // Untracked, the new fd would bypass a moved socket's stream: the dup fails
    // (dup2 and dup3 lose their target, as if it failed after closing it).
    real().close(result);
    errno = ENOMEM;
    return -1;
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
  // The kernel's socket knows nothing of a connection that could not go back to TCP.
  if (s && s->broken && value && length && *length >= sizeof(int)) {
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
  if (s->mode == Socket::Mode::rxio) sh.progress();  // (which may send it back to TCP)
  // The peer's Resume and kept bytes are taken in first: a program that asks how much
  // it may read before it reads drives the return as a read would.
  if (s->mode == Socket::Mode::returning && !s->inherited) sh.go_on_returning(fd, *s);
  std::size_t ready = s->ahead.size() - s->ahead_read;
  if (s->mode == Socket::Mode::rxio) {
    ready += s->connection->stream_available();
  } else if (s->mode != Socket::Mode::returning || s->back.in_done) {
    // (Before the peer's Resume is read, what the kernel holds is not the program's.)
    int in_kernel = 0;
    if (real().ioctl(fd, FIONREAD, &in_kernel) != 0) return -1;
    ready += std::size_t(in_kernel);
  }
  *count = static_cast<int>(std::min<std::size_t>(ready, INT32_MAX));
  return 0;
}

}  // namespace rxio::shim
