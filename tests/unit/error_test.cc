#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cerrno>
#include <string>

#include "base/error.h"

namespace rxio {
namespace {

using ::testing::HasSubstr;

TEST(Error, NamesOperationWhereAndFix) {
  Error error(ENOMEM, "registering 1 MiB", "rxe0", "raise the limit");
  EXPECT_EQ(error.code(), std::errc::not_enough_memory);
  EXPECT_EQ(error.operation(), "registering 1 MiB");
  EXPECT_EQ(error.where(), "rxe0");
  EXPECT_EQ(error.fix(), "raise the limit");
  std::string text = error.what();
  EXPECT_THAT(text, HasSubstr("registering 1 MiB on rxe0"));
  EXPECT_THAT(text, HasSubstr("(raise the limit)"));
  EXPECT_THAT(text, HasSubstr("Cannot allocate memory"));
}

TEST(Error, OmitsEmptyParts) {
  Error error(ENODEV, "no RDMA device found");
  EXPECT_EQ(std::string(error.what()).find(" on "), std::string::npos);
  EXPECT_EQ(std::string(error.what()).find(" ("), std::string::npos);
}

TEST(Error, IsASystemError) {
  try {
    throw Error(EINVAL, "parsing");
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), EINVAL);
    return;
  }
  FAIL() << "rxio::Error was not caught as std::system_error";
}

TEST(FormatBytes, UsesTheLargestExactUnit) {
  EXPECT_EQ(format_bytes(0), "0 bytes");
  EXPECT_EQ(format_bytes(1000), "1000 bytes");
  EXPECT_EQ(format_bytes(64 * 1024), "64 KiB");
  EXPECT_EQ(format_bytes(8ull << 20), "8 MiB");
  EXPECT_EQ(format_bytes(3ull << 30), "3 GiB");
  EXPECT_EQ(format_bytes((1ull << 20) + 1), "1048577 bytes");
}

TEST(MemlockFix, ExplainsAFiniteLimit) {
  std::string fix = memlock_fix_for_limit(ENOMEM, 1 << 20, 64 * 1024);
  EXPECT_THAT(fix, HasSubstr("locked-memory limit is 64 KiB"));
  EXPECT_THAT(fix, HasSubstr("1 MiB were to be pinned"));
  EXPECT_THAT(fix, HasSubstr("ulimit -l unlimited"));
  EXPECT_THAT(fix, HasSubstr("/etc/security/limits.conf"));
  EXPECT_THAT(memlock_fix_for_limit(EPERM, 0, 0), HasSubstr("ulimit -l"));
}

TEST(MemlockFix, SilentWhenTheLimitCannotBeTheCause) {
  EXPECT_EQ(memlock_fix_for_limit(ENOMEM, 1 << 20, RLIM_INFINITY), "");
  EXPECT_EQ(memlock_fix_for_limit(EINVAL, 1 << 20, 64 * 1024), "");
  EXPECT_EQ(memlock_fix_for_limit(EFAULT, 1 << 20, 64 * 1024), "");
}

TEST(MemlockFix, ReadsTheProcessLimit) {
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_MEMLOCK, &saved), 0);
  rlimit small = saved;
  small.rlim_cur = 64 * 1024;
  if (saved.rlim_max != RLIM_INFINITY && saved.rlim_max < small.rlim_cur) small.rlim_cur = saved.rlim_max;
  ASSERT_EQ(setrlimit(RLIMIT_MEMLOCK, &small), 0);
  std::string fix = memlock_fix(ENOMEM, 1 << 20);
  ASSERT_EQ(setrlimit(RLIMIT_MEMLOCK, &saved), 0);
  EXPECT_THAT(fix, HasSubstr("ulimit -l"));
}

}  // namespace
}  // namespace rxio
