// The calls librxio-preload.so interposes: the socket calls, the calls that act on any
// fd (read, write, close, dup, fcntl, ioctl), readiness (poll, select, epoll), exec, and the
// fortified (_chk) and 64-bit-offset variants glibc routes programs to. Exported by
// the version script (preload.map) and nothing else.
//
// Every call first asks whether the fd is a socket the shim owns: one thread-local
// read and one table load. Everything else goes straight to the C library, as do the
// shim's own calls (the engine's sockets, the negotiation) while it is inside.
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <vector>

#include "shim/calls.h"
#include "shim/real.h"

#define RXIO_EXPORT extern "C" [[gnu::visibility("default")]]

using namespace rxio::shim;

// Declared here, not through <fcntl.h> (which renames fcntl to fcntl64 with 64-bit
// offsets) or the fortify headers (whose inline wrappers this file must not see).
extern "C" {
[[noreturn]] void __chk_fail(void);
int fcntl(int fd, int command, ...);
int fcntl64(int fd, int command, ...);
ssize_t sendfile64(int out, int in, off_t* offset, size_t count) noexcept;
ssize_t __read_chk(int fd, void* buffer, size_t length, size_t buffer_length);
ssize_t __recv_chk(int fd, void* buffer, size_t length, size_t buffer_length, int flags);
ssize_t __recvfrom_chk(int fd, void* buffer, size_t length, size_t buffer_length, int flags, sockaddr* from,
                       socklen_t* from_length);
int __poll_chk(pollfd* fds, nfds_t count, int timeout, size_t fds_length);
int __ppoll_chk(pollfd* fds, nfds_t count, const timespec* timeout, const sigset_t* mask, size_t fds_length);
}

namespace {

constexpr int kFcntlDupFd = 0;          // F_DUPFD
constexpr int kFcntlDupFdCloexec = 1030;  // F_DUPFD_CLOEXEC

// The shim's entry for `fd`, or null: the fast path for every fd it does not own.
inline Socket* owned(int fd) noexcept {
  if (t_inside) return nullptr;
  Shim* sh = Shim::current();
  return sh ? sh->socket_of(fd) : nullptr;
}

// Connected sockets (and those connecting): on TCP they take the fast path in stream.cc,
// which counts the call towards a move and keeps out of a switch under way.
inline bool moving(const Socket* s) noexcept {
  return s && s->mode != Socket::Mode::fresh && s->mode != Socket::Mode::listening;
}

inline bool any_owned() noexcept { return !t_inside && Shim::current(); }

int to_ms(const timespec* t) {
  if (!t) return -1;
  return static_cast<int>(t->tv_sec * 1000 + (t->tv_nsec + 999999) / 1000000);
}

ssize_t receive_into(int fd, void* buffer, size_t length, int flags) {
  iovec iov{buffer, length};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  return receive(fd, &msg, flags);
}

ssize_t transmit_from(int fd, const void* buffer, size_t length, int flags) {
  iovec iov{const_cast<void*>(buffer), length};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  return transmit(fd, &msg, flags);
}

}  // namespace

// ---- sockets -------------------------------------------------------------------------

RXIO_EXPORT int socket(int domain, int type, int protocol) noexcept {
  int fd = real().socket(domain, type, protocol);
  if (fd >= 0 && !t_inside && (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM &&
      (protocol == 0 || protocol == IPPROTO_TCP))
    created(fd);
  return fd;
}
RXIO_EXPORT int bind(int fd, const sockaddr* address, socklen_t length) noexcept {
  return real().bind(fd, address, length);
}
RXIO_EXPORT int listen(int fd, int backlog) noexcept {
  return owned(fd) ? listen_on(fd, backlog) : real().listen(fd, backlog);
}
RXIO_EXPORT int accept4(int fd, sockaddr* address, socklen_t* length, int flags) {
  Socket* s = owned(fd);
  return s && s->mode == Socket::Mode::listening ? accept_on(fd, address, length, flags)
                                                 : real().accept4(fd, address, length, flags);
}
RXIO_EXPORT int accept(int fd, sockaddr* address, socklen_t* length) { return accept4(fd, address, length, 0); }
RXIO_EXPORT int connect(int fd, const sockaddr* address, socklen_t length) {
  Socket* s = owned(fd);
  return s && s->mode == Socket::Mode::fresh ? connect_on(fd, address, length) : real().connect(fd, address, length);
}
RXIO_EXPORT int shutdown(int fd, int how) noexcept {
  return moving(owned(fd)) ? shutdown_on(fd, how) : real().shutdown(fd, how);
}
RXIO_EXPORT int getsockopt(int fd, int level, int name, void* value, socklen_t* length) noexcept {
  if (level == SOL_SOCKET && name == SO_ERROR && moving(owned(fd))) return socket_error(fd, value, length);
  return real().getsockopt(fd, level, name, value, length);
}
RXIO_EXPORT int setsockopt(int fd, int level, int name, const void* value, socklen_t length) noexcept {
  return real().setsockopt(fd, level, name, value, length);
}

// ---- moving bytes ----------------------------------------------------------------------

RXIO_EXPORT ssize_t read(int fd, void* buffer, size_t length) {
  return moving(owned(fd)) ? receive_into(fd, buffer, length, 0) : real().read(fd, buffer, length);
}
RXIO_EXPORT ssize_t readv(int fd, const iovec* iov, int count) {
  if (!moving(owned(fd))) return real().readv(fd, iov, count);
  msghdr msg{};
  msg.msg_iov = const_cast<iovec*>(iov);
  msg.msg_iovlen = static_cast<size_t>(count);
  return receive(fd, &msg, 0);
}
RXIO_EXPORT ssize_t write(int fd, const void* buffer, size_t length) {
  return moving(owned(fd)) ? transmit_from(fd, buffer, length, 0) : real().write(fd, buffer, length);
}
RXIO_EXPORT ssize_t writev(int fd, const iovec* iov, int count) {
  if (!moving(owned(fd))) return real().writev(fd, iov, count);
  msghdr msg{};
  msg.msg_iov = const_cast<iovec*>(iov);
  msg.msg_iovlen = static_cast<size_t>(count);
  return transmit(fd, &msg, 0);
}
RXIO_EXPORT ssize_t send(int fd, const void* buffer, size_t length, int flags) {
  return moving(owned(fd)) ? transmit_from(fd, buffer, length, flags) : real().send(fd, buffer, length, flags);
}
RXIO_EXPORT ssize_t sendto(int fd, const void* buffer, size_t length, int flags, const sockaddr* to, socklen_t to_length) {
  return moving(owned(fd)) ? transmit_from(fd, buffer, length, flags)
                           : real().sendto(fd, buffer, length, flags, to, to_length);
}
RXIO_EXPORT ssize_t sendmsg(int fd, const msghdr* message, int flags) {
  return moving(owned(fd)) ? transmit(fd, message, flags) : real().sendmsg(fd, message, flags);
}
RXIO_EXPORT ssize_t recv(int fd, void* buffer, size_t length, int flags) {
  return moving(owned(fd)) ? receive_into(fd, buffer, length, flags) : real().recv(fd, buffer, length, flags);
}
RXIO_EXPORT ssize_t recvfrom(int fd, void* buffer, size_t length, int flags, sockaddr* from, socklen_t* from_length) {
  if (!moving(owned(fd))) return real().recvfrom(fd, buffer, length, flags, from, from_length);
  iovec iov{buffer, length};
  msghdr msg{};
  msg.msg_name = from;
  msg.msg_namelen = from_length ? *from_length : 0;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  ssize_t n = receive(fd, &msg, flags);
  if (from_length && n >= 0) *from_length = msg.msg_namelen;
  return n;
}
RXIO_EXPORT ssize_t recvmsg(int fd, msghdr* message, int flags) {
  return moving(owned(fd)) ? receive(fd, message, flags) : real().recvmsg(fd, message, flags);
}
RXIO_EXPORT ssize_t sendfile(int out, int in, off_t* offset, size_t count) noexcept {
  return moving(owned(out)) ? send_file(out, in, offset, count) : real().sendfile(out, in, offset, count);
}
// off_t is 64 bits on the platforms rxio builds for: the two are the same call.
RXIO_EXPORT ssize_t sendfile64(int out, int in, off_t* offset, size_t count) noexcept {
  return sendfile(out, in, offset, count);
}

// Fortified programs call these instead; the size check is theirs, the call ours.
RXIO_EXPORT ssize_t __read_chk(int fd, void* buffer, size_t length, size_t buffer_length) {
  if (length > buffer_length) __chk_fail();
  return read(fd, buffer, length);
}
RXIO_EXPORT ssize_t __recv_chk(int fd, void* buffer, size_t length, size_t buffer_length, int flags) {
  if (length > buffer_length) __chk_fail();
  return recv(fd, buffer, length, flags);
}
RXIO_EXPORT ssize_t __recvfrom_chk(int fd, void* buffer, size_t length, size_t buffer_length, int flags,
                                   sockaddr* from, socklen_t* from_length) {
  if (length > buffer_length) __chk_fail();
  return recvfrom(fd, buffer, length, flags, from, from_length);
}

// ---- descriptors ---------------------------------------------------------------------

RXIO_EXPORT int close(int fd) {
  if (!any_owned()) return real().close(fd);
  return close_fd(fd);
}
RXIO_EXPORT int dup(int fd) noexcept {
  int result = real().dup(fd);
  return result >= 0 && any_owned() ? duplicate(fd, result) : result;
}
// A socket of the shim's that the target names is closed first: what it keeps (a
// moved connection's private descriptor) must be of it, not of the fd that replaces it.
RXIO_EXPORT int dup2(int fd, int target) noexcept {
  if (target != fd && owned(target)) replacing(target);
  int result = real().dup2(fd, target);
  return result >= 0 && any_owned() ? duplicate(fd, result) : result;
}
RXIO_EXPORT int dup3(int fd, int target, int flags) noexcept {
  if (target != fd && owned(target)) replacing(target);
  int result = real().dup3(fd, target, flags);
  return result >= 0 && any_owned() ? duplicate(fd, result) : result;
}

// The optional argument is an int or a pointer; both travel in one register.
RXIO_EXPORT int fcntl(int fd, int command, ...) {
  va_list args;
  va_start(args, command);
  void* argument = va_arg(args, void*);
  va_end(args);
  int result = real().fcntl(fd, command, argument);
  if (result >= 0 && (command == kFcntlDupFd || command == kFcntlDupFdCloexec) && owned(fd))
    return duplicate(fd, result);
  return result;
}
RXIO_EXPORT int fcntl64(int fd, int command, ...) {
  va_list args;
  va_start(args, command);
  void* argument = va_arg(args, void*);
  va_end(args);
  return fcntl(fd, command, argument);
}
RXIO_EXPORT int ioctl(int fd, unsigned long request, ...) noexcept {
  va_list args;
  va_start(args, request);
  void* argument = va_arg(args, void*);
  va_end(args);
  if (request == FIONREAD && moving(owned(fd))) return bytes_readable(fd, static_cast<int*>(argument));
  return real().ioctl(fd, request, argument);
}

// ---- readiness -----------------------------------------------------------------------

RXIO_EXPORT int poll(pollfd* fds, nfds_t count, int timeout) {
  return any_owned() ? poll_any(fds, count, timeout, nullptr) : real().poll(fds, count, timeout);
}
RXIO_EXPORT int ppoll(pollfd* fds, nfds_t count, const timespec* timeout, const sigset_t* mask) {
  return any_owned() ? poll_any(fds, count, to_ms(timeout), mask) : real().ppoll(fds, count, timeout, mask);
}
RXIO_EXPORT int __poll_chk(pollfd* fds, nfds_t count, int timeout, size_t fds_length) {
  if (fds_length / sizeof(pollfd) < count) __chk_fail();
  return poll(fds, count, timeout);
}
RXIO_EXPORT int __ppoll_chk(pollfd* fds, nfds_t count, const timespec* timeout, const sigset_t* mask,
                            size_t fds_length) {
  if (fds_length / sizeof(pollfd) < count) __chk_fail();
  return ppoll(fds, count, timeout, mask);
}

namespace {

bool selects_owned(int count, fd_set* r, fd_set* w, fd_set* e) {
  if (!any_owned()) return false;
  for (int fd = 0; fd < count; ++fd)
    if ((r && FD_ISSET(fd, r)) || (w && FD_ISSET(fd, w)) || (e && FD_ISSET(fd, e)))
      if (Socket* s = owned(fd); s && s->mode != Socket::Mode::fresh) return true;
  return false;
}

}  // namespace

RXIO_EXPORT int select(int count, fd_set* readable, fd_set* writable, fd_set* failed, timeval* timeout) {
  if (!selects_owned(count, readable, writable, failed))
    return real().select(count, readable, writable, failed, timeout);
  int ms = timeout ? static_cast<int>(timeout->tv_sec * 1000 + (timeout->tv_usec + 999) / 1000) : -1;
  int n = select_any(count, readable, writable, failed, ms, nullptr);
  // Linux says how much time was left; programs that loop on it expect that.
  if (timeout && n == 0) *timeout = timeval{0, 0};
  return n;
}
RXIO_EXPORT int pselect(int count, fd_set* readable, fd_set* writable, fd_set* failed, const timespec* timeout,
                        const sigset_t* mask) {
  if (!selects_owned(count, readable, writable, failed))
    return real().pselect(count, readable, writable, failed, timeout, mask);
  return select_any(count, readable, writable, failed, to_ms(timeout), mask);
}
RXIO_EXPORT int epoll_create(int size) noexcept { return real().epoll_create(size); }
RXIO_EXPORT int epoll_create1(int flags) noexcept { return real().epoll_create1(flags); }
RXIO_EXPORT int epoll_ctl(int epfd, int operation, int fd, epoll_event* event) noexcept {
  return owned(fd) ? epoll_control(epfd, operation, fd, event) : real().epoll_ctl(epfd, operation, fd, event);
}
RXIO_EXPORT int epoll_wait(int epfd, epoll_event* events, int count, int timeout) {
  return any_owned() ? epoll_wait_any(epfd, events, count, timeout, nullptr)
                     : real().epoll_wait(epfd, events, count, timeout);
}
RXIO_EXPORT int epoll_pwait(int epfd, epoll_event* events, int count, int timeout, const sigset_t* mask) {
  return any_owned() ? epoll_wait_any(epfd, events, count, timeout, mask)
                     : real().epoll_pwait(epfd, events, count, timeout, mask);
}

// exec: the moved sockets the new image inherits go back to TCP first, and bytes read
// ahead of the program go along in the environment. glibc's exec functions call execve
// inside the library, past any interposer, so each is caught.
RXIO_EXPORT int execve(const char* path, char* const argv[], char* const envp[]) noexcept {
  if (!any_owned()) return real().execve(path, argv, envp);
  ExecEnvironment env(envp, image_honours_preload(path, false));
  exec_prepare(env);
  return real().execve(path, argv, env.envp());
}
RXIO_EXPORT int execv(const char* path, char* const argv[]) noexcept { return execve(path, argv, environ); }
RXIO_EXPORT int execvpe(const char* file, char* const argv[], char* const envp[]) noexcept {
  if (!any_owned()) return real().execvpe(file, argv, envp);
  ExecEnvironment env(envp, image_honours_preload(file, true));
  exec_prepare(env);
  return real().execvpe(file, argv, env.envp());
}
RXIO_EXPORT int execvp(const char* file, char* const argv[]) noexcept { return execvpe(file, argv, environ); }
RXIO_EXPORT int fexecve(int fd, char* const argv[], char* const envp[]) noexcept {
  if (!any_owned()) return real().fexecve(fd, argv, envp);
  ExecEnvironment env(envp, image_honours_preload(fd));
  exec_prepare(env);
  return real().fexecve(fd, argv, env.envp());
}

namespace {

// The list form's arguments (after `first`, up to the null), as an argument vector;
// `envp` gets what follows the null when asked for (execle).
std::vector<char*> arguments(const char* first, va_list list, char* const** envp) {
  std::vector<char*> argv{const_cast<char*>(first)};
  while (char* arg = va_arg(list, char*)) argv.push_back(arg);
  argv.push_back(nullptr);
  if (envp) *envp = va_arg(list, char* const*);
  return argv;
}

}  // namespace

RXIO_EXPORT int execl(const char* path, const char* arg, ...) noexcept {
  va_list list;
  va_start(list, arg);
  std::vector<char*> argv = arguments(arg, list, nullptr);
  va_end(list);
  return execv(path, argv.data());
}
RXIO_EXPORT int execlp(const char* file, const char* arg, ...) noexcept {
  va_list list;
  va_start(list, arg);
  std::vector<char*> argv = arguments(arg, list, nullptr);
  va_end(list);
  return execvp(file, argv.data());
}
RXIO_EXPORT int execle(const char* path, const char* arg, ...) noexcept {
  va_list list;
  va_start(list, arg);
  char* const* envp = nullptr;
  std::vector<char*> argv = arguments(arg, list, &envp);
  va_end(list);
  return execve(path, argv.data(), envp);
}
