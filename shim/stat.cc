#include "shim/stat.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <new>
#include <type_traits>
#include <utility>

#include "base/config.h"
#include "base/error.h"
#include "base/fd.h"

namespace rxio::shim {

// The file is read by other processes: its layout must not depend on the compiler's
// whims, and its atomics must be plain memory operations.
static_assert(sizeof(StatRecord) == 64);
static_assert(std::is_standard_layout_v<StatRecord> && std::is_standard_layout_v<StatHeader>);
static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free);

namespace {

constexpr const char* kFallbackNames[] = {"policy",      "no_peer_shim", "peer_refused", "bad_message",
                                          "impostor",    "timeout",      "no_backend",   "link_failed",
                                          "busy", "not_supported"};
static_assert(std::size(kFallbackNames) == kFallbacks);
constexpr const char* kReturnNames[] = {"link_failed", "peer", "fork", "exec"};
static_assert(std::size(kReturnNames) == kReturns);
constexpr const char* kBackendNames[] = {"tcp", "shm", "verbs"};
static_assert(std::size(kBackendNames) == kBackends);
constexpr const char* kStateNames[] = {"negotiating", "established", "closing", "closed"};

// The address and port of a sockaddr_in or sockaddr_in6 into a record's fields.
void put_address(const sockaddr* address, uint8_t (&bytes)[16], uint16_t& port) noexcept {
  std::memset(bytes, 0, sizeof bytes);
  port = 0;
  if (!address) return;
  if (address->sa_family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(address);
    std::memcpy(bytes, &v4->sin_addr, sizeof v4->sin_addr);
    port = ntohs(v4->sin_port);
  } else if (address->sa_family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(address);
    std::memcpy(bytes, &v6->sin6_addr, sizeof v6->sin6_addr);
    port = ntohs(v6->sin6_port);
  }
}

}  // namespace

const char* to_string(Fallback reason) noexcept {
  return std::size_t(reason) < kFallbacks ? kFallbackNames[std::size_t(reason)] : "?";
}
const char* to_string(Return reason) noexcept {
  return std::size_t(reason) < kReturns ? kReturnNames[std::size_t(reason)] : "?";
}
const char* to_string(Backend backend) noexcept {
  return std::size_t(backend) < kBackends ? kBackendNames[std::size_t(backend)] : "?";
}
const char* to_string(ConnState state) noexcept {
  return std::size_t(state) < std::size(kStateNames) ? kStateNames[std::size_t(state)] : "?";
}

std::string board_path(std::string_view dir, pid_t pid) {
  return std::string(dir) + "/rxio-stat." + std::to_string(pid);
}

uint64_t process_start_time(pid_t pid) noexcept {
  char path[32];
  std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
  UniqueFd fd(::open(path, O_RDONLY | O_CLOEXEC));
  if (!fd) return 0;
  char text[1024];
  const ssize_t n = ::read(fd.get(), text, sizeof text);
  if (n <= 0) return 0;
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so fields are
  // counted from the last ')'. The start time is field 22, the 20th after it.
  const std::string_view line(text, std::size_t(n));
  const std::size_t comm_end = line.rfind(')');
  if (comm_end == std::string_view::npos) return 0;
  std::size_t at = comm_end + 1;
  for (int field = 0; field < 20; ++field) {
    at = line.find(' ', at);
    if (at == std::string_view::npos) return 0;
    ++at;
  }
  uint64_t start = 0;
  std::from_chars(line.data() + at, line.data() + line.size(), start);
  return start;
}

// ---- the owner's side ------------------------------------------------------------------

StatBoard::StatBoard(std::string_view command_name) : owner_(getpid()) {
  path_ = board_path(config::get_text("RXIO_STAT_DIR"), owner_);
  const std::string fix = "point RXIO_STAT_DIR at a directory this user can write (tmpfs, such as /dev/shm)";
  // O_EXCL and O_NOFOLLOW: the directory is shared with other users, who must not be
  // able to plant a link or a file for this process to write through.
  auto create = [this] {
    return UniqueFd(::open(path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
  };
  UniqueFd fd = create();
  // A file with this pid is left from a dead process: pids are unique among the living.
  if (!fd && errno == EEXIST && ::unlink(path_.c_str()) == 0) fd = create();
  if (!fd) throw Error(errno, "creating the statistics board", path_, fix);

  // 0644 whatever the umask: the board shows addresses, ports and byte counts, which
  // every user can already see with `ss -ti`, so other users' rxio-stat (an operator's,
  // say) may read it. Only this process writes it.
  struct stat st{};
  void* mapping = MAP_FAILED;
  if (fchmod(fd.get(), 0644) != 0 || ftruncate(fd.get(), sizeof(StatFile)) != 0 || fstat(fd.get(), &st) != 0 ||
      (mapping = mmap(nullptr, sizeof(StatFile), PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0)) == MAP_FAILED) {
    const int error = errno;
    ::unlink(path_.c_str());
    throw Error(error, "setting up the statistics board", path_, fix);
  }
  device_ = st.st_dev;
  inode_ = st.st_ino;

  // The file starts zero-filled, which is every record's initial state (free).
  auto* header = new (mapping) StatHeader{};
  file_ = static_cast<StatFile*>(mapping);
  header->version = kStatVersion;
  header->record_size = sizeof(StatRecord);
  header->record_count = kStatRecords;
  header->pid = owner_;
  header->start_time = process_start_time(owner_);
  const std::size_t length = std::min(command_name.size(), sizeof header->command - 1);
  std::memcpy(header->command, command_name.data(), length);
  header->magic.store(kStatMagic, std::memory_order_release);
}

StatBoard::~StatBoard() { release(); }

StatBoard::StatBoard(StatBoard&& other) noexcept
    : file_(std::exchange(other.file_, nullptr)),
      path_(std::move(other.path_)),
      owner_(other.owner_),
      device_(other.device_),
      inode_(other.inode_) {}

StatBoard& StatBoard::operator=(StatBoard&& other) noexcept {
  if (this != &other) {
    release();
    file_ = std::exchange(other.file_, nullptr);
    path_ = std::move(other.path_);
    owner_ = other.owner_;
    device_ = other.device_;
    inode_ = other.inode_;
  }
  return *this;
}

void StatBoard::release() noexcept {
  if (!file_) return;
  munmap(file_, sizeof(StatFile));
  file_ = nullptr;
  // Only the creator removes the file, and only if it is still the one it created.
  struct stat st{};
  if (getpid() == owner_ && ::stat(path_.c_str(), &st) == 0 && st.st_dev == device_ && st.st_ino == inode_)
    ::unlink(path_.c_str());
}

StatRecord* StatBoard::open(int fd, const sockaddr* local, const sockaddr* peer, Backend backend, ConnState state,
                            bool server) noexcept {
  // Start at the fd's own index: fds are small and unique among a process's open
  // connections, so that record is usually free and the search ends at once.
  const uint32_t start = uint32_t(fd) % kStatRecords;
  for (uint32_t i = 0; i < kStatRecords; ++i) {
    StatRecord& record = file_->records[(start + i) % kStatRecords];
    uint32_t expected = kRecordFree;
    if (record.in_use.load(std::memory_order_relaxed) != kRecordFree ||
        !record.in_use.compare_exchange_strong(expected, kRecordFilling, std::memory_order_acquire,
                                               std::memory_order_relaxed))
      continue;
    record.fd = fd;
    record.backend = uint8_t(backend);
    record.state = uint8_t(state);
    const sockaddr* named = peer ? peer : local;
    record.family = named ? uint8_t(named->sa_family) : uint8_t(AF_UNSPEC);
    record.role = server ? 1 : 0;
    put_address(local, record.local, record.local_port);
    put_address(peer, record.peer, record.peer_port);
    record.bytes_sent.store(0, std::memory_order_relaxed);
    record.bytes_received.store(0, std::memory_order_relaxed);
    record.in_use.store(kRecordInUse, std::memory_order_release);
    return &record;
  }
  file_->header.unlisted.fetch_add(1, std::memory_order_relaxed);
  return nullptr;
}

void StatBoard::close(StatRecord* record) noexcept {
  if (record) record->in_use.store(kRecordFree, std::memory_order_release);
}

void StatBoard::count(Fallback reason) noexcept {
  if (std::size_t(reason) < kFallbacks)
    file_->header.fallbacks[std::size_t(reason)].fetch_add(1, std::memory_order_relaxed);
}

void StatBoard::count_moved(Backend backend) noexcept {
  if (std::size_t(backend) < kBackends) file_->header.moved[std::size_t(backend)].fetch_add(1, std::memory_order_relaxed);
}

void StatBoard::count_returned(Return reason) noexcept {
  if (std::size_t(reason) < kReturns)
    file_->header.returned[std::size_t(reason)].fetch_add(1, std::memory_order_relaxed);
}

// ---- the reader's side -----------------------------------------------------------------

StatBoardView::StatBoardView(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) throw Error(errno, "opening the statistics board", path);
  struct stat st{};
  if (fstat(fd.get(), &st) != 0) throw Error(errno, "reading the statistics board", path);
  const std::string fix = "it is not a board of this rxio version: use the rxio-stat of the rxio that runs the program";
  // Created but not yet sized: its process is still setting it up.
  if (S_ISREG(st.st_mode) && st.st_size == 0) throw Error(EAGAIN, "reading a statistics board being created", path);
  if (!S_ISREG(st.st_mode) || std::size_t(st.st_size) != sizeof(StatFile))
    throw Error(EPROTO, "reading the statistics board", path, fix);
  void* mapping = mmap(nullptr, sizeof(StatFile), PROT_READ, MAP_SHARED, fd.get(), 0);
  if (mapping == MAP_FAILED) throw Error(errno, "mapping the statistics board", path);
  const auto* file = static_cast<const StatFile*>(mapping);
  const uint64_t magic = file->header.magic.load(std::memory_order_acquire);
  if (magic != kStatMagic || file->header.version != kStatVersion || file->header.record_size != sizeof(StatRecord) ||
      file->header.record_count != kStatRecords) {
    munmap(mapping, sizeof(StatFile));
    if (magic == 0) throw Error(EAGAIN, "reading a statistics board being created", path);
    throw Error(EPROTO, "reading the statistics board", path, fix);
  }
  file_ = file;
  owner_uid_ = st.st_uid;
}

StatBoardView::~StatBoardView() {
  if (file_) munmap(const_cast<StatFile*>(file_), sizeof(StatFile));
}

StatBoardView::StatBoardView(StatBoardView&& other) noexcept
    : file_(std::exchange(other.file_, nullptr)), owner_uid_(other.owner_uid_) {}

std::string StatBoardView::command() const {
  const char* name = file_->header.command;
  std::string printable(name, strnlen(name, sizeof file_->header.command));
  for (char& c : printable)
    if (c < 0x20 || c > 0x7e) c = '?';
  return printable;
}

bool StatBoardView::owner_alive() const noexcept {
  const pid_t pid = file_->header.pid;
  if (pid <= 0) return false;
  if (const uint64_t start = process_start_time(pid); start != 0)
    return file_->header.start_time == 0 || start == file_->header.start_time;
  // No /proc to ask: whether the pid exists at all (EPERM: it does, another user's).
  return kill(pid, 0) == 0 || errno == EPERM;
}

bool StatBoardView::ours() const noexcept { return owner_uid_ == geteuid(); }

}  // namespace rxio::shim
