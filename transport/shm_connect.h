// Internal: the shm backend's control path. A link between two processes on one host
// is set up over a unix socket (abstract name, so nothing is left in the file system):
// the connector proves with the token from the acceptor's Choice that it is the peer
// that asked over TCP, and the acceptor checks its credentials (SO_PEERCRED: same uid,
// the pid it offered). Each side then sends its ShmHello with its arena's memfd and its
// eventfd (SCM_RIGHTS), maps the other's arena, and proves that cross-memory attach
// works by reading the other's probe word. The socket stays open: its EOF is how a
// dead peer is noticed.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <string>

#include "base/fd.h"
#include "transport/shm_port.h"
#include "transport/wire.h"

namespace rxio::transport::shm {

// The kernel's boot id: two processes with the same one run on the same host.
std::array<uint8_t, 16> host_id();
std::array<uint8_t, 16> random_token();

class Listener {
 public:
  Listener();  // throws rxio::Error
  uint64_t nonce() const noexcept { return nonce_; }
  // The next connection, within `timeout`; throws rxio::Error on timeout.
  UniqueFd accept(std::chrono::milliseconds timeout);

 private:
  UniqueFd fd_;
  uint64_t nonce_ = 0;
};

UniqueFd connect(uint32_t pid, uint64_t nonce);

// The hand-shake after the unix connection: hellos both ways (the connector's first),
// attach, probe both ways. `expected_pid` is the peer's pid as the TCP bootstrap told
// it. Throws rxio::Error saying what failed and the fix.
void attach(ShmPort& port, UniqueFd socket, bool accepting, const wire::ShmHello& mine, uint32_t expected_pid,
            std::chrono::milliseconds timeout, wire::ShmHello& theirs);

}  // namespace rxio::transport::shm
