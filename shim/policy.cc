#include "shim/policy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <string>

#include "base/config.h"
#include "base/error.h"
#include "base/fd.h"

namespace rxio::shim {
namespace {

constexpr std::string_view kSyntax =
    "write entries as 'allow|deny ADDRESS[/PREFIX][:PORT[-PORT]]' with ADDRESS an IPv4 "
    "address, an IPv6 address in brackets or *, for example 'deny 10.0.0.0/8', "
    "'allow *:6379', 'deny [::1]:22'";

constexpr std::array<uint8_t, 12> kV4MappedPrefix = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

std::string_view trim(std::string_view text) {
  constexpr std::string_view kBlank = " \t\r";
  const std::size_t first = text.find_first_not_of(kBlank);
  if (first == std::string_view::npos) return {};
  return text.substr(first, text.find_last_not_of(kBlank) - first + 1);
}

// A whole decimal number no larger than `limit`.
bool parse_number(std::string_view text, unsigned limit, unsigned& out) {
  if (text.empty() || text.size() > 5) return false;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size() && out <= limit;
}

// Reports a bad entry; `reason` says what is wrong with it.
class EntryError {
 public:
  EntryError(std::string_view entry, std::string where) : entry_(entry), where_(std::move(where)) {}
  [[noreturn]] void operator()(const std::string& reason) const {
    throw Error(EINVAL, "reading shim rule '" + std::string(entry_) + "': " + reason, where_, kSyntax);
  }

 private:
  std::string_view entry_;
  std::string where_;
};

void parse_ports(std::string_view text, uint16_t& first, uint16_t& last, const EntryError& fail) {
  if (text == "*") return;
  const std::size_t dash = text.find('-');
  unsigned low = 0, high = 0;
  if (!parse_number(text.substr(0, dash), 65535, low))
    fail("'" + std::string(text) + "' is not a port (0 to 65535), a range PORT-PORT or *");
  high = low;
  if (dash != std::string_view::npos && !parse_number(text.substr(dash + 1), 65535, high))
    fail("'" + std::string(text) + "' is not a port range PORT-PORT (0 to 65535)");
  if (high < low) fail("the range " + std::string(text) + " ends before it starts");
  first = uint16_t(low);
  last = uint16_t(high);
}

}  // namespace

Policy Policy::parse(std::string_view text, std::string_view origin) {
  Policy policy;
  const bool several_lines = text.find('\n') != std::string_view::npos;
  std::size_t line_number = 0;
  for (std::size_t line_start = 0; line_start <= text.size();) {
    const std::size_t line_end = std::min(text.find('\n', line_start), text.size());
    std::string_view line = text.substr(line_start, line_end - line_start);
    line_start = line_end + 1;
    ++line_number;
    line = line.substr(0, line.find('#'));
    for (std::size_t entry_start = 0; entry_start <= line.size();) {
      const std::size_t entry_end = std::min(line.find_first_of(";,", entry_start), line.size());
      const std::string_view entry = trim(line.substr(entry_start, entry_end - entry_start));
      entry_start = entry_end + 1;
      if (entry.empty()) continue;
      policy.rules_.push_back(parse_rule(
          entry, several_lines ? std::string(origin) + ":" + std::to_string(line_number) : std::string(origin)));
    }
  }
  return policy;
}

Policy::Rule Policy::parse_rule(std::string_view entry, std::string where) {
  const EntryError fail(entry, std::move(where));
  Rule rule;
  const std::size_t verb_end = entry.find_first_of(" \t");
  const std::string_view verb = entry.substr(0, verb_end);
  if (verb == "allow") rule.allow = true;
  else if (verb != "deny") fail("'" + std::string(verb) + "' is neither allow nor deny");
  const std::string_view target = verb_end == std::string_view::npos ? "" : trim(entry.substr(verb_end));
  if (target.empty()) fail("no address after " + std::string(verb) + " (write * for any)");
  if (target.find_first_of(" \t") != std::string_view::npos) fail("one address per entry");

  // Split the target into its address, prefix and ports.
  std::string_view address, prefix, rest;
  if (target.front() == '[') {
    const std::size_t close = target.find(']');
    if (close == std::string_view::npos) fail("'[' without its ']'");
    address = target.substr(1, close - 1);
    if (const std::size_t slash = address.find('/'); slash != std::string_view::npos) {
      prefix = address.substr(slash + 1);
      address = address.substr(0, slash);
    }
    rest = target.substr(close + 1);
    rule.family = AF_INET6;
  } else {
    if (target.find(':') != target.rfind(':')) fail("an IPv6 address must be in brackets, as in [::1]:22");
    const std::size_t end = target.find_first_of("/:");
    address = target.substr(0, end);
    rest = end == std::string_view::npos ? "" : target.substr(end);
    if (address != "*") rule.family = AF_INET;
  }
  if (!rest.empty() && rest.front() == '/') {
    if (!prefix.empty()) fail("two prefixes");
    const std::size_t colon = rest.find(':');
    prefix = rest.substr(1, colon == std::string_view::npos ? colon : colon - 1);
    rest = colon == std::string_view::npos ? "" : rest.substr(colon);
    if (prefix.empty()) fail("'/' without a prefix length");
  }
  if (!rest.empty()) {
    if (rest.front() != ':') fail("'" + std::string(rest) + "' after the address");
    if (rest.size() == 1) fail("':' without a port");
    parse_ports(rest.substr(1), rule.first_port, rule.last_port, fail);
  }

  if (rule.family == AF_UNSPEC) {
    if (!prefix.empty()) fail("* takes no prefix: it is every address already");
    return rule;
  }
  const unsigned max_prefix = rule.family == AF_INET ? 32 : 128;
  const std::string not_an_address =
      "'" + std::string(address) + "' is not an " + (rule.family == AF_INET ? "IPv4" : "IPv6") + " address";
  char text_address[INET6_ADDRSTRLEN] = {};
  if (address.size() >= sizeof text_address) fail(not_an_address);
  std::memcpy(text_address, address.data(), address.size());
  if (inet_pton(rule.family, text_address, rule.address.data()) != 1) fail(not_an_address);
  unsigned bits = max_prefix;
  if (!prefix.empty() && !parse_number(prefix, max_prefix, bits))
    fail("prefix /" + std::string(prefix) + " is not a length of 0 to " + std::to_string(max_prefix) + " bits");
  rule.prefix = uint8_t(bits);
  // An IPv4-mapped rule is an IPv4 rule, as connections from mapped addresses are matched as IPv4.
  if (rule.family == AF_INET6 && rule.prefix >= 96 &&
      std::memcmp(rule.address.data(), kV4MappedPrefix.data(), kV4MappedPrefix.size()) == 0) {
    std::memmove(rule.address.data(), rule.address.data() + kV4MappedPrefix.size(), 4);
    std::memset(rule.address.data() + 4, 0, rule.address.size() - 4);
    rule.family = AF_INET;
    rule.prefix = uint8_t(rule.prefix - 96);
  }
  // Clear the host bits, so that 10.1.2.3/8 means 10.0.0.0/8.
  for (unsigned bit = rule.prefix; bit < 128; ++bit) rule.address[bit / 8] &= uint8_t(~(0x80u >> (bit % 8)));
  return rule;
}

Policy Policy::from_environment() {
  Policy policy = parse(config::get_text("RXIO_SHIM_RULES"), "RXIO_SHIM_RULES");
  const config::Setting file = config::setting("RXIO_SHIM_CONFIG");
  UniqueFd fd(::open(file.text.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT && file.source == "default") return policy;
    throw Error(errno, "opening the shim rules file", file.text,
                file.source == "default"
                    ? "make it readable, or point RXIO_SHIM_CONFIG at another file"
                    : "RXIO_SHIM_CONFIG names it: create it, or unset the variable (the default file may be "
                      "absent)");
  }
  std::string text;
  char chunk[4096];
  for (;;) {
    const ssize_t n = ::read(fd.get(), chunk, sizeof chunk);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(errno, "reading the shim rules file", file.text);
    }
    text.append(chunk, std::size_t(n));
  }
  Policy from_file = parse(text, file.text);
  policy.rules_.insert(policy.rules_.end(), from_file.rules_.begin(), from_file.rules_.end());
  return policy;
}

bool Policy::allows(const sockaddr* address) const noexcept {
  sa_family_t family = address->sa_family;
  const uint8_t* bytes = nullptr;
  uint16_t port = 0;
  if (family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(address);
    bytes = reinterpret_cast<const uint8_t*>(&v4->sin_addr);
    port = ntohs(v4->sin_port);
  } else if (family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(address);
    bytes = v6->sin6_addr.s6_addr;
    port = ntohs(v6->sin6_port);
    if (std::memcmp(bytes, kV4MappedPrefix.data(), kV4MappedPrefix.size()) == 0) {
      family = AF_INET;
      bytes += kV4MappedPrefix.size();
    }
  } else {
    return false;
  }
  for (const Rule& rule : rules_) {
    if (port < rule.first_port || port > rule.last_port) continue;
    if (rule.family != AF_UNSPEC) {
      if (rule.family != family) continue;
      const unsigned whole = rule.prefix / 8, bits = rule.prefix % 8;
      if (std::memcmp(bytes, rule.address.data(), whole) != 0) continue;
      if (bits != 0 && ((bytes[whole] ^ rule.address[whole]) & uint8_t(0xff00u >> bits)) != 0) continue;
    }
    return rule.allow;
  }
  return true;
}

}  // namespace rxio::shim
