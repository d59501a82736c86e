// The out-of-band channel: a TCP connection (Boost.Asio) that carries set-up messages
// before RDMA is up, for fabrics without rdma_cm, and afterwards tells us when the
// peer process is gone (EOF).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace rxio::transport::oob {

// Frames are length-prefixed (4 bytes, big-endian) so either side can tell a short read
// from a whole message. Setup path: every failure throws rxio::Error naming the peer.
class Channel {
 public:
  // Resolves `host` (name or address) and connects within `timeout`.
  static Channel connect(const std::string& host, uint16_t port, std::chrono::milliseconds timeout);

  Channel(Channel&&) noexcept;
  Channel& operator=(Channel&&) noexcept;
  ~Channel();

  void send(std::span<const std::byte> frame);
  // Waits up to `timeout` for one whole frame. A frame longer than `max_size` is refused
  // (the channel is then closed): the peer is not trusted to size our buffers.
  std::vector<std::byte> receive(std::chrono::milliseconds timeout, std::size_t max_size = 64 * 1024);

  // The socket, for polling it alongside other fds (readable + EOF = the peer went away).
  int native_fd() const noexcept;
  const std::string& peer() const noexcept;  // "192.0.2.1:18515"

 private:
  struct State;
  explicit Channel(std::unique_ptr<State> state) noexcept;
  friend class Listener;
  std::unique_ptr<State> state_;
};

class Listener {
 public:
  // Listens on `address` ("0.0.0.0", "::", or a local address); port 0 picks a free one.
  Listener(const std::string& address, uint16_t port);
  Listener(Listener&&) noexcept;
  Listener& operator=(Listener&&) noexcept;
  ~Listener();

  uint16_t port() const noexcept;
  // The listening socket, for polling: readable means accept() will not wait.
  int native_fd() const noexcept;
  // The next connection, within `timeout`.
  Channel accept(std::chrono::milliseconds timeout);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace rxio::transport::oob
