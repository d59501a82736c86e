#include "bench/perf/report.h"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>

#include "base/error.h"
#include "bench/perf/codec.h"
#include "bench/perf/modes.h"
#include "bench/perf/options.h"

namespace rxio::perf {
namespace {

constexpr const char* kLine = "---------------------------------------------------------------------------------------\n";
constexpr double kMiB = 1024.0 * 1024.0;  // perftest's "MB" is 2^20 bytes
enum : uint8_t { kBandwidth = 1, kLatency = 2 };

// The value at rank ceil(n * q) (1-based) of sorted samples, as perftest picks it.
double percentile(std::span<const double> sorted, double q) {
  auto rank = static_cast<std::size_t>(std::ceil(static_cast<double>(sorted.size()) * q));
  return sorted[std::clamp<std::size_t>(rank, 1, sorted.size()) - 1];
}

struct Units {
  double bandwidth_divisor;  // bytes/s per unit
  const char* header;
};

Units units(const Options& options) {
  if (options.report_gbits)
    return {1e9 / 8, " #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]\n"};
  return {kMiB, " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n"};
}

constexpr const char* kLatencyHeader =
    " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   "
    "99% percentile[usec]   99.9% percentile[usec] \n";

std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
      continue;
    }
    out += c;
  }
  return out + "\"";
}

std::string fixed(double value, int decimals) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", decimals, std::isfinite(value) ? value : 0.0);
  return text;
}

}  // namespace

LatencyResult latency_result(uint64_t bytes, uint64_t iterations, std::span<double> samples_us) {
  std::sort(samples_us.begin(), samples_us.end());
  const std::size_t n = samples_us.size();
  LatencyResult r;
  r.bytes = bytes;
  r.iterations = iterations;
  r.min_us = samples_us.front();
  r.max_us = samples_us.back();
  r.typical_us = n % 2 ? samples_us[n / 2] : (samples_us[n / 2 - 1] + samples_us[n / 2]) / 2;
  r.average_us = std::accumulate(samples_us.begin(), samples_us.end(), 0.0) / static_cast<double>(n);
  double squares = 0;
  for (double s : samples_us) squares += (s - r.average_us) * (s - r.average_us);
  r.stdev_us = std::sqrt(squares / static_cast<double>(n));
  r.p99_us = percentile(samples_us, 0.99);
  r.p999_us = percentile(samples_us, 0.999);
  return r;
}

double peak_bytes_per_s(uint64_t bytes, std::span<const int64_t> posted, std::span<const int64_t> completed,
                        double ns_per_tick) {
  double best_messages_per_tick = 0;
  for (std::size_t j = 0; j < completed.size(); ++j) {
    if (completed[j] == 0) continue;
    for (std::size_t i = 0; i <= j; ++i) {
      const int64_t span = completed[j] - posted[i];
      if (span > 0)
        best_messages_per_tick = std::max(best_messages_per_tick, static_cast<double>(j - i + 1) / static_cast<double>(span));
    }
  }
  return static_cast<double>(bytes) * best_messages_per_tick * 1e9 / ns_per_tick;
}

std::vector<std::byte> encode(const Result& result) {
  Writer w;
  if (const auto* bw = std::get_if<BandwidthResult>(&result)) {
    w.u8(kBandwidth).u64(bw->bytes).u64(bw->iterations);
    w.f64(bw->peak_bytes_per_s).f64(bw->average_bytes_per_s).f64(bw->messages_per_s);
  } else {
    const auto& lat = std::get<LatencyResult>(result);
    w.u8(kLatency).u64(lat.bytes).u64(lat.iterations);
    w.f64(lat.min_us).f64(lat.max_us).f64(lat.typical_us).f64(lat.average_us);
    w.f64(lat.stdev_us).f64(lat.p99_us).f64(lat.p999_us);
  }
  return w.data();
}

Result decode_result(std::span<const std::byte> message) {
  Reader r(message, "the peer's result");
  const uint8_t kind = r.u8();
  if (kind == kBandwidth) {
    BandwidthResult bw;
    bw.bytes = r.u64();
    bw.iterations = r.u64();
    bw.peak_bytes_per_s = r.f64();
    bw.average_bytes_per_s = r.f64();
    bw.messages_per_s = r.f64();
    return bw;
  }
  if (kind != kLatency)
    throw Error(EPROTO, "decoding the peer's result: unknown kind " + std::to_string(kind), {},
                "run the same rxio-perf version on both sides");
  LatencyResult lat;
  lat.bytes = r.u64();
  lat.iterations = r.u64();
  lat.min_us = r.f64();
  lat.max_us = r.f64();
  lat.typical_us = r.f64();
  lat.average_us = r.f64();
  lat.stdev_us = r.f64();
  lat.p99_us = r.f64();
  lat.p999_us = r.f64();
  return lat;
}

Reporter::Reporter(const Options& options, const Mode& mode) : options_(options), mode_(mode) {}

void Reporter::banner(std::vector<Field> fields, const std::vector<std::string>& address_lines) {
  fields_ = std::move(fields);
  std::printf("%s                    %.*s\n", kLine, static_cast<int>(mode_.title.size()), mode_.title.data());
  for (const Field& f : fields_) std::printf(" %-16s: %s%s\n", f.label.c_str(), f.value.c_str(), f.unit.c_str());
  std::printf("%s", kLine);
  for (const std::string& line : address_lines) std::printf(" %s\n", line.c_str());
  std::printf("%s", kLine);
  std::fflush(stdout);
}

void Reporter::add(const Result& result) {
  if (results_.empty())
    std::printf("%s", mode_.kind == Kind::bandwidth ? units(options_).header : kLatencyHeader);
  if (const auto* bw = std::get_if<BandwidthResult>(&result)) {
    const double divisor = units(options_).bandwidth_divisor;
    std::printf(" %-7" PRIu64 "    %-10" PRIu64 "       %-7.2f            %-7.2f\t\t   %-7.6f\n", bw->bytes,
                bw->iterations, bw->peak_bytes_per_s / divisor, bw->average_bytes_per_s / divisor,
                bw->messages_per_s / 1e6);
  } else {
    const auto& l = std::get<LatencyResult>(result);
    std::printf(" %-7" PRIu64 " %-7" PRIu64 "      %-7.2f        %-7.2f      %-7.2f  \t       %-7.2f     \t%-7.2f\t\t%-7.2f \t\t%-7.2f\n",
                l.bytes, l.iterations, l.min_us, l.max_us, l.typical_us, l.average_us, l.stdev_us, l.p99_us,
                l.p999_us);
  }
  std::fflush(stdout);
  results_.push_back(result);
}

void Reporter::finish() {
  std::printf("%s", kLine);
  std::fflush(stdout);
  if (!options_.out_json) return;

  std::string test(mode_.title);
  std::replace(test.begin(), test.end(), ' ', '_');
  std::string json = "{\n  \"test_info\": {\n    \"test\": " + json_string(test);
  for (const Field& f : fields_)
    json += ",\n    " + json_string(f.key) + ": " + (f.numeric ? f.value : json_string(f.value));
  json += "\n  },\n  \"results\": ";
  const double divisor = units(options_).bandwidth_divisor;
  std::string rows;
  for (const Result& result : results_) {
    std::string row = rows.empty() ? "" : ", ";
    if (const auto* bw = std::get_if<BandwidthResult>(&result)) {
      row += "{\"MsgSize\": " + std::to_string(bw->bytes) + ", \"n_iterations\": " + std::to_string(bw->iterations) +
             ", \"BW_peak\": " + fixed(bw->peak_bytes_per_s / divisor, 2) +
             ", \"BW_average\": " + fixed(bw->average_bytes_per_s / divisor, 2) +
             ", \"MsgRate\": " + fixed(bw->messages_per_s / 1e6, 6) + "}";
    } else {
      const auto& l = std::get<LatencyResult>(result);
      row += "{\"MsgSize\": " + std::to_string(l.bytes) + ", \"n_iterations\": " + std::to_string(l.iterations) +
             ", \"t_min\": " + fixed(l.min_us, 2) + ", \"t_max\": " + fixed(l.max_us, 2) +
             ", \"t_typical\": " + fixed(l.typical_us, 2) + ", \"t_avg\": " + fixed(l.average_us, 2) +
             ", \"t_stdev\": " + fixed(l.stdev_us, 2) + ", \"percentile_99\": " + fixed(l.p99_us, 2) +
             ", \"percentile_99.9\": " + fixed(l.p999_us, 2) + "}";
    }
    rows += row;
  }
  // One size gives perftest's object; --all gives an array of them.
  json += (options_.all_sizes ? "[" + rows + "]" : rows) + "\n}\n";

  std::ofstream out(options_.json_file, std::ios::trunc);
  out << json;
  out.close();
  if (!out) throw Error(errno, "writing the JSON report", options_.json_file, "check that its directory exists and is writable");
}

}  // namespace rxio::perf
