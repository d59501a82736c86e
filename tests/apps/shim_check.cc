// rxio-shim-check: a small program that holds the socket calls to what TCP does, run
// as two processes (each under rxio-run or not) by shim_test.cc.
//
//   rxio-shim-check serve PORT              serves connections, a thread each, until killed
//   rxio-shim-check client PORT SCENARIO... runs scenarios against it; exit 0 when right
//                                           ("exec" or "exec-ahead" ends the list: the program it executes
//                                           finishes the scenario and says how all went)
//   rxio-shim-check serve-prefork PORT N [any]  the same from N forked workers that
//                                           accept on one listener, while the parent sleeps
//                                           outside the socket calls (as nginx's master
//                                           does); "any": the listener's address is 0.0.0.0
//   rxio-shim-check serve-fd FD             (run by the server's exec-child scenario)
//   rxio-shim-check client-after-exec FD FAILURES   (run by the client's exec scenario)
//   rxio-shim-check client-after-exec-ahead FD FAILURES   (by its exec-ahead scenario)
// Both use 127.0.0.1, or the IPv4 address in RXIO_SHIM_CHECK_ADDRESS (an RDMA interface's,
// for the rdma_cm path in the Soft-RoCE guest).
//
// Each connection starts with one byte naming the scenario the server plays.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/time.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <atomic>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int failures = 0;

#define CHECK(condition)                                                                             \
  do {                                                                                               \
    if (!(condition)) {                                                                              \
      std::fprintf(stderr, "%s:%d: check failed: %s (errno %d: %s)\n", __FILE__, __LINE__, #condition, \
                   errno, std::strerror(errno));                                                     \
      ++failures;                                                                                    \
    }                                                                                                \
  } while (0)

enum Scenario : char {
  kEcho = 'e',         // echo until EOF
  kBurst = 'b',        // writes 3 x 100 bytes, 100 ms apart, then waits for EOF
  kBurstOnAsk = 'B',   // writes 100 bytes, then 100 more for each byte the client sends
  kCountOnAsk = 'n',   // the same, each block numbered (count_block)
  kSilent = 's',       // sends nothing, waits for EOF
  kHalfClose = 'h',    // reads to EOF, then answers with the byte count and closes
  kCloseAtOnce = 'c',  // writes 8 MiB and closes at once
  kSum = 'u',          // reads to EOF, answers with a checksum of everything
  kDuplex = 'd',       // sends a seeded stream while it checks the client's, then a verdict
  kDuplexSmall = 'D',  // the same with kParallelBytes, once the client says go (one byte)
  kForkClose = 'f',    // forks a child that closes every fd (the listener, this connection) and
                       // exits, then echoes until EOF
  kInetd = 'i',        // echoes kHandOverRounds messages, then forks: the child plays kDuplex,
                       // the parent closes the connection at once (the inetd pattern)
  kExecChild = 'x',    // the same, with a child that executes `serve-fd` on the connection
};

// Round trips before a hand-over: enough calls for the client to move the connection.
constexpr int kHandOverRounds = 16;
constexpr std::size_t kRoundBytes = 100;

// Each way of a duplex connection: enough for the switch to land mid-stream, in
// both directions at once.
constexpr std::size_t kDuplexBytes = 8u << 20;
constexpr uint64_t kClientSeed = 11, kServerSeed = 12;
// Each way of each connection of the parallel scenario.
constexpr std::size_t kParallelBytes = 1u << 20;

// Where the server listens and the client dials.
in_addr check_address() {
  in_addr a{htonl(INADDR_LOOPBACK)};
  if (const char* text = std::getenv("RXIO_SHIM_CHECK_ADDRESS"); text && *text && inet_pton(AF_INET, text, &a) != 1) {
    std::fprintf(stderr, "rxio-shim-check: RXIO_SHIM_CHECK_ADDRESS=%s is not an IPv4 address\n", text);
    std::exit(2);
  }
  return a;
}

sockaddr_in server_address(uint16_t port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr = check_address();
  return address;
}

uint64_t checksum(const unsigned char* data, std::size_t n, uint64_t h = 1469598103934665603ull) {
  for (std::size_t i = 0; i < n; ++i) h = (h ^ data[i]) * 1099511628211ull;
  return h;
}

bool write_all(int fd, const void* data, std::size_t n) {
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

bool read_all(int fd, void* data, std::size_t n) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

// `total` bytes of the stream `seed` from byte `from` on, in writes of changing size:
// small ones first, so that many calls cross the socket before the shim moves it.
bool write_stream(int fd, uint64_t seed, std::size_t total, std::size_t from = 0) {
  std::mt19937_64 bytes(seed);
  bytes.discard(from);
  std::mt19937 sizes(static_cast<uint32_t>(seed));
  std::vector<unsigned char> chunk;
  for (std::size_t sent = 0; sent < total;) {
    std::size_t n = std::min<std::size_t>(total - sent, 1 + sizes() % (sent < (1u << 20) ? 700 : 65536));
    chunk.resize(n);
    for (auto& b : chunk) b = static_cast<unsigned char>(bytes());
    if (!write_all(fd, chunk.data(), n)) return false;
    sent += n;
  }
  return true;
}

// Reads `total` bytes, in reads of changing size, each checked against the stream
// `seed` from byte `from` on: false at the first wrong byte or an early end.
bool read_stream(int fd, uint64_t seed, std::size_t total, std::size_t from = 0) {
  std::mt19937_64 bytes(seed);
  bytes.discard(from);
  std::mt19937 sizes(static_cast<uint32_t>(seed) + 1);
  std::vector<unsigned char> buffer(65536);
  for (std::size_t got = 0; got < total;) {
    std::size_t want = std::min<std::size_t>(total - got, 1 + sizes() % buffer.size());
    ssize_t r = ::read(fd, buffer.data(), want);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    for (ssize_t i = 0; i < r; ++i)
      if (buffer[static_cast<std::size_t>(i)] != static_cast<unsigned char>(bytes())) {
        std::fprintf(stderr, "stream %llu: byte %zu differs; %zd bytes read from there:",
                     static_cast<unsigned long long>(seed), from + got + static_cast<std::size_t>(i), r - i);
        for (ssize_t k = i; k < std::min<ssize_t>(r, i + 48); ++k)
          std::fprintf(stderr, " %02x", buffer[static_cast<std::size_t>(k)]);
        std::fprintf(stderr, "\n");
        return false;
      }
    got += static_cast<std::size_t>(r);
  }
  return true;
}

// The server's side of kDuplex: `bytes` each way at once, then its verdict on the
// client's.
void serve_duplex(int fd, std::size_t bytes) {
  bool right = false;
  std::thread reader([&] { right = read_stream(fd, kClientSeed, bytes); });
  write_stream(fd, kServerSeed, bytes);
  reader.join();
  char verdict = right ? 'y' : 'n';
  write_all(fd, &verdict, 1);
}

// kCountOnAsk's block `i`: its bytes tell its place in the stream.
std::vector<unsigned char> count_block(uint8_t i) {
  std::vector<unsigned char> block(kRoundBytes);
  for (std::size_t j = 0; j < block.size(); ++j) block[j] = static_cast<unsigned char>((i * kRoundBytes + j) % 251);
  return block;
}

// kInetd and kExecChild: a child goes on with the connection, the parent lets go of it.
void hand_to_child(int fd, char scenario) {
  std::vector<unsigned char> message(kRoundBytes);
  for (int i = 0; i < kHandOverRounds; ++i)
    if (!read_all(fd, message.data(), message.size()) || !write_all(fd, message.data(), message.size())) break;
  pid_t child = ::fork();
  if (child == 0) {
    if (scenario == kExecChild) {
      const std::string number = std::to_string(fd);
      ::execl("/proc/self/exe", "rxio-shim-check", "serve-fd", number.c_str(), static_cast<char*>(nullptr));
      std::perror("rxio-shim-check: exec");
      ::_exit(127);
    }
    serve_duplex(fd, kDuplexBytes);
    ::_exit(0);
  }
  ::close(fd);  // at once, as inetd does
  int status = 0;
  if (child > 0) ::waitpid(child, &status, 0);
}

void serve_connection(int fd) {
  char scenario = 0;
  if (!read_all(fd, &scenario, 1)) {
    ::close(fd);
    return;
  }
  std::vector<unsigned char> buffer(256 * 1024);
  switch (scenario) {
    case kForkClose: {
      pid_t child = ::fork();
      if (child == 0) {
        for (int other = 3; other < 1024; ++other) ::close(other);
        ::_exit(0);
      }
      int status = 0;
      if (child > 0) ::waitpid(child, &status, 0);
    }
      [[fallthrough]];
    case kEcho:
      for (ssize_t n; (n = ::read(fd, buffer.data(), buffer.size())) > 0;)
        if (!write_all(fd, buffer.data(), static_cast<std::size_t>(n))) break;
      break;
    case kBurst:
      for (int i = 0; i < 3; ++i) {
        std::memset(buffer.data(), 'a' + i, 100);
        write_all(fd, buffer.data(), 100);
        std::this_thread::sleep_for(milliseconds(100));
      }
      while (::read(fd, buffer.data(), buffer.size()) > 0) {
      }
      break;
    case kBurstOnAsk:
      std::memset(buffer.data(), 'a', 100);
      for (ssize_t n = 1; n > 0 && write_all(fd, buffer.data(), 100); n = ::read(fd, buffer.data() + 100, 1)) {
      }
      break;
    case kCountOnAsk: {
      uint8_t block = 0;
      for (ssize_t n = 1; n > 0 && write_all(fd, count_block(block++).data(), kRoundBytes);
           n = ::read(fd, buffer.data(), 1)) {
      }
      break;
    }
    case kSilent:
      while (::read(fd, buffer.data(), buffer.size()) > 0) {
      }
      break;
    case kHalfClose: {
      uint64_t total = 0;
      for (ssize_t n; (n = ::read(fd, buffer.data(), buffer.size())) > 0;) total += static_cast<uint64_t>(n);
      write_all(fd, &total, sizeof total);
      break;
    }
    case kCloseAtOnce: {
      std::mt19937_64 random(7);
      for (std::size_t sent = 0; sent < (8u << 20); sent += buffer.size()) {
        for (auto& b : buffer) b = static_cast<unsigned char>(random());
        write_all(fd, buffer.data(), buffer.size());
      }
      break;
    }
    case kSum: {
      uint64_t h = checksum(nullptr, 0), total = 0;
      for (ssize_t n; (n = ::read(fd, buffer.data(), buffer.size())) > 0;) {
        h = checksum(buffer.data(), static_cast<std::size_t>(n), h);
        total += static_cast<uint64_t>(n);
      }
      uint64_t answer[2] = {h, total};
      write_all(fd, answer, sizeof answer);
      break;
    }
    case kDuplex:
    case kDuplexSmall: {
      char go = 0;
      if (scenario == kDuplexSmall && !read_all(fd, &go, 1)) break;
      serve_duplex(fd, scenario == kDuplex ? kDuplexBytes : kParallelBytes);
      break;
    }
    case kInetd:
    case kExecChild:
      hand_to_child(fd, scenario);
      return;
    default:
      break;
  }
  ::close(fd);
}

int listen_on(uint16_t port, bool any_address = false) {
  int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in address = server_address(port);
  if (any_address) address.sin_addr.s_addr = htonl(INADDR_ANY);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 || ::listen(listener, 512) != 0) {
    std::perror("rxio-shim-check serve: bind/listen");
    return -1;
  }
  return listener;
}

int accept_forever(int listener) {
  for (;;) {
    int fd = ::accept(listener, nullptr, nullptr);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      std::perror("rxio-shim-check serve: accept");
      return 1;
    }
    std::thread(serve_connection, fd).detach();
  }
}

int serve(uint16_t port) {
  // A client may close before a burst is out, as a TCP server's peers do.
  std::signal(SIGPIPE, SIG_IGN);
  int listener = listen_on(port);
  return listener < 0 ? 1 : accept_forever(listener);
}

int serve_prefork(uint16_t port, int workers, bool any_address) {
  std::signal(SIGPIPE, SIG_IGN);
  int listener = listen_on(port, any_address);
  if (listener < 0) return 1;
  for (int i = 0; i < workers; ++i)
    if (::fork() == 0) return accept_forever(listener);
  // The parent waits for signals only; its group ends with it.
  for (;;) ::pause();
}

// ---- the client's scenarios ------------------------------------------------------------

uint16_t g_port = 0;

int dial(char scenario, bool nonblocking = false) {
  int fd = ::socket(AF_INET, SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
  sockaddr_in address = server_address(g_port);
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
  if (nonblocking) {
    CHECK(rc == 0 || errno == EINPROGRESS);
    pollfd p{fd, POLLOUT, 0};
    CHECK(::poll(&p, 1, 5000) == 1);
    int error = -1;
    socklen_t length = sizeof error;
    CHECK(::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error == 0);
    int fl = ::fcntl(fd, F_GETFL);
    ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  } else {
    CHECK(rc == 0);
  }
  CHECK(write_all(fd, &scenario, 1));
  return fd;
}

std::vector<unsigned char> random_bytes(std::size_t n, uint64_t seed) {
  std::mt19937_64 random(seed);
  std::vector<unsigned char> out(n);
  for (auto& b : out) b = static_cast<unsigned char>(random());
  return out;
}

// Messages of every size up to 64 KiB through an echo, waiting with poll.
void echo_with_poll() {
  int fd = dial(kEcho);
  std::mt19937 random(1);
  for (int i = 0; i < 300; ++i) {
    std::size_t n = 1 + random() % (64 * 1024);
    auto out = random_bytes(n, i);
    CHECK(write_all(fd, out.data(), n));
    std::vector<unsigned char> in(n);
    std::size_t got = 0;
    while (got < n) {
      pollfd p{fd, POLLIN, 0};
      CHECK(::poll(&p, 1, 5000) == 1 && (p.revents & POLLIN));
      ssize_t r = ::recv(fd, in.data() + got, n - got, MSG_DONTWAIT);
      if (r < 0 && errno == EAGAIN) continue;
      CHECK(r > 0);
      if (r <= 0) break;
      got += static_cast<std::size_t>(r);
    }
    CHECK(in == out);
  }
  ::close(fd);
}

// Level, edge and one-shot epoll, an fd in two sets, and a set inside another. Each
// burst comes when the client asks for it, so that no edge depends on timing.
void epoll_modes() {
  int level = dial(kBurstOnAsk), edge = dial(kBurstOnAsk), once = dial(kBurstOnAsk);
  int ep = ::epoll_create1(EPOLL_CLOEXEC), other = ::epoll_create1(EPOLL_CLOEXEC), outer = ::epoll_create1(0);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = level;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_ADD, level, &ev) == 0);
  CHECK(::epoll_ctl(other, EPOLL_CTL_ADD, level, &ev) == 0);  // in two sets
  CHECK(::epoll_ctl(ep, EPOLL_CTL_ADD, level, &ev) == -1 && errno == EEXIST);
  ev.events = EPOLLIN | EPOLLET;
  ev.data.fd = edge;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_ADD, edge, &ev) == 0);
  ev.events = EPOLLIN | EPOLLONESHOT;
  ev.data.fd = once;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_ADD, once, &ev) == 0);
  ev.events = EPOLLIN;
  ev.data.fd = ep;
  CHECK(::epoll_ctl(outer, EPOLL_CTL_ADD, ep, &ev) == 0);  // nested
  // The first 100 bytes reach all three; nothing is read yet.
  epoll_event out[8];
  CHECK(::epoll_wait(outer, out, 8, 2000) == 1 && out[0].data.fd == ep);
  std::map<int, int> seen;
  auto wait_round = [&](int timeout) {
    seen.clear();
    int n = ::epoll_wait(ep, out, 8, timeout);
    for (int i = 0; i < n; ++i) ++seen[out[i].data.fd];
    return n;
  };
  auto has = [](int fd, int bytes) {
    int available = 0;
    return ::ioctl(fd, FIONREAD, &available) == 0 && available >= bytes;
  };
  for (auto until = Clock::now() + std::chrono::seconds(10);
       !(has(level, 100) && has(edge, 100) && has(once, 100)) && Clock::now() < until;)
    std::this_thread::sleep_for(milliseconds(10));
  CHECK(wait_round(2000) == 3);
  CHECK(seen[level] == 1 && seen[edge] == 1 && seen[once] == 1);
  // Nothing read: level reports again, edge and one-shot do not.
  CHECK(wait_round(50) == 1 && seen[level] == 1);
  CHECK(::epoll_wait(other, out, 8, 1000) == 1 && out[0].data.fd == level);
  // New bytes: an edge for `edge`; `once` stays quiet until re-armed; `level` reports
  // every time.
  const char ask = '+';
  for (int fd : {edge, once}) CHECK(write_all(fd, &ask, 1));
  bool edged = false;
  int once_seen = 0;
  for (auto until = Clock::now() + std::chrono::seconds(10); !edged && Clock::now() < until;) {
    wait_round(200);
    edged = seen[edge] == 1;
    once_seen += seen[once];
    CHECK(seen[level] == 1);
  }
  CHECK(edged);
  for (auto until = Clock::now() + std::chrono::seconds(10); !has(once, 200) && Clock::now() < until;)
    std::this_thread::sleep_for(milliseconds(10));
  wait_round(50);
  once_seen += seen[once];
  CHECK(once_seen == 0);
  ev.events = EPOLLIN | EPOLLONESHOT;
  ev.data.fd = once;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_MOD, once, &ev) == 0);
  wait_round(1000);
  CHECK(seen[once] == 1);
  CHECK(::epoll_ctl(ep, EPOLL_CTL_DEL, level, nullptr) == 0);
  CHECK(::epoll_ctl(ep, EPOLL_CTL_DEL, level, nullptr) == -1 && errno == ENOENT);
  char buffer[512];
  for (int fd : {level, edge, once}) {
    CHECK(::recv(fd, buffer, sizeof buffer, 0) > 0);
    ::close(fd);
  }
  ::close(outer);
  ::close(other);
  ::close(ep);
}

// select and pselect, with a timeout that runs out and one that does not.
void select_and_pselect() {
  int fd = dial(kBurst);
  fd_set readable;
  FD_ZERO(&readable);
  FD_SET(fd, &readable);
  timeval tv{2, 0};
  CHECK(::select(fd + 1, &readable, nullptr, nullptr, &tv) == 1 && FD_ISSET(fd, &readable));
  char buffer[100];
  CHECK(read_all(fd, buffer, 100) && buffer[0] == 'a');
  // The next burst is 100 ms away: a 20 ms wait times out with nothing.
  FD_ZERO(&readable);
  FD_SET(fd, &readable);
  timespec short_wait{0, 20 * 1000 * 1000};
  auto start = Clock::now();
  CHECK(::pselect(fd + 1, &readable, nullptr, nullptr, &short_wait, nullptr) == 0);
  CHECK(Clock::now() - start >= milliseconds(15));
  fd_set writable;
  FD_ZERO(&writable);
  FD_SET(fd, &writable);
  timespec none{0, 0};
  CHECK(::pselect(fd + 1, nullptr, &writable, nullptr, &none, nullptr) == 1 && FD_ISSET(fd, &writable));
  ::close(fd);
}

// MSG_PEEK, MSG_WAITALL, MSG_DONTWAIT, FIONREAD and SO_RCVTIMEO.
void receive_flags() {
  int fd = dial(kBurst);
  char buffer[300];
  CHECK(::recv(fd, buffer, 1, MSG_PEEK) == 1 && buffer[0] == 'a');
  int available = 0;
  CHECK(::ioctl(fd, FIONREAD, &available) == 0 && available >= 1);
  // All three bursts in one call, although they come 100 ms apart.
  CHECK(::recv(fd, buffer, 300, MSG_WAITALL) == 300);
  CHECK(buffer[0] == 'a' && buffer[150] == 'b' && buffer[299] == 'c');
  CHECK(::recv(fd, buffer, 1, MSG_DONTWAIT) == -1 && errno == EAGAIN);
  timeval limit{0, 200 * 1000};
  CHECK(::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit) == 0);
  auto start = Clock::now();
  CHECK(::recv(fd, buffer, 1, 0) == -1 && (errno == EAGAIN || errno == EWOULDBLOCK));
  auto waited = Clock::now() - start;
  CHECK(waited >= milliseconds(150) && waited < milliseconds(2000));
  ::close(fd);
}

// shutdown(SHUT_WR): the peer sees the end, and can still answer.
void half_close() {
  int fd = dial(kHalfClose);
  auto data = random_bytes(1 << 20, 3);
  CHECK(write_all(fd, data.data(), data.size()));
  CHECK(::shutdown(fd, SHUT_WR) == 0);
  CHECK(::send(fd, "x", 1, MSG_NOSIGNAL) == -1 && errno == EPIPE);
  uint64_t total = 0;
  CHECK(read_all(fd, &total, sizeof total) && total == data.size());
  char byte;
  CHECK(::read(fd, &byte, 1) == 0);
  ::close(fd);
}

// A peer that writes 8 MiB and closes at once: every byte arrives, then the end.
void close_with_data_in_flight() {
  int fd = dial(kCloseAtOnce, true);
  std::mt19937_64 random(7);
  std::vector<unsigned char> buffer(256 * 1024), expected(buffer.size());
  std::size_t total = 0;
  bool right = true;
  for (;;) {
    if (!read_all(fd, buffer.data(), buffer.size())) break;
    for (auto& b : expected) b = static_cast<unsigned char>(random());
    right &= buffer == expected;
    total += buffer.size();
  }
  CHECK(right);
  CHECK(total == (8u << 20));
  ::close(fd);
}

// A refused non-blocking connect reports the error through SO_ERROR.
void refused_connect() {
  int probe = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(probe, reinterpret_cast<sockaddr*>(&address), sizeof address);
  socklen_t length = sizeof address;
  ::getsockname(probe, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(probe);  // nobody listens on that port now
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
  CHECK(rc == -1 && (errno == EINPROGRESS || errno == ECONNREFUSED));
  if (rc == -1 && errno == EINPROGRESS) {
    pollfd p{fd, POLLOUT, 0};
    CHECK(::poll(&p, 1, 2000) == 1);
    int error = 0;
    socklen_t elen = sizeof error;
    CHECK(::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &elen) == 0 && error == ECONNREFUSED);
  }
  ::close(fd);
}

// dup'd descriptors name the same connection; sendfile and writev through them.
void dup_sendfile_writev() {
  int fd = dial(kSum, true);
  int copy = ::dup(fd);
  CHECK(copy >= 0);
  ::close(fd);
  char path[] = "/tmp/rxio-shim-check.XXXXXX";
  int file = ::mkstemp(path);
  ::unlink(path);
  auto data = random_bytes(3 << 20, 5);
  CHECK(write_all(file, data.data(), data.size()));
  off_t offset = 0;
  std::size_t sent = 0;
  while (sent < data.size()) {
    ssize_t n = ::sendfile(copy, file, &offset, data.size() - sent);
    CHECK(n > 0);
    if (n <= 0) break;
    sent += static_cast<std::size_t>(n);
  }
  ::close(file);
  iovec parts[2] = {{data.data(), 1000}, {data.data() + 1000, 24}};
  CHECK(::writev(copy, parts, 2) == 1024);
  CHECK(::shutdown(copy, SHUT_WR) == 0);
  uint64_t answer[2];
  CHECK(read_all(copy, answer, sizeof answer));
  uint64_t h = checksum(data.data(), data.size());
  h = checksum(data.data(), 1024, h);
  CHECK(answer[0] == h && answer[1] == data.size() + 1024);
  ::close(copy);
}

// Many connections at once from several threads, every byte checked.
void many_connections() {
  constexpr int kThreads = 4, kPerThread = 50;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t] {
      std::vector<int> fds;
      std::vector<std::vector<unsigned char>> sent;
      for (int i = 0; i < kPerThread; ++i) {
        fds.push_back(dial(kSum));
        sent.push_back(random_bytes(1000 + 997 * static_cast<std::size_t>(i), static_cast<uint64_t>(t * 1000 + i)));
      }
      for (int i = 0; i < kPerThread; ++i) {
        CHECK(write_all(fds[i], sent[i].data(), sent[i].size()));
        CHECK(::shutdown(fds[i], SHUT_WR) == 0);
      }
      for (int i = 0; i < kPerThread; ++i) {
        uint64_t answer[2] = {};
        CHECK(read_all(fds[i], answer, sizeof answer));
        CHECK(answer[0] == checksum(sent[i].data(), sent[i].size()) && answer[1] == sent[i].size());
        ::close(fds[i]);
      }
    });
  }
  for (auto& t : threads) t.join();
}

// A read on `fd` (a silent peer's) that blocks until another thread shuts its reading
// side `after` from now; how long it took.
Clock::duration read_until_shut(int fd, milliseconds after) {
  std::thread closer([fd, after] {
    std::this_thread::sleep_for(after);
    ::shutdown(fd, SHUT_RD);
  });
  char byte;
  auto start = Clock::now();
  CHECK(::read(fd, &byte, 1) == 0);
  auto took = Clock::now() - start;
  closer.join();
  return took;
}

// A silent peer: the reader blocks in read() until another thread closes its side.
void blocked_reader_sees_the_end() {
  int fd = dial(kSilent);
  CHECK(read_until_shut(fd, milliseconds(100)) < milliseconds(3000));
  ::close(fd);
}

// A signal whose handler does not ask for restarts ends a blocked read with EINTR, as
// it ends the kernel's (sockperf and others stop their runs that way).
void signal_ends_a_blocked_read() {
  int fd = dial(kSilent);
  struct sigaction action {};
  action.sa_handler = [](int) {};
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART
  struct sigaction before {};
  CHECK(::sigaction(SIGALRM, &action, &before) == 0);
  itimerval in_100ms{{0, 0}, {0, 100 * 1000}};
  CHECK(::setitimer(ITIMER_REAL, &in_100ms, nullptr) == 0);
  char byte;
  auto start = Clock::now();
  CHECK(::read(fd, &byte, 1) == -1 && errno == EINTR);
  CHECK(Clock::now() - start < milliseconds(3000));
  ::sigaction(SIGALRM, &before, nullptr);
  ::close(fd);
}

// A signal whose handler asks for restarts does not end a blocked read: it goes on
// after the handler and returns what comes next (here the end, from SHUT_RD).
void signal_restarts_a_blocked_read() {
  int fd = dial(kSilent);
  static std::atomic<int> handled{0};
  handled = 0;
  struct sigaction action {};
  action.sa_handler = [](int) { ++handled; };
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  struct sigaction before {};
  CHECK(::sigaction(SIGALRM, &action, &before) == 0);
  itimerval in_100ms{{0, 0}, {0, 100 * 1000}};
  CHECK(::setitimer(ITIMER_REAL, &in_100ms, nullptr) == 0);
  CHECK(read_until_shut(fd, milliseconds(400)) >= milliseconds(300));
  CHECK(handled == 1);
  ::sigaction(SIGALRM, &before, nullptr);
  ::close(fd);
}

// fork on both sides, with the connection moved: a child that closes the fds it
// inherited (the server's closes its listener too, as redis's BGSAVE child does) and
// exits leaves the parents' connection, and the server's later moves, as they were.
void forked_children_close_their_copies() {
  int fd = dial(kForkClose);
  auto round_trip = [fd](uint64_t seed) {
    auto out = random_bytes(1000, seed);
    CHECK(write_all(fd, out.data(), out.size()));
    std::vector<unsigned char> in(out.size());
    CHECK(read_all(fd, in.data(), in.size()));
    CHECK(in == out);
  };
  round_trip(70);
  pid_t child = ::fork();
  if (child == 0) {
    ::close(fd);
    ::_exit(0);
  }
  int status = -1;
  CHECK(child > 0 && ::waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  round_trip(71);
  ::close(fd);
}

// A socket that two fds name when it moves, watched by epoll through the second: both
// keep working, and epoll reports the moved socket's bytes; then one is closed, and the
// other goes on.
void dup_then_move() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address = server_address(g_port);
  CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  int copy = ::dup(fd);
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = copy;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_ADD, copy, &ev) == 0);
  char scenario = kEcho;
  CHECK(write_all(copy, &scenario, 1));
  for (int i = 0; i < 20; ++i) {
    auto out = random_bytes(100 + 37 * static_cast<std::size_t>(i), 50 + static_cast<uint64_t>(i));
    CHECK(write_all(i % 2 ? fd : copy, out.data(), out.size()));
    std::vector<unsigned char> in(out.size());
    std::size_t got = 0;
    while (got < in.size()) {
      epoll_event ready{};
      CHECK(::epoll_wait(ep, &ready, 1, 5000) == 1 && ready.data.fd == copy);
      ssize_t r = ::recv(i % 2 ? copy : fd, in.data() + got, in.size() - got, MSG_DONTWAIT);
      if (r < 0 && errno == EAGAIN) continue;
      CHECK(r > 0);
      if (r <= 0) break;
      got += static_cast<std::size_t>(r);
    }
    CHECK(in == out);
  }
  // One fd closed, the other goes on (where links fail every few slots, this close can
  // come while the connection goes back to TCP).
  ::close(ep);
  ::close(copy);
  for (int i = 20; i < 30; ++i) {
    auto out = random_bytes(100 + 37 * static_cast<std::size_t>(i), 50 + static_cast<uint64_t>(i));
    CHECK(write_all(fd, out.data(), out.size()));
    std::vector<unsigned char> in(out.size());
    pollfd ready{fd, POLLIN, 0};
    CHECK(::poll(&ready, 1, 5000) == 1);
    CHECK(read_all(fd, in.data(), in.size()));
    CHECK(in == out);
  }
  ::close(fd);
}

// `bytes` each way at once on `fd`, each way from its own thread, every byte checked
// here and by the server (its verdict); then closes it.
void duplex_on(int fd, std::size_t bytes) {
  bool right = false;
  std::thread reader([&] { right = read_stream(fd, kServerSeed, bytes); });
  CHECK(write_stream(fd, kClientSeed, bytes));
  reader.join();
  CHECK(right);
  char verdict = 0;
  CHECK(read_all(fd, &verdict, 1) && verdict == 'y');
  ::close(fd);
}

// Both ways at once while the connection moves: every byte arrives once, in order, on
// whichever path it took.
void duplex_across_the_move() { duplex_on(dial(kDuplex), kDuplexBytes); }

// Thirty-two connections from four threads, all moved before any carries data, then
// 1 MiB each way on every one at once, every byte checked: a link that fails under
// them fails them all mid-stream.
void parallel_streams() {
  constexpr int kThreads = 4, kPerThread = 8;
  std::atomic<int> dialed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&dialed] {
      std::vector<int> fds;
      for (int i = 0; i < kPerThread; ++i) fds.push_back(dial(kDuplexSmall));
      ++dialed;
      while (dialed < kThreads) std::this_thread::sleep_for(milliseconds(1));
      std::vector<std::thread> streams;
      for (int fd : fds) {
        streams.emplace_back([fd] {
          CHECK(write_all(fd, "g", 1));
          duplex_on(fd, kParallelBytes);
        });
      }
      for (auto& s : streams) s.join();
    });
  }
  for (auto& t : threads) t.join();
}

// A moved connection whose server forks: the child serves it on while the parent
// closes its copy at once (inetd), or the child executes a program that does. Both ways
// at once, every byte checked, with bytes in flight across the fork.
void served_by_a_child(char scenario) {
  int fd = dial(scenario);
  for (int i = 0; i < kHandOverRounds; ++i) {
    auto out = random_bytes(kRoundBytes, 90 + static_cast<uint64_t>(i));
    CHECK(write_all(fd, out.data(), out.size()));
    std::vector<unsigned char> in(out.size());
    CHECK(read_all(fd, in.data(), in.size()));
    CHECK(in == out);
  }
  duplex_on(fd, kDuplexBytes);
}
void inetd_child() { served_by_a_child(kInetd); }
void exec_child() { served_by_a_child(kExecChild); }

// Executes this program as `mode` on the connection `fd`, with the failures so far.
void exec_self_on(int fd, const char* mode) {
  std::fflush(stdout);
  const std::string number = std::to_string(fd), so_far = std::to_string(failures);
  ::execl("/proc/self/exe", "rxio-shim-check", mode, number.c_str(), so_far.c_str(), static_cast<char*>(nullptr));
  CHECK(!"exec");
}

// Half of a duplex connection each way here, the move among it, then the program
// executes itself, and the new image does the rest (client-after-exec).
void exec_mid_stream() {
  int fd = dial(kDuplex);
  CHECK(write_stream(fd, kClientSeed, kDuplexBytes / 2));
  CHECK(read_stream(fd, kServerSeed, kDuplexBytes / 2));
  exec_self_on(fd, "client-after-exec");
}

int after_exec(int fd) {
  bool right = false;
  std::thread reader([&] { right = read_stream(fd, kServerSeed, kDuplexBytes / 2, kDuplexBytes / 2); });
  CHECK(write_stream(fd, kClientSeed, kDuplexBytes / 2, kDuplexBytes / 2));
  reader.join();
  CHECK(right);
  char verdict = 0;
  CHECK(read_all(fd, &verdict, 1) && verdict == 'y');
  ::close(fd);
  return failures;
}

// A move that takes in bytes the server wrote over TCP before it, which the program
// has not read when it executes itself: the new image reads them first, then the rest
// (client-after-exec-ahead).
void exec_with_read_ahead() {
  int fd = dial(kCountOnAsk);
  // Block 0 waits in the kernel; the next call moves the connection, which takes it in.
  pollfd ready{fd, POLLIN, 0};
  CHECK(::poll(&ready, 1, 10000) == 1);
  CHECK(write_all(fd, "1", 1));  // block 1 follows, over the move
  exec_self_on(fd, "client-after-exec-ahead");
}

int after_exec_ahead(int fd) {
  // A socket made before the first read: the new image's shim starts there, and must
  // have taken the read-ahead in by the read.
  ::close(::socket(AF_INET, SOCK_STREAM, 0));
  for (uint8_t i = 0; i < 3; ++i) {
    std::vector<unsigned char> block(kRoundBytes);
    CHECK(read_all(fd, block.data(), block.size()));
    CHECK(block == count_block(i));
    if (i == 1) CHECK(write_all(fd, "2", 1));
  }
  ::close(fd);
  return failures;
}

// Echo round trips of up to 64 KiB, every byte checked, for `seconds`; `until_gone`:
// a peer that goes away ends it well, with an error or the end of the stream (never a
// wrong byte, never a hang).
void steady(int seconds, bool until_gone) {
  int fd = dial(kEcho);
  std::mt19937 random(5);
  const auto until = Clock::now() + std::chrono::seconds(seconds);
  for (uint64_t i = 0; Clock::now() < until; ++i) {
    auto out = random_bytes(1 + random() % (64 * 1024), 200 + i);
    std::vector<unsigned char> in(out.size());
    const bool sent = write_all(fd, out.data(), out.size());
    const bool got = sent && read_all(fd, in.data(), in.size());
    if (until_gone && !got) {
      std::printf("steady: the server went after %llu round trips (%s)\n", static_cast<unsigned long long>(i),
                  errno ? std::strerror(errno) : "end of stream");
      ::close(fd);
      return;
    }
    CHECK(sent && got);
    CHECK(in == out);
    if (!got) break;
  }
  CHECK(!until_gone);  // the server was to go away meanwhile
  ::close(fd);
}

const std::map<std::string, std::function<void()>> kScenarios = {
    {"echo", echo_with_poll},
    {"fork", forked_children_close_their_copies},
    {"epoll", epoll_modes},
    {"select", select_and_pselect},
    {"flags", receive_flags},
    {"half-close", half_close},
    {"close-in-flight", close_with_data_in_flight},
    {"refused", refused_connect},
    {"dup-sendfile", dup_sendfile_writev},
    {"many", many_connections},
    {"blocked-reader", blocked_reader_sees_the_end},
    {"duplex", duplex_across_the_move},
    {"dup-move", dup_then_move},
    {"signal", signal_ends_a_blocked_read},
    {"signal-restart", signal_restarts_a_blocked_read},
    {"parallel", parallel_streams},
    {"inetd", inetd_child},
    {"exec-child", exec_child},
    {"exec", exec_mid_stream},
    {"exec-ahead", exec_with_read_ahead},
    {"steady", [] { steady(4, false); }},
    {"steady-long", [] { steady(12, false); }},
    {"steady-until-gone", [] { steady(30, true); }},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "serve") return serve(static_cast<uint16_t>(std::atoi(argv[2])));
  if (argc >= 4 && std::string(argv[1]) == "serve-prefork")
    return serve_prefork(static_cast<uint16_t>(std::atoi(argv[2])), std::atoi(argv[3]),
                         argc >= 5 && std::string(argv[4]) == "any");
  if (argc >= 3 && std::string(argv[1]) == "serve-fd") {
    serve_duplex(std::atoi(argv[2]), kDuplexBytes);
    return 0;
  }
  if (argc >= 4 && (std::string(argv[1]) == "client-after-exec" || std::string(argv[1]) == "client-after-exec-ahead")) {
    const int before = std::atoi(argv[3]);
    failures = before;
    const bool ahead = std::string(argv[1]) == "client-after-exec-ahead";
    (ahead ? after_exec_ahead : after_exec)(std::atoi(argv[2]));
    std::printf("%s: %s\n", ahead ? "exec-ahead" : "exec", failures == before ? "ok" : "FAILED");
    return failures == 0 ? 0 : 1;
  }
  if (argc >= 4 && std::string(argv[1]) == "client") {
    g_port = static_cast<uint16_t>(std::atoi(argv[2]));
    for (int i = 3; i < argc; ++i) {
      auto it = kScenarios.find(argv[i]);
      if (it == kScenarios.end()) {
        std::fprintf(stderr, "rxio-shim-check: no scenario '%s'\n", argv[i]);
        return 2;
      }
      int before = failures;
      it->second();
      std::printf("%s: %s\n", argv[i], failures == before ? "ok" : "FAILED");
    }
    return failures == 0 ? 0 : 1;
  }
  std::fprintf(stderr, "usage: rxio-shim-check serve PORT | client PORT SCENARIO...\n");
  return 2;
}
