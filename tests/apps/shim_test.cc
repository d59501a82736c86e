// The socket calls held to what TCP does (rxio-shim-check's scenarios: readiness in
// every flavour, receive flags, half-close, close with data in flight, dup, sendfile,
// two hundred connections from four threads), in the three pairings: moved to shm
// with both sides shimmed, on TCP through the shim's fallback otherwise.
#include <sstream>
#include <thread>
#include <vector>

#include "apps.h"

namespace rxio::apps {
namespace {

class ShimCheck : public AppTest {
 protected:
  ShimCheck() : AppTest({}) {}
  // rxio-shim-check `mode` (then `args`) on a free port, which `port` gets, under the
  // server's shim, with `settings` for env(1): NAME=VALUE, -u NAME.
  Process start_server(std::string& port, const std::string& mode = "serve", const std::string& args = "",
                       const std::string& settings = "") {
    port = std::to_string(free_port());
    return start("env " + settings + " " + server_prefix() + quote(env("RXIO_SHIM_CHECK")) + " " + mode + " " + port +
                 args);
  }
  // rxio-shim-check's client of `port` running `scenarios`, under the client's shim.
  std::string client_command(const std::string& port, const std::string& scenarios,
                             const std::string& settings = "") const {
    return "env " + settings + " " + client_prefix() + quote(env("RXIO_SHIM_CHECK")) + " client " + port + " " +
           scenarios;
  }
  // Every scenario against `server`, each said to be ok; `settings` for the client.
  void run_scenarios(const std::string& port, const std::string& settings = "") {
    // "exec" ends the list: the program it executes finishes it.
    const std::vector<std::string> scenarios = {"echo",         "fork",    "epoll",   "select", "flags",
                                                "half-close",   "close-in-flight",  "refused",
                                                "dup-sendfile", "many",    "blocked-reader", "duplex",
                                                "dup-move",     "signal",  "signal-restart", "inetd",
                                                "exec-child",   "exec"};
    std::string names;
    for (const auto& s : scenarios) names += " " + s;
    Result result = run(client_command(port, names, settings), 120s);
    EXPECT_TRUE(result.exited_0) << result.output;
    for (const auto& s : scenarios) EXPECT_NE(result.output.find(s + ": ok"), std::string::npos) << result.output;
  }
  // One connection per scenario, three for epoll, two hundred for "many", none for
  // "refused" (it dials a closed port).
  static constexpr uint64_t kConnections = 218;
  // rxio-shim-check `mode` (then `args`) serves "many" (200 connections from four
  // threads) to a client whose every link fails at its third ring slot: many fail
  // inside their switch, after the client's Confirm and before the server's Switched
  // reaches it. The client asks the server where the switch stands (ShimReturns,
  // ShimPreforkFaults); none is reset, and every checksum is right.
  void many_with_links_failing_in_switches(const std::string& mode, const std::string& args) {
    std::string port;
    Process server = start_server(port, mode, args);
    ASSERT_TRUE(wait_listening(server, std::stoi(port)));
    Result result = run(client_command(port, "many", "RXIO_LOG=info RXIO_FAULT_LINK_AFTER=3"), 120s);
    EXPECT_TRUE(result.exited_0) << result.output;
    EXPECT_NE(result.output.find("many: ok"), std::string::npos) << result.output;
    // Which of the two answers comes is a matter of timing ("switched" or "stays on TCP").
    EXPECT_NE(result.output.find("the server says it s"), std::string::npos) << result.output;
    EXPECT_EQ(result.output.find("the server says it cannot tell"), std::string::npos) << result.output;
    EXPECT_EQ(result.output.find("did not finish the switch"), std::string::npos) << result.output;
    EXPECT_TRUE(server.stop()) << server.output();
  }
};

TEST_P(ShimCheck, BehavesAsTcp) {
  std::string port;
  Process server = start_server(port);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  run_scenarios(port);
  // Those after "fork" move as well, though its child closed the server's listener.
  expect_server_totals(server, kConnections);
  if (GetParam() == Shimmed::both) {
    // Handed over to TCP: by the server's parents for inetd and exec-child, by the
    // client for exec. fork's connection closes as usual: its child was gone by then.
    // (A connection of an earlier scenario that the server closes while a child lives
    // is handed over too: the child holds it.)
    auto board = board_when(server.pid(), [](const Board& b) { return b["returned.peer"] >= 1; });
    ASSERT_TRUE(board);
    EXPECT_GE((*board)["returned.fork"], 2u) << board->json;
    EXPECT_EQ((*board)["returned.peer"], 1u) << board->json;
    EXPECT_EQ((*board)["returned.link_failed"], 0u) << board->json;
  }
  EXPECT_TRUE(server.stop()) << server.output();
}

// A client executes itself while its moved connection holds bytes the server wrote
// over TCP before the move, which the program has not read: the move took them in
// (the client moves at its second call, after they came). The new image is given them
// and reads them first, then the rest of the stream, every byte in its place.
TEST_P(ShimCheck, ExecHandsOnTheReadAhead) {
  std::string port;
  Process server = start_server(port);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  Result result = run(client_command(port, "exec-ahead", "RXIO_LOG=info RXIO_SHIM_MOVE_AFTER=2"), 60s);
  EXPECT_TRUE(result.exited_0) << result.output;
  EXPECT_NE(result.output.find("exec-ahead: ok"), std::string::npos) << result.output;
  if (GetParam() == Shimmed::both) {
    EXPECT_NE(result.output.find("took in 100 bytes read ahead of the program"), std::string::npos) << result.output;
  }
  EXPECT_TRUE(server.stop()) << server.output();
}

// Three pre-forked workers accept on one listener while their parent sleeps outside
// the socket calls (nginx's master does): whichever process a client's request reaches
// sends it on to the worker that accepted the connection, and that worker moves it
// with an engine of its own. Every scenario behaves as over TCP.
class ShimPrefork : public ShimCheck {
 protected:
  void run_workers(const std::string& args);
};

TEST_P(ShimPrefork, WorkersMoveWhatTheyAccept) { run_workers(" 3"); }

// The same behind a listener on 0.0.0.0 (nginx's default): the shim's endpoints, and
// over rdma_cm its listener and each worker's, take every address too.
TEST_P(ShimPrefork, WorkersOnEveryAddressMoveWhatTheyAccept) { run_workers(" 3 any"); }

// As ShimReturns.LinkFailsInsideTheSwitch, against three pre-forked workers: a
// client's Query may reach any of them, which sends it on to the one that accepted
// the connection.
class ShimPreforkFaults : public ShimPrefork {};

TEST_P(ShimPreforkFaults, LinksFailInsideTheSwitch) { many_with_links_failing_in_switches("serve-prefork", " 3"); }

void ShimPrefork::run_workers(const std::string& args) {
  std::string port;
  Process server = start_server(port, "serve-prefork", args);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  run_scenarios(port);
  if (GetParam() == Shimmed::both) {
    Result workers = run("pgrep -P " + std::to_string(server.pid()));
    std::vector<pid_t> pids;
    std::istringstream listed(workers.output);
    for (pid_t worker; listed >> worker;) pids.push_back(worker);
    ASSERT_EQ(pids.size(), 3u) << workers.output;
    // A worker counts a move when it completes its side, which may come after the
    // client has gone on (or ended): wait for the sum as for one server's total.
    const std::string moved = "moved." + expected_backend();
    const auto deadline = std::chrono::steady_clock::now() + 5s * time_scale();
    uint64_t total = 0;
    std::vector<Board> boards;
    for (;;) {
      total = 0;
      boards.clear();
      for (pid_t worker : pids) {
        auto board = board_when(worker, [](const Board&) { return true; });
        ASSERT_TRUE(board) << "worker " << worker << " has no statistics board";
        total += (*board)[moved];
        boards.push_back(std::move(*board));
      }
      if (total >= kConnections || std::chrono::steady_clock::now() >= deadline) break;
      std::this_thread::sleep_for(100ms);
    }
    std::string all;
    for (const Board& board : boards) {
      EXPECT_EQ(board["fallbacks.no_peer_shim"], 0u) << board.json;
      all += board.json + "\n";
    }
    EXPECT_EQ(total, kConnections) << all;
  }
  EXPECT_TRUE(server.stop()) << server.output();
}

// At the default RXIO_SHIM_MOVE_AFTER, connections that end after a few calls stay on
// TCP with nothing counted against them, and a busy one moves while bytes flow both
// ways.
class ShimDefaults : public ShimCheck {};

TEST_P(ShimDefaults, MovesOnlyConnectionsThatLast) {
  const std::string defaults = "-u RXIO_SHIM_MOVE_AFTER";
  std::string port;
  Process server = start_server(port, "serve", "", defaults);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  Process client = start(client_command(port, "many half-close duplex", defaults));
  Result result = finish(client, 120s);
  EXPECT_TRUE(result.exited_0) << result.output;
  // The server's board (the client's went with it): 250 connections, one moved.
  const std::string moved = "moved." + expected_backend();
  auto board = board_when(server.pid(), [&](const Board& b) { return b[moved] >= 1; });
  ASSERT_TRUE(board) << "the server (pid " << server.pid() << ") has no statistics board";
  EXPECT_EQ((*board)[moved], 1u) << "only the duplex connection lasts long enough: " << board->json;
  for (const char* reason : {"no_peer_shim", "peer_refused", "timeout", "busy", "link_failed", "not_supported"})
    EXPECT_EQ((*board)[std::string("fallbacks.") + reason], 0u) << board->json;
  EXPECT_TRUE(server.stop()) << server.output();
}

// A link that fails under running transfers (RXIO_FAULT_LINK_AFTER in one side's
// engine: its QP to the error state, its shm link shut) sends its connections back to
// TCP, and the programs finish with every byte right: 8 MiB each way on one
// connection, then 1 MiB each way on each of 32 connections of one link at once. The
// fault comes at the 300th slot a link writes: with the data, after the moves (a link
// that fails inside a switch has a test of its own). The connections stay on TCP
// after (moving again has a test of its own too).
class ShimReturns : public ShimCheck {
 protected:
  void run_with_fault(const std::string& server_env, const std::string& client_env) {
    const std::string stay = " RXIO_SHIM_MOVE_AGAIN=0";
    std::string port;
    Process server = start_server(port, "serve", "", server_env + stay);
    ASSERT_TRUE(wait_listening(server, std::stoi(port)));
    Result result = run(client_command(port, "duplex parallel", client_env + stay), 120s);
    EXPECT_TRUE(result.exited_0) << result.output;
    EXPECT_NE(result.output.find("duplex: ok"), std::string::npos) << result.output;
    EXPECT_NE(result.output.find("parallel: ok"), std::string::npos) << result.output;
    // The server's board (the client's went with it): all 33 moved, then back on TCP
    // with the two links.
    const std::string moved = "moved." + expected_backend();
    auto board = board_when(server.pid(), [&](const Board& b) {
      return b["returned.link_failed"] + b["returned.peer"] >= 33 && b[moved] >= 33;
    });
    ASSERT_TRUE(board) << "the server (pid " << server.pid() << ") has no statistics board";
    EXPECT_EQ((*board)[moved], 33u) << board->json;
    EXPECT_EQ((*board)["returned.link_failed"] + (*board)["returned.peer"], 33u) << board->json;
    EXPECT_TRUE(server.stop()) << server.output();
  }
};

// Links that fail inside switches, against one server: had it switched, the connection
// goes back to TCP at once; had it not, it stays there.
TEST_P(ShimReturns, LinkFailsInsideTheSwitch) { many_with_links_failing_in_switches("serve", ""); }

// Every scenario while links fail within a few slots (the server's at their third,
// then the client's at their fourth), the connections moving again onto new links that
// fail in turn: each behaves as over TCP, poll, select and epoll (level, edge,
// one-shot) included, while its connection goes back.
TEST_P(ShimReturns, EveryScenarioWhileLinksFail) {
  for (const auto& [server_env, client_env] :
       {std::pair<std::string, std::string>{"RXIO_FAULT_LINK_AFTER=3", ""}, {"", "RXIO_FAULT_LINK_AFTER=4"}}) {
    SCOPED_TRACE("server: " + server_env + ", client: " + client_env);
    std::string port;
    Process server = start_server(port, "serve", "", server_env);
    ASSERT_TRUE(wait_listening(server, std::stoi(port)));
    run_scenarios(port, client_env);
    EXPECT_TRUE(server.stop()) << server.output();
  }
}

TEST_P(ShimReturns, ServerLinkFailsMidStream) { run_with_fault("RXIO_FAULT_LINK_AFTER=300", "RXIO_FAULT_LINK_AFTER=0"); }

TEST_P(ShimReturns, ClientLinkFailsMidStream) { run_with_fault("RXIO_FAULT_LINK_AFTER=0", "RXIO_FAULT_LINK_AFTER=300"); }

// One side's first link fails under 8 MiB each way (RXIO_FAULT_LINKS=1): the
// connection goes back to TCP, then moves again onto a new link, which holds, and
// every byte arrives. (When the client is through first, its request waits for the
// server's return to be.) A server that is told not to (RXIO_SHIM_MOVE_AGAIN=0)
// refuses, and the connection goes on over TCP.
class ShimMovesAgain : public ShimCheck {
 protected:
  void run_with_fault(const std::string& server_env, const std::string& client_env, uint64_t moves = 2) {
    std::string port;
    Process server = start_server(port, "serve", "", server_env);
    ASSERT_TRUE(wait_listening(server, std::stoi(port)));
    Result result = run(client_command(port, "duplex", client_env), 120s);
    EXPECT_TRUE(result.exited_0) << result.output;
    EXPECT_NE(result.output.find("duplex: ok"), std::string::npos) << result.output;
    const std::string moved = "moved." + expected_backend();
    const uint64_t refused = moves == 2 ? 0 : 1;
    auto board = board_when(server.pid(), [&](const Board& b) {
      return b[moved] >= moves && b["fallbacks.not_supported"] >= refused;
    });
    ASSERT_TRUE(board) << "the server (pid " << server.pid() << ") has no statistics board";
    EXPECT_EQ((*board)[moved], moves) << "moves, before and after its link failed: " << board->json;
    EXPECT_EQ((*board)["returned.link_failed"] + (*board)["returned.peer"], 1u) << board->json;
    EXPECT_EQ((*board)["fallbacks.not_supported"], refused) << board->json;
    EXPECT_TRUE(server.stop()) << server.output();
  }
  static constexpr const char* kFirstLinkFails = "RXIO_FAULT_LINK_AFTER=300 RXIO_FAULT_LINKS=1";
};

TEST_P(ShimMovesAgain, AfterTheServersLinkFailed) { run_with_fault(kFirstLinkFails, "RXIO_FAULT_LINK_AFTER=0"); }

TEST_P(ShimMovesAgain, AfterTheClientsLinkFailed) { run_with_fault("RXIO_FAULT_LINK_AFTER=0", kFirstLinkFails); }

TEST_P(ShimMovesAgain, NotWhereTheServerSaysNo) {
  run_with_fault(std::string(kFirstLinkFails) + " RXIO_SHIM_MOVE_AGAIN=0", "RXIO_FAULT_LINK_AFTER=0", 1);
}

// A peer whose process stops (SIGSTOP) for a second, twice, under running round trips:
// its link stays up, nothing goes back to TCP, and every byte arrives once it goes on.
TEST_P(ShimReturns, PeerStoppedMidStream) {
  std::string port;
  Process server = start_server(port);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  Process client = start(client_command(port, "steady"));
  for (int i = 0; i < 2; ++i) {
    std::this_thread::sleep_for(700ms);
    server.pause();
    std::this_thread::sleep_for(1s);
    server.resume();
  }
  Result result = finish(client, 60s);
  EXPECT_TRUE(result.exited_0) << result.output;
  EXPECT_NE(result.output.find("steady: ok"), std::string::npos) << result.output;
  auto board = board_when(server.pid(), [](const Board&) { return true; });
  ASSERT_TRUE(board);
  EXPECT_EQ((*board)["moved." + expected_backend()], 1u) << board->json;
  EXPECT_EQ((*board)["returned.link_failed"] + (*board)["returned.peer"], 0u) << board->json;
  EXPECT_TRUE(server.stop()) << server.output();
}

// A peer killed under running round trips (its link fails, its TCP socket ends without
// a Resume): the client's calls end with an error or the stream's end, every byte
// before that right, and no call hangs.
TEST_P(ShimReturns, PeerKilledMidStream) {
  std::string port;
  Process server = start_server(port);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  Process client = start(client_command(port, "steady-until-gone"));
  // Killed once the connection has moved and its round trips run.
  const std::string moved = "moved." + expected_backend();
  ASSERT_TRUE(board_when(server.pid(), [&](const Board& b) { return b[moved] >= 1; }, 60s));
  std::this_thread::sleep_for(300ms);
  server.kill();
  Result result = finish(client, 60s);
  EXPECT_TRUE(result.exited_0) << result.output;
  EXPECT_NE(result.output.find("steady: the server went after"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("steady-until-gone: ok"), std::string::npos) << result.output;
}

// In the Soft-RoCE guest (apps-verbs-port-down): the server's engine on device A, the
// client's on device B, and the netdev under A taken down for a moment under running
// round trips, as a NIC that flaps. The device's event (port error), or a send that
// fails on the down port, fails the link, and the connection finishes over TCP, every
// byte checked.
class ShimPortDown : public ShimCheck {};

TEST_P(ShimPortDown, ConnectionGoesOnOverTcp) {
  const char* device_a = std::getenv("RXIO_RXE_CM_DEV_A");
  const char* device_b = std::getenv("RXIO_RXE_CM_DEV_B");
  const char* link_up = std::getenv("RXIO_GUEST_LINK_UP");
  if (!device_a || !device_b || !link_up) GTEST_SKIP() << "takes a network interface down: only in the Soft-RoCE guest";
  const std::string stay = " RXIO_SHIM_MOVE_AGAIN=0";
  std::string port;
  Process server = start_server(port, "serve", "", std::string("RXIO_LOG=info RXIO_DEVICE=") + device_a + stay);
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  Process client = start(client_command(port, "steady-long", std::string("RXIO_DEVICE=") + device_b + stay));
  const std::string moved = "moved." + expected_backend();
  ASSERT_TRUE(board_when(server.pid(), [&](const Board& b) { return b[moved] >= 1; }))
      << "the connection never moved: " << server.output();
  EXPECT_EQ(std::system("ip link set v1 down"), 0);
  auto back = board_when(server.pid(), [](const Board& b) { return b["returned.link_failed"] + b["returned.peer"] >= 1; });
  // Up again, with its route (tests/rxe/guest/link-up.sh): TCP between the guest's own
  // addresses waits for their local routes, which come back with the link.
  EXPECT_EQ(std::system((std::string(link_up) + " v1").c_str()), 0);
  ASSERT_TRUE(back) << "the server's link did not fail";
  Result result = finish(client, 120s);
  EXPECT_TRUE(result.exited_0) << result.output;
  EXPECT_NE(result.output.find("steady-long: ok"), std::string::npos) << result.output;
  // Under traffic a send the down netdev refuses can fail the link before the port's
  // event is read; either way the server's link failed because of the port.
  const std::string log = server.output();
  EXPECT_TRUE(log.find("port error") != std::string::npos || log.find("a work request completed with") != std::string::npos)
      << "failed by the device's event or a send on the down port: " << log;
  auto board = board_when(server.pid(), [](const Board&) { return true; });
  ASSERT_TRUE(board);
  EXPECT_EQ((*board)[moved], 1u) << board->json;
  EXPECT_EQ((*board)["returned.link_failed"] + (*board)["returned.peer"], 1u) << board->json;
  EXPECT_TRUE(server.stop()) << server.output();
}

INSTANTIATE_TEST_SUITE_P(Apps, ShimCheck, testing::Values(Shimmed::both, Shimmed::server, Shimmed::client),
                         test_name);
INSTANTIATE_TEST_SUITE_P(Apps, ShimPrefork, testing::Values(Shimmed::both, Shimmed::server, Shimmed::client),
                         test_name);
INSTANTIATE_TEST_SUITE_P(Apps, ShimReturns, testing::Values(Shimmed::both), test_name);
INSTANTIATE_TEST_SUITE_P(Apps, ShimPreforkFaults, testing::Values(Shimmed::both), test_name);
INSTANTIATE_TEST_SUITE_P(Apps, ShimMovesAgain, testing::Values(Shimmed::both), test_name);
INSTANTIATE_TEST_SUITE_P(Apps, ShimPortDown, testing::Values(Shimmed::both), test_name);
// A move needs both sides shimmed.
INSTANTIATE_TEST_SUITE_P(Apps, ShimDefaults, testing::Values(Shimmed::both), test_name);

}  // namespace
}  // namespace rxio::apps
