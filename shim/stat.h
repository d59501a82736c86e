// The statistics board: each process under the shim publishes its connections and
// counters in a small shared-memory file, <RXIO_STAT_DIR>/rxio-stat.<pid>, which
// rxio-stat lists (as SMC's smcss and libvma's vma_stats do). The owner updates it with
// relaxed atomics, never a lock; readers see it racily, which is fine for a listing.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace rxio::shim {

// Why a TCP connection stayed on TCP.
enum class Fallback : uint8_t {
  policy,         // a rule said no
  no_peer_shim,   // nothing answered at the negotiation endpoint: the peer runs without the shim
  peer_refused,   // the peer's shim declined (its policy, its limits)
  bad_message,    // a negotiation message was malformed or truncated
  impostor,       // a local process failed the ownership proof of the TCP connection
  timeout,        // the peer's shim did not answer in time
  no_backend,     // the engine could not start here (no device, RXIO_BACKEND, memlock)
  link_failed,    // the link or connection to the peer's engine could not be set up
  busy,           // the socket could not pause for the switch (a call blocked in the kernel, bytes that did not drain)
  not_supported,  // something this version does not move (a listener on a port another process negotiates for)
  count_
};
constexpr std::size_t kFallbacks = std::size_t(Fallback::count_);

// Why a moved connection went back to its TCP connection (docs/shim.md, "Back to TCP").
enum class Return : uint8_t {
  link_failed,  // this side's link or connection failed
  peer,         // the peer went back (its link failed, or it handed its socket over)
  fork,         // closed here while a forked child still holds it: the child goes on
  exec,         // handed to the program this process executes
  count_
};
constexpr std::size_t kReturns = std::size_t(Return::count_);

// What carries a connection; tcp is plain kernel TCP.
enum class Backend : uint8_t { tcp, shm, verbs, count_ };
constexpr std::size_t kBackends = std::size_t(Backend::count_);

enum class ConnState : uint8_t { negotiating, established, closing, closed };

// Names for printing (and rxio-stat's JSON keys); "?" for a value out of range.
const char* to_string(Fallback reason) noexcept;
const char* to_string(Return reason) noexcept;
const char* to_string(Backend backend) noexcept;
const char* to_string(ConnState state) noexcept;

// One connection's public record. The owning process writes it; rxio-stat reads it.
struct StatRecord {
  // 0 free, 1 in use, 2 being filled in by the thread that claimed it (readers skip it).
  std::atomic<uint32_t> in_use;
  int32_t fd;
  uint8_t backend;  // Backend
  uint8_t state;    // ConnState
  uint8_t family;   // AF_INET or AF_INET6
  uint8_t role;     // 0 client, 1 server
  uint8_t local[16];  // network order: 4 bytes for AF_INET
  uint8_t peer[16];
  uint16_t local_port;  // host order
  uint16_t peer_port;
  std::atomic<uint64_t> bytes_sent;
  std::atomic<uint64_t> bytes_received;
};
constexpr uint32_t kRecordFree = 0, kRecordInUse = 1, kRecordFilling = 2;

constexpr uint64_t kStatMagic = 0x5441'5453'4f49'5852;  // "RXIOSTAT" in a little-endian file
// Raised whenever the layout below changes: rxio-stat refuses other versions.
constexpr uint32_t kStatVersion = 3;
// 64 bytes each: 256 KiB of address space, of which a tmpfs file uses only the pages
// that records have touched.
constexpr uint32_t kStatRecords = 4096;

struct alignas(64) StatHeader {
  std::atomic<uint64_t> magic;  // kStatMagic, stored last: a board being created has 0
  uint32_t version;
  uint32_t record_size;
  uint32_t record_count;
  int32_t pid;
  uint64_t start_time;  // the owner's start time (/proc/PID/stat), to notice a reused pid; 0 unknown
  char command[64];     // NUL-terminated
  std::atomic<uint64_t> fallbacks[kFallbacks];
  std::atomic<uint64_t> moved[kBackends];
  std::atomic<uint64_t> returned[kReturns];  // moved connections back on TCP, by reason
  std::atomic<uint64_t> unlisted;  // connections that found every record in use
};

struct StatFile {
  StatHeader header;
  StatRecord records[kStatRecords];
};

// "<dir>/rxio-stat.<pid>".
std::string board_path(std::string_view dir, pid_t pid);
// Clock ticks from boot to the process's start, or 0 when /proc cannot say.
uint64_t process_start_time(pid_t pid) noexcept;

// This process's board. One per process: a second one would take over the first's file.
class StatBoard {
 public:
  // Creates and maps <RXIO_STAT_DIR>/rxio-stat.<pid>, replacing a stale file of a dead
  // process that had the same pid. Throws rxio::Error on failure; the shim then runs
  // without a board.
  explicit StatBoard(std::string_view command_name);
  // Unmaps and removes the file (never throws). A forked child that inherited the board
  // leaves the file to the process that created it.
  ~StatBoard();
  StatBoard(StatBoard&& other) noexcept;
  StatBoard& operator=(StatBoard&& other) noexcept;
  StatBoard(const StatBoard&) = delete;
  StatBoard& operator=(const StatBoard&) = delete;

  // Claims a record for connection `fd` (addresses: sockaddr_in or sockaddr_in6, either
  // may be null when unknown). Safe from several threads at once, without locks. Returns
  // nullptr when every record is in use (counted as unlisted).
  StatRecord* open(int fd, const sockaddr* local, const sockaddr* peer, Backend backend, ConnState state,
                   bool server) noexcept;
  // Frees the record; nullptr (a connection open() could not list) is ignored.
  void close(StatRecord* record) noexcept;
  // One more connection that stayed on TCP for `reason`.
  void count(Fallback reason) noexcept;
  // One more connection moved onto `backend`.
  void count_moved(Backend backend) noexcept;
  // One more moved connection back on TCP for `reason`.
  void count_returned(Return reason) noexcept;

  const std::string& path() const noexcept { return path_; }

 private:
  void release() noexcept;

  StatFile* file_ = nullptr;
  std::string path_;
  pid_t owner_ = 0;
  dev_t device_ = 0;  // the file's identity, so that only this board's file is removed
  ino_t inode_ = 0;
};

// Someone else's board, mapped read-only: what rxio-stat lists.
class StatBoardView {
 public:
  // Throws rxio::Error when the file cannot be read or is not a board of this version
  // (EPROTO; EAGAIN for one still being created).
  explicit StatBoardView(const std::string& path);
  ~StatBoardView();
  StatBoardView(StatBoardView&& other) noexcept;
  StatBoardView& operator=(StatBoardView&&) = delete;
  StatBoardView(const StatBoardView&) = delete;
  StatBoardView& operator=(const StatBoardView&) = delete;

  const StatHeader& header() const noexcept { return file_->header; }
  std::span<const StatRecord> records() const noexcept { return file_->records; }
  // The command name as printable ASCII ('?' for anything else): another user's process
  // chooses it, and it must not put escape sequences on a terminal or break JSON.
  std::string command() const;
  // Whether the process that created the board still runs (and its pid is not reused).
  bool owner_alive() const noexcept;
  // Whether the file belongs to this process's user (and so may be removed when stale).
  bool ours() const noexcept;

 private:
  const StatFile* file_ = nullptr;
  uid_t owner_uid_ = 0;
};

}  // namespace rxio::shim
