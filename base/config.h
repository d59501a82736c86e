// The one registry of RXIO_* settings: each knob is declared once, typed, with a default
// and a description. Values come from the environment; each component reads the ones
// it needs once, when it is created, never on a data path.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

namespace rxio::config {

struct Knob {
  std::string_view name;         // "RXIO_RING_SLOTS"
  std::string_view type;         // "count", "bytes", "microseconds", "milliseconds", "choice", "path", "text"
  std::string_view default_text;
  std::string_view description;
};

// Every knob, sorted by name (for the settings tables and, later, `rxio-stat --config`).
const std::vector<Knob>& knobs();

// A knob's value and where it came from ("default" or "environment").
struct Setting {
  std::string text;
  std::string_view source;
};
Setting setting(std::string_view name);

// Typed readers. They throw rxio::Error when the variable is set to something that is
// not a valid value of its type (a typo must not silently become the default).
uint64_t get_count(std::string_view name);
uint64_t get_bytes(std::string_view name);  // accepts 4096, 64K, 64KiB, 1M, 1MiB, 2G
// The text as set, unchecked: for paths and for texts their reader parses (and reports
// errors in with its own context).
std::string get_text(std::string_view name);
// One of `allowed`, exactly.
std::string get_choice(std::string_view name, std::initializer_list<std::string_view> allowed);

// The parsers, separate for tests: false on bad input.
bool parse_count(std::string_view text, uint64_t& out);
bool parse_bytes(std::string_view text, uint64_t& out);

}  // namespace rxio::config
