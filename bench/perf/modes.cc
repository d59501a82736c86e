#include "bench/perf/modes.h"

#include <array>

#include "bench/perf/msg_modes.h"
#include "bench/perf/rc_modes.h"

namespace rxio::perf {
namespace {

// perftest's defaults: 5000 iterations for write_bw, 1000 elsewhere.
constexpr std::array kModes = {
    Mode{"write_bw", "RDMA_Write BW Test", Kind::bandwidth, true, 5000, run_write_bw},
    Mode{"write_lat", "RDMA_Write Latency Test", Kind::latency, true, 1000, run_write_lat},
    Mode{"read_bw", "RDMA_Read BW Test", Kind::bandwidth, false, 1000, run_read_bw},
    Mode{"read_lat", "RDMA_Read Latency Test", Kind::latency, false, 1000, run_read_lat},
    Mode{"send_bw", "Send BW Test", Kind::bandwidth, true, 1000, run_send_bw},
    Mode{"send_lat", "Send Latency Test", Kind::latency, true, 1000, run_send_lat},
    Mode{"msg_bw", "rxio Message BW Test", Kind::bandwidth, false, 1000, run_msg_bw},
    Mode{"msg_lat", "rxio Message Latency Test", Kind::latency, false, 1000, run_msg_lat},
};

}  // namespace

std::span<const Mode> modes() { return kModes; }

const Mode* find_mode(std::string_view name) {
  for (const Mode& mode : kModes)
    if (mode.name == name) return &mode;
  return nullptr;
}

}  // namespace rxio::perf
