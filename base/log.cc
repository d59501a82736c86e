#include "base/log.h"

#include <unistd.h>

#include <string>

#include "base/config.h"

namespace rxio::log {
namespace {

void line(std::string_view prefix, std::string_view message) noexcept {
  try {
    std::string text(prefix);
    text += message;
    text += '\n';
    // One write() so that lines from several threads do not interleave.
    [[maybe_unused]] ssize_t ignored = ::write(STDERR_FILENO, text.data(), text.size());
  } catch (...) {
    // Out of memory while reporting: nothing better to do than stay silent.
  }
}

bool info_enabled() noexcept {
  static const bool enabled = [] {
    try {
      return config::get_choice("RXIO_LOG", {"warn", "info"}) == "info";
    } catch (...) {
      return false;  // a bad value is refused when an engine reads its settings
    }
  }();
  return enabled;
}

}  // namespace

void warn(std::string_view message) noexcept { line("rxio: warning: ", message); }

void info(std::string_view message) noexcept {
  if (info_enabled()) line("rxio: ", message);
}

}  // namespace rxio::log
