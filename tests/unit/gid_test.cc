#include <gtest/gtest.h>

#include <array>
#include <cerrno>

#include "base/error.h"
#include "verbs/cm.h"
#include "verbs/gid.h"

namespace rxio::verbs {
namespace {

GidEntry entry(uint32_t index, std::string_view ip, GidType type, uint8_t port = 1) {
  return GidEntry{port, index, gid_from_ip_string(ip), type, 7};
}

TEST(Gid, Ipv4BecomesIpv4Mapped) {
  ibv_gid gid = gid_from_ip_string("192.0.2.1");
  EXPECT_TRUE(is_ipv4_mapped(gid));
  EXPECT_EQ(to_string(gid), "::ffff:192.0.2.1");
  EXPECT_EQ(gid.raw[15], 1);
}

TEST(Gid, Ipv6StaysAsItIs) {
  ibv_gid gid = gid_from_ip_string("fe80::1234:5678");
  EXPECT_FALSE(is_ipv4_mapped(gid));
  EXPECT_EQ(to_string(gid), "fe80::1234:5678");
}

TEST(Gid, RejectsWhatIsNotAnAddress) {
  for (const char* bad : {"", "rxe0", "192.0.2", "192.0.2.256", "1.2.3.4:80", "::g"}) {
    try {
      gid_from_ip_string(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code().value(), EINVAL);
      EXPECT_NE(std::string(e.what()).find("IPv4 or IPv6"), std::string::npos);
    }
  }
}

TEST(Gid, ZeroAndEquality) {
  EXPECT_TRUE(is_zero(ibv_gid{}));
  EXPECT_FALSE(is_zero(gid_from_ip_string("::1")));
  EXPECT_TRUE(gid_from_ip_string("10.1.2.3") == gid_from_ip_string("::ffff:10.1.2.3"));
}

TEST(ChooseDefaultGid, PrefersRoceV2Ipv4Mapped) {
  std::array entries = {
      entry(0, "fe80::1", GidType::roce_v1),
      entry(1, "fe80::1", GidType::roce_v2),
      entry(2, "192.0.2.1", GidType::roce_v1),
      entry(3, "192.0.2.1", GidType::roce_v2),
  };
  auto chosen = choose_default_gid(entries);
  ASSERT_TRUE(chosen);
  EXPECT_EQ(chosen->index, 3u);
}

TEST(ChooseDefaultGid, FallsBackInOrder) {
  std::array v2_ipv6 = {entry(0, "fe80::1", GidType::roce_v1), entry(1, "fe80::1", GidType::roce_v2)};
  EXPECT_EQ(choose_default_gid(v2_ipv6)->index, 1u);
  std::array v1_only = {entry(0, "fe80::1", GidType::ib), entry(4, "fe80::1", GidType::roce_v1)};
  EXPECT_EQ(choose_default_gid(v1_only)->index, 4u);
  std::array ib_only = {entry(0, "fe80::1", GidType::ib)};
  EXPECT_EQ(choose_default_gid(ib_only)->index, 0u);
}

TEST(ChooseDefaultGid, NeverPicksAZeroGid) {
  std::array entries = {GidEntry{1, 0, ibv_gid{}, GidType::roce_v2, 0}};
  EXPECT_FALSE(choose_default_gid(entries));
  EXPECT_FALSE(choose_default_gid({}));
}

TEST(FindGid, MatchesOnlyRoceV2WithTheAddress) {
  std::array entries = {
      entry(0, "192.0.2.1", GidType::roce_v1),
      entry(1, "192.0.2.1", GidType::roce_v2),
      entry(2, "198.51.100.1", GidType::roce_v2),
  };
  EXPECT_EQ(find_gid(entries, gid_from_ip_string("192.0.2.1"))->index, 1u);
  EXPECT_EQ(find_gid(entries, gid_from_ip_string("198.51.100.1"))->index, 2u);
  EXPECT_FALSE(find_gid(entries, gid_from_ip_string("203.0.113.9")));
}

TEST(SocketAddress, ParsesAndPrintsBothFamilies) {
  EXPECT_EQ(cm::SocketAddress::parse("192.0.2.1", 7471).to_string(), "192.0.2.1:7471");
  EXPECT_EQ(cm::SocketAddress::parse("fe80::1", 80).to_string(), "[fe80::1]:80");
  EXPECT_THROW(cm::SocketAddress::parse("host.example", 1), Error);
}

}  // namespace
}  // namespace rxio::verbs
