// Completion queues and the channel that wakes a thread blocked on one.
#pragma once

#include <infiniband/verbs.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>

namespace rxio::verbs {

class CompletionChannel {
 public:
  explicit CompletionChannel(ibv_context* context);

  ibv_comp_channel* get() const noexcept { return channel_.get(); }
  int fd() const noexcept { return channel_->fd; }

 private:
  struct Destroy {
    void operator()(ibv_comp_channel* channel) const noexcept;
  };
  std::unique_ptr<ibv_comp_channel, Destroy> channel_;
};

enum class WaitResult { event, timeout, error };

class CompletionQueue {
 public:
  // `channel` may be null for a CQ that is only polled. A CQ owns the events it takes
  // from its channel, so give each waited-on CQ its own channel.
  CompletionQueue(ibv_context* context, int min_entries, CompletionChannel* channel = nullptr,
                  int comp_vector = 0);
  CompletionQueue(CompletionQueue&&) noexcept = default;
  CompletionQueue& operator=(CompletionQueue&&) noexcept;
  ~CompletionQueue();

  ibv_cq* get() const noexcept { return cq_.get(); }
  int capacity() const noexcept { return cq_->cqe; }

  // Data path: the number of completions written to `out` (0 when none), or a negative
  // value if the CQ is broken.
  int poll(std::span<ibv_wc> out) noexcept { return ibv_poll_cq(get(), int(out.size()), out.data()); }
  // Requests an event for the next completion (0 or an errno value).
  int arm(bool solicited_only = false) noexcept { return ibv_req_notify_cq(get(), solicited_only); }
  // Blocks on the channel until this CQ's event arrives or `timeout` passes. Callers
  // arm, poll once more (a completion may have landed before arming), then wait.
  WaitResult wait(std::chrono::milliseconds timeout) noexcept;

 private:
  struct Destroy {
    void operator()(ibv_cq* cq) const noexcept;
  };
  void ack_pending() noexcept;

  std::unique_ptr<ibv_cq, Destroy> cq_;
  CompletionChannel* channel_ = nullptr;
  unsigned unacked_events_ = 0;
};

}  // namespace rxio::verbs
