// What the verbs layer does on a machine without an RDMA device, and the handle rules
// every verbs type follows.
#include <gtest/gtest.h>

#include <type_traits>

#include "base/error.h"
#include "verbs/cm.h"
#include "verbs/completion.h"
#include "verbs/device.h"
#include "verbs/gid.h"
#include "verbs/memory.h"
#include "verbs/queue_pair.h"

namespace rxio::verbs {
namespace {

template <typename Handle>
constexpr bool is_move_only_handle =
    !std::is_copy_constructible_v<Handle> && !std::is_copy_assignable_v<Handle> &&
    std::is_nothrow_move_constructible_v<Handle> && std::is_nothrow_move_assignable_v<Handle> &&
    std::is_nothrow_destructible_v<Handle>;

static_assert(is_move_only_handle<DeviceList>);
static_assert(is_move_only_handle<Context>);
static_assert(is_move_only_handle<ProtectionDomain>);
static_assert(is_move_only_handle<MemoryRegion>);
static_assert(is_move_only_handle<CompletionChannel>);
static_assert(is_move_only_handle<CompletionQueue>);
static_assert(is_move_only_handle<QueuePair>);
static_assert(is_move_only_handle<SharedReceiveQueue>);
static_assert(is_move_only_handle<cm::EventChannel>);
static_assert(is_move_only_handle<cm::Event>);
static_assert(is_move_only_handle<cm::Id>);

class NoDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!DeviceList().empty())
      GTEST_SKIP() << "this machine has RDMA devices; the no-device behaviour is checked "
                      "where there are none";
  }
};

void expect_no_device_error(const std::function<void()>& call) {
  try {
    call();
    ADD_FAILURE() << "no error without a device";
  } catch (const Error& e) {
    EXPECT_EQ(e.code().value(), ENODEV);
    std::string text = e.what();
    EXPECT_NE(text.find("no RDMA device found"), std::string::npos) << text;
    EXPECT_NE(text.find("rdma link add"), std::string::npos) << text;
  }
}

TEST_F(NoDevice, ListIsEmptyNotAnError) {
  DeviceList devices;
  EXPECT_TRUE(devices.empty());
  EXPECT_TRUE(devices.names().empty());
  EXPECT_EQ(devices.find("rxe0"), nullptr);
}

TEST_F(NoDevice, OpeningByNameSaysThereIsNone) {
  expect_no_device_error([] { Context::open_by_name("rxe0"); });
}

TEST_F(NoDevice, SelectionSaysThereIsNone) {
  expect_no_device_error([] { select_by_device("mlx5_0"); });
  expect_no_device_error([] { select_by_ip("127.0.0.1"); });
  expect_no_device_error([] { select_by_netdev("lo"); });
}

TEST(Selection, UnknownInterfaceIsNamed) {
  try {
    select_by_netdev("no-such-if0");
    ADD_FAILURE() << "no error for a missing interface";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no-such-if0"), std::string::npos) << e.what();
  }
}

TEST(QpState, Names) {
  EXPECT_STREQ(to_string(IBV_QPS_RTS), "RTS");
  EXPECT_STREQ(to_string(IBV_QPS_ERR), "ERR");
}

}  // namespace
}  // namespace rxio::verbs
