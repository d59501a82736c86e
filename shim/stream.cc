// The shim's data path: the socket calls on a connection that moved to rxio, mapped
// onto its transport stream with the kernel's semantics (blocking and non-blocking,
// MSG_PEEK, MSG_DONTWAIT, MSG_WAITALL, SO_RCVTIMEO/SO_SNDTIMEO, shutdown). Small
// transfers take no system call when the bytes or the credit are there.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <vector>

#include "base/log.h"
#include "shim/calls.h"
#include "shim/real.h"

namespace rxio::shim {
namespace {

using Clock = std::chrono::steady_clock;

bool nonblocking(int fd, int flags) noexcept {
  if (flags & MSG_DONTWAIT) return true;
  int fl = real().fcntl(fd, F_GETFL);
  return fl >= 0 && (fl & O_NONBLOCK);
}

// SO_RCVTIMEO or SO_SNDTIMEO as the kernel keeps it (setsockopt goes through to it);
// -1 for none.
int timeout_ms(int fd, int option) noexcept {
  timeval tv{};
  socklen_t length = sizeof tv;
  if (real().getsockopt(fd, SOL_SOCKET, option, &tv, &length) != 0) return -1;
  if (tv.tv_sec == 0 && tv.tv_usec == 0) return -1;
  return static_cast<int>(tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000);
}

std::size_t total_of(const iovec* iov, int count) noexcept {
  std::size_t total = 0;
  for (int i = 0; i < count; ++i) total += iov[i].iov_len;
  return total;
}

// How a call may wait: read from the socket only once it has to (each is a system
// call), so that a call that finds bytes or credit makes none.
class Blocking {
 public:
  Blocking(int fd, int flags, int option) noexcept : fd_(fd), flags_(flags), option_(option) {}
  bool dontwait() noexcept { return resolve().dontwait_; }
  bool forever() noexcept { return resolve().limit_ < 0; }
  Clock::time_point deadline() noexcept { return resolve().deadline_; }

 private:
  Blocking& resolve() noexcept {
    if (!resolved_) {
      resolved_ = true;
      dontwait_ = nonblocking(fd_, flags_);
      limit_ = dontwait_ ? 0 : timeout_ms(fd_, option_);
      deadline_ = Clock::now() + std::chrono::milliseconds(limit_ < 0 ? 0 : limit_);
    }
    return *this;
  }
  int fd_, flags_, option_;
  bool resolved_ = false;
  bool dontwait_ = false;
  int limit_ = -1;
  Clock::time_point deadline_{};
};

// Waits, without the mutex, for the socket's state to move. Returns 0 to look again,
// or the errno to stop with: EAGAIN when `deadline` passed, EINTR when a signal came
// and the kernel's blocking call would not have been restarted.
int wait_for_change(Shim& sh, std::unique_lock<ShimMutex>& lock, Clock::time_point deadline, bool forever,
                    Clock::time_point spin_until) noexcept {
  if (Clock::now() < spin_until) {
    sh.progress();
    lock.unlock();
    lock.lock();
    return 0;
  }
  int left = -1;
  if (!forever) {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (ms <= 0) return EAGAIN;
    left = static_cast<int>(ms);
  }
  pollfd spare[2];
  return sh.sleep(lock, spare, 0, left, nullptr) < 0 && errno == EINTR && !(forever && Shim::signals_restart())
             ? EINTR
             : 0;
}

// A forked child's call on a socket its parent was moving, or sending back to TCP, at
// the fork: neither side can tell where the other's bytes stand, so the child cannot
// read or write it. (One its parent had moved waits for the parent's hand-over.)
bool parents_connection(const Socket& s) noexcept {
  if (!s.inherited) return false;
  static std::atomic<bool> said{false};
  if (!said.exchange(true))
    log::warn("shim: a forked child cannot use a socket its parent was switching at the fork; its calls on it "
              "fail with ECONNRESET (the parent's connection goes on)");
  return true;
}

// What a call returns once it stops early: the bytes it moved, or -1 with `error`.
ssize_t done_or(std::size_t bytes, int error) noexcept {
  if (bytes) return static_cast<ssize_t>(bytes);
  errno = error;
  return -1;
}

// Runs `wait` (which lets go of the mutex) with `s` kept alive. False when the program
// closed the socket meanwhile (the call fails with EBADF, as the kernel's would); a
// socket that fell back to TCP meanwhile goes on there.
template <typename Wait>
bool wait_holding(Shim& sh, Socket* s, Wait&& wait) noexcept {
  ++s->holds;
  wait();
  bool closed = s->gone && s->closed;
  sh.release(s);
  if (closed) errno = EBADF;
  return !closed;
}

// Copies what s.ahead holds into `iov` past `skip`; a peek leaves it there.
std::size_t from_ahead(Socket& s, const iovec* iov, int count, std::size_t skip, bool peek) noexcept {
  std::size_t at = s.ahead_read, copied = 0;
  for (int i = 0; i < count && at < s.ahead.size(); ++i) {
    if (skip >= iov[i].iov_len) {
      skip -= iov[i].iov_len;
      continue;
    }
    std::size_t n = std::min(iov[i].iov_len - skip, s.ahead.size() - at);
    std::memcpy(static_cast<std::byte*>(iov[i].iov_base) + skip, s.ahead.data() + at, n);
    skip = 0;
    at += n;
    copied += n;
  }
  if (!peek) {
    s.ahead_read = at;
    s.ahead_left = s.ahead.size() - at;
  }
  return copied;
}

// `message` with its buffers' first `skip` bytes left out, for a kernel call that goes
// on where an earlier one stopped.
msghdr rest_of(const msghdr& message, std::size_t skip, std::vector<iovec>& storage) noexcept {
  msghdr rest = message;
  if (skip == 0) return rest;
  storage.clear();
  for (std::size_t i = 0; i < message.msg_iovlen; ++i) {
    const iovec& v = message.msg_iov[i];
    if (skip >= v.iov_len) {
      skip -= v.iov_len;
      continue;
    }
    storage.push_back(iovec{static_cast<std::byte*>(v.iov_base) + skip, v.iov_len - skip});
    skip = 0;
  }
  rest.msg_iov = storage.data();
  rest.msg_iovlen = storage.size();
  return rest;
}

// The TCP fast path: one kernel call without the mutex, for a socket on TCP that has
// nothing read ahead. Empty when the call must take the slow path instead.
template <typename Call>
std::optional<ssize_t> on_tcp(Shim& sh, int fd, Call&& call) noexcept {
  Socket* s = sh.socket_of(fd);
  if (!s || s->mode.load() != Socket::Mode::tcp || due_to_move(sh, *s)) return std::nullopt;
  // Counted before the second look: a switch sets its mode first, then waits for the
  // count to drop (docs/shim.md).
  s->kernel_calls.fetch_add(1);
  std::optional<ssize_t> result;
  if (sh.socket_of(fd) == s && s->mode.load() == Socket::Mode::tcp && !s->has_ahead()) result = call();
  s->kernel_calls.fetch_sub(1);
  return result;
}

bool would_block() noexcept { return errno == EAGAIN || errno == EWOULDBLOCK; }

// For a socket on TCP whose kernel call would block: sleeps, without the mutex, until
// the socket is ready for `events` or the shim's wait set wakes (a switch the peer
// starts meanwhile is served there, and the call then goes on wherever the bytes now
// go). Returns 0 to look again, the errno to stop with, or -1 when the program closed
// the socket meanwhile (errno set).
int wait_on_kernel(Shim& sh, std::unique_lock<ShimMutex>& lock, Socket* s, int fd, short events,
                   Blocking& how) noexcept {
  if (how.dontwait()) return EAGAIN;
  int left = -1;
  if (!how.forever()) {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(how.deadline() - Clock::now()).count();
    if (ms <= 0) return EAGAIN;
    left = static_cast<int>(ms);
  }
  pollfd p[3] = {{fd, events, 0}, {}, {}};
  int slept = 0;
  if (!wait_holding(sh, s, [&] { slept = sh.sleep(lock, p, 1, left, nullptr); })) return -1;
  return slept < 0 && errno == EINTR && !(how.forever() && Shim::signals_restart()) ? EINTR : 0;
}

}  // namespace

ssize_t receive(int fd, msghdr* msg, int flags) noexcept {
  const iovec* iov = msg->msg_iov;
  const int count = static_cast<int>(msg->msg_iovlen);
  Shim& sh = Shim::get();
  const std::size_t wanted = total_of(iov, count);
  if (wanted == 0) return 0;
  std::size_t got = 0;
  // Whether the kernel just said it has nothing: the slow path need not ask again.
  bool kernel_empty = false;
  if (auto n = on_tcp(sh, fd, [&] { return real().recvmsg(fd, msg, flags | MSG_DONTWAIT); })) {
    if (*n < 0 && !would_block()) return *n;
    if (*n == 0 || (*n > 0 && (!(flags & MSG_WAITALL) || std::size_t(*n) == wanted))) return *n;
    if (*n > 0) got = std::size_t(*n);
    kernel_empty = true;
  }
  Inside inside;
  std::unique_lock lock(sh.mutex);
  Blocking how(fd, flags, SO_RCVTIMEO);
  auto spin_until = Clock::now() + sh.poll_time;
  std::vector<iovec> storage;
  // The kernel's part, after what came from elsewhere; what it says of addresses and
  // flags goes back to the caller.
  auto kernel_receive = [&](int with) {
    if (got == 0) return real().recvmsg(fd, msg, with);
    msghdr rest = rest_of(*msg, got, storage);
    ssize_t n = real().recvmsg(fd, &rest, with);
    msg->msg_namelen = rest.msg_namelen;
    msg->msg_controllen = rest.msg_controllen;
    msg->msg_flags = rest.msg_flags;
    return n;
  };
  for (;;) {
    Socket* s = sh.socket_of(fd);
    if (!s) {
      lock.unlock();
      // Left the shim meanwhile: the kernel has the rest.
      if (got && (!(flags & MSG_WAITALL) || how.dontwait())) return static_cast<ssize_t>(got);
      ssize_t n = kernel_receive(flags);
      return n < 0 ? done_or(got, errno) : static_cast<ssize_t>(got + std::size_t(n));
    }
    if (parents_connection(*s)) return done_or(got, ECONNRESET);
    if (s->has_ahead()) {
      got += from_ahead(*s, iov, count, got, flags & MSG_PEEK);
      if (got == wanted || !(flags & MSG_WAITALL) || (flags & MSG_PEEK)) return static_cast<ssize_t>(got);
    }
    switch (s->mode.load()) {
      case Socket::Mode::fresh:
      case Socket::Mode::listening: {
        lock.unlock();
        return real().recvmsg(fd, msg, flags);
      }
      case Socket::Mode::connecting: {
        sh.finish_connect(fd, *s);
        if (s->mode == Socket::Mode::connecting) {
          lock.unlock();
          return real().recvmsg(fd, msg, flags);
        }
        continue;
      }
      case Socket::Mode::moving: {
        if (!wait_holding(sh, s, [&] { pollfd p[2]; sh.sleep(lock, p, 0, 10, nullptr); })) return -1;
        continue;
      }
      case Socket::Mode::returning:
        sh.go_on_returning(fd, *s);
        if (s->broken) return done_or(got, ECONNRESET);
        if (s->mode == Socket::Mode::returning && !s->back.in_done) {
          // The peer's Resume, or the bytes it sends again that the program has, are
          // still on their way; this side's kept bytes may wait for room meanwhile.
          int stop = wait_on_kernel(sh, lock, s, fd, short(POLLIN | (s->back.out_done ? 0 : POLLOUT)), how);
          if (stop < 0) return -1;
          if (stop) return done_or(got, stop);
          continue;
        }
        [[fallthrough]];  // what follows in the kernel is the program's
      case Socket::Mode::tcp: {
        if (!s->server && !s->tried && s->calls >= move_threshold(sh, *s)) {
          sh.move_as_client(fd, *s, lock);
          continue;
        }
        if (!kernel_empty) {
          ssize_t n = kernel_receive(flags | MSG_DONTWAIT);
          if (n == 0) return static_cast<ssize_t>(got);
          if (n < 0 && !would_block()) return done_or(got, errno);
          if (n > 0) {
            got += std::size_t(n);
            if (got == wanted || !(flags & MSG_WAITALL) || (flags & MSG_PEEK)) return static_cast<ssize_t>(got);
          }
        }
        kernel_empty = false;
        int stop = wait_on_kernel(sh, lock, s, fd, POLLIN, how);
        if (stop < 0) return -1;
        if (stop) return done_or(got, stop);
        continue;
      }
      case Socket::Mode::rxio:
        break;
    }
    transport::Connection& c = *s->connection;
    // A stream has no addresses or ancillary data to give back.
    msg->msg_namelen = 0;
    msg->msg_controllen = 0;
    msg->msg_flags = 0;
    if (s->read_shut) return static_cast<ssize_t>(got);
    const std::size_t before = got;
    for (int i = 0; i < count && got < wanted; ++i) {
      std::size_t skip = got;  // MSG_WAITALL resumes where it left off
      for (int j = 0; j < i; ++j) skip -= std::min(skip, iov[j].iov_len);
      if (skip >= iov[i].iov_len) continue;
      std::span<std::byte> part(static_cast<std::byte*>(iov[i].iov_base) + skip, iov[i].iov_len - skip);
      if (flags & MSG_PEEK) {
        got += c.stream_peek(part);  // copies from the stream's start, into the first buffer
        break;
      }
      std::size_t n = c.stream_read(part);
      got += n;
      s->rxio_read += n;
      if (n < part.size()) break;
    }
    if (s->record && got > before) s->record->bytes_received.fetch_add(got - before, std::memory_order_relaxed);
    bool all = got == wanted || !(flags & MSG_WAITALL) || how.dontwait();
    if (got > 0 && (all || (flags & MSG_PEEK))) return static_cast<ssize_t>(got);
    if (c.stream_closed()) {
      // A peer that handed its socket over to another process ends its connection
      // only once its hand-over is here: the stream goes on over TCP.
      if (sh.notice_resume(fd, *s)) continue;
      return static_cast<ssize_t>(got);
    }
    if (c.failed()) {
      // The rest comes over TCP (back.cc).
      sh.start_return(fd, *s, Return::link_failed);
      continue;
    }
    // Progress may also have sent the socket back to TCP (a failed link).
    if (sh.progress() > 0 || s->mode != Socket::Mode::rxio) {
      spin_until = Clock::now() + sh.poll_time;
      continue;
    }
    if (how.dontwait()) return done_or(got, EAGAIN);
    int stop = 0;
    if (!wait_holding(sh, s, [&] { stop = wait_for_change(sh, lock, how.deadline(), how.forever(), spin_until); }))
      return -1;
    if (stop) return done_or(got, stop);
  }
}

ssize_t transmit(int fd, const msghdr* msg, int flags) noexcept {
  const iovec* iov = msg->msg_iov;
  const int count = static_cast<int>(msg->msg_iovlen);
  Shim& sh = Shim::get();
  const std::size_t wanted = total_of(iov, count);
  std::size_t sent = 0;
  bool kernel_full = false;
  if (auto n = on_tcp(sh, fd, [&] { return real().sendmsg(fd, msg, flags | MSG_DONTWAIT); })) {
    if (*n < 0 && !would_block()) return *n;
    if (*n >= 0 && std::size_t(*n) == wanted) return *n;
    if (*n > 0) sent = std::size_t(*n);
    kernel_full = true;
  }
  Inside inside;
  std::unique_lock lock(sh.mutex);
  Blocking how(fd, flags, SO_SNDTIMEO);
  auto spin_until = Clock::now() + sh.poll_time;
  std::vector<iovec> storage;
  for (;;) {
    Socket* s = sh.socket_of(fd);
    if (s && parents_connection(*s)) return done_or(sent, ECONNRESET);
    const Socket::Mode mode = s ? s->mode.load() : Socket::Mode::fresh;
    if (!s || mode == Socket::Mode::fresh || mode == Socket::Mode::listening) {
      lock.unlock();
      msghdr rest = rest_of(*msg, sent, storage);
      ssize_t n = real().sendmsg(fd, &rest, flags);
      return n < 0 ? done_or(sent, errno) : static_cast<ssize_t>(sent + std::size_t(n));
    }
    if (mode == Socket::Mode::connecting) {
      sh.finish_connect(fd, *s);
      if (s->mode == Socket::Mode::connecting) {
        lock.unlock();
        return real().sendmsg(fd, msg, flags);
      }
      continue;
    }
    if (mode == Socket::Mode::moving) {
      if (!wait_holding(sh, s, [&] { pollfd p[2]; sh.sleep(lock, p, 0, 10, nullptr); })) return -1;
      continue;
    }
    if (mode == Socket::Mode::returning) {
      sh.go_on_returning(fd, *s);
      if (s->broken) return done_or(sent, ECONNRESET);
      if (s->mode == Socket::Mode::returning && (!s->back.out_done || (s->back.role == Returning::Role::adopted && !s->back.in_done))) {
        // The kept bytes go first; a forked child's bytes, after its parent's
        // hand-over, which the peer's answer shows is out.
        int stop = wait_on_kernel(sh, lock, s, fd, s->back.out_done ? POLLIN : POLLOUT, how);
        if (stop < 0) return -1;
        if (stop) return done_or(sent, stop);
        continue;
      }
    }
    if (mode == Socket::Mode::tcp || mode == Socket::Mode::returning) {
      if (!s->server && !s->tried && s->calls >= move_threshold(sh, *s)) {
        sh.move_as_client(fd, *s, lock);
        continue;
      }
      if (!kernel_full) {
        msghdr rest = rest_of(*msg, sent, storage);
        ssize_t n = real().sendmsg(fd, &rest, flags | MSG_DONTWAIT);
        if (n < 0 && !would_block()) return done_or(sent, errno);
        if (n > 0) sent += std::size_t(n);
        if (sent == wanted) return static_cast<ssize_t>(sent);
      }
      kernel_full = false;
      int stop = wait_on_kernel(sh, lock, s, fd, POLLOUT, how);
      if (stop < 0) return -1;
      if (stop) return done_or(sent, stop);
      continue;
    }
    transport::Connection& c = *s->connection;
    if (c.failed()) {
      // What the peer did not read goes again over TCP (back.cc), then the rest.
      sh.start_return(fd, *s, Return::link_failed);
      continue;
    }
    if (s->write_shut) {
      if (sent) return static_cast<ssize_t>(sent);
      if (!(flags & MSG_NOSIGNAL)) raise(SIGPIPE);
      errno = EPIPE;
      return -1;
    }
    std::size_t before = sent;
    std::size_t skip = sent;
    for (int i = 0; i < count; ++i) {
      if (skip >= iov[i].iov_len) {
        skip -= iov[i].iov_len;
        continue;
      }
      std::span<const std::byte> part(static_cast<const std::byte*>(iov[i].iov_base) + skip, iov[i].iov_len - skip);
      skip = 0;
      std::size_t n = c.stream_write(part);
      s->kept.keep(part.data(), n, s->rxio_written);
      s->rxio_written += n;
      sent += n;
      if (n < part.size()) break;
    }
    if (s->record && sent > before) s->record->bytes_sent.fetch_add(sent - before, std::memory_order_relaxed);
    if (sent == wanted) return static_cast<ssize_t>(sent);
    sh.out_of_credit(fd, *s);
    if (sent > before) spin_until = Clock::now() + sh.poll_time;
    if (sh.progress() > 0 || s->mode != Socket::Mode::rxio) continue;
    if (how.dontwait()) return done_or(sent, EAGAIN);
    int stop = 0;
    if (!wait_holding(sh, s, [&] { stop = wait_for_change(sh, lock, how.deadline(), how.forever(), spin_until); }))
      return -1;
    if (stop) return done_or(sent, stop);
  }
}

ssize_t send_file(int out, int in, off_t* offset, std::size_t count) noexcept {
  // The file's bytes go through a buffer onto the stream, as rsocket does; a
  // thread's buffer is made once.
  static thread_local std::array<std::byte, 64 * 1024> buffer;
  // On TCP the kernel copies it, as it would without the shim.
  if (auto n = on_tcp(Shim::get(), out, [&] { return real().sendfile(out, in, offset, count); }))
    if (*n >= 0 || !would_block()) return *n;
  std::size_t done = 0;
  while (done < count) {
    std::size_t want = std::min(buffer.size(), count - done);
    ssize_t n = offset ? ::pread(in, buffer.data(), want, *offset) : real().read(in, buffer.data(), want);
    if (n <= 0) {
      if (done) break;
      return n;
    }
    iovec iov{buffer.data(), static_cast<std::size_t>(n)};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    ssize_t sent = transmit(out, &msg, 0);
    if (sent <= 0) {
      if (!offset && sent < 0 && done == 0) return sent;
      break;
    }
    done += static_cast<std::size_t>(sent);
    if (offset) *offset += sent;
    // Bytes read from a pipe or socket but not sent are lost to TCP too; from a file,
    // the offset says where to go on.
    if (sent < n) break;
  }
  return static_cast<ssize_t>(done);
}

}  // namespace rxio::shim
