// What the apps tests share: real programs started under rxio-run or plainly, each in a
// process group of its own that the test always stops, and the statistics boards of
// those processes read through rxio-stat --json.
#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace rxio::apps {

using namespace std::chrono_literals;

// Which side of a connection runs under rxio-run.
enum class Shimmed { both, server, client };

std::string test_name(const testing::TestParamInfo<Shimmed>& info);
// For gtest's messages, in place of the enum's bytes.
void PrintTo(Shimmed shimmed, std::ostream* out);

std::string env(const char* name);
bool have(const std::string& program);
// Single-quoted for /bin/sh.
std::string quote(const std::string& text);

// Where moved connections go: "verbs" under RXIO_BACKEND=verbs, else "shm".
std::string expected_backend();

// The number between `before` and `after` in `text` (the first place where one stands
// there), or nullopt. Programs' progress lines share the prefixes of their results.
std::optional<double> number_between(const std::string& text, const std::string& before, const std::string& after);

// A TCP port nothing uses on either address family (iperf3 listens on ::).
int free_port();

// A shell command in a process group of its own; stdout and stderr go to a file. It runs
// as `exec COMMAND`, and rxio-run execs too, so that pid() is the program's own pid: the
// name of its statistics board.
class Process {
 public:
  Process(const std::string& command, std::string output_path, bool stdin_pipe = false);
  // Stops whatever of the group still runs, so that a failed test leaves nothing behind.
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const noexcept { return pid_; }
  bool running();
  // The status as waitpid gives it; nullopt when it still runs after `timeout`.
  std::optional<int> wait(std::chrono::milliseconds timeout);
  // SIGTERM to the group, SIGKILL when the program lingers past 5 s; reaps it. False
  // when SIGTERM did not end it.
  bool stop();
  // SIGSTOP and SIGCONT to the group: holds a program where it is, its connections open.
  void pause();
  void resume();
  // SIGKILL to the group, as a crash would end it; reaps it.
  void kill();
  // EOF on stdin: how a test lets a client that holds its connections open go on.
  void close_stdin();
  std::string output() const;

 private:
  void record_where_it_waits() const;

  pid_t pid_ = -1;
  int stdin_ = -1;
  std::string output_path_;
  std::optional<int> status_;
};

struct Result {
  bool exited_0 = false;
  std::string output;
};

// One process's board, flattened: "moved.shm", "fallbacks.no_peer_shim",
// "connections.shm" (open connections on shm), "connections.shm.bytes_sent", ...
struct Board {
  std::map<std::string, uint64_t> values;
  std::string json;  // as rxio-stat printed it, for failure messages
  uint64_t operator[](const std::string& key) const;
};

// A test of one program in the three pairings of Shimmed, with a temporary RXIO_STAT_DIR
// of its own that the programs and rxio-stat share.
// How much slower this machine runs the programs than a plain one: RXIO_APPS_TIME_SCALE
// (default 1; the Soft-RoCE guest runs under TCG). Waits and run times grow by it.
int time_scale();

class AppTest : public testing::TestWithParam<Shimmed> {
 protected:
  // Skipped when one of `programs` is not installed.
  explicit AppTest(std::vector<std::string> programs) : programs_(std::move(programs)) {}
  void SetUp() override;
  void TearDown() override;

  bool server_shimmed() const { return GetParam() != Shimmed::client; }
  bool client_shimmed() const { return GetParam() != Shimmed::server; }
  // The command line prefix that starts a program under the shim, or none.
  std::string server_prefix() const;
  std::string client_prefix() const;
  static const std::string& python();

  // The test's directory, and a file in it.
  const std::string& dir() const { return dir_; }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  Process start(const std::string& command, bool stdin_pipe = false);
  // Runs `command` to its end (stopped after `timeout`).
  Result run(const std::string& command, std::chrono::seconds timeout = 30s);
  // Waits for `process` to end (stopped after `timeout`).
  Result finish(Process& process, std::chrono::seconds timeout = 30s);
  // Waits until the server listens on `port` and, when it runs under the shim, until the
  // shim also listens for negotiations on it (just after the kernel listener). It probes
  // without connecting: a plain connection would count on the server's board.
  testing::AssertionResult wait_listening(Process& server, int port);

  // The board of `pid` once `done` holds for it, or the last one read after `timeout`;
  // nullopt when the process has none.
  std::optional<Board> board_when(pid_t pid, const std::function<bool(const Board&)>& done,
                                  std::chrono::milliseconds timeout = 5s);
  // While `client` has its connection to `server` open: each shimmed side's board says
  // where the connection went (moved with both shimmed; otherwise on TCP, which a
  // shimmed client counts for want of a shimmed peer).
  void expect_backends(Process& server, Process& client);
  // The server's board after all the clients of the test: with both sides shimmed, at
  // least `connections` moved and none stayed on TCP for want of a shimmed peer; with
  // plain clients, none moved.
  void expect_server_totals(Process& server, uint64_t connections);

 private:
  void expect_side(pid_t pid, const std::string& side);

  std::vector<std::string> programs_;
  std::string dir_;
  int files_ = 0;
};

}  // namespace rxio::apps
