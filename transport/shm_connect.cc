#include "transport/shm_connect.h"

#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>

#include "base/error.h"

namespace rxio::transport::shm {
namespace {

sockaddr_un address_of(uint32_t pid, uint64_t nonce, socklen_t& length) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  // Abstract (leading NUL): nothing to clean up, gone with the process.
  std::string name = "rxio.shm." + std::to_string(pid) + "." + std::to_string(nonce);
  std::memcpy(a.sun_path + 1, name.data(), name.size());
  length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return a;
}

void wait_readable(int fd, std::chrono::milliseconds timeout, const char* what) {
  pollfd p{fd, POLLIN, 0};
  int n = ::poll(&p, 1, static_cast<int>(timeout.count()));
  if (n < 0) throw Error(errno, what);
  if (n == 0) throw Error(ETIMEDOUT, std::string(what) + " (no answer within " + std::to_string(timeout.count()) + " ms)");
}

void send_hello(int socket, const wire::ShmHello& hello, int arena, int event) {
  auto bytes = wire::encode(hello);
  const int fds[2] = {arena, event};
  if (!send_with_fds(socket, bytes, fds)) throw Error(errno ? errno : EIO, "sending the shm hello to the peer");
}

struct Received {
  wire::ShmHello hello;
  UniqueFd arena, event;
};

Received receive_hello(int socket, std::chrono::milliseconds timeout) {
  wait_readable(socket, timeout, "waiting for the peer's shm hello");
  std::array<std::byte, wire::kShmHelloSize + 1> bytes{};
  iovec iov{bytes.data(), bytes.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
  if (n < 0) throw Error(errno, "reading the peer's shm hello");
  Received r;
  std::vector<UniqueFd> fds;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);  // owned at once, so that extra ones are closed too
    }
  }
  wire::Fault fault{};
  auto hello = wire::decode_shm_hello(std::span(bytes).first(static_cast<std::size_t>(n)), fault);
  if (!hello || n != ssize_t(wire::kShmHelloSize))
    throw Error(EPROTO, "reading the peer's shm hello: " + std::string(wire::to_string(hello ? wire::Fault::bad_length : fault)));
  if (fds.size() != 2 || (msg.msg_flags & MSG_CTRUNC))
    throw Error(EPROTO, "reading the peer's shm hello: expected 2 file descriptors, got " + std::to_string(fds.size()));
  r.hello = *hello;
  r.arena = std::move(fds[0]);
  r.event = std::move(fds[1]);
  return r;
}

// Under Yama's ptrace_scope 1, cross-memory attach works only towards descendants
// unless the target allows it; the peers have the same uid (checked), so allow.
void allow_cross_memory_attach() {
  static const bool done = [] {
    std::ifstream scope("/proc/sys/kernel/yama/ptrace_scope");
    int value = 0;
    if (scope >> value && value == 1) prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
    return true;
  }();
  (void)done;
}

}  // namespace

bool send_with_fds(int socket, std::span<const std::byte> message, std::span<const int> fds) {
  constexpr std::size_t kMaxFds = 4;
  if (fds.size() > kMaxFds) return false;
  iovec iov{const_cast<std::byte*>(message.data()), message.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(kMaxFds * sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = CMSG_SPACE(fds.size() * sizeof(int));
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
  std::memcpy(CMSG_DATA(c), fds.data(), fds.size_bytes());
  return ::sendmsg(socket, &msg, MSG_NOSIGNAL) == ssize_t(message.size());
}

std::array<uint8_t, 16> host_id() {
  std::array<uint8_t, 16> id{};
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string text;
  in >> text;
  std::size_t n = 0;
  for (std::size_t i = 0; i + 1 < text.size() && n < id.size(); ++i) {
    if (text[i] == '-') continue;
    id[n++] = static_cast<uint8_t>(std::stoi(text.substr(i, 2), nullptr, 16));
    ++i;
  }
  return id;
}

std::array<uint8_t, 16> random_token() {
  std::random_device random;
  std::array<uint8_t, 16> token{};
  for (auto& b : token) b = static_cast<uint8_t>(random());
  return token;
}

uint64_t namespace_id(const char* name) {
  struct stat st{};
  if (::stat((std::string("/proc/self/ns/") + name).c_str(), &st) != 0) return 0;
  return st.st_ino;
}

Listener::Listener() {
  std::random_device random;
  fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd_) throw Error(errno, "creating the shm backend's unix socket");
  for (int attempt = 0;; ++attempt) {
    nonce_ = (uint64_t(random()) << 32) | random();
    socklen_t length;
    sockaddr_un a = address_of(static_cast<uint32_t>(getpid()), nonce_, length);
    if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&a), length) == 0) break;
    if (errno != EADDRINUSE || attempt == 3) throw Error(errno, "binding the shm backend's unix socket");
  }
  if (::listen(fd_.get(), 8) != 0) throw Error(errno, "listening on the shm backend's unix socket");
}

namespace {

ucred credentials(int socket) {
  ucred cred{};
  socklen_t length = sizeof cred;
  if (getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &cred, &length) != 0)
    throw Error(errno, "reading the shm peer's credentials (SO_PEERCRED)");
  return cred;
}

std::chrono::milliseconds left(std::chrono::steady_clock::time_point deadline) {
  return std::max(std::chrono::milliseconds(0), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                    deadline - std::chrono::steady_clock::now()));
}

// Both roles, once the hellos have crossed: attach, probe both ways, agree.
void finish(ShmPort& port, UniqueFd socket, Received r, uint32_t peer_pid, std::chrono::milliseconds timeout,
            wire::ShmHello& theirs) {
  allow_cross_memory_attach();
  const int raw_socket = socket.get();
  port.attach(static_cast<pid_t>(peer_pid), std::move(r.arena), r.hello.arena_size, r.hello.arena_base,
              std::move(r.event), std::move(socket));
  // Both sides probe, then tell each other how it went, so that both fail alike.
  std::string problem = port.probe_peer(r.hello.probe_address, r.hello.probe_value);
  char verdict = problem.empty() ? 1 : 0, theirs_verdict = 0;
  if (::send(raw_socket, &verdict, 1, MSG_NOSIGNAL) != 1) throw Error(errno, "telling the shm peer the probe's result");
  wait_readable(raw_socket, timeout, "waiting for the shm peer's probe result");
  if (::recv(raw_socket, &theirs_verdict, 1, 0) != 1) throw Error(EPROTO, "reading the shm peer's probe result");
  if (!problem.empty())
    throw Error(EPERM, problem, {},
                "cross-memory attach needs ptrace permission between the two processes "
                "(kernel.yama.ptrace_scope <= 1, and a seccomp profile that allows process_vm_readv)");
  if (theirs_verdict != 1) throw Error(EPERM, "the shm peer cannot reach this process by cross-memory attach");
  theirs = r.hello;
}

}  // namespace

void connect_peer(ShmPort& port, const wire::Choice& choice, const wire::ShmHello& mine,
                  std::chrono::milliseconds timeout, wire::ShmHello& theirs) {
  UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s) throw Error(errno, "creating a unix socket for the shm backend");
  socklen_t length;
  sockaddr_un a = address_of(choice.pid, choice.nonce, length);
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), length) != 0)
    throw Error(errno, "connecting to the shm peer's unix socket (process " + std::to_string(choice.pid) + ")", {},
                "the peers must share a network namespace; RXIO_BACKEND=verbs avoids shm");
  ucred cred = credentials(s.get());
  if (cred.uid != geteuid() || uint32_t(cred.pid) != choice.pid)
    throw Error(EPERM, "refusing the shm socket of process " + std::to_string(cred.pid) + ": expected process " +
                           std::to_string(choice.pid) + " of uid " + std::to_string(geteuid()));
  send_hello(s.get(), mine, port.arena_fd(), port.event_fd());
  Received r = receive_hello(s.get(), timeout);
  if (r.hello.token != mine.token || r.hello.pid != choice.pid)
    throw Error(EPERM, "refusing an shm peer: its hello does not match its answer");
  finish(port, std::move(s), std::move(r), choice.pid, timeout, theirs);
}

void accept_peer(ShmPort& port, Listener& listener, uint32_t expected_pid, const wire::ShmHello& mine,
                 std::chrono::milliseconds timeout, wire::ShmHello& theirs) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    wait_readable(listener.fd(), left(deadline), "waiting for the shm peer to connect to the unix socket");
    UniqueFd s(::accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!s) throw Error(errno, "accepting on the shm backend's unix socket");
    ucred cred = credentials(s.get());
    if (cred.uid != geteuid() || uint32_t(cred.pid) != expected_pid) continue;  // not the peer: drop it
    // The peer itself: from here on, anything wrong refuses the link.
    Received r = receive_hello(s.get(), left(deadline));
    if (r.hello.token != mine.token) throw Error(EPERM, "refusing an shm peer: wrong token");
    if (r.hello.pid != expected_pid) throw Error(EPERM, "refusing an shm peer: it says it is another process");
    send_hello(s.get(), mine, port.arena_fd(), port.event_fd());
    return finish(port, std::move(s), std::move(r), expected_pid, left(deadline), theirs);
  }
}

}  // namespace rxio::transport::shm
