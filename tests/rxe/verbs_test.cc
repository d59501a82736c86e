// The verbs layer against the kernel's Soft-RoCE: discovery, every RC operation with
// the data checked byte for byte, completion errors, SRQ, completion channels, memlock.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <tuple>

#include "base/error.h"
#include "tests/rxe/rxe_env.h"
#include "verbs/loopback_pair.h"

namespace rxio::test {
namespace {

using ::testing::HasSubstr;
using verbs::GidType;

// A pattern that differs by size and seed, so a copy from the wrong place shows.
void fill(std::byte* data, std::size_t size, uint32_t seed) {
  uint32_t x = seed * 2654435761u + static_cast<uint32_t>(size);
  for (std::size_t i = 0; i < size; ++i) {
    x = x * 1103515245u + 12345u;
    data[i] = static_cast<std::byte>(x >> 16);
  }
}

ibv_sge sge_of(const verbs::LoopbackSide& side, std::size_t offset, std::size_t length) {
  return ibv_sge{reinterpret_cast<uint64_t>(side.buffer.data() + offset),
                 static_cast<uint32_t>(length), side.mr.lkey()};
}

void post_recv(verbs::LoopbackSide& side, std::size_t length, uint64_t wr_id = 2) {
  ibv_sge sge = sge_of(side, 0, length);
  ibv_recv_wr wr{};
  wr.wr_id = wr_id;
  wr.sg_list = &sge;
  wr.num_sge = length ? 1 : 0;
  ibv_recv_wr* bad = nullptr;
  ASSERT_EQ(side.qp.post_recv(&wr, &bad), 0);
}

// One signaled work request from `from`'s buffer (offset 0) to `to`'s (offset 0).
int post(verbs::LoopbackSide& from, verbs::LoopbackSide& to, ibv_wr_opcode opcode, std::size_t size, bool inline_data,
         uint32_t imm = 0) {
  ibv_sge sge = sge_of(from, 0, size);
  ibv_send_wr wr{};
  wr.wr_id = 1;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = opcode;
  wr.send_flags = IBV_SEND_SIGNALED | (inline_data ? IBV_SEND_INLINE : 0);
  wr.imm_data = htonl(imm);
  wr.wr.rdma.remote_addr = reinterpret_cast<uint64_t>(to.buffer.data());
  wr.wr.rdma.rkey = to.mr.rkey();
  ibv_send_wr* bad = nullptr;
  return from.qp.post_send(&wr, &bad);
}

TEST(Discovery, FindsTheSoftRoceDevices) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  verbs::DeviceList devices;
  for (const auto& name : {loopback_device(), cm_device_a(), cm_device_b()})
    EXPECT_NE(devices.find(name), nullptr) << name;

  verbs::Context context = verbs::Context::open_by_name(loopback_device());
  EXPECT_EQ(context.name(), loopback_device());
  EXPECT_GE(context.query_device().phys_port_cnt, 1);
  EXPECT_EQ(context.query_port(1).state, IBV_PORT_ACTIVE);
}

TEST(Discovery, ChoosesTheRoceV2Ipv4MappedGid) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  verbs::Endpoint endpoint = verbs::select_by_device(loopback_device());
  EXPECT_EQ(endpoint.device, loopback_device());
  EXPECT_EQ(endpoint.gid.type, GidType::roce_v2);
  EXPECT_EQ(verbs::to_string(endpoint.gid.gid), "::ffff:127.0.0.1");

  auto gids = verbs::query_gids(verbs::Context::open_by_name(loopback_device()));
  EXPECT_TRUE(std::any_of(gids.begin(), gids.end(), [&](const auto& g) {
    return g.index == endpoint.gid.index && g.port == endpoint.port;
  })) << "the chosen GID is in the device's table";
}

TEST(Discovery, SelectsByNetdevAndByIp) {
  RXIO_REQUIRE_DEVICE(cm_device_a());
  EXPECT_EQ(verbs::select_by_netdev("lo").device, loopback_device());
  verbs::Endpoint by_ip = verbs::select_by_ip(cm_address_a());
  EXPECT_EQ(by_ip.device, cm_device_a());
  EXPECT_EQ(verbs::to_string(by_ip.gid.gid), "::ffff:" + cm_address_a());
  EXPECT_EQ(verbs::select_by_ip(cm_address_b()).device, cm_device_b());
  EXPECT_EQ(verbs::select_by_ip("127.0.0.1").device, loopback_device());
}

TEST(Discovery, MissesAreExplained) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  try {
    verbs::Context::open_by_name("mlx5_9");
    FAIL() << "opened a device that does not exist";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("no RDMA device named 'mlx5_9'"));
    EXPECT_THAT(e.what(), HasSubstr(loopback_device()));
  }
  try {
    verbs::select_by_ip("203.0.113.77");
    FAIL() << "found a GID for an address no device has";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("203.0.113.77"));
    EXPECT_THAT(e.what(), HasSubstr("::ffff:127.0.0.1"));
  }
}

enum class Op { send, write, write_imm, read };

std::string op_name(Op op) {
  switch (op) {
    case Op::send: return "Send";
    case Op::write: return "Write";
    case Op::write_imm: return "WriteImm";
    case Op::read: return "Read";
  }
  return "?";
}

class RcOps : public ::testing::TestWithParam<std::tuple<Op, std::size_t, bool>> {
 protected:
  static constexpr std::size_t kBuffer = 1 << 20;

  static void SetUpTestSuite() {
    if (verbs::DeviceList().find(loopback_device())) pair_ = std::make_unique<verbs::LoopbackPair>(loopback_device(), kBuffer + 64);
  }
  static void TearDownTestSuite() { pair_.reset(); }
  void SetUp() override { RXIO_REQUIRE_DEVICE(loopback_device()); }

  static std::unique_ptr<verbs::LoopbackPair> pair_;
};
std::unique_ptr<verbs::LoopbackPair> RcOps::pair_;

TEST_P(RcOps, DataArrivesIntact) {
  auto [op, size, inline_data] = GetParam();
  verbs::LoopbackSide& a = pair_->a();
  verbs::LoopbackSide& b = pair_->b();
  if (inline_data) {
    ASSERT_LE(size, a.qp.caps().max_inline_data);
  }

  // The side that ends up holding the data is `dst`; a guard byte after it must survive.
  verbs::LoopbackSide& src = op == Op::read ? b : a;
  verbs::LoopbackSide& dst = op == Op::read ? a : b;
  const uint32_t seed = static_cast<uint32_t>(op) * 31 + (inline_data ? 7 : 0);
  fill(src.buffer.data(), size, seed);
  std::fill(dst.buffer.begin(), dst.buffer.begin() + size + 1, std::byte{0xee});

  if (op == Op::send || op == Op::write_imm) post_recv(b, op == Op::send ? size : 0);
  ibv_wr_opcode opcode = op == Op::send        ? IBV_WR_SEND
                         : op == Op::write     ? IBV_WR_RDMA_WRITE
                         : op == Op::write_imm ? IBV_WR_RDMA_WRITE_WITH_IMM
                                               : IBV_WR_RDMA_READ;
  ASSERT_EQ(post(a, b, opcode, size, inline_data, 0xC0FFEE), 0);

  auto sent = poll_one(a.cq);
  ASSERT_TRUE(sent) << "no send completion within the time limit";
  ASSERT_EQ(sent->status, IBV_WC_SUCCESS) << ibv_wc_status_str(sent->status);
  if (op == Op::send || op == Op::write_imm) {
    auto received = poll_one(b.cq);
    ASSERT_TRUE(received) << "no receive completion within the time limit";
    ASSERT_EQ(received->status, IBV_WC_SUCCESS) << ibv_wc_status_str(received->status);
    EXPECT_EQ(received->byte_len, size);
    EXPECT_EQ(received->qp_num, b.qp.qp_num());
    if (op == Op::write_imm) {
      EXPECT_EQ(received->opcode, IBV_WC_RECV_RDMA_WITH_IMM);
      EXPECT_TRUE(received->wc_flags & IBV_WC_WITH_IMM);
      EXPECT_EQ(ntohl(received->imm_data), 0xC0FFEEu);
    } else {
      EXPECT_EQ(received->opcode, IBV_WC_RECV);
    }
  }
  if (op == Op::read) {
    EXPECT_EQ(sent->byte_len, size);
  }

  ASSERT_EQ(std::memcmp(src.buffer.data(), dst.buffer.data(), size), 0)
      << "payload differs at byte "
      << std::mismatch(src.buffer.begin(), src.buffer.begin() + size, dst.buffer.begin()).first -
             src.buffer.begin();
  EXPECT_EQ(dst.buffer[size], std::byte{0xee}) << "wrote past the end";
}

// Every operation at sizes across packet and page boundaries; the small ones inline too.
std::vector<std::tuple<Op, std::size_t, bool>> rc_cases() {
  std::vector<std::tuple<Op, std::size_t, bool>> cases;
  for (Op op : {Op::send, Op::write, Op::write_imm, Op::read})
    for (std::size_t size : {1, 7, 64, 1000, 4096, 65537, 1 << 20}) {
      cases.emplace_back(op, size, false);
      if (op != Op::read && size <= verbs::QueueCaps{}.max_inline_data)
        cases.emplace_back(op, size, true);
    }
  return cases;
}

std::string rc_case_name(const ::testing::TestParamInfo<std::tuple<Op, std::size_t, bool>>& info) {
  auto [op, size, inline_data] = info.param;
  return op_name(op) + "_" + std::to_string(size) + (inline_data ? "_Inline" : "");
}

INSTANTIATE_TEST_SUITE_P(AllSizes, RcOps, ::testing::ValuesIn(rc_cases()), rc_case_name);

class RcAtomics : public ::testing::Test {
 protected:
  void SetUp() override {
    RXIO_REQUIRE_DEVICE(loopback_device());
    pair_ = std::make_unique<verbs::LoopbackPair>(loopback_device(), 4096);
    if (pair_->context().query_device().atomic_cap == IBV_ATOMIC_NONE)
      FAIL() << "Soft-RoCE supports atomics; the device says it does not";
  }

  uint64_t& remote_word() { return *reinterpret_cast<uint64_t*>(pair_->b().buffer.data()); }
  uint64_t& returned_word() { return *reinterpret_cast<uint64_t*>(pair_->a().buffer.data()); }

  // Runs one atomic from a on b's first word and returns the old value it fetched.
  uint64_t atomic(ibv_wr_opcode opcode, uint64_t compare_add, uint64_t swap = 0) {
    verbs::LoopbackSide& a = pair_->a();
    ibv_sge sge = sge_of(a, 0, 8);
    ibv_send_wr wr{};
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.atomic.remote_addr = reinterpret_cast<uint64_t>(pair_->b().buffer.data());
    wr.wr.atomic.rkey = pair_->b().mr.rkey();
    wr.wr.atomic.compare_add = compare_add;
    wr.wr.atomic.swap = swap;
    ibv_send_wr* bad = nullptr;
    EXPECT_EQ(a.qp.post_send(&wr, &bad), 0);
    auto wc = poll_one(a.cq);
    EXPECT_TRUE(wc && wc->status == IBV_WC_SUCCESS)
        << (wc ? ibv_wc_status_str(wc->status) : "no completion");
    return returned_word();
  }

  std::unique_ptr<verbs::LoopbackPair> pair_;
};

TEST_F(RcAtomics, CompareAndSwap) {
  remote_word() = 42;
  EXPECT_EQ(atomic(IBV_WR_ATOMIC_CMP_AND_SWP, 42, 99), 42u);
  EXPECT_EQ(remote_word(), 99u);
  EXPECT_EQ(atomic(IBV_WR_ATOMIC_CMP_AND_SWP, 42, 7), 99u) << "compare must fail";
  EXPECT_EQ(remote_word(), 99u);
}

TEST_F(RcAtomics, FetchAndAdd) {
  remote_word() = 1000;
  EXPECT_EQ(atomic(IBV_WR_ATOMIC_FETCH_AND_ADD, 5), 1000u);
  EXPECT_EQ(atomic(IBV_WR_ATOMIC_FETCH_AND_ADD, uint64_t(-10)), 1005u);
  EXPECT_EQ(remote_word(), 995u);
}

class RcErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    RXIO_REQUIRE_DEVICE(loopback_device());
    pair_ = std::make_unique<verbs::LoopbackPair>(loopback_device(), 4096);
  }
  std::unique_ptr<verbs::LoopbackPair> pair_;
};

TEST_F(RcErrors, WrongRkeyIsARemoteAccessError) {
  verbs::LoopbackSide& a = pair_->a();
  ibv_sge sge = sge_of(a, 0, 64);
  ibv_send_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_RDMA_WRITE;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.wr.rdma.remote_addr = reinterpret_cast<uint64_t>(pair_->b().buffer.data());
  wr.wr.rdma.rkey = pair_->b().mr.rkey() + 0x100;
  ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp.post_send(&wr, &bad), 0);
  auto wc = poll_one(a.cq);
  ASSERT_TRUE(wc) << "a bad rkey must complete with an error, not hang";
  EXPECT_EQ(wc->status, IBV_WC_REM_ACCESS_ERR) << ibv_wc_status_str(wc->status);
  EXPECT_EQ(a.qp.state(), IBV_QPS_ERR);
}

TEST_F(RcErrors, WrongLkeyIsALocalProtectionError) {
  verbs::LoopbackSide& a = pair_->a();
  post_recv(pair_->b(), 64);
  ibv_sge sge = sge_of(a, 0, 64);
  sge.lkey += 0x100;
  ibv_send_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp.post_send(&wr, &bad), 0);
  auto wc = poll_one(a.cq);
  ASSERT_TRUE(wc) << "a bad lkey must complete with an error, not hang";
  // Hardware reports LOC_PROT_ERR; Soft-RoCE (Linux 6.1) reports LOC_QP_OP_ERR for the
  // same fault. Either is a local error on the requester, never success.
  EXPECT_THAT(wc->status, ::testing::AnyOf(IBV_WC_LOC_PROT_ERR, IBV_WC_LOC_QP_OP_ERR))
      << ibv_wc_status_str(wc->status);
  EXPECT_EQ(a.qp.state(), IBV_QPS_ERR);
}

TEST_F(RcErrors, ErrorStateFlushesPostedWork) {
  verbs::LoopbackSide& b = pair_->b();
  post_recv(b, 64, 11);
  post_recv(b, 64, 12);
  b.qp.to_error();
  EXPECT_EQ(b.qp.state(), IBV_QPS_ERR);
  for (uint64_t expected : {11u, 12u}) {
    auto wc = poll_one(b.cq);
    ASSERT_TRUE(wc) << "posted receives must be flushed";
    EXPECT_EQ(wc->status, IBV_WC_WR_FLUSH_ERR);
    EXPECT_EQ(wc->wr_id, expected);
  }
  b.qp.to_reset();
  EXPECT_EQ(b.qp.state(), IBV_QPS_RESET);
}

TEST_F(RcErrors, BadTransitionNamesTheQpAndDevice) {
  verbs::QueuePair& qp = pair_->a().qp;
  qp.to_reset();
  try {
    qp.to_rts(1);  // RESET → RTS skips INIT and RTR
    FAIL() << "the device accepted RESET→RTS";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("QP " + std::to_string(qp.qp_num())));
    EXPECT_THAT(e.what(), HasSubstr("RTR→RTS"));
    EXPECT_THAT(e.what(), HasSubstr(loopback_device()));
  }
}

TEST(RcChannel, WaitWakesOnCompletion) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  verbs::LoopbackPair pair(loopback_device(), 4096);
  verbs::LoopbackSide& b = pair.b();
  post_recv(b, 64);
  ASSERT_EQ(b.cq.arm(), 0);
  EXPECT_EQ(b.cq.wait(std::chrono::milliseconds(50)), verbs::WaitResult::timeout);
  ASSERT_EQ(post(pair.a(), b, IBV_WR_SEND, 64, false), 0);
  ASSERT_EQ(b.cq.wait(std::chrono::seconds(10)), verbs::WaitResult::event);
  auto wc = poll_one(b.cq, std::chrono::seconds(1));
  ASSERT_TRUE(wc);
  EXPECT_EQ(wc->status, IBV_WC_SUCCESS);
}

TEST(RcSrq, BothQpsReceiveFromOneQueue) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  verbs::LoopbackPair pair(loopback_device(), 4096, {}, /*with_srq=*/true);
  // Receive buffers come from a separate registered area, shared by both QPs.
  std::vector<std::byte> slots(2 * 256);
  auto mr = verbs::MemoryRegion::register_host(pair.pd(), slots.data(), slots.size(), verbs::kLocalWrite);
  for (uint64_t slot : {0u, 1u}) {
    ibv_sge sge{reinterpret_cast<uint64_t>(slots.data() + slot * 256), 256, mr.lkey()};
    ibv_recv_wr wr{};
    wr.wr_id = slot;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    ASSERT_EQ(pair.srq()->post_recv(&wr, &bad), 0);
  }
  fill(pair.a().buffer.data(), 100, 1);
  fill(pair.b().buffer.data(), 200, 2);
  ASSERT_EQ(post(pair.a(), pair.b(), IBV_WR_SEND, 100, false), 0);
  ASSERT_EQ(post(pair.b(), pair.a(), IBV_WR_SEND, 200, false), 0);

  int received = 0;
  for (verbs::LoopbackSide* side : {&pair.a(), &pair.b()}) {
    // Each CQ carries its own QP's send completion and the receive that QP took.
    for (int i = 0; i < 2; ++i) {
      auto wc = poll_one(side->cq);
      ASSERT_TRUE(wc);
      ASSERT_EQ(wc->status, IBV_WC_SUCCESS) << ibv_wc_status_str(wc->status);
      if (wc->opcode != IBV_WC_RECV) continue;
      ++received;
      const verbs::LoopbackSide& sender = side == &pair.a() ? pair.b() : pair.a();
      EXPECT_EQ(wc->byte_len, side == &pair.a() ? 200u : 100u);
      EXPECT_EQ(std::memcmp(slots.data() + wc->wr_id * 256, sender.buffer.data(), wc->byte_len), 0);
    }
  }
  EXPECT_EQ(received, 2);
}

// Clears CAP_IPC_LOCK, which lets root pin memory past RLIMIT_MEMLOCK.
bool drop_ipc_lock() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  for (auto& d : data) {
    d.effective &= ~(1u << CAP_IPC_LOCK);
    d.permitted &= ~(1u << CAP_IPC_LOCK);
  }
  return syscall(SYS_capset, &header, data) == 0;
}

// In a child: lowers the limit, gives up CAP_IPC_LOCK, registers more than the limit
// and prints the error; exits 0 only if registration failed with an rxio::Error.
[[noreturn]] void register_beyond_memlock() {
  rlimit small{64 * 1024, 64 * 1024};
  if (setrlimit(RLIMIT_MEMLOCK, &small) != 0 || !drop_ipc_lock()) _exit(2);
  verbs::Context context = verbs::Context::open_by_name(loopback_device());
  verbs::ProtectionDomain pd(context.get());
  std::vector<std::byte> buffer(4 << 20);
  try {
    verbs::MemoryRegion::register_host(pd, buffer.data(), buffer.size(), verbs::kLocalWrite);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    _exit(0);
  }
  _exit(3);
}

TEST(Memlock, TooSmallALimitGivesTheFix) {
  RXIO_REQUIRE_DEVICE(loopback_device());
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(register_beyond_memlock(), ::testing::ExitedWithCode(0),
              "locked-memory limit is 64 KiB.*ulimit -l unlimited");
}

}  // namespace
}  // namespace rxio::test
