// The socket calls on fds the shim owns, called by interpose.cc once a table lookup
// found the fd. Each takes the shim's mutex itself.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "shim/state.h"

namespace rxio::shim {

// Data path (stream.cc).
ssize_t receive(int fd, msghdr* message, int flags) noexcept;
ssize_t transmit(int fd, const msghdr* message, int flags) noexcept;
ssize_t send_file(int out, int in, off_t* offset, std::size_t count) noexcept;

// The rest of the calls on an owned socket (control.cc).
int accept_on(int fd, sockaddr* address, socklen_t* length, int flags) noexcept;
int connect_on(int fd, const sockaddr* address, socklen_t length) noexcept;
int listen_on(int fd, int backlog) noexcept;
int shutdown_on(int fd, int how) noexcept;
int close_fd(int fd) noexcept;
int duplicate(int fd, int result) noexcept;  // after a successful dup: `result` names it too
void replacing(int target) noexcept;         // before dup2/dup3 onto a socket of the shim's
int socket_error(int fd, void* value, socklen_t* length) noexcept;  // SO_ERROR
int bytes_readable(int fd, int* count) noexcept;                     // FIONREAD
void created(int fd) noexcept;                                       // a new TCP socket
// Before any exec: the moved sockets the new image inherits go back to TCP, and what
// the program had not read of them goes to the new image in `env` (back.cc).
void exec_prepare(ExecEnvironment& env) noexcept;

// Readiness (readiness.cc). poll_any and select_any serve every call, and go straight
// to the kernel when no fd in the set is the shim's.
int poll_any(pollfd* fds, nfds_t count, int timeout_ms, const sigset_t* mask) noexcept;
int select_any(int nfds, fd_set* readable, fd_set* writable, fd_set* failed, int timeout_ms,
               const sigset_t* mask) noexcept;
int epoll_control(int epfd, int op, int fd, epoll_event* event) noexcept;
int epoll_wait_any(int epfd, epoll_event* events, int max, int timeout_ms, const sigset_t* mask) noexcept;
void epoll_closed(int epfd) noexcept;

}  // namespace rxio::shim
