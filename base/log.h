// Minimal diagnostics: warnings always, information when RXIO_LOG=info asks for it.
// Safe on paths that must not throw (destructors, teardown).
#pragma once

#include <string_view>

namespace rxio::log {

// One line on stderr, prefixed "rxio: warning: ".
void warn(std::string_view message) noexcept;
// One line on stderr, prefixed "rxio: ", only with RXIO_LOG=info (read once).
void info(std::string_view message) noexcept;

}  // namespace rxio::log
