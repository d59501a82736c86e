// The socket calls held to what TCP does (rxio-shim-check's scenarios: readiness in
// every flavour, receive flags, half-close, close with data in flight, dup, sendfile,
// two hundred connections from four threads), in the three pairings: moved to shm
// with both sides shimmed, on TCP through the shim's fallback otherwise.
#include "apps.h"

namespace rxio::apps {
namespace {

class ShimCheck : public AppTest {
 protected:
  ShimCheck() : AppTest({}) {}
};

TEST_P(ShimCheck, BehavesAsTcp) {
  const std::string check = quote(env("RXIO_SHIM_CHECK"));
  const std::string port = std::to_string(free_port());
  Process server = start(server_prefix() + check + " serve " + port);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  const std::vector<std::string> scenarios = {"echo",         "epoll",   "select", "flags",
                                              "half-close",   "close-in-flight",  "refused",
                                              "dup-sendfile", "many",    "blocked-reader"};
  std::string names;
  for (const auto& s : scenarios) names += " " + s;
  Result result = run(client_prefix() + check + " client " + port + names, 120s);
  EXPECT_TRUE(result.exited_0) << result.output;
  for (const auto& s : scenarios) EXPECT_NE(result.output.find(s + ": ok"), std::string::npos) << result.output;
  // One connection per scenario, three for epoll, two hundred for "many", none for
  // "refused" (it dials a closed port).
  expect_server_totals(server, 210);
  EXPECT_TRUE(server.stop()) << server.output();
}

INSTANTIATE_TEST_SUITE_P(Apps, ShimCheck, testing::Values(Shimmed::both, Shimmed::server, Shimmed::client),
                         test_name);

}  // namespace
}  // namespace rxio::apps
