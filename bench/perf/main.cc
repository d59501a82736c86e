// rxio-perf: perftest's tests (ib_write_bw, ib_read_lat, ...) as subcommands, with
// perftest's flags and output, so rxio's paths can be held against the tool people
// already trust. See `rxio-perf --help` and docs/benchmarks.md.
#include <cstdio>
#include <cstring>
#include <string>

#include "base/error.h"
#include "bench/perf/modes.h"
#include "bench/perf/options.h"

int main(int argc, char** argv) {
  using namespace rxio::perf;
  if (argc < 2 || std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "--help") == 0) {
    std::fputs(usage().c_str(), argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  Options options;
  try {
    options = parse_options(argc, argv);
  } catch (const UsageError& e) {
    const bool help = *e.what() == '\0';
    if (!help) std::fprintf(stderr, "rxio-perf: %s\n\n", e.what());
    std::fputs(usage().c_str(), help ? stdout : stderr);
    return help ? 0 : 2;
  }
  try {
    options.mode->run(options);
  } catch (const rxio::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "rxio-perf %.*s: %s\n", static_cast<int>(options.mode->name.size()),
                 options.mode->name.data(), e.what());
    return 1;
  }
  return 0;
}
