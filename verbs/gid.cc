#include "verbs/gid.h"

#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "base/error.h"

namespace rxio::verbs {

std::string to_string(const ibv_gid& gid) {
  char text[INET6_ADDRSTRLEN] = {};
  inet_ntop(AF_INET6, gid.raw, text, sizeof text);
  return text;
}

std::string_view to_string(GidType type) {
  switch (type) {
    case GidType::ib: return "IB";
    case GidType::roce_v1: return "RoCE v1";
    case GidType::roce_v2: return "RoCE v2";
  }
  return "?";
}

bool operator==(const ibv_gid& a, const ibv_gid& b) {
  return std::memcmp(a.raw, b.raw, sizeof a.raw) == 0;
}

bool is_zero(const ibv_gid& gid) { return gid == ibv_gid{}; }

bool is_ipv4_mapped(const ibv_gid& gid) {
  static constexpr uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return std::memcmp(gid.raw, prefix, sizeof prefix) == 0;
}

ibv_gid gid_from_address(const sockaddr& address) {
  ibv_gid gid{};
  if (address.sa_family == AF_INET) {
    const auto& in = reinterpret_cast<const sockaddr_in&>(address);
    gid.raw[10] = 0xff;
    gid.raw[11] = 0xff;
    std::memcpy(&gid.raw[12], &in.sin_addr, 4);
  } else if (address.sa_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(address);
    std::memcpy(gid.raw, &in6.sin6_addr, 16);
  } else {
    throw Error(EAFNOSUPPORT, "turning a socket address of family " +
                                  std::to_string(address.sa_family) + " into a GID");
  }
  return gid;
}

ibv_gid gid_from_ip_string(std::string_view ip) {
  std::string text(ip);
  sockaddr_in in{};
  sockaddr_in6 in6{};
  if (inet_pton(AF_INET, text.c_str(), &in.sin_addr) == 1) {
    in.sin_family = AF_INET;
    return gid_from_address(reinterpret_cast<const sockaddr&>(in));
  }
  if (inet_pton(AF_INET6, text.c_str(), &in6.sin6_addr) == 1) {
    in6.sin6_family = AF_INET6;
    return gid_from_address(reinterpret_cast<const sockaddr&>(in6));
  }
  throw Error(EINVAL, "parsing '" + text + "' as an IPv4 or IPv6 address");
}

namespace {

// Lower is better; see choose_default_gid.
int preference(const GidEntry& entry) {
  switch (entry.type) {
    case GidType::roce_v2: return is_ipv4_mapped(entry.gid) ? 0 : 1;
    case GidType::roce_v1: return 2;
    case GidType::ib: return 3;
  }
  return 4;
}

GidType gid_type_of(const ibv_gid_entry& entry) {
  switch (entry.gid_type) {
    case IBV_GID_TYPE_ROCE_V1: return GidType::roce_v1;
    case IBV_GID_TYPE_ROCE_V2: return GidType::roce_v2;
    default: return GidType::ib;
  }
}

std::string describe_gids(const std::string& device, std::span<const GidEntry> entries) {
  std::string text;
  for (const auto& e : entries) {
    if (!text.empty()) text += ", ";
    text += device + " port " + std::to_string(e.port) + " index " +
            std::to_string(e.index) + " " + to_string(e.gid) + " (" +
            std::string(to_string(e.type)) + ")";
  }
  return text.empty() ? device + ": no valid GIDs" : text;
}

// The first device whose GID table `pick` finds an entry in.
template <typename Pick>
Endpoint select_first(Pick&& pick, const std::string& looked_for) {
  DeviceList devices;
  if (devices.empty()) throw Error(ENODEV, no_device_message());
  std::string seen;
  for (std::size_t i = 0; i < devices.size(); ++i) {
    Context context = Context::open(devices[i]);
    auto entries = query_gids(context);
    if (std::optional<GidEntry> chosen = pick(std::span<const GidEntry>(entries)))
      return Endpoint{context.name(), chosen->port, *chosen};
    seen += (seen.empty() ? "" : "; ") + describe_gids(context.name(), entries);
  }
  throw Error(ENODEV, "no RDMA device has " + looked_for, {}, "GIDs present: " + seen);
}

}  // namespace

std::optional<GidEntry> choose_default_gid(std::span<const GidEntry> entries) {
  std::optional<GidEntry> best;
  for (const auto& entry : entries) {
    if (is_zero(entry.gid)) continue;
    if (!best || preference(entry) < preference(*best)) best = entry;
  }
  return best;
}

std::optional<GidEntry> find_gid(std::span<const GidEntry> entries, const ibv_gid& wanted) {
  auto it = std::find_if(entries.begin(), entries.end(), [&](const GidEntry& e) {
    return e.type == GidType::roce_v2 && e.gid == wanted;
  });
  if (it == entries.end()) return std::nullopt;
  return *it;
}

std::vector<GidEntry> query_gids(const Context& context) {
  ibv_device_attr device = context.query_device();
  std::vector<GidEntry> result;
  for (uint8_t port = 1; port <= device.phys_port_cnt; ++port) {
    ibv_port_attr port_attr = context.query_port(port);
    for (int index = 0; index < port_attr.gid_tbl_len; ++index) {
      ibv_gid_entry entry{};
      if (ibv_query_gid_ex(context.get(), port, static_cast<uint32_t>(index), &entry, 0) != 0) {
        // Unused slots answer ENODATA; anything else is a real failure.
        if (errno == ENODATA || errno == EINVAL) continue;
        throw Error(errno, "reading GID " + std::to_string(index) + " of port " +
                               std::to_string(port) + " (ibv_query_gid_ex)",
                    context.name());
      }
      if (is_zero(entry.gid)) continue;
      result.push_back(GidEntry{port, entry.gid_index, entry.gid, gid_type_of(entry),
                                entry.ndev_ifindex});
    }
  }
  return result;
}

Endpoint select_by_device(std::string_view device, int port, int gid_index) {
  Context context = Context::open_by_name(device);
  auto entries = query_gids(context);
  std::vector<GidEntry> candidates;
  for (const auto& e : entries)
    if ((port == 0 || e.port == port) && (gid_index < 0 || e.index == unsigned(gid_index)))
      candidates.push_back(e);
  auto chosen = choose_default_gid(candidates);
  if (!chosen) {
    std::string wanted = "port " + (port == 0 ? std::string("any") : std::to_string(port)) +
                         ", GID index " +
                         (gid_index < 0 ? std::string("any") : std::to_string(gid_index));
    throw Error(ENODEV, "no usable GID (" + wanted + ")", context.name(),
                "GIDs present: " + describe_gids(context.name(), entries) +
                    "; a RoCE device needs an IP address on its netdev");
  }
  return Endpoint{context.name(), chosen->port, *chosen};
}

Endpoint select_by_netdev(std::string_view netdev) {
  std::string name(netdev);
  unsigned ifindex = if_nametoindex(name.c_str());
  if (ifindex == 0)
    throw Error(errno, "looking up network interface '" + name + "'", {},
                "`ip link` lists the interfaces");
  return select_first(
      [&](std::span<const GidEntry> entries) {
        std::vector<GidEntry> on_netdev;
        for (const auto& e : entries)
          if (e.netdev_ifindex == ifindex) on_netdev.push_back(e);
        return choose_default_gid(on_netdev);
      },
      "a GID on network interface '" + name + "'");
}

Endpoint select_by_ip(std::string_view ip) {
  ibv_gid wanted = gid_from_ip_string(ip);
  return select_first([&](std::span<const GidEntry> entries) { return find_gid(entries, wanted); },
                      "a RoCE v2 GID for " + std::string(ip));
}

}  // namespace rxio::verbs
