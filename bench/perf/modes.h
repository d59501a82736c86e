// The table of rxio-perf's subcommands. A new one is an entry in modes.cc and the
// function that runs it (one side: server or client, as the options say).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

namespace rxio::perf {

struct Options;

enum class Kind { bandwidth, latency };

struct Mode {
  std::string_view name;   // the subcommand
  std::string_view title;  // perftest's name for the test: banner and JSON "test"
  Kind kind;
  bool can_inline;         // READ moves no data from the sender's WQE
  uint32_t default_iterations;
  // Runs the test; prints and writes the report. Throws rxio::Error.
  void (*run)(const Options&);
};

std::span<const Mode> modes();
const Mode* find_mode(std::string_view name);

}  // namespace rxio::perf
