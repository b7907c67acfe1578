// test_schedule_gaps.cpp: the decay of an update after a long gap of steps:
// as accurate as multiplying the betas step by step, at a cost that does not
// grow with the gap.
#include "test_util.h"

#include <chrono>
#include <cinttypes>

using namespace polyak_test;

namespace {

polyak_schedule ramp(polyak_schedule_kind kind, double beta, double beta_min, int64_t ramp_steps = 1000)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  polyak_schedule s = cfg.shadows[0].schedule;
  s.kind = kind;
  s.beta = beta;
  s.beta_min = beta_min;
  s.ramp_steps = ramp_steps;
  return s;
}

polyak_schedule warmup(double beta, double power, double inv_gamma, double beta_min = 0.0)
{
  polyak_schedule s = ramp(POLYAK_SCHEDULE_WARMUP, beta, beta_min);
  s.power = power;
  s.inv_gamma = inv_gamma;
  return s;
}

// Floats of one sign are ordered as their bits.
int64_t float_ulps(float a, float b)
{
  int32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return std::llabs((int64_t)x - (int64_t)y);
}

struct Gap {
  const char *label;
  polyak_schedule s;
  int64_t last, step;
};

// Gaps longer than the 4096 steps multiplied one by one, in each part of
// each ramping kind (floor, ramp, ceiling, across their edges), with decays
// from near 1 to underflow.
std::vector<Gap> long_gaps()
{
  const polyak_schedule timm = warmup(0.9999, 2.0 / 3.0, 1.0);                // at its ceiling from t = 1e6
  const polyak_schedule harmonic = warmup(1 - 1e-7, 1.0, 1.0);                // B ~ t0 / t1; ceiling at t = 1e7
  const polyak_schedule floored = warmup(0.99999, 2.0 / 3.0, 1.0, 0.99);      // floor up to t = 999
  const polyak_schedule high_floor = warmup(0.99999, 2.0 / 3.0, 1.0, 0.9999); // floor up to t = 1e6
  const polyak_schedule slow = warmup(0.99999, 0.75, 1000.0);
  const polyak_schedule near_one = warmup(1.0, 2.0, 1.0); // 1 - B ~ 1e-4
  polyak_schedule shifted = timm;
  shifted.start_step = 7;
  const polyak_schedule linear = ramp(POLYAK_SCHEDULE_LINEAR, 0.9999999, 0.9999, 10000000);
  const polyak_schedule linear_fast = ramp(POLYAK_SCHEDULE_LINEAR, 0.99999, 0.999, 500000);
  const polyak_schedule linear_from_0 = ramp(POLYAK_SCHEDULE_LINEAR, 0.999, 0.0, 10000);
  const polyak_schedule linear_near_one = ramp(POLYAK_SCHEDULE_LINEAR, 1.0, 1 - 1e-9, 100000000); // 1 - B ~ 1e-3
  const polyak_schedule cosine_near_one = ramp(POLYAK_SCHEDULE_COSINE, 1.0, 1 - 1e-9, 100000000);
  const polyak_schedule cosine = ramp(POLYAK_SCHEDULE_COSINE, 0.9999999, 0.9999, 10000000);
  const polyak_schedule cosine_fast = ramp(POLYAK_SCHEDULE_COSINE, 0.99999, 0.999, 500000);
  return {
      {"warmup timm from t = 0", timm, 0, 5000},
      {"warmup timm from t = 1", timm, 1, 5001},
      {"warmup timm early", timm, 100, 20000},
      {"warmup timm mid", timm, 100000, 105000},
      {"warmup timm to the ceiling", timm, 990000, 1010000},
      {"warmup timm start_step", shifted, 3000, 12000},
      {"warmup harmonic", harmonic, 1000000, 2000000},
      {"warmup harmonic from 10", harmonic, 10, 1000010},
      {"warmup harmonic to the ceiling", harmonic, 9000000, 11000000},
      {"warmup floor to ramp", floored, 1, 6000},
      {"warmup in the floor", high_floor, 10, 10010},
      {"warmup high floor to ramp", high_floor, 990000, 1010000},
      {"warmup slow", slow, 1, 9000},
      {"warmup near 1", near_one, 10000, 1010000},
      {"linear start", linear, 0, 5000},
      {"linear mid", linear, 1000000, 1100000},
      {"linear late", linear, 5000000, 7000000},
      {"linear to the ceiling", linear, 9950000, 10050000},
      {"linear fast to the ceiling", linear_fast, 400000, 520000},
      {"linear from 0, underflow", linear_from_0, 1, 8000},
      {"linear near 1", linear_near_one, 1000000, 2000000},
      {"cosine start", cosine, 0, 5000},
      {"cosine mid", cosine, 1000000, 1100000},
      {"cosine late", cosine, 8000000, 9000000},
      {"cosine to the ceiling", cosine, 9950000, 10050000},
      {"cosine fast to the ceiling", cosine_fast, 400000, 520000},
      {"cosine near 1", cosine_near_one, 1000000, 2000000},
  };
}

// 1 - B for each gap is within one float ulp of the step-by-step product's
// (oracle_beta in double, multiplied in order, as updates of gaps up to 4096
// steps still are), and within one of a long double product's.
TEST(ScheduleGaps, LongGapWeightsAreWithinOneFloatUlpOfTheStepByStepProduct)
{
  int64_t worst = 0, worst_long_double = 0;
  const char *worst_label = "every gap";
  for (const Gap &g : long_gaps()) {
    ASSERT_GT(g.step - g.last, 4096) << g.label;
    double by_step = 1.0;
    long double by_step_long = 1.0L;
    for (int64_t s = g.last + 1; s <= g.step; s++) {
      by_step *= oracle_beta(g.s, s);
      by_step_long *= (long double)oracle_beta(g.s, s);
    }
    double product = polyak_beta_product(&g.s, g.last, g.step);
    float w = (float)(1.0 - product), w_by_step = (float)(1.0 - by_step), w_long = (float)(1.0L - by_step_long);
    int64_t ulps = float_ulps(w, w_by_step), ulps_long = float_ulps(w, w_long);
    EXPECT_LE(ulps, 1) << g.label << ": w " << w << ", step by step " << w_by_step << " (B " << product << " vs "
                       << by_step << ")";
    EXPECT_LE(ulps_long, 1) << g.label << ": w " << w << ", long double " << w_long;
    EXPECT_NEAR(product, by_step, 1e-9 * by_step + 1e-300) << g.label;
    if (ulps > worst)
      worst = ulps, worst_label = g.label;
    worst_long_double = std::max(worst_long_double, ulps_long);
  }
  std::printf("largest difference of w = 1 - B from the step-by-step product's: %" PRId64
              " float ulp (%s); from a long double product's: %" PRId64 "\n",
              worst, worst_label, worst_long_double);
}

TEST(ScheduleGaps, GapsUpToTheStepByStepLengthKeepTheirBits)
{
  // the product of every gap of up to 4096 steps is still the loop's, bit
  // for bit: beta by beta, then pow(beta) once at the ceiling
  for (const polyak_schedule &s : {warmup(0.9999, 2.0 / 3.0, 1.0), ramp(POLYAK_SCHEDULE_LINEAR, 0.9999, 0.99, 3000),
                                   ramp(POLYAK_SCHEDULE_COSINE, 0.9999, 0.99, 3000)}) {
    for (int64_t last : {0, 1, 17, 2500}) {
      int64_t step = last + 4096;
      double product = 1.0;
      for (int64_t t = last; t <= step - 1; t++) {
        double beta = polyak_beta_at(&s, t + 1);
        product *= beta;
        if (beta == s.beta) {
          product *= std::pow(s.beta, (double)(step - 1 - t));
          break;
        }
        if (product == 0.0)
          break;
      }
      double got = polyak_beta_product(&s, last, step);
      EXPECT_EQ(std::memcmp(&got, &product, 8), 0) << s.kind << " from " << last << ": " << got << " vs " << product;
    }
  }
}

TEST(ScheduleGaps, ProductsAcrossTheFloorRampAndCeilingCompose)
{
  // B over (a, c] is B over (a, b] times B over (b, c], whichever method
  // each part takes
  std::mt19937_64 rng(31);
  for (const polyak_schedule &s : {warmup(0.99999, 0.75, 10.0, 0.9), ramp(POLYAK_SCHEDULE_LINEAR, 1.0, 0.9999, 200000),
                                   ramp(POLYAK_SCHEDULE_COSINE, 0.999999, 0.9999, 200000)}) {
    for (int trial = 0; trial < 20; trial++) {
      int64_t a = std::uniform_int_distribution<int64_t>(1, 100000)(rng);
      int64_t b = a + std::uniform_int_distribution<int64_t>(5000, 100000)(rng);
      int64_t c = b + std::uniform_int_distribution<int64_t>(5000, 100000)(rng);
      double whole = polyak_beta_product(&s, a, c),
             parts = polyak_beta_product(&s, a, b) * polyak_beta_product(&s, b, c);
      EXPECT_NEAR(whole, parts, 1e-12 + 1e-10 * parts) << s.kind << " (" << a << ", " << b << ", " << c << "]";
    }
  }
}

TEST(ScheduleGaps, AProductThatUnderflowsIsZero)
{
  polyak_schedule s = ramp(POLYAK_SCHEDULE_LINEAR, 0.999, 0.5, 100000000);
  EXPECT_EQ(polyak_beta_product(&s, 1, 100000), 0.0);
  s = warmup(0.99, 0.05, 1.0); // beta ~ 0.1 .. 0.6 for a long time
  EXPECT_EQ(polyak_beta_product(&s, 1, (int64_t)1 << 40), 0.0);
}

// A handle of one tensor whose only shadow follows `s`: the time of one
// update after a gap, in seconds.
double update_seconds(const polyak_schedule &s, int64_t gap)
{
  polyak_config cfg = cpu_config(1);
  cfg.shadows[0].schedule = s;
  Handle h = make_handle(cfg);
  std::vector<float> param(8, 0.5f);
  int64_t shape[1] = {8};
  EXPECT_EQ(polyak_add(h.get(), "w", param.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_update(h.get(), 2, nullptr), POLYAK_OK);
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(polyak_update(h.get(), 2 + gap, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The update's cost whatever the gap, for every kind, printed as a table;
// WARMUP, LINEAR and COSINE set so that every gap stays below the ceiling
// with a product that does not underflow (their slowest case step by step:
// 1e9 steps took 2.4 s, 1e12 would take about 40 minutes).
TEST(ScheduleGaps, AnUpdatesCostIsBoundedWhateverTheGap)
{
  polyak_schedule constant = ramp(POLYAK_SCHEDULE_CONSTANT, 0.999, 0.0), tf = ramp(POLYAK_SCHEDULE_TF, 0.9999, 0.0);
  polyak_schedule equal = ramp(POLYAK_SCHEDULE_EQUAL, 0.999, 0.0), power = ramp(POLYAK_SCHEDULE_POWER, 0.999, 0.0);
  power.gamma = 6.94;
  const std::pair<const char *, polyak_schedule> kinds[] = {
      {"CONSTANT 0.999", constant},
      {"TF 0.9999", tf},
      {"WARMUP beta 1, power 1", warmup(1.0, 1.0, 1.0)},
      {"LINEAR 1-1e-10 .. 1, ramp 1e13", ramp(POLYAK_SCHEDULE_LINEAR, 1.0, 1 - 1e-10, 10000000000000)},
      {"COSINE 1-1e-10 .. 1, ramp 1e13", ramp(POLYAK_SCHEDULE_COSINE, 1.0, 1 - 1e-10, 10000000000000)},
      {"EQUAL", equal},
      {"POWER gamma 6.94", power},
  };
  const int64_t gaps[] = {1, 1000, 1000000, 1000000000, 1000000000000};
  std::printf("%-32s %12s %12s %12s %12s %12s\n", "update time (us) at gap", "1", "1e3", "1e6", "1e9", "1e12");
  double slowest = 0.0;
  for (const auto &[label, s] : kinds) {
    std::printf("%-32s", label);
    for (int64_t gap : gaps) {
      double seconds = update_seconds(s, gap);
      for (int repeat = 0; repeat < 2; repeat++) // the best of three: a shared machine's noise
        seconds = std::min(seconds, update_seconds(s, gap));
      std::printf(" %12.1f", 1e6 * seconds);
      slowest = std::max(slowest, seconds);
      EXPECT_LT(seconds, 0.05) << label << " at a gap of " << gap;
    }
    std::printf("\n");
  }
  std::printf("slowest update: %.1f us\n", 1e6 * slowest);
}

} // namespace
