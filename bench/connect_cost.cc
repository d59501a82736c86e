// rxio-connect-cost: what a blocking connect() to 127.0.0.1 costs, for measuring what
// the shim adds when the peer runs without it (the connection stays on TCP).
//
//   --server PORT                accepts on 127.0.0.1:PORT and closes every connection,
//                                forever; meant to run plain, never under the shim
//   --client PORT --count N      N times {socket, connect, close} after 100 untimed
//                                ones; prints the mean connect() time, "connect_us=X"
//
// Only connect() is timed: that is where the shim looks for the peer's shim; what
// socket() and close() cost does not depend on the peer.
// The client closes first, so each connection leaves a TIME_WAIT on its side; a count
// past the ephemeral port range relies on tcp_tw_reuse (on for loopback by default).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace {

constexpr int kWarmUp = 100;

[[noreturn]] void usage() {
  std::fprintf(stderr,
               "usage: rxio-connect-cost --server PORT\n"
               "       rxio-connect-cost --client PORT --count N\n");
  std::exit(2);
}

long parse(const char* text, long low, long high) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(text, &end, 10);
  if (errno || end == text || *end || v < low || v > high) usage();
  return v;
}

sockaddr_in loopback(int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "rxio-connect-cost: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

int serve(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a = loopback(port);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) die("bind");
  // A deep backlog: the client connects back to back, faster than one accept loop.
  if (::listen(fd, 4096) != 0) die("listen");
  for (;;) {
    int c = ::accept(fd, nullptr, nullptr);
    if (c >= 0) {
      ::close(c);
    } else if (errno != EINTR && errno != ECONNABORTED && errno != EMFILE && errno != ENFILE) {
      die("accept");
    }
  }
}

// One {socket, connect, close}; the connect's duration in seconds.
double connect_once(const sockaddr_in& a) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  auto start = std::chrono::steady_clock::now();
  int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof a);
  auto end = std::chrono::steady_clock::now();
  if (rc != 0) die("connect");
  ::close(fd);
  return std::chrono::duration<double>(end - start).count();
}

int client(int port, long count) {
  const sockaddr_in a = loopback(port);
  // The first connects pay for one-time set-up (the shim starts its engine on the first).
  for (int i = 0; i < kWarmUp; ++i) connect_once(a);
  double total = 0;
  for (long i = 0; i < count; ++i) total += connect_once(a);
  std::printf("connect_us=%.2f\n", total / double(count) * 1e6);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int port = 0;
  long count = 0;
  bool server = false, have_port = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg(argv[i]);
    if ((arg == "--server" || arg == "--client") && i + 1 < argc) {
      if (have_port) usage();
      server = arg == "--server";
      port = static_cast<int>(parse(argv[++i], 1, 65535));
      have_port = true;
    } else if (arg == "--count" && i + 1 < argc) {
      count = parse(argv[++i], 1, 1L << 40);
    } else {
      usage();
    }
  }
  if (!have_port || server == (count != 0)) usage();
  return server ? serve(port) : client(port, count);
}
