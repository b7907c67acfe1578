// test_rounding.cpp: f32 shadows that round stochastically
// (polyak_config.rounding). Over 10^7 steps a shadow rounded to nearest
// stalls where an update's increment falls under half an ulp while the
// stochastic one follows the float64 average; stochastic shadows are
// unbiased over seeds; each update lands on a neighbour of the exact value,
// with gaps, the guard and zero_init; bf16 shadows round stochastically
// whatever the field says. Graph replays, shards, checkpoints, shadows in
// the caller's memory, post-hoc snapshots and the kernel's own code are
// checked with the rest of their modes (test_graph, test_shard,
// test_checkpoint, test_owned, test_posthoc, test_kernel_logic).
#include "test_util.h"

#include <cstdio>

using namespace polyak_test;

namespace {

// xorshift64*: cheap enough for 10^7 steps of a walk.
struct Xorshift {
  uint64_t state;
  double uniform() // in [0, 1)
  {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return (double)((state * 0x2545F4914F6CDD1Dull) >> 11) * 0x1p-53;
  }
};

// The alternative to stochastic rounding, measured beside it: a compensated
// (Kahan) f32 shadow, a second f32 per element holding what the last
// rounding lost. 8 bytes of shadow per element instead of 4.
struct Compensated {
  float value = 0.0f, lost = 0.0f; // the average is value + lost
  void update(float param, float weight)
  {
    float increment = std::fma(weight, (param - value) - lost, lost); // w (p - average), plus what was lost
    float next = value + increment;
    lost = increment - (next - value);
    value = next;
  }
  float read() const
  {
    return (float)((double)value + lost);
  } // an f32 read-out, as the other shadows give
};

// sqrt(sum (got - want)^2 / sum (want - start)^2): the error against the
// float64 average relative to how far that average moved.
template <typename Got>
double relative_error(const Got &got, const std::vector<double> &want, const std::vector<double> &start)
{
  double error = 0.0, moved = 0.0;
  for (size_t e = 0; e < want.size(); e++) {
    error += (got(e) - want[e]) * (got(e) - want[e]);
    moved += (want[e] - start[e]) * (want[e] - start[e]);
  }
  return std::sqrt(error / moved);
}

// The README's table comes from this test's output:
//   build/tests/polyak_tests --gtest_filter=Rounding.LongRuns*
TEST(Rounding, LongRunsStallWhenRoundedToNearestButNotStochastically)
{
  // params in [1, 2) on a random walk of 10^-6 per step (standard deviation,
  // about 8 ulps): POWER gamma 6.94 (w ~ 8 / t) and CONSTANT beta 0.99999
  // (w = 10^-5), each rounded to nearest (shadows 0, 1) and stochastically
  // (2, 3), updated at every step, against float64
  constexpr int kElems = 16;
  constexpr int64_t kSteps = 10000000;
  constexpr double kStepSize = 1e-6;
  polyak_config cfg = cpu_config(4, 0.99999);
  for (int k = 0; k < 4; k++) {
    cfg.shadows[k].schedule.kind = k % 2 == 0 ? POLYAK_SCHEDULE_POWER : POLYAK_SCHEDULE_CONSTANT;
    cfg.shadows[k].schedule.gamma = 6.94;
    cfg.shadows[k].rounding = k < 2 ? POLYAK_ROUND_NEAREST : POLYAK_ROUND_STOCHASTIC;
  }
  cfg.seed = 2024;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, kElems);
  float *param = static_cast<float *>(tensors[0].data());
  Xorshift rng{88172645463325252ull};
  std::vector<double> walk(kElems);
  for (int e = 0; e < kElems; e++) {
    walk[e] = 1.0 + rng.uniform();
    param[e] = (float)walk[e];
  }
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  std::vector<double> start(param, param + kElems), reference[2] = {start, start};
  std::vector<Compensated> compensated[2];
  for (auto &c : compensated) {
    c.resize(kElems);
    for (int e = 0; e < kElems; e++)
      c[e].value = param[e];
  }
  const char *names[2] = {"POWER gamma 6.94", "CONSTANT 0.99999"};
  std::printf("error of f32 shadows relative to how far the float64 average moved (RMS over %d elements)\n", kElems);
  std::printf("%-9s %-17s %9s %11s %12s %12s\n", "steps", "schedule", "nearest", "stochastic", "compensated",
              "moved (RMS)");
  const double step_scale = kStepSize * std::sqrt(12.0); // uniform steps of this standard deviation
  for (int64_t step = 1; step <= kSteps; step++) {
    for (int e = 0; e < kElems; e++) {
      walk[e] += step_scale * (rng.uniform() - 0.5);
      param[e] = (float)walk[e];
    }
    if (polyak_update(h.get(), step, nullptr) != POLYAK_OK)
      FAIL() << polyak_last_error(h.get());
    for (int s = 0; s < 2; s++) {
      double w = 1.0 - oracle_beta(cfg.shadows[s].schedule, step);
      for (int e = 0; e < kElems; e++) {
        reference[s][e] += w * ((double)param[e] - reference[s][e]);
        compensated[s][e].update(param[e], (float)w); // the weight polyak passes
      }
    }
    if (step != 100000 && step != 1000000 && step != kSteps)
      continue;
    for (int s = 0; s < 2; s++) {
      std::vector<float> nearest = read_shadow(h.get(), s, 0, kElems);
      std::vector<float> stochastic = read_shadow(h.get(), s + 2, 0, kElems);
      double error_nearest = relative_error([&](size_t e) { return (double)nearest[e]; }, reference[s], start);
      double error_stochastic = relative_error([&](size_t e) { return (double)stochastic[e]; }, reference[s], start);
      double error_compensated =
          relative_error([&](size_t e) { return (double)compensated[s][e].read(); }, reference[s], start);
      double moved = 0.0;
      for (int e = 0; e < kElems; e++)
        moved += (reference[s][e] - start[e]) * (reference[s][e] - start[e]) / kElems;
      std::printf("%-9.0e %-17s %8.1f%% %10.2f%% %11.4f%% %12.2e\n", (double)step, names[s], 100 * error_nearest,
                  100 * error_stochastic, 100 * error_compensated, std::sqrt(moved));
      if (step == kSteps) {
        EXPECT_GE(error_nearest, 0.5) << names[s] << ": rounded to nearest, the shadow should have stalled";
        EXPECT_LE(error_stochastic, 0.01) << names[s];
      }
    }
  }
}

TEST(Rounding, StochasticShadowsAreUnbiasedOverSeeds)
{
  // the params step from 1 to 1 + d_e and stay there: each increment
  // w (p - s) is a few hundredths of an ulp, which rounding to nearest drops
  // at every step; stochastic shadows, one handle per seed, must average to
  // the float64 value within the standard error of their mean
  constexpr int kSeeds = 64, kElems = 64;
  constexpr int64_t kSteps = 20000;
  const double beta = 0.99999;
  std::vector<double> errors, nearest_errors;
  for (int seed = -1; seed < kSeeds; seed++) { // -1: rounded to nearest
    polyak_config cfg = cpu_config(1, beta);
    cfg.shadows[0].rounding = seed < 0 ? POLYAK_ROUND_NEAREST : POLYAK_ROUND_STOCHASTIC;
    cfg.seed = 1000 + (uint64_t)seed;
    std::vector<Tensor> tensors;
    tensors.emplace_back("w", POLYAK_F32, kElems);
    for (int e = 0; e < kElems; e++)
      tensors[0].set(e, 1.0f);
    Handle h = make_handle(cfg);
    add_all(h.get(), tensors);
    ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    for (int e = 0; e < kElems; e++)
      tensors[0].set(e, 1.0f + (float)(e + 1) * 0x1p-14f);
    for (int64_t step = 1; step <= kSteps; step++)
      ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    std::vector<float> shadow = read_shadow(h.get(), 0, 0, kElems);
    double decay = 1.0 - (double)(float)(1.0 - beta); // with the weight polyak passes
    for (int e = 0; e < kElems; e++) {
      double want = 1.0 + (tensors[0].get(e) - 1.0) * (1.0 - std::pow(decay, (double)kSteps));
      (seed < 0 ? nearest_errors : errors).push_back(shadow[e] - want);
    }
  }
  double mean = 0.0, variance = 0.0;
  for (double x : errors)
    mean += x / errors.size();
  for (double x : errors)
    variance += (x - mean) * (x - mean) / (errors.size() - 1);
  double standard_error = std::sqrt(variance / errors.size());
  std::printf("mean error %.3g, standard error %.3g (%zu shadows)\n", mean, standard_error, errors.size());
  EXPECT_LE(std::fabs(mean), 3 * standard_error) << "biased";
  double nearest_mean = 0.0;
  for (double x : nearest_errors)
    nearest_mean += x / nearest_errors.size();
  EXPECT_GT(std::fabs(nearest_mean), 100 * standard_error) << "rounded to nearest, the shadows should have stalled";
}

// Per element: the read-out of every shadow before an update.
std::vector<std::vector<float>> read_all(polyak_t *p, int num_shadows, int64_t num_elems)
{
  std::vector<std::vector<float>> out;
  for (int k = 0; k < num_shadows; k++)
    out.push_back(read_shadow(p, k, 0, num_elems));
  return out;
}

TEST(Rounding, EachUpdateLandsOnANeighbourOfTheExactValue)
{
  // shadows 0 and 1 stochastic, 2 to nearest; updates with gaps; NaN params
  // leave every shadow as it was and are counted
  polyak_config cfg = cpu_config(3, 0.999);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_POWER;
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[0].rounding = cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
  cfg.seed = 5;
  constexpr int64_t kElems = 70001; // chunk edges, a vector middle, a scalar tail
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, kElems, 4);
  std::mt19937_64 rng(6);
  tensors[0].randomize(rng, 1.0f, 0.5f);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  int64_t last = 0, ups = 0, inexact = 0, poisoned = 0;
  for (int64_t step : {1, 2, 3, 7, 8, 20, 100}) {
    auto before = read_all(h.get(), 3, kElems);
    tensors[0].randomize(rng, 1.0f, 0.5f);
    for (int64_t e = step; e < kElems; e += 997) {
      tensors[0].set(e, e % 2 ? NAN : -INFINITY);
      poisoned++;
    }
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    auto after = read_all(h.get(), 3, kElems);
    for (int k = 0; k < 3; k++) {
      float w = (float)(1.0 - polyak_beta_product(&cfg.shadows[k].schedule, last, step));
      for (int64_t e = 0; e < kElems; e++) {
        float s = before[k][e], p = tensors[0].get(e), got = after[k][e];
        if (!std::isfinite(p)) {
          ASSERT_EQ(float_bits(got), float_bits(s)) << "the guard, shadow " << k;
          continue;
        }
        if (k == 2) {
          ASSERT_EQ(float_bits(got), float_bits(polyak_lerp(s, p, w))) << "nearest: fmaf's bits, element " << e;
          continue;
        }
        float below, above;
        f32_neighbours((double)s + (double)w * ((double)p - (double)s), &below, &above);
        ASSERT_TRUE(got == below || got == above) << "shadow " << k << " step " << step << " element " << e;
        inexact += below != above;
        ups += below != above && got == above;
      }
    }
    last = step;
  }
  EXPECT_GT(ups, inexact / 3) << "both neighbours are taken";
  EXPECT_LT(ups, 2 * inexact / 3);
  int64_t count = 0;
  ASSERT_EQ(polyak_nonfinite_count(h.get(), &count), POLYAK_OK);
  EXPECT_EQ(count, poisoned);
}

TEST(Rounding, ZeroInitShadowsDebiasLikeNearestOnes)
{
  polyak_config cfg = cpu_config(2, 0.99);
  cfg.zero_init = 1;
  cfg.shadows[0].rounding = POLYAK_ROUND_STOCHASTIC;
  cfg.seed = 9;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 4099);
  std::mt19937_64 rng(10);
  tensors[0].randomize(rng, 1.0f, 0.1f);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  Oracle oracle(cfg, tensors);
  for (int64_t step = 1; step <= 300; step += 1 + step % 3) {
    tensors[0].randomize(rng, 1.0f, 0.1f);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    oracle.update(step, tensors);
  }
  for (int k = 0; k < 2; k++) {
    std::vector<float> got = read_shadow(h.get(), k, 0, 4099);
    for (int64_t e = 0; e < 4099; e++)
      ASSERT_NEAR(got[e], oracle.read(k, 0, e), 1e-5) << "shadow " << k << " element " << e;
  }
}

TEST(Rounding, Bf16ShadowsRoundStochasticallyWhateverTheFieldSays)
{
  // a bf16 shadow rounded to nearest would stall at beta 0.99: both values
  // of the field give the stochastic bits
  std::vector<std::vector<float>> shadows;
  for (int rounding : {POLYAK_ROUND_NEAREST, POLYAK_ROUND_STOCHASTIC}) {
    polyak_config cfg = cpu_config(1, 0.999);
    cfg.shadow_dtype = POLYAK_BF16;
    cfg.shadows[0].rounding = rounding;
    cfg.seed = 3;
    std::vector<Tensor> tensors;
    tensors.emplace_back("w", POLYAK_F32, 1000);
    for (int e = 0; e < 1000; e++)
      tensors[0].set(e, 1.0f);
    Handle h = make_handle(cfg);
    add_all(h.get(), tensors);
    ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    for (int e = 0; e < 1000; e++)
      tensors[0].set(e, 1.5f); // w (p - s) = 5e-4: a sixteenth of a bf16 ulp
    for (int64_t step = 1; step <= 100; step++)
      ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    shadows.push_back(read_shadow(h.get(), 0, 0, 1000));
  }
  EXPECT_EQ(shadows[0], shadows[1]);
  double mean = 0.0;
  for (float x : shadows[0])
    mean += x / 1000.0;
  EXPECT_NEAR(mean, 1.0 + 0.5 * (1.0 - std::pow(0.999, 100)), 0.003) << "moved, on average";
}

} // namespace
