// Back to TCP: a moved connection whose link failed goes on over the TCP connection the
// shim kept open underneath, from a byte both sides agree on (docs/shim.md, "Back to
// TCP"). Each side writes a Resume and then the bytes it kept of what it wrote over
// rxio; each reader skips what its program read already. Neither waits for the other
// before writing, so nothing here blocks: the program's calls (and the shim's service)
// carry it on as far as the TCP socket lets them.
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <linux/sockios.h>
#include <linux/tcp.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/log.h"
#include "shim/real.h"
#include "shim/state.h"

namespace rxio::shim {

bool KeptBytes::reserve(std::size_t size) noexcept {
  clear();
  if (size == 0) return true;
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  bytes_ = static_cast<std::byte*>(p);
  size_ = size;
  return true;
}

void KeptBytes::clear() noexcept {
  if (bytes_) ::munmap(bytes_, size_);
  bytes_ = nullptr;
  size_ = 0;
}

void KeptBytes::keep(const std::byte* data, std::size_t length, uint64_t at) noexcept {
  if (size_ == 0) return;
  if (length > size_) {  // only the last size_ bytes can be asked for
    data += length - size_;
    at += length - size_;
    length = size_;
  }
  const std::size_t start = static_cast<std::size_t>(at % size_);
  const std::size_t first = std::min(length, size_ - start);
  std::memcpy(bytes_ + start, data, first);
  std::memcpy(bytes_, data + first, length - first);
}

std::span<const std::byte> KeptBytes::from(uint64_t at, uint64_t end) const noexcept {
  if (size_ == 0 || at >= end) return {};
  const std::size_t start = static_cast<std::size_t>(at % size_);
  return {bytes_ + start, static_cast<std::size_t>(std::min<uint64_t>(end - at, size_ - start))};
}

namespace {

// The oldest stream position `s` still keeps.
uint64_t kept_from(const Socket& s) noexcept {
  return s.rxio_written - std::min<uint64_t>(s.rxio_written, s.kept.size());
}

// Sends what is left of this side's Resume and kept bytes, without waiting. False when
// the TCP connection refused them (the peer's side is gone): there is nothing to resume.
bool write_out(int fd, Socket& s) noexcept {
  Returning& r = s.back;
  while (!r.out_done) {
    std::span<const std::byte> part = r.resume_sent < r.resume.size()
                                          ? std::span<const std::byte>(r.resume).subspan(r.resume_sent)
                                          : s.kept.from(r.next, r.end);
    if (part.empty()) {
      r.out_done = true;
      break;
    }
    ssize_t n = real().send(fd, part.data(), part.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
    if (r.resume_sent < r.resume.size()) r.resume_sent += std::size_t(n);
    else r.next += uint64_t(n);
  }
  return true;
}

// Takes the peer's Resume, whole in `back.peer`: how many of the bytes that follow it
// the program has already. Says why when they cannot fit (nullptr when they do).
const char* take_resume(int fd, Socket& s) noexcept {
  Returning& r = s.back;
  auto resume = negotiation::decode_resume(r.peer);
  if (!resume) return "the peer's shim wrote something other than a Resume";
  if (resume->from > s.rxio_read) {
    // Only a forked child's socket: its parent read on after the fork, up to `from`,
    // and took the read-ahead before that.
    if (r.role != Returning::Role::adopted) return "the peer's shim resumed at a byte it cannot have";
    s.ahead.clear();
    s.ahead_read = 0;
    s.ahead_left = 0;
    s.rxio_read = resume->from;
  }
  // The peer keeps at least what this side has not read: it may send more, never
  // less (its credits bound what it wrote past this side's reads).
  if (s.rxio_read - resume->from > resume->kept) return "the peer's shim resumed at a byte it cannot have";
  r.skip = s.rxio_read - resume->from;
  r.peer_hands_over = resume->hand_over;
  r.to_come = resume->hand_over ? resume->kept : r.skip;
  // A hand-over that comes after this side started back on its own (its link failed
  // first), before any of its Resume went out: its bytes go from where the other
  // process reads on.
  if (resume->hand_over && r.resume_sent == 0 && !r.out_done && resume->read >= r.next && resume->read <= r.end) {
    r.next = resume->read;
    r.resume = negotiation::encode(negotiation::Resume{r.next, r.end - r.next});
  }
  log::info("shim: fd " + std::to_string(fd) + ": the peer " + (resume->hand_over ? "hands over" : "resumes") +
            " at byte " + std::to_string(resume->from) + " with " + std::to_string(resume->kept) + " kept; read here " +
            std::to_string(s.rxio_read) + ", written " + std::to_string(s.rxio_written));
  return nullptr;
}

// Reads the peer's Resume and skips its kept bytes the program has read (a hand-over's
// others go to the read-ahead), without waiting; what follows is the program's to read
// from the kernel. Says why when the connection cannot go on (nullptr while it can).
const char* read_in(int fd, Socket& s) noexcept {
  Returning& r = s.back;
  while (!r.in_done) {
    if (r.peer_have < r.peer.size()) {
      // The switch's leftovers (Returning::taken) come first; they start only after a
      // whole Resume, so none are left here.
      ssize_t n = real().recv(fd, r.peer.data() + r.peer_have, r.peer.size() - r.peer_have, MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return nullptr;
      if (n < 0) {
        r.in_done = true;  // the kernel reports the error to the program
        return nullptr;
      }
      if (n == 0) {
        // The peer's socket ended without going back (its process died): only a
        // stream that had ended over rxio is complete.
        if (!r.peer_closed) return "the peer's socket ended without resuming; what it wrote last is lost";
        r.in_done = true;
        return nullptr;
      }
      r.peer_have += std::size_t(n);
      if (r.peer_have < r.peer.size()) continue;
      if (const char* why = take_resume(fd, s)) return why;
      continue;
    }
    if (r.to_come == 0) {
      r.in_done = true;
      break;
    }
    const uint64_t want = r.skip > 0 ? r.skip : r.to_come;
    std::array<std::byte, 16 * 1024> chunk;
    std::span<const std::byte> got;
    if (!r.taken.empty()) {
      got = std::span<const std::byte>(r.taken).first(static_cast<std::size_t>(std::min<uint64_t>(want, r.taken.size())));
    } else {
      ssize_t n = real().recv(fd, chunk.data(), static_cast<std::size_t>(std::min<uint64_t>(chunk.size(), want)),
                              MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return nullptr;
      if (n <= 0) return "the peer's socket ended within the bytes it kept";
      got = std::span<const std::byte>(chunk).first(static_cast<std::size_t>(n));
    }
    if (r.skip > 0) {
      r.skip -= got.size();
    } else {
      try {
        s.ahead.insert(s.ahead.end(), got.begin(), got.end());
      } catch (const std::bad_alloc&) {
        return "no memory for the bytes a hand-over kept";
      }
      s.ahead_left = s.ahead.size() - s.ahead_read;
    }
    r.to_come -= got.size();
    if (!r.taken.empty()) r.taken.erase(r.taken.begin(), r.taken.begin() + static_cast<long>(got.size()));
  }
  if (!r.taken.empty()) {
    // The rest is the program's, before what the kernel holds.
    try {
      s.ahead.insert(s.ahead.end(), r.taken.begin(), r.taken.end());
    } catch (const std::bad_alloc&) {
      return "no memory for the bytes a switch took after the peer's Resume";
    }
    r.taken.clear();
    s.ahead_left = s.ahead.size() - s.ahead_read;
  }
  return nullptr;
}

}  // namespace

void disconnect(int fd) noexcept {
  sockaddr unspecified{};
  unspecified.sa_family = AF_UNSPEC;
  real().connect(fd, &unspecified, sizeof unspecified);
}

namespace {

// Ends a connection that cannot go on without bytes missing or twice: the kernel's
// disconnect resets it, and the program's calls fail with ECONNRESET.
void reset_connection(int fd, Socket& s, const char* why) noexcept {
  log::warn("shim: fd " + std::to_string(fd) + " (" + s.tuple.client.to_string() + " -> " +
            s.tuple.server.to_string() + "): " + why +
            "; the connection is reset rather than go on with bytes missing or twice");
  s.broken = true;
  disconnect(fd);
  s.back.in_done = s.back.out_done = true;
}

// Bytes the kernel has not had acknowledged yet on a TCP socket.
int unacknowledged(int fd) noexcept {
  int queued = 0;
  return real().ioctl(fd, SIOCOUTQ, &queued) == 0 ? queued : 1;
}

}  // namespace

bool tcp_counts(int fd, uint64_t& acked, uint64_t& received) noexcept {
  tcp_info info{};
  socklen_t length = sizeof info;
  if (real().getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0 ||
      length < offsetof(tcp_info, tcpi_bytes_received) + sizeof info.tcpi_bytes_received)
    return false;  // a kernel before 4.1
  acked = info.tcpi_bytes_acked;
  received = info.tcpi_bytes_received;
  return true;
}

namespace {

// The TCP bytes this side's program and read-ahead have taken from the kernel. False
// where the kernel does not say.
bool tcp_consumed(int fd, uint64_t& consumed) noexcept {
  for (int tries = 0; tries < 16; ++tries) {
    uint64_t acked = 0, before = 0, after = 0;
    int queued = 0;
    // Received, queued, received: equal counts say nothing arrived in between.
    if (!tcp_counts(fd, acked, before) || real().ioctl(fd, SIOCINQ, &queued) != 0 || !tcp_counts(fd, acked, after))
      return false;
    if (before != after || queued < 0 || uint64_t(queued) > before) continue;
    consumed = before - uint64_t(queued);
    return true;
  }
  return false;
}

}  // namespace

void Shim::after_switch(int fd, Socket& s, uint64_t server_sent) noexcept {
  uint64_t consumed = 0;
  if (server_sent == negotiation::kSentUnknown || !tcp_consumed(fd, consumed) || consumed <= server_sent) return;
  // The server handed the socket over, or its link failed, as soon as it switched: its
  // Resume came in while this side waited for the Switched, and the read-ahead took
  // it. Those bytes are the return's, not the program's.
  const uint64_t extra = consumed - server_sent;
  if (extra > s.ahead.size() - s.ahead_read)
    return reset_connection(fd, s, "the program read bytes the server wrote after it switched");
  Returning& r = s.back;
  const auto first = s.ahead.end() - static_cast<long>(extra);
  const std::size_t resume = static_cast<std::size_t>(std::min<uint64_t>(extra, r.peer.size()));
  std::copy(first, first + static_cast<long>(resume), r.peer.begin());
  r.peer_have = resume;
  try {
    r.taken.assign(first + static_cast<long>(resume), s.ahead.end());
  } catch (const std::bad_alloc&) {
    return reset_connection(fd, s, "no memory for the bytes a switch took after the peer's Resume");
  }
  s.ahead.resize(s.ahead.size() - static_cast<std::size_t>(extra));
  s.ahead_left = s.ahead.size() - s.ahead_read;
  log::info("shim: fd " + std::to_string(fd) + ": " + std::to_string(extra) +
            " bytes after the server's switch were its Resume; going back to TCP");
  notice_resume(fd, s);  // a whole Resume starts the return; a part waits for the rest
}

void Shim::start_return(int fd, Socket& s, Return reason) noexcept {
  transport::Connection& c = *s.connection;
  // What arrived before the failure is the program's, in order, before the rest: the
  // peer resumes after it.
  std::array<std::byte, 16 * 1024> chunk;
  try {
    while (std::size_t n = c.stream_read(chunk)) {
      s.ahead.insert(s.ahead.end(), chunk.data(), chunk.data() + n);
      s.rxio_read += n;
    }
  } catch (const std::bad_alloc&) {
    // Dropped from the read-ahead, so not counted as read: the peer sends it again.
  }
  s.ahead_left = s.ahead.size() - s.ahead_read;
  const bool peer_closed = c.stream_closed();
  log::info("shim: fd " + std::to_string(fd) + " (" + s.tuple.client.to_string() + " -> " +
            s.tuple.server.to_string() + ") goes back to TCP: " + to_string(reason) + " (" + c.error_text() + ")");
  c.close();
  closing.push_back(&c);
  s.connection = nullptr;
  unwatch_resume(s);
  s.mode = Socket::Mode::returning;
  if (board) board->count_returned(reason);
  if (s.record) s.record->backend = static_cast<uint8_t>(Backend::tcp);
  if (s.server && !s.fds.empty()) {
    // The client may ask to move it again (answer() holds the request meanwhile).
    try {
      accepted[s.tuple] = fd;
    } catch (const std::bad_alloc&) {
    }
  }

  Returning& r = s.back;
  // A Resume the peer wrote before this side noticed anything stays, with what a
  // switch took after it.
  const auto peer = r.peer;
  const std::size_t peer_have = r.peer_have;
  std::vector<std::byte> taken = std::move(r.taken);
  r = Returning{};
  r.peer = peer;
  r.peer_have = peer_have;
  r.taken = std::move(taken);
  r.peer_closed = peer_closed;
  r.next = kept_from(s);
  r.end = s.rxio_written;
  const char* why = nullptr;
  if (peer_have == r.peer.size()) {
    why = take_resume(fd, s);
    // A hand-over says where the other process goes on reading: this side's bytes
    // from there.
    auto resume = negotiation::decode_resume(r.peer);
    if (!why && resume->hand_over) {
      if (resume->read < r.next || resume->read > r.end)
        why = "the peer's shim handed over at a byte this side no longer has";
      else
        r.next = resume->read;
    }
  }
  r.resume = negotiation::encode(negotiation::Resume{r.next, r.end - r.next});
  if (why) reset_connection(fd, s, why);

  go_on_returning(fd, s);
  wake_sleepers();
}

void Shim::start_hand_over(int fd, Socket& s, Return reason) noexcept {
  log::info("shim: fd " + std::to_string(fd) + " (" + s.tuple.client.to_string() + " -> " +
            s.tuple.server.to_string() + ") hands its connection over to TCP: " + to_string(reason));
  unwatch_resume(s);
  s.mode = Socket::Mode::returning;
  if (board) board->count_returned(reason);
  if (s.record) s.record->backend = static_cast<uint8_t>(Backend::tcp);
  Returning& r = s.back;
  r = Returning{};
  r.role = reason == Return::fork ? Returning::Role::hands_to_child : Returning::Role::hands_to_exec;
  r.in_done = r.role == Returning::Role::hands_to_child;  // the child reads the peer's answer
  r.next = kept_from(s);
  r.end = s.rxio_written;
  r.resume = negotiation::encode(negotiation::Resume{r.next, r.end - r.next, true, s.rxio_read});
}

bool Shim::notice_resume(int fd, Socket& s) noexcept {
  if (s.mode != Socket::Mode::rxio) return false;
  Returning& r = s.back;
  while (r.peer_have < r.peer.size()) {
    ssize_t n = real().recv(fd, r.peer.data() + r.peer_have, r.peer.size() - r.peer_have, MSG_DONTWAIT);
    if (n > 0) {
      r.peer_have += std::size_t(n);
      continue;
    }
    // Ended or failed: every process of the peer let go of its socket, and nothing
    // more comes this way; the connection ends as its link says.
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) unwatch_resume(s);
    return false;
  }
  start_return(fd, s, Return::peer);
  return true;
}

void Shim::watch_resume(Socket& s, int fd) noexcept {
  unwatch_resume(s);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = fd;
  if (::epoll_ctl(wait_set.get(), EPOLL_CTL_ADD, fd, &ev) != 0) return;
  s.resume_fd = fd;
  ++resume_watches;
}

void Shim::unwatch_resume(Socket& s) noexcept {
  if (s.resume_fd < 0) return;
  remove_from_wait_set(s.resume_fd);
  s.resume_fd = -1;
  --resume_watches;
}

void Shim::serve_resumes() noexcept {
  if (resume_watches == 0) return;
  std::array<epoll_event, 64> ready;
  const int n = ::epoll_wait(wait_set.get(), ready.data(), int(ready.size()), 0);
  for (int i = 0; i < n; ++i) {
    const int fd = ready[std::size_t(i)].data.fd;
    if (Socket* s = socket_of(fd); s && s->resume_fd == fd) {
      notice_resume(fd, *s);
      continue;
    }
    for (auto [kept_fd, s] : lingering)
      if (kept_fd == fd && s->resume_fd == fd) {
        notice_resume(fd, *s);
        break;
      }
  }
}

Acceptors::~Acceptors() {
  if (slots_) ::munmap(slots_, kSlots * sizeof(Slot));
}

bool Acceptors::map() noexcept {
  void* p = ::mmap(nullptr, kSlots * sizeof(Slot), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  slots_ = static_cast<Slot*>(p);  // zeros: every slot free
  return true;
}

namespace {

uint64_t key_of(const Tuple& tuple) noexcept { return TupleHash{}(tuple) | 1; }

}  // namespace

void Acceptors::record(const Tuple& tuple, Owner owner) noexcept {
  const uint64_t key = key_of(tuple);
  for (std::size_t i = 0; i < kProbes; ++i) {
    Slot& slot = slots_[(key + i) % kSlots];
    uint32_t holder = slot.pid.load(std::memory_order_acquire);
    // Free, or left by a process that died without closing its connections.
    if (holder == kClaimed || (holder != 0 && !(::kill(static_cast<pid_t>(holder), 0) != 0 && errno == ESRCH)))
      continue;
    if (!slot.pid.compare_exchange_strong(holder, kClaimed, std::memory_order_acquire)) continue;
    slot.key.store(key, std::memory_order_relaxed);
    slot.cm_port.store(owner.cm_port, std::memory_order_relaxed);
    slot.pid.store(owner.pid, std::memory_order_release);
    return;
  }
  // Full around its place: requests for it get no answer but "not yet", and the
  // client stays on TCP at its deadline.
}

void Acceptors::erase(const Tuple& tuple, uint32_t pid) noexcept {
  const uint64_t key = key_of(tuple);
  for (std::size_t i = 0; i < kProbes; ++i) {
    Slot& slot = slots_[(key + i) % kSlots];
    uint32_t mine = pid;
    if (slot.key.load(std::memory_order_relaxed) == key &&
        slot.pid.compare_exchange_strong(mine, 0, std::memory_order_release))
      return;
  }
}

Acceptors::Owner Acceptors::owner(const Tuple& tuple) const noexcept {
  const uint64_t key = key_of(tuple);
  for (std::size_t i = 0; i < kProbes; ++i) {
    const Slot& slot = slots_[(key + i) % kSlots];
    const uint32_t pid = slot.pid.load(std::memory_order_acquire);
    if (pid == 0 || pid == kClaimed || slot.key.load(std::memory_order_relaxed) != key) continue;
    // A process that died without closing leaves its entries: they name no one.
    if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) continue;
    const uint16_t cm_port = slot.cm_port.load(std::memory_order_acquire);
    // Erased and taken again meanwhile: the port may be another entry's.
    if (slot.pid.load(std::memory_order_acquire) != pid || slot.key.load(std::memory_order_relaxed) != key) continue;
    return Owner{pid, cm_port};
  }
  return {};
}

bool Shim::has_children() noexcept {
  siginfo_t info{};
  return ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) == 0 || errno != ECHILD;
}

void Shim::after_fork_in_parent() noexcept {
  for (Socket* s = moved_sockets; s; s = s->moved_next) {
    if (s->fds.empty()) continue;
    if (s->mode == Socket::Mode::rxio) s->shared = true;
    // Back on TCP (or going back), and held by the child too: it stays there.
    if (s->mode == Socket::Mode::tcp || s->mode == Socket::Mode::returning) s->tried = true;
  }
  // The child may accept on these listeners: requests for what this process accepted
  // are sent on to its own endpoint.
  for (auto& [port, endpoint] : endpoints) {
    endpoint.shared = true;
    serve_shared(port, endpoint);
    if (endpoint.cm_listener) start_cm_thread();
  }
}

void Shim::after_fork_in_child() noexcept {
  // The parent's engine, negotiations, moves and connections stay the parent's: the
  // child forgets them without a call that could reach them, and starts its own
  // engine when it needs one.
  state_pid = getpid();
  engine_ = nullptr;
  engine_failed = false;
  link_failures_seen_ = handed_over_at_ = 0;
  resume_watches = 0;
  for (Peer& peer : peers) let_go(peer.cm_id);
  peers.clear();  // the child's copies of the clients' sockets close
  committed.clear();
  switch_outcomes.clear();  // the parent's moves: their clients ask the parent
  outcome_order.clear();
  accepted.clear();
  unmatched.clear();
  closing.clear();
  returning.clear();
  for (auto [fd, s] : lingering) {
    real().close(fd);  // its copy of the private descriptor
    s->resume_fd = -1;  // in the parent's wait set, which the child leaves alone
    s->lingering = false;
    recycle(s);
  }
  lingering.clear();
  // The parent's rdma_cm ids are the parent's alone: the kernel refuses the child's
  // calls on them. The child makes its own when it accepts on a listener, and closes
  // its copy of the channel, so that the ids go with the parent.
  if (cm_events) real().close(cm_events->fd());
  let_go(cm_events);
  cm_thread_started = false;  // the parent's thread is not the child's
  for (auto& [port, endpoint] : endpoints) {
    let_go(endpoint.cm_listener);
    let_go(endpoint.own_cm);
    endpoint.own.reset();  // the parent's own endpoint (its copy here closes)
    endpoint.shared = true;
    endpoint.serving = false;  // until this child accepts on the listener
  }
  for (Socket* s = moved_sockets; s; s = s->moved_next) {
    s->record = nullptr;
    s->resume_fd = -1;  // the wait set is the parent's
    s->back.watched = 0;
    s->shared = false;
    s->tried = true;  // the parent holds it too: whatever its mode, it moves no more
    if (s->mode == Socket::Mode::moving || s->mode == Socket::Mode::returning) s->inherited = true;
    if (s->mode != Socket::Mode::rxio) continue;
    // The connection is the parent's. When the parent closes its copy, its hand-over
    // sends the peer back to TCP from the byte the parent read, and this copy reads
    // on from there (docs/shim.md, "fork and exec").
    s->connection = nullptr;
    s->kept.clear();
    s->back = Returning{};
    s->back.role = Returning::Role::adopted;
    s->back.out_done = true;
    s->mode = Socket::Mode::returning;
  }
}

ExecEnvironment::~ExecEnvironment() {
  const int saved = errno;  // the failed exec's, for its caller
  memfds_.clear();
  errno = saved;
}

namespace {

// Whether ld.so starts the image open at `fd` and honours LD_PRELOAD there: a dynamic
// ELF (one with an interpreter) or a script (whose interpreter is, as a rule), and not
// setuid or setgid (secure execution loads no preload from a path).
template <typename Header, typename ProgramHeader>
bool has_interpreter(int fd, const Header& header) noexcept {
  if (header.e_phentsize != sizeof(ProgramHeader)) return false;
  for (unsigned i = 0; i < header.e_phnum; ++i) {
    ProgramHeader program{};
    if (::pread(fd, &program, sizeof program, static_cast<off_t>(header.e_phoff + i * sizeof program)) !=
        static_cast<ssize_t>(sizeof program))
      return false;
    if (program.p_type == PT_INTERP) return true;
  }
  return false;
}

bool honours_preload(int fd) noexcept {
  struct stat st {};
  if (fd < 0 || ::fstat(fd, &st) != 0 || (st.st_mode & (S_ISUID | S_ISGID))) return false;
  Elf64_Ehdr header{};
  const ssize_t n = ::pread(fd, &header, sizeof header, 0);
  if (n >= 2 && header.e_ident[0] == '#' && header.e_ident[1] == '!') return true;
  if (n < static_cast<ssize_t>(sizeof(Elf32_Ehdr)) || std::memcmp(header.e_ident, ELFMAG, SELFMAG) != 0) return false;
  if (header.e_ident[EI_CLASS] == ELFCLASS64)
    return n == static_cast<ssize_t>(sizeof header) && has_interpreter<Elf64_Ehdr, Elf64_Phdr>(fd, header);
  Elf32_Ehdr narrow{};
  std::memcpy(&narrow, &header, sizeof narrow);
  return header.e_ident[EI_CLASS] == ELFCLASS32 && has_interpreter<Elf32_Ehdr, Elf32_Phdr>(fd, narrow);
}

}  // namespace

bool image_honours_preload(int fd) noexcept { return honours_preload(fd); }

bool image_honours_preload(const char* file, bool search_path) noexcept {
  auto at = [](const std::string& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    return honours_preload(fd.get());
  };
  try {
    if (!file || !*file) return false;
    if (!search_path || std::strchr(file, '/')) return at(file);
    // As execvp looks: each PATH entry in turn (an empty one is the current directory).
    const char* path = std::getenv("PATH");
    std::string_view dirs = path ? path : "/bin:/usr/bin";
    for (;;) {
      const std::size_t end = std::min(dirs.find(':'), dirs.size());
      std::string candidate(dirs.substr(0, end));
      candidate += candidate.empty() ? "" : "/";
      candidate += file;
      if (::access(candidate.c_str(), X_OK) == 0) return at(candidate);
      if (end == dirs.size()) return false;
      dirs.remove_prefix(end + 1);
    }
  } catch (const std::bad_alloc&) {
    return false;
  }
}

bool ExecEnvironment::reaches_a_shim() const noexcept {
  if (!image_honours_preload_) return false;
  Dl_info self{};
  if (!dladdr(reinterpret_cast<const void*>(&note_inherited_read_ahead), &self) || !self.dli_fname) return false;
  auto base = [](std::string_view path) { return path.substr(path.find_last_of('/') + 1); };
  const std::string_view mine = base(self.dli_fname);
  for (char* const* e = given_; e && *e; ++e) {
    std::string_view entry = *e;
    if (!entry.starts_with("LD_PRELOAD=")) continue;
    entry.remove_prefix(11);
    // ld.so splits the list at spaces and colons.
    while (!entry.empty()) {
      const std::size_t end = std::min(entry.find_first_of(" :"), entry.size());
      if (end > 0 && base(entry.substr(0, end)) == mine) return true;
      entry.remove_prefix(std::min(end + 1, entry.size()));
    }
  }
  return false;
}

bool ExecEnvironment::carry(std::span<const int> fds, std::span<const std::byte> bytes) noexcept {
  struct stat socket_stat{};
  if (fds.empty() || ::fstat(fds[0], &socket_stat) != 0) return false;
  InheritedAhead header;
  header.device = socket_stat.st_dev;
  header.inode = socket_stat.st_ino;
  header.length = bytes.size();
  for (int fd : fds.first(std::min<std::size_t>(fds.size(), InheritedAhead::kMaxFds))) header.fds[header.fd_count++] = fd;
  // Not close-on-exec: the new image inherits it, as it does the socket.
  UniqueFd memfd(::memfd_create(kAheadMemfdName, 0));
  if (!memfd) return false;
  auto write_whole = [&](const void* data, std::size_t size) {
    for (auto* at = static_cast<const char*>(data); size > 0;) {
      ssize_t n = real().write(memfd.get(), at, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      at += n;
      size -= std::size_t(n);
    }
    return true;
  };
  if (!write_whole(&header, sizeof header) || !write_whole(bytes.data(), bytes.size())) return false;
  // Made aside, and taken only once all of it is: a failure leaves the environment
  // as it was.
  try {
    const std::string name = std::string(kAheadVariable) + "=";
    std::string added = (added_.empty() ? name : added_ + ",") + std::to_string(memfd.get());
    std::vector<char*> envp;
    for (char* const* e = given_; e && *e; ++e)
      if (!std::string_view(*e).starts_with(name)) envp.push_back(*e);
    envp.push_back(nullptr);  // added's place, once it has one
    envp.push_back(nullptr);
    memfds_.reserve(memfds_.size() + 1);
    added_ = std::move(added);
    envp[envp.size() - 2] = added_.data();
    envp_ = std::move(envp);
  } catch (const std::bad_alloc&) {
    return false;
  }
  memfds_.push_back(std::move(memfd));
  return true;
}

void Shim::before_exec(ExecEnvironment& env) noexcept {
  // Bytes read ahead of the program can be given to a new image that loads the shim.
  const bool can_carry = env.reaches_a_shim();
  // An fd of `s` without close-on-exec: the new image has the socket through it.
  auto inherited_by_exec = [this](int fd, const Socket& s) {
    if (socket_of(fd) != &s) return false;
    const int flags = real().fcntl(fd, F_GETFD);
    return flags >= 0 && !(flags & FD_CLOEXEC);
  };
  // Only the sockets the new image inherits: through an fd without close-on-exec.
  std::vector<std::pair<int, Socket*>> handed;
  for (Socket* s = moved_sockets; s; s = s->moved_next) {
    // Moved; on its way back (carried through first); or back on TCP with bytes read
    // ahead of the program. Not what a forked child holds of its parent's connection
    // (the parent goes on with it): a return the parent had under way at the fork, a
    // read-ahead that may be the parent's.
    const bool read_ahead = s->mode == Socket::Mode::tcp && s->has_ahead() && !forked_child;
    const bool returning_here = s->mode == Socket::Mode::returning && !s->inherited;
    if (s->mode != Socket::Mode::rxio && !returning_here && !read_ahead) continue;
    auto inherited = std::find_if(s->fds.begin(), s->fds.end(), [&](int fd) { return inherited_by_exec(fd, *s); });
    if (inherited == s->fds.end()) continue;
    const int fd = *inherited;
    try {
      handed.emplace_back(fd, s);
    } catch (const std::bad_alloc&) {
      break;
    }
    // The bytes the program has not read of the read-ahead come before what the peer
    // resumes with: without a way to give them to the new image, no hand-over.
    if (s->mode == Socket::Mode::rxio && (can_carry || !s->has_ahead())) start_hand_over(fd, *s, Return::exec);
  }
  // Until each peer answered: the new image then reads a plain TCP stream, after the
  // read-ahead it is given.
  carry_returns(handed, std::chrono::steady_clock::now() + negotiate_timeout);
  for (auto [fd, s] : handed) {
    if (s->mode == Socket::Mode::rxio || (s->mode == Socket::Mode::tcp && s->has_ahead())) {
      if (!can_carry) {
        reset_connection(fd, *s, "the program executed another, which does not load the shim, with bytes read ahead of it");
        continue;
      }
      std::vector<int> fds;
      try {
        for (int other : s->fds)
          if (inherited_by_exec(other, *s)) fds.push_back(other);
      } catch (const std::bad_alloc&) {
      }
      if (s->mode != Socket::Mode::tcp ||
          !env.carry(fds, std::span<const std::byte>(s->ahead).subspan(s->ahead_read)))
        reset_connection(fd, *s, "the bytes read ahead of the program could not be handed to the program it executed");
    } else if (s->mode == Socket::Mode::returning) {
      // A child's copy stays as it is: its parent may go on with the connection.
      if (s->back.role == Returning::Role::adopted)
        log::warn("shim: fd " + std::to_string(fd) + ": executing a program before this socket's parent handed it " +
                  "over; the new program gets it as it is");
      else
        reset_connection(fd, *s, "the peer's shim did not answer in time");
    }
  }
}

void Shim::at_exit() noexcept {
  // The rdma_cm thread stops (a vfork() child's exit is not its parent's).
  if (getpid() == state_pid) exiting.store(true, std::memory_order_release);
  if (!engine_) return;
  // Another thread may be inside the shim: it gets a moment to leave, not a deadlock.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(50);
  while (!mutex.try_lock())
    if (std::chrono::steady_clock::now() > give_up) return;
  std::unique_lock lock(mutex, std::adopt_lock);
  Inside inside;
  std::vector<std::pair<int, Socket*>> handing;
  try {
    handing.reserve(lingering.size() + 16);
    for (auto [fd, s] : lingering)
      if (s->back.role == Returning::Role::hands_to_child) handing.emplace_back(fd, s);
    for (Socket* s = moved_sockets; s; s = s->moved_next) {
      const int fd = fd_of(*s);
      if (s->mode != Socket::Mode::rxio || fd < 0) continue;  // lingering ones are above
      if (s->shared && has_children()) {
        start_hand_over(fd, *s, Return::fork);
        handing.emplace_back(fd, s);
      } else {
        s->connection->close();
      }
    }
  } catch (const std::bad_alloc&) {
  }
  // The hand-overs out, as far as a short wait lets them: the process ends after.
  carry_returns(handing, std::chrono::steady_clock::now() + std::chrono::milliseconds(500));
  // The closes on their way (a verbs link posts them).
  const auto flushed = std::chrono::steady_clock::now() + std::chrono::milliseconds(10);
  while (std::chrono::steady_clock::now() < flushed && engine_->progress() > 0) {
  }
}

void Shim::carry_returns(std::span<const std::pair<int, Socket*>> returns,
                         std::chrono::steady_clock::time_point until) noexcept {
  std::vector<pollfd> waits;
  try {
    waits.reserve(returns.size());
  } catch (const std::bad_alloc&) {
    return;
  }
  for (;;) {
    waits.clear();
    for (auto [fd, s] : returns) {
      if (s->mode != Socket::Mode::returning) continue;
      Returning& r = s->back;
      if (r.role == Returning::Role::hands_to_child) {
        // A hand-over to a child: written out, never read (the child reads the answer).
        if (!r.out_done && !write_out(fd, *s)) r.out_done = true;
      } else {
        go_on_returning(fd, *s);
        if (s->mode != Socket::Mode::returning) continue;
      }
      const short events = short((r.in_done ? 0 : POLLIN) | (r.out_done ? 0 : POLLOUT));
      if (events) waits.push_back(pollfd{fd, events, 0});
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    if (waits.empty() || left.count() <= 0) return;
    real().poll(waits.data(), waits.size(), int(left.count()) + 1);
  }
}

void Shim::watch_return(int fd, Socket& s, uint32_t events) noexcept {
  Returning& r = s.back;
  if (events == r.watched) return;
  if (events == 0) return unwatch_return(fd);
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (r.watched) {
    if (::epoll_ctl(wait_set.get(), EPOLL_CTL_MOD, fd, &ev) == 0) r.watched = events;
    return;
  }
  if (::epoll_ctl(wait_set.get(), EPOLL_CTL_ADD, fd, &ev) != 0) return;
  try {
    returning.emplace_back(fd, &s);
    r.watched = events;
  } catch (const std::bad_alloc&) {
    remove_from_wait_set(fd);  // the program's calls carry it on alone
  }
}

void Shim::serve_returning() noexcept {
  if (returning.empty()) return;
  // A copy: going on changes the list.
  std::vector<std::pair<int, Socket*>> now;
  try {
    now = returning;
  } catch (const std::bad_alloc&) {
    return;
  }
  for (auto [fd, s] : now)
    if (s->back.watched) go_on_returning(fd, *s);
}

void Shim::unwatch_return(Socket& s) noexcept {
  if (!s.back.watched) return;
  auto it = std::find_if(returning.begin(), returning.end(), [&s](const auto& entry) { return entry.second == &s; });
  if (it != returning.end()) unwatch_return(it->first);
}

int Shim::fd_of(const Socket& s) const noexcept {
  for (int fd : s.fds)
    if (socket_of(fd) == &s) return fd;
  return -1;
}

void Shim::unwatch_return(int fd) noexcept {
  auto it = std::find_if(returning.begin(), returning.end(), [fd](const auto& entry) { return entry.first == fd; });
  if (it == returning.end()) return;
  it->second->back.watched = 0;
  returning.erase(it);
  remove_from_wait_set(fd);
}

void Shim::serve_lingering() noexcept {
  for (std::size_t i = 0; i < lingering.size();) {
    auto [fd, s] = lingering[i];
    bool done = false;
    if (s->back.role == Returning::Role::hands_to_child) {
      // Closed here while a forked child holds it: the hand-over goes out, and nothing
      // is read here, of TCP (the child's) or of the connection (its credit would let
      // the peer forget bytes the child needs).
      Returning& r = s->back;
      if (!r.out_done && !write_out(fd, *s)) r.out_done = true;  // the TCP connection is gone
      if (r.out_done && s->write_shut) real().shutdown(fd, SHUT_WR);
      transport::Connection* c = s->connection;
      // The peer lets go of the connection once it has the hand-over. One that closed
      // its side before looks for a hand-over when this side closes, so the close
      // waits until the hand-over is in the peer's kernel.
      if (c && r.out_done && (c->failed() || (c->stream_closed() && unacknowledged(fd) == 0))) {
        c->close();
        closing.push_back(c);
        s->connection = nullptr;
      }
      watch_return(fd, *s, r.out_done ? 0u : uint32_t{EPOLLOUT});
      done = r.out_done && !s->connection;
      if (done && !has_children()) {
        // No child holds it any more: the peer's answer is read out here, so that the
        // close sends no reset.
        r.role = Returning::Role::resumes;
        s->mode = Socket::Mode::tcp;
        done = false;
      }
    } else if (s->mode == Socket::Mode::rxio) {
      transport::Connection& c = *s->connection;
      // The program is gone: what arrives is dropped, but counted as read, so that the
      // peer does not send it again if the link fails.
      std::array<std::byte, 16 * 1024> sink;
      while (std::size_t n = c.stream_read(sink)) s->rxio_read += n;
      if (c.stream_closed() && notice_resume(fd, *s)) {
        // The peer handed its socket over before it closed: its answer goes out.
      } else if (c.failed() && c.stream_closed()) {
        // The peer had shut its side down before the link failed. If its program only
        // shut down and still reads, its shim goes back, and its Resume comes over TCP
        // (taken above): this side's bytes go again from where it read. If its process
        // went, its TCP stream ends, and nothing is wanted. Until one of the two, the
        // wait set watches for it.
        char byte;
        const ssize_t n = real().recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
          closing.push_back(&c);  // released from there
          s->connection = nullptr;
          done = true;
        } else if (s->resume_fd != fd) {
          watch_resume(*s, fd);
        }
      } else if (c.failed()) {
        start_return(fd, *s, Return::link_failed);
      } else if (c.stream_closed()) {
        // Both sides closed over a link that works: the conversation is over.
        closing.push_back(&c);  // released from there
        s->connection = nullptr;
        done = true;
      }
    } else if (s->mode == Socket::Mode::returning) {
      go_on_returning(fd, *s);
    }
    if (s->mode == Socket::Mode::tcp) {
      // Back on TCP: what the peer still sends (its kept bytes) is taken until its end,
      // so that the close sends no reset that could take our kept bytes from it.
      if (s->linger_until == std::chrono::steady_clock::time_point{}) {
        s->linger_until = std::chrono::steady_clock::now() + 2 * negotiate_timeout;
        add_to_wait_set(fd);
      }
      std::array<std::byte, 16 * 1024> sink;
      ssize_t n;
      while ((n = real().recv(fd, sink.data(), sink.size(), MSG_DONTWAIT)) > 0) {
      }
      done = n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK) ||
             std::chrono::steady_clock::now() > s->linger_until;
      if (done) remove_from_wait_set(fd);
    }
    if (!done) {
      ++i;
      continue;
    }
    unwatch_return(fd);
    unwatch_resume(*s);
    remove_from_wait_set(fd);  // a forked child may hold the socket on
    real().close(fd);
    lingering.erase(lingering.begin() + static_cast<long>(i));
    s->lingering = false;
    if (s->holds > 0) s->gone = true;  // the last holder recycles it
    else recycle(s);
  }
}

void Shim::go_on_returning(int fd, Socket& s) noexcept {
  // A hand-over to a forked child: serve_lingering writes it, and nothing is read here.
  if (s.mode != Socket::Mode::returning || s.back.role == Returning::Role::hands_to_child) return;
  Returning& r = s.back;
  if (const char* why = read_in(fd, s)) reset_connection(fd, s, why);
  // What the kernel holds from here on is the program's.
  if (r.in_done) give_interests_to_kernel(s);
  // The server writes once the client's Resume is in: until the client has written
  // it, the client may still be taking in the server's last TCP bytes from before the
  // switch, and would take a Resume for more of them. A hand-over is written at once:
  // the peer answers it, once every byte the hand-over kept is in (read_in).
  const bool answering_hand_over = r.peer_hands_over && !r.in_done;
  const bool may_write =
      !answering_hand_over && (r.hands_over() || !s.server || r.peer_have == r.peer.size() || r.in_done);
  if (may_write && !r.out_done) {
    if (!write_out(fd, s)) r.out_done = true;  // the peer is gone: its reads end with the kernel's error
    // A shutdown(SHUT_WR) made over rxio ends the TCP stream after the kept bytes.
    if (r.out_done && s.write_shut) real().shutdown(fd, SHUT_WR);
  }
  if (r.in_done && r.out_done) {
    unwatch_return(fd);
    if (s.connection) {
      // Handed over, and answered: the peer let go of the connection already.
      s.connection->close();
      closing.push_back(s.connection);
      s.connection = nullptr;
    }
    s.mode = Socket::Mode::tcp;
    s.kept.clear();
    after_return(s);
    wake_sleepers();
    return;
  }
  // Carried on without the program: its epoll sets do not watch the socket until the
  // peer's part is in (its Resume is not the program's to read), so the wait set
  // watches for the rest of what comes in, and for room for kept bytes that wait.
  watch_return(fd, s, (r.in_done ? 0u : uint32_t{EPOLLIN}) | (may_write && !r.out_done ? uint32_t{EPOLLOUT} : 0u));
}

void Shim::give_interests_to_kernel(Socket& s) noexcept {
  // Every fd (dup) that names the socket.
  for (int ep : s.epolls) {
    EpollSet* set = epoll_of(ep);
    if (!set) continue;
    for (auto& [watched, interest] : set->interests) {
      // A one-shot that fired stays out until the program re-arms it (EPOLL_CTL_MOD):
      // the kernel would take it for armed.
      if (interest.in_kernel || interest.disarmed || socket_of(watched) != &s) continue;
      epoll_event ev{};
      ev.events = interest.events;
      ev.data = interest.data;
      if (real().epoll_ctl(ep, EPOLL_CTL_ADD, watched, &ev) == 0 || errno == EEXIST) interest.in_kernel = true;
    }
  }
}

bool Shim::may_move_again(const Socket& s) const noexcept {
  const Returning& r = s.back;
  // Only where the same two processes go on with it, the program still holding it,
  // nothing shut, and the peer's Resume read (not the end of its stream): a
  // connection handed over, or adopted, stays on TCP.
  return r.role == Returning::Role::resumes && r.peer_have == r.peer.size() && !r.peer_hands_over &&
         !r.peer_closed && !s.broken && !s.shared && !s.lingering && !s.fds.empty() && !s.read_shut && !s.write_shut &&
         s.failed_links < move_again;
}

void Shim::after_return(Socket& s) noexcept {
  const bool again = may_move_again(s);
  if (again) {
    ++s.failed_links;
    // Later each time: a link that fails again soon costs a negotiation per 16 times
    // more calls.
    s.move_at = static_cast<uint32_t>(
        std::min<uint64_t>(uint64_t(std::max<uint32_t>(move_after, 1)) << (4 * s.failed_links), UINT32_MAX));
    s.calls = 0;
  }
  s.tried = !again;  // last: the fast path reads it without the lock
  // Requests held while the return went on: answered, or refused where it stays.
  if (s.server) answer_parked(s.tuple);
}

void Shim::notice_failures() noexcept {
  if (!engine_ || engine_->link_failures() == link_failures_seen_) return;
  link_failures_seen_ = engine_->link_failures();
  // A connection whose peer had closed its side has all its bytes here: it goes back
  // only if the program writes again (a peer process that exits closes its
  // connections, then its links fail). Those the program closed linger: serve_lingering
  // sends them back.
  for (Socket *s = moved_sockets, *next; s; s = next) {
    next = s->moved_next;
    const int fd = fd_of(*s);
    if (fd >= 0 && s->mode == Socket::Mode::rxio && s->connection->failed() && !s->connection->stream_closed())
      start_return(fd, *s, Return::link_failed);
  }
}

}  // namespace rxio::shim
