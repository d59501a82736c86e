#include "verbs/device.h"

#include <fcntl.h>
#include <poll.h>

#include <cerrno>
#include <cstring>

#include "base/error.h"
#include "base/log.h"

namespace rxio::verbs {
namespace {

// Which member of ibv_async_event::element an event type fills in.
enum class EventScope { qp, port, device };

EventScope scope_of(ibv_event_type type) {
  switch (type) {
    case IBV_EVENT_QP_FATAL:
    case IBV_EVENT_QP_REQ_ERR:
    case IBV_EVENT_QP_ACCESS_ERR:
    case IBV_EVENT_COMM_EST:
    case IBV_EVENT_SQ_DRAINED:
    case IBV_EVENT_PATH_MIG:
    case IBV_EVENT_PATH_MIG_ERR:
    case IBV_EVENT_QP_LAST_WQE_REACHED:
      return EventScope::qp;
    case IBV_EVENT_PORT_ACTIVE:
    case IBV_EVENT_PORT_ERR:
    case IBV_EVENT_LID_CHANGE:
    case IBV_EVENT_PKEY_CHANGE:
    case IBV_EVENT_SM_CHANGE:
    case IBV_EVENT_CLIENT_REREGISTER:
    case IBV_EVENT_GID_CHANGE:
      return EventScope::port;
    default:
      return EventScope::device;
  }
}

}  // namespace

DeviceList::DeviceList() {
  int count = 0;
  devices_.reset(ibv_get_device_list(&count));
  if (!devices_) {
    // ENOSYS means the kernel has no RDMA support at all: that is "no devices".
    if (errno == ENOSYS) return;
    throw Error(errno, "listing RDMA devices (ibv_get_device_list)");
  }
  size_ = static_cast<std::size_t>(count);
}

ibv_device* DeviceList::find(std::string_view name) const noexcept {
  for (std::size_t i = 0; i < size_; ++i)
    if (name == ibv_get_device_name((*this)[i])) return (*this)[i];
  return nullptr;
}

std::vector<std::string> DeviceList::names() const {
  std::vector<std::string> result;
  for (std::size_t i = 0; i < size_; ++i) result.emplace_back(ibv_get_device_name((*this)[i]));
  return result;
}

std::string no_device_message() {
  return "no RDMA device found: load the driver for your NIC, or create a Soft-RoCE "
         "device with `rdma link add rxe0 type rxe netdev <interface>` (package rdma-core, "
         "kernel module rdma_rxe); `ibv_devices` lists what libibverbs sees";
}

std::string AsyncEvent::describe() const {
  std::string text = ibv_event_type_str(type);
  switch (scope_of(type)) {
    case EventScope::qp:
      return text + " on QP " + std::to_string(qp_num);
    case EventScope::port:
      return text + " on port " + std::to_string(port);
    case EventScope::device:
      return text;
  }
  return text;
}

void Context::Close::operator()(ibv_context* context) const noexcept {
  if (ibv_close_device(context) != 0)
    log::warn(std::string("closing RDMA device ") + ibv_get_device_name(context->device) +
              " failed: " + std::strerror(errno));
}

Context::Context(ibv_context* context, std::string name)
    : context_(context), name_(std::move(name)) {
  // Non-blocking so that read_async_event can wait with a timeout.
  int flags = fcntl(context->async_fd, F_GETFL);
  if (flags < 0 || fcntl(context->async_fd, F_SETFL, flags | O_NONBLOCK) < 0)
    throw Error(errno, "making the async event fd non-blocking", name_);
}

Context Context::open(ibv_device* device) {
  std::string name = ibv_get_device_name(device);
  ibv_context* context = ibv_open_device(device);
  if (!context)
    throw Error(errno, "opening RDMA device (ibv_open_device)", name,
                "check that /dev/infiniband/uverbs* exists and is accessible, and that "
                "the ib_uverbs module is loaded");
  return Context(context, std::move(name));
}

Context Context::open_by_name(std::string_view name) {
  DeviceList devices;
  if (devices.empty()) throw Error(ENODEV, no_device_message());
  ibv_device* device = devices.find(name);
  if (!device) {
    std::string known;
    for (const auto& n : devices.names()) known += (known.empty() ? "" : ", ") + n;
    throw Error(ENODEV, "no RDMA device named '" + std::string(name) + "'", {},
                "devices present: " + known);
  }
  return open(device);
}

ibv_device_attr Context::query_device() const {
  ibv_device_attr attr{};
  if (int rc = ibv_query_device(get(), &attr); rc != 0)
    throw Error(rc, "querying device attributes (ibv_query_device)", name_);
  return attr;
}

ibv_port_attr Context::query_port(uint8_t port) const {
  ibv_port_attr attr{};
  if (int rc = ibv_query_port(get(), port, &attr); rc != 0)
    throw Error(rc, "querying port " + std::to_string(port) + " (ibv_query_port)", name_);
  return attr;
}

std::optional<AsyncEvent> Context::read_async_event(std::chrono::milliseconds timeout) const {
  pollfd pfd{.fd = get()->async_fd, .events = POLLIN, .revents = 0};
  int ready = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
  if (ready < 0) {
    if (errno == EINTR) return std::nullopt;
    throw Error(errno, "waiting for async events", name_);
  }
  if (ready == 0) return std::nullopt;

  ibv_async_event event{};
  if (ibv_get_async_event(get(), &event) != 0) {
    if (errno == EAGAIN) return std::nullopt;
    throw Error(errno, "reading an async event (ibv_get_async_event)", name_);
  }
  AsyncEvent copy{.type = event.event_type};
  switch (scope_of(event.event_type)) {
    case EventScope::qp:
      copy.qp_num = event.element.qp->qp_num;
      break;
    case EventScope::port:
      copy.port = static_cast<uint8_t>(event.element.port_num);
      break;
    case EventScope::device:
      break;
  }
  ibv_ack_async_event(&event);
  return copy;
}

}  // namespace rxio::verbs
