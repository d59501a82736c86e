// rxio-perf end to end: a server and a client process per subcommand, with QP info
// over TCP (rxe0) and over rdma_cm (-R, the veth pair), their tables and JSON reports.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/property_tree/json_parser.hpp>
#include <boost/property_tree/ptree.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "tests/rxe/rxe_env.h"

namespace rxio::test {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Meson passes the path; run by hand, the binary sits in the build tree's bench/.
std::string perf_binary() {
  if (const char* path = std::getenv("RXIO_PERF"); path && *path) return path;
  return (fs::canonical("/proc/self/exe").parent_path() / "../../bench/rxio-perf").lexically_normal();
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A child process with stdout and stderr in a file; killed if still running when
// this goes away.
class Child {
 public:
  Child(const std::vector<std::string>& args, fs::path output) : output_(std::move(output)) {
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(output_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(126);
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  // The exit status, or -1 after `timeout` (the child is then killed).
  int wait(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) return -1;
      std::this_thread::sleep_for(20ms);
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  bool wait_for_output(const std::string& text, std::chrono::milliseconds timeout) const {
    const auto deadline = Clock::now() + timeout;
    while (read_file(output_).find(text) == std::string::npos) {
      if (Clock::now() > deadline || waitpid(pid_, nullptr, WNOHANG) != 0) return false;
      std::this_thread::sleep_for(50ms);
    }
    return true;
  }

  std::string output() const { return read_file(output_); }
  bool started() const noexcept { return pid_ > 0; }

 private:
  pid_t pid_ = -1;
  fs::path output_;
};

struct PairRun {
  int server_status = -1, client_status = -1;
  std::string server_output, client_output;
};

class PerfTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("rxio-perf-test." + std::to_string(getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Runs `rxio-perf ARGS` as a server, then as a client of it (at `server_address`),
  // each with its own extra arguments.
  PairRun run_pair(std::vector<std::string> args, const std::string& server_address,
                   const std::vector<std::string>& server_extra = {},
                   const std::vector<std::string>& client_extra = {}) {
    static int next_port = 18700;
    args.insert(args.begin(), perf_binary());
    args.push_back("-p");
    args.push_back(std::to_string(next_port++));
    auto server_args = args, client_args = args;
    server_args.insert(server_args.end(), server_extra.begin(), server_extra.end());
    client_args.insert(client_args.end(), client_extra.begin(), client_extra.end());
    client_args.push_back(server_address);

    PairRun run;
    Child server(server_args, dir_ / "server.out");
    EXPECT_TRUE(server.started());
    if (!server.wait_for_output("Waiting for client to connect", 30s)) {
      run.server_output = server.output();
      ADD_FAILURE() << "the server never waited for a client:\n" << run.server_output;
      return run;
    }
    Child client(client_args, dir_ / "client.out");
    run.client_status = client.wait(60s);
    run.server_status = server.wait(20s);
    run.client_output = client.output();
    run.server_output = server.output();
    return run;
  }

  fs::path dir_;
};

std::vector<std::string> split(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  return words;
}

// The rows of the result table: the lines after the " #bytes" header up to the dashes.
std::vector<std::vector<double>> table(const std::string& output) {
  std::vector<std::vector<double>> rows;
  std::istringstream in(output);
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(" #bytes", 0) == 0) {
      inside = true;
    } else if (inside) {
      if (line.rfind("---", 0) == 0) break;
      std::vector<double> row;
      for (const auto& w : split(line)) row.push_back(std::stod(w));
      rows.push_back(row);
    }
  }
  return rows;
}

void expect_positive(const std::vector<double>& row, std::size_t columns, const std::string& what) {
  ASSERT_EQ(row.size(), columns) << what;
  for (std::size_t i = 0; i < row.size(); ++i) EXPECT_GT(row[i], 0) << what << ", column " << i + 1;
}

std::string json_test_name(const std::string& mode) {
  if (mode == "write_bw") return "RDMA_Write_BW_Test";
  if (mode == "write_lat") return "RDMA_Write_Latency_Test";
  if (mode == "read_bw") return "RDMA_Read_BW_Test";
  if (mode == "read_lat") return "RDMA_Read_Latency_Test";
  if (mode == "send_bw") return "Send_BW_Test";
  return "Send_Latency_Test";
}

// A number from the report. (Through the text: property_tree's own numeric get trips
// GCC 12's -Wmaybe-uninitialized under ASan.)
double number(const boost::property_tree::ptree& report, const std::string& path) {
  return std::stod(report.get<std::string>(boost::property_tree::ptree::path_type(path, '/')));
}

using ModeAndExchange = std::tuple<std::string, bool>;

class EveryMode : public PerfTest, public ::testing::WithParamInterface<ModeAndExchange> {};

TEST_P(EveryMode, ServerAndClientAgreeAndReport) {
  const auto& [mode, rdma_cm] = GetParam();
  const bool bandwidth = mode.ends_with("_bw");
  std::vector<std::string> args = {mode, "-n", "40"};
  std::string address = "127.0.0.1";
  if (rdma_cm) {
    RXIO_REQUIRE_DEVICE(cm_device_a());
    args.push_back("-R");
    address = cm_address_a();
  } else {
    RXIO_REQUIRE_DEVICE(loopback_device());
    args.insert(args.end(), {"-d", loopback_device(), "-x", "1"});
  }
  if (bandwidth) args.insert(args.end(), {"-s", "4096"});
  const fs::path json = dir_ / "client.json";
  PairRun run = run_pair(args, address, {}, {"--out_json_file", json.string()});
  ASSERT_EQ(run.client_status, 0) << run.client_output << "\n--- server:\n" << run.server_output;
  ASSERT_EQ(run.server_status, 0) << run.server_output;

  const auto client_rows = table(run.client_output);
  const auto server_rows = table(run.server_output);
  ASSERT_EQ(client_rows.size(), 1u) << run.client_output;
  ASSERT_EQ(server_rows.size(), 1u) << run.server_output;
  expect_positive(client_rows[0], bandwidth ? 5 : 9, "the client's row");
  EXPECT_EQ(client_rows[0][0], bandwidth ? 4096 : 2);
  EXPECT_EQ(client_rows[0][1], 40);
  if (mode == "send_bw") {
    EXPECT_GT(server_rows[0].at(3), 0) << "the receiver's average (it has no peak, as perftest)";
  } else {
    expect_positive(server_rows[0], bandwidth ? 5 : 9, "the server's row");
  }
  EXPECT_THAT(run.client_output, HasSubstr(rdma_cm ? "Data ex. method : rdma_cm" : "Data ex. method : TCP"));
  EXPECT_THAT(run.client_output, HasSubstr(rdma_cm ? "Device          : " + cm_device_a()
                                                   : "Device          : " + loopback_device()));

  boost::property_tree::ptree report;
  ASSERT_NO_THROW(boost::property_tree::read_json(json.string(), report)) << read_file(json);
  EXPECT_EQ(report.get<std::string>("test_info.test"), json_test_name(mode));
  EXPECT_EQ(report.get<std::string>("test_info.rdma_cm_QPs"), rdma_cm ? "ON" : "OFF");
  EXPECT_EQ(number(report, "results/n_iterations"), 40);
  if (bandwidth) {
    EXPECT_EQ(number(report, "results/MsgSize"), 4096);
    EXPECT_GT(number(report, "results/BW_average"), 0);
    EXPECT_GT(number(report, "results/MsgRate"), 0);
  } else {
    EXPECT_GT(number(report, "results/t_typical"), 0);
    EXPECT_GE(number(report, "results/percentile_99.9"), number(report, "results/t_min"));
  }
}

std::string mode_and_exchange(const ::testing::TestParamInfo<ModeAndExchange>& param) {
  return std::get<0>(param.param) + (std::get<1>(param.param) ? "_rdma_cm" : "_tcp");
}

INSTANTIATE_TEST_SUITE_P(RxioPerf, EveryMode,
                         ::testing::Combine(::testing::Values("write_bw", "write_lat", "read_bw", "read_lat",
                                                              "send_bw", "send_lat"),
                                            ::testing::Bool()),
                         mode_and_exchange);

TEST_F(PerfTest, AllSizesOfWriteLatencyEachGetARowAndAJsonEntry) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  const fs::path json = dir_ / "all.json";
  PairRun run = run_pair({"write_lat", "-a", "-n", "5", "-d", loopback_device()}, "127.0.0.1", {},
                         {"--out_json", "--out_json_file", json.string()});
  ASSERT_EQ(run.client_status, 0) << run.client_output << "\n--- server:\n" << run.server_output;
  ASSERT_EQ(run.server_status, 0) << run.server_output;
  const auto rows = table(run.client_output);
  ASSERT_EQ(rows.size(), 23u) << run.client_output;  // 2 B to 8 MiB
  for (std::size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i][0], double(2u << i));
    expect_positive(rows[i], 9, "row " + std::to_string(i));
  }
  boost::property_tree::ptree report;
  ASSERT_NO_THROW(boost::property_tree::read_json(json.string(), report)) << read_file(json);
  EXPECT_EQ(report.get_child("results").size(), 23u);
}

TEST_F(PerfTest, AllSizesOfSendBandwidthOverRdmaCm) {
  RXIO_REQUIRE_DEVICE(cm_device_a());
  PairRun run = run_pair({"send_bw", "-a", "-n", "5", "-R", "--report_gbits", "-u", "16"}, cm_address_a());
  ASSERT_EQ(run.client_status, 0) << run.client_output << "\n--- server:\n" << run.server_output;
  ASSERT_EQ(run.server_status, 0) << run.server_output;
  EXPECT_THAT(run.client_output, HasSubstr("BW average[Gb/sec]"));
  const auto rows = table(run.client_output);
  ASSERT_EQ(rows.size(), 23u) << run.client_output;
  for (const auto& row : rows) {
    ASSERT_EQ(row.size(), 5u);
    EXPECT_GT(row[1], 0);
    EXPECT_GT(row[4], 0) << "message rate, size " << row[0];
    // Two decimals of Gb/sec round the smallest sizes' bandwidth to 0, as in perftest.
    if (row[0] >= 1024) {
      EXPECT_GT(row[3], 0) << "bandwidth, size " << row[0];
    }
  }
  EXPECT_EQ(table(run.server_output).size(), 23u) << run.server_output;
}

TEST_F(PerfTest, DurationModeCountsWhatItGot) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  PairRun run = run_pair({"send_bw", "-D", "1", "-s", "1024", "-d", loopback_device()}, "127.0.0.1");
  ASSERT_EQ(run.client_status, 0) << run.client_output << "\n--- server:\n" << run.server_output;
  ASSERT_EQ(run.server_status, 0) << run.server_output;
  const auto client = table(run.client_output), server = table(run.server_output);
  ASSERT_EQ(client.size(), 1u);
  ASSERT_EQ(server.size(), 1u);
  EXPECT_EQ(client[0][2], 0) << "no peak in duration mode, as perftest";
  EXPECT_GT(client[0][3], 0);
  EXPECT_GT(client[0][1], 5);
  EXPECT_EQ(server[0][1], client[0][1]) << "the receiver counts every message sent";
}

TEST_F(PerfTest, DifferentTestsOnTheTwoSidesAreRefusedByBoth) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  PairRun run = run_pair({"write_bw", "-d", loopback_device()}, "127.0.0.1", {"-s", "8"}, {"-s", "16"});
  EXPECT_EQ(run.client_status, 1) << run.client_output;
  EXPECT_EQ(run.server_status, 1) << run.server_output;
  EXPECT_THAT(run.client_output, HasSubstr("the peer runs `write_bw -s 8 -n 5000`, this side `write_bw -s 16"));
  EXPECT_THAT(run.server_output, HasSubstr("give both sides the same"));
}

TEST_F(PerfTest, BadUsageExitsWithTwoAndTheUsage) {
  Child bad({perf_binary(), "write_bw", "--size", "lots"}, dir_ / "bad.out");
  EXPECT_EQ(bad.wait(10s), 2);
  EXPECT_THAT(bad.output(), HasSubstr("-s/--size wants a number"));
  EXPECT_THAT(bad.output(), HasSubstr("usage: rxio-perf SUBCOMMAND"));
}

}  // namespace
}  // namespace rxio::test
