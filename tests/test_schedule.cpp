// test_schedule.cpp: every schedule against its closed form and published
// values; gap products; beta/half-life/window and EDM2 sigma_rel helpers.
#include "test_util.h"

#include <chrono>

using namespace polyak_test;

namespace {

polyak_schedule schedule(polyak_schedule_kind kind)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  polyak_schedule s = cfg.shadows[0].schedule;
  s.kind = kind;
  return s;
}

// step of the first update after start_step (t = 0)
constexpr int64_t kFirst = 1;

TEST(Schedule, ConstantIsBetaFromTheFirstStep)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_CONSTANT);
  s.beta = 0.9;
  for (int64_t step : {1, 2, 17, 1000000})
    EXPECT_EQ(polyak_beta_at(&s, step), 0.9);
}

TEST(Schedule, StartStepCopiesThenCountsTFromZero)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_EQUAL);
  s.start_step = 5;
  for (int64_t step = 0; step <= 5; step++)
    EXPECT_EQ(polyak_beta_at(&s, step), 0.0) << step;
  EXPECT_EQ(polyak_beta_at(&s, 6), 0.0);       // t = 0
  EXPECT_EQ(polyak_beta_at(&s, 7), 1.0 / 2.0); // t = 1
  EXPECT_EQ(polyak_beta_at(&s, 9), 3.0 / 4.0); // t = 3
}

TEST(Schedule, TfFollowsTensorFlowsNumUpdatesRule)
{
  // tf.train.ExponentialMovingAverage: min(decay, (1 + n) / (10 + n))
  polyak_schedule s = schedule(POLYAK_SCHEDULE_TF);
  s.beta = 0.999;
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst), 0.1);          // n = 0
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 90), 0.91);    // n = 90
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 990), 0.991);  // n = 990
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 8990), 0.999); // capped from n = 8990
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 100000), 0.999);
}

TEST(Schedule, WarmupMatchesTimmAndDiffusersPublishedValues)
{
  // diffusers EMAModel docs: inv_gamma 1, power 2/3 reaches 0.999 at about
  // 31.6K steps and 0.9999 at 1M; power 3/4 reaches 0.999 at 10K, 0.9999 at 215.4K.
  polyak_schedule s = schedule(POLYAK_SCHEDULE_WARMUP);
  s.beta = 0.9999;
  s.inv_gamma = 1.0;
  s.power = 2.0 / 3.0;
  EXPECT_EQ(polyak_beta_at(&s, kFirst), 0.0); // t = 0
  EXPECT_NEAR(polyak_beta_at(&s, kFirst + 31622), 0.999, 1e-7);
  EXPECT_NEAR(polyak_beta_at(&s, kFirst + 999999), 0.9999, 1e-9);
  EXPECT_EQ(polyak_beta_at(&s, kFirst + 5000000), 0.9999); // clamped at beta
  s.power = 3.0 / 4.0;
  EXPECT_NEAR(polyak_beta_at(&s, kFirst + 9999), 0.999, 1e-7);
  EXPECT_NEAR(polyak_beta_at(&s, kFirst + 215443), 0.9999, 1e-8);
  // timm ModelEmaV3 with its default power 2/3 at t = 10: 1 - 11^(-2/3)
  s.power = 2.0 / 3.0;
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 10), 1 - std::pow(11.0, -2.0 / 3.0));
}

TEST(Schedule, WarmupIsClampedBelowByBetaMin)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_WARMUP);
  s.beta = 0.9999;
  s.beta_min = 0.5;
  EXPECT_EQ(polyak_beta_at(&s, kFirst), 0.0);     // t == 0 copies whatever beta_min says
  EXPECT_EQ(polyak_beta_at(&s, kFirst + 1), 0.5); // 1 - 2^(-2/3) = 0.37 < 0.5
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 100), 1 - std::pow(101.0, -2.0 / 3.0));
}

TEST(Schedule, LinearRampsFromBetaMinToBeta)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_LINEAR);
  s.beta = 0.99;
  s.beta_min = 0.5;
  s.ramp_steps = 100;
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst), 0.5);
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 50), 0.5 + 0.5 * 0.49);
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 100), 0.99);
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 1000), 0.99);
}

TEST(Schedule, CosineRisesMonotonicallyFromBetaMinToBeta)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_COSINE);
  s.beta = 0.999;
  s.beta_min = 0.9;
  s.ramp_steps = 1000;
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst), 0.9);
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 500), (0.9 + 0.999) / 2);
  EXPECT_DOUBLE_EQ(polyak_beta_at(&s, kFirst + 250), 0.999 - 0.099 * (1 + std::sqrt(0.5)) / 2);
  EXPECT_EQ(polyak_beta_at(&s, kFirst + 1000), 0.999);
  EXPECT_EQ(polyak_beta_at(&s, kFirst + 5000), 0.999);
  for (int64_t t = 1; t <= 1000; t++)
    EXPECT_GE(polyak_beta_at(&s, kFirst + t), polyak_beta_at(&s, kFirst + t - 1)) << t;
}

TEST(Schedule, EqualIsTheRunningMeanWeight)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_EQUAL);
  // folding the n-th sample into a mean of n-1 keeps (n-1)/n of it
  for (int64_t n = 1; n <= 50; n++)
    EXPECT_DOUBLE_EQ(polyak_beta_at(&s, n), (double)(n - 1) / n);
}

TEST(Schedule, PowerMatchesEdm2AndReducesToEqualAtGammaZero)
{
  polyak_schedule power = schedule(POLYAK_SCHEDULE_POWER);
  polyak_schedule equal = schedule(POLYAK_SCHEDULE_EQUAL);
  power.gamma = 6.94;
  // EDM2 power_function_beta(std, t) = (1 - 1/t)^(gamma + 1) with t counted from 1
  for (int64_t n : {2, 3, 10, 1000, 123457})
    EXPECT_NEAR(polyak_beta_at(&power, n), std::pow(1 - 1.0 / n, 7.94), 1e-15) << n;
  power.gamma = 0.0;
  for (int64_t n = 1; n <= 100; n++)
    EXPECT_DOUBLE_EQ(polyak_beta_at(&power, n), polyak_beta_at(&equal, n));
}

TEST(Schedule, EveryKindMatchesTheOracleTable)
{
  for (int kind = POLYAK_SCHEDULE_CONSTANT; kind <= POLYAK_SCHEDULE_POWER; kind++) {
    polyak_schedule s = schedule((polyak_schedule_kind)kind);
    s.beta = 0.995;
    s.beta_min = 0.6;
    s.ramp_steps = 37;
    s.start_step = 3;
    s.gamma = 2.5;
    s.inv_gamma = 2.0;
    s.power = 0.8;
    for (int64_t step = 0; step < 200; step++)
      EXPECT_NEAR(polyak_beta_at(&s, step), oracle_beta(s, step), 1e-15) << "kind " << kind << " step " << step;
  }
}

TEST(Schedule, GapProductEqualsStepByStepProduct)
{
  std::mt19937_64 rng(7);
  for (int kind = POLYAK_SCHEDULE_CONSTANT; kind <= POLYAK_SCHEDULE_POWER; kind++) {
    polyak_schedule s = schedule((polyak_schedule_kind)kind);
    s.beta = 0.999;
    s.beta_min = 0.9;
    s.ramp_steps = 300;
    s.start_step = 4;
    s.gamma = 3.0;
    s.inv_gamma = 10.0;
    for (int trial = 0; trial < 50; trial++) {
      int64_t last = std::uniform_int_distribution<int64_t>(0, 400)(rng);
      int64_t step = last + std::uniform_int_distribution<int64_t>(0, 600)(rng);
      double expected = 1.0;
      for (int64_t t = last + 1; t <= step; t++)
        expected *= oracle_beta(s, t);
      EXPECT_NEAR(polyak_beta_product(&s, last, step), expected, 1e-12 * (1 + expected))
          << "kind " << kind << " gap (" << last << ", " << step << "]";
    }
  }
}

TEST(Schedule, GapProductOfHugeGapsIsImmediate)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_CONSTANT);
  s.beta = 0.9999999;
  EXPECT_NEAR(polyak_beta_product(&s, 1, 1 + 10000000), std::pow(0.9999999, 1e7), 1e-12);
  s = schedule(POLYAK_SCHEDULE_EQUAL);
  EXPECT_DOUBLE_EQ(polyak_beta_product(&s, 1000, (int64_t)1 << 50), 1000.0 / (double)((int64_t)1 << 50));
  s = schedule(POLYAK_SCHEDULE_TF);
  s.beta = 0.99;
  double expected = 1.0;
  for (int64_t t = 5; t < 200000; t++)
    expected *= std::min(0.99, (1.0 + t) / (10.0 + t));
  EXPECT_NEAR(polyak_beta_product(&s, 5, 200000), expected, 1e-12);
  // WARMUP with power 3 reaches beta = 1 - 1e-9 at t ~ 1000; a gap of 1e9
  // steps beyond must cost one pow(), not 1e9 terms
  s = schedule(POLYAK_SCHEDULE_WARMUP);
  s.beta = 1 - 1e-9;
  s.power = 3.0;
  double head = polyak_beta_product(&s, 100, 5000);
  auto start = std::chrono::steady_clock::now();
  double whole = polyak_beta_product(&s, 100, 5000 + 1000000000);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_NEAR(whole, head * std::pow(1 - 1e-9, 1e9), 1e-9 * head);
  EXPECT_LT(seconds, 0.5);
}

TEST(Schedule, GapProductIsZeroWhenTheGapHoldsACopyStep)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_CONSTANT);
  s.start_step = 10;
  EXPECT_EQ(polyak_beta_product(&s, 3, 50), 0.0);
  EXPECT_EQ(polyak_beta_product(&s, 10, 11), s.beta);
  EXPECT_EQ(polyak_beta_product(&s, 10, 10), 1.0);
  EXPECT_TRUE(std::isnan(polyak_beta_product(&s, 11, 10)));
  EXPECT_TRUE(std::isnan(polyak_beta_product(&s, -1, 10)));
}

TEST(Schedule, InvalidScheduleGivesNaN)
{
  polyak_schedule s = schedule(POLYAK_SCHEDULE_CONSTANT);
  s.beta = 1.5;
  EXPECT_TRUE(std::isnan(polyak_beta_at(&s, 3)));
  EXPECT_TRUE(std::isnan(polyak_beta_product(&s, 1, 3)));
  EXPECT_TRUE(std::isnan(polyak_beta_at(nullptr, 3)));
}

TEST(Schedule, HalfLifeAndWindowConvertBothWays)
{
  EXPECT_DOUBLE_EQ(polyak_half_life_from_beta(0.5), 1.0);
  EXPECT_NEAR(polyak_half_life_from_beta(0.999), 692.80055, 1e-5);
  EXPECT_NEAR(polyak_half_life_from_beta(0.9999), 6931.12523, 1e-5);
  for (double beta : {0.1, 0.9, 0.999, 0.999999}) {
    EXPECT_NEAR(polyak_beta_from_half_life(polyak_half_life_from_beta(beta)), beta, 1e-15);
    EXPECT_NEAR(polyak_beta_from_window(polyak_window_from_beta(beta)), beta, 1e-15);
  }
  EXPECT_NEAR(polyak_window_from_beta(0.999), 1000.0, 1e-9);
  EXPECT_DOUBLE_EQ(polyak_beta_from_window(100.0), 0.99);
  EXPECT_EQ(polyak_window_from_beta(0.0), 1.0);
  for (double bad : {0.0, 1.0, -0.5, (double)NAN})
    EXPECT_TRUE(std::isnan(polyak_half_life_from_beta(bad))) << bad;
  EXPECT_TRUE(std::isnan(polyak_window_from_beta(1.0)));
  EXPECT_TRUE(std::isnan(polyak_beta_from_window(0.5)));
  EXPECT_TRUE(std::isnan(polyak_beta_from_half_life(0.0)));
  EXPECT_TRUE(std::isnan(polyak_beta_from_half_life(INFINITY)));
}

TEST(Schedule, Edm2SigmaRelMatchesPublishedGammas)
{
  // EDM2 (Karras et al. 2024): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
  EXPECT_NEAR(polyak_gamma_from_sigma_rel(0.05), 16.97, 0.005);
  EXPECT_NEAR(polyak_gamma_from_sigma_rel(0.10), 6.94, 0.005);
  EXPECT_NEAR(polyak_sigma_rel_from_gamma(16.97), 0.05, 1e-5);
  EXPECT_NEAR(polyak_sigma_rel_from_gamma(6.94), 0.10, 1e-4);
  for (double sigma : {0.01, 0.05, 0.1, 0.2, 0.29}) {
    double gamma = polyak_gamma_from_sigma_rel(sigma);
    EXPECT_NEAR(polyak_sigma_rel_from_gamma(gamma), sigma, 1e-13) << sigma;
    // and gamma is a root of the published cubic
    double inv = 1 / (sigma * sigma);
    double cubic = gamma * gamma * gamma + 7 * gamma * gamma + (16 - inv) * gamma + (12 - inv);
    EXPECT_NEAR(cubic, 0.0, 1e-9 * inv * (1 + std::fabs(gamma))) << sigma;
  }
}

TEST(Schedule, Edm2SigmaRelOutsideItsRangeIsNaN)
{
  EXPECT_TRUE(std::isnan(polyak_gamma_from_sigma_rel(0.0)));
  EXPECT_TRUE(std::isnan(polyak_gamma_from_sigma_rel(-0.1)));
  EXPECT_TRUE(std::isnan(polyak_gamma_from_sigma_rel(0.31))); // above the 0.3003 peak
  EXPECT_TRUE(std::isnan(polyak_sigma_rel_from_gamma(-1.0)));
  EXPECT_FALSE(std::isnan(polyak_gamma_from_sigma_rel(0.30)));
}

// ---- create validates every schedule parameter its kind uses -----------------

struct BadSchedule {
  const char *label;
  polyak_schedule_kind kind;
  void (*spoil)(polyak_schedule *);
  const char *message_part;
};

void PrintTo(const BadSchedule &bad, std::ostream *os)
{
  *os << bad.label;
}

class ScheduleValidation : public ::testing::TestWithParam<BadSchedule> {};

TEST_P(ScheduleValidation, CreateRefusesWithAMessage)
{
  const BadSchedule &bad = GetParam();
  polyak_config cfg = cpu_config(3);
  cfg.shadows[2].schedule.kind = bad.kind;
  bad.spoil(&cfg.shadows[2].schedule);
  polyak_t *p = reinterpret_cast<polyak_t *>(0x1);
  EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(p, nullptr);
  char why[512];
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_INVALID_ARG);
  EXPECT_NE(std::string(why).find("shadows[2].schedule"), std::string::npos) << why;
  EXPECT_NE(std::string(why).find(bad.message_part), std::string::npos) << why;
  EXPECT_TRUE(std::isnan(polyak_beta_at(&cfg.shadows[2].schedule, 10)));
}

const BadSchedule kBadSchedules[] = {
    {"BetaAboveOne", POLYAK_SCHEDULE_CONSTANT, [](polyak_schedule *s) { s->beta = 1.0001; }, "beta"},
    {"BetaNegative", POLYAK_SCHEDULE_TF, [](polyak_schedule *s) { s->beta = -0.1; }, "beta"},
    {"BetaNaN", POLYAK_SCHEDULE_CONSTANT, [](polyak_schedule *s) { s->beta = NAN; }, "beta"},
    {"BetaMinAboveBeta", POLYAK_SCHEDULE_LINEAR, [](polyak_schedule *s) { s->beta_min = 0.9995; }, "beta_min"},
    {"BetaMinNegative", POLYAK_SCHEDULE_WARMUP, [](polyak_schedule *s) { s->beta_min = -1e-9; }, "beta_min"},
    {"BetaMinInf", POLYAK_SCHEDULE_COSINE, [](polyak_schedule *s) { s->beta_min = INFINITY; }, "beta_min"},
    {"InvGammaZero", POLYAK_SCHEDULE_WARMUP, [](polyak_schedule *s) { s->inv_gamma = 0.0; }, "inv_gamma"},
    {"InvGammaNaN", POLYAK_SCHEDULE_WARMUP, [](polyak_schedule *s) { s->inv_gamma = NAN; }, "inv_gamma"},
    {"PowerZero", POLYAK_SCHEDULE_WARMUP, [](polyak_schedule *s) { s->power = 0.0; }, "power"},
    {"PowerInf", POLYAK_SCHEDULE_WARMUP, [](polyak_schedule *s) { s->power = INFINITY; }, "power"},
    {"GammaAtMinusOne", POLYAK_SCHEDULE_POWER, [](polyak_schedule *s) { s->gamma = -1.0; }, "gamma"},
    {"GammaNaN", POLYAK_SCHEDULE_POWER, [](polyak_schedule *s) { s->gamma = NAN; }, "gamma"},
    {"RampZeroLinear", POLYAK_SCHEDULE_LINEAR, [](polyak_schedule *s) { s->ramp_steps = 0; }, "ramp_steps"},
    {"RampNegativeCosine", POLYAK_SCHEDULE_COSINE, [](polyak_schedule *s) { s->ramp_steps = -5; }, "ramp_steps"},
    {"StartStepNegative", POLYAK_SCHEDULE_EQUAL, [](polyak_schedule *s) { s->start_step = -1; }, "start_step"},
    {"KindUnknown", POLYAK_SCHEDULE_CONSTANT, [](polyak_schedule *s) { s->kind = (polyak_schedule_kind)7; }, "kind"},
    {"KindNegative", POLYAK_SCHEDULE_CONSTANT, [](polyak_schedule *s) { s->kind = (polyak_schedule_kind)-1; }, "kind"},
};

INSTANTIATE_TEST_SUITE_P(Schedule, ScheduleValidation, ::testing::ValuesIn(kBadSchedules),
                         [](const auto &info) { return std::string(info.param.label); });

TEST(Schedule, FieldsAKindDoesNotUseAreNotChecked)
{
  polyak_config cfg = cpu_config(1);
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[0].schedule.beta = NAN;
  cfg.shadows[0].schedule.ramp_steps = -3;
  cfg.shadows[0].schedule.inv_gamma = 0;
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_OK);
}

} // namespace
