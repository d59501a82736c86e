#include "bench/perf/options.h"

#include <getopt.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <string_view>

#include "bench/perf/modes.h"

namespace rxio::perf {
namespace {

constexpr uint64_t kMaxSize = 1ull << 30;
constexpr unsigned kAllSizesLog2Max = 23;  // --all: 2 B to 8 MiB, as perftest

enum LongOnly { kReportGbits = 1000, kOutJson, kOutJsonFile, kBackend };

uint64_t parse_number(const char* text, uint64_t min, uint64_t max, std::string_view flag) {
  errno = 0;
  char* end = nullptr;
  unsigned long long value = std::strtoull(text, &end, 0);
  if (errno != 0 || end == text || *end != '\0' || *text == '-' || value < min || value > max)
    throw UsageError(std::string(flag) + " wants a number from " + std::to_string(min) + " to " +
                     std::to_string(max) + ", not '" + text + "'");
  return value;
}

}  // namespace

std::string usage() {
  std::string names;
  for (const Mode& mode : modes()) names += (names.empty() ? "" : ", ") + std::string(mode.name);
  return "usage: rxio-perf SUBCOMMAND [OPTIONS]           start a server and wait for a client\n"
         "       rxio-perf SUBCOMMAND [OPTIONS] SERVER    connect to the server at SERVER\n"
         "\n"
         "Subcommands: " + names + ".\n"
         "Both sides take the same options. The output follows perftest's (ib_write_bw and\n"
         "friends), so the two can be diffed.\n"
         "\n"
         "  -d, --ib-dev DEV        RDMA device (default: the first one; `ibv_devices` lists them)\n"
         "  -i, --ib-port PORT      port of the device (default 1)\n"
         "  -x, --gid-index N       source GID index (default: IPv4-mapped RoCE v2 first)\n"
         "  -s, --size BYTES        message size (default 65536 for *_bw, 2 for *_lat)\n"
         "  -a, --all               every size from 2 B to 8 MiB in powers of two\n"
         "  -n, --iters N           iterations per size (at least 5; default 5000 for\n"
         "                          write_bw, 1000 otherwise)\n"
         "  -D, --duration SECONDS  *_bw: run for SECONDS instead of -n iterations\n"
         "  -R, --rdma_cm           connect with rdma_cm (SERVER is then an IP address on an\n"
         "                          RDMA device) instead of exchanging QP numbers over TCP\n"
         "  -p, --port PORT         TCP or rdma_cm port (default 18515)\n"
         "  -t, --tx-depth N        send queue depth (default 128 for *_bw, 1 for *_lat)\n"
         "  -Q, --cq-mod N          *_bw: request a completion every N sends (default 100,\n"
         "                          at most the tx depth)\n"
         "  -I, --inline_size BYTES send messages up to BYTES inline (default 0)\n"
         "  -u, --qp-timeout N      ACK timeout, 4.096 usec * 2^N, before a retransmission\n"
         "                          (default 14: 67 ms)\n"
         "      --report_gbits      bandwidth in Gb/sec (10^9 bits) instead of MB/sec (2^20 bytes)\n"
         "      --out_json          also write the report as JSON (perftest's keys)\n"
         "      --out_json_file F   ... to F (default perftest_out.json; implies --out_json)\n"
         "      --backend NAME      msg_*: the transport backend, verbs, shm or tcp (default:\n"
         "                          RXIO_BACKEND, else shm on one host, verbs, then tcp)\n"
         "  -h, --help              this text\n"
         "\n"
         "The server waits up to 2 minutes for a client. Every wait on the peer or the device\n"
         "gives up after 10 s without progress, saying what it waited for.\n";
}

Options parse_options(int argc, char** argv) {
  if (argc < 2) throw UsageError("no subcommand given");
  Options options;
  options.mode = find_mode(argv[1]);
  if (!options.mode) throw UsageError(std::string("unknown subcommand '") + argv[1] + "'");
  const bool bandwidth = options.mode->kind == Kind::bandwidth;

  static const option long_options[] = {
      {"ib-dev", required_argument, nullptr, 'd'},
      {"ib-port", required_argument, nullptr, 'i'},
      {"gid-index", required_argument, nullptr, 'x'},
      {"size", required_argument, nullptr, 's'},
      {"all", no_argument, nullptr, 'a'},
      {"iters", required_argument, nullptr, 'n'},
      {"duration", required_argument, nullptr, 'D'},
      {"rdma_cm", no_argument, nullptr, 'R'},
      {"port", required_argument, nullptr, 'p'},
      {"tx-depth", required_argument, nullptr, 't'},
      {"cq-mod", required_argument, nullptr, 'Q'},
      {"inline_size", required_argument, nullptr, 'I'},
      {"qp-timeout", required_argument, nullptr, 'u'},
      {"report_gbits", no_argument, nullptr, kReportGbits},
      {"out_json", no_argument, nullptr, kOutJson},
      {"out_json_file", required_argument, nullptr, kOutJsonFile},
      {"backend", required_argument, nullptr, kBackend},
      {"help", no_argument, nullptr, 'h'},
      {nullptr, 0, nullptr, 0}};

  bool have_size = false, have_iters = false, have_cq_mod = false;
  optind = 1;
  opterr = 0;  // our own messages
  const int sub_argc = argc - 1;
  char** sub_argv = argv + 1;
  for (int c; (c = getopt_long(sub_argc, sub_argv, ":d:i:x:s:an:D:Rp:t:Q:I:u:h", long_options, nullptr)) != -1;) {
    switch (c) {
      case 'd': options.device = optarg; break;
      case 'i': options.ib_port = static_cast<uint8_t>(parse_number(optarg, 1, 255, "-i/--ib-port")); break;
      case 'x': options.gid_index = static_cast<int>(parse_number(optarg, 0, 255, "-x/--gid-index")); break;
      case 's':
        options.sizes = {parse_number(optarg, 1, kMaxSize, "-s/--size")};
        have_size = true;
        break;
      case 'a': options.all_sizes = true; break;
      case 'n':
        options.iterations = static_cast<uint32_t>(parse_number(optarg, 5, 100'000'000, "-n/--iters"));
        have_iters = true;
        break;
      case 'D': options.duration_s = static_cast<uint32_t>(parse_number(optarg, 1, 86400, "-D/--duration")); break;
      case 'R': options.rdma_cm = true; break;
      case 'p': options.port = static_cast<uint16_t>(parse_number(optarg, 1, 65535, "-p/--port")); break;
      case 't': options.tx_depth = static_cast<uint32_t>(parse_number(optarg, 1, 16384, "-t/--tx-depth")); break;
      case 'Q':
        options.cq_moderation = static_cast<uint32_t>(parse_number(optarg, 1, 16384, "-Q/--cq-mod"));
        have_cq_mod = true;
        break;
      case 'I': options.inline_size = static_cast<uint32_t>(parse_number(optarg, 0, 1024, "-I/--inline_size")); break;
      case 'u': options.qp_timeout = static_cast<uint8_t>(parse_number(optarg, 1, 31, "-u/--qp-timeout")); break;
      case kReportGbits: options.report_gbits = true; break;
      case kOutJson: options.out_json = true; break;
      case kOutJsonFile:
        options.json_file = optarg;
        options.out_json = true;
        break;
      case kBackend:
        options.backend = optarg;
        if (options.backend != "verbs" && options.backend != "shm" && options.backend != "tcp")
          throw UsageError("--backend wants verbs, shm or tcp, not '" + options.backend + "'");
        break;
      case 'h': throw UsageError("");
      case ':': throw UsageError(std::string(sub_argv[optind - 1]) + " needs a value");
      default:
        throw UsageError("unknown option '" + std::string(sub_argv[optind - 1]) + "'");
    }
  }
  if (optind < sub_argc) options.server = sub_argv[optind++];
  if (optind < sub_argc) throw UsageError(std::string("unexpected argument '") + sub_argv[optind] + "'");

  if (options.all_sizes && have_size) throw UsageError("-a/--all and -s/--size exclude each other");
  if (options.duration_s != 0 && have_iters) throw UsageError("-D/--duration and -n/--iters exclude each other");
  if (options.duration_s != 0 && !bandwidth)
    throw UsageError("-D/--duration is for the *_bw subcommands; latency takes -n/--iters");
  if (options.inline_size != 0 && !options.mode->can_inline)
    throw UsageError(std::string(options.mode->name) + " cannot send inline (-I): READ carries no data out");
  if (!bandwidth && have_cq_mod) throw UsageError("-Q/--cq-mod is for the *_bw subcommands");
  if (!options.backend.empty() && !std::string_view(options.mode->name).starts_with("msg_"))
    throw UsageError("--backend is for msg_bw and msg_lat; the other subcommands are verbs");

  if (options.all_sizes) {
    options.sizes.clear();
    for (unsigned log2 = 1; log2 <= kAllSizesLog2Max; ++log2) options.sizes.push_back(std::size_t{1} << log2);
  } else if (!have_size) {
    options.sizes = {bandwidth ? 65536u : 2u};
  }
  if (!have_iters) options.iterations = options.mode->default_iterations;
  if (options.tx_depth == 0) options.tx_depth = bandwidth ? 128 : 1;
  if (!have_cq_mod) options.cq_moderation = std::min<uint32_t>(100, options.tx_depth);
  if (options.cq_moderation > options.tx_depth)
    throw UsageError("-Q/--cq-mod " + std::to_string(options.cq_moderation) + " is more than the tx depth (" +
                     std::to_string(options.tx_depth) + "): no completion would ever free the queue");
  return options;
}

}  // namespace rxio::perf
