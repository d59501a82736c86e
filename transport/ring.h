// Ring and credit arithmetic of one direction of a connection. Pure bookkeeping, no
// I/O: the sender's view (credits, where the next slot goes) and the receiver's view
// (which slot arrives next, which slots are free again and may be credited back).
#pragma once

#include <cstdint>
#include <vector>

namespace rxio::transport {

// The sender writes slot seq % slots and may run `credits` slots ahead of the
// receiver's releases.
class SendRing {
 public:
  explicit SendRing(uint32_t slots = 0) : slots_(slots), credits_(slots) {}

  uint32_t credits() const noexcept { return credits_; }
  uint32_t slots() const noexcept { return slots_; }
  // Takes one credit; returns the slot index to write. Call only when credits() > 0.
  uint32_t take() noexcept {
    --credits_;
    return static_cast<uint32_t>(next_seq_++ % slots_);
  }
  // False when the peer returns more than it could owe (a protocol violation).
  bool give_back(uint32_t count) noexcept {
    if (count > slots_ - credits_) return false;
    credits_ += count;
    return true;
  }

 private:
  uint32_t slots_;
  uint32_t credits_;
  uint64_t next_seq_ = 0;
};

// Slots arrive in order (one RC QP per link), and are released in any order; credits go
// back only for the oldest contiguous released run, because the sender reuses slots in
// order.
class RecvRing {
 public:
  explicit RecvRing(uint32_t slots = 0) : slots_(slots), released_(slots, false) {}

  uint32_t slots() const noexcept { return slots_; }
  // Registers one arrival; false if the peer wrote more than its credits allowed.
  bool arrive(uint64_t& seq) noexcept {
    if (next_arrival_ - head_ >= slots_) return false;
    seq = next_arrival_++;
    return true;
  }
  uint32_t index(uint64_t seq) const noexcept { return static_cast<uint32_t>(seq % slots_); }
  // Marks `seq` free and reclaims the contiguous run it may complete.
  void release(uint64_t seq) noexcept {
    released_[index(seq)] = true;
    while (head_ < next_arrival_ && released_[index(head_)]) {
      released_[index(head_)] = false;
      ++head_;
      ++unreturned_;
    }
  }
  // Credits reclaimed but not yet sent back.
  uint32_t unreturned() const noexcept { return unreturned_; }
  uint32_t take_unreturned(uint32_t at_most) noexcept {
    uint32_t n = unreturned_ < at_most ? unreturned_ : at_most;
    unreturned_ -= n;
    return n;
  }

 private:
  uint32_t slots_;
  std::vector<bool> released_;
  uint64_t next_arrival_ = 0;
  uint64_t head_ = 0;
  uint32_t unreturned_ = 0;
};

}  // namespace rxio::transport
