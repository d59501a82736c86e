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
#include <cerrno>
#include <chrono>

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

// Waits, without the mutex, for the socket's state to move; false when `deadline`
// passed first.
bool wait_for_change(Shim& sh, std::unique_lock<ShimMutex>& lock, Clock::time_point deadline, bool forever,
                     Clock::time_point spin_until) noexcept {
  if (Clock::now() < spin_until) {
    sh.progress();
    lock.unlock();
    lock.lock();
    return true;
  }
  int left = -1;
  if (!forever) {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (ms <= 0) return false;
    left = static_cast<int>(ms);
  }
  pollfd spare[2];
  sh.sleep(lock, spare, 0, left, nullptr);
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

}  // namespace

ssize_t receive(int fd, msghdr* msg, int flags) noexcept {
  const iovec* iov = msg->msg_iov;
  const int count = static_cast<int>(msg->msg_iovlen);
  Shim& sh = Shim::get();
  Inside inside;
  std::unique_lock lock(sh.mutex);
  Blocking how(fd, flags, SO_RCVTIMEO);
  auto spin_until = Clock::now() + sh.poll_time;
  const std::size_t wanted = total_of(iov, count);
  if (wanted == 0) return 0;
  std::size_t got = 0;
  for (;;) {
    Socket* s = sh.socket_of(fd);
    if (!s) {
      lock.unlock();
      // Decided for TCP meanwhile: the kernel has the rest.
      if (got) return static_cast<ssize_t>(got);
      return real().recvmsg(fd, msg, flags);
    }
    if (s->mode != Socket::Mode::rxio) {
      if (s->mode == Socket::Mode::pending) {
        // Bytes on the TCP socket mean the peer writes TCP: it has no shim, or gave up.
        // Looked at first, so that a plain client costs one poll more than TCP here.
        pollfd p{fd, POLLIN, 0};
        if (real().poll(&p, 1, 0) == 1) sh.decide_plain_as_server(fd, *s, Fallback::no_peer_shim);
      }
      s = sh.socket_of(fd);
      if (s) sh.service();
      s = sh.socket_of(fd);
      if (s && s->mode == Socket::Mode::connecting) sh.finish_connect(fd, *s, lock);
      s = sh.socket_of(fd);
      if (!s || s->mode == Socket::Mode::rxio) continue;
      if (s->mode == Socket::Mode::fresh || s->mode == Socket::Mode::listening ||
          s->mode == Socket::Mode::connecting) {
        lock.unlock();
        return real().recvmsg(fd, msg, flags);
      }
      // pending or committed: wait for the decision (or for TCP bytes).
      if (how.dontwait()) {
        errno = EAGAIN;
        return -1;
      }
      pollfd p[3] = {{fd, POLLIN, 0}, {}, {}};
      if (!wait_holding(sh, s, [&] { sh.sleep(lock, p, 1, 10, nullptr); })) return -1;
      continue;
    }
    transport::Connection& c = *s->connection;
    // A stream has no addresses or ancillary data to give back.
    msg->msg_namelen = 0;
    msg->msg_controllen = 0;
    msg->msg_flags = 0;
    if (s->read_shut) return static_cast<ssize_t>(got);
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
      if (n < part.size()) break;
    }
    if (s->record && got) s->record->bytes_received.fetch_add(got, std::memory_order_relaxed);
    bool all = got == wanted || !(flags & MSG_WAITALL) || how.dontwait();
    if (got > 0 && (all || (flags & MSG_PEEK))) return static_cast<ssize_t>(got);
    if (c.stream_closed()) return static_cast<ssize_t>(got);
    if (c.failed()) return done_or(got, ECONNRESET);
    if (sh.progress() > 0) {
      spin_until = Clock::now() + sh.poll_time;
      continue;
    }
    if (how.dontwait()) return done_or(got, EAGAIN);
    bool more = false;
    if (!wait_holding(sh, s, [&] { more = wait_for_change(sh, lock, how.deadline(), how.forever(), spin_until); }))
      return -1;
    if (!more) return done_or(got, EAGAIN);
  }
}

ssize_t transmit(int fd, const msghdr* msg, int flags) noexcept {
  const iovec* iov = msg->msg_iov;
  const int count = static_cast<int>(msg->msg_iovlen);
  Shim& sh = Shim::get();
  Inside inside;
  std::unique_lock lock(sh.mutex);
  Blocking how(fd, flags, SO_SNDTIMEO);
  auto spin_until = Clock::now() + sh.poll_time;
  const std::size_t wanted = total_of(iov, count);
  std::size_t sent = 0;
  for (;;) {
    Socket* s = sh.socket_of(fd);
    if (s && s->mode != Socket::Mode::rxio) {
      sh.service();
      s = sh.socket_of(fd);
      if (s && s->mode == Socket::Mode::connecting) sh.finish_connect(fd, *s, lock);
      s = sh.socket_of(fd);
      // The program speaks first: TCP, unless a negotiation already came for it.
      if (s && s->mode == Socket::Mode::pending) sh.decide_plain_as_server(fd, *s, Fallback::wrote_first);
      s = sh.socket_of(fd);
      if (s && s->mode == Socket::Mode::committed) {
        pollfd p[2];
        if (!wait_holding(sh, s, [&] { sh.sleep(lock, p, 0, 10, nullptr); })) return -1;
        continue;
      }
    }
    if (!s || s->mode != Socket::Mode::rxio) {
      lock.unlock();
      if (sent) return static_cast<ssize_t>(sent);
      return real().sendmsg(fd, msg, flags);
    }
    transport::Connection& c = *s->connection;
    if (s->write_shut || c.failed()) {
      if (sent) return static_cast<ssize_t>(sent);
      int err = s->write_shut ? EPIPE : ECONNRESET;
      if (err == EPIPE && !(flags & MSG_NOSIGNAL)) raise(SIGPIPE);
      errno = err;
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
      sent += n;
      if (n < part.size()) break;
    }
    if (s->record && sent > before) s->record->bytes_sent.fetch_add(sent - before, std::memory_order_relaxed);
    if (sent == wanted) return static_cast<ssize_t>(sent);
    sh.out_of_credit(fd, *s);
    if (sent > before) spin_until = Clock::now() + sh.poll_time;
    if (sh.progress() > 0) continue;
    if (how.dontwait()) return done_or(sent, EAGAIN);
    bool more = false;
    if (!wait_holding(sh, s, [&] { more = wait_for_change(sh, lock, how.deadline(), how.forever(), spin_until); }))
      return -1;
    if (!more) return done_or(sent, EAGAIN);
  }
}

ssize_t send_file(int out, int in, off_t* offset, std::size_t count) noexcept {
  // The file's bytes go through a buffer onto the stream, as rsocket does; a
  // thread's buffer is made once.
  static thread_local std::array<std::byte, 64 * 1024> buffer;
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
