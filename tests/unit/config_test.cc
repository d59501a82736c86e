#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>

#include "base/config.h"
#include "base/error.h"

namespace rxio::config {
namespace {

TEST(Config, EveryKnobIsDocumentedAndSorted) {
  const auto& all = knobs();
  ASSERT_FALSE(all.empty());
  EXPECT_TRUE(std::is_sorted(all.begin(), all.end(), [](const Knob& a, const Knob& b) { return a.name < b.name; }));
  for (const auto& knob : all) {
    EXPECT_EQ(knob.name.substr(0, 5), "RXIO_");
    EXPECT_FALSE(knob.description.empty()) << knob.name;
    EXPECT_FALSE(knob.default_text.empty()) << knob.name;
  }
}

TEST(Config, ParsesCountsAndSizes) {
  uint64_t v = 0;
  EXPECT_TRUE(parse_count("16", v));
  EXPECT_EQ(v, 16u);
  EXPECT_FALSE(parse_count("", v));
  EXPECT_FALSE(parse_count("-1", v));
  EXPECT_FALSE(parse_count("12x", v));
  EXPECT_TRUE(parse_bytes("8K", v));
  EXPECT_EQ(v, 8192u);
  EXPECT_TRUE(parse_bytes("1MiB", v));
  EXPECT_EQ(v, 1u << 20);
  EXPECT_TRUE(parse_bytes("4096", v));
  EXPECT_EQ(v, 4096u);
  EXPECT_FALSE(parse_bytes("8 K", v));
  EXPECT_FALSE(parse_bytes("K", v));
  EXPECT_FALSE(parse_bytes("99999999999999999999G", v));
}

TEST(Config, EnvironmentOverridesDefaultAndBadValuesAreErrors) {
  unsetenv("RXIO_RING_SLOTS");
  EXPECT_EQ(setting("RXIO_RING_SLOTS").source, "default");
  EXPECT_EQ(get_count("RXIO_RING_SLOTS"), 16u);
  setenv("RXIO_RING_SLOTS", "64", 1);
  EXPECT_EQ(get_count("RXIO_RING_SLOTS"), 64u);
  EXPECT_EQ(setting("RXIO_RING_SLOTS").source, "environment");
  setenv("RXIO_RING_SLOTS", "lots", 1);
  try {
    get_count("RXIO_RING_SLOTS");
    ADD_FAILURE() << "a bad value became a number";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("RXIO_RING_SLOTS='lots'"), std::string::npos) << e.what();
  }
  unsetenv("RXIO_RING_SLOTS");
  EXPECT_THROW(get_count("RXIO_NO_SUCH_KNOB"), Error);
}

}  // namespace
}  // namespace rxio::config
