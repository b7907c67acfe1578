// test_layerwise.cpp: layer-wise adaptive decay (LAWA), beta_l = beta0
// exp(-|g_l| / sum_j |g_j|), against float64: from gradients and from norms
// given, over gaps, with a non-finite gradient, replays and checkpoints,
// bad arguments; and the polynomial exp it uses.
#include "test_util.h"

#include "layerwise.h"

using namespace polyak_test;

namespace {

// Params with a gradient of the same dtype each, at different scales.
struct LawaRun {
  std::vector<Tensor> params, grads;
  Handle h;
  explicit LawaRun(const polyak_config &cfg, bool from_grads = true)
  {
    const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16, POLYAK_F32};
    const int64_t sizes[] = {1001, 777, 65537, 0};
    for (int i = 0; i < 4; i++) {
      params.emplace_back("t" + std::to_string(i), dtypes[i], sizes[i], i == 1 ? 2 : 0);
      grads.emplace_back("g" + std::to_string(i), dtypes[i], sizes[i], i == 2 ? 6 : 0);
    }
    std::mt19937_64 rng(61);
    for (auto &t : params)
      t.randomize(rng);
    h = make_handle(cfg);
    add_all(h.get(), params);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    if (from_grads) {
      std::vector<void *> table;
      for (auto &g : grads)
        table.push_back(g.data());
      EXPECT_EQ(polyak_set_grads(h.get(), table.data()), POLYAK_OK) << polyak_last_error(h.get());
    }
  }
  // This step's params and gradients (tensor i's gradients at scale i + 1).
  void prepare(int64_t step)
  {
    std::mt19937_64 rng(600 + step);
    for (size_t i = 0; i < params.size(); i++) {
      params[i].randomize(rng, 1.0f, 2.0f);
      grads[i].randomize(rng, 0.0f, 0.01f * (float)(i + 1) * (float)step);
    }
  }
  void update(int64_t step)
  {
    prepare(step);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  // The float64 betas of this step's gradients.
  std::vector<double> oracle_betas(double beta0) const
  {
    std::vector<double> norms;
    double total = 0;
    for (auto &g : grads) {
      double sq = 0;
      for (int64_t e = 0; e < g.num_elems; e++)
        sq += (double)g.get(e) * g.get(e);
      norms.push_back(std::sqrt(sq));
      total += norms.back();
    }
    std::vector<double> betas;
    for (double n : norms)
      betas.push_back(beta0 * std::exp(-n / total));
    return betas;
  }
  std::vector<double> betas(int k)
  {
    std::vector<double> out(params.size());
    EXPECT_EQ(polyak_get_layer_betas(h.get(), k, out.data()), POLYAK_OK) << polyak_last_error(h.get());
    return out;
  }
};

polyak_config lawa_config(double beta0)
{
  polyak_config cfg = cpu_config(2, 0.9); // shadow 1: a plain EMA beside it
  cfg.shadows[0].layerwise_beta0 = beta0;
  return cfg;
}

TEST(Layerwise, ExpPolynomialIsCorrectToAFewUlps)
{
  for (int i = 0; i <= 100000; i++) {
    double x = -(double)i / 100000;
    double want = std::exp(x), got = polyak_exp_unit(x);
    ASSERT_NEAR(got, want, 4 * std::nextafter(want, 2.0) - 4 * want) << x;
  }
}

TEST(Layerwise, BetasFollowEachTensorsShareOfTheGradientNorm)
{
  const double beta0 = 0.99;
  LawaRun run(lawa_config(beta0));
  std::vector<std::vector<double>> shadow, plain;
  for (auto &t : run.params) {
    std::vector<double> v(t.num_elems);
    for (int64_t e = 0; e < t.num_elems; e++)
      v[e] = t.get(e);
    shadow.push_back(v);
    plain.push_back(v);
  }
  int64_t last = 0;
  for (int64_t step : {1, 2, 3, 6}) {
    run.prepare(step);
    auto beta = run.oracle_betas(beta0);
    ASSERT_EQ(polyak_update(run.h.get(), step, nullptr), POLYAK_OK);
    auto got_beta = run.betas(0);
    for (size_t i = 0; i < run.params.size(); i++) {
      if (run.params[i].num_elems > 0) { // an empty tensor's norm is 0: beta0
        EXPECT_NEAR(got_beta[i], beta[i], 1e-6 * beta[i]) << "tensor " << i << " step " << step;
      }
      double decay = std::pow(beta[i], (double)(step - last)), plain_decay = std::pow(0.9, (double)(step - last));
      for (int64_t e = 0; e < run.params[i].num_elems; e++) {
        double p = run.params[i].get(e);
        shadow[i][e] = decay * shadow[i][e] + (1 - decay) * p;
        plain[i][e] = plain_decay * plain[i][e] + (1 - plain_decay) * p;
      }
      auto got = read_shadow(run.h.get(), 0, (int)i, run.params[i].num_elems);
      auto got_plain = read_shadow(run.h.get(), 1, (int)i, run.params[i].num_elems);
      for (int64_t e = 0; e < run.params[i].num_elems; e++) {
        ASSERT_NEAR(got[e], shadow[i][e], 1e-5 * (1 + std::fabs(shadow[i][e]))) << i << " " << e << " step " << step;
        ASSERT_NEAR(got_plain[e], plain[i][e], 1e-5 * (1 + std::fabs(plain[i][e]))) << i << " " << e;
      }
    }
    last = step;
  }
  EXPECT_EQ(run.betas(0)[3], beta0) << "an empty tensor has no share";
}

TEST(Layerwise, TheSameGradientsGiveTheSameBits)
{
  polyak_config cfg = lawa_config(0.95);
  cfg.shadow_dtype = POLYAK_BF16;
  LawaRun a(cfg), b(cfg);
  for (int64_t step : {1, 2, 4}) {
    a.update(step);
    b.update(step);
  }
  EXPECT_TRUE(snapshot(a.h.get(), 2, a.params) == snapshot(b.h.get(), 2, b.params));
  auto ba = a.betas(0), bb = b.betas(0);
  for (size_t i = 0; i < ba.size(); i++)
    EXPECT_EQ(std::memcmp(&ba[i], &bb[i], sizeof(double)), 0) << i;
}

TEST(Layerwise, NormsCanBeGivenInsteadOfGradients)
{
  LawaRun run(lawa_config(0.9), false);
  std::vector<float> norms = {3.0f, 1.0f, 0.0f, 0.5f};
  ASSERT_EQ(polyak_set_layer_norms(run.h.get(), norms.data()), POLYAK_OK);
  run.update(1);
  auto got = run.betas(0);
  for (size_t i = 0; i < norms.size(); i++)
    EXPECT_NEAR(got[i], 0.9 * std::exp(-norms[i] / 4.5), 1e-15) << i;
  norms = {0, 0, 0, 0}; // read when the update runs; all zero: every share is 0
  run.update(2);
  for (double beta : run.betas(0))
    EXPECT_EQ(beta, 0.9);
  auto before = read_shadow(run.h.get(), 0, 0, 1001);
  norms = {-1.0f, 2.0f, 1.0f, 1.0f}; // a negative norm is no norm: the step leaves the shadows
  run.update(3);
  for (double beta : run.betas(0))
    EXPECT_EQ(beta, 1.0);
  EXPECT_EQ(read_shadow(run.h.get(), 0, 0, 1001), before);
}

TEST(Layerwise, ANonFiniteGradientLeavesTheShadowsForTheStep)
{
  LawaRun run(lawa_config(0.9));
  run.update(1);
  auto before = read_shadow(run.h.get(), 0, 0, 1001), plain_before = read_shadow(run.h.get(), 1, 0, 1001);
  run.prepare(2);
  run.grads[2].set(100, INFINITY);
  ASSERT_EQ(polyak_update(run.h.get(), 2, nullptr), POLYAK_OK);
  auto after = read_shadow(run.h.get(), 0, 0, 1001);
  for (int64_t e = 0; e < 1001; e++)
    ASSERT_EQ(after[e], before[e]) << e;
  for (double beta : run.betas(0))
    EXPECT_EQ(beta, 1.0);
  EXPECT_NE(read_shadow(run.h.get(), 1, 0, 1001), plain_before) << "the plain EMA moves on";
}

TEST(Layerwise, BadArgumentsAreRefusedAndChangeNothing)
{
  for (double beta0 : {-0.1, 1.5, (double)NAN}) {
    polyak_config cfg = lawa_config(beta0);
    EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_ERR_INVALID_ARG) << beta0;
  }
  struct Conflict {
    const char *part;
    polyak_status status;
    void (*set)(polyak_config &);
  } conflicts[] = {
      {"start_step", POLYAK_ERR_INVALID_ARG, [](polyak_config &c) { c.shadows[0].schedule.start_step = 2; }},
      {"count_updates", POLYAK_ERR_INVALID_ARG, [](polyak_config &c) { c.shadows[0].count_updates = 1; }},
      {"grad_norm_c", POLYAK_ERR_INVALID_ARG, [](polyak_config &c) { c.shadows[0].grad_norm_c = 0.1; }},
      {"zero_init", POLYAK_ERR_INVALID_ARG, [](polyak_config &c) { c.zero_init = 1; }},
      {"world_size", POLYAK_ERR_UNSUPPORTED, [](polyak_config &c) { c.world_size = 2; }},
  };
  for (auto &conflict : conflicts) {
    polyak_config cfg = lawa_config(0.9);
    conflict.set(cfg);
    char why[256];
    EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), conflict.status) << conflict.part;
    EXPECT_TRUE(contains(why, conflict.part)) << why;
  }

  LawaRun run(lawa_config(0.9), false);
  Snapshot before = snapshot(run.h.get(), 2, run.params);
  EXPECT_EQ(polyak_update(run.h.get(), 1, nullptr), POLYAK_ERR_STATE) << "no gradients yet";
  EXPECT_EQ(polyak_graph_reserve(run.h.get(), 1, 2, nullptr), POLYAK_ERR_STATE);
  double betas[4];
  EXPECT_EQ(polyak_get_layer_betas(run.h.get(), 0, betas), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_set_grads(run.h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  std::vector<void *> table = {run.grads[0].data(), nullptr, run.grads[2].data(), nullptr};
  EXPECT_EQ(polyak_set_grads(run.h.get(), table.data()), POLYAK_ERR_INVALID_ARG) << "grads[1] is NULL";
  table[1] = static_cast<char *>(run.grads[1].data()) + 1;
  EXPECT_EQ(polyak_set_grads(run.h.get(), table.data()), POLYAK_ERR_INVALID_ARG) << "misaligned";
  EXPECT_EQ(polyak_set_layer_norms(run.h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_update(run.h.get(), 1, nullptr), POLYAK_ERR_STATE) << "nothing was kept";
  EXPECT_TRUE(snapshot(run.h.get(), 2, run.params) == before);
  table[1] = run.grads[1].data();
  ASSERT_EQ(polyak_set_grads(run.h.get(), table.data()), POLYAK_OK);
  EXPECT_EQ(polyak_get_layer_betas(run.h.get(), 1, betas), POLYAK_ERR_INVALID_ARG) << "shadow 1 is not layer-wise";
  EXPECT_EQ(polyak_get_layer_betas(run.h.get(), 0, nullptr), POLYAK_ERR_INVALID_ARG);
  double product;
  EXPECT_EQ(polyak_get_beta_product(run.h.get(), 0, &product), POLYAK_ERR_INVALID_ARG) << "per tensor";

  Handle plain = make_handle(cpu_config(1));
  EXPECT_EQ(polyak_set_grads(plain.get(), table.data()), POLYAK_ERR_STATE);
  Handle unfinalized = make_handle(lawa_config(0.9));
  EXPECT_EQ(polyak_set_grads(unfinalized.get(), table.data()), POLYAK_ERR_STATE);
}

TEST(Layerwise, ReplaysAndCheckpointsGiveTheBitsOfDirectUpdates)
{
  polyak_config cfg = lawa_config(0.97);
  LawaRun direct(cfg), graphed(cfg), resumed(cfg);
  TempDir dir;
  for (int64_t step : {1, 2}) {
    direct.update(step);
    graphed.update(step);
    resumed.update(step);
  }
  ASSERT_EQ(polyak_save(resumed.h.get(), dir.file("lawa").c_str()), POLYAK_OK);
  LawaRun loaded(cfg);
  ASSERT_EQ(polyak_load(loaded.h.get(), dir.file("lawa").c_str()), POLYAK_OK) << polyak_last_error(loaded.h.get());
  ASSERT_EQ(polyak_graph_reserve(graphed.h.get(), 4, 3, nullptr), POLYAK_OK); // a gap of 2 first
  for (int64_t step = 4; step <= 6; step++) {
    graphed.prepare(step);
    ASSERT_EQ(polyak_graph_update(graphed.h.get(), nullptr), POLYAK_OK);
    direct.update(step);
    loaded.update(step);
  }
  ASSERT_EQ(polyak_graph_release(graphed.h.get(), nullptr), POLYAK_OK);
  Snapshot want = snapshot(direct.h.get(), 2, direct.params);
  EXPECT_TRUE(snapshot(graphed.h.get(), 2, graphed.params) == want);
  EXPECT_TRUE(snapshot(loaded.h.get(), 2, loaded.params) == want);

  polyak_config other = lawa_config(0.98);
  LawaRun mismatched(other);
  EXPECT_EQ(polyak_load(mismatched.h.get(), dir.file("lawa").c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(mismatched.h.get()), "layerwise_beta0"))
      << polyak_last_error(mismatched.h.get());
}

} // namespace
