// Minimal diagnostics for paths that must not throw (destructors, teardown).
#pragma once

#include <string_view>

namespace rxio::log {

// One line on stderr, prefixed "rxio: warning: ".
void warn(std::string_view message) noexcept;

}  // namespace rxio::log
