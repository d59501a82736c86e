// rxio-memcpy-bw: this machine's memcpy bandwidth, the yardstick for the shm backend.
// Copies BLOCK-byte blocks between two WORKING_SET-byte buffers for about a second and
// prints GB/s (10^9 bytes). A working set past the caches measures memory, as a
// receiver's posted buffers do.
//
// usage: rxio-memcpy-bw [BLOCK [WORKING_SET]]     (defaults 131072 and 64 MiB)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
  const std::size_t block = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 131072;
  const std::size_t set = argc > 2 ? std::strtoull(argv[2], nullptr, 0) : 64u << 20;
  if (block == 0 || set < block) {
    std::fprintf(stderr, "usage: rxio-memcpy-bw [BLOCK [WORKING_SET]] (WORKING_SET >= BLOCK > 0)\n");
    return 2;
  }
  std::vector<char> from(set, 1), to(set, 0);
  const std::size_t blocks = set / block;
  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  std::size_t copied = 0;
  double seconds = 0;
  for (std::size_t i = 0; seconds < 1.0; ++i) {
    std::size_t at = (i % blocks) * block;
    std::memcpy(to.data() + at, from.data() + at, block);
    copied += block;
    if (i % 64 == 63) seconds = std::chrono::duration<double>(Clock::now() - start).count();
  }
  // Read the destination, so the copies cannot be optimized away.
  volatile char sink = to[set / 2];
  (void)sink;
  std::printf("%zu %zu %.2f\n", block, set, double(copied) / seconds / 1e9);
  return 0;
}
