// redis under the shim: values of every size (1 MiB of random bytes among them), a
// counter, and redis-benchmark's fifty connections at once; the same through links
// that fail; and snapshots (fork) while clients come and go.
#include <fstream>
#include <random>

#include "apps.h"

namespace rxio::apps {
namespace {

class Redis : public AppTest {
 protected:
  Redis() : AppTest({"redis-server", "redis-cli", "redis-benchmark"}) {}
  // Runs it all against a server started with `server_env`; `board` gets the server's
  // counters once every connection is counted (none when the server is plain).
  void stores_and_benchmarks(const std::string& server_env, std::optional<Board>* board = nullptr);
};

void Redis::stores_and_benchmarks(const std::string& server_env, std::optional<Board>* board) {
  const std::string port = std::to_string(free_port());
  Process server = start("env " + server_env + " " + server_prefix() + "redis-server --port " + port +
                         " --save '' --appendonly no --bind 127.0.0.1");
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  const std::string cli = client_prefix() + "redis-cli -p " + port;
  uint64_t connections = 0;  // each redis-cli makes one
  auto redis = [&](const std::string& arguments) {
    ++connections;
    return run(cli + " " + arguments);
  };

  // A client that stays connected for two seconds (times the scale), long enough to be
  // seen on the boards.
  const std::string increments = std::to_string(20 * time_scale());
  Process slow = start(cli + " -r " + increments + " -i 0.1 incr slow");
  ++connections;
  expect_backends(server, slow);
  Result counted = finish(slow);
  EXPECT_TRUE(counted.exited_0 && counted.output.ends_with("\n" + increments + "\n")) << counted.output;

  const std::vector<std::string> values = {"1", "hello world", std::string(1400, 'x'), std::string(70000, 'y')};
  for (std::size_t i = 0; i < values.size(); ++i) {
    Result set = redis("set key" + std::to_string(i) + " " + quote(values[i]));
    EXPECT_TRUE(set.exited_0 && set.output == "OK\n") << set.output.substr(0, 200);
  }
  Result mget = redis("mget key0 key1 key2 key3");
  EXPECT_TRUE(mget.exited_0);
  EXPECT_TRUE(mget.output == values[0] + "\n" + values[1] + "\n" + values[2] + "\n" + values[3] + "\n")
      << mget.output.substr(0, 200);

  // Binary, with NULs and newlines: redis-cli -x sends stdin as it is, and --raw prints
  // the value as it is, then a newline.
  std::string big(1 << 20, '\0');
  std::mt19937 random{std::random_device{}()};
  for (char& c : big) c = static_cast<char>(random());
  std::ofstream(path("big"), std::ios::binary) << big;
  Result set = redis("-x set big < " + quote(path("big")));
  EXPECT_TRUE(set.exited_0 && set.output == "OK\n") << set.output.substr(0, 200);
  Result get = redis("--raw get big");
  EXPECT_TRUE(get.exited_0);
  EXPECT_EQ(get.output.size(), big.size() + 1);
  EXPECT_TRUE(get.output == big + "\n") << "the 1 MiB value came back changed";

  for (int i = 1; i <= 10; ++i) {
    Result incr = redis("incr counter");
    EXPECT_TRUE(incr.exited_0 && incr.output == std::to_string(i) + "\n") << incr.output;
  }

  Result bench = run(client_prefix() + "redis-benchmark -p " + port + " -t get,set -n 20000 -q", 60s);
  connections += 50;  // its default number of clients
  EXPECT_TRUE(bench.exited_0) << bench.output;
  for (const char* test : {"SET", "GET"}) {
    auto rate = number_between(bench.output, std::string(test) + ": ", " requests per second");
    ASSERT_TRUE(rate) << bench.output;
    EXPECT_GT(*rate, 0) << bench.output;
  }

  expect_server_totals(server, connections);
  if (board && server_shimmed()) *board = board_when(server.pid(), [](const Board&) { return true; });
  EXPECT_TRUE(server.stop()) << "redis-server did not end on SIGTERM:\n" << server.output();
}

TEST_P(Redis, StoresAndBenchmarks) { stores_and_benchmarks(""); }

// Every link of the server fails itself after 200 ring slots (RXIO_FAULT_LINK_AFTER):
// the connections on it go back to TCP mid-stream, later ones move on new links, and
// every reply is still right. Those that went back stay there (the server refuses to
// move them again): each move again onto a link this short-lived would risk the
// window in which a failed link resets the connection (docs/shim.md).
class RedisFaults : public Redis {};

TEST_P(RedisFaults, StoresThroughFailedLinks) {
  std::optional<Board> board;
  stores_and_benchmarks("RXIO_FAULT_LINK_AFTER=200 RXIO_SHIM_MOVE_AGAIN=0", &board);
  ASSERT_TRUE(board);
  EXPECT_GE((*board)["returned.link_failed"] + (*board)["returned.peer"], 1u) << board->json;
}

// BGSAVE forks a child that holds every connection's socket while it writes the
// snapshot (slowly: rdb-key-save-delay). A connection that moved before the fork and
// ends while the child lives is handed over to TCP when redis closes it; connections
// made meanwhile move as usual; every reply is right.
TEST_P(Redis, SnapshotsWhileClientsComeAndGo) {
  const std::string port = std::to_string(free_port());
  Process server = start(server_prefix() + "redis-server --port " + port + " --save '' --appendonly no" +
                         " --bind 127.0.0.1 --dir " + quote(path("")) + " --rdb-key-save-delay 4000");
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  const std::string cli = client_prefix() + "redis-cli -p " + port;
  // About a thousand keys: the snapshot takes about four seconds.
  Result fill = run(client_prefix() + "redis-benchmark -p " + port + " -t set -n 1000 -r 100000000 -c 4 -q", 60s);
  ASSERT_TRUE(fill.exited_0) << fill.output;

  Process slow = start(cli + " -r 15 -i 0.1 incr slow");
  expect_backends(server, slow);
  Result save = run(cli + " bgsave");
  EXPECT_TRUE(save.exited_0 && save.output == "Background saving started\n") << save.output;
  Result counted = finish(slow);
  EXPECT_TRUE(counted.exited_0 && counted.output.ends_with("\n15\n")) << counted.output;

  const std::string value(70000, 'v');
  for (int i = 0; i < 5; ++i) {
    Result set = run(cli + " set during" + std::to_string(i) + " " + value);
    EXPECT_TRUE(set.exited_0 && set.output == "OK\n") << set.output;
    Result get = run(cli + " get during" + std::to_string(i));
    EXPECT_TRUE(get.exited_0 && get.output == value + "\n") << get.output.substr(0, 200);
  }
  // The snapshot ends well, and the slow client's counter is in the data set.
  bool saved = false;
  for (int i = 0; i < 60 * time_scale() && !saved; ++i) {
    Result info = run(cli + " info persistence");
    saved = info.output.find("rdb_bgsave_in_progress:0") != std::string::npos &&
            info.output.find("rdb_last_bgsave_status:ok") != std::string::npos;
    if (!saved) std::this_thread::sleep_for(500ms);
  }
  EXPECT_TRUE(saved);
  Result slow_value = run(cli + " get slow");
  EXPECT_EQ(slow_value.output, "15\n");
  if (GetParam() == Shimmed::both) {
    auto board = board_when(server.pid(), [](const Board& b) { return b["returned.fork"] >= 1; });
    ASSERT_TRUE(board) << "the slow client's connection was not handed over";
    EXPECT_EQ((*board)["returned.link_failed"], 0u) << board->json;
  }
  EXPECT_TRUE(server.stop()) << "redis-server did not end on SIGTERM:\n" << server.output();
}

INSTANTIATE_TEST_SUITE_P(Apps, Redis, testing::Values(Shimmed::both, Shimmed::server, Shimmed::client), test_name);
INSTANTIATE_TEST_SUITE_P(Apps, RedisFaults, testing::Values(Shimmed::both), test_name);

}  // namespace
}  // namespace rxio::apps
