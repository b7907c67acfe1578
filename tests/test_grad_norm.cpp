// test_grad_norm.cpp: shadows whose beta follows the gradient norm,
// beta = 1 - c / sqrt(1 + g^2), against float64: per step, over gaps
// (beta^gap), with zero_init's debias from the kept product, a non-finite
// norm, bad arguments, replays and checkpoints.
#include "test_util.h"

using namespace polyak_test;

namespace {

constexpr int64_t kElems = 1001;

// One f32 tensor, shadow 0 following the norm, shadow 1 a plain EMA.
struct NormRun {
  std::vector<Tensor> tensors;
  Handle h;
  float norm = 0.0f; // the trainer's scalar, written in place each step
  explicit NormRun(polyak_config cfg)
  {
    tensors.emplace_back("w", POLYAK_F32, kElems);
    std::mt19937_64 rng(41);
    tensors[0].randomize(rng);
    h = make_handle(cfg);
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    EXPECT_EQ(polyak_set_grad_norm(h.get(), &norm), POLYAK_OK) << polyak_last_error(h.get());
  }
  std::vector<double> params() const
  {
    std::vector<double> out(kElems);
    for (int64_t e = 0; e < kElems; e++)
      out[e] = tensors[0].get(e);
    return out;
  }
  // New params and norm for `step`, as the trainer makes them.
  void prepare(int64_t step, float grad_norm)
  {
    std::mt19937_64 rng(700 + step);
    tensors[0].randomize(rng, 1.0f, 2.0f);
    norm = grad_norm;
  }
  void update(int64_t step, float grad_norm)
  {
    prepare(step, grad_norm);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  double product(int k)
  {
    double value = -1;
    EXPECT_EQ(polyak_get_beta_product(h.get(), k, &value), POLYAK_OK) << polyak_last_error(h.get());
    return value;
  }
};

polyak_config grad_norm_config(double c)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[0].grad_norm_c = c;
  return cfg;
}

double beta_of(double c, float g)
{
  return 1.0 - c / std::sqrt(1.0 + (double)g * g);
}

void expect_near_all(const std::vector<float> &got, const std::vector<double> &want, const char *what)
{
  for (size_t e = 0; e < want.size(); e++)
    ASSERT_NEAR(got[e], want[e], 2e-6 * (1 + std::fabs(want[e]))) << what << " element " << e;
}

TEST(GradNorm, BetaIsOneMinusCOverRootOfOnePlusTheNormSquared)
{
  const double c = 0.2;
  NormRun run(grad_norm_config(c));
  std::vector<double> adaptive = run.params(), plain = run.params();
  double product = 1.0;
  const float norms[] = {0.0f, 0.5f, 3.0f, 100.0f, 1e-3f, 7.5f, 0.25f, 1e30f};
  int64_t step = 0;
  for (float g : norms) {
    run.update(++step, g);
    double beta = beta_of(c, g);
    auto p = run.params();
    for (int64_t e = 0; e < kElems; e++) {
      adaptive[e] = beta * adaptive[e] + (1 - beta) * p[e];
      plain[e] = 0.9 * plain[e] + 0.1 * p[e];
    }
    product *= beta;
    expect_near_all(read_shadow(run.h.get(), 0, 0, kElems), adaptive, "grad-norm shadow");
    expect_near_all(read_shadow(run.h.get(), 1, 0, kElems), plain, "plain shadow");
    // the same correctly rounded operations in the same order: the same bits
    EXPECT_EQ(run.product(0), product) << "step " << step;
  }
  EXPECT_NEAR(run.product(1), std::pow(0.9, (double)step), 1e-15);
}

TEST(GradNorm, AGapAppliesTheNormsBetaToEachSkippedStep)
{
  const double c = 0.5;
  NormRun run(grad_norm_config(c));
  std::vector<double> want = run.params();
  double product = 1.0;
  int64_t last = 0;
  for (auto [step, g] : std::vector<std::pair<int64_t, float>>{{1, 2.0f}, {4, 0.3f}, {10, 5.0f}, {11, 1.0f}}) {
    run.update(step, g);
    double decay = std::pow(beta_of(c, g), (double)(step - last));
    auto p = run.params();
    for (int64_t e = 0; e < kElems; e++)
      want[e] = decay * want[e] + (1 - decay) * p[e];
    product *= decay;
    last = step;
    expect_near_all(read_shadow(run.h.get(), 0, 0, kElems), want, "after a gap");
    EXPECT_NEAR(run.product(0), product, 1e-15 * product) << "step " << step;
  }
}

TEST(GradNorm, ZeroInitDebiasesWithTheKeptProduct)
{
  polyak_config cfg = grad_norm_config(0.3);
  cfg.zero_init = 1;
  NormRun run(cfg);
  std::vector<double> raw(kElems, 0.0);
  double product = 1.0;
  int64_t step = 0;
  for (float g : {1.0f, 0.1f, 4.0f}) {
    run.update(++step, g);
    double beta = beta_of(0.3, g);
    auto p = run.params();
    for (int64_t e = 0; e < kElems; e++)
      raw[e] = beta * raw[e] + (1 - beta) * p[e];
    product *= beta;
    std::vector<double> debiased(kElems);
    for (int64_t e = 0; e < kElems; e++)
      debiased[e] = raw[e] / (1 - product);
    expect_near_all(read_shadow(run.h.get(), 0, 0, kElems), debiased, "debiased");
  }
}

TEST(GradNorm, ANonFiniteNormLeavesItsShadowsAsTheyWere)
{
  NormRun run(grad_norm_config(0.2));
  run.update(1, 1.0f);
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    auto before = read_shadow(run.h.get(), 0, 0, kElems);
    auto plain_before = read_shadow(run.h.get(), 1, 0, kElems);
    double product = run.product(0);
    int64_t step = 0;
    ASSERT_EQ(polyak_get_step(run.h.get(), &step), POLYAK_OK);
    run.update(step + 1, bad);
    auto after = read_shadow(run.h.get(), 0, 0, kElems);
    for (int64_t e = 0; e < kElems; e++)
      ASSERT_EQ(after[e], before[e]) << e; // +0 may come back as -0's twin: compare values
    EXPECT_EQ(run.product(0), product);
    EXPECT_NE(read_shadow(run.h.get(), 1, 0, kElems), plain_before) << "the plain EMA moves on";
  }
}

TEST(GradNorm, BadArgumentsAreRefusedAndChangeNothing)
{
  for (double c : {-0.1, 1.5, (double)NAN, (double)INFINITY}) {
    polyak_config cfg = grad_norm_config(c);
    EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_ERR_INVALID_ARG) << c;
  }
  struct Conflict {
    const char *part;
    void (*set)(polyak_config &);
  } conflicts[] = {
      {"start_step", [](polyak_config &c) { c.shadows[0].schedule.start_step = 5; }},
      {"count_updates", [](polyak_config &c) { c.shadows[0].count_updates = 1; }},
      {"Lookahead",
       [](polyak_config &c) {
         c.lookahead_every = 2;
         c.shadows[1].grad_norm_c = 0.1;
       }},
  };
  for (auto &conflict : conflicts) {
    polyak_config cfg = grad_norm_config(0.2);
    conflict.set(cfg);
    char why[256];
    EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_INVALID_ARG) << conflict.part;
    EXPECT_TRUE(contains(why, conflict.part)) << why;
  }

  // a handle without such shadows takes no norm
  Handle plain = make_handle(cpu_config(1));
  float norm = 1.0f;
  EXPECT_EQ(polyak_set_grad_norm(plain.get(), &norm), POLYAK_ERR_STATE);

  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 100);
  std::mt19937_64 rng(5);
  tensors[0].randomize(rng);
  Handle h = make_handle(grad_norm_config(0.2));
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  Snapshot before = snapshot(h.get(), 2, tensors);
  EXPECT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_ERR_STATE) << "no norm yet";
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "polyak_set_grad_norm"));
  EXPECT_EQ(polyak_graph_reserve(h.get(), 1, 4, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_set_grad_norm(h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  alignas(8) char bytes[8] = {};
  EXPECT_EQ(polyak_set_grad_norm(h.get(), reinterpret_cast<const float *>(bytes + 1)), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_ERR_STATE) << "the bad pointers were not kept";
  EXPECT_TRUE(snapshot(h.get(), 2, tensors) == before);

  double product = -1;
  EXPECT_EQ(polyak_get_beta_product(h.get(), 0, &product), POLYAK_OK);
  EXPECT_EQ(product, 1.0) << "before any update";
  EXPECT_EQ(polyak_get_beta_product(h.get(), 2, &product), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_beta_product(h.get(), -1, &product), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_beta_product(h.get(), 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_beta_product(nullptr, 0, &product), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_set_grad_norm(nullptr, &norm), POLYAK_ERR_INVALID_ARG);
}

TEST(GradNorm, ReplaysAndCheckpointsGiveTheBitsOfDirectUpdates)
{
  polyak_config cfg = grad_norm_config(0.4);
  cfg.shadow_dtype = POLYAK_BF16;
  cfg.zero_init = 1;
  NormRun direct(cfg), graphed(cfg), resumed(cfg);
  auto norm_at = [](int64_t step) { return 0.3f * (float)step; };
  TempDir dir;
  for (int64_t step : {1, 2}) {
    direct.update(step, norm_at(step));
    graphed.update(step, norm_at(step));
    resumed.update(step, norm_at(step));
  }
  ASSERT_EQ(polyak_save(resumed.h.get(), dir.file("gn").c_str()), POLYAK_OK);
  NormRun loaded(cfg);
  ASSERT_EQ(polyak_load(loaded.h.get(), dir.file("gn").c_str()), POLYAK_OK) << polyak_last_error(loaded.h.get());
  EXPECT_EQ(loaded.product(0), resumed.product(0));
  // replays from step 5: the first reserved step covers the gap from 2
  ASSERT_EQ(polyak_graph_reserve(graphed.h.get(), 5, 4, nullptr), POLYAK_OK);
  for (int64_t step = 5; step <= 8; step++) {
    graphed.prepare(step, norm_at(step));
    ASSERT_EQ(polyak_graph_update(graphed.h.get(), nullptr), POLYAK_OK);
    direct.update(step, norm_at(step));
    loaded.update(step, norm_at(step));
  }
  ASSERT_EQ(polyak_graph_release(graphed.h.get(), nullptr), POLYAK_OK);
  Snapshot want = snapshot(direct.h.get(), 2, direct.tensors);
  EXPECT_TRUE(snapshot(graphed.h.get(), 2, graphed.tensors) == want);
  EXPECT_TRUE(snapshot(loaded.h.get(), 2, loaded.tensors) == want);
  EXPECT_EQ(graphed.product(0), direct.product(0));
  EXPECT_EQ(loaded.product(0), direct.product(0));
  EXPECT_EQ(read_shadow(graphed.h.get(), 0, 0, kElems), read_shadow(direct.h.get(), 0, 0, kElems));

  polyak_config other_cfg = cfg;
  other_cfg.shadows[0].grad_norm_c = 0.5;
  NormRun other(other_cfg);
  EXPECT_EQ(polyak_load(other.h.get(), dir.file("gn").c_str()), POLYAK_ERR_MISMATCH);
}

} // namespace
