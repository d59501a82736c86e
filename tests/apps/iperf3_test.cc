// iperf3 under the shim: a test each way (the client sending, then with -R receiving),
// each against a one-off server that must end by itself afterwards.
#include "apps.h"

namespace rxio::apps {
namespace {

class Iperf3 : public AppTest {
 protected:
  Iperf3() : AppTest({"iperf3"}) {}

  // One three-second test (times the scale) with the client's `options`; the bytes the
  // receiving side got.
  uint64_t measure(const std::string& options) {
    const std::string port = std::to_string(free_port());
    // iperf3 keeps each stream's buffer in a file under TMPDIR: the test's own directory,
    // which exists wherever the test runs (inside the Soft-RoCE guest too).
    const std::string iperf3 = "env TMPDIR=" + quote(dir()) + " iperf3 ";
    Process server = start(server_prefix() + iperf3 + "-s -1 -p " + port);
    if (auto listening = wait_listening(server, std::stoi(port)); !listening) {
      ADD_FAILURE() << listening.message();
      return 0;
    }
    Process client = start(client_prefix() + iperf3 + "-c 127.0.0.1 -p " + port + " -t " +
                           std::to_string(3 * time_scale()) + " -J " + options);
    expect_backends(server, client);
    Result measured = finish(client);
    EXPECT_TRUE(measured.exited_0) << measured.output;
    Result served = finish(server, 10s);
    EXPECT_TRUE(served.exited_0) << "iperf3 -s -1 did not end well after its test:\n" << served.output;
    // The report's "sum_received": what the receiving side counted.
    auto at = measured.output.find("\"sum_received\"");
    auto bytes = at == std::string::npos ? at : measured.output.find("\"bytes\":", at);
    if (bytes == std::string::npos) {
      ADD_FAILURE() << "no receiver bytes in the report:\n" << measured.output;
      return 0;
    }
    return std::stoull(measured.output.substr(bytes + 8));
  }
};

TEST_P(Iperf3, SendsAndReceives) {
  EXPECT_GT(measure(""), 1000000u) << "iperf3 moved almost nothing";
  EXPECT_GT(measure("-R"), 1000000u) << "iperf3 -R moved almost nothing";
}

INSTANTIATE_TEST_SUITE_P(Apps, Iperf3, testing::Values(Shimmed::both, Shimmed::server, Shimmed::client), test_name);

}  // namespace
}  // namespace rxio::apps
