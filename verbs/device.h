// RDMA devices: discovery, the opened context, and its asynchronous events.
#pragma once

#include <infiniband/verbs.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace rxio::verbs {

// The devices libibverbs sees right now (ibv_get_device_list). Empty is not an error
// here: callers that need a device get the actionable error from Context::open_by_name.
class DeviceList {
 public:
  DeviceList();
  DeviceList(DeviceList&& other) noexcept
      : devices_(std::move(other.devices_)), size_(std::exchange(other.size_, 0)) {}
  DeviceList& operator=(DeviceList&& other) noexcept {
    devices_ = std::move(other.devices_);
    size_ = std::exchange(other.size_, 0);
    return *this;
  }

  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  ibv_device* operator[](std::size_t i) const noexcept { return devices_.get()[i]; }
  ibv_device* find(std::string_view name) const noexcept;
  std::vector<std::string> names() const;

 private:
  struct Free {
    void operator()(ibv_device** list) const noexcept { ibv_free_device_list(list); }
  };
  std::unique_ptr<ibv_device*[], Free> devices_;
  std::size_t size_ = 0;
};

// The text used whenever a device is needed and there is none.
std::string no_device_message();

// An asynchronous event (port change, QP fatal error, ...), copied out and already
// acknowledged so that it never holds up the destruction of the object it names.
struct AsyncEvent {
  ibv_event_type type;
  uint32_t qp_num = 0;  // for QP events
  uint8_t port = 0;     // for port events
  std::string describe() const;
};

// An opened device (ibv_open_device). Move-only; closing it requires that every PD,
// CQ, QP and MR created on it is gone.
class Context {
 public:
  static Context open(ibv_device* device);
  // Throws rxio::Error naming the devices that do exist, or explaining there are none.
  static Context open_by_name(std::string_view name);

  ibv_context* get() const noexcept { return context_.get(); }
  const std::string& name() const noexcept { return name_; }

  ibv_device_attr query_device() const;
  ibv_port_attr query_port(uint8_t port) const;

  // Waits up to `timeout` for the next asynchronous event; nullopt when none came.
  std::optional<AsyncEvent> read_async_event(std::chrono::milliseconds timeout) const;

 private:
  struct Close {
    void operator()(ibv_context* context) const noexcept;
  };
  Context(ibv_context* context, std::string name);

  std::unique_ptr<ibv_context, Close> context_;
  std::string name_;
};

}  // namespace rxio::verbs
