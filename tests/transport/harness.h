// What the transport tests share: deterministic message contents, a server/client pair
// in two processes, and the both-ways exchange. Header-only, for test binaries.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "tests/rxe/rxe_env.h"
#include "transport/engine.h"

namespace rxio::test {

using namespace std::chrono_literals;
using transport::Connection;
using transport::Engine;
using transport::Request;
using transport::Status;

// Deterministic bytes for message `index` from `side`, so the receiver can check them.
inline void fill(std::vector<std::byte>& buffer, std::size_t size, uint32_t side, uint32_t index) {
  uint64_t x = (uint64_t(side) << 32 | index) * 0x9E3779B97F4A7C15ull + size;
  for (std::size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    buffer[i] = static_cast<std::byte>(x);
  }
}

inline bool intact(const std::vector<std::byte>& got, std::size_t size, uint32_t side, uint32_t index) {
  std::vector<std::byte> want(size);
  fill(want, size, side, index);
  return std::memcmp(got.data(), want.data(), size) == 0;
}

// Runs `server` here and `client` in a child process (fork before any verbs use, so
// neither inherits the other's resources). The client learns the port through a pipe.
// Returns the client's exit status; the client reports failures on stderr.
inline int run_pair(const std::function<transport::Options()>& options, const std::function<void(Engine&)>& server,
             const std::function<int(Engine&, uint16_t)>& client, const std::string& listen_address,
             pid_t* child_out = nullptr) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[1]);
    uint16_t port = 0;
    if (read(fds[0], &port, sizeof port) != sizeof port) _exit(90);
    int rc = 91;
    try {
      transport::Options o = options();
      if (o.bootstrap == transport::Bootstrap::rdma_cm) o.local_address = cm_address_b();
      Engine engine(o);
      rc = client(engine, port);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "client: %s\n", e.what());
    }
    _exit(rc);
  }
  close(fds[0]);
  if (child_out) *child_out = pid;
  transport::Options o = options();
  if (o.bootstrap == transport::Bootstrap::rdma_cm) o.local_address = cm_address_a();
  {
    Engine engine(o);
    engine.listen(listen_address, 0);
    uint16_t port = engine.listen_port();
    EXPECT_EQ(write(fds[1], &port, sizeof port), ssize_t(sizeof port));
    close(fds[1]);
    server(engine);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

#define CLIENT_CHECK(cond)                                                        \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "client: %s:%d: %s failed\n", __FILE__, __LINE__, #cond); \
      return 1;                                                                   \
    }                                                                             \
  } while (0)

// Both sides send `sizes` to each other at the same time and check what they receive.
inline bool exchange(Engine& engine, Connection& c, const std::vector<std::size_t>& sizes, uint32_t me) {
  std::size_t largest = *std::max_element(sizes.begin(), sizes.end());
  std::vector<std::byte> out(largest), in(largest);
  bool ok = true;
  for (uint32_t i = 0; i < sizes.size(); ++i) {
    Request send, recv;
    c.recv(in, i, recv);
    fill(out, sizes[i], me, i);
    c.send({out.data(), sizes[i]}, i, send);
    Status s = engine.wait(send, 30s);
    Status r = engine.wait(recv, 30s);
    if (s != Status::ok || r != Status::ok || recv.bytes() != sizes[i] || recv.tag() != i ||
        !intact(in, sizes[i], 1 - me, i)) {
      std::fprintf(stderr, "side %u message %u (%zu B): send %s, recv %s, %zu B, %s\n", me, i, sizes[i],
                   transport::to_string(s), transport::to_string(r), recv.bytes(), c.error_text().c_str());
      ok = false;
      break;
    }
  }
  return ok;
}

inline std::vector<std::size_t> integrity_sizes() {
  std::vector<std::size_t> sizes = {1, 2, 8 * 1024 - 16, 8 * 1024 - 15, 64 * 1024, 8 << 20};
  std::mt19937 rng(42);
  for (int i = 0; i < 24; ++i) sizes.push_back(1 + rng() % (i % 3 == 0 ? (8u << 20) : 20000u));
  return sizes;
}

}  // namespace rxio::test
