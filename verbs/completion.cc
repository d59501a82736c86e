#include "verbs/completion.h"

#include <fcntl.h>
#include <poll.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "base/error.h"
#include "base/log.h"
#include "verbs/memory.h"

namespace rxio::verbs {
namespace {
// Acknowledging takes a lock inside libibverbs, so do it in batches.
constexpr unsigned kAckBatch = 64;
}  // namespace

void CompletionChannel::Destroy::operator()(ibv_comp_channel* channel) const noexcept {
  if (ibv_destroy_comp_channel(channel) != 0)
    log::warn(std::string("destroying a completion channel failed: ") + std::strerror(errno) +
              " (a CQ still uses it)");
}

CompletionChannel::CompletionChannel(ibv_context* context)
    : channel_(ibv_create_comp_channel(context)) {
  if (!channel_)
    throw Error(errno, "creating a completion channel (ibv_create_comp_channel)",
                device_name(context));
  // Non-blocking so that CompletionQueue::wait can honour its timeout.
  int flags = fcntl(channel_->fd, F_GETFL);
  if (flags < 0 || fcntl(channel_->fd, F_SETFL, flags | O_NONBLOCK) < 0)
    throw Error(errno, "making a completion channel non-blocking", device_name(context));
}

void CompletionQueue::Destroy::operator()(ibv_cq* cq) const noexcept {
  if (int rc = ibv_destroy_cq(cq); rc != 0)
    log::warn("destroying a completion queue on " + device_name(cq->context) +
              " failed: " + std::strerror(rc) + " (a QP still uses it)");
}

CompletionQueue::CompletionQueue(ibv_context* context, int min_entries,
                                 CompletionChannel* channel, int comp_vector)
    : cq_(ibv_create_cq(context, min_entries, nullptr, channel ? channel->get() : nullptr,
                        comp_vector)),
      channel_(channel) {
  if (!cq_) {
    int err = errno;
    throw Error(err,
                "creating a completion queue of " + std::to_string(min_entries) +
                    " entries (ibv_create_cq)",
                device_name(context), memlock_fix(err, 0));
  }
}

CompletionQueue& CompletionQueue::operator=(CompletionQueue&& other) noexcept {
  if (this != &other) {
    ack_pending();
    cq_ = std::move(other.cq_);
    channel_ = std::exchange(other.channel_, nullptr);
    unacked_events_ = std::exchange(other.unacked_events_, 0);
  }
  return *this;
}

CompletionQueue::~CompletionQueue() { ack_pending(); }

void CompletionQueue::ack_pending() noexcept {
  // ibv_destroy_cq waits for every event it delivered to be acknowledged.
  if (cq_ && unacked_events_ > 0) ibv_ack_cq_events(cq_.get(), unacked_events_);
  unacked_events_ = 0;
}

WaitResult CompletionQueue::wait(std::chrono::milliseconds timeout) noexcept {
  if (!channel_) return WaitResult::error;
  pollfd pfd{.fd = channel_->fd(), .events = POLLIN, .revents = 0};
  int ready = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
  if (ready == 0 || (ready < 0 && errno == EINTR)) return WaitResult::timeout;
  if (ready < 0) return WaitResult::error;

  ibv_cq* cq = nullptr;
  void* cq_context = nullptr;
  if (ibv_get_cq_event(channel_->get(), &cq, &cq_context) != 0)
    return errno == EAGAIN ? WaitResult::timeout : WaitResult::error;
  if (cq != get()) {
    // The channel is shared against the contract: acknowledge so the other CQ can
    // still be destroyed, and report the misuse.
    ibv_ack_cq_events(cq, 1);
    return WaitResult::error;
  }
  if (++unacked_events_ >= kAckBatch) ack_pending();
  return WaitResult::event;
}

}  // namespace rxio::verbs
