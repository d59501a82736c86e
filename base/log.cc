#include "base/log.h"

#include <unistd.h>

#include <string>

namespace rxio::log {

void warn(std::string_view message) noexcept {
  try {
    std::string line = "rxio: warning: ";
    line += message;
    line += '\n';
    // One write() so that lines from several threads do not interleave.
    [[maybe_unused]] ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
  } catch (...) {
    // Out of memory while reporting: nothing better to do than stay silent.
  }
}

}  // namespace rxio::log
