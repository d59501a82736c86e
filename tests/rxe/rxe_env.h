// What the rxe tests need from the Soft-RoCE guest (tests/rxe/guest.sh sets it up).
#pragma once

#include <gtest/gtest.h>
#include <infiniband/verbs.h>

#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>

#include "verbs/completion.h"
#include "verbs/device.h"

namespace rxio::test {

inline std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value && *value ? value : fallback;
}

// The Soft-RoCE device on lo, and the two on the ends of the veth pair.
inline std::string loopback_device() { return env_or("RXIO_RXE_DEV", "rxe0"); }
inline std::string cm_address_a() { return env_or("RXIO_RXE_CM_ADDR_A", "192.0.2.1"); }
inline std::string cm_address_b() { return env_or("RXIO_RXE_CM_ADDR_B", "198.51.100.1"); }
inline std::string cm_device_a() { return env_or("RXIO_RXE_CM_DEV_A", "rxe1"); }
inline std::string cm_device_b() { return env_or("RXIO_RXE_CM_DEV_B", "rxe2"); }

// Skips when the device is missing outside the guest; inside it a missing device is a
// failure, since the guest runner created it.
#define RXIO_REQUIRE_DEVICE(name)                                                       \
  do {                                                                                  \
    if (::rxio::verbs::DeviceList().find(name) == nullptr) {                            \
      if (std::getenv("RXIO_IN_GUEST"))                                                 \
        FAIL() << "RDMA device " << (name) << " is missing inside the Soft-RoCE guest"; \
      GTEST_SKIP() << "no RDMA device " << (name)                                       \
                   << "; run this suite with `meson test --suite rxe`";                 \
    }                                                                                   \
  } while (0)

// Polls until one completion arrives or `timeout` passes (nullopt then).
inline std::optional<ibv_wc> poll_one(verbs::CompletionQueue& cq,
                                      std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  ibv_wc wc{};
  do {
    int n = cq.poll({&wc, 1});
    if (n < 0) return std::nullopt;
    if (n == 1) return wc;
  } while (std::chrono::steady_clock::now() < deadline);
  return std::nullopt;
}

}  // namespace rxio::test
