// rxio::Error: the one exception type of rxio's setup paths.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <system_error>

namespace rxio {

// What failed, where (device, peer or file), why (an errno value) and, when the user
// can act on it, how to fix it. what() joins them into one readable line.
class Error : public std::system_error {
 public:
  Error(int errno_value, std::string_view operation, std::string_view where = {},
        std::string_view fix = {});

  const std::string& operation() const noexcept { return operation_; }
  const std::string& where() const noexcept { return where_; }
  const std::string& fix() const noexcept { return fix_; }

 private:
  std::string operation_;
  std::string where_;
  std::string fix_;
};

// The advice to give when pinning `bytes` of memory failed with `errno_value`, given
// the process's locked-memory limit; empty when the limit cannot be the cause.
std::string memlock_fix(int errno_value, std::size_t bytes);

// Same, for a soft limit passed in (RLIM_INFINITY for none); separate so it can be tested.
std::string memlock_fix_for_limit(int errno_value, std::size_t bytes,
                                  unsigned long long soft_limit);

// "64 KiB", "1 MiB", "12345 bytes".
std::string format_bytes(unsigned long long bytes);

}  // namespace rxio
