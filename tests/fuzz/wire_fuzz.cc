// libFuzzer target for every decoder of bytes that come from a peer. The decoders must
// refuse or accept without crashing, reading out of bounds or overflowing; what they
// accept must survive a round trip through the encoder.
#include <cstddef>
#include <cstdint>
#include <array>
#include <cstring>
#include <span>

#include "transport/engine.h"
#include "transport/wire.h"

using namespace rxio::transport;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  wire::Fault fault{};
  if (size >= 4) {
    uint32_t raw;
    std::memcpy(&raw, data, 4);
    if (auto imm = wire::decode_imm(raw, fault)) {
      if (wire::encode(*imm) != raw) __builtin_trap();
    }
  }
  if (auto header = wire::decode_slot_header(in, size > 16 ? uint32_t(size - 16) : 0, fault)) {
    if (header->length > size - wire::kSlotHeaderSize) __builtin_trap();
  }
  if (auto hello = wire::decode_hello(in, fault)) {
    auto again = wire::decode_hello(wire::encode(*hello), fault);
    if (!again || again->control.slots != hello->control.slots) __builtin_trap();
  }
  if (size >= wire::kRndvEntrySize) {
    std::span<const std::byte, wire::kRndvEntrySize> entry(in.data(), wire::kRndvEntrySize);
    if (auto decoded = wire::decode_rndv_entry(entry, fault)) {
      std::array<std::byte, wire::kRndvEntrySize> again;
      wire::encode(*decoded, again.data());
      auto twice = wire::decode_rndv_entry(again, fault);
      if (!twice || twice->kind != decoded->kind || twice->id != decoded->id || twice->size != decoded->size ||
          twice->tag != decoded->tag || twice->target.address != decoded->target.address)
        __builtin_trap();
    }
  }
  if (auto offer = wire::decode_offer(in, fault)) {
    auto again = wire::decode_offer(wire::encode(*offer), fault);
    if (!again || again->backends != offer->backends || again->pid != offer->pid) __builtin_trap();
  }
  if (auto choice = wire::decode_choice(in, fault)) {
    auto again = wire::decode_choice(wire::encode(*choice), fault);
    if (!again || again->backend != choice->backend || again->token != choice->token) __builtin_trap();
  }
  if (auto hello = wire::decode_shm_hello(in, fault)) {
    auto again = wire::decode_shm_hello(wire::encode(*hello), fault);
    if (!again || again->arena_size != hello->arena_size || again->control.slots != hello->control.slots)
      __builtin_trap();
  }
  if (auto hello = wire::decode_tcp_hello(in, fault)) {
    auto again = wire::decode_tcp_hello(wire::encode(*hello), fault);
    if (!again || again->control.slot_size != hello->control.slot_size) __builtin_trap();
  }
  (void)wire::decode_connect_request(in, fault);
  (void)wire::decode_connect_reply(in, fault);
  (void)RemoteRegion::decode(in);
  return 0;
}
