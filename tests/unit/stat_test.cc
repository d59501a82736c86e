#include "shim/stat.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"

namespace rxio::shim {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

sockaddr_in v4(const char* address, uint16_t port) {
  sockaddr_in out{};
  out.sin_family = AF_INET;
  out.sin_port = htons(port);
  inet_pton(AF_INET, address, &out.sin_addr);
  return out;
}

sockaddr_in6 v6(const char* address, uint16_t port) {
  sockaddr_in6 out{};
  out.sin6_family = AF_INET6;
  out.sin6_port = htons(port);
  inet_pton(AF_INET6, address, &out.sin6_addr);
  return out;
}

const sockaddr* as_sockaddr(const void* address) { return static_cast<const sockaddr*>(address); }

// Output and exit status of a shell command.
std::string run(const std::string& command, int* status) {
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return out;
  std::array<char, 4096> chunk;
  while (std::size_t n = fread(chunk.data(), 1, chunk.size(), pipe)) out.append(chunk.data(), n);
  *status = pclose(pipe);
  return out;
}

// Each test gets its own RXIO_STAT_DIR, removed afterwards.
class StatBoardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/rxio-stat-test-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    if (const char* old = getenv("RXIO_STAT_DIR")) old_dir_ = old;
    setenv("RXIO_STAT_DIR", dir_.c_str(), 1);
  }
  void TearDown() override {
    if (old_dir_) setenv("RXIO_STAT_DIR", old_dir_->c_str(), 1);
    else unsetenv("RXIO_STAT_DIR");
    std::filesystem::remove_all(dir_);
  }

  // rxio-stat with `arguments`, reading this test's directory.
  std::string stat_tool(const std::string& arguments, int* status) {
    const char* tool = getenv("RXIO_STAT_TOOL");
    return run("RXIO_STAT_DIR='" + dir_ + "' '" + (tool ? tool : "") + "' " + arguments + " 2>&1", status);
  }
  static bool have_tool() { return getenv("RXIO_STAT_TOOL") != nullptr; }

  std::string dir_;
  std::optional<std::string> old_dir_;
};

TEST(StatNames, EveryValueHasAName) {
  for (std::size_t r = 0; r < kFallbacks; ++r) EXPECT_STRNE(to_string(Fallback(r)), "?");
  EXPECT_STREQ(to_string(Fallback::no_peer_shim), "no_peer_shim");
  EXPECT_STREQ(to_string(Fallback::count_), "?");
  EXPECT_STREQ(to_string(Backend::verbs), "verbs");
  EXPECT_STREQ(to_string(ConnState::established), "established");
}

TEST_F(StatBoardTest, CreatesAndRemovesItsFile) {
  std::string path;
  {
    StatBoard board("stat-test");
    path = board.path();
    EXPECT_EQ(path, board_path(dir_, getpid()));
    struct stat st{};
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0644u);
    EXPECT_EQ(std::size_t(st.st_size), sizeof(StatFile));

    StatBoardView view(path);
    EXPECT_EQ(view.header().pid, getpid());
    EXPECT_EQ(view.command(), "stat-test");
    EXPECT_TRUE(view.owner_alive());
    EXPECT_TRUE(view.ours());

    StatBoard moved(std::move(board));
    EXPECT_EQ(access(path.c_str(), F_OK), 0);
  }
  EXPECT_NE(access(path.c_str(), F_OK), 0) << path << " outlived its board";
}

TEST_F(StatBoardTest, ReplacesAStaleFileAndRejectsForeignOnes) {
  const std::string path = board_path(dir_, getpid());
  FILE* stale = fopen(path.c_str(), "w");
  ASSERT_NE(stale, nullptr);
  fputs("left by a dead process with this pid", stale);
  fclose(stale);
  EXPECT_THROW(StatBoardView{path}, Error);
  StatBoard board("stat-test");
  EXPECT_NO_THROW(StatBoardView{path});
}

TEST_F(StatBoardTest, UnwritableDirectoryIsAnError) {
  setenv("RXIO_STAT_DIR", (dir_ + "/missing").c_str(), 1);
  try {
    StatBoard board("stat-test");
    ADD_FAILURE() << "a board in a missing directory";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("RXIO_STAT_DIR"));
  }
}

TEST_F(StatBoardTest, RecordsAreClaimedWithoutLocksFromSeveralThreads) {
  StatBoard board("stat-test");
  constexpr int kThreads = 4, kRounds = 2000;
  std::vector<std::thread> threads;
  std::vector<int> clashes(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&board, &clashes, t] {
      const sockaddr_in local = v4("127.0.0.1", 40000), peer = v4("127.0.0.1", 6379);
      for (int round = 0; round < kRounds; ++round) {
        // The same fds in every thread: they all start at the same record.
        StatRecord* records[8];
        for (int i = 0; i < 8; ++i) {
          records[i] = board.open(100 + i, as_sockaddr(&local), as_sockaddr(&peer), Backend::shm,
                                  ConnState::established, false);
          if (!records[i]) continue;
          records[i]->fd = t * 1000 + i;  // a record is this thread's alone until closed
        }
        for (int i = 0; i < 8; ++i) {
          if (records[i] && records[i]->fd != t * 1000 + i) ++clashes[t];
          board.close(records[i]);
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(clashes[t], 0) << "thread " << t;
  const StatBoardView view(board.path());
  for (const StatRecord& record : view.records()) EXPECT_EQ(record.in_use.load(), kRecordFree);
}

TEST_F(StatBoardTest, FullBoardCountsTheUnlisted) {
  StatBoard board("stat-test");
  const sockaddr_in peer = v4("10.0.0.1", 80);
  std::vector<StatRecord*> records;
  for (uint32_t i = 0; i < kStatRecords; ++i) {
    records.push_back(board.open(int(i), nullptr, as_sockaddr(&peer), Backend::tcp, ConnState::negotiating, false));
    ASSERT_NE(records.back(), nullptr);
  }
  EXPECT_EQ(board.open(7, nullptr, as_sockaddr(&peer), Backend::tcp, ConnState::negotiating, false), nullptr);
  EXPECT_EQ(StatBoardView(board.path()).header().unlisted.load(), 1u);
  board.close(records[7]);
  EXPECT_EQ(board.open(7, nullptr, as_sockaddr(&peer), Backend::tcp, ConnState::negotiating, false), records[7]);
  board.close(nullptr);  // what open() returned for a connection it could not list
}

TEST_F(StatBoardTest, RxioStatListsRecordsAndCounters) {
  if (!have_tool()) GTEST_SKIP() << "RXIO_STAT_TOOL is not set (meson test sets it)";
  StatBoard board("stat-test");
  const sockaddr_in local = v4("10.0.0.2", 41000), peer = v4("10.0.0.1", 6379);
  const sockaddr_in6 local6 = v6("fd00::2", 42000), peer6 = v6("fd00::1", 22);
  StatRecord* moved = board.open(5, as_sockaddr(&local), as_sockaddr(&peer), Backend::verbs, ConnState::established, false);
  ASSERT_NE(moved, nullptr);
  moved->bytes_sent.fetch_add(1234, std::memory_order_relaxed);
  moved->bytes_received.fetch_add(99, std::memory_order_relaxed);
  ASSERT_NE(board.open(6, as_sockaddr(&local6), as_sockaddr(&peer6), Backend::tcp, ConnState::established, true),
            nullptr);
  board.count(Fallback::no_peer_shim);
  board.count(Fallback::no_peer_shim);
  board.count(Fallback::policy);
  board.count_moved(Backend::verbs);
  board.count_returned(Return::peer);

  int status = 0;
  const std::string pid = std::to_string(getpid());
  std::string json = stat_tool("--json -p " + pid, &status);
  ASSERT_EQ(status, 0) << json;
  EXPECT_THAT(json, HasSubstr("\"pid\": " + pid + ", \"command\": \"stat-test\""));
  EXPECT_THAT(json, HasSubstr("{\"fd\": 5, \"local\": \"10.0.0.2:41000\", \"peer\": \"10.0.0.1:6379\", "
                              "\"backend\": \"verbs\", \"state\": \"established\", \"role\": \"client\", "
                              "\"bytes_sent\": 1234, \"bytes_received\": 99}"));
  EXPECT_THAT(json, HasSubstr("\"peer\": \"[fd00::1]:22\", \"backend\": \"tcp\""));
  EXPECT_THAT(json, HasSubstr("\"policy\": 1, \"no_peer_shim\": 2,"));
  EXPECT_THAT(json, HasSubstr("\"moved\": {\"tcp\": 0, \"shm\": 0, \"verbs\": 1}"));
  EXPECT_THAT(json, HasSubstr("\"returned\": {\"link_failed\": 0, \"peer\": 1, \"fork\": 0, \"exec\": 0}"));
  if (system("command -v python3 >/dev/null") == 0) {
    std::string checked = stat_tool(
        "--json | python3 -c 'import json, sys; p = json.load(sys.stdin)[\"processes\"]; "
        "print(sum(len(x[\"connections\"]) for x in p if x[\"pid\"] == " + pid + "))'",
        &status);
    EXPECT_EQ(status, 0) << checked;
    EXPECT_EQ(checked, "2\n");
  }

  // The table: the tcp connection only with -a.
  std::string table = stat_tool("-p " + pid, &status);
  ASSERT_EQ(status, 0) << table;
  EXPECT_THAT(table, HasSubstr("BACKEND"));
  EXPECT_THAT(table, HasSubstr("10.0.0.1:6379"));
  EXPECT_THAT(table, Not(HasSubstr("[fd00::1]:22")));
  table = stat_tool("-a -p " + pid, &status);
  EXPECT_THAT(table, HasSubstr("[fd00::1]:22"));
  EXPECT_THAT(table, HasSubstr("server"));

  std::string counters = stat_tool("-f", &status);
  ASSERT_EQ(status, 0) << counters;
  EXPECT_THAT(counters, HasSubstr("fallback:no_peer_shim"));
  EXPECT_THAT(counters, HasSubstr("moved:verbs"));
  EXPECT_THAT(counters, HasSubstr("returned:peer"));
  EXPECT_THAT(counters, HasSubstr("total"));
}

TEST_F(StatBoardTest, RxioStatSkipsDeadProcessesAndRefusesBadOptions) {
  if (!have_tool()) GTEST_SKIP() << "RXIO_STAT_TOOL is not set (meson test sets it)";
  // A board whose process has exited without removing it.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    new StatBoard("dead");  // never destroyed, as by a crash
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  const std::string stale = board_path(dir_, child);
  ASSERT_EQ(access(stale.c_str(), F_OK), 0);
  std::string json = stat_tool("--json", &status);
  EXPECT_EQ(status, 0) << json;
  EXPECT_THAT(json, Not(HasSubstr("\"dead\"")));
  stat_tool("--clean", &status);
  EXPECT_EQ(status, 0);
  EXPECT_NE(access(stale.c_str(), F_OK), 0) << "--clean left " << stale;

  std::string out = stat_tool("--no-such-option", &status);
  EXPECT_EQ(WEXITSTATUS(status), 1);
  EXPECT_THAT(out, HasSubstr("--help"));
  out = stat_tool("-p abc", &status);
  EXPECT_EQ(WEXITSTATUS(status), 1);
  EXPECT_THAT(out, HasSubstr("'abc'"));
  out = stat_tool("-p " + std::to_string(child), &status);
  EXPECT_EQ(WEXITSTATUS(status), 1);
  EXPECT_THAT(out, HasSubstr("no board"));
}

}  // namespace
}  // namespace rxio::shim
