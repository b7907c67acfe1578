// test_update.cpp: the CPU backend's updates against a float64 model of the
// step semantics (tests/test_util.h: Oracle), on random mixed-dtype lists
// with odd sizes.
#include "test_util.h"

#include <chrono>

using namespace polyak_test;

namespace {

const int64_t kOddSizes[] = {0, 1, 3, 4, 65535, 65537, 130001};

std::vector<Tensor> mixed_tensors(const std::vector<int64_t> &sizes, size_t offset_bytes = 0)
{
  std::vector<Tensor> tensors;
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16};
  for (size_t i = 0; i < sizes.size(); i++)
    tensors.emplace_back("layer" + std::to_string(i) + ".weight", dtypes[i % 3], sizes[i], offset_bytes);
  return tensors;
}

void randomize_all(std::vector<Tensor> &tensors, std::mt19937_64 &rng, float mean = 0.5f)
{
  for (auto &t : tensors)
    t.randomize(rng, mean, 1.0f);
}

// Every shadow of every tensor within `tolerance` of the float64 model.
void expect_matches(polyak_t *p, const Oracle &oracle, const std::vector<Tensor> &tensors, double tolerance)
{
  for (int k = 0; k < oracle.cfg.num_shadows; k++)
    for (size_t i = 0; i < tensors.size(); i++) {
      std::vector<float> got = read_shadow(p, k, (int)i, tensors[i].num_elems);
      int64_t bad = 0;
      for (int64_t e = 0; e < tensors[i].num_elems; e++) {
        double expected = oracle.read(k, (int)i, e);
        if (!(std::fabs(got[e] - expected) <= tolerance * (1 + std::fabs(expected))) && bad++ < 3)
          ADD_FAILURE() << "shadow " << k << " tensor " << tensors[i].name << " (" << dtype_label(tensors[i].dtype)
                        << ") elem " << e << ": got " << got[e] << ", float64 gives " << expected;
      }
    }
}

// Runs `steps` updates with fresh random params before each; checks the
// handle against the oracle at the end.
void run_against_oracle(const polyak_config &cfg, std::vector<Tensor> &tensors, const std::vector<int64_t> &steps,
                        double tolerance, uint64_t seed = 1)
{
  std::mt19937_64 rng(seed);
  randomize_all(tensors, rng);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  Oracle oracle(cfg, tensors);
  for (int64_t step : steps) {
    randomize_all(tensors, rng);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
    oracle.update(step, tensors);
  }
  expect_matches(h.get(), oracle, tensors, tolerance);
}

std::vector<int64_t> consecutive(int64_t first, int64_t last)
{
  std::vector<int64_t> steps;
  for (int64_t s = first; s <= last; s++)
    steps.push_back(s);
  return steps;
}

// Rounding error of an fp32 EMA: at most half an ulp per update.
double f32_tolerance(size_t updates)
{
  return (updates + 2) * std::ldexp(1.0, -24) * 4;
}

TEST(Update, MatchesFloat64OnMixedDtypesAndOddSizes)
{
  auto tensors = mixed_tensors({std::begin(kOddSizes), std::end(kOddSizes)});
  run_against_oracle(cpu_config(1, 0.9), tensors, consecutive(1, 20), f32_tolerance(20));
}

TEST(Update, FourShadowsWithFourSchedulesInOnePass)
{
  polyak_config cfg = cpu_config(4);
  cfg.shadows[0].schedule.beta = 0.8;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[1].schedule.inv_gamma = 2.0;
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[3].schedule.kind = POLYAK_SCHEDULE_POWER;
  cfg.shadows[3].schedule.gamma = polyak_gamma_from_sigma_rel(0.05);
  auto tensors = mixed_tensors({5, 65537, 1, 1000});
  run_against_oracle(cfg, tensors, consecutive(1, 30), f32_tolerance(30));
}

TEST(Update, OnePassOfF32ShadowsEqualsSeparatePassesBitForBit)
{
  polyak_config four = cpu_config(4);
  four.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  four.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  four.shadows[3].schedule.kind = POLYAK_SCHEDULE_POWER;
  auto tensors = mixed_tensors({3, 65537, 130001, 0, 17});
  std::mt19937_64 rng(8);
  randomize_all(tensors, rng);
  Handle all = make_handle(four);
  add_all(all.get(), tensors);
  ASSERT_EQ(polyak_finalize(all.get(), nullptr), POLYAK_OK);
  std::vector<Handle> single;
  for (int k = 0; k < 4; k++) {
    polyak_config one = four;
    one.num_shadows = 1;
    one.shadows[0].schedule = four.shadows[k].schedule;
    single.push_back(make_handle(one));
    add_all(single.back().get(), tensors);
    ASSERT_EQ(polyak_finalize(single.back().get(), nullptr), POLYAK_OK);
  }
  for (int64_t step : {1, 2, 4, 9, 10, 31}) {
    randomize_all(tensors, rng);
    ASSERT_EQ(polyak_update(all.get(), step, nullptr), POLYAK_OK);
    for (auto &h : single)
      ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
  }
  for (int k = 0; k < 4; k++)
    for (size_t i = 0; i < tensors.size(); i++) {
      auto a = read_shadow(all.get(), k, (int)i, tensors[i].num_elems);
      auto b = read_shadow(single[k].get(), 0, (int)i, tensors[i].num_elems);
      EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4)) << "shadow " << k << " " << tensors[i].name;
    }
}

TEST(Update, StepGapsApplyTheProductOfTheSkippedBetas)
{
  polyak_config cfg = cpu_config(3);
  cfg.shadows[0].schedule.beta = 0.95;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_TF;
  auto tensors = mixed_tensors({65537, 3, 4});
  run_against_oracle(cfg, tensors, {1, 2, 5, 9, 40, 41, 100, 1000}, f32_tolerance(8));
}

TEST(Update, AGapEqualsUpdatingEveryStepWithUnchangedParams)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[0].schedule.beta = 0.97;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  auto tensors = mixed_tensors({1000, 333});
  std::mt19937_64 rng(4);
  randomize_all(tensors, rng);
  Handle every = make_handle(cfg), gaps = make_handle(cfg);
  add_all(every.get(), tensors);
  add_all(gaps.get(), tensors);
  ASSERT_EQ(polyak_finalize(every.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(gaps.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(every.get(), 1, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(gaps.get(), 1, nullptr), POLYAK_OK);
  randomize_all(tensors, rng, 3.0f); // the params move, then stay for 24 steps
  for (int64_t step = 2; step <= 25; step++)
    ASSERT_EQ(polyak_update(every.get(), step, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(gaps.get(), 25, nullptr), POLYAK_OK);
  for (int k = 0; k < 2; k++)
    for (size_t i = 0; i < tensors.size(); i++) {
      auto a = read_shadow(every.get(), k, (int)i, tensors[i].num_elems);
      auto b = read_shadow(gaps.get(), k, (int)i, tensors[i].num_elems);
      for (int64_t e = 0; e < tensors[i].num_elems; e++)
        ASSERT_NEAR(a[e], b[e], f32_tolerance(25) * (1 + std::fabs(b[e]))) << k << " " << i << " " << e;
    }
}

TEST(Update, EqualScheduleIsTheMeanOfTheSnapshots)
{
  polyak_config cfg = cpu_config(1);
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 4099);
  std::mt19937_64 rng(6);
  tensors[0].randomize(rng);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  std::vector<double> sum(4099, 0.0);
  const int n = 50;
  for (int step = 1; step <= n; step++) {
    tensors[0].randomize(rng, 1.0f, 2.0f);
    for (int64_t e = 0; e < 4099; e++)
      sum[e] += tensors[0].get(e);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
  }
  auto got = read_shadow(h.get(), 0, 0, 4099);
  for (int64_t e = 0; e < 4099; e++)
    ASSERT_NEAR(got[e], sum[e] / n, 1e-5) << e;
}

TEST(Update, ZeroInitReadsOutTheDebiasedAverage)
{
  polyak_config cfg = cpu_config(2);
  cfg.zero_init = 1;
  cfg.shadows[0].schedule.beta = 0.99;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_COSINE;
  cfg.shadows[1].schedule.beta_min = 0.9;
  cfg.shadows[1].schedule.ramp_steps = 10;
  auto tensors = mixed_tensors({65537, 9});
  std::mt19937_64 rng(12);
  randomize_all(tensors, rng);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK);
  // one sample: the debiased average is that sample
  for (size_t i = 0; i < tensors.size(); i++) {
    auto got = read_shadow(h.get(), 0, (int)i, tensors[i].num_elems);
    for (int64_t e = 0; e < tensors[i].num_elems; e++)
      ASSERT_NEAR(got[e], tensors[i].get(e), 1e-5 * (1 + std::fabs(tensors[i].get(e))));
  }
  std::vector<int64_t> steps = {2, 3, 7, 8, 30};
  run_against_oracle(cfg, tensors, steps, 1e-5);
}

TEST(Update, StartStepCopiesTheParamsExactly)
{
  polyak_config cfg = cpu_config(1, 0.9);
  cfg.shadows[0].schedule.start_step = 3;
  auto tensors = mixed_tensors({65537, 5, 3});
  std::mt19937_64 rng(13);
  Handle h = make_handle(cfg);
  randomize_all(tensors, rng);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  for (int64_t step : {1, 3}) {
    randomize_all(tensors, rng, 100.0f);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    for (size_t i = 0; i < tensors.size(); i++) {
      auto got = read_shadow(h.get(), 0, (int)i, tensors[i].num_elems);
      for (int64_t e = 0; e < tensors[i].num_elems; e++)
        ASSERT_EQ(got[e], tensors[i].get(e)) << step << " " << i << " " << e;
    }
  }
  randomize_all(tensors, rng);
  ASSERT_EQ(polyak_update(h.get(), 4, nullptr), POLYAK_OK);
  auto got = read_shadow(h.get(), 0, 1, 5);
  EXPECT_NE(got[0], tensors[1].get(0)) << "step 4 averages with beta 0.9";
}

TEST(Update, AnUpdateIsTheDocumentedFmaBitForBit)
{
  polyak_config cfg = cpu_config(1, 0.999);
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 10007);
  std::mt19937_64 rng(14);
  tensors[0].randomize(rng);
  std::vector<float> before(10007);
  for (int64_t e = 0; e < 10007; e++)
    before[e] = tensors[0].get(e);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  tensors[0].randomize(rng);
  ASSERT_EQ(polyak_update(h.get(), 3, nullptr), POLYAK_OK); // B = 0.999^3
  float w = (float)(1.0 - std::pow(0.999, 3));
  auto got = read_shadow(h.get(), 0, 0, 10007);
  for (int64_t e = 0; e < 10007; e++) {
    float p = tensors[0].get(e);
    ASSERT_EQ(polyak_f32_bits(got[e]), polyak_f32_bits(std::fma(w, p - before[e], before[e]))) << e;
  }
}

TEST(Update, MisalignedParamStartsAreReadCorrectly)
{
  // bf16/f16 params at 2- and 6-byte offsets, f32 at 4 and 12
  std::vector<Tensor> tensors;
  tensors.emplace_back("bf16_at_2", POLYAK_BF16, 65537, 2);
  tensors.emplace_back("f16_at_6", POLYAK_F16, 1003, 6);
  tensors.emplace_back("f32_at_4", POLYAK_F32, 5, 4);
  tensors.emplace_back("f32_at_12", POLYAK_F32, 70001, 12);
  tensors.emplace_back("bf16_at_6", POLYAK_BF16, 3, 6);
  run_against_oracle(cpu_config(2, 0.9), tensors, consecutive(1, 10), f32_tolerance(10));
}

// ---- the non-finite guard ----------------------------------------------------

struct GuardCase {
  std::vector<Tensor> tensors;
  std::vector<std::pair<int, int64_t>> poisoned; // (tensor, element)
};

GuardCase guard_case()
{
  GuardCase c;
  c.tensors = mixed_tensors({65537, 130001, 3});
  std::mt19937_64 rng(21);
  randomize_all(c.tensors, rng);
  c.poisoned = {{0, 0}, {0, 65535}, {0, 65536}, {1, 1}, {1, 65536}, {1, 130000}, {2, 2}};
  return c;
}

void poison(GuardCase &c, std::mt19937_64 &rng)
{
  randomize_all(c.tensors, rng);
  const float bad[] = {NAN, INFINITY, -INFINITY};
  int i = 0;
  for (auto [t, e] : c.poisoned)
    c.tensors[t].set(e, bad[i++ % 3]);
}

TEST(Guard, NonFiniteParamsLeaveTheirShadowsAsTheyWere)
{
  GuardCase c = guard_case();
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  Handle h = make_handle(cfg);
  add_all(h.get(), c.tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  Oracle oracle(cfg, c.tensors);
  std::mt19937_64 rng(22);
  for (int64_t step = 1; step <= 5; step++) {
    poison(c, rng);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    oracle.update(step, c.tensors); // the oracle skips non-finite params too
  }
  expect_matches(h.get(), oracle, c.tensors, f32_tolerance(5));
  for (int k = 0; k < 2; k++)
    for (auto [t, e] : c.poisoned) {
      auto got = read_shadow(h.get(), k, t, c.tensors[t].num_elems);
      EXPECT_TRUE(std::isfinite(got[e])) << t << " " << e;
    }
}

TEST(Guard, CountsEachNonFiniteElementOncePerUpdateWhateverK)
{
  for (int num_shadows : {1, 8}) {
    GuardCase c = guard_case();
    Handle h = make_handle(cpu_config(num_shadows));
    add_all(h.get(), c.tensors);
    ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    std::mt19937_64 rng(23);
    for (int64_t step : {1, 2, 10}) {
      poison(c, rng);
      ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    }
    int64_t count = -1;
    ASSERT_EQ(polyak_nonfinite_count(h.get(), &count), POLYAK_OK);
    EXPECT_EQ(count, 3 * (int64_t)c.poisoned.size()) << num_shadows;
  }
}

TEST(Guard, WithoutTheGuardNonFiniteFlowsIntoTheShadowAndIsCounted)
{
  GuardCase c = guard_case();
  polyak_config cfg = cpu_config(1);
  cfg.skip_nonfinite = 0;
  Handle h = make_handle(cfg);
  add_all(h.get(), c.tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  std::mt19937_64 rng(24);
  poison(c, rng);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK);
  for (auto [t, e] : c.poisoned) {
    auto got = read_shadow(h.get(), 0, t, c.tensors[t].num_elems);
    EXPECT_FALSE(std::isfinite(got[e])) << t << " " << e;
  }
  int64_t count = -1;
  ASSERT_EQ(polyak_nonfinite_count(h.get(), &count), POLYAK_OK);
  EXPECT_EQ(count, (int64_t)c.poisoned.size());
}

TEST(Guard, FinalizeRefusesNonFiniteStartingParams)
{
  std::vector<Tensor> tensors = mixed_tensors({10, 65537});
  std::mt19937_64 rng(25);
  randomize_all(tensors, rng);
  tensors[1].set(65536, NAN);
  Handle h = make_handle(cpu_config());
  add_all(h.get(), tensors);
  EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  std::string why = polyak_last_error(h.get());
  EXPECT_NE(why.find("layer1.weight"), std::string::npos) << why;
  EXPECT_NE(why.find("65536"), std::string::npos) << why;
  EXPECT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_ERR_STATE) << "still not finalized";
  tensors[1].set(65536, 1.0f); // fixed: finalize now works
  EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
}

// ---- bf16 shadows ----------------------------------------------------------

TEST(Bf16Shadow, KeepsMovingAtBeta9999WhereRoundToNearestStalls)
{
  // An update of 1e-4 * (p - s) is 1/200 of a bf16 ulp at 1.0: round to
  // nearest would keep every shadow at 1.0 forever. Stochastic rounding must
  // follow the exact EMA on average.
  const int64_t n = 8192, steps = 10000;
  const float start = 1.0f, target = 1.03125f; // both exact in bf16
  polyak_config cfg = cpu_config(1, 0.9999);
  cfg.shadow_dtype = POLYAK_BF16;
  cfg.seed = 1234;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_BF16, n);
  for (int64_t e = 0; e < n; e++)
    tensors[0].set(e, start);
  Handle stepwise = make_handle(cfg);
  add_all(stepwise.get(), tensors);
  ASSERT_EQ(polyak_finalize(stepwise.get(), nullptr), POLYAK_OK);
  for (int64_t e = 0; e < n; e++)
    tensors[0].set(e, target);
  for (int64_t step = 1; step <= steps; step++)
    ASSERT_EQ(polyak_update(stepwise.get(), step, nullptr), POLYAK_OK);
  auto got = read_shadow(stepwise.get(), 0, 0, n);
  double mean = 0.0;
  for (float v : got)
    mean += v;
  mean /= n;
  double exact = target - (target - start) * std::pow(0.9999, (double)steps);
  // per-element spread ~0.011 after 10^4 rounding draws, so ~1.2e-4 for the mean
  EXPECT_NEAR(mean, exact, 1e-3);
  EXPECT_GT(mean - start, 0.018) << "round-to-nearest would leave 0";
}

TEST(Bf16Shadow, BitsAreReproducibleFromTheSeed)
{
  auto run = [](uint64_t seed) {
    polyak_config cfg = cpu_config(2, 0.99);
    cfg.shadow_dtype = POLYAK_BF16;
    cfg.seed = seed;
    auto tensors = mixed_tensors({65537, 3});
    std::mt19937_64 rng(30);
    randomize_all(tensors, rng);
    Handle h = make_handle(cfg);
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    for (int64_t step = 1; step <= 5; step++) {
      randomize_all(tensors, rng);
      EXPECT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    }
    return snapshot(h.get(), 2, tensors);
  };
  Snapshot a = run(7), b = run(7), c = run(8);
  EXPECT_TRUE(a == b);
  EXPECT_FALSE(a == c);
}

TEST(Bf16Shadow, MatchesFloat64WithinItsRounding)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadow_dtype = POLYAK_BF16;
  auto tensors = mixed_tensors({65537, 130001, 1});
  // each rounding moves a value by less than one bf16 ulp (2^-7 relative)
  run_against_oracle(cfg, tensors, consecutive(1, 12), 12 * std::ldexp(1.0, -7));
}

// ---- read-out ----------------------------------------------------------------

TEST(ReadOut, Bf16AndF16RoundTheF32ValueToNearestEven)
{
  auto tensors = mixed_tensors({65537, 5});
  std::mt19937_64 rng(31);
  randomize_all(tensors, rng);
  Handle h = make_handle(cpu_config(1, 0.9));
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  randomize_all(tensors, rng);
  ASSERT_EQ(polyak_update(h.get(), 2, nullptr), POLYAK_OK);
  for (size_t i = 0; i < tensors.size(); i++) {
    int64_t n = tensors[i].num_elems;
    auto f32 = read_shadow(h.get(), 0, (int)i, n);
    std::vector<uint16_t> bf16(n), f16(n);
    ASSERT_EQ(polyak_get_shadow(h.get(), 0, (int)i, bf16.data(), POLYAK_BF16, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_get_shadow(h.get(), 0, (int)i, f16.data(), POLYAK_F16, nullptr), POLYAK_OK);
    for (int64_t e = 0; e < n; e++) {
      ASSERT_EQ(bf16[e], polyak_f32_to_bf16_rne(f32[e]));
      ASSERT_EQ(f16[e], polyak_f32_to_f16_rne(f32[e]));
    }
  }
}

TEST(ReadOut, ZeroInitHasNoAverageBeforeTheFirstUpdate)
{
  polyak_config cfg = cpu_config();
  cfg.zero_init = 1;
  auto tensors = mixed_tensors({4});
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  float dst[4];
  EXPECT_EQ(polyak_get_shadow(h.get(), 0, 0, dst, POLYAK_F32, nullptr), POLYAK_ERR_STATE);
  EXPECT_NE(std::string(polyak_last_error(h.get())).find("no update"), std::string::npos);
}

// ---- scale -------------------------------------------------------------------

TEST(Registry, HundredThousandTinyTensorsRegisterAndUpdateQuickly)
{
  const int count = 100000;
  std::vector<float> params(count * 3);
  std::mt19937_64 rng(40);
  std::normal_distribution<float> dist;
  for (float &v : params)
    v = dist(rng);
  Handle h = make_handle(cpu_config(1, 0.5));
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < count; i++) {
    int64_t shape[1] = {1 + i % 3};
    std::string name = "block." + std::to_string(i);
    ASSERT_EQ(polyak_add(h.get(), name.c_str(), &params[3 * i], POLYAK_F32, 1, shape), POLYAK_OK);
  }
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 5.0) << "registration must not be quadratic";
  std::vector<float> before(params);
  for (float &v : params)
    v += 1.0f;
  ASSERT_EQ(polyak_update(h.get(), 2, nullptr), POLYAK_OK);
  for (int i : {0, 1, 2, 49999, 99999}) {
    float got[3];
    ASSERT_EQ(polyak_get_shadow(h.get(), 0, i, got, POLYAK_F32, nullptr), POLYAK_OK);
    EXPECT_FLOAT_EQ(got[0], before[3 * i] + 0.75f) << i; // 1 - 0.5^2 of the +1
  }
}

TEST(Registry, AHandleWithoutTensorsFinalizesAndUpdates)
{
  Handle h = make_handle(cpu_config());
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK);
  int64_t count = -1;
  ASSERT_EQ(polyak_nonfinite_count(h.get(), &count), POLYAK_OK);
  EXPECT_EQ(count, 0);
}

} // namespace
