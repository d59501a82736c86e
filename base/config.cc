#include "base/config.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>

#include "base/error.h"

namespace rxio::config {
namespace {

// Kept sorted by name.
const std::vector<Knob> kKnobs = {
    {"RXIO_BACKEND", "choice", "auto",
     "How to reach a peer: auto (shm on the same host, else verbs where both ends have "
     "an RDMA device, else tcp), verbs, shm or tcp. Both ends must allow the backend."},
    {"RXIO_CONNECT_TIMEOUT_MS", "milliseconds", "10000",
     "How long connecting (bootstrap and the link's set-up) may take before it fails."},
    {"RXIO_DEVICE", "text", "auto",
     "The RDMA device an engine uses (as `ibv_devices` names it), where it finds its peers "
     "itself rather than through rdma_cm: auto, the first one."},
    {"RXIO_EAGER_LIMIT", "bytes", "0",
     "Largest message sent through the ring; larger ones go by rendezvous (written "
     "straight into the receiver's buffer). 0: the slot payload (RXIO_SLOT_SIZE - 16)."},
    {"RXIO_FAULT_LINKS", "count", "0",
     "Fault injection, for tests: how many links RXIO_FAULT_LINK_AFTER fails, the first "
     "to reach it; the others hold. 0: every one."},
    {"RXIO_FAULT_LINK_AFTER", "count", "0",
     "Fault injection, for tests: every link of the process fails itself, as a failed "
     "completion would (its QP to the error state, its shm or tcp connection shut), once it "
     "has written this many ring slots. 0: never."},
    {"RXIO_LOG", "choice", "warn",
     "What rxio writes on stderr: warn (problems only) or info (also each link's backend "
     "and why it was chosen)."},
    {"RXIO_POLL_US", "microseconds", "1000",
     "Busy-poll this long before blocking on the completion channel."},
    {"RXIO_QP_RETRY_COUNT", "count", "7",
     "RC retries before a silent peer fails the link (with RXIO_QP_TIMEOUT)."},
    {"RXIO_QP_TIMEOUT", "count", "14",
     "RC ack timeout exponent: 4.096 us * 2^N per try (14 is about 67 ms)."},
    {"RXIO_RING_SLOTS", "count", "16",
     "Slots in each connection's receive ring: the credits a sender starts with."},
    {"RXIO_SHIM_CONFIG", "path", "/etc/rxio/shim.conf",
     "File of rules for the preload shim, read after RXIO_SHIM_RULES. The default file "
     "may be absent (no rules); a file this variable names must exist."},
    // "# none": a rules text with no rules (a comment), since every knob shows a default.
    {"RXIO_SHIM_MOVE_AFTER", "count", "8",
     "Data calls (reads and writes) a client makes on a TCP connection before the preload shim "
     "moves it: short-lived connections finish on TCP without a negotiation. 0 or 1 moves it at "
     "the first call."},
    {"RXIO_SHIM_MOVE_AGAIN", "count", "3",
     "How many times a connection that went back to TCP because its link failed moves again, "
     "onto a new link: after 16 times RXIO_SHIM_MOVE_AFTER more data calls, then 256 times, and "
     "so on. 0: it stays on TCP; at most 7."},
    {"RXIO_SHIM_RULES", "text", "# none",
     "Rules for the preload shim, checked before RXIO_SHIM_CONFIG's: entries 'allow|deny "
     "ADDRESS[/PREFIX][:PORT[-PORT]]' separated by newlines, ';' or ','. The first match "
     "decides; a connection no rule matches is moved."},
    {"RXIO_SHIM_TIMEOUT_MS", "milliseconds", "1000",
     "How long the shim waits for the peer's shim to answer a negotiation before the connection stays on TCP"},
    {"RXIO_SHM_ARENA", "bytes", "1G",
     "Shared memory each side of an shm link may use for its rings (address space; "
     "pages cost memory once touched). About 200 KiB per connection with the defaults."},
    {"RXIO_SLOT_SIZE", "bytes", "8K",
     "Bytes per ring slot, 16-byte header included."},
    {"RXIO_STAT_DIR", "path", "/dev/shm",
     "Where each process under the preload shim publishes its connections and counters "
     "(file rxio-stat.PID) for rxio-stat to list."},
    {"RXIO_TCP_IO", "choice", "uring",
     "How the tcp backend moves bytes: uring (io_uring where the kernel allows it, with "
     "the reason logged where not) or plain (non-blocking system calls)."},
};

const Knob* find(std::string_view name) {
  for (const auto& knob : kKnobs)
    if (knob.name == name) return &knob;
  return nullptr;
}

const Knob& require(std::string_view name) {
  if (const Knob* knob = find(name)) return *knob;
  throw Error(EINVAL, "reading unknown setting " + std::string(name));
}

[[noreturn]] void bad_value(const Knob& knob, const std::string& text) {
  throw Error(EINVAL, "reading " + std::string(knob.name) + "='" + text + "'", {},
              "expected " + std::string(knob.type) + "; unset it for the default " +
                  std::string(knob.default_text));
}

}  // namespace

const std::vector<Knob>& knobs() { return kKnobs; }

Setting setting(std::string_view name) {
  const Knob& knob = require(name);
  const char* value = std::getenv(std::string(name).c_str());
  if (value && *value) return {value, "environment"};
  return {std::string(knob.default_text), "default"};
}

bool parse_count(std::string_view text, uint64_t& out) {
  if (text.empty()) return false;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size();
}

bool parse_bytes(std::string_view text, uint64_t& out) {
  std::size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  uint64_t number = 0;
  if (!parse_count(text.substr(0, digits), number)) return false;
  std::string_view unit = text.substr(digits);
  int shift = 0;
  if (unit.empty() || unit == "B") shift = 0;
  else if (unit == "K" || unit == "KiB" || unit == "k") shift = 10;
  else if (unit == "M" || unit == "MiB") shift = 20;
  else if (unit == "G" || unit == "GiB") shift = 30;
  else return false;
  if (number > (UINT64_MAX >> shift)) return false;
  out = number << shift;
  return true;
}

namespace {

uint64_t get_parsed(std::string_view name, bool (*parse)(std::string_view, uint64_t&)) {
  const Knob& knob = require(name);
  Setting s = setting(name);
  uint64_t value = 0;
  if (!parse(s.text, value)) bad_value(knob, s.text);
  return value;
}

}  // namespace

uint64_t get_count(std::string_view name) { return get_parsed(name, parse_count); }
uint64_t get_bytes(std::string_view name) { return get_parsed(name, parse_bytes); }

std::string get_text(std::string_view name) { return setting(name).text; }

std::string get_choice(std::string_view name, std::initializer_list<std::string_view> allowed) {
  const Knob& knob = require(name);
  Setting s = setting(name);
  if (std::find(allowed.begin(), allowed.end(), s.text) != allowed.end()) return s.text;
  std::string list;
  for (std::string_view a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
  throw Error(EINVAL, "reading " + std::string(knob.name) + "='" + s.text + "'", {},
              "expected one of " + list + "; unset it for the default " + std::string(knob.default_text));
}

}  // namespace rxio::config
