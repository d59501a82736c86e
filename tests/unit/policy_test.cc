#include "shim/policy.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <optional>
#include <string>

#include "base/error.h"

namespace rxio::shim {
namespace {

using ::testing::HasSubstr;

// A socket address from "1.2.3.4" or "::1" and a port.
struct Address {
  sockaddr_storage storage{};
  Address(const char* text, uint16_t port) {
    auto* v4 = reinterpret_cast<sockaddr_in*>(&storage);
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&storage);
    if (inet_pton(AF_INET, text, &v4->sin_addr) == 1) {
      v4->sin_family = AF_INET;
      v4->sin_port = htons(port);
    } else if (inet_pton(AF_INET6, text, &v6->sin6_addr) == 1) {
      v6->sin6_family = AF_INET6;
      v6->sin6_port = htons(port);
    } else {
      ADD_FAILURE() << "not an address: " << text;
    }
  }
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

bool allows(const Policy& policy, const char* address, uint16_t port) {
  return policy.allows(Address(address, port).get());
}

// The message of the error parsing `text` throws, or nothing when it parses.
std::optional<std::string> parse_error(const std::string& text, const char* origin = "RXIO_SHIM_RULES") {
  try {
    Policy::parse(text, origin);
  } catch (const Error& e) {
    EXPECT_EQ(e.code().value(), EINVAL);
    return std::string(e.what());
  }
  return std::nullopt;
}

// Sets an environment variable for one test, restoring what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = getenv(name)) old_ = old;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) setenv(name_, old_->c_str(), 1);
    else unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(Policy, NoRulesAllowsEverything) {
  Policy policy = Policy::parse("", "test");
  EXPECT_EQ(policy.size(), 0u);
  EXPECT_TRUE(allows(policy, "10.0.0.1", 80));
  EXPECT_TRUE(allows(policy, "::1", 22));
  EXPECT_TRUE(allows(Policy(), "192.168.1.1", 6379));
}

TEST(Policy, ParsesGoodEntries) {
  Policy policy = Policy::parse(
      "deny 10.0.0.0/8\n"
      "allow *:6379\n"
      "deny [::1]:22\n"
      "deny *:1-1023\n"
      "allow 192.168.1.7:8080-8090\n"
      "deny [fe80::]/10:*\n"
      "deny [2001:db8::/32]\n"
      "allow *:*\n",
      "test");
  EXPECT_EQ(policy.size(), 8u);
}

TEST(Policy, CommentsAndSeparators) {
  Policy policy = Policy::parse(
      "# the cache moves, the rest of the lab does not\n"
      "  allow *:6379 ; deny 10.0.0.0/8 , deny 172.16.0.0/12 # a comment, with ; and ,\n"
      "\n"
      ";;, ,\n"
      "\tdeny\t192.168.0.0/16\t\r\n",
      "test");
  EXPECT_EQ(policy.size(), 4u);
  EXPECT_TRUE(allows(policy, "10.1.1.1", 6379));
  EXPECT_FALSE(allows(policy, "10.1.1.1", 80));
  EXPECT_FALSE(allows(policy, "172.20.0.1", 80));
  EXPECT_FALSE(allows(policy, "192.168.3.4", 80));
  EXPECT_TRUE(allows(policy, "172.32.0.1", 80));
}

TEST(Policy, FirstMatchDecides) {
  Policy allow_first = Policy::parse("allow *:6379; deny 10.0.0.0/8", "test");
  EXPECT_TRUE(allows(allow_first, "10.0.0.5", 6379));
  EXPECT_FALSE(allows(allow_first, "10.0.0.5", 6380));
  Policy deny_first = Policy::parse("deny 10.0.0.0/8; allow *:6379", "test");
  EXPECT_FALSE(allows(deny_first, "10.0.0.5", 6379));
  EXPECT_TRUE(allows(deny_first, "11.0.0.5", 6379));
}

TEST(Policy, PrefixesAndPorts) {
  Policy policy = Policy::parse("deny 10.1.2.3/12; deny 192.168.1.1; deny *:1-1023; allow *:2000-2000; deny *:2000-2001",
                                "test");
  EXPECT_FALSE(allows(policy, "10.15.255.255", 5000));  // host bits of 10.1.2.3/12 ignored
  EXPECT_TRUE(allows(policy, "10.16.0.0", 5000));
  EXPECT_FALSE(allows(policy, "192.168.1.1", 5000));
  EXPECT_TRUE(allows(policy, "192.168.1.2", 5000));
  EXPECT_FALSE(allows(policy, "8.8.8.8", 1));
  EXPECT_FALSE(allows(policy, "8.8.8.8", 1023));
  EXPECT_TRUE(allows(policy, "8.8.8.8", 1024));
  EXPECT_TRUE(allows(policy, "8.8.8.8", 2000));
  EXPECT_FALSE(allows(policy, "8.8.8.8", 2001));
  Policy everything = Policy::parse("deny 0.0.0.0/0", "test");
  EXPECT_FALSE(allows(everything, "1.2.3.4", 80));
  EXPECT_TRUE(allows(everything, "2001:db8::1", 80));  // an IPv4 rule never matches IPv6
}

TEST(Policy, Ipv6) {
  Policy policy = Policy::parse("deny [::1]:22; deny [fe80::]/10; deny [2001:db8:aa::/48]:443", "test");
  EXPECT_FALSE(allows(policy, "::1", 22));
  EXPECT_TRUE(allows(policy, "::1", 23));
  EXPECT_FALSE(allows(policy, "fe80::1234", 80));
  EXPECT_FALSE(allows(policy, "febf::1", 80));
  EXPECT_TRUE(allows(policy, "fec0::1", 80));
  EXPECT_FALSE(allows(policy, "2001:db8:aa:1::5", 443));
  EXPECT_TRUE(allows(policy, "2001:db8:ab::5", 443));
  EXPECT_TRUE(allows(policy, "127.0.0.1", 22));  // IPv6 rules do not match IPv4
  Policy any = Policy::parse("deny *:22", "test");
  EXPECT_FALSE(allows(any, "::1", 22));
  EXPECT_FALSE(allows(any, "127.0.0.1", 22));
}

TEST(Policy, V4MappedAddressesMatchIpv4Rules) {
  Policy policy = Policy::parse("deny 10.0.0.0/8", "test");
  EXPECT_FALSE(allows(policy, "::ffff:10.2.3.4", 80));
  EXPECT_TRUE(allows(policy, "::ffff:11.2.3.4", 80));
  // And a rule written as a mapped address is an IPv4 rule.
  Policy mapped = Policy::parse("deny [::ffff:192.168.0.0]/112", "test");
  EXPECT_FALSE(allows(mapped, "192.168.7.7", 80));
  EXPECT_FALSE(allows(mapped, "::ffff:192.168.7.7", 80));
  EXPECT_TRUE(allows(mapped, "192.169.0.1", 80));
}

TEST(Policy, OtherFamiliesAreNeverMoved) {
  sockaddr unix_address{};
  unix_address.sa_family = AF_UNIX;
  EXPECT_FALSE(Policy().allows(&unix_address));
}

TEST(Policy, BadEntriesNameTheOriginAndTheEntry) {
  const auto error = parse_error("deny 10.0.0.0/8; permit *:80");
  ASSERT_TRUE(error);
  EXPECT_THAT(*error, HasSubstr("'permit *:80'"));
  EXPECT_THAT(*error, HasSubstr("neither allow nor deny"));
  EXPECT_THAT(*error, HasSubstr("on RXIO_SHIM_RULES"));
  EXPECT_THAT(*error, HasSubstr("for example"));  // the fix

  const auto in_file = parse_error("allow *:6379\n\n# comment\ndeny 10.0.0.0/33\n", "/etc/rxio/shim.conf");
  ASSERT_TRUE(in_file);
  EXPECT_THAT(*in_file, HasSubstr("/etc/rxio/shim.conf:4"));
  EXPECT_THAT(*in_file, HasSubstr("'deny 10.0.0.0/33'"));
  EXPECT_THAT(*in_file, HasSubstr("0 to 32"));
}

TEST(Policy, RejectsBadEntries) {
  for (const char* bad : {
           "deny",                   // no address
           "Deny *",                 // verbs are lower case
           "block 10.0.0.1",         // bad verb
           "deny 10.0.0.256",        // bad address
           "deny 10.0.0",            // bad address
           "deny host.example",      // names are not resolved
           "deny ::1",               // IPv6 without brackets
           "deny [::1",              // no ']'
           "deny [::g]",             // bad IPv6 address
           "deny [10.0.0.1]",        // IPv4 in brackets
           "deny 10.0.0.0/33",       // prefix too long
           "deny [::]/129",          // prefix too long
           "deny [::/200]",          // prefix too long
           "deny 10.0.0.0/",         // empty prefix
           "deny 10.0.0.0/x",        // bad prefix
           "deny [::1/64]/64",       // two prefixes
           "deny */8",               // * takes no prefix
           "deny *:",                // empty port
           "deny *:65536",           // port too large
           "deny *:http",            // names are not resolved
           "deny *:1023-1",          // reversed range
           "deny *:1-",              // half a range
           "deny *:-5",              // half a range
           "deny *:1-2-3",           // not a range
           "deny [::1]22",           // junk after the address
           "deny 10.0.0.1 10.0.0.2"  // one address per entry
       }) {
    EXPECT_TRUE(parse_error(bad)) << bad << " parsed";
  }
}

TEST(Policy, FromEnvironmentReadsVariableThenFile) {
  char path[] = "/tmp/rxio-policy-test-XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  const std::string rules = "# lab rules\ndeny 10.0.0.0/8\nallow *:22\n";
  ASSERT_EQ(write(fd, rules.data(), rules.size()), ssize_t(rules.size()));
  close(fd);
  {
    ScopedEnv config("RXIO_SHIM_CONFIG", path);
    ScopedEnv variable("RXIO_SHIM_RULES", "allow 10.0.0.0/8:6379; deny *:22");
    Policy policy = Policy::from_environment();
    EXPECT_EQ(policy.size(), 4u);
    EXPECT_TRUE(allows(policy, "10.0.0.1", 6379));  // the variable's rules come first
    EXPECT_FALSE(allows(policy, "10.0.0.1", 80));   // then the file's
    EXPECT_FALSE(allows(policy, "1.2.3.4", 22));
    EXPECT_TRUE(allows(policy, "1.2.3.4", 80));
  }
  {
    ScopedEnv config("RXIO_SHIM_CONFIG", path);
    ScopedEnv variable("RXIO_SHIM_RULES", nullptr);
    EXPECT_EQ(Policy::from_environment().size(), 2u);
  }
  {
    ScopedEnv config("RXIO_SHIM_CONFIG", path);
    ScopedEnv variable("RXIO_SHIM_RULES", "deny 10.0.0.0/99");
    try {
      Policy::from_environment();
      ADD_FAILURE() << "a bad rule was accepted";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("RXIO_SHIM_RULES"));
    }
  }
  unlink(path);
}

TEST(Policy, NamedFileMustExistDefaultNeedNot) {
  ScopedEnv variable("RXIO_SHIM_RULES", nullptr);
  {
    ScopedEnv config("RXIO_SHIM_CONFIG", "/nonexistent/rxio/shim.conf");
    try {
      Policy::from_environment();
      ADD_FAILURE() << "a missing file named by RXIO_SHIM_CONFIG was ignored";
    } catch (const Error& e) {
      EXPECT_EQ(e.code().value(), ENOENT);
      EXPECT_THAT(e.what(), HasSubstr("/nonexistent/rxio/shim.conf"));
      EXPECT_THAT(e.what(), HasSubstr("RXIO_SHIM_CONFIG"));
    }
  }
  // The default file is optional; where this machine has one, it must parse.
  ScopedEnv config("RXIO_SHIM_CONFIG", nullptr);
  if (access("/etc/rxio/shim.conf", F_OK) != 0) {
    EXPECT_EQ(Policy::from_environment().size(), 0u);
  } else {
    EXPECT_NO_THROW(Policy::from_environment());
  }
}

}  // namespace
}  // namespace rxio::shim
