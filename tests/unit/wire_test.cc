// Wire formats and ring arithmetic: what the engine trusts of a peer's bytes.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "transport/ring.h"
#include "transport/wire.h"

namespace rxio::transport {
namespace {

using wire::Fault;

TEST(Imm, RoundTripsAndRefusesUnknownTypes) {
  Fault fault{};
  wire::Imm imm{wire::ImmType::credit, wire::kMaxConnections - 1, 200};
  auto back = wire::decode_imm(wire::encode(imm), fault);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->type, wire::ImmType::credit);
  EXPECT_EQ(back->connection, wire::kMaxConnections - 1);
  EXPECT_EQ(back->value, 200);
  EXPECT_TRUE(wire::decode_imm(wire::encode({wire::ImmType::rndv, 3, 255}), fault));
  EXPECT_FALSE(wire::decode_imm(0x40000000u, fault));
  EXPECT_FALSE(wire::decode_imm(0x0, fault));
  EXPECT_EQ(fault, Fault::bad_kind);
  EXPECT_FALSE(wire::decode_imm(0xF0000000u, fault));
}

TEST(SlotHeader, RoundTripsAndChecksLengths) {
  std::vector<std::byte> slot(128);
  wire::encode(wire::SlotHeader{wire::SlotKind::eager, 100, 0xDEADBEEFCAFEull}, slot.data());
  Fault fault{};
  auto header = wire::decode_slot_header(slot, 112, fault);
  ASSERT_TRUE(header);
  EXPECT_EQ(header->kind, wire::SlotKind::eager);
  EXPECT_EQ(header->length, 100u);
  EXPECT_EQ(header->tag, 0xDEADBEEFCAFEull);

  EXPECT_FALSE(wire::decode_slot_header(slot, 99, fault)) << "longer than the payload allows";
  EXPECT_EQ(fault, Fault::bad_length);
  EXPECT_FALSE(wire::decode_slot_header(std::span(slot).first(10), 112, fault));
  EXPECT_EQ(fault, Fault::truncated);

  wire::encode(wire::SlotHeader{wire::SlotKind::connect, 23, 0}, slot.data());
  EXPECT_FALSE(wire::decode_slot_header(slot, 112, fault)) << "connect requests have a fixed size";
  EXPECT_EQ(fault, Fault::bad_length);
  slot[0] = std::byte{3};
  EXPECT_FALSE(wire::decode_slot_header(slot, 112, fault)) << "kind 3 is unused";
  EXPECT_EQ(fault, Fault::bad_kind);
  wire::encode(wire::SlotHeader{wire::SlotKind::close, 1, 0}, slot.data());
  EXPECT_FALSE(wire::decode_slot_header(slot, 112, fault)) << "close carries nothing";
  wire::encode(wire::SlotHeader{wire::SlotKind::release, 8, 0}, slot.data());
  EXPECT_FALSE(wire::decode_slot_header(slot, 112, fault)) << "a release names one connection";
  EXPECT_EQ(fault, Fault::bad_length);
  wire::encode(wire::SlotHeader{wire::SlotKind::release, wire::kReleaseSize, 0}, slot.data());
  EXPECT_TRUE(wire::decode_slot_header(slot, 112, fault));
  slot[0] = std::byte{99};
  EXPECT_FALSE(wire::decode_slot_header(slot, 112, fault));
  EXPECT_EQ(fault, Fault::bad_kind);
}

TEST(Hello, RoundTripsAndRefusesStrangers) {
  wire::Hello hello;
  hello.qp_num = 0x123456;
  hello.psn = 0xABCDEF;
  hello.gid.raw[15] = 7;
  hello.mtu = IBV_MTU_4096;
  hello.control = {0x7f0000001000, 0x42, 16, 8192};
  auto bytes = wire::encode(hello);
  Fault fault{};
  auto back = wire::decode_hello(bytes, fault);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->qp_num, 0x123456u);
  EXPECT_EQ(back->psn, 0xABCDEFu);
  EXPECT_EQ(back->gid.raw[15], 7);
  EXPECT_EQ(back->control.address, 0x7f0000001000u);
  EXPECT_EQ(back->control.slots, 16u);

  auto bad = bytes;
  bad[0] = std::byte{'G'};
  EXPECT_FALSE(wire::decode_hello(bad, fault));
  EXPECT_EQ(fault, Fault::bad_magic);
  bad = bytes;
  bad[4] = std::byte{9};
  EXPECT_FALSE(wire::decode_hello(bad, fault));
  EXPECT_EQ(fault, Fault::bad_version);
  EXPECT_FALSE(wire::decode_hello(std::span(bytes).first(55), fault));
  EXPECT_EQ(fault, Fault::truncated);
  hello.control.slots = wire::kMaxRingSlots + 1;
  EXPECT_FALSE(wire::decode_hello(wire::encode(hello), fault)) << "absurd ring";
  EXPECT_EQ(fault, Fault::bad_length);
}

TEST(ConnectMessages, RoundTripAndRangeChecks) {
  std::array<std::byte, wire::kConnectReplySize> buffer{};
  wire::encode(wire::ConnectReply{5, 9, {0x1000, 3, 4, 256}, {0x2000, 77}}, buffer.data());
  Fault fault{};
  auto reply = wire::decode_connect_reply(buffer, fault);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->connection, 5u);
  EXPECT_EQ(reply->peer_connection, 9u);
  EXPECT_EQ(reply->ring.slot_size, 256u);
  EXPECT_EQ(reply->rndv.address, 0x2000u);
  EXPECT_EQ(reply->rndv.rkey, 77u);

  wire::encode(wire::ConnectRequest{wire::kMaxConnections, {0x1000, 3, 4, 256}, {}}, buffer.data());
  EXPECT_FALSE(wire::decode_connect_request(buffer, fault));
  EXPECT_EQ(fault, Fault::bad_connection);
  wire::encode(wire::ConnectRequest{1, {0x1000, 3, 4, 16}, {}}, buffer.data());
  EXPECT_FALSE(wire::decode_connect_request(buffer, fault)) << "a slot must hold more than its header";
}

TEST(Rendezvous, EntriesRoundTripAndAreChecked) {
  std::array<std::byte, wire::kRndvEntrySize> buffer{};
  Fault fault{};
  wire::encode(wire::RndvEntry{wire::RndvKind::request, 2, 4096, 0xFEEDull}, buffer.data());
  auto request = wire::decode_rndv_entry(buffer, fault);
  ASSERT_TRUE(request);
  EXPECT_EQ(request->kind, wire::RndvKind::request);
  EXPECT_EQ(request->id, 2u);
  EXPECT_EQ(request->size, 4096u);
  EXPECT_EQ(request->tag, 0xFEEDull);

  wire::RndvEntry ready{wire::RndvKind::ready, wire::kMaxRendezvous - 1};
  ready.target = {0x7f00deadbeef, 9, 65536};
  wire::encode(ready, buffer.data());
  auto back = wire::decode_rndv_entry(buffer, fault);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->id, wire::kMaxRendezvous - 1);
  EXPECT_EQ(back->target.address, 0x7f00deadbeefu);
  EXPECT_EQ(back->target.rkey, 9u);
  EXPECT_EQ(back->target.length, 65536u);

  wire::encode(wire::RndvEntry{wire::RndvKind::request, 2, 0, 1}, buffer.data());
  EXPECT_FALSE(wire::decode_rndv_entry(buffer, fault)) << "an empty rendezvous";
  EXPECT_EQ(fault, Fault::bad_length);
  wire::encode(wire::RndvEntry{wire::RndvKind::written, wire::kMaxRendezvous}, buffer.data());
  EXPECT_FALSE(wire::decode_rndv_entry(buffer, fault)) << "ids fit the immediate's 8 bits";
  EXPECT_EQ(fault, Fault::bad_rendezvous);
  buffer[0] = std::byte{0};
  EXPECT_FALSE(wire::decode_rndv_entry(buffer, fault));
  EXPECT_EQ(fault, Fault::bad_kind);
  buffer[0] = std::byte{5};
  EXPECT_FALSE(wire::decode_rndv_entry(buffer, fault));
  EXPECT_EQ(fault, Fault::bad_kind);
}

TEST(Bootstrap, OfferChoiceAndShmHelloRoundTripAndAreChecked) {
  Fault fault{};
  wire::Offer offer{3, {}, 1000, 4242, 77, 88};
  offer.host[3] = 9;
  auto o = wire::decode_offer(wire::encode(offer), fault);
  ASSERT_TRUE(o);
  EXPECT_EQ(o->backends, 3);
  EXPECT_EQ(o->host, offer.host);
  EXPECT_EQ(o->pid, 4242u);
  EXPECT_EQ(o->net_ns, 77u);
  EXPECT_EQ(o->pid_ns, 88u);
  offer.backends = 0x80;
  EXPECT_FALSE(wire::decode_offer(wire::encode(offer), fault)) << "an unknown backend";
  EXPECT_EQ(fault, Fault::bad_kind);
  auto bytes = wire::encode(wire::Offer{1});
  bytes[0] = std::byte{0};
  EXPECT_FALSE(wire::decode_offer(bytes, fault));
  EXPECT_EQ(fault, Fault::bad_magic);

  wire::Choice choice{1, 4242, 0xABCDEF, {}};
  choice.token[15] = 1;
  auto c = wire::decode_choice(wire::encode(choice), fault);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->nonce, 0xABCDEFu);
  EXPECT_EQ(c->token, choice.token);
  EXPECT_TRUE(wire::decode_choice(wire::encode(wire::Choice{wire::kNoBackend}), fault)) << "no backend is an answer";
  EXPECT_FALSE(wire::decode_choice(wire::encode(wire::Choice{7}), fault));

  wire::ShmHello hello;
  hello.arena_size = 1 << 30;
  hello.arena_base = 0x7f0000000000;
  hello.control = {0x7f0000010000, 0, 16, 8192};
  auto h = wire::decode_shm_hello(wire::encode(hello), fault);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->arena_size, uint64_t(1) << 30);
  EXPECT_EQ(h->control.slots, 16u);
  hello.arena_size = 4096;
  EXPECT_FALSE(wire::decode_shm_hello(wire::encode(hello), fault)) << "smaller than a doorbell";
  hello.arena_size = 1 << 20;
  hello.arena_base = ~uint64_t{0} - 10;
  EXPECT_FALSE(wire::decode_shm_hello(wire::encode(hello), fault)) << "wraps around";
  auto encoded = wire::encode(hello);
  EXPECT_FALSE(wire::decode_shm_hello(std::span(encoded).first(40), fault));
  EXPECT_EQ(fault, Fault::truncated);
}

TEST(SendRing, CreditsLimitTheSender) {
  SendRing ring(4);
  EXPECT_EQ(ring.credits(), 4u);
  EXPECT_EQ(ring.take(), 0u);
  EXPECT_EQ(ring.take(), 1u);
  EXPECT_EQ(ring.take(), 2u);
  EXPECT_EQ(ring.take(), 3u);
  EXPECT_EQ(ring.credits(), 0u);
  EXPECT_FALSE(ring.give_back(5)) << "more than was spent";
  EXPECT_TRUE(ring.give_back(2));
  EXPECT_EQ(ring.take(), 0u) << "slots are reused in order";
  EXPECT_EQ(ring.credits(), 1u);
}

TEST(RecvRing, CreditsOnlyTheOldestContiguousRun) {
  RecvRing ring(4);
  uint64_t seq[5];
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(ring.arrive(seq[i]));
  EXPECT_FALSE(ring.arrive(seq[4])) << "a fifth slot overflows a ring of four";
  ring.release(seq[1]);
  ring.release(seq[2]);
  EXPECT_EQ(ring.unreturned(), 0u) << "slot 0 still holds a message";
  ring.release(seq[0]);
  EXPECT_EQ(ring.unreturned(), 3u);
  EXPECT_EQ(ring.take_unreturned(2), 2u);
  EXPECT_EQ(ring.take_unreturned(5), 1u);
  ASSERT_TRUE(ring.arrive(seq[4]));
  EXPECT_EQ(ring.index(seq[4]), 0u);
}

TEST(RecvRing, ManyLapsKeepTheirPlace) {
  RecvRing ring(3);
  SendRing sender(3);
  for (uint64_t i = 0; i < 1000; ++i) {
    uint64_t seq;
    uint32_t slot = sender.take();
    ASSERT_TRUE(ring.arrive(seq));
    ASSERT_EQ(ring.index(seq), slot);
    ring.release(seq);
    ASSERT_TRUE(sender.give_back(ring.take_unreturned(255)));
  }
}

}  // namespace
}  // namespace rxio::transport
