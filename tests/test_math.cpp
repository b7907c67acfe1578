// test_math.cpp: the per-element math shared by the CPU path and the GPU
// kernels: conversions against IEEE decodings, the lerp's formula, the
// guard, and the stochastic rounding's unbiasedness.
#include "test_util.h"

#include <cfloat>
#include <set>

using namespace polyak_test;

namespace {

// The value of a binary floating-point bit pattern with `exp_bits` exponent
// and `man_bits` mantissa bits, decoded by the IEEE definition.
double ieee_decode(uint32_t bits, int exp_bits, int man_bits)
{
  uint32_t man = bits & ((1u << man_bits) - 1);
  uint32_t exp = (bits >> man_bits) & ((1u << exp_bits) - 1);
  int sign = (bits >> (man_bits + exp_bits)) & 1;
  int bias = (1 << (exp_bits - 1)) - 1;
  double value;
  if (exp == (1u << exp_bits) - 1)
    value = man ? NAN : INFINITY;
  else if (exp == 0)
    value = std::ldexp((double)man, 1 - bias - man_bits);
  else
    value = std::ldexp((double)(man | (1u << man_bits)), (int)exp - bias - man_bits);
  return sign ? -value : value;
}

double bf16_value(uint32_t h)
{
  return ieee_decode(h, 8, 7);
}
double f16_value(uint32_t h)
{
  return ieee_decode(h, 5, 10);
}

// Round-to-nearest-even by brute force: the nearest of the two neighbours
// on the grid of a 16-bit format, the one with an even pattern on a tie.
// One past the largest finite pattern decodes as Inf and counts as 2^emax+1.
template <typename Decode> uint16_t nearest_even(float x, Decode decode, uint32_t inf_pattern, double beyond_max)
{
  double target = std::fabs((double)x);
  uint32_t lo = 0, hi = inf_pattern; // largest pattern with value <= target
  while (lo + 1 < hi) {
    uint32_t mid = (lo + hi) / 2;
    if (decode(mid) <= target)
      lo = mid;
    else
      hi = mid;
  }
  uint32_t result = lo;
  if (lo + 1 <= inf_pattern) {
    double up = lo + 1 == inf_pattern ? beyond_max : decode(lo + 1);
    double d_lo = target - decode(lo), d_hi = up - target;
    if (d_hi < d_lo || (d_hi == d_lo && (lo & 1)))
      result = lo + 1;
  }
  return (uint16_t)(result | (std::signbit(x) ? 0x8000u : 0u));
}

uint16_t f16_reference(float x)
{
  return nearest_even(x, f16_value, 0x7C00, 65536.0);
}
uint16_t bf16_reference(float x)
{
  return nearest_even(x, bf16_value, 0x7F80, std::ldexp(1.0, 128));
}

// A strided sweep over all f32 bit patterns (a prime stride, so every
// mantissa phase is hit).
std::vector<uint32_t> sweep_patterns()
{
  std::vector<uint32_t> patterns;
  for (uint64_t b = 0; b < (1ull << 32); b += 65521)
    patterns.push_back((uint32_t)b);
  return patterns;
}

TEST(Math, Bf16WideningIsExactForEveryPattern)
{
  for (uint32_t h = 0; h < 65536; h++) {
    double expected = bf16_value(h);
    float got = polyak_bf16_to_f32((uint16_t)h);
    if (std::isnan(expected))
      EXPECT_TRUE(std::isnan(got)) << h;
    else
      ASSERT_EQ((double)got, expected) << std::hex << h;
  }
}

TEST(Math, F16WideningIsExactForEveryPattern)
{
  for (uint32_t h = 0; h < 65536; h++) {
    double expected = f16_value(h);
    float got = polyak_f16_to_f32((uint16_t)h);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << h;
    } else {
      ASSERT_EQ((double)got, expected) << std::hex << h;
      ASSERT_EQ(std::signbit(got), (h & 0x8000) != 0) << std::hex << h;
    }
  }
}

TEST(Math, F32ToBf16RoundsToNearestEven)
{
  std::vector<float> inputs;
  for (uint32_t b : sweep_patterns())
    inputs.push_back(polyak_f32_from_bits(b));
  for (uint32_t h = 0; h < 0x7F80; h += 3) { // grid points, midpoints, neighbours
    uint32_t mid = (h << 16) | 0x8000;
    for (uint32_t b : {h << 16, mid - 1, mid, mid + 1})
      inputs.push_back(polyak_f32_from_bits(b));
  }
  for (float x : inputs) {
    if (std::isnan(x))
      continue;
    ASSERT_EQ(polyak_f32_to_bf16_rne(x), bf16_reference(x)) << std::hex << polyak_f32_bits(x) << " " << x;
  }
}

TEST(Math, F32ToF16RoundsToNearestEven)
{
  std::vector<float> inputs;
  for (uint32_t b : sweep_patterns())
    inputs.push_back(polyak_f32_from_bits(b));
  for (uint32_t h = 0; h < 0x7C00; h++) { // every grid point and midpoint
    float lo = (float)f16_value(h);
    double mid = (f16_value(h) + (h + 1 == 0x7C00 ? 65536.0 : f16_value(h + 1))) / 2;
    float midf = (float)mid; // exact: midpoints of f16 fit in f32
    for (float x : {lo, midf, std::nextafter(midf, 0.0f), std::nextafter(midf, INFINITY)})
      inputs.push_back(x);
  }
  for (float x : inputs) {
    if (std::isnan(x))
      continue;
    ASSERT_EQ(polyak_f32_to_f16_rne(x), f16_reference(x)) << std::hex << polyak_f32_bits(x) << " " << x;
    ASSERT_EQ(polyak_f32_to_f16_rne(-x), f16_reference(-x)) << std::hex << polyak_f32_bits(-x);
  }
}

TEST(Math, NarrowingKeepsNaNAndInf)
{
  for (float nan : {NAN, -NAN, polyak_f32_from_bits(0x7F800001u), polyak_f32_from_bits(0xFF800001u)}) {
    EXPECT_TRUE(std::isnan(polyak_bf16_to_f32(polyak_f32_to_bf16_rne(nan))));
    EXPECT_TRUE(std::isnan(polyak_f16_to_f32(polyak_f32_to_f16_rne(nan))));
    EXPECT_TRUE(std::isnan(polyak_bf16_to_f32(polyak_f32_to_bf16_sr(nan, 0xFFFF))));
  }
  EXPECT_EQ(polyak_f32_to_bf16_rne(INFINITY), 0x7F80);
  EXPECT_EQ(polyak_f32_to_bf16_sr(-INFINITY, 0xFFFF), 0xFF80);
  EXPECT_EQ(polyak_f32_to_f16_rne(-INFINITY), 0xFC00);
  EXPECT_EQ(polyak_f32_to_f16_rne(65504.0f), 0x7BFF);
  EXPECT_EQ(polyak_f32_to_f16_rne(65520.0f), 0x7C00); // tie goes to even: Inf
}

TEST(Math, IsFiniteTestsTheExponentBits)
{
  EXPECT_TRUE(polyak_is_finite(0.0f));
  EXPECT_TRUE(polyak_is_finite(-FLT_MAX));
  EXPECT_TRUE(polyak_is_finite(FLT_TRUE_MIN));
  EXPECT_FALSE(polyak_is_finite(NAN));
  EXPECT_FALSE(polyak_is_finite(INFINITY));
  EXPECT_FALSE(polyak_is_finite(-INFINITY));
}

TEST(Math, LerpIsOneFmaOfTheDifference)
{
  std::mt19937_64 rng(11);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::uniform_real_distribution<float> weight(0.0f, 0.999f);
  for (int i = 0; i < 100000; i++) {
    float s = dist(rng), p = dist(rng), w = weight(rng);
    ASSERT_EQ(polyak_f32_bits(polyak_lerp(s, p, w)), polyak_f32_bits(std::fma(w, p - s, s)));
  }
}

TEST(Math, LerpCopiesExactlyAtWeightOneAndKeepsAtZero)
{
  // 1e30 + (1 - 1e30) loses the 1; the copy must not
  EXPECT_EQ(polyak_lerp(1e30f, 1.0f, 1.0f), 1.0f);
  EXPECT_EQ(polyak_lerp(-3.5f, 1e-30f, 1.0f), 1e-30f);
  EXPECT_EQ(polyak_lerp(1e30f, 1.0f, 0.0f), 1e30f);
  EXPECT_EQ(polyak_lerp(0.7f, 0.7f, 0.3f), 0.7f);
}

TEST(Math, StochasticRoundingPicksANeighbourWithTheRightOdds)
{
  // x sits 30% of the way from 1 to the next bf16 (1 + 2^-7)
  float x = 1.0f + 0.3f * 0.0078125f;
  uint64_t key = polyak_sr_key(42, 1000, 3);
  const int draws = 1 << 20;
  int ups = 0;
  for (int64_t e = 0; e < draws; e++) {
    uint16_t r = polyak_f32_to_bf16_sr(x, polyak_sr_bits(key, e));
    ASSERT_TRUE(r == 0x3F80 || r == 0x3F81) << std::hex << r;
    ups += r == 0x3F81;
  }
  double fraction = (double)ups / draws;
  double exact = (x - 1.0) / 0.0078125;
  EXPECT_NEAR(fraction, exact, 5 * std::sqrt(exact * (1 - exact) / draws));
  // values on the grid never move
  for (int64_t e = 0; e < 1000; e++)
    EXPECT_EQ(polyak_f32_to_bf16_sr(1.5f, polyak_sr_bits(key, e)), 0x3FC0);
}

TEST(Math, F16StochasticRoundingPicksANeighbourWithExactOdds)
{
  // over every value of the random bits it uses, x rounds up in exactly the
  // fraction (x - lower neighbour) / (gap); the bits above never matter
  std::mt19937_64 rng(13);
  std::uniform_int_distribution<uint32_t> any;
  auto neighbour_below = [](double v) { // the largest f16 code with value <= v
    uint32_t lo = 0, hi = 0x7C00;
    while (lo + 1 < hi) {
      uint32_t mid = (lo + hi) / 2;
      (f16_value(mid) <= v ? lo : hi) = mid;
    }
    return lo;
  };
  std::vector<float> inputs = {1.0f + 0x1p-12f,     3.14159f,        65500.0f,        65519.0f,
                               0x1p-14f + 0x1p-20f, 0x1p-15f * 1.3f, 0x1p-18f * 1.7f, 0x1p-20f * 1.01f};
  std::uniform_real_distribution<float> normal_range(6.2e-5f, 6.5e4f);
  for (int n = 0; n < 200; n++)
    inputs.push_back(normal_range(rng));
  for (float x : inputs) {
    uint32_t exponent = polyak_f32_bits(x) >> 23;
    int bits = exponent >= 113 ? 13 : 126 - (int)exponent; // the random bits it uses
    uint32_t below = neighbour_below(x);
    double lower = f16_value(below), upper = below + 1 == 0x7C00 ? 65536.0 : f16_value(below + 1);
    uint64_t ups = 0;
    for (uint32_t r = 0; r < (1u << bits); r++) {
      uint32_t random = r | (any(rng) << bits); // bits above the used ones
      uint16_t got = polyak_f32_to_f16_sr(x, random);
      ASSERT_TRUE(got == below || got == below + 1) << x << " " << std::hex << got;
      ASSERT_EQ(polyak_f32_to_f16_sr(-x, random), got | 0x8000) << "sign symmetric";
      ups += got == below + 1;
    }
    EXPECT_EQ((double)ups / (double)(1u << bits), (x - lower) / (upper - lower)) << x;
  }
  for (uint32_t h = 0; h < 0x7C00; h++) // grid values never move
    ASSERT_EQ(polyak_f32_to_f16_sr((float)f16_value(h), any(rng)), h) << std::hex << h;
  EXPECT_EQ(polyak_f32_to_f16_sr(70000.0f, 0), 0x7C00);
  EXPECT_EQ(polyak_f32_to_f16_sr(-INFINITY, 123), 0xFC00);
  EXPECT_TRUE(std::isnan(polyak_f16_to_f32(polyak_f32_to_f16_sr(NAN, 99))));
  EXPECT_EQ(polyak_f32_to_f16_sr(0x1p-40f, 0xFFFFFFFFu), 0) << "below 2^-33: zero";
}

TEST(Math, F32StochasticRoundingPicksANeighbourWithExactOdds)
{
  // the result is the upper neighbour (in magnitude) exactly when the low 29
  // random bits reach a threshold, so over all 2^29 of them it rounds up in
  // the fraction (|x| - lower) / (upper - lower); the bits above never matter
  std::mt19937_64 rng(17);
  std::uniform_int_distribution<uint32_t> any;
  std::uniform_real_distribution<double> mantissa(1.0, 2.0);
  std::vector<double> inputs = {1.0 + 0x1p-30,
                                1.0 + 0x1p-24 + 0x1p-50,
                                2.0 - 0x1p-40,
                                3.14159265358979,
                                0x1p-126 * 1.5 + 0x1p-160,
                                0x1.fffffffffffffp127 / 2,
                                1e-3,
                                12345.678};
  for (int n = 0; n < 300; n++)
    inputs.push_back(std::ldexp(mantissa(rng), (int)(any(rng) % 200) - 100));
  const uint32_t span = 1u << 29;
  for (double magnitude : inputs)
    for (double x : {magnitude, -magnitude}) {
      float below, above;
      f32_neighbours(std::fabs(x), &below, &above);
      double odds = below == above ? 0.0 : (std::fabs(x) - below) / ((double)above - below);
      auto up = [&](uint32_t r) {
        float got = polyak_f64_to_f32_sr(x, r | (any(rng) << 29)); // bits above the 29 used
        EXPECT_TRUE(std::fabs(got) == below || std::fabs(got) == above) << x << " gave " << got;
        EXPECT_EQ(std::signbit(got), std::signbit(x)) << x;
        return std::fabs(got) == above && below != above;
      };
      // the threshold: the first r that rounds up (span if none)
      uint32_t lo = 0, hi = span;
      while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (up(mid))
          hi = mid;
        else
          lo = mid + 1;
      }
      for (int n = 0; n < 20; n++) { // a threshold indeed: down below it, up from it
        uint32_t r = any(rng) % span;
        ASSERT_EQ(up(r), r >= lo) << x << " r " << r;
      }
      EXPECT_EQ((double)(span - lo) / span, odds) << x;
    }
}

TEST(Math, F32StochasticRoundingKeepsF32ValuesAndSpecials)
{
  std::mt19937_64 rng(19);
  std::uniform_int_distribution<uint32_t> any;
  for (uint32_t b : sweep_patterns()) {
    float x = polyak_f32_from_bits(b);
    if (polyak_is_finite(x)) {
      ASSERT_EQ(polyak_f32_bits(polyak_f64_to_f32_sr((double)x, any(rng))), b) << std::hex << b;
    }
  }
  EXPECT_EQ(polyak_f64_to_f32_sr(INFINITY, 0xFFFFFFFFu), INFINITY);
  EXPECT_EQ(polyak_f64_to_f32_sr(-INFINITY, 0x1FFFFFFFu), -INFINITY);
  EXPECT_TRUE(std::isnan(polyak_f64_to_f32_sr(polyak_f64_from_bits(0x7FF0000000000001ull), 0x1FFFFFFFu)))
      << "a NaN whose payload is all in the dropped bits stays NaN";
  EXPECT_EQ(polyak_f32_bits(polyak_f64_to_f32_sr(-0.0, 0x1FFFFFFFu)), 0x80000000u);
  EXPECT_EQ(polyak_f64_to_f32_sr((double)FLT_MAX, 0x1FFFFFFFu), FLT_MAX) << "never past the largest float";
}

TEST(Math, StochasticLerpIsTheDoubleValueRoundedToANeighbour)
{
  std::mt19937_64 rng(23);
  std::normal_distribution<float> dist(1.0f, 0.01f);
  std::uniform_real_distribution<float> weight(0.0f, 1e-3f);
  for (int i = 0; i < 20000; i++) {
    float s = dist(rng), p = dist(rng), w = weight(rng), below, above;
    f32_neighbours((double)s + (double)w * ((double)p - (double)s), &below, &above);
    float got = polyak_lerp_sr(s, p, w, polyak_sr_bits(polyak_sr_key(1, i, 0), 0));
    ASSERT_TRUE(got == below || got == above) << s << " " << p << " " << w;
  }
  // weight 1 copies exactly, weight 0 keeps, and a NaN param passes through
  EXPECT_EQ(polyak_lerp_sr(1e30f, 1.0f, 1.0f, 0x1FFFFFFFu), 1.0f);
  EXPECT_EQ(polyak_lerp_sr(0.1f, 5.0f, 0.0f, 0x1FFFFFFFu), 0.1f);
  EXPECT_TRUE(std::isnan(polyak_lerp_sr(0.1f, NAN, 0.5f, 7)));
}

TEST(Math, StochasticRoundingIsUnbiasedAcrossSteps)
{
  // one element, drawn at 200,000 steps: the mean of the rounded values is x
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> dist(-100.0f, 100.0f);
  for (int trial = 0; trial < 5; trial++) {
    float x = dist(rng);
    double sum = 0.0, ulp = std::fabs(polyak_bf16_to_f32(polyak_f32_to_bf16_rne(x) | 1) -
                                      polyak_bf16_to_f32(polyak_f32_to_bf16_rne(x) & ~1));
    const int steps = 200000;
    for (int64_t step = 1; step <= steps; step++)
      sum += polyak_bf16_to_f32(polyak_f32_to_bf16_sr(x, polyak_sr_bits(polyak_sr_key(9, step, 0), 77)));
    EXPECT_NEAR(sum / steps, x, 5 * 0.5 * ulp / std::sqrt((double)steps)) << x;
  }
}

TEST(Math, HashBitsAreUniformAndDistinct)
{
  uint64_t key = polyak_sr_key(0, 1, 0);
  const int count = 1 << 20;
  std::vector<int> buckets(256, 0);
  std::set<uint32_t> seen;
  for (int64_t e = 0; e < count; e++) {
    uint32_t bits = polyak_sr_bits(key, e);
    buckets[(bits & 0xFFFF) >> 8]++; // the 16 bits rounding uses
    if (e < 65536)
      seen.insert(bits);
  }
  double expected = count / 256.0, chi2 = 0.0;
  for (int b : buckets)
    chi2 += (b - expected) * (b - expected) / expected;
  EXPECT_LT(chi2, 350.0);         // 255 degrees of freedom; p < 1e-4 beyond
  EXPECT_EQ(seen.size(), 65536u); // a bijection in the element index
}

TEST(Math, HashDependsOnSeedStepShadowAndElement)
{
  uint32_t base = polyak_sr_bits(polyak_sr_key(1, 2, 3), 4);
  EXPECT_EQ(base, polyak_sr_bits(polyak_sr_key(1, 2, 3), 4));
  EXPECT_NE(base, polyak_sr_bits(polyak_sr_key(2, 2, 3), 4));
  EXPECT_NE(base, polyak_sr_bits(polyak_sr_key(1, 3, 3), 4));
  EXPECT_NE(base, polyak_sr_bits(polyak_sr_key(1, 2, 4), 4));
  EXPECT_NE(base, polyak_sr_bits(polyak_sr_key(1, 2, 3), 5));
  EXPECT_NE(base, polyak_sr_bits(polyak_sr_key(1, 2, 3), 4 + (int64_t(1) << 32)));
}

TEST(Math, DebiasScalesInDoubleAndRoundsOnce)
{
  float s = 0.1f;
  double scale = 1.0 / (1.0 - std::pow(0.999, 3));
  EXPECT_EQ(polyak_debias(s, scale), (float)((double)s * scale));
  EXPECT_EQ(polyak_f32_bits(polyak_debias(s, 1.0)), polyak_f32_bits(s));
}

} // namespace
