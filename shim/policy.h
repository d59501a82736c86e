// Which TCP connections the shim may move off TCP: an ordered list of allow and deny
// rules by address and port, in the spirit of rsocket's preload config and libvma's
// rules. Read once at start-up; checked on every connect and accept without allocating.
#pragma once

#include <sys/socket.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace rxio::shim {

class Policy {
 public:
  // No rules: every connection may move.
  Policy() = default;

  // Rules text: entries separated by newlines, ';' or ','; '#' starts a comment to the
  // end of its line; blank entries are ignored. An entry is
  //   allow|deny ADDRESS[/PREFIX][:PORT[-PORT]]
  // where ADDRESS is an IPv4 address, an IPv6 address in brackets ("[fe80::]/10" or
  // "[fe80::/10]") or "*" (any address of either family), and a missing port or "*"
  // means any port: "deny 10.0.0.0/8", "allow *:6379", "deny [::1]:22", "deny *:1-1023".
  // Throws rxio::Error(EINVAL) naming `origin` (a variable or a file; the line too when
  // the text has several) and the bad entry.
  static Policy parse(std::string_view text, std::string_view origin);

  // The rules of RXIO_SHIM_RULES, then those of the file RXIO_SHIM_CONFIG names. The
  // default file may be absent (no rules from it); a file the variable names must exist.
  static Policy from_environment();

  // The first rule that matches `address` (a sockaddr_in or sockaddr_in6) decides; when
  // none does, the connection may move. An IPv4-mapped IPv6 address (::ffff:a.b.c.d)
  // is matched as the IPv4 address it carries. Other families are never allowed: the
  // shim moves only TCP over IP. Does not allocate.
  bool allows(const sockaddr* address) const noexcept;

  std::size_t size() const noexcept { return rules_.size(); }

 private:
  struct Rule {
    bool allow = false;
    sa_family_t family = AF_UNSPEC;  // AF_UNSPEC: any address of either family
    std::array<uint8_t, 16> address{};  // network order, host bits cleared
    uint8_t prefix = 0;                 // bits of `address` that must match
    uint16_t first_port = 0;
    uint16_t last_port = 65535;
  };

  // One entry, already trimmed; `where` names it in errors.
  static Rule parse_rule(std::string_view entry, std::string where);

  std::vector<Rule> rules_;
};

}  // namespace rxio::shim
