// test_modes.cpp: averaging modes beyond one EMA, against float64:
// SWA-style update counting, multi-scale blends, the horizon helper.
#include "test_util.h"

using namespace polyak_test;

namespace {

// One f32 tensor updated at chosen steps, with fresh params at each; the
// params are kept: snapshot 0 is the start (the shadows' initial value),
// snapshot i the params of the i-th update.
struct Trace {
  std::vector<Tensor> tensors;
  Handle h;
  std::vector<std::vector<double>> snapshots;
  explicit Trace(const polyak_config &cfg)
  {
    tensors.emplace_back("w", POLYAK_F32, 1001);
    std::mt19937_64 rng(80);
    tensors[0].randomize(rng);
    snapshots.emplace_back(1001);
    for (int64_t e = 0; e < 1001; e++)
      snapshots[0][e] = tensors[0].get(e);
    h = make_handle(cfg);
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  }
  void update(int64_t step)
  {
    std::mt19937_64 rng(1000 + step);
    tensors[0].randomize(rng, 1.0f, 3.0f);
    std::vector<double> values(1001);
    for (int64_t e = 0; e < 1001; e++)
      values[e] = tensors[0].get(e);
    snapshots.push_back(values);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  // Shadow `k` against sum_i weights[i] * snapshot i.
  void expect_weights(int k, const std::vector<double> &weights)
  {
    auto got = read_shadow(h.get(), k, 0, 1001);
    for (int64_t e = 0; e < 1001; e++) {
      double want = 0.0;
      for (size_t i = 0; i < weights.size(); i++)
        want += weights[i] * snapshots[i][e];
      ASSERT_NEAR(got[e], want, 4e-6 * (1 + std::fabs(want))) << "shadow " << k << " element " << e;
    }
  }
};

polyak_config swa_config()
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_EQUAL; // per step (default)
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL; // per update
  cfg.shadows[1].count_updates = 1;
  return cfg;
}

TEST(Modes, SwaCountingAndStepCompensationAgreeOnEvenlySpacedUpdates)
{
  // SWA at cycle ends, steps 10, 20, 30: each snapshot stands for 10 steps,
  // so the per-step mean and the mean of the snapshots coincide
  Trace run(swa_config());
  for (int64_t step : {10, 20, 30})
    run.update(step);
  run.expect_weights(0, {0, 1 / 3.0, 1 / 3.0, 1 / 3.0});
  run.expect_weights(1, {0, 1 / 3.0, 1 / 3.0, 1 / 3.0});
}

TEST(Modes, SwaCountingIsThePlainMeanWhereStepCompensationWeighsByTheGap)
{
  // steps 10, 20, 50: per step, the last snapshot stands for steps 21..50
  Trace run(swa_config());
  for (int64_t step : {10, 20, 50})
    run.update(step);
  run.expect_weights(0, {0, 10 / 50.0, 10 / 50.0, 30 / 50.0});
  run.expect_weights(1, {0, 1 / 3.0, 1 / 3.0, 1 / 3.0});
}

TEST(Modes, CountingStartsAfterStartStep)
{
  polyak_config cfg = swa_config();
  cfg.shadows[1].schedule.start_step = 15; // SWA from step 15: the update at 10 is a plain copy
  Trace run(cfg);
  for (int64_t step : {10, 20, 30, 40})
    run.update(step);
  run.expect_weights(1, {0, 0, 1 / 3.0, 1 / 3.0, 1 / 3.0});
}

TEST(Modes, CountingWithAConstantBetaIgnoresGaps)
{
  polyak_config cfg = cpu_config(2, 0.5);
  cfg.shadows[1].count_updates = 1;
  Trace run(cfg);
  for (int64_t step : {1, 4})
    run.update(step);
  // the start, then beta 0.5 at the first step, then after a 3-step gap:
  run.expect_weights(1, {0.25, 0.25, 0.5});       // counted: beta 0.5 once more
  run.expect_weights(0, {0.0625, 0.0625, 0.875}); // per step: 0.5^3
}

TEST(Modes, CountedReplaysAndCheckpointsGiveTheBitsOfDirectUpdates)
{
  polyak_config cfg = swa_config();
  cfg.shadows[1].schedule.start_step = 3;
  cfg.shadow_dtype = POLYAK_BF16;
  Trace direct(cfg), graphed(cfg), resumed(cfg);
  TempDir dir;
  for (int64_t step = 1; step <= 4; step++) {
    direct.update(step);
    resumed.update(step);
  }
  ASSERT_EQ(polyak_save(resumed.h.get(), dir.file("swa").c_str()), POLYAK_OK);
  Trace loaded(cfg);
  ASSERT_EQ(polyak_load(loaded.h.get(), dir.file("swa").c_str()), POLYAK_OK) << polyak_last_error(loaded.h.get());
  ASSERT_EQ(polyak_graph_reserve(graphed.h.get(), 1, 8, nullptr), POLYAK_OK);
  for (int64_t step = 1; step <= 8; step++) {
    std::mt19937_64 rng(1000 + step);
    graphed.tensors[0].randomize(rng, 1.0f, 3.0f);
    ASSERT_EQ(polyak_graph_update(graphed.h.get(), nullptr), POLYAK_OK);
    if (step > 4) {
      direct.update(step);
      loaded.update(step);
    }
  }
  int64_t done = 0;
  ASSERT_EQ(polyak_graph_release(graphed.h.get(), &done), POLYAK_OK);
  EXPECT_TRUE(snapshot(direct.h.get(), 2, direct.tensors) == snapshot(graphed.h.get(), 2, graphed.tensors));
  EXPECT_TRUE(snapshot(direct.h.get(), 2, direct.tensors) == snapshot(loaded.h.get(), 2, loaded.tensors));
}

TEST(Modes, CountingIsValidatedAndMustMatchAFile)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].count_updates = 2;
  char why[256];
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(why, "shadows[1].count_updates")) << why;
  cfg.shadows[1].count_updates = 1;
  cfg.num_shadows = 1; // flags past num_shadows are not read
  cfg.shadows[5].count_updates = 7;
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_OK);

  TempDir dir;
  Trace counting(swa_config());
  counting.update(2);
  ASSERT_EQ(polyak_save(counting.h.get(), dir.file("f").c_str()), POLYAK_OK);
  polyak_config steps = swa_config();
  steps.shadows[1].count_updates = 0;
  Trace other(steps);
  EXPECT_EQ(polyak_load(other.h.get(), dir.file("f").c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(other.h.get()), "count_updates")) << polyak_last_error(other.h.get());
}

TEST(Modes, HorizonHelperFollowsOneMinusTwoOverRootT)
{
  EXPECT_DOUBLE_EQ(polyak_beta_from_horizon(4.0), 0.0);
  EXPECT_DOUBLE_EQ(polyak_beta_from_horizon(400.0), 0.9);
  EXPECT_DOUBLE_EQ(polyak_beta_from_horizon(40000.0), 0.99);
  EXPECT_TRUE(std::isnan(polyak_beta_from_horizon(3.9)));
  EXPECT_TRUE(std::isnan(polyak_beta_from_horizon(INFINITY)));
  EXPECT_TRUE(std::isnan(polyak_beta_from_horizon(NAN)));
}

// ---- blends -----------------------------------------------------------------------

struct Blended {
  std::vector<Tensor> tensors;
  Handle h;
  polyak_config cfg;
  explicit Blended(int zero_init = 0)
  {
    cfg = cpu_config(3, 0.9);
    cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
    cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
    cfg.zero_init = zero_init;
    tensors.emplace_back("a", POLYAK_F32, 4099);
    tensors.emplace_back("b", POLYAK_BF16, 65537, 2);
    tensors.emplace_back("c", POLYAK_F16, 3, 6);
    std::mt19937_64 rng(90);
    for (auto &t : tensors)
      t.randomize(rng);
    h = make_handle(cfg);
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    for (int64_t step : {1, 2, 5}) {
      for (auto &t : tensors)
        t.randomize(rng, 0.5f, 2.0f);
      EXPECT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    }
  }
  std::vector<float> blend(int i, const double *weights, int flags = 0, polyak_dtype d = POLYAK_F32)
  {
    std::vector<float> out(tensors[i].num_elems + 1);
    std::vector<char> raw(tensors[i].num_elems * 4 + 4);
    EXPECT_EQ(polyak_get_blend(h.get(), weights, flags, i, raw.data(), d, nullptr), POLYAK_OK)
        << polyak_last_error(h.get());
    for (int64_t e = 0; e < tensors[i].num_elems; e++)
      out[e] = load_as(d, raw.data(), e);
    out.resize(tensors[i].num_elems);
    return out;
  }
};

TEST(Blend, MatchesFloat64SumsOfTheDebiasedShadows)
{
  for (int zero_init : {0, 1}) {
    Blended b(zero_init);
    const double weights[3] = {0.5, 0.3, 0.2};
    for (int i = 0; i < 3; i++) {
      auto got = b.blend(i, weights);
      std::vector<std::vector<float>> shadows;
      for (int k = 0; k < 3; k++)
        shadows.push_back(read_shadow(b.h.get(), k, i, b.tensors[i].num_elems));
      for (int64_t e = 0; e < b.tensors[i].num_elems; e++) {
        double want = 0.5 * shadows[0][e] + 0.3 * shadows[1][e] + 0.2 * shadows[2][e];
        ASSERT_NEAR(got[e], want, 1e-6 * (1 + std::fabs(want))) << zero_init << " " << i << " " << e;
      }
    }
  }
}

TEST(Blend, FollowsTheDocumentedArithmeticBitForBit)
{
  Blended b;
  const double weights[3] = {0.7, -0.4, 0.7}; // a multi-scale difference: any weights allowed by flag
  auto got = b.blend(1, weights, POLYAK_BLEND_ANY_WEIGHTS);
  std::vector<std::vector<float>> shadows;
  for (int k = 0; k < 3; k++)
    shadows.push_back(read_shadow(b.h.get(), k, 1, 65537)); // no zero_init: the raw shadows
  for (int64_t e = 0; e < 65537; e++) {
    float acc = 0.0f;
    for (int k = 0; k < 3; k++)
      acc = std::fma((float)weights[k], shadows[k][e], acc);
    ASSERT_EQ(polyak_f32_bits(got[e]), polyak_f32_bits(acc)) << e;
  }
}

TEST(Blend, IntoTheParamsAndBackWithStoreAndRestore)
{
  Blended b;
  const double weights[3] = {0.25, 0.25, 0.5};
  std::vector<std::vector<char>> trained;
  for (auto &t : b.tensors)
    trained.emplace_back(static_cast<char *>(t.data()),
                         static_cast<char *>(t.data()) + t.num_elems * dtype_bytes(t.dtype));
  ASSERT_EQ(polyak_store(b.h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_blend_to_params(b.h.get(), weights, 0, nullptr), POLYAK_OK);
  for (size_t i = 0; i < b.tensors.size(); i++) {
    auto blend = b.blend((int)i, weights);
    for (int64_t e = 0; e < b.tensors[i].num_elems; e++) {
      std::vector<char> want(4);
      store_as(b.tensors[i].dtype, want.data(), 0, blend[e]); // rounded to the param's dtype
      ASSERT_EQ(0, std::memcmp(static_cast<char *>(b.tensors[i].data()) + e * dtype_bytes(b.tensors[i].dtype),
                               want.data(), dtype_bytes(b.tensors[i].dtype)))
          << i << " " << e;
    }
  }
  ASSERT_EQ(polyak_restore(b.h.get(), nullptr), POLYAK_OK);
  for (size_t i = 0; i < b.tensors.size(); i++)
    EXPECT_EQ(0, std::memcmp(b.tensors[i].data(), trained[i].data(), trained[i].size()));
}

TEST(Blend, BadWeightsAreRefusedAndChangeNothing)
{
  Blended b;
  Snapshot before = snapshot(b.h.get(), 3, b.tensors);
  auto params = b.tensors[0].storage;
  std::vector<float> dst(4099);
  const double off[3] = {0.5, 0.3, 0.3}, nan[3] = {0.5, NAN, 0.5}, inf[3] = {INFINITY, 0, 0};
  EXPECT_EQ(polyak_blend_to_params(b.h.get(), off, 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(b.h.get()), "sum to 1.1")) << polyak_last_error(b.h.get());
  EXPECT_EQ(polyak_blend_to_params(b.h.get(), nan, POLYAK_BLEND_ANY_WEIGHTS, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_blend(b.h.get(), inf, POLYAK_BLEND_ANY_WEIGHTS, 0, dst.data(), POLYAK_F32, nullptr),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_blend_to_params(b.h.get(), nullptr, 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_blend_to_params(b.h.get(), off, 4, nullptr), POLYAK_ERR_INVALID_ARG) << "unknown flag";
  const double good[3] = {1, 0, 0};
  EXPECT_EQ(polyak_get_blend(b.h.get(), good, 0, 3, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_blend(b.h.get(), good, 0, 0, nullptr, POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(snapshot(b.h.get(), 3, b.tensors) == before);
  EXPECT_TRUE(b.tensors[0].storage == params);
  EXPECT_EQ(polyak_blend_to_params(b.h.get(), off, POLYAK_BLEND_ANY_WEIGHTS, nullptr), POLYAK_OK);
}

TEST(Blend, ShadowsWithWeightZeroAreNotRead)
{
  // with zero_init, a shadow whose every beta was 1 has no average; a blend
  // that gives it no weight does not need one
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[1].schedule.beta = 1.0;
  cfg.zero_init = 1;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 100);
  std::mt19937_64 rng(91);
  tensors[0].randomize(rng);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK);
  std::vector<float> dst(100);
  const double first[2] = {1, 0}, both[2] = {0.5, 0.5};
  EXPECT_EQ(polyak_get_blend(h.get(), first, 0, 0, dst.data(), POLYAK_F32, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_get_blend(h.get(), both, 0, 0, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_STATE);
}

TEST(Blend, ShardedHandlesRefuseBlendsForNow)
{
  polyak_config cfg = cpu_config(2);
  cfg.world_size = 2;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 100);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  const double weights[2] = {0.5, 0.5};
  EXPECT_EQ(polyak_blend_to_params(h.get(), weights, 0, nullptr), POLYAK_ERR_UNSUPPORTED);
}

} // namespace
