// The transport conformance suite, parametrized by backend.
#pragma once

#include "tests/transport/harness.h"

namespace rxio::test {

class Conformance : public ::testing::TestWithParam<transport::BackendChoice> {
 protected:
  void SetUp() override {
    if (GetParam() == transport::BackendChoice::verbs) RXIO_REQUIRE_DEVICE(loopback_device());
  }

  // Engine options for the backend under test; small rings run out of credits soon.
  std::function<transport::Options()> options(uint32_t slots = 0, uint32_t slot_size = 0) const {
    return [backend = GetParam(), slots, slot_size] {
      transport::Options o;
      o.backend = backend;
      if (backend == transport::BackendChoice::verbs) o.device = loopback_device();
      o.ring_slots = slots;
      o.slot_size = slot_size;
      return o;
    };
  }

  // One link to the peer, of the backend under test.
  bool one_link(const Engine& engine) const {
    auto stats = engine.stats();
    if (stats.links != 1) return false;
    switch (GetParam()) {
      case transport::BackendChoice::shm: return stats.shm_links == 1;
      case transport::BackendChoice::tcp: return stats.tcp_links == 1;
      default: return engine.qp_count() == 1;
    }
  }
};

}  // namespace rxio::test
