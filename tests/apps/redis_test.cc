// redis under the shim: values of every size (1 MiB of random bytes among them), a
// counter, and redis-benchmark's fifty connections at once.
#include <fstream>
#include <random>

#include "apps.h"

namespace rxio::apps {
namespace {

class Redis : public AppTest {
 protected:
  Redis() : AppTest({"redis-server", "redis-cli", "redis-benchmark"}) {}
};

TEST_P(Redis, StoresAndBenchmarks) {
  const std::string port = std::to_string(free_port());
  Process server = start(server_prefix() + "redis-server --port " + port +
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
  EXPECT_TRUE(server.stop()) << "redis-server did not end on SIGTERM:\n" << server.output();
}

INSTANTIATE_TEST_SUITE_P(Apps, Redis, testing::Values(Shimmed::both, Shimmed::server, Shimmed::client), test_name);

}  // namespace
}  // namespace rxio::apps
