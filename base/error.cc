#include "base/error.h"

#include <sys/resource.h>

#include <cerrno>
#include <string>

namespace rxio {
namespace {

std::string compose(std::string_view operation, std::string_view where,
                    std::string_view fix) {
  std::string text(operation);
  if (!where.empty()) {
    text += " on ";
    text += where;
  }
  if (!fix.empty()) {
    text += " (";
    text += fix;
    text += ")";
  }
  return text;
}

}  // namespace

Error::Error(int errno_value, std::string_view operation, std::string_view where,
             std::string_view fix)
    : std::system_error(errno_value, std::generic_category(),
                        compose(operation, where, fix)),
      operation_(operation),
      where_(where),
      fix_(fix) {}

std::string format_bytes(unsigned long long bytes) {
  constexpr unsigned long long kKiB = 1024, kMiB = kKiB * 1024, kGiB = kMiB * 1024;
  if (bytes != 0 && bytes % kGiB == 0) return std::to_string(bytes / kGiB) + " GiB";
  if (bytes != 0 && bytes % kMiB == 0) return std::to_string(bytes / kMiB) + " MiB";
  if (bytes != 0 && bytes % kKiB == 0) return std::to_string(bytes / kKiB) + " KiB";
  return std::to_string(bytes) + " bytes";
}

std::string memlock_fix_for_limit(int errno_value, std::size_t bytes,
                                  unsigned long long soft_limit) {
  // The kernel reports an exceeded RLIMIT_MEMLOCK as ENOMEM (and EPERM on some
  // drivers); other errors have other causes.
  if (errno_value != ENOMEM && errno_value != EPERM) return {};
  if (soft_limit == RLIM_INFINITY) return {};
  std::string fix = "the locked-memory limit is " + format_bytes(soft_limit);
  if (bytes != 0) fix += " and " + format_bytes(bytes) + " were to be pinned";
  fix +=
      "; raise it with `ulimit -l unlimited` in the launching shell, a `memlock` line "
      "in /etc/security/limits.conf, or LimitMEMLOCK=infinity for a systemd service";
  return fix;
}

std::string memlock_fix(int errno_value, std::size_t bytes) {
  rlimit limit{};
  if (getrlimit(RLIMIT_MEMLOCK, &limit) != 0) return {};
  return memlock_fix_for_limit(errno_value, bytes, limit.rlim_cur);
}

}  // namespace rxio
