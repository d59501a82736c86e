// rxio-verbs-roundtrip: opens an RDMA device, connects two RC queue pairs to each other
// through it and moves data with SEND, RDMA WRITE and RDMA READ, checking every byte
// and timing the round trips. A quick "do verbs work here?" answer with the details.
#include <getopt.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "base/error.h"
#include "verbs/loopback_pair.h"

namespace {

using rxio::verbs::LoopbackPair;
using rxio::verbs::LoopbackSide;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string device = "rxe0";
  std::size_t size = 4096;
  int iterations = 1000;
};

[[noreturn]] void usage(int status) {
  std::fprintf(status ? stderr : stdout,
               "usage: rxio-verbs-roundtrip [-d DEVICE] [-s SIZE] [-n ITERATIONS]\n"
               "  -d, --ib-dev DEVICE   RDMA device (default rxe0; `ibv_devices` lists them)\n"
               "  -s, --size SIZE       bytes per message (default 4096, at most 1 MiB)\n"
               "  -n, --iters N         round trips per operation (default 1000)\n");
  std::exit(status);
}

Options parse(int argc, char** argv) {
  Options options;
  static const option long_options[] = {{"ib-dev", required_argument, nullptr, 'd'},
                                        {"size", required_argument, nullptr, 's'},
                                        {"iters", required_argument, nullptr, 'n'},
                                        {"help", no_argument, nullptr, 'h'},
                                        {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, "d:s:n:h", long_options, nullptr)) != -1;) {
    char* end = nullptr;
    switch (c) {
      case 'd': options.device = optarg; break;
      case 's':
        options.size = std::strtoul(optarg, &end, 0);
        if (*end || options.size == 0 || options.size > (1u << 20)) {
          std::fprintf(stderr, "rxio-verbs-roundtrip: -s wants 1 to 1048576 bytes, not '%s'\n", optarg);
          usage(2);
        }
        break;
      case 'n':
        options.iterations = static_cast<int>(std::strtol(optarg, &end, 0));
        if (*end || options.iterations <= 0) {
          std::fprintf(stderr, "rxio-verbs-roundtrip: -n wants a positive count, not '%s'\n", optarg);
          usage(2);
        }
        break;
      case 'h': usage(0);
      default: usage(2);
    }
  }
  if (optind != argc) usage(2);
  return options;
}

// Waits for one completion; exits with a message on error or after 10 s.
ibv_wc complete_one(LoopbackSide& side, const char* what) {
  auto deadline = Clock::now() + std::chrono::seconds(10);
  ibv_wc wc{};
  while (side.cq.poll({&wc, 1}) == 0) {
    if (Clock::now() > deadline) {
      std::fprintf(stderr, "rxio-verbs-roundtrip: %s: no completion within 10 s\n", what);
      std::exit(1);
    }
  }
  if (wc.status != IBV_WC_SUCCESS) {
    std::fprintf(stderr, "rxio-verbs-roundtrip: %s failed: %s\n", what, ibv_wc_status_str(wc.status));
    std::exit(1);
  }
  return wc;
}

void post_send(LoopbackSide& from, LoopbackSide& to, ibv_wr_opcode opcode, std::size_t size) {
  ibv_sge sge{reinterpret_cast<uint64_t>(from.buffer.data()), static_cast<uint32_t>(size),
              from.mr.lkey()};
  ibv_send_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = opcode;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.wr.rdma.remote_addr = reinterpret_cast<uint64_t>(to.buffer.data());
  wr.wr.rdma.rkey = to.mr.rkey();
  ibv_send_wr* bad = nullptr;
  if (int rc = from.qp.post_send(&wr, &bad); rc != 0) {
    std::fprintf(stderr, "rxio-verbs-roundtrip: ibv_post_send: %s\n", std::strerror(rc));
    std::exit(1);
  }
}

void post_recv(LoopbackSide& side, std::size_t size) {
  ibv_sge sge{reinterpret_cast<uint64_t>(side.buffer.data()), static_cast<uint32_t>(size),
              side.mr.lkey()};
  ibv_recv_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  if (int rc = side.qp.post_recv(&wr, &bad); rc != 0) {
    std::fprintf(stderr, "rxio-verbs-roundtrip: ibv_post_recv: %s\n", std::strerror(rc));
    std::exit(1);
  }
}

void fill(std::vector<std::byte>& buffer, std::size_t size, int round) {
  for (std::size_t i = 0; i < size; ++i) buffer[i] = static_cast<std::byte>((i * 131 + round * 7) & 0xff);
}

void verify(const LoopbackSide& expected, const LoopbackSide& actual, std::size_t size, const char* what) {
  if (std::memcmp(expected.buffer.data(), actual.buffer.data(), size) != 0) {
    std::fprintf(stderr, "rxio-verbs-roundtrip: %s delivered corrupted data\n", what);
    std::exit(1);
  }
}

struct Timing {
  double min_us = 1e300, sum_us = 0;
  int count = 0;
  void add(Clock::duration d) {
    double us = std::chrono::duration<double, std::micro>(d).count();
    min_us = std::min(min_us, us);
    sum_us += us;
    ++count;
  }
};

void report(const char* name, const Options& options, const Timing& t) {
  std::printf("  %-22s %8zu B x %-6d ok   min %9.2f us   avg %9.2f us\n", name, options.size,
              t.count, t.min_us, t.sum_us / t.count);
}

}  // namespace

int main(int argc, char** argv) {
  Options options = parse(argc, argv);
  try {
    LoopbackPair pair(options.device, options.size);
    const auto& ep = pair.endpoint();
    ibv_port_attr port = pair.context().query_port(ep.port);
    std::printf("rxio-verbs-roundtrip: device %s port %u, GID index %u %s (%s), MTU %d\n",
                ep.device.c_str(), ep.port, ep.gid.index, rxio::verbs::to_string(ep.gid.gid).c_str(),
                std::string(rxio::verbs::to_string(ep.gid.type)).c_str(), 128 << port.active_mtu);
    std::printf("  RC QP %u <-> RC QP %u connected (RESET->INIT->RTR->RTS), %zu B registered each\n",
                pair.a().qp.qp_num(), pair.b().qp.qp_num(), options.size);

    LoopbackSide& a = pair.a();
    LoopbackSide& b = pair.b();
    Timing send, write, read;
    for (int i = 0; i < options.iterations; ++i) {
      // SEND a→b then b→a: one ping-pong round trip.
      fill(a.buffer, options.size, i);
      auto start = Clock::now();
      post_recv(b, options.size);
      post_send(a, b, IBV_WR_SEND, options.size);
      complete_one(a, "SEND");
      complete_one(b, "RECV");
      post_recv(a, options.size);
      post_send(b, a, IBV_WR_SEND, options.size);
      complete_one(b, "SEND");
      complete_one(a, "RECV");
      send.add(Clock::now() - start);
      verify(b, a, options.size, "SEND/RECV");

      fill(a.buffer, options.size, i + 1);
      start = Clock::now();
      post_send(a, b, IBV_WR_RDMA_WRITE, options.size);
      complete_one(a, "RDMA WRITE");
      write.add(Clock::now() - start);
      verify(a, b, options.size, "RDMA WRITE");

      fill(b.buffer, options.size, i + 2);
      start = Clock::now();
      post_send(a, b, IBV_WR_RDMA_READ, options.size);
      complete_one(a, "RDMA READ");
      read.add(Clock::now() - start);
      verify(b, a, options.size, "RDMA READ");
    }
    report("SEND/RECV ping-pong", options, send);
    report("RDMA WRITE", options, write);
    report("RDMA READ", options, read);
    std::printf("  every byte checked: %llu bytes moved intact\n",
                4ull * options.size * static_cast<unsigned long long>(options.iterations));
  } catch (const rxio::Error& e) {
    std::fprintf(stderr, "rxio-verbs-roundtrip: %s\n", e.what());
    return 1;
  }
  return 0;
}
