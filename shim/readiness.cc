// poll, ppoll, select, pselect and epoll over a mix of the program's own fds and
// sockets carried by rxio, without a thread per socket.
//
// A socket in rxio mode leaves the kernel's view: its readiness comes from its
// transport connection. Every wait that involves one also watches the shim's wait set
// (an epoll fd over the engine's wake-up fds and the negotiation sockets), so a kernel
// sleep ends when a peer writes, and the shim then works out who became ready. The
// program's epoll sets hold the wait set as one more member, so nested epoll sets and
// an fd in several sets keep working.
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <vector>

#include "shim/calls.h"
#include "shim/real.h"

namespace rxio::shim {

using Clock = std::chrono::steady_clock;

short readiness(const Socket& s) noexcept {
  const transport::Connection& c = *s.connection;
  short events = 0;
  // A failed link whose peer had closed its side: the end to read, and a write goes
  // back to TCP. (Any other failed connection is going back already.)
  if (c.failed()) return POLLIN | POLLRDNORM | POLLRDHUP | POLLOUT | POLLWRNORM;
  if (c.stream_readable() || s.read_shut || s.has_ahead()) events |= POLLIN | POLLRDNORM;
  if (c.stream_closed()) events |= POLLRDHUP | (s.write_shut ? POLLHUP : 0);
  // After shutdown(SHUT_WR) TCP still says writable: the write then fails at once.
  if (s.write_shut || c.stream_writable()) events |= POLLOUT | POLLWRNORM;
  return events;
}

int Shim::sleep(std::unique_lock<ShimMutex>& lock, pollfd* fds, unsigned long count, int timeout_ms,
                const sigset_t* mask) noexcept {
  transport::Engine* e = running_engine();
  if (e && !e->arm()) {
    // Work came in: the shim's own first (a cookie, a client's word), then the caller
    // looks again.
    service(false);
    return 0;
  }
  const int waker = my_waker();
  fds[count] = pollfd{wait_set.get(), POLLIN, 0};
  fds[count + 1] = pollfd{waker, POLLIN, 0};
  sleeping.push_back(waker);
  lock.unlock();
  int n;
  if (mask) {
    timespec ts{timeout_ms / 1000, (timeout_ms % 1000) * 1000000L};
    n = real().ppoll(fds, count + 2, timeout_ms < 0 ? nullptr : &ts, mask);
  } else {
    n = real().poll(fds, count + 2, timeout_ms);
  }
  int saved = errno;
  lock.lock();
  std::erase(sleeping, waker);
  if (n > 0 && fds[count + 1].revents) {
    --n;
    uint64_t drained;
    [[maybe_unused]] ssize_t r = real().read(waker, &drained, sizeof drained);
  }
  if (n > 0 && fds[count].revents) {
    --n;
    service();
  } else {
    serve_moves();  // woken by another thread, which may have taken their arrivals in
  }
  errno = saved;
  return n;
}

bool Shim::signals_restart() noexcept {
  for (int signal = 1; signal < NSIG; ++signal) {
    struct sigaction action {};
    if (::sigaction(signal, nullptr, &action) != 0) continue;  // none by that number
    const bool handled = (action.sa_flags & SA_SIGINFO) || (action.sa_handler != SIG_DFL && action.sa_handler != SIG_IGN);
    if (handled && !(action.sa_flags & SA_RESTART)) return false;
  }
  return true;
}

namespace {

constexpr uint64_t kWakerMagic = 0x7278696f77616b65ull;   // "rxiowake"
constexpr uint64_t kPendingMagic = 0x7278696f72656479ull;  // "rxiordy"

int remaining(Clock::time_point deadline, int timeout_ms) {
  if (timeout_ms < 0) return -1;
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

bool involves_shim(const Socket* s) { return s && s->mode != Socket::Mode::fresh; }

uint32_t to_epoll(short poll_events) { return static_cast<uint32_t>(static_cast<unsigned short>(poll_events)); }

// Small sets stay on the stack.
template <typename T, std::size_t N>
class Scratch {
 public:
  explicit Scratch(std::size_t n) {
    if (n > N) heap_.resize(n);
    data_ = n > N ? heap_.data() : stack_;
  }
  T* data() { return data_; }

 private:
  T stack_[N];
  std::vector<T> heap_;
  T* data_;
};

}  // namespace

int poll_any(pollfd* fds, nfds_t count, int timeout_ms, const sigset_t* mask) noexcept {
  Shim& sh = Shim::get();
  bool ours = false;
  for (nfds_t i = 0; i < count && !ours; ++i) ours = involves_shim(sh.socket_of(fds[i].fd));
  if (!ours) {
    if (!mask) return real().poll(fds, count, timeout_ms);
    timespec ts{timeout_ms / 1000, (timeout_ms % 1000) * 1000000L};
    return real().ppoll(fds, count, timeout_ms < 0 ? nullptr : &ts, mask);
  }
  Inside inside;
  std::unique_lock lock(sh.mutex);
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  auto spin_until = start + sh.poll_time;
  Scratch<pollfd, 64> kernel(count + 2);
  for (;;) {
    // What arrived since the last call counts even when something is ready already.
    sh.progress();
    bool any_kernel = false, any_rxio = false;
    int ready = 0;
    for (nfds_t i = 0; i < count; ++i) {
      kernel.data()[i] = fds[i];
      kernel.data()[i].revents = 0;
      fds[i].revents = 0;
      Socket* s = sh.socket_of(fds[i].fd);
      if (s && s->mode == Socket::Mode::returning && !s->inherited) sh.go_on_returning(fds[i].fd, *s);
      if (s && s->mode == Socket::Mode::rxio) {
        kernel.data()[i].fd = -1;
        any_rxio = true;
        fds[i].revents = static_cast<short>(readiness(*s) & (fds[i].events | POLLERR | POLLHUP));
        ready += fds[i].revents != 0;
      } else if (s && s->kernel_blind()) {
        // On its way back, which the wait set carries on: ready for its read-ahead only.
        kernel.data()[i].fd = -1;
        fds[i].revents = static_cast<short>(s->has_ahead() ? fds[i].events & (POLLIN | POLLRDNORM) : 0);
        ready += fds[i].revents != 0;
      } else if (fds[i].fd >= 0) {
        any_kernel = true;
        // Bytes the shim took from the kernel ahead of the program (a switch, a return).
        if (s && s->has_ahead() && (fds[i].events & POLLIN)) {
          fds[i].revents = POLLIN | (fds[i].events & POLLRDNORM);
          ++ready;
        }
      }
    }
    // A socket still connecting is reported as the kernel sees it: the program's next
    // call on it (SO_ERROR, a write) negotiates.
    // A process that serves negotiations looks at its wait set too, so that a program
    // that polls without sleeping still answers them.
    const bool serving = !sh.endpoints.empty() || !sh.peers.empty();
    kernel.data()[count] = pollfd{serving ? sh.wait_set.get() : -1, POLLIN, 0};
    if ((any_kernel || serving) && real().poll(kernel.data(), count + 1, 0) > 0) {
      for (nfds_t i = 0; i < count; ++i) {
        if (!kernel.data()[i].revents || kernel.data()[i].fd < 0) continue;
        ready += fds[i].revents == 0;
        fds[i].revents |= kernel.data()[i].revents;
      }
      if (kernel.data()[count].revents && sh.service()) continue;
    }
    if (ready > 0 || timeout_ms == 0) return ready;
    int left = remaining(deadline, timeout_ms);
    if (left == 0) return 0;
    if (any_rxio && Clock::now() < spin_until) {
      lock.unlock();
      lock.lock();
      continue;
    }
    for (nfds_t i = 0; i < count; ++i) kernel.data()[i].revents = 0;
    int n = sh.sleep(lock, kernel.data(), count, left, mask);
    if (n < 0 && errno == EINTR) return -1;
  }
}

int select_any(int nfds, fd_set* readable, fd_set* writable, fd_set* failed, int timeout_ms,
               const sigset_t* mask) noexcept {
  std::vector<pollfd> fds;
  for (int fd = 0; fd < nfds; ++fd) {
    short events = 0;
    if (readable && FD_ISSET(fd, readable)) events |= POLLIN;
    if (writable && FD_ISSET(fd, writable)) events |= POLLOUT;
    if (failed && FD_ISSET(fd, failed)) events |= POLLPRI;
    if (events) fds.push_back({fd, events, 0});
  }
  int n = poll_any(fds.data(), fds.size(), timeout_ms, mask);
  if (n < 0) return n;
  if (readable) FD_ZERO(readable);
  if (writable) FD_ZERO(writable);
  if (failed) FD_ZERO(failed);
  int total = 0;
  for (const pollfd& p : fds) {
    if (p.revents & POLLNVAL) {
      errno = EBADF;
      return -1;
    }
    // As the kernel's select: an error or hang-up makes an fd readable and writable.
    if (readable && (p.events & POLLIN) && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
      FD_SET(p.fd, readable);
      ++total;
    }
    if (writable && (p.events & POLLOUT) && (p.revents & (POLLOUT | POLLERR))) {
      FD_SET(p.fd, writable);
      ++total;
    }
    if (failed && (p.events & POLLPRI) && (p.revents & POLLPRI)) {
      FD_SET(p.fd, failed);
      ++total;
    }
  }
  return total;
}

// ---- epoll -------------------------------------------------------------------------

int epoll_control(int epfd, int op, int fd, epoll_event* event) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::unique_lock lock(sh.mutex);
  Socket* s = sh.socket_of(fd);
  if (!s) return real().epoll_ctl(epfd, op, fd, event);
  EpollSet* set = sh.epoll_of(epfd);
  if (!set) {
    if (epfd < 0 || epfd >= Shim::kMaxFds) return real().epoll_ctl(epfd, op, fd, event);
    set = new (std::nothrow) EpollSet();
    if (!set) {
      errno = ENOMEM;
      return -1;
    }
    set->pending.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    epoll_event flag{};
    flag.events = EPOLLIN;
    flag.data.u64 = kPendingMagic;
    real().epoll_ctl(epfd, EPOLL_CTL_ADD, set->pending.get(), &flag);
    sh.epolls[epfd].store(set, std::memory_order_release);
    sh.epoll_fds.push_back(epfd);
  }
  auto it = set->interests.find(fd);
  const bool rxio = s->kernel_blind();
  // The kernel's checks, in its order, for the sockets it no longer sees.
  const bool known = it != set->interests.end();
  if (op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD || op == EPOLL_CTL_DEL) {
    if (op == EPOLL_CTL_ADD ? known : !known) {
      errno = known ? EEXIST : ENOENT;
      return -1;
    }
    if (op != EPOLL_CTL_DEL && !event) {
      errno = EFAULT;
      return -1;
    }
  }
  switch (op) {
    case EPOLL_CTL_ADD: {
      if (!rxio && real().epoll_ctl(epfd, op, fd, event) != 0) return -1;
      EpollSet::Interest interest;
      interest.events = event->events;
      interest.data = event->data;
      interest.in_kernel = !rxio;
      set->interests[fd] = interest;
      s->epolls.push_back(epfd);
      sh.watch_wait_set(epfd, *set);
      if (rxio) sh.wake_sleepers();
      return 0;
    }
    case EPOLL_CTL_MOD: {
      if (it->second.in_kernel && real().epoll_ctl(epfd, op, fd, event) != 0) return -1;
      // Re-armed after it went back to TCP as a one-shot that had fired (back.cc).
      if (!it->second.in_kernel && !rxio) {
        if (real().epoll_ctl(epfd, EPOLL_CTL_ADD, fd, event) != 0 &&
            (errno != EEXIST || real().epoll_ctl(epfd, EPOLL_CTL_MOD, fd, event) != 0))
          return -1;
        it->second.in_kernel = true;
      }
      it->second.events = event->events;
      it->second.data = event->data;
      it->second.disarmed = false;
      it->second.reported = 0;
      it->second.reported_at = ~0ull;
      if (rxio) sh.wake_sleepers();
      return 0;
    }
    case EPOLL_CTL_DEL: {
      if (it->second.in_kernel && real().epoll_ctl(epfd, op, fd, event) != 0) return -1;
      set->interests.erase(it);
      std::erase(s->epolls, epfd);
      return 0;
    }
    default:
      errno = EINVAL;
      return -1;
  }
}

void epoll_closed(int epfd) noexcept {
  Shim& sh = Shim::get();
  Inside inside;
  std::unique_lock lock(sh.mutex);
  EpollSet* set = sh.epoll_of(epfd);
  if (!set) return;
  sh.epolls[epfd].store(nullptr, std::memory_order_release);
  std::erase(sh.epoll_fds, epfd);
  for (auto& [fd, interest] : set->interests)
    if (Socket* s = sh.socket_of(fd)) std::erase(s->epolls, epfd);
  delete set;
}

namespace {

// The sockets of `set` whose readiness the shim tells that are ready, as epoll
// reports them. With no `events`, only counts them and changes nothing.
int collect(Shim& sh, EpollSet& set, int epfd, epoll_event* events, int max) noexcept {
  const bool look_only = events == nullptr;
  int n = 0;
  for (auto& [fd, interest] : set.interests) {
    if (n == max) break;
    if (interest.disarmed) continue;
    Socket* s = sh.socket_of(fd);
    if (!s) continue;
    uint32_t ready = 0;
    if (s->mode == Socket::Mode::rxio && !interest.in_kernel) {
      ready = to_epoll(readiness(*s)) & (interest.events | EPOLLERR | EPOLLHUP);
    } else if (s->has_ahead() && (s->mode == Socket::Mode::tcp || s->mode == Socket::Mode::returning)) {
      // Bytes taken from the kernel (by a switch, a return, or the image before an
      // exec), which it no longer reports; its own events for the socket are merged
      // with this one (epoll_wait_any).
      ready = interest.events & EPOLLIN;
    } else {
      continue;
    }
    if (interest.events & EPOLLET) {
      const uint64_t seen = s->connection ? s->connection->stream_events() : s->ahead.size();
      // An edge: a readiness bit that was not there, or bytes that came since.
      bool edge = ready && ((ready & ~interest.reported) || seen != interest.reported_at);
      if (look_only) {
        n += edge;
        continue;
      }
      // Bits that went away count again when they come back.
      interest.reported = ready;
      if (!edge) continue;
      interest.reported_at = seen;
    }
    if (!ready) continue;
    if (look_only) {
      ++n;
      continue;
    }
    if (interest.events & EPOLLONESHOT) {
      interest.disarmed = true;
      // One the kernel watches too (bytes behind a read-ahead) must not fire there as well.
      if (interest.in_kernel) {
        epoll_event off{};
        off.events = EPOLLONESHOT;
        off.data = interest.data;
        real().epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &off);
      }
    }
    events[n].events = ready;
    events[n].data = interest.data;
    ++n;
  }
  return n;
}

// The kernel's events for sockets collect() reported already (for their read-ahead),
// merged into those: `events` holds `collected` of collect()'s, then `got` of the
// kernel's. Epoll data the program gave two fds alike cannot be told apart, and counts
// as one. How many are left.
int merge_kernel(epoll_event* events, int collected, int got) noexcept {
  int kept = collected;
  for (int k = collected; k < collected + got; ++k) {
    auto same = std::find_if(events, events + collected, [&](const epoll_event& e) { return e.data.u64 == events[k].data.u64; });
    if (same != events + collected) same->events |= events[k].events;
    else events[kept++] = events[k];
  }
  return kept;
}

// Keeps the kernel's events for the program; the wait set's own entry is serviced
// instead.
int take_kernel(Shim& sh, epoll_event* events, int got, bool& woke) noexcept {
  int kept = 0;
  for (int i = 0; i < got; ++i) {
    if (events[i].data.u64 == kWakerMagic || events[i].data.u64 == kPendingMagic) continue;
    if (sh.is_wait_set_event(events[i])) {
      woke = true;
      continue;
    }
    events[kept++] = events[i];
  }
  if (woke) sh.service();
  return kept;
}

// Before the kernel waits on a set the shim does not watch, which may hold one it
// does: flag the shim's sets whose sockets are ready, and arm the engine.
void prepare_outer_wait(Shim& sh) noexcept {
  Inside inside;
  std::unique_lock lock(sh.mutex);
  if (sh.epoll_fds.empty()) return;
  sh.progress();
  for (int ep : sh.epoll_fds) {
    EpollSet* set = sh.epoll_of(ep);
    if (!set || collect(sh, *set, ep, nullptr, 1 << 30) == 0) continue;
    uint64_t one = 1;
    [[maybe_unused]] ssize_t w = real().write(set->pending.get(), &one, sizeof one);
  }
  if (transport::Engine* e = sh.running_engine(); e && !e->arm()) sh.service(false);
}

}  // namespace

int epoll_wait_any(int epfd, epoll_event* events, int max, int timeout_ms, const sigset_t* mask) noexcept {
  Shim& sh = Shim::get();
  if (!sh.epoll_of(epfd) || max <= 0) {
    prepare_outer_wait(sh);
    return real().epoll_pwait(epfd, events, max, timeout_ms, mask);
  }
  Inside inside;
  std::unique_lock lock(sh.mutex);
  EpollSet* set = sh.epoll_of(epfd);
  if (!set) {
    lock.unlock();
    return real().epoll_pwait(epfd, events, max, timeout_ms, mask);
  }
  uint64_t flagged;
  [[maybe_unused]] ssize_t r0 = real().read(set->pending.get(), &flagged, sizeof flagged);
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  auto spin_until = start + sh.poll_time;
  transport::Engine* engine = sh.running_engine();
  for (;;) {
    sh.progress();
    bool any_rxio = false;
    for (auto& [fd, interest] : set->interests) any_rxio |= !interest.in_kernel && !interest.disarmed;
    int n = collect(sh, *set, epfd, events, max);
    bool woke = false;
    if (n < max) {
      int got = real().epoll_wait(epfd, events + n, max - n, 0);
      if (got > 0) n = merge_kernel(events, n, take_kernel(sh, events + n, got, woke));
    }
    if (n > 0) return n;
    // Woken for nothing of this set's: sleep again below (arming drains what woke it),
    // never loop here with the lock held.
    if (timeout_ms == 0) return 0;
    int left = remaining(deadline, timeout_ms);
    if (left == 0) return 0;
    if (any_rxio && Clock::now() < spin_until) {
      lock.unlock();
      lock.lock();
      continue;
    }
    if (engine && !engine->arm()) {
      sh.service(false);
      continue;
    }
    // This thread's waker joins the set while it sleeps there.
    const int waker = Shim::my_waker();
    epoll_event wake{};
    wake.events = EPOLLIN;
    wake.data.u64 = kWakerMagic;
    real().epoll_ctl(epfd, EPOLL_CTL_ADD, waker, &wake);
    sh.sleeping.push_back(waker);
    lock.unlock();
    int got = real().epoll_pwait(epfd, events, max, left, mask);
    int saved = errno;
    lock.lock();
    std::erase(sh.sleeping, waker);
    real().epoll_ctl(epfd, EPOLL_CTL_DEL, waker, nullptr);
    uint64_t drained;
    [[maybe_unused]] ssize_t r = real().read(waker, &drained, sizeof drained);
    set = sh.epoll_of(epfd);
    if (got < 0) {
      errno = saved;
      return -1;
    }
    if (!set) return got;
    n = take_kernel(sh, events, got, woke);
    if (n > 0) return n;
  }
}

}  // namespace rxio::shim
