// Results, their statistics, and the report: perftest's banner and tables on stdout,
// perftest's keys in the JSON file (--out_json).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

namespace rxio::perf {

struct Mode;
struct Options;

struct BandwidthResult {
  uint64_t bytes = 0;
  uint64_t iterations = 0;
  double peak_bytes_per_s = 0;  // 0 where not measured (duration mode, the receiving side)
  double average_bytes_per_s = 0;
  double messages_per_s = 0;
};

struct LatencyResult {
  uint64_t bytes = 0;
  uint64_t iterations = 0;
  double min_us = 0, max_us = 0, typical_us = 0, average_us = 0, stdev_us = 0, p99_us = 0, p999_us = 0;
};

using Result = std::variant<BandwidthResult, LatencyResult>;

// perftest's statistics: typical is the median, percentiles the ceil(n * q)-th
// smallest sample. Sorts `samples_us`, which must not be empty.
LatencyResult latency_result(uint64_t bytes, uint64_t iterations, std::span<double> samples_us);

// perftest's peak: the best rate over any run of consecutive messages [i, j] that
// ends at a completion. posted[i] is when message i was posted; completed[j] when a
// completion covering message j was seen, 0 where none was requested; in ticks of
// `ns_per_tick` nanoseconds.
double peak_bytes_per_s(uint64_t bytes, std::span<const int64_t> posted, std::span<const int64_t> completed,
                        double ns_per_tick);

std::vector<std::byte> encode(const Result& result);
Result decode_result(std::span<const std::byte> message);

// One line of the banner and one key of the JSON "test_info".
struct Field {
  std::string label;  // "TX depth"
  std::string key;    // "TX_depth"
  std::string value;  // "128"
  std::string unit;   // "[B]" in the banner only
  bool numeric = false;
};

class Reporter {
 public:
  Reporter(const Options& options, const Mode& mode);

  void banner(std::vector<Field> fields, const std::vector<std::string>& address_lines);
  void add(const Result& result);  // one table row; the header before the first
  // The closing line and, with --out_json, the file. Throws rxio::Error if it cannot
  // be written.
  void finish();

 private:
  const Options& options_;
  const Mode& mode_;
  std::vector<Field> fields_;
  std::vector<Result> results_;
};

}  // namespace rxio::perf
