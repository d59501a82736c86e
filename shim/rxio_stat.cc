// rxio-stat: lists the connections of every process running under the preload shim,
// and why connections stayed on TCP, from the boards the processes publish in
// RXIO_STAT_DIR (see shim/stat.h). In the manner of SMC's smcss and libvma's vma_stats.
#include <arpa/inet.h>
#include <dirent.h>
#include <getopt.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "base/config.h"
#include "base/error.h"
#include "shim/stat.h"

namespace {

using rxio::shim::Backend;
using rxio::shim::ConnState;
using rxio::shim::Fallback;
using rxio::shim::Return;
using rxio::shim::StatBoardView;
using rxio::shim::StatRecord;

constexpr std::string_view kBoardPrefix = "rxio-stat.";

struct Options {
  bool all = false;
  bool fallbacks = false;
  bool json = false;
  bool clean = false;
  pid_t pid = 0;  // 0: every process
};

void usage(FILE* out) {
  std::fprintf(out,
               "usage: rxio-stat [-a] [-f] [-p PID] [--json] [--clean]\n"
               "Lists the connections of the processes running under rxio-run, one line each.\n"
               "\n"
               "  -a, --all        also the connections that stayed on plain TCP (by default only\n"
               "                   those the shim carries over shm or verbs, or is negotiating)\n"
               "  -f, --fallbacks  counters instead of connections, per process and in total: the\n"
               "                   connections moved per backend (moved:shm, moved:verbs), those\n"
               "                   that stayed on TCP per reason (fallback:REASON, below) and\n"
               "                   moved ones that went back to TCP (returned:link_failed: this\n"
               "                   side's link failed; returned:peer: the peer went back)\n"
               "  -p, --pid PID    only process PID (an error if it has no board)\n"
               "      --json       everything as one JSON object: {\"processes\": [{\"pid\", \"command\",\n"
               "                   \"connections\": [...every one, -a or not], \"fallbacks\": {reason: n},\n"
               "                   \"moved\": {backend: n}, \"returned\": {reason: n}, \"unlisted\"}]}\n"
               "      --clean      remove this user's boards left by processes that died without\n"
               "                   removing them (others' stale boards are skipped)\n"
               "  -h, --help       this text\n"
               "\n"
               "Why a connection stayed on TCP:\n"
               "  policy         a rule (RXIO_SHIM_RULES, RXIO_SHIM_CONFIG) said no\n"
               "  no_peer_shim   the peer runs without the shim\n"
               "  peer_refused   the peer's shim declined (its rules, its limits)\n"
               "  bad_message    a negotiation message was malformed or truncated\n"
               "  impostor       a local process failed the proof that it owns the connection\n"
               "  timeout        the peer's shim did not answer in time\n"
               "  no_backend     no engine here (no RDMA device, RXIO_BACKEND, locked-memory limit)\n"
               "  link_failed    the link to the peer's engine could not be set up\n"
               "  busy           the socket could not pause for the switch (a blocked call, bytes that did not drain)\n"
               "  not_supported  something this version does not move\n"
               "unlisted counts connections the board had no record for (over %u open at once).\n"
               "\n"
               "Boards are the files rxio-stat.PID in RXIO_STAT_DIR (default /dev/shm); the\n"
               "programs and rxio-stat must agree on it.\n",
               rxio::shim::kStatRecords);
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "rxio-stat: %s; see rxio-stat --help\n", message.c_str());
  std::exit(1);
}

Options parse_options(int argc, char** argv) {
  enum LongOnly { kJson = 1000, kClean };
  static const option long_options[] = {{"all", no_argument, nullptr, 'a'},
                                        {"fallbacks", no_argument, nullptr, 'f'},
                                        {"pid", required_argument, nullptr, 'p'},
                                        {"json", no_argument, nullptr, kJson},
                                        {"clean", no_argument, nullptr, kClean},
                                        {"help", no_argument, nullptr, 'h'},
                                        {nullptr, 0, nullptr, 0}};
  Options options;
  opterr = 0;  // our own messages
  for (int c; (c = getopt_long(argc, argv, ":afp:h", long_options, nullptr)) != -1;) {
    switch (c) {
      case 'a': options.all = true; break;
      case 'f': options.fallbacks = true; break;
      case 'p': {
        const std::string_view text(optarg);
        auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), options.pid);
        if (ec != std::errc() || end != text.data() + text.size() || options.pid <= 0)
          usage_error("-p wants a process id, not '" + std::string(text) + "'");
        break;
      }
      case kJson: options.json = true; break;
      case kClean: options.clean = true; break;
      case 'h':
        usage(stdout);
        std::exit(0);
      case ':': usage_error(std::string(argv[optind - 1]) + " needs a value");
      default:
        usage_error(optopt ? std::string("unknown option -") + char(optopt)
                           : "unknown option " + std::string(argv[optind - 1]));
    }
  }
  if (optind != argc) usage_error("unexpected argument '" + std::string(argv[optind]) + "'");
  if (options.json && options.fallbacks) usage_error("--json already holds the counters of -f; give one of them");
  return options;
}

struct Board {
  pid_t pid;
  StatBoardView view;
};

// The live boards in `dir`, by pid; stale ones are skipped (and removed with --clean).
std::vector<Board> read_boards(const std::string& dir, const Options& options) {
  DIR* listing = opendir(dir.c_str());
  if (!listing) {
    std::fprintf(stderr, "rxio-stat: cannot list RXIO_STAT_DIR %s: %s\n", dir.c_str(), std::strerror(errno));
    std::exit(1);
  }
  std::vector<pid_t> pids;
  while (const dirent* entry = readdir(listing)) {
    const std::string_view name(entry->d_name);
    if (!name.starts_with(kBoardPrefix)) continue;
    const std::string_view digits = name.substr(kBoardPrefix.size());
    pid_t pid = 0;
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), pid);
    if (ec == std::errc() && end == digits.data() + digits.size() && pid > 0 && (options.pid == 0 || pid == options.pid))
      pids.push_back(pid);
  }
  closedir(listing);
  std::sort(pids.begin(), pids.end());

  std::vector<Board> boards;
  for (pid_t pid : pids) {
    const std::string path = rxio::shim::board_path(dir, pid);
    try {
      StatBoardView view(path);
      if (view.header().pid != pid)
        throw rxio::Error(EPROTO, "reading the statistics board", path,
                          "it names process " + std::to_string(view.header().pid));
      if (!view.owner_alive()) {
        if (options.clean && view.ours()) ::unlink(path.c_str());
        continue;
      }
      boards.push_back({pid, std::move(view)});
    } catch (const rxio::Error& e) {
      // Gone since the listing, or still being created: not worth a word.
      if (e.code().value() != ENOENT && e.code().value() != EAGAIN)
        std::fprintf(stderr, "rxio-stat: skipping %s\n", e.what());
    }
  }
  return boards;
}

// One record as read (racily) from the board.
struct Connection {
  int fd;
  std::string local, peer;
  Backend backend;
  ConnState state;
  bool server;
  uint64_t sent, received;
};

// "10.0.0.1:6379", "[fe80::1]:22", "-" when unknown.
std::string endpoint(uint8_t family, const uint8_t* address, uint16_t port) {
  char text[INET6_ADDRSTRLEN] = "-";
  if ((family != AF_INET && family != AF_INET6) || !inet_ntop(family, address, text, sizeof text)) return "-";
  if (family == AF_INET6) return "[" + std::string(text) + "]:" + std::to_string(port);
  return std::string(text) + ":" + std::to_string(port);
}

std::vector<Connection> connections(const StatBoardView& view) {
  std::vector<Connection> list;
  for (const StatRecord& record : view.records()) {
    if (record.in_use.load(std::memory_order_acquire) != rxio::shim::kRecordInUse) continue;
    list.push_back({record.fd, endpoint(record.family, record.local, record.local_port),
                    endpoint(record.family, record.peer, record.peer_port), Backend(record.backend),
                    ConnState(record.state), record.role == 1, record.bytes_sent.load(std::memory_order_relaxed),
                    record.bytes_received.load(std::memory_order_relaxed)});
  }
  std::sort(list.begin(), list.end(), [](const Connection& a, const Connection& b) { return a.fd < b.fd; });
  return list;
}

uint64_t fallbacks(const StatBoardView& view, std::size_t reason) {
  return view.header().fallbacks[reason].load(std::memory_order_relaxed);
}
uint64_t moved(const StatBoardView& view, std::size_t backend) {
  return view.header().moved[backend].load(std::memory_order_relaxed);
}
uint64_t returned(const StatBoardView& view, std::size_t reason) {
  return view.header().returned[reason].load(std::memory_order_relaxed);
}
uint64_t unlisted(const StatBoardView& view) { return view.header().unlisted.load(std::memory_order_relaxed); }

void print_connections(const std::vector<Board>& boards, const Options& options) {
  std::printf("%-7s %-16s %4s  %-21s %-21s %-8s %-11s %12s %12s  %s\n", "PID", "COMMAND", "FD", "LOCAL", "PEER",
              "BACKEND", "STATE", "SENT", "RECEIVED", "ROLE");
  for (const Board& board : boards) {
    const std::string command = board.view.command();
    for (const Connection& c : connections(board.view)) {
      // Without -a, a connection that stays on TCP is the kernel's business, not the shim's.
      if (!options.all && c.backend == Backend::tcp && c.state != ConnState::negotiating) continue;
      std::printf("%-7d %-16s %4d  %-21s %-21s %-8s %-11s %12llu %12llu  %s\n", int(board.pid), command.c_str(), c.fd,
                  c.local.c_str(), c.peer.c_str(), to_string(c.backend), to_string(c.state),
                  static_cast<unsigned long long>(c.sent), static_cast<unsigned long long>(c.received),
                  c.server ? "server" : "client");
    }
  }
}

void print_counters(const std::vector<Board>& boards) {
  std::printf("%-7s %-16s %-26s %10s\n", "PID", "COMMAND", "COUNTER", "COUNT");
  uint64_t total_moved[rxio::shim::kBackends] = {}, total_fallbacks[rxio::shim::kFallbacks] = {},
           total_returned[rxio::shim::kReturns] = {}, total_unlisted = 0;
  auto line = [](const std::string& pid, const std::string& command, const std::string& counter, uint64_t n) {
    if (n != 0)
      std::printf("%-7s %-16s %-26s %10llu\n", pid.c_str(), command.c_str(), counter.c_str(),
                  static_cast<unsigned long long>(n));
  };
  for (const Board& board : boards) {
    const std::string pid = std::to_string(board.pid), command = board.view.command();
    for (std::size_t b = 0; b < rxio::shim::kBackends; ++b) {
      line(pid, command, std::string("moved:") + to_string(Backend(b)), moved(board.view, b));
      total_moved[b] += moved(board.view, b);
    }
    for (std::size_t r = 0; r < rxio::shim::kFallbacks; ++r) {
      line(pid, command, std::string("fallback:") + to_string(Fallback(r)), fallbacks(board.view, r));
      total_fallbacks[r] += fallbacks(board.view, r);
    }
    for (std::size_t r = 0; r < rxio::shim::kReturns; ++r) {
      line(pid, command, std::string("returned:") + to_string(Return(r)), returned(board.view, r));
      total_returned[r] += returned(board.view, r);
    }
    line(pid, command, "unlisted", unlisted(board.view));
    total_unlisted += unlisted(board.view);
  }
  for (std::size_t b = 0; b < rxio::shim::kBackends; ++b)
    line("total", "", std::string("moved:") + to_string(Backend(b)), total_moved[b]);
  for (std::size_t r = 0; r < rxio::shim::kFallbacks; ++r)
    line("total", "", std::string("fallback:") + to_string(Fallback(r)), total_fallbacks[r]);
  for (std::size_t r = 0; r < rxio::shim::kReturns; ++r)
    line("total", "", std::string("returned:") + to_string(Return(r)), total_returned[r]);
  line("total", "", "unlisted", total_unlisted);
}

// A JSON string: the command is printable ASCII already, so only quotes and
// backslashes need escaping.
std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

void print_json(const std::vector<Board>& boards) {
  std::string out = "{\"processes\": [";
  for (std::size_t i = 0; i < boards.size(); ++i) {
    const StatBoardView& view = boards[i].view;
    out += i ? ",\n  " : "\n  ";
    out += "{\"pid\": " + std::to_string(boards[i].pid) + ", \"command\": " + quoted(view.command()) +
           ", \"connections\": [";
    const std::vector<Connection> list = connections(view);
    for (std::size_t j = 0; j < list.size(); ++j) {
      const Connection& c = list[j];
      out += j ? ", " : "";
      out += "{\"fd\": " + std::to_string(c.fd) + ", \"local\": " + quoted(c.local) + ", \"peer\": " + quoted(c.peer) +
             ", \"backend\": " + quoted(to_string(c.backend)) + ", \"state\": " + quoted(to_string(c.state)) +
             ", \"role\": " + quoted(c.server ? "server" : "client") + ", \"bytes_sent\": " + std::to_string(c.sent) +
             ", \"bytes_received\": " + std::to_string(c.received) + "}";
    }
    out += "], \"fallbacks\": {";
    for (std::size_t r = 0; r < rxio::shim::kFallbacks; ++r)
      out += std::string(r ? ", " : "") + quoted(to_string(Fallback(r))) + ": " + std::to_string(fallbacks(view, r));
    out += "}, \"moved\": {";
    for (std::size_t b = 0; b < rxio::shim::kBackends; ++b)
      out += std::string(b ? ", " : "") + quoted(to_string(Backend(b))) + ": " + std::to_string(moved(view, b));
    out += "}, \"returned\": {";
    for (std::size_t r = 0; r < rxio::shim::kReturns; ++r)
      out += std::string(r ? ", " : "") + quoted(to_string(Return(r))) + ": " + std::to_string(returned(view, r));
    out += "}, \"unlisted\": " + std::to_string(unlisted(view)) + "}";
  }
  out += boards.empty() ? "]}\n" : "\n]}\n";
  std::fputs(out.c_str(), stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  const std::string dir = rxio::config::get_text("RXIO_STAT_DIR");
  const std::vector<Board> boards = read_boards(dir, options);
  if (options.pid != 0 && boards.empty()) {
    std::fprintf(stderr,
                 "rxio-stat: process %d has no board in %s (is it running under rxio-run, with the same "
                 "RXIO_STAT_DIR?)\n",
                 int(options.pid), dir.c_str());
    return 1;
  }
  if (options.json) print_json(boards);
  else if (options.fallbacks) print_counters(boards);
  else print_connections(boards, options);
  return 0;
}
