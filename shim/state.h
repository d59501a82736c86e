// The shim's process-wide state: the fd table, the engine, the negotiation endpoints
// and the wait set that readiness calls sleep on (docs/shim.md).
//
// Locking: one mutex guards the engine and everything below it (the engine belongs to
// one thread at a time). Calls on fds the shim does not own read one table entry and
// go straight to the C library. Nothing sleeps while holding the mutex: waits drop it,
// sleep in the kernel on the app's fds plus the wait set, and take it again.
#pragma once

#include <netinet/in.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/fd.h"
#include "shim/negotiation.h"
#include "shim/policy.h"
#include "shim/stat.h"
#include "transport/engine.h"
#include "verbs/cm.h"

namespace rxio::shim {

// Lets go of `value` without its destructor: what it names (an rdma_cm id, an event
// channel) is another process's too, since a fork.
template <typename T>
void let_go(std::optional<T>& value) noexcept {
  if (!value) return;
  static_cast<void>(new (std::nothrow) T(std::move(*value)));
  value.reset();  // moved from: its destructor lets go of nothing
}

// True while this thread runs shim code: the engine's own system calls then go
// straight to the C library.
extern thread_local bool t_inside;

struct Inside {
  bool was;
  Inside() noexcept : was(t_inside) { t_inside = true; }
  ~Inside() { t_inside = was; }
  Inside(const Inside&) = delete;
  Inside& operator=(const Inside&) = delete;
};

class Shim;

// The shim's one lock. Any thread that holds it may progress the engine and so take in
// what another thread sleeps for, or disarm the wake-ups those sleepers rely on; so
// whoever lets go of it first re-arms the engine for the sleepers and wakes them when
// the engine moved. This keeps every path honest, not only the ones that remember.
class ShimMutex {
 public:
  explicit ShimMutex(Shim& shim) noexcept : shim_(shim) {}
  void lock() noexcept { mutex_.lock(); }
  bool try_lock() noexcept { return mutex_.try_lock(); }
  void unlock() noexcept;
  // Around fork(): held by the forking thread, so that the child's copy is consistent,
  // then let go in both processes without the hand-over.
  void lock_for_fork() noexcept { mutex_.lock(); }
  void unlock_after_fork() noexcept { mutex_.unlock(); }

 private:
  Shim& shim_;
  std::mutex mutex_;
};

// The last bytes written on a moved connection, in a ring as large as the peer's
// receive window: whatever the peer had not read when the connection went back to TCP
// is among them (docs/shim.md, "Back to TCP"). Mapped when the connection moves; its
// pages cost memory once written.
class KeptBytes {
 public:
  KeptBytes() = default;
  ~KeptBytes() { clear(); }
  KeptBytes(const KeptBytes&) = delete;
  KeptBytes& operator=(const KeptBytes&) = delete;

  // False without memory.
  bool reserve(std::size_t size) noexcept;
  void clear() noexcept;
  std::size_t size() const noexcept { return size_; }
  // Keeps `data`, the stream's bytes from position `at` on.
  void keep(const std::byte* data, std::size_t length, uint64_t at) noexcept;
  // The kept bytes from position `at` on, up to the ring's end (a second call gets the
  // rest). `at` must lie within the last size() bytes kept, before `end`.
  std::span<const std::byte> from(uint64_t at, uint64_t end) const noexcept;

 private:
  std::byte* bytes_ = nullptr;
  std::size_t size_ = 0;
};

// Going back to TCP, both ways (docs/shim.md, "Back to TCP").
struct Returning {
  // Out: this side's Resume, then its kept bytes from `next` to `end`.
  std::array<std::byte, negotiation::kResumeSize> resume{};
  std::size_t resume_sent = 0;
  uint64_t next = 0, end = 0;
  bool out_done = false;
  uint32_t watched = 0;  // events the wait set watches meanwhile (Shim::returning)
  // In: the peer's Resume, then the kept bytes read here (`to_come` of them still), of
  // which the first `skip` (the program read them already) are dropped. A resume reads
  // only those; a hand-over reads all of them, the others into the read-ahead, before
  // this side answers, since the process the peer hands to writes once it has the
  // answer, and the peer's kept bytes must be in the stream before its first byte.
  std::array<std::byte, negotiation::kResumeSize> peer{};
  std::size_t peer_have = 0;
  uint64_t to_come = 0, skip = 0;
  bool in_done = false;
  bool peer_closed = false;  // its stream had ended over rxio: an end on TCP loses nothing
  bool peer_hands_over = false;  // another process of the peer's goes on
  // TCP bytes past the peer's Resume that a switch took before it knew of it: they come
  // before the kernel's (Shim::after_switch).
  std::vector<std::byte> taken;
  // Which process goes on over TCP, and so which half of the exchange is this side's
  // (docs/shim.md, "fork and exec").
  enum class Role : uint8_t {
    // This process: it writes its Resume (a server after the client's) and reads the
    // peer's.
    resumes,
    // A forked child that holds the socket too (this process closed it): the hand-over
    // is written at once, never read here (the child reads the answer), and the
    // connection is kept until the peer lets go of it.
    hands_to_child,
    // The program this one executes: the hand-over is written at once, the peer's
    // answer read here before the exec.
    hands_to_exec,
    // This is a forked child's copy of a socket its parent moved: the parent writes
    // the hand-over, this side reads the peer's answer and writes after it.
    adopted,
  };
  Role role = Role::resumes;
  bool hands_over() const noexcept { return role == Role::hands_to_child || role == Role::hands_to_exec; }
};

// The environment an exec passes on: the program's, plus, where an inherited socket
// had bytes read ahead of the program, RXIO_SHIM_AHEAD naming the memfds that carry
// them to the new image's shim (docs/shim.md, "fork and exec"). The memfds close with
// it: the exec failed, or the new image has its copies.
class ExecEnvironment {
 public:
  // `image_honours_preload`: whether the image executed loads LD_PRELOAD
  // (image_honours_preload()).
  ExecEnvironment(char* const given[], bool image_honours_preload) noexcept
      : given_(given), image_honours_preload_(image_honours_preload) {}
  ~ExecEnvironment();
  ExecEnvironment(const ExecEnvironment&) = delete;
  ExecEnvironment& operator=(const ExecEnvironment&) = delete;

  char* const* envp() const noexcept { return envp_.empty() ? given_ : envp_.data(); }
  // Whether the new image loads this shim (it honours LD_PRELOAD, which names the
  // shim): only then can it be given bytes.
  bool reaches_a_shim() const noexcept;
  // Hands `bytes` read ahead of the program on the socket `fds` name to the new image.
  // False when it cannot (no memory, no memfd): the caller resets the connection.
  bool carry(std::span<const int> fds, std::span<const std::byte> bytes) noexcept;

 private:
  char* const* given_;
  bool image_honours_preload_;
  std::string added_;
  std::vector<char*> envp_;
  std::vector<UniqueFd> memfds_;
};

// Whether ld.so starts the image, and honours LD_PRELOAD there: dynamic, or a script;
// not setuid or setgid. By the file (found on PATH as execvp does when `search_path`
// and it has no slash) or by an fd open on it (fexecve).
bool image_honours_preload(const char* file, bool search_path) noexcept;
bool image_honours_preload(int fd) noexcept;

// What one memfd of RXIO_SHIM_AHEAD holds: this header, then `length` bytes, which
// the program reads on the socket (named by its device and inode) before the kernel's.
struct InheritedAhead {
  static constexpr uint64_t kMagic = 0x31646165686f6978ull;  // "xiohead1"
  static constexpr int kMaxFds = 16;
  uint64_t magic = kMagic;
  uint64_t device = 0, inode = 0;
  uint64_t length = 0;
  uint32_t fd_count = 0;
  int32_t fds[kMaxFds] = {};
};
inline constexpr const char* kAheadVariable = "RXIO_SHIM_AHEAD";
inline constexpr const char* kAheadMemfdName = "rxio-read-ahead";

// Resets the TCP connection: the kernel's disconnect sends a reset, and the program's
// calls fail with ECONNRESET (back.cc).
void disconnect(int fd) noexcept;

// At load, in the new image: notes what RXIO_SHIM_AHEAD names, and takes it out of the
// environment; the memfds are taken in at the first call into the shim, before any
// call of the program's reaches its sockets (Shim::current(), Shim::get()).
void note_inherited_read_ahead() noexcept;

// What the shim knows about one TCP socket of the program. Shared by dup()s of it.
struct Socket {
  enum class Mode : uint8_t {
    fresh,       // created, neither connected nor listening yet
    connecting,  // a non-blocking connect is under way
    listening,   // answers negotiations for its port
    tcp,         // connected over TCP; calls go to the kernel; it may move later
    moving,      // switching to rxio: the program's calls on it wait (docs/shim.md)
    rxio,        // carried by a transport connection
    returning,   // back on TCP after a move: Resumes and kept bytes still on the way
  };
  // Read without the mutex by the TCP fast path; changed only with it.
  std::atomic<Mode> mode{Mode::fresh};
  // Threads in a kernel call on it without the mutex (tcp mode). A switch waits for
  // none to be left, so that no byte crosses the kernel socket behind its back.
  std::atomic<int> kernel_calls{0};
  // Data calls so far: a client moves its connection once they reach RXIO_SHIM_MOVE_AFTER,
  // so that short-lived connections never pay for a negotiation.
  std::atomic<uint32_t> calls{0};
  // The calls it takes (0: RXIO_SHIM_MOVE_AFTER): more after each link that failed
  // under it (docs/shim.md, "Moving again").
  std::atomic<uint32_t> move_at{0};
  uint8_t failed_links = 0;
  // A move was attempted or ruled out: no more, unless a failed link sent it back
  // (Shim::after_return).
  std::atomic<bool> tried{false};
  std::vector<int> fds;  // the fds (dup) naming it: none once the program closed it
  transport::Connection* connection = nullptr;
  StatRecord* record = nullptr;
  Tuple tuple;               // client and server ends (tcp, moving, rxio)
  bool server = false;       // accepted here
  bool read_shut = false;    // shutdown(SHUT_RD) here
  bool write_shut = false;   // shutdown(SHUT_WR) here
  // TCP bytes taken from the kernel during a switch, before the program read them:
  // they come first, whatever the mode. `ahead_left` lets the fast path see them.
  std::vector<std::byte> ahead;
  std::size_t ahead_read = 0;
  std::atomic<std::size_t> ahead_left{0};
  std::vector<int> epolls;   // epoll fds that watch it
  int holds = 0;             // threads waiting on it without the mutex
  bool gone = false;         // forgotten while held: the last holder frees it
  bool closed = false;       // ... because the program closed it (not a fall-back)
  uint16_t port = 0;  // listening: the port it answers negotiations for
  // Moved: the stream's bytes over rxio, so that it can go back to TCP from an exact
  // byte both sides agree on.
  uint64_t rxio_read = 0;     // what the program read (or the read-ahead took)
  uint64_t rxio_written = 0;
  KeptBytes kept;
  Returning back;       // mode returning
  bool broken = false;  // the peer's Resume made no sense: calls fail with ECONNRESET
  // Inherited by a forked child while its parent was moving it or sending it back.
  bool inherited = false;
  // Moved, and a forked child holds it too (marked in the parent at fork): closing it
  // hands it over to TCP rather than ending the stream.
  bool shared = false;
  // The fd the wait set watches for a Resume from the peer while moved (-1: none).
  int resume_fd = -1;
  // Closed by the program while moved, and kept (Shim::lingering) until its connection
  // ends: not recycled meanwhile.
  bool lingering = false;
  std::chrono::steady_clock::time_point linger_until{};
  // In Shim::moved_sockets (from its switch on until it is recycled).
  Socket* moved_prev = nullptr;
  Socket* moved_next = nullptr;
  bool listed = false;

  bool has_ahead() const noexcept { return ahead_left.load(std::memory_order_relaxed) > 0; }
  // Whose readiness the shim tells, not the kernel: carried by rxio, or on its way back
  // here until the peer's part is in (the kernel's bytes may be the peer's Resume, or
  // bytes the program has read). A return the parent had under way at a fork is the
  // parent's to carry.
  bool kernel_blind() const noexcept {
    const Mode m = mode.load(std::memory_order_relaxed);
    return m == Mode::rxio || (m == Mode::returning && !inherited && !back.in_done);
  }
  // Back to a fresh socket, for the next fd: Socket objects are reused, never freed,
  // so that the fast path may read one it found in the table without the mutex.
  void reset() noexcept;
};

// Which process accepted which connection of a listener that processes share after
// fork (pre-forked workers): a table in shared memory, made with the listener's
// negotiation endpoint and inherited by every child. Whichever process a client's
// request reaches sends it on to the one that holds the connection.
class Acceptors {
 public:
  Acceptors() = default;
  ~Acceptors();
  Acceptors(const Acceptors&) = delete;
  Acceptors& operator=(const Acceptors&) = delete;

  // The process that accepted a connection, and the rdma_cm port it answers remote
  // clients at (0: none).
  struct Owner {
    uint32_t pid = 0;  // 0: none recorded
    uint16_t cm_port = 0;
  };

  bool map() noexcept;  // false without memory: the listener is served as one process's
  void record(const Tuple& tuple, Owner owner) noexcept;
  void erase(const Tuple& tuple, uint32_t pid) noexcept;
  Owner owner(const Tuple& tuple) const noexcept;

 private:
  struct Slot {
    std::atomic<uint64_t> key;
    std::atomic<uint32_t> pid;  // 0 free; kClaimed while written
    std::atomic<uint16_t> cm_port;
  };
  static constexpr std::size_t kSlots = 8192;
  static constexpr std::size_t kProbes = 64;
  static constexpr uint32_t kClaimed = ~0u;
  Slot* slots_ = nullptr;
};

// An epoll fd of the program that watches at least one socket the shim owns.
struct EpollSet {
  struct Interest {
    uint32_t events = 0;
    epoll_data_t data{};
    bool in_kernel = true;         // the kernel watches it (on TCP; back there once the peer's part is in)
    bool disarmed = false;         // EPOLLONESHOT fired
    uint64_t reported_at = ~0ull;  // edge-triggered: stream_events() when last reported
    uint32_t reported = 0;         // edge-triggered: the events then
  };
  std::unordered_map<int, Interest> interests;  // the shim's sockets in this set
  bool has_wait_set = false;  // the shim's wait fd is in the kernel set
  // Readable while sockets of the set are ready, for an epoll set that watches this one
  // (the kernel cannot see their readiness).
  UniqueFd pending;
};

// A client asking the server side to move a connection: a local one on its own unix
// socket, or a remote one through an rdma_cm connect request (answered by a reject
// that carries the answer).
struct Peer {
  UniqueFd fd;
  std::optional<verbs::cm::Id> cm_id;
  // A checked request for a connection this process has not accepted yet: answered
  // once it has (another process may own the listener's backlog), refused at `until`.
  std::optional<Tuple> parked;
  std::chrono::steady_clock::time_point until{};
};

// A connection a peer's engine opened, whose cookie has not arrived in full.
struct Unmatched {
  transport::Connection* connection;
  std::array<std::byte, 8> cookie;
  std::size_t have;
};

// A request this side accepted: the transport connection its cookie names, once it
// came, then the client's word on it (Confirm or Abort), due before `until`.
struct Committed {
  uint64_t cookie = 0;
  transport::Connection* connection = nullptr;
  int fd = -1;  // the program's socket; -1 once it closed it
  std::chrono::steady_clock::time_point until{};
  std::array<std::byte, negotiation::kNoticeSize> word{};
  std::size_t have = 0;
  bool switched = false;
};

// How a move this side accepted ended, kept for a while for its client's Query (its
// link may have failed before the server's word reached it).
struct SwitchOutcome {
  Tuple tuple;
  bool switched = false;
  uint64_t sent = 0;  // switched: the TCP bytes it had sent, as its Switched said
};

class Shim {
 public:
  static Shim& get();  // made on first use; lives until the process ends
  // Null until a program's first TCP socket (or its first call into the shim, when it
  // was executed with sockets' read-ahead to take in): until then every call goes
  // straight through.
  static Shim* current() noexcept {
    if (read_ahead_inherited_.load(std::memory_order_acquire) && !t_inside) [[unlikely]]
      return take_inherited_read_ahead();
    return current_.load(std::memory_order_acquire);
  }

  ShimMutex mutex{*this};
  // fd -> socket; a plain load for fds the shim never saw.
  static constexpr int kMaxFds = 1 << 16;
  std::atomic<Socket*> sockets[kMaxFds] = {};
  std::atomic<EpollSet*> epolls[kMaxFds] = {};
  std::vector<int> epoll_fds;  // those set above

  Policy policy;
  std::optional<StatBoard> board;
  std::chrono::milliseconds negotiate_timeout{1000};
  uint32_t move_after = 8;  // RXIO_SHIM_MOVE_AFTER
  uint32_t move_again = 3;  // RXIO_SHIM_MOVE_AGAIN
  bool verbs_forced = false;  // RXIO_BACKEND=verbs: moves as across hosts (rdma_cm)
  // In a child of fork(): the parent's engine, links and moved connections are its own
  // (their memory is shared), so the child never touches them; it starts an engine of
  // its own for its own connections.
  bool forked_child = false;
  pid_t board_owner = 0;  // the process that made the board, which removes it at exit
  // The process this state is for: a vfork() child runs in its parent's memory, and
  // leaves it alone.
  pid_t state_pid = 0;
  std::chrono::microseconds poll_time{0};

  // Everything a shim wait sleeps on besides the program's own fds: the engine, the
  // negotiation endpoints and peers.
  UniqueFd wait_set;
  // The threads asleep in the shim, by their own eventfd. One shared eventfd would not
  // do: the first thread to wake drains it, and poll() puts the others back to sleep.
  std::vector<int> sleeping;
  static int my_waker() noexcept;  // this thread's eventfd, made on first use

  // The engine; made when a socket first needs it. Without one, everything is TCP.
  transport::Engine* engine() noexcept;
  // The engine if one runs: what waits and services look at, without starting one.
  transport::Engine* running_engine() const noexcept { return engine_; }

  // Negotiation endpoints by port, shared by this process's listeners on that port
  // (a dual-stack server listens on 0.0.0.0 and :: with one port).
  struct Listening {
    UniqueFd fd;
    Endpoint address;  // the listener's
    // Remote clients may move, where RDMA is: they ask at an rdma_cm id on the
    // listener's port, which only the process that made it can serve (the kernel
    // refuses a forked child's calls on its parent's rdma_cm ids).
    bool remote = false;
    std::optional<verbs::cm::Id> cm_listener;
    int listeners = 0;
    // Shared with other processes by fork: the table of who accepted what, and this
    // process's own endpoint, which requests for its connections are sent on to (for
    // remote clients, an rdma_cm id on the listener's address and a port of its own).
    std::shared_ptr<Acceptors> acceptors;
    bool shared = false;
    bool serving = true;  // fd is in this process's wait set (a child: once it accepts)
    UniqueFd own;
    std::optional<verbs::cm::Id> own_cm;
  };
  // The rdma_cm events of this process's ids above; made with the first.
  std::optional<verbs::cm::EventChannel> cm_events;
  // A process whose listeners a child may accept on answers their remote clients from
  // a thread of its own, since it may sleep outside the shim (nginx's master).
  bool cm_thread_started = false;
  void start_cm_thread() noexcept;
  std::atomic<bool> exiting{false};  // at_exit() ran: the thread stops
  std::unordered_map<uint16_t, Listening> endpoints;
  std::vector<Peer> peers;
  std::unordered_map<Tuple, Committed, TupleHash> committed;
  std::unordered_map<Tuple, int, TupleHash> accepted;  // accepted sockets still on TCP
  std::vector<Unmatched> unmatched;
  std::vector<Socket*> spare_sockets;
  // Every socket that began a switch to rxio, until it is recycled: what fork, exec,
  // exit and failed links look at, rather than the whole fd table.
  Socket* moved_sockets = nullptr;
  void list_moved(Socket& s) noexcept;
  // Sockets going back to TCP whose kept bytes wait for room in the kernel: the wait
  // set wakes a sleeper to write them even when the program does not call.
  std::vector<std::pair<int, Socket*>> returning;
  // Moved sockets the program closed, with a private descriptor of each one's TCP
  // socket: kept until their connection ends (back.cc).
  std::vector<std::pair<int, Socket*>> lingering;
  // Connections whose socket was closed: drained until the peer closes too.
  std::vector<transport::Connection*> closing;
  // Servers that have no shim: (address, port) -> until when to believe it.
  std::unordered_map<std::string, std::chrono::steady_clock::time_point> no_shim;

  Socket* socket_of(int fd) const noexcept {
    return fd >= 0 && fd < kMaxFds ? sockets[fd].load(std::memory_order_acquire) : nullptr;
  }
  EpollSet* epoll_of(int fd) const noexcept {
    return fd >= 0 && fd < kMaxFds ? epolls[fd].load(std::memory_order_acquire) : nullptr;
  }

  // Control path (control.cc); called with the mutex held.
  void track(int fd);
  // Has `fd` name `s` too (accept, dup); false without memory.
  bool name(int fd, Socket& s) noexcept;
  void forget(int fd) noexcept;       // the fd is closing, or stays plain TCP
  void release(Socket* s) noexcept;   // drops a hold
  Socket* new_socket() noexcept;      // from the spares, or made; null without memory
  void recycle(Socket* s) noexcept;
  void fall_back(int fd, Fallback reason) noexcept;
  void become_rxio(int fd, Socket& s, transport::Connection& c) noexcept;
  // A client's switch is through: bytes its read-ahead took past the `server_sent` the
  // server's Switched names are a Resume the server wrote right after it switched
  // (back.cc), and start the return.
  void after_switch(int fd, Socket& s, uint64_t server_sent) noexcept;
  // Back to TCP (back.cc): starts on a socket whose connection failed, and goes on
  // (writes this side's Resume and kept bytes, reads the peer's) as far as the TCP
  // socket lets it without waiting.
  void start_return(int fd, Socket& s, Return reason) noexcept;
  // A moved socket that another process goes on with (a forked child, the program this
  // one executes): writes its hand-over, with the connection left to the peer to end.
  void start_hand_over(int fd, Socket& s, Return reason) noexcept;
  // Reads a Resume the peer wrote into a moved socket's TCP connection (it went back,
  // or handed its socket over) and goes back too. True once it has.
  bool notice_resume(int fd, Socket& s) noexcept;
  void watch_resume(Socket& s, int fd) noexcept;
  void unwatch_resume(Socket& s) noexcept;
  // Before exec: every moved socket the new image inherits goes back to TCP, with the
  // peer's answer read, so that the new image finds a plain TCP stream; what the program
  // had not read of it goes along in `env`.
  void before_exec(ExecEnvironment& env) noexcept;
  // fork(): in the parent, marks the moved sockets the child holds too; in the child,
  // makes them wait for the peer's answer to the parent's hand-over.
  void after_fork_in_parent() noexcept;
  void after_fork_in_child() noexcept;
  // Whether this process has children (running, or exited and not waited for): any of
  // them may hold a socket it shared at fork.
  static bool has_children() noexcept;
  // At exit: each moved connection ends as the kernel ends the TCP socket, with a
  // close the peer reads after every byte (or a hand-over, where a child holds it on),
  // rather than as a link that failed.
  void at_exit() noexcept;
  void go_on_returning(int fd, Socket& s) noexcept;
  // Back on TCP, the peer's part of the return in: the program's epoll sets watch the
  // socket in the kernel again (a one-shot that fired meanwhile once the program
  // re-arms it).
  void give_interests_to_kernel(Socket& s) noexcept;
  // A return is through: the socket stays on TCP, or may move again (a link failed
  // under it, and the same two processes go on).
  void after_return(Socket& s) noexcept;
  // Answers the requests parked for `tuple` (false from answer(): done with them).
  // Not while the peers are walked (here, or in serve_peers()): answer() may carry a
  // return on, which ends here, and the walk reaches the peers after the current one
  // itself (those before it at the next walk).
  void answer_parked(const Tuple& tuple) noexcept;
  bool walking_peers = false;
  // Serves every peer (a request to read, a parked one to answer); true if one is done with.
  bool serve_peers() noexcept;
  // Remote clients' rdma_cm requests, then every peer: the program's calls and the
  // rdma_cm thread (pre-forked workers) both serve negotiations so.
  bool serve_negotiations() noexcept {
    serve_cm_events();
    return serve_peers();
  }
  // Carries these returns on, waiting for the TCP sockets, until each is through (its
  // Resume and kept bytes out, the peer's answer in) or `until` passes.
  void carry_returns(std::span<const std::pair<int, Socket*>> returns,
                     std::chrono::steady_clock::time_point until) noexcept;
  // Has the wait set watch a return for `events` (none: not at all).
  void watch_return(int fd, Socket& s, uint32_t events) noexcept;
  // Carries on every return whose kept bytes wait for room (from service()).
  void serve_returning() noexcept;
  void unwatch_return(int fd) noexcept;
  void unwatch_return(Socket& s) noexcept;  // on whichever fd it is watched
  // An fd of the program's that names `s` (-1: none; a closed fd can stay in `fds`
  // when the program closed it behind the shim's back).
  int fd_of(const Socket& s) const noexcept;
  // Whether a connection back on TCP for a failed link may move again (after_return).
  bool may_move_again(const Socket& s) const noexcept;
  // Moved sockets the program closed, until their connection ends (back.cc).
  void serve_lingering() noexcept;
  // The moved sockets whose TCP connection the wait set reports readable: a Resume.
  void serve_resumes() noexcept;
  int resume_watches = 0;  // sockets with a resume_fd in the wait set
  std::chrono::steady_clock::time_point next_resume_look{};
  // A client's connection that is due to move: negotiates and switches, or leaves it
  // on TCP with the reason counted.
  void move_as_client(int fd, Socket& s, std::unique_lock<ShimMutex>& lock) noexcept;
  // One ask of a local server's shim, at the negotiation endpoint of `port` (process
  // `target`'s own, if not 0), on `unix_fd`, connected first when it is not: sends
  // `message` with the TCP socket `fd` (the server reads the connection's ends from it)
  // and waits for the reply without the mutex until `deadline`. `s` is held
  // (Socket::holds) by the caller.
  struct UnixReply {
    enum class Outcome : uint8_t {
      replied,     // `length` bytes in the reply buffer
      ended,       // the server's side closed without a reply
      no_socket,   // no unix socket to be had
      backlog,     // the endpoint's backlog is full
      no_endpoint, // nothing listens there (the process named went)
      ours,        // this process's own endpoint, which cannot answer while it waits
      unsent,      // the message did not go
      too_long,    // a reply longer than any message
      timeout,
      failed,      // the connection failed
      gone,        // the program closed the socket meanwhile
    } outcome;
    std::size_t length = 0;
  };
  UnixReply ask_over_unix(UniqueFd& unix_fd, uint16_t port, uint32_t target, std::span<const std::byte> message, int fd,
                          Socket& s, std::span<std::byte> reply, std::chrono::steady_clock::time_point deadline,
                          std::unique_lock<ShimMutex>& lock) noexcept;
  // The server's word on a switch (Switched or Abort), asked for with a Query where the
  // engine connection failed before it came; nullopt when the server cannot say. `s`
  // is held (Socket::holds) by the caller: a local Query waits without the mutex (an
  // rdma_cm one with it, as a remote request does).
  std::optional<negotiation::Notice> ask_where_the_switch_stands(int fd, Socket& s, const negotiation::Request& query,
                                                                 bool remote, const Endpoint& asked_at,
                                                                 uint32_t target,
                                                                 std::unique_lock<ShimMutex>& lock) noexcept;
  void finish_connect(int fd, Socket& s) noexcept;
  void start_listening(int fd, Socket& s) noexcept;
  void adopt_accepted(int fd) noexcept;
  // Handles what the wait set reported: engine events, negotiations. Returns whether
  // anything changed. `woken`: the wait set itself was reported readable (not only the
  // engine's arm() saying work came in), so the peers' Resumes are looked for too.
  bool service(bool woken = true) noexcept;
  // A write came up short: edge-triggered watchers must see POLLOUT come back.
  void out_of_credit(int fd, Socket& s) noexcept;
  void add_to_wait_set(int fd) noexcept;
  void remove_from_wait_set(int fd) noexcept;
  // Puts the wait set into one of the program's epoll sets.
  void watch_wait_set(int epfd, EpollSet& set) noexcept;
  bool is_wait_set_event(const epoll_event& event) const noexcept;

  // Sleeps on `fds` plus the wait set and this thread's waker (so `fds` needs two
  // spare entries after `count`), without the mutex. Returns as real poll() does,
  // counting only the program's fds.
  int sleep(std::unique_lock<ShimMutex>& lock, struct pollfd* fds, unsigned long count, int timeout_ms,
            const sigset_t* mask) noexcept;
  // After a sleep ended with EINTR: whether a socket call without a timeout goes on, as
  // the kernel restarts it for a handler with SA_RESTART. Which signal came is not
  // known, so only when no handler of the process goes without SA_RESTART.
  static bool signals_restart() noexcept;
  // Progresses the engine, waking other sleeping threads when something came in; the
  // moved sockets of a link that failed start back to TCP.
  int progress() noexcept;
  // With the mutex held, before letting go: see ShimMutex.
  void hand_over() noexcept;
  // Wakes threads sleeping in the shim after this one changed what they wait for.
  void wake_sleepers() noexcept;

 private:
  Shim();
  static std::atomic<Shim*> current_;
  // Set at load when RXIO_SHIM_AHEAD names memfds; cleared once they are taken in.
  static std::atomic<bool> read_ahead_inherited_;
  static Shim* take_inherited_read_ahead() noexcept;
  friend void note_inherited_read_ahead() noexcept;
  void open_board() noexcept;
  transport::Engine* engine_ = nullptr;
  uint64_t handed_over_at_ = 0;  // Engine::handled() when sleepers were last woken
  bool engine_failed = false;
  uint64_t link_failures_seen_ = 0;  // Engine::link_failures() when last looked at
  // Moved sockets whose connection failed start back to TCP.
  void notice_failures() noexcept;
  std::chrono::steady_clock::time_point engine_retry_at{};
  void serve_endpoint(int fd) noexcept;
  // This process's own endpoint for a shared listener, and the shared one served here
  // too (a child that accepts on it). False without them.
  bool serve_shared(uint16_t port, Listening& endpoint) noexcept;
  void serve_cm_events() noexcept;
  void offer_remote_moves(Listening& endpoint) noexcept;
  // An rdma_cm id listening on `address` (port 0: one the kernel picks), on cm_events,
  // for remote clients of the listener on `for_port`.
  std::optional<verbs::cm::Id> cm_listen(const Endpoint& address, uint16_t for_port) noexcept;
  bool serve_peer(Peer& peer) noexcept;
  // Checks a decoded request and answers or parks it; false when the peer is done with.
  bool take_request(Peer& peer, const negotiation::Request& request) noexcept;
  // Answers a parked request once its connection is accepted here; false when the
  // peer is done with (answered, or refused in the end).
  bool answer(Peer& peer) noexcept;
  // Where the switch a Query names stands (a switch not made by now never is); false.
  bool answer_query(Peer& peer, const negotiation::Request& query) noexcept;
  std::unordered_map<uint64_t, SwitchOutcome> switch_outcomes;  // by cookie
  std::deque<std::pair<std::chrono::steady_clock::time_point, uint64_t>> outcome_order;  // expiry, cookie
  void record_outcome(uint64_t cookie, SwitchOutcome outcome) noexcept;
  // answer() for a connection not accepted here (yet): another process of a shared
  // listener may own it, or it is still in the kernel's queue.
  bool answer_unheld(Peer& peer, const Tuple& tuple) noexcept;
  // The owner of `tuple`, for a listener processes share after fork, when that is not
  // this process (pid 0: none recorded); nullopt for a listener of this process's own.
  std::optional<Acceptors::Owner> other_owner(const Tuple& tuple) noexcept;
  // Counts and sends a refusal; false (the peer is done with).
  bool refuse(Peer& peer, negotiation::Refusal why, Fallback counted) noexcept;
  void match_cookies() noexcept;
  // Reads the clients' words on their engine connections and switches the confirmed.
  void serve_committed() noexcept;
  // Both of the above, while moves are under way: whoever took in the engine's
  // arrivals (any progress call, arm()) may have taken a cookie or a word.
  void serve_moves() noexcept;
  // The server's half of the switch, once the client confirmed.
  void switch_as_server(const Tuple& tuple, Committed& entry) noexcept;
  void drop_committed(const Tuple& tuple) noexcept;
};

// The calls after which a client's TCP connection moves: RXIO_SHIM_MOVE_AFTER, more
// after each link that failed under it.
inline uint32_t move_threshold(const Shim& sh, const Socket& s) noexcept {
  const uint32_t at = s.move_at.load(std::memory_order_relaxed);
  return at ? at : sh.move_after;
}

// The kernel's counts for a TCP connection (tcp_info): bytes this side sent that the
// peer acknowledged (a client's count has its SYN too), and bytes it received. False
// where the kernel does not say.
bool tcp_counts(int fd, uint64_t& acked, uint64_t& received) noexcept;

// Due to move: a client's TCP connection whose calls reached the threshold.
inline bool due_to_move(const Shim& sh, Socket& s) noexcept {
  if (s.server || s.tried.load(std::memory_order_relaxed)) return false;
  return s.calls.fetch_add(1, std::memory_order_relaxed) + 1 >= move_threshold(sh, s);
}

// Readiness of a socket in rxio mode, as poll() events (POLLIN, POLLOUT, POLLHUP,
// POLLRDHUP, POLLERR).
short readiness(const Socket& s) noexcept;

}  // namespace rxio::shim
