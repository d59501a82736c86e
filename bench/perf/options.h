// rxio-perf's command line: perftest's flags, where they make sense here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace rxio::perf {

struct Mode;

struct Options {
  const Mode* mode = nullptr;
  std::string device;          // empty: the first device (perftest's default)
  uint8_t ib_port = 1;
  int gid_index = -1;          // < 0: choose (IPv4-mapped RoCE v2 first)
  std::vector<std::size_t> sizes;  // one, or 2 B to 8 MiB with --all
  bool all_sizes = false;
  uint32_t iterations = 0;
  uint32_t duration_s = 0;     // > 0: run for this long instead of `iterations`
  bool rdma_cm = false;
  uint16_t port = 18515;
  uint32_t tx_depth = 0;
  uint32_t cq_moderation = 0;  // signal every Nth send in the bandwidth modes
  uint32_t inline_size = 0;
  uint8_t qp_timeout = 14;     // ACK timeout exponent: 4.096 us * 2^N (perftest's default)
  bool report_gbits = false;
  bool out_json = false;
  std::string json_file = "perftest_out.json";
  std::string server;          // empty: this process is the server
  std::string backend;         // msg_*: verbs, shm or tcp (empty: RXIO_BACKEND)

  bool is_server() const noexcept { return server.empty(); }
  std::size_t max_size() const noexcept { return sizes.back(); }
};

// A bad command line; main prints it with the usage and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// argv[1] is the subcommand. Throws UsageError.
Options parse_options(int argc, char** argv);
std::string usage();

}  // namespace rxio::perf
