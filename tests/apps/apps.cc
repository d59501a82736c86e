#include "apps.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/klog.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

namespace rxio::apps {

namespace {

using Clock = std::chrono::steady_clock;

bool listed(const char* table, const std::function<bool(std::istringstream&)>& match) {
  std::ifstream file(table);
  std::string line;
  std::getline(file, line);  // the heading
  while (std::getline(file, line)) {
    std::istringstream fields(line);
    if (match(fields)) return true;
  }
  return false;
}

// A kernel TCP listener on `port` (either family).
bool tcp_listening(int port) {
  auto match = [port](std::istringstream& fields) {
    std::string slot, local, remote, state;
    fields >> slot >> local >> remote >> state;
    auto colon = local.rfind(':');
    return state == "0A" && colon != std::string::npos && std::stoi(local.substr(colon + 1), nullptr, 16) == port;
  };
  return listed("/proc/net/tcp", match) || listed("/proc/net/tcp6", match);
}

// The shim's negotiation endpoint for `port`: the abstract unix socket "rxio-shim.PORT".
bool shim_listening(int port) {
  const std::string name = "@rxio-shim." + std::to_string(port);
  return listed("/proc/net/unix", [&name](std::istringstream& fields) {
    std::string field, last;
    while (fields >> field) last = field;
    return last == name;
  });
}

}  // namespace

std::string test_name(const testing::TestParamInfo<Shimmed>& info) {
  switch (info.param) {
    case Shimmed::both: return "BothSidesShimmed";
    case Shimmed::server: return "OnlyServerShimmed";
    case Shimmed::client: return "OnlyClientShimmed";
  }
  return "Unknown";
}

void PrintTo(Shimmed shimmed, std::ostream* out) { *out << test_name({shimmed, 0}); }

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

bool have(const std::string& program) {
  return std::system(("command -v " + quote(program) + " >/dev/null").c_str()) == 0;
}

std::string quote(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

int free_port() {
  std::random_device random;
  for (;;) {
    // Below the kernel's ephemeral range, so that no client connection takes it meanwhile.
    const int port = 20000 + int(random() % 12000);
    int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int v6only = 0;
    ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only);
    sockaddr_in6 address{};
    address.sin6_family = AF_INET6;
    address.sin6_addr = in6addr_any;
    address.sin6_port = htons(uint16_t(port));
    const bool free = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0;
    ::close(fd);
    if (free) return port;
  }
}

// ---- Process ---------------------------------------------------------------------------

Process::Process(const std::string& command, std::string output_path, bool stdin_pipe)
    : output_path_(std::move(output_path)) {
  int out = ::open(output_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  int in[2] = {-1, -1};
  if (stdin_pipe) {
    if (::pipe2(in, O_CLOEXEC) != 0) in[0] = in[1] = -1;
  } else {
    in[0] = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  }
  if (out < 0 || in[0] < 0) {
    ADD_FAILURE() << "cannot set up the files of: " << command;
    for (int fd : {out, in[0], in[1]})
      if (fd >= 0) ::close(fd);
    return;
  }
  const std::string line = "exec " + command;
  pid_ = ::fork();
  if (pid_ == 0) {
    ::setpgid(0, 0);
    ::dup2(in[0], 0);
    ::dup2(out, 1);
    ::dup2(out, 2);
    ::execl("/bin/sh", "sh", "-c", line.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  if (pid_ < 0) ADD_FAILURE() << "fork failed for: " << command;
  else ::setpgid(pid_, pid_);  // also here: whichever of the two runs first
  ::close(out);
  ::close(in[0]);
  stdin_ = in[1];
}

Process::~Process() { stop(); }

bool Process::running() { return pid_ > 0 && !wait(0ms); }

std::optional<int> Process::wait(std::chrono::milliseconds timeout) {
  if (status_ || pid_ <= 0) return status_;
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    int status = 0;
    pid_t got = ::waitpid(pid_, &status, WNOHANG);
    if (got == pid_ || (got < 0 && errno != EINTR)) {
      status_ = got == pid_ ? status : -1;
      return status_;
    }
    if (Clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(10ms);
  }
}

// Appended to the output: where each of the program's threads waits, as the kernel
// sees it (the stack needs root, which the guest has), to tell a program that ignored
// SIGTERM from a teardown stuck in the kernel; then the end of the kernel's log.
void Process::record_where_it_waits() const {
  std::ofstream out(output_path_, std::ios::app);
  out << "\n[tests] pid " << pid_ << " still runs after SIGTERM:\n";
  std::error_code error;
  for (const auto& task : std::filesystem::directory_iterator("/proc/" + std::to_string(pid_) + "/task", error)) {
    for (const char* name : {"stat", "wchan", "stack"}) {
      std::ifstream file(task.path() / name);
      std::string text(std::istreambuf_iterator<char>(file), {});
      out << "[tests] " << task.path().filename().string() << "/" << name << ": " << text << "\n";
    }
  }
  // The kernel's own complaints (a Soft-RoCE object still referenced, say) end the story.
  constexpr int kReadAll = 3;  // SYSLOG_ACTION_READ_ALL, which no user header names
  std::string log(1 << 16, '\0');
  int length = ::klogctl(kReadAll, log.data(), static_cast<int>(log.size()));
  if (length > 0) {
    log.resize(static_cast<std::size_t>(length));
    out << "[tests] the kernel's log, its end:\n" << log.substr(log.size() - std::min<std::size_t>(log.size(), 4096));
  }
}

bool Process::stop() {
  if (pid_ <= 0) return true;
  close_stdin();
  bool ended = true;
  if (!status_) {
    ::kill(-pid_, SIGTERM);
    // Under TCG the kernel's teardown of a process's queue pairs alone can take seconds.
    if (!wait(5s * time_scale())) {
      ended = false;
      record_where_it_waits();
      ::kill(-pid_, SIGKILL);
      wait(10s);
    }
  }
  // Whatever the program started in its group goes too.
  ::kill(-pid_, SIGKILL);
  return ended;
}

void Process::pause() {
  if (pid_ > 0 && !status_) ::kill(-pid_, SIGSTOP);
}

void Process::resume() {
  if (pid_ > 0 && !status_) ::kill(-pid_, SIGCONT);
}

void Process::kill() {
  if (pid_ <= 0 || status_) return;
  ::kill(-pid_, SIGKILL);
  wait(10s);
}

void Process::close_stdin() {
  if (stdin_ >= 0) ::close(stdin_);
  stdin_ = -1;
}

std::string Process::output() const {
  std::ifstream file(output_path_, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

// ---- Board -----------------------------------------------------------------------------

uint64_t Board::operator[](const std::string& key) const {
  auto it = values.find(key);
  return it == values.end() ? 0 : it->second;
}

// ---- AppTest ---------------------------------------------------------------------------

void AppTest::SetUp() {
  for (const std::string& program : programs_)
    if (!have(program)) GTEST_SKIP() << program << " is not installed (scripts/install-deps.sh installs it)";
  ASSERT_FALSE(env("RXIO_RUN").empty() || env("RXIO_STAT").empty()) << "RXIO_RUN and RXIO_STAT must be set";
  // Boards are shared memory: /dev/shm where there is one (in the Soft-RoCE guest the
  // temporary directory is the host's, over 9p, where they cannot be mapped).
  const std::filesystem::path base =
      std::filesystem::is_directory("/dev/shm") ? std::filesystem::path("/dev/shm") : std::filesystem::temp_directory_path();
  std::string pattern = (base / "rxio-apps.XXXXXX").string();
  ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
  dir_ = pattern;
  // Inherited by every program the test starts, and by rxio-stat.
  ::setenv("RXIO_STAT_DIR", dir_.c_str(), 1);
  // Every connection moves at its first call, so that the programs' short
  // connections (redis-cli's) run moved too; a test of the default says so.
  ::setenv("RXIO_SHIM_MOVE_AFTER", "1", 1);
  // A loaded machine (two cores, a guest under TCG) may take more than the default
  // second to answer a move; the tests check where connections go, not how fast.
  ::setenv("RXIO_SHIM_TIMEOUT_MS", "10000", 1);
}

void AppTest::TearDown() {
  ::unsetenv("RXIO_STAT_DIR");
  ::unsetenv("RXIO_SHIM_MOVE_AFTER");
  ::unsetenv("RXIO_SHIM_TIMEOUT_MS");
  if (!dir_.empty()) std::filesystem::remove_all(dir_);
}

const std::string& AppTest::python() {
  static const std::string interpreter = [] {
    // The interpreter itself rather than a launcher script in front of it (pyenv's), so
    // that a client started as `rxio-run python3` is the process with the board.
    std::string out;
    FILE* pipe = ::popen("python3 -c 'import sys; print(sys.executable)'", "r");
    if (!pipe) return std::string("python3");
    char chunk[4096];
    while (std::size_t n = std::fread(chunk, 1, sizeof chunk, pipe)) out.append(chunk, n);
    ::pclose(pipe);
    while (!out.empty() && out.back() == '\n') out.pop_back();
    return out.empty() ? std::string("python3") : out;
  }();
  return interpreter;
}

std::string AppTest::server_prefix() const { return server_shimmed() ? quote(env("RXIO_RUN")) + " " : ""; }

std::string AppTest::client_prefix() const { return client_shimmed() ? quote(env("RXIO_RUN")) + " " : ""; }

Process AppTest::start(const std::string& command, bool stdin_pipe) {
  return Process(command, path("output." + std::to_string(++files_)), stdin_pipe);
}

Result AppTest::run(const std::string& command, std::chrono::seconds timeout) {
  Process process = start(command);
  return finish(process, timeout);
}

int time_scale() {
  static const int scale = [] {
    int value = std::atoi(env("RXIO_APPS_TIME_SCALE").c_str());
    return std::clamp(value, 1, 100);
  }();
  return scale;
}

Result AppTest::finish(Process& process, std::chrono::seconds timeout) {
  timeout *= time_scale();
  auto status = process.wait(timeout);
  if (!status) process.stop();
  Result result;
  result.output = process.output();
  if (!status) result.output += "\n[stopped after " + std::to_string(timeout.count()) + " s]";
  result.exited_0 = status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0;
  return result;
}

testing::AssertionResult AppTest::wait_listening(Process& server, int port) {
  const auto deadline = Clock::now() + 5s * time_scale();
  bool tcp = false, shim = false;
  while (Clock::now() < deadline && server.running()) {
    tcp = tcp_listening(port);
    shim = shim_listening(port);
    if (tcp && (shim || !server_shimmed())) return testing::AssertionSuccess();
    std::this_thread::sleep_for(20ms);
  }
  return testing::AssertionFailure() << "the server " << (server.running() ? "runs" : "ended") << ", "
                                     << (tcp ? "listens" : "does not listen") << " on port " << port << ", "
                                     << (shim ? "with" : "without") << " the shim's negotiation endpoint:\n"
                                     << server.output();
}

namespace {

// rxio-stat's JSON for one process, flattened: "moved.shm", "fallbacks.timeout",
// "returned.link_failed",
// "connections.verbs" (the number open), "connections.verbs.bytes_sent", ... Parsed here
// rather than by a python run, which under TCG takes longer than some clients live.
std::optional<Board> flatten(const std::string& output) {
  const nlohmann::json all = nlohmann::json::parse(output, nullptr, false);
  try {
    const nlohmann::json& processes = all.at("processes");
    if (processes.size() != 1) return std::nullopt;
    const nlohmann::json& process = processes[0];
    Board board;
    board.json = process.dump();
    board.values["pid"] = process.at("pid").get<uint64_t>();
    for (const char* group : {"moved", "fallbacks", "returned"})
      for (const auto& [key, value] : process.at(group).items())
        board.values[std::string(group) + "." + key] = value.get<uint64_t>();
    for (const nlohmann::json& connection : process.at("connections")) {
      const std::string name = "connections." + connection.at("backend").get<std::string>();
      board.values[name] += 1;
      board.values[name + ".bytes_sent"] += connection.at("bytes_sent").get<uint64_t>();
      board.values[name + ".bytes_received"] += connection.at("bytes_received").get<uint64_t>();
    }
    return board;
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;  // not JSON, or not shaped as rxio-stat --help says
  }
}

}  // namespace

std::optional<Board> AppTest::board_when(pid_t pid, const std::function<bool(const Board&)>& done,
                                         std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout * time_scale();
  std::optional<Board> last;
  for (;;) {
    Result read = run(quote(env("RXIO_STAT")) + " --json -p " + std::to_string(pid), 10s);
    if (read.exited_0) {
      std::optional<Board> board = flatten(read.output);
      EXPECT_TRUE(board) << "rxio-stat --json printed what is not one process's board:\n" << read.output;
      if (board && (*board)["pid"] == uint64_t(pid)) {
        last = std::move(board);
        if (done(*last)) return last;
      }
    }
    if (Clock::now() >= deadline) return last;
    std::this_thread::sleep_for(50ms);
  }
}

std::optional<double> number_between(const std::string& text, const std::string& before, const std::string& after) {
  for (std::size_t at = text.find(before); at != std::string::npos; at = text.find(before, at + 1)) {
    const char* start = text.c_str() + at + before.size();
    char* end = nullptr;
    double value = std::strtod(start, &end);
    if (end != start && text.compare(static_cast<std::size_t>(end - text.c_str()), after.size(), after) == 0)
      return value;
  }
  return std::nullopt;
}

std::string expected_backend() {
  // RXIO_BACKEND=verbs: the programs' links are RDMA queue pairs (the rxe tier).
  return env("RXIO_BACKEND") == "verbs" ? "verbs" : "shm";
}

void AppTest::expect_side(pid_t pid, const std::string& side) {
  const bool moved = GetParam() == Shimmed::both;
  // A shimmed client finds no shim to move to; a shimmed server is never asked.
  const bool counts_fallback = !moved && side == "client";
  const std::string backend = expected_backend();
  auto board = board_when(pid, [&](const Board& b) {
    return moved ? b["connections." + backend] >= 1 && b["connections." + backend + ".bytes_sent"] > 0 &&
                       b["connections." + backend + ".bytes_received"] > 0
                 : !counts_fallback || b["fallbacks.no_peer_shim"] >= 1;
  });
  ASSERT_TRUE(board) << "the " << side << " (pid " << pid << ") has no statistics board";
  if (moved) {
    // Open, on the expected backend, and the program's bytes go through it.
    EXPECT_GE((*board)["moved." + backend], 1u) << side << ": " << board->json;
    EXPECT_GE((*board)["connections." + backend], 1u) << side << ": " << board->json;
    EXPECT_GT((*board)["connections." + backend + ".bytes_sent"], 0u) << side << ": " << board->json;
    EXPECT_GT((*board)["connections." + backend + ".bytes_received"], 0u) << side << ": " << board->json;
    EXPECT_EQ((*board)["fallbacks.no_peer_shim"], 0u) << side << ": " << board->json;
  } else {
    if (counts_fallback) {
      EXPECT_GE((*board)["fallbacks.no_peer_shim"], 1u) << side << ": " << board->json;
    }
    EXPECT_EQ((*board)["moved." + backend], 0u) << side << ": " << board->json;
    EXPECT_EQ((*board)["connections." + backend], 0u) << side << ": " << board->json;
  }
}

void AppTest::expect_backends(Process& server, Process& client) {
  // The client first, then held (stopped) while the server's board is read: a client
  // that ends by itself (after its run time) must not end between the two reads,
  // however slowly a guest under TCG reads them.
  if (client_shimmed()) expect_side(client.pid(), "client");
  EXPECT_TRUE(client.running()) << "the client ended before its connection could be seen:\n" << client.output();
  client.pause();
  if (server_shimmed()) expect_side(server.pid(), "server");
  client.resume();
}

void AppTest::expect_server_totals(Process& server, uint64_t connections) {
  if (!server_shimmed()) return;
  const std::string moved = "moved." + expected_backend();
  if (GetParam() == Shimmed::server) {
    // Plain clients: nothing moved, and nothing asked to.
    auto board = board_when(server.pid(), [](const Board&) { return true; });
    ASSERT_TRUE(board) << "the server (pid " << server.pid() << ") has no statistics board";
    EXPECT_EQ((*board)[moved], 0u) << board->json;
    return;
  }
  auto board = board_when(server.pid(), [&](const Board& b) { return b[moved] >= connections; });
  ASSERT_TRUE(board) << "the server (pid " << server.pid() << ") has no statistics board";
  EXPECT_GE((*board)[moved], connections) << board->json;
  EXPECT_EQ((*board)["fallbacks.no_peer_shim"], 0u) << board->json;
}

}  // namespace rxio::apps
