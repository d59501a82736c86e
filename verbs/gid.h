// GIDs and the choice of (device, port, GID index) by device name, netdev or IP.
#pragma once

#include <infiniband/verbs.h>
#include <sys/socket.h>

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "verbs/device.h"

namespace rxio::verbs {

enum class GidType { ib, roce_v1, roce_v2 };

struct GidEntry {
  uint8_t port = 0;
  uint32_t index = 0;
  ibv_gid gid{};
  GidType type = GidType::ib;
  uint32_t netdev_ifindex = 0;  // 0 where the GID has no netdev (InfiniBand)
};

// Where to talk from: a device, one of its ports and the source GID to use.
struct Endpoint {
  std::string device;
  uint8_t port = 1;
  GidEntry gid;
};

std::string to_string(const ibv_gid& gid);  // IPv6 notation, "::ffff:127.0.0.1"
std::string_view to_string(GidType type);
bool is_ipv4_mapped(const ibv_gid& gid);
bool is_zero(const ibv_gid& gid);
bool operator==(const ibv_gid& a, const ibv_gid& b);

// The RoCE GID an IP address has: IPv4 as ::ffff:a.b.c.d, IPv6 as itself.
// Throws rxio::Error for other address families.
ibv_gid gid_from_address(const sockaddr& address);
// Parses "192.0.2.1" or "fe80::1"; throws rxio::Error on anything else.
ibv_gid gid_from_ip_string(std::string_view ip);

// The usual default: RoCE v2 with an IPv4-mapped address (routable, what rdma_cm picks
// for IPv4), then RoCE v2 IPv6, then RoCE v1, then InfiniBand. Zero GIDs never qualify.
std::optional<GidEntry> choose_default_gid(std::span<const GidEntry> entries);
// The RoCE v2 entry carrying exactly this address, if any.
std::optional<GidEntry> find_gid(std::span<const GidEntry> entries, const ibv_gid& wanted);

// The valid GID table of every port of an open device.
std::vector<GidEntry> query_gids(const Context& context);

// Endpoint selection over the devices present. Each throws rxio::Error that names what
// was looked for and what exists when nothing matches. `gid_index` < 0 means "choose".
Endpoint select_by_device(std::string_view device, int port = 0, int gid_index = -1);
Endpoint select_by_netdev(std::string_view netdev);
Endpoint select_by_ip(std::string_view ip);

}  // namespace rxio::verbs
