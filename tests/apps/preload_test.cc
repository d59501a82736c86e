// The preload library itself: it exports exactly the calls it interposes and no C++
// runtime, and iperf3 and sockperf run with both sides preloaded.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>

namespace {

std::string run(const std::string& command, int* status = nullptr) {
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return out;
  std::array<char, 4096> chunk;
  while (std::size_t n = fread(chunk.data(), 1, chunk.size(), pipe)) out.append(chunk.data(), n);
  int rc = pclose(pipe);
  if (status) *status = rc;
  return out;
}

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

bool have(const char* tool) { return std::system((std::string("command -v ") + tool + " >/dev/null").c_str()) == 0; }

int free_port() {
  std::random_device random;
  return 20000 + int(random() % 20000);
}

TEST(Preload, ExportsExactlyTheInterposedCalls) {
  int status = 0;
  std::string out = run("nm -D --defined-only '" + env("RXIO_PRELOAD") + "' | awk '{ print $3 }'", &status);
  ASSERT_EQ(status, 0) << out;
  std::set<std::string> exported;
  for (std::size_t at = 0, end; (end = out.find('\n', at)) != std::string::npos; at = end + 1)
    if (end > at) exported.insert(out.substr(at, end - at));
  const std::set<std::string> expected = {
      "__poll_chk", "__ppoll_chk", "__read_chk", "__recv_chk", "__recvfrom_chk", "accept", "accept4", "bind",
      "close", "connect", "dup", "dup2", "dup3", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_pwait",
      "epoll_wait", "execl", "execle", "execlp", "execv", "execve", "execvp", "execvpe", "fexecve", "fcntl",
      "fcntl64", "getsockopt", "ioctl", "listen", "poll", "ppoll", "pselect", "read",
      "readv", "recv", "recvfrom", "recvmsg", "select", "send", "sendfile", "sendfile64", "sendmsg", "sendto",
      "setsockopt", "shutdown", "socket", "write", "writev"};
  EXPECT_EQ(exported, expected);
  // Loaded into any program: the C library only, no C++ runtime.
  std::string libraries = run("ldd '" + env("RXIO_PRELOAD") + "'");
  EXPECT_EQ(libraries.find("libstdc++"), std::string::npos) << libraries;
}

TEST(Preload, Iperf3BothSidesPreloaded) {
  if (!have("iperf3")) GTEST_SKIP() << "iperf3 is not installed (scripts/install-deps.sh installs it)";
  const std::string rxio_run = env("RXIO_RUN");
  const int port = free_port();
  int status = 0;
  std::string out = run(rxio_run + " iperf3 -s -1 -p " + std::to_string(port) + " >/dev/null 2>&1 & sleep 1; " +
                            rxio_run + " iperf3 -c 127.0.0.1 -p " + std::to_string(port) +
                            " -t 1 -J; rc=$?; wait; exit $rc",
                        &status);
  ASSERT_EQ(status, 0) << out;
  // The client's report: bytes the server received.
  auto at = out.find("\"sum_received\"");
  ASSERT_NE(at, std::string::npos) << out;
  auto bytes_at = out.find("\"bytes\":", at);
  ASSERT_NE(bytes_at, std::string::npos);
  EXPECT_GT(std::stoull(out.substr(bytes_at + 8)), 1000000ull) << "iperf3 moved almost nothing";
}

TEST(Preload, SockperfPingPongBothSidesPreloaded) {
  if (!have("sockperf")) GTEST_SKIP() << "sockperf is not installed (scripts/install-deps.sh installs it)";
  const std::string rxio_run = env("RXIO_RUN");
  const int port = free_port();
  int status = 0;
  std::string out =
      run(rxio_run + " sockperf server --tcp -i 127.0.0.1 -p " + std::to_string(port) + " >/dev/null 2>&1 & pid=$!; " +
              "sleep 1; " + rxio_run + " sockperf ping-pong --tcp -i 127.0.0.1 -p " + std::to_string(port) +
              " -m 64 -t 1 --mps 2000000 2>&1; rc=$?; kill $pid; wait; exit $rc",
          &status);
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("# dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0"),
            std::string::npos)
      << out;
}

}  // namespace
