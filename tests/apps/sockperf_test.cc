// sockperf under the shim: ping-pong, whose every reply is checked (none dropped,
// duplicated or out of order), then throughput.

#include "apps.h"

namespace rxio::apps {
namespace {

class Sockperf : public AppTest {
 protected:
  Sockperf() : AppTest({"sockperf"}) {}
};

TEST_P(Sockperf, PingPongsAndStreams) {
  const std::string port = std::to_string(free_port());
  Process server = start(server_prefix() + "sockperf sr --tcp -i 127.0.0.1 -p " + port);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  const std::string client = client_prefix() + "sockperf ";

  // --mps: sockperf sizes its table of send times for 600,000 messages/s unless told
  // more, and stops with "_seqN > m_maxSequenceNo" when a faster run (a moved one on
  // shm) outgrows it. A slower machine needs no more room.
  Process ping = start(client + "pp --tcp -i 127.0.0.1 -p " + port + " -t " + std::to_string(2 * time_scale()) +
                       " --mps " + std::to_string(2000000 / time_scale()));
  expect_backends(server, ping);
  Result pinged = finish(ping);
  EXPECT_TRUE(pinged.exited_0) << pinged.output;
  EXPECT_NE(pinged.output.find("# dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0"),
            std::string::npos)
      << pinged.output;
  auto latency = number_between(pinged.output, "Summary: Latency is ", " usec");
  ASSERT_TRUE(latency) << pinged.output;
  EXPECT_GT(*latency, 0) << pinged.output;

  // As long as the ping-pong: under TCG its move alone can take most of two seconds.
  Result streamed =
      run(client + "tp --tcp -i 127.0.0.1 -p " + port + " -t " + std::to_string(2 * time_scale()) + " -m 1400");
  EXPECT_TRUE(streamed.exited_0) << streamed.output;
  auto rate = number_between(streamed.output, "Summary: Message Rate is ", " [msg/sec]");
  ASSERT_TRUE(rate) << streamed.output;
  EXPECT_GT(*rate, 0) << streamed.output;

  expect_server_totals(server, 2);
  EXPECT_TRUE(server.stop()) << "sockperf sr did not end on SIGTERM:\n" << server.output();
}

INSTANTIATE_TEST_SUITE_P(Apps, Sockperf, testing::Values(Shimmed::both, Shimmed::server, Shimmed::client),
                         test_name);

}  // namespace
}  // namespace rxio::apps
