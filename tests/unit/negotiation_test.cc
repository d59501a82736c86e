// The shim's negotiation messages: what a peer's shim sends must decode exactly, and
// anything else (truncated, padded, another version or kind, nonsense fields) must be
// refused, never half-read.
#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <cstring>

#include "shim/negotiation.h"

namespace rxio::shim {
namespace {

using namespace negotiation;

Endpoint v4(const char* text, uint16_t port) {
  sockaddr_in in{};
  in.sin_family = AF_INET;
  in.sin_port = htons(port);
  inet_pton(AF_INET, text, &in.sin_addr);
  return *Endpoint::from(reinterpret_cast<sockaddr*>(&in));
}

Endpoint v6(const char* text, uint16_t port) {
  sockaddr_in6 in6{};
  in6.sin6_family = AF_INET6;
  in6.sin6_port = htons(port);
  inet_pton(AF_INET6, text, &in6.sin6_addr);
  return *Endpoint::from(reinterpret_cast<sockaddr*>(&in6));
}

TEST(Negotiation, RequestRoundTrips) {
  for (const Tuple& t : {Tuple{v4("127.0.0.1", 40000), v4("127.0.0.1", 6379)},
                         Tuple{v6("::1", 1), v6("fe80::1", 65535)}}) {
    Request r{t, 4242};
    auto bytes = encode(r);
    EXPECT_EQ(bytes.size, kRequestSize);
    auto back = decode_request(bytes.span());
    ASSERT_TRUE(back);
    EXPECT_EQ(back->tuple, t);
    EXPECT_EQ(back->pid, 4242u);
    EXPECT_EQ(back->query, 0u);
  }
}

// A Query is a Request with the cookie of the move it asks about; over rdma_cm it
// comes padded to 56 bytes like any connect's private data, and its kind says its size.
TEST(Negotiation, QueryRoundTrips) {
  Request q{{v4("192.0.2.1", 40000), v4("192.0.2.1", 6379)}, 4242, 0x0102030405060708ull};
  auto bytes = encode(q);
  EXPECT_EQ(bytes.size, kQuerySize);
  EXPECT_EQ(request_size(bytes.span()), kQuerySize);
  auto back = decode_request(bytes.span());
  ASSERT_TRUE(back);
  EXPECT_EQ(back->tuple, q.tuple);
  EXPECT_EQ(back->pid, 4242u);
  EXPECT_EQ(back->query, 0x0102030405060708ull);
  std::array<std::byte, kQuerySize> padded{};
  auto request = encode(Request{q.tuple, 4242});
  std::memcpy(padded.data(), request.bytes.data(), request.size);
  EXPECT_EQ(request_size(padded), kRequestSize);
  auto zero = bytes;
  std::memset(zero.bytes.data() + kRequestSize, 0, kQuerySize - kRequestSize);
  EXPECT_FALSE(decode_request(zero.span())) << "a query about no move";
  EXPECT_FALSE(decode_request(std::span(bytes.bytes).first(kRequestSize))) << "a truncated query";
}

TEST(Negotiation, AnswersRoundTrip) {
  auto yes = decode_answer(encode(Answer{true, {}, 5000, 0x1122334455667788ull}));
  ASSERT_TRUE(yes);
  EXPECT_TRUE(yes->accepted);
  EXPECT_EQ(yes->engine_port, 5000);
  EXPECT_EQ(yes->cookie, 0x1122334455667788ull);
  auto no = decode_answer(encode(Answer{false, Refusal::closing, 0, 0}));
  ASSERT_TRUE(no);
  EXPECT_FALSE(no->accepted);
  EXPECT_EQ(no->refusal, Refusal::closing);
  for (Kind kind : {Kind::confirm, Kind::abort, Kind::switched}) {
    auto notice = decode_notice(encode(Notice{kind}));
    ASSERT_TRUE(notice);
    EXPECT_EQ(notice->kind, kind);
    EXPECT_EQ(notice->sent, 0u);
  }
}

// A Switched carries the bytes the server sent on TCP before it (or that its kernel
// did not say); the other notices carry nothing.
TEST(Negotiation, SwitchedSaysWhatTheServerSentBeforeIt) {
  auto switched = decode_notice(encode(Notice{Kind::switched, 123456789}));
  ASSERT_TRUE(switched);
  EXPECT_EQ(switched->sent, 123456789u);
  EXPECT_EQ(decode_notice(encode(Notice{Kind::switched, kSentUnknown}))->sent, kSentUnknown);
  EXPECT_FALSE(decode_notice(encode(Notice{Kind::switched, uint64_t(1) << 63})));  // no sane count
  auto confirm = encode(Notice{Kind::confirm, 5});
  EXPECT_EQ(decode_notice(confirm)->sent, 0u) << "only a Switched carries a count";
  confirm[8] = std::byte{5};
  EXPECT_FALSE(decode_notice(confirm));
  auto bytes = encode(Notice{Kind::switched, 7});
  for (std::size_t n = 0; n < bytes.size(); ++n) EXPECT_FALSE(decode_notice(std::span(bytes.data(), n))) << n;
  bytes[6] = std::byte{1};  // reserved
  EXPECT_FALSE(decode_notice(bytes));
}

TEST(Negotiation, ResumeRoundTripsAndRefusesWhatNoPeerSends) {
  auto resume = encode(Resume{1u << 20, 130816});
  auto back = decode_resume(resume);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->from, 1u << 20);
  EXPECT_EQ(back->kept, 130816u);
  for (std::size_t n = 0; n < resume.size(); ++n) EXPECT_FALSE(decode_resume(std::span(resume.data(), n))) << n;
  auto with = [&](std::size_t at, std::byte value) {
    auto copy = resume;
    copy[at] = value;
    return decode_resume(copy).has_value();
  };
  EXPECT_FALSE(with(5, std::byte{6}));     // kind: a switched notice is not a resume
  EXPECT_FALSE(with(6, std::byte{1}));     // reserved bytes
  EXPECT_FALSE(with(15, std::byte{0x80}));  // a position past 2^62
  EXPECT_FALSE(with(24, std::byte{1}));     // a read position belongs to hand-overs only
  EXPECT_FALSE(decode_notice(std::span(resume.data(), kNoticeSize)));
}

TEST(Negotiation, RedirectNamesTheProcessToAsk) {
  auto back = decode_answer(encode(Answer{false, Refusal::policy, 0, 0, 4242}));
  ASSERT_TRUE(back);
  EXPECT_FALSE(back->accepted);
  EXPECT_EQ(back->redirect, 4242u);
  EXPECT_EQ(back->redirect_port, 0u);
  // A remote client's redirect names the process's own rdma_cm port too.
  auto remote = decode_answer(encode(Answer{false, Refusal::policy, 0, 0, 4242, 51234}));
  ASSERT_TRUE(remote);
  EXPECT_EQ(remote->redirect, 4242u);
  EXPECT_EQ(remote->redirect_port, 51234u);
  auto not_yet = decode_answer(encode(Answer{false, Refusal::not_yet, 0, 0}));
  ASSERT_TRUE(not_yet);
  EXPECT_EQ(not_yet->refusal, Refusal::not_yet);
  EXPECT_EQ(not_yet->redirect, 0u);
  auto zero = encode(Answer{false, Refusal::policy, 0, 0, 1});
  zero[8] = std::byte{0};  // a redirect to no process
  EXPECT_FALSE(decode_answer(zero));
  auto extra = encode(Answer{false, Refusal::policy, 0, 0, 1});
  extra[20] = std::byte{1};
  EXPECT_FALSE(decode_answer(extra));
  EXPECT_EQ(endpoint_name(80), "rxio-shim.80");
  EXPECT_EQ(endpoint_name(80, 12), "rxio-shim.80.12");
}

TEST(Negotiation, HandOverCarriesWhatItsWriterRead) {
  auto hand_over = encode(Resume{4096, 8192, true, 77777});
  auto back = decode_resume(hand_over);
  ASSERT_TRUE(back);
  EXPECT_TRUE(back->hand_over);
  EXPECT_EQ(back->from, 4096u);
  EXPECT_EQ(back->kept, 8192u);
  EXPECT_EQ(back->read, 77777u);
  auto plain = decode_resume(encode(Resume{4096, 8192}));
  ASSERT_TRUE(plain);
  EXPECT_FALSE(plain->hand_over);
  auto far = hand_over;
  far[31] = std::byte{0x80};  // a read position past 2^62
  EXPECT_FALSE(decode_resume(far));
}

TEST(Negotiation, TruncatedOrPaddedMessagesAreRefused) {
  auto request = encode(Request{{v4("127.0.0.1", 1000), v4("127.0.0.1", 2000)}, 7}).bytes;
  for (std::size_t n = 0; n < kRequestSize; ++n) EXPECT_FALSE(decode_request(std::span(request.data(), n))) << n;
  std::array<std::byte, kRequestSize + 1> longer{};
  std::memcpy(longer.data(), request.data(), kRequestSize);
  EXPECT_FALSE(decode_request(longer));
  auto answer = encode(Answer{true, {}, 5000, 9});
  for (std::size_t n = 0; n < answer.size(); ++n) EXPECT_FALSE(decode_answer(std::span(answer.data(), n))) << n;
}

TEST(Negotiation, WrongMagicVersionKindOrFieldsAreRefused) {
  auto good = encode(Request{{v4("127.0.0.1", 1000), v4("127.0.0.1", 2000)}, 7});
  auto with = [&](std::size_t at, std::byte value) {
    auto copy = good;
    copy.bytes[at] = value;
    return decode_request(copy.span()).has_value();
  };
  EXPECT_FALSE(with(0, std::byte{0}));     // magic
  EXPECT_FALSE(with(4, std::byte{kVersion + 1}));  // version
  EXPECT_FALSE(with(5, std::byte{2}));     // kind: an answer is not a request
  EXPECT_FALSE(with(6, std::byte{99}));    // family
  EXPECT_FALSE(with(7, std::byte{1}));     // reserved byte
  EXPECT_FALSE(decode_request(encode(Request{{v4("127.0.0.1", 1000), v4("127.0.0.1", 2000)}, 0}).span()));  // no pid
  EXPECT_FALSE(decode_request(encode(Request{{v4("127.0.0.1", 0), v4("127.0.0.1", 2000)}, 7}).span()));  // no port
  EXPECT_FALSE(decode_answer(encode(Answer{true, {}, 0, 9})));  // accepted, but no engine port
  auto refusal = encode(Answer{false, Refusal::policy, 0, 0});
  refusal[6] = std::byte{42};  // an unknown reason
  EXPECT_FALSE(decode_answer(refusal));
  EXPECT_FALSE(decode_notice(encode(Answer{true, {}, 1, 1})));
  EXPECT_FALSE(decode_answer(encode(Notice{Kind::confirm})));
}

TEST(Negotiation, DualStackPeersCompareAsIpv4) {
  EXPECT_EQ(v6("::ffff:127.0.0.1", 80), v4("127.0.0.1", 80));
  EXPECT_NE(v6("::1", 80), v4("127.0.0.1", 80));
  EXPECT_EQ(v4("10.1.2.3", 8080).to_string(), "10.1.2.3:8080");
  EXPECT_EQ(v6("fe80::1", 22).to_string(), "[fe80::1]:22");
  sockaddr unix_address{};
  unix_address.sa_family = AF_UNIX;
  EXPECT_FALSE(Endpoint::from(&unix_address));
}

TEST(Negotiation, EndpointNamesArePerPort) {
  EXPECT_EQ(endpoint_name(6379), "rxio-shim.6379");
  EXPECT_NE(endpoint_name(1), endpoint_name(10));
}

}  // namespace
}  // namespace rxio::shim
