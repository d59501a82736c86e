// libFuzzer target for the shim's negotiation decoders: bytes any local process can
// send to a listener's negotiation endpoint, and the Resume a peer writes into the TCP
// connection when a moved connection goes back to it. They must refuse or accept without
// crashing or reading out of bounds, and what they accept must survive a round trip.
#include <cstddef>
#include <cstdint>
#include <span>

#include "shim/negotiation.h"

using namespace rxio::shim;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  if (auto request = negotiation::decode_request(in)) {
    auto again = negotiation::decode_request(negotiation::encode(*request).span());
    if (!again || !(again->tuple == request->tuple) || again->pid != request->pid || again->query != request->query)
      __builtin_trap();
  }
  if (auto answer = negotiation::decode_answer(in)) {
    auto again = negotiation::decode_answer(negotiation::encode(*answer));
    if (!again || again->accepted != answer->accepted || again->cookie != answer->cookie ||
        again->engine_port != answer->engine_port || again->redirect != answer->redirect ||
        again->redirect_port != answer->redirect_port)
      __builtin_trap();
  }
  if (auto resume = negotiation::decode_resume(in)) {
    auto again = negotiation::decode_resume(negotiation::encode(*resume));
    if (!again || again->from != resume->from || again->kept != resume->kept ||
        again->hand_over != resume->hand_over || again->read != resume->read) __builtin_trap();
  }
  if (auto notice = negotiation::decode_notice(in)) {
    auto again = negotiation::decode_notice(negotiation::encode(*notice));
    if (!again || again->kind != notice->kind || again->sent != notice->sent) __builtin_trap();
  }
  return 0;
}
