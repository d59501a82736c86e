// Internal: the shm backend's control path. A link between two processes on one host
// is set up over a unix socket (abstract name, so nothing is left in the file system;
// a fresh one per hand-shake): the acceptor checks the connector's credentials
// (SO_PEERCRED: same uid, the pid it offered) and the token it sent in its Choice
// before it hands out anything. Each side sends its ShmHello with its arena's memfd
// and its eventfd (SCM_RIGHTS), maps the other's arena, and proves that cross-memory
// attach works by reading the other's probe word. The socket stays open: its EOF is
// how a dead peer is noticed.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>

#include "base/fd.h"
#include "transport/shm_port.h"
#include "transport/wire.h"

namespace rxio::transport::shm {

// The kernel's boot id: two processes with the same one run on the same host.
std::array<uint8_t, 16> host_id();
// This process's network and pid namespaces (inode numbers; 0 if unknown).
uint64_t namespace_id(const char* name);
std::array<uint8_t, 16> random_token();
// One message with file descriptors attached (SCM_RIGHTS); false on failure (errno).
bool send_with_fds(int socket, std::span<const std::byte> message, std::span<const int> fds);

// A unix listener for one hand-shake, at a fresh abstract name.
class Listener {
 public:
  Listener();  // throws rxio::Error
  uint64_t nonce() const noexcept { return nonce_; }
  int fd() const noexcept { return fd_.get(); }

 private:
  UniqueFd fd_;
  uint64_t nonce_ = 0;
};

// Connector: connects to the acceptor named in its Choice, hellos (ours first), then
// attaches and probes. Throws rxio::Error saying what failed and the fix.
void connect_peer(ShmPort& port, const wire::Choice& choice, const wire::ShmHello& mine,
                  std::chrono::milliseconds timeout, wire::ShmHello& theirs);
// Acceptor: takes the connection of the process that made the offer (others, which
// anyone may open to an abstract name, are dropped), checks its token, answers.
void accept_peer(ShmPort& port, Listener& listener, uint32_t expected_pid, const wire::ShmHello& mine,
                 std::chrono::milliseconds timeout, wire::ShmHello& theirs);

}  // namespace rxio::transport::shm
