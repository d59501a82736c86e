// The calls librxio-preload.so interposes: the socket calls, the calls that act on any
// fd (read, write, close, dup, fcntl, ioctl), readiness (poll, select, epoll), and the
// fortified (_chk) and 64-bit-offset variants glibc routes programs to. Exported by
// the version script (preload.map) and nothing else.
//
// This layer passes every call to the C library: no socket is moved yet, and an fd
// the shim does not own must cost nothing measurable.
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

#include "shim/real.h"

#define RXIO_EXPORT extern "C" [[gnu::visibility("default")]]

using rxio::shim::real;

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

// ---- sockets -------------------------------------------------------------------------

RXIO_EXPORT int socket(int domain, int type, int protocol) noexcept { return real().socket(domain, type, protocol); }
RXIO_EXPORT int bind(int fd, const sockaddr* address, socklen_t length) noexcept {
  return real().bind(fd, address, length);
}
RXIO_EXPORT int listen(int fd, int backlog) noexcept { return real().listen(fd, backlog); }
RXIO_EXPORT int accept(int fd, sockaddr* address, socklen_t* length) { return real().accept(fd, address, length); }
RXIO_EXPORT int accept4(int fd, sockaddr* address, socklen_t* length, int flags) {
  return real().accept4(fd, address, length, flags);
}
RXIO_EXPORT int connect(int fd, const sockaddr* address, socklen_t length) { return real().connect(fd, address, length); }
RXIO_EXPORT int shutdown(int fd, int how) noexcept { return real().shutdown(fd, how); }
RXIO_EXPORT int getsockopt(int fd, int level, int name, void* value, socklen_t* length) noexcept {
  return real().getsockopt(fd, level, name, value, length);
}
RXIO_EXPORT int setsockopt(int fd, int level, int name, const void* value, socklen_t length) noexcept {
  return real().setsockopt(fd, level, name, value, length);
}

// ---- moving bytes ----------------------------------------------------------------------

RXIO_EXPORT ssize_t read(int fd, void* buffer, size_t length) { return real().read(fd, buffer, length); }
RXIO_EXPORT ssize_t readv(int fd, const iovec* iov, int count) { return real().readv(fd, iov, count); }
RXIO_EXPORT ssize_t write(int fd, const void* buffer, size_t length) { return real().write(fd, buffer, length); }
RXIO_EXPORT ssize_t writev(int fd, const iovec* iov, int count) { return real().writev(fd, iov, count); }
RXIO_EXPORT ssize_t send(int fd, const void* buffer, size_t length, int flags) {
  return real().send(fd, buffer, length, flags);
}
RXIO_EXPORT ssize_t sendto(int fd, const void* buffer, size_t length, int flags, const sockaddr* to, socklen_t to_length) {
  return real().sendto(fd, buffer, length, flags, to, to_length);
}
RXIO_EXPORT ssize_t sendmsg(int fd, const msghdr* message, int flags) { return real().sendmsg(fd, message, flags); }
RXIO_EXPORT ssize_t recv(int fd, void* buffer, size_t length, int flags) {
  return real().recv(fd, buffer, length, flags);
}
RXIO_EXPORT ssize_t recvfrom(int fd, void* buffer, size_t length, int flags, sockaddr* from, socklen_t* from_length) {
  return real().recvfrom(fd, buffer, length, flags, from, from_length);
}
RXIO_EXPORT ssize_t recvmsg(int fd, msghdr* message, int flags) { return real().recvmsg(fd, message, flags); }
RXIO_EXPORT ssize_t sendfile(int out, int in, off_t* offset, size_t count) noexcept {
  return real().sendfile(out, in, offset, count);
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

RXIO_EXPORT int close(int fd) { return real().close(fd); }
RXIO_EXPORT int dup(int fd) noexcept { return real().dup(fd); }
RXIO_EXPORT int dup2(int fd, int target) noexcept { return real().dup2(fd, target); }
RXIO_EXPORT int dup3(int fd, int target, int flags) noexcept { return real().dup3(fd, target, flags); }

// The optional argument is an int or a pointer; both travel in one register.
RXIO_EXPORT int fcntl(int fd, int command, ...) {
  va_list args;
  va_start(args, command);
  void* argument = va_arg(args, void*);
  va_end(args);
  return real().fcntl(fd, command, argument);
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
  return real().ioctl(fd, request, argument);
}

// ---- readiness -----------------------------------------------------------------------

RXIO_EXPORT int poll(pollfd* fds, nfds_t count, int timeout) { return real().poll(fds, count, timeout); }
RXIO_EXPORT int ppoll(pollfd* fds, nfds_t count, const timespec* timeout, const sigset_t* mask) {
  return real().ppoll(fds, count, timeout, mask);
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
RXIO_EXPORT int select(int count, fd_set* readable, fd_set* writable, fd_set* failed, timeval* timeout) {
  return real().select(count, readable, writable, failed, timeout);
}
RXIO_EXPORT int pselect(int count, fd_set* readable, fd_set* writable, fd_set* failed, const timespec* timeout,
                        const sigset_t* mask) {
  return real().pselect(count, readable, writable, failed, timeout, mask);
}
RXIO_EXPORT int epoll_create(int size) noexcept { return real().epoll_create(size); }
RXIO_EXPORT int epoll_create1(int flags) noexcept { return real().epoll_create1(flags); }
RXIO_EXPORT int epoll_ctl(int epfd, int operation, int fd, epoll_event* event) noexcept {
  return real().epoll_ctl(epfd, operation, fd, event);
}
RXIO_EXPORT int epoll_wait(int epfd, epoll_event* events, int count, int timeout) {
  return real().epoll_wait(epfd, events, count, timeout);
}
RXIO_EXPORT int epoll_pwait(int epfd, epoll_event* events, int count, int timeout, const sigset_t* mask) {
  return real().epoll_pwait(epfd, events, count, timeout, mask);
}
