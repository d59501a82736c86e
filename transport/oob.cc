// GCC 12 rejects the fences inside Boost.Asio under -fsanitize=thread (-Wtsan, an error
// with -Werror). Each Channel and Listener is used by one thread, so nothing is lost.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic ignored "-Wtsan"
#endif

#include "transport/oob.h"

// Boost 1.74's awaitable.hpp uses std::exchange without including <utility>.
#include <utility>

#include <boost/asio.hpp>

#include <array>
#include <cerrno>

#include "base/error.h"

namespace rxio::transport::oob {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

// Sending only blocks while the peer's receive buffer is full; a peer that reads
// nothing for this long is treated as stuck.
constexpr std::chrono::seconds kSendTimeout{10};
constexpr std::size_t kHeaderSize = 4;

std::string endpoint_string(const tcp::endpoint& endpoint) {
  const auto address = endpoint.address();
  std::string host = address.is_v6() ? "[" + address.to_string() + "]" : address.to_string();
  return host + ":" + std::to_string(endpoint.port());
}

std::string ms(std::chrono::milliseconds timeout) { return std::to_string(timeout.count()) + " ms"; }

// Runs `io` until the pending operation's handler ran. At `deadline`, `cancel` aborts
// the operation, whose handler then runs with operation_aborted (the callers' sign of
// a timeout) before this returns, so no handler outlives the call.
template <typename Cancel>
void run_until(asio::io_context& io, const bool& done, Clock::time_point deadline, Cancel&& cancel) {
  io.restart();
  while (!done && io.run_one_until(deadline) != 0) {
  }
  if (done) return;
  cancel();
  io.restart();
  io.run();
}

bool timed_out(const error_code& ec) { return ec == asio::error::operation_aborted; }

}  // namespace

struct Channel::State {
  asio::io_context io{1};
  tcp::socket socket{io};
  std::string peer;

  [[noreturn]] void fail(int errno_value, const std::string& operation, const std::string& fix = {}) {
    error_code ignored;
    socket.close(ignored);
    throw Error(errno_value, operation, peer, fix);
  }

  void set_no_delay() {
    error_code ec;
    socket.set_option(tcp::no_delay(true), ec);
    if (ec) fail(ec.value(), "setting TCP_NODELAY on the out-of-band connection");
  }

  // Reads exactly `buffer.size()` bytes. A timeout before the first byte leaves the
  // stream intact (nothing was consumed); any other failure closes the channel.
  void read_exact(asio::mutable_buffer buffer, Clock::time_point deadline,
                  std::chrono::milliseconds timeout, const char* what, bool frame_started) {
    bool done = false;
    error_code result;
    std::size_t got = 0;
    asio::async_read(socket, buffer, [&](const error_code& ec, std::size_t n) {
      done = true;
      result = ec;
      got = n;
    });
    run_until(io, done, deadline, [&] { socket.cancel(); });
    if (timed_out(result)) {
      if (got == 0 && !frame_started)
        throw Error(ETIMEDOUT, std::string("waiting for ") + what + " (none within " + ms(timeout) + ")",
                    peer, "the peer is alive but sent nothing; check that both sides run the same protocol");
      fail(ETIMEDOUT, std::string("receiving ") + what + " (" + std::to_string(got) + " of " +
                          std::to_string(buffer.size()) + " bytes within " + ms(timeout) +
                          "); closing the channel");
    }
    if (result == asio::error::eof || result == asio::error::connection_reset) {
      std::string operation = std::string("receiving ") + what;
      if (got != 0 || frame_started)
        operation += " (the stream ended inside a frame, after " + std::to_string(got) + " of " +
                     std::to_string(buffer.size()) + " bytes)";
      fail(ECONNRESET, operation, "peer closed the connection; its own output says why");
    }
    if (result) fail(result.value(), std::string("receiving ") + what + ": " + result.message());
  }
};

Channel::Channel(std::unique_ptr<State> state) noexcept : state_(std::move(state)) {}
Channel::Channel(Channel&&) noexcept = default;
Channel& Channel::operator=(Channel&&) noexcept = default;
Channel::~Channel() = default;

Channel Channel::connect(const std::string& host, uint16_t port, std::chrono::milliseconds timeout) {
  auto state = std::make_unique<State>();
  state->peer = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
  const auto deadline = Clock::now() + timeout;

  tcp::resolver resolver(state->io);
  bool done = false;
  error_code result;
  tcp::resolver::results_type endpoints;
  resolver.async_resolve(host, std::to_string(port), tcp::resolver::numeric_service,
                         [&](const error_code& ec, tcp::resolver::results_type r) {
                           done = true;
                           result = ec;
                           endpoints = std::move(r);
                         });
  run_until(state->io, done, deadline, [&] { resolver.cancel(); });
  if (timed_out(result))
    throw Error(ETIMEDOUT, "resolving '" + host + "' (no answer within " + ms(timeout) + ")");
  if (result)
    throw Error(result.value(), "resolving '" + host + "': " + result.message(), {},
                "give an IP address or a name this host can resolve");

  done = false;
  asio::async_connect(state->socket, endpoints, [&](const error_code& ec, const tcp::endpoint&) {
    done = true;
    result = ec;
  });
  run_until(state->io, done, deadline, [&] {
    error_code ignored;
    state->socket.close(ignored);
  });
  if (timed_out(result))
    throw Error(ETIMEDOUT, "connecting the out-of-band channel (no answer within " + ms(timeout) + ")",
                state->peer, "check the address, and that TCP port " + std::to_string(port) +
                                 " is reachable (firewall)");
  if (result == asio::error::connection_refused)
    throw Error(ECONNREFUSED, "connecting the out-of-band channel", state->peer,
                "is the server running? (port " + std::to_string(port) + ")");
  if (result)
    throw Error(result.value(), "connecting the out-of-band channel: " + result.message(), state->peer);

  state->peer = endpoint_string(state->socket.remote_endpoint());
  state->set_no_delay();
  return Channel(std::move(state));
}

void Channel::send(std::span<const std::byte> frame) {
  if (!state_ || !state_->socket.is_open())
    throw Error(EBADF, "sending on a closed out-of-band channel", state_ ? state_->peer : "");
  if (frame.size() > UINT32_MAX)
    throw Error(EMSGSIZE, "sending a frame of " + std::to_string(frame.size()) + " bytes", state_->peer);
  const auto size = static_cast<uint32_t>(frame.size());
  const std::array<unsigned char, kHeaderSize> header = {
      static_cast<unsigned char>(size >> 24), static_cast<unsigned char>(size >> 16),
      static_cast<unsigned char>(size >> 8), static_cast<unsigned char>(size)};
  const std::array<asio::const_buffer, 2> buffers = {asio::buffer(header),
                                                     asio::buffer(frame.data(), frame.size())};
  bool done = false;
  error_code result;
  asio::async_write(state_->socket, buffers, [&](const error_code& ec, std::size_t) {
    done = true;
    result = ec;
  });
  run_until(state_->io, done, Clock::now() + kSendTimeout, [&] { state_->socket.cancel(); });
  if (timed_out(result))
    state_->fail(ETIMEDOUT, "sending a frame (the peer read nothing for " +
                                std::to_string(kSendTimeout.count()) + " s); closing the channel");
  if (result == asio::error::broken_pipe || result == asio::error::connection_reset)
    state_->fail(ECONNRESET, "sending a frame", "peer closed the connection; its own output says why");
  if (result) state_->fail(result.value(), "sending a frame: " + result.message());
}

std::vector<std::byte> Channel::receive(std::chrono::milliseconds timeout, std::size_t max_size) {
  if (!state_ || !state_->socket.is_open())
    throw Error(EBADF, "receiving on a closed out-of-band channel", state_ ? state_->peer : "");
  const auto deadline = Clock::now() + timeout;
  std::array<unsigned char, kHeaderSize> header{};
  state_->read_exact(asio::buffer(header), deadline, timeout, "a frame header", false);
  const std::size_t size = (std::size_t{header[0]} << 24) | (std::size_t{header[1]} << 16) |
                           (std::size_t{header[2]} << 8) | std::size_t{header[3]};
  if (size > max_size)
    state_->fail(EMSGSIZE,
                 "receiving a frame of " + std::to_string(size) + " bytes (at most " +
                     std::to_string(max_size) + " accepted); closing the channel",
                 "the peer speaks another protocol or version");
  std::vector<std::byte> frame(size);
  if (size != 0) state_->read_exact(asio::buffer(frame.data(), size), deadline, timeout, "a frame body", true);
  return frame;
}

int Channel::native_fd() const noexcept {
  return state_ && state_->socket.is_open() ? state_->socket.native_handle() : -1;
}

const std::string& Channel::peer() const noexcept {
  static const std::string none;
  return state_ ? state_->peer : none;
}

struct Listener::State {
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  std::string where;
};

Listener::Listener(const std::string& address, uint16_t port) : state_(std::make_unique<State>()) {
  const std::string where = (address.find(':') != std::string::npos ? "[" + address + "]" : address) +
                            ":" + std::to_string(port);
  state_->where = where;
  error_code ec;
  const auto ip = asio::ip::make_address(address, ec);
  if (ec)
    throw Error(EINVAL, "parsing '" + address + "' as an IP address to listen on", {},
                "give 0.0.0.0, :: or one of this host's addresses");
  const tcp::endpoint endpoint(ip, port);
  auto& acceptor = state_->acceptor;
  if (acceptor.open(endpoint.protocol(), ec); ec)
    throw Error(ec.value(), "opening a TCP socket: " + ec.message(), where);
  // A restarted server must not wait out TIME_WAIT of its previous run's connections.
  if (acceptor.set_option(tcp::acceptor::reuse_address(true), ec); ec)
    throw Error(ec.value(), "setting SO_REUSEADDR: " + ec.message(), where);
  if (acceptor.bind(endpoint, ec); ec)
    throw Error(ec.value(), "binding the out-of-band listener: " + ec.message(), where,
                ec == asio::error::address_in_use
                    ? "another process listens on port " + std::to_string(port) +
                          " (`ss -ltnp` shows which); pick another port"
                    : ec.value() == EADDRNOTAVAIL ? "the address is not one of this host's"
                                                               : "");
  if (acceptor.listen(asio::socket_base::max_listen_connections, ec); ec)
    throw Error(ec.value(), "listening: " + ec.message(), where);
  state_->where = endpoint_string(acceptor.local_endpoint());
}

Listener::Listener(Listener&&) noexcept = default;
Listener& Listener::operator=(Listener&&) noexcept = default;
Listener::~Listener() = default;

uint16_t Listener::port() const noexcept {
  error_code ec;
  return state_ ? state_->acceptor.local_endpoint(ec).port() : 0;
}

int Listener::native_fd() const noexcept { return state_ ? state_->acceptor.native_handle() : -1; }

Channel Listener::accept(std::chrono::milliseconds timeout) {
  if (!state_) throw Error(EBADF, "accepting on a moved-from out-of-band listener");
  auto channel = std::make_unique<Channel::State>();
  bool done = false;
  error_code result;
  state_->acceptor.async_accept(channel->socket, [&](const error_code& ec) {
    done = true;
    result = ec;
  });
  run_until(state_->io, done, Clock::now() + timeout, [&] { state_->acceptor.cancel(); });
  if (timed_out(result))
    throw Error(ETIMEDOUT, "waiting for a connection (none within " + ms(timeout) + ")", state_->where,
                "start the client, pointing it at this host and port");
  if (result) throw Error(result.value(), "accepting a connection: " + result.message(), state_->where);
  channel->peer = endpoint_string(channel->socket.remote_endpoint());
  channel->set_no_delay();
  return Channel(std::move(channel));
}

}  // namespace rxio::transport::oob
