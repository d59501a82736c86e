// rdma_cm between the two Soft-RoCE devices on the ends of the veth pair.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string_view>
#include <vector>

#include "base/error.h"
#include "tests/rxe/rxe_env.h"
#include "verbs/cm.h"
#include "verbs/completion.h"
#include "verbs/memory.h"
#include "verbs/queue_pair.h"

namespace rxio::test {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;
constexpr milliseconds kTimeout{5000};

std::span<const std::byte> bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

std::string text_of(std::span<const std::byte> data) {
  return {reinterpret_cast<const char*>(data.data()), data.size()};
}

// The verbs resources one side of a connection needs once rdma_cm picked the device.
struct CmSide {
  explicit CmSide(verbs::cm::Id& id)
      : pd(id.verbs()),
        cq(id.verbs(), 16),
        buffer(4096),
        mr(verbs::MemoryRegion::register_host(pd, buffer.data(), buffer.size(), verbs::kLocalWrite)),
        qp(id, pd, cq, cq, verbs::QueueCaps{}) {}
  verbs::ProtectionDomain pd;
  verbs::CompletionQueue cq;
  std::vector<std::byte> buffer;
  verbs::MemoryRegion mr;
  verbs::cm::QueuePair qp;
};

TEST(RdmaCm, ConnectAcceptWithPrivateDataAcrossTheVethPair) {
  RXIO_REQUIRE_DEVICE(cm_device_a());
  verbs::cm::EventChannel server_events;
  verbs::cm::Id listener(server_events);
  listener.bind(verbs::cm::SocketAddress::parse(cm_address_a(), 0));
  listener.listen(8);
  ASSERT_NE(listener.local_port(), 0);
  auto server_address = verbs::cm::SocketAddress::parse(cm_address_a(), listener.local_port());
  auto client_source = verbs::cm::SocketAddress::parse(cm_address_b(), 0);

  verbs::cm::EventChannel client_events;
  verbs::cm::Id client(client_events);
  // Bound to B's address, the client goes out through B's device: two "hosts".
  client.resolve_address(client_events, server_address, kTimeout, &client_source);
  client.resolve_route(client_events, kTimeout);
  ASSERT_NE(client.verbs(), nullptr);
  EXPECT_EQ(verbs::device_name(client.verbs()), cm_device_b());
  CmSide client_side(client);
  client.connect({.private_data = bytes("hello from the client")});

  verbs::cm::Event request = server_events.expect(RDMA_CM_EVENT_CONNECT_REQUEST, kTimeout, "client");
  EXPECT_EQ(text_of(request.private_data().first(21)), "hello from the client");
  verbs::cm::Id server = verbs::cm::Id::adopt(request.id());
  EXPECT_EQ(verbs::device_name(server.verbs()), cm_device_a());
  CmSide server_side(server);

  // Post the receive before accepting so the client's first send finds it.
  ibv_sge recv_sge{reinterpret_cast<uint64_t>(server_side.buffer.data()), 4096, server_side.mr.lkey()};
  ibv_recv_wr recv{};
  recv.sg_list = &recv_sge;
  recv.num_sge = 1;
  ibv_recv_wr* bad_recv = nullptr;
  ASSERT_EQ(server_side.qp.post_recv(&recv, &bad_recv), 0);
  server.accept({.private_data = bytes("welcome, client")});

  verbs::cm::Event established = client_events.expect(RDMA_CM_EVENT_ESTABLISHED, kTimeout, "server");
  EXPECT_EQ(text_of(established.private_data().first(15)), "welcome, client");
  server_events.expect(RDMA_CM_EVENT_ESTABLISHED, kTimeout, "client");

  const std::string_view message = "a message over the rdma_cm QP";
  std::memcpy(client_side.buffer.data(), message.data(), message.size());
  ibv_sge send_sge{reinterpret_cast<uint64_t>(client_side.buffer.data()),
                   static_cast<uint32_t>(message.size()), client_side.mr.lkey()};
  ibv_send_wr send{};
  send.sg_list = &send_sge;
  send.num_sge = 1;
  send.opcode = IBV_WR_SEND;
  send.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad_send = nullptr;
  ASSERT_EQ(client_side.qp.post_send(&send, &bad_send), 0);
  auto sent = poll_one(client_side.cq);
  ASSERT_TRUE(sent);
  EXPECT_EQ(sent->status, IBV_WC_SUCCESS) << ibv_wc_status_str(sent->status);
  auto received = poll_one(server_side.cq);
  ASSERT_TRUE(received);
  ASSERT_EQ(received->status, IBV_WC_SUCCESS) << ibv_wc_status_str(received->status);
  EXPECT_EQ(text_of(std::span(server_side.buffer).first(received->byte_len)), message);

  // The passive side sees DISCONNECTED on the request and answers with its own
  // disconnect, which completes the active side's.
  client.disconnect();
  server_events.expect(RDMA_CM_EVENT_DISCONNECTED, kTimeout, "client");
  server.disconnect();
  client_events.expect(RDMA_CM_EVENT_DISCONNECTED, kTimeout, "server");
}

TEST(RdmaCm, ConnectingWhereNobodyListensIsRefused) {
  RXIO_REQUIRE_DEVICE(cm_device_a());
  // Take a port rdma_cm has given out, then free it, so nothing listens there.
  uint16_t port;
  {
    verbs::cm::EventChannel events;
    verbs::cm::Id probe(events);
    probe.bind(verbs::cm::SocketAddress::parse(cm_address_a(), 0));
    port = probe.local_port();
  }
  verbs::cm::EventChannel events;
  verbs::cm::Id client(events);
  auto source = verbs::cm::SocketAddress::parse(cm_address_b(), 0);
  client.resolve_address(events, verbs::cm::SocketAddress::parse(cm_address_a(), port), kTimeout,
                         &source);
  client.resolve_route(events, kTimeout);
  CmSide side(client);
  client.connect({});
  try {
    events.expect(RDMA_CM_EVENT_ESTABLISHED, kTimeout, cm_address_a());
    FAIL() << "connected to a port without a listener";
  } catch (const Error& e) {
    EXPECT_EQ(e.code().value(), ECONNREFUSED);
    EXPECT_THAT(e.what(), HasSubstr("RDMA_CM_EVENT_REJECTED"));
    EXPECT_THAT(e.what(), HasSubstr("no listener"));
  }
}

TEST(RdmaCm, RejectCarriesPrivateData) {
  RXIO_REQUIRE_DEVICE(cm_device_b());
  verbs::cm::EventChannel server_events;
  verbs::cm::Id listener(server_events);
  listener.bind(verbs::cm::SocketAddress::parse(cm_address_b(), 0));
  listener.listen(8);

  verbs::cm::EventChannel client_events;
  verbs::cm::Id client(client_events);
  auto source = verbs::cm::SocketAddress::parse(cm_address_a(), 0);
  client.resolve_address(client_events,
                         verbs::cm::SocketAddress::parse(cm_address_b(), listener.local_port()),
                         kTimeout, &source);
  client.resolve_route(client_events, kTimeout);
  CmSide side(client);
  client.connect({.private_data = bytes("may I?")});

  verbs::cm::Event request = server_events.expect(RDMA_CM_EVENT_CONNECT_REQUEST, kTimeout, "client");
  verbs::cm::Id refused = verbs::cm::Id::adopt(request.id());
  EXPECT_EQ(verbs::device_name(refused.verbs()), cm_device_b());
  EXPECT_EQ(verbs::device_name(client.verbs()), cm_device_a());
  refused.reject(bytes("policy says no"));

  auto answer = client_events.next(kTimeout);
  ASSERT_TRUE(answer);
  ASSERT_EQ(answer->type(), RDMA_CM_EVENT_REJECTED) << answer->describe();
  EXPECT_EQ(text_of(answer->private_data().first(14)), "policy says no");
  EXPECT_THAT(answer->describe(), HasSubstr("refused by the peer application"));
}

TEST(RdmaCm, OversizedPrivateDataIsRefusedBeforeTheWire) {
  RXIO_REQUIRE_DEVICE(cm_device_a());
  verbs::cm::EventChannel events;
  verbs::cm::Id id(events);
  std::vector<std::byte> too_much(57);
  try {
    id.connect({.private_data = too_much});
    FAIL() << "57 bytes of private data accepted on connect";
  } catch (const Error& e) {
    EXPECT_EQ(e.code().value(), EINVAL);
    EXPECT_THAT(e.what(), HasSubstr("at most 56"));
  }
}

}  // namespace
}  // namespace rxio::test
