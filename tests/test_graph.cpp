// test_graph.cpp: steps reserved for CUDA-graph replays. The CPU backend
// implements the same calls, so their semantics are checked here without a
// GPU: replays give the bits of direct updates, the host state catches up at
// release, and misuse is refused.
#include "test_util.h"

#include <chrono>

using namespace polyak_test;

namespace {

struct Pair {
  std::vector<Tensor> tensors;
  Handle direct, graphed;
  explicit Pair(const polyak_config &cfg)
  {
    tensors.emplace_back("w", POLYAK_BF16, 65537, 2);
    tensors.emplace_back("b", POLYAK_F32, 5);
    std::mt19937_64 rng(90);
    for (auto &t : tensors)
      t.randomize(rng);
    direct = make_handle(cfg);
    graphed = make_handle(cfg);
    add_all(direct.get(), tensors);
    add_all(graphed.get(), tensors);
    EXPECT_EQ(polyak_finalize(direct.get(), nullptr), POLYAK_OK);
    EXPECT_EQ(polyak_finalize(graphed.get(), nullptr), POLYAK_OK);
  }
  void perturb(int seed)
  {
    std::mt19937_64 rng(seed);
    for (auto &t : tensors)
      t.randomize(rng);
  }
};

polyak_config mixed_config()
{
  polyak_config cfg = cpu_config(3);
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[2].schedule.beta = 0.95;
  cfg.shadow_dtype = POLYAK_BF16;
  cfg.seed = 5;
  return cfg;
}

TEST(Graph, ReplaysGiveTheBitsOfDirectUpdates)
{
  polyak_config stochastic_f32 = mixed_config(); // stochastic f32 shadows beside a nearest one
  stochastic_f32.shadow_dtype = POLYAK_F32;
  stochastic_f32.shadows[0].rounding = stochastic_f32.shadows[2].rounding = POLYAK_ROUND_STOCHASTIC;
  for (const polyak_config &cfg : {mixed_config(), stochastic_f32}) {
    Pair pair(cfg);
    ASSERT_EQ(polyak_update(pair.direct.get(), 2, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_update(pair.graphed.get(), 2, nullptr), POLYAK_OK);
    // a gap before the first reserved step, then 100 consecutive replays
    ASSERT_EQ(polyak_graph_reserve(pair.graphed.get(), 6, 100, nullptr), POLYAK_OK);
    for (int64_t step = 6; step < 106; step++) {
      pair.perturb((int)step);
      ASSERT_EQ(polyak_update(pair.direct.get(), step, nullptr), POLYAK_OK);
      ASSERT_EQ(polyak_graph_update(pair.graphed.get(), nullptr), POLYAK_OK);
    }
    int64_t done = -1;
    ASSERT_EQ(polyak_graph_release(pair.graphed.get(), &done), POLYAK_OK);
    EXPECT_EQ(done, 100);
    EXPECT_TRUE(snapshot(pair.direct.get(), 3, pair.tensors) == snapshot(pair.graphed.get(), 3, pair.tensors))
        << "shadow dtype " << cfg.shadow_dtype;
  }
}

TEST(Graph, ReleaseCatchesTheHostUpWithTheReplays)
{
  polyak_config cfg = cpu_config(1, 0.9);
  cfg.zero_init = 1;
  Pair pair(cfg);
  ASSERT_EQ(polyak_graph_reserve(pair.graphed.get(), 1, 10, nullptr), POLYAK_OK);
  for (int64_t step = 1; step <= 4; step++) {
    ASSERT_EQ(polyak_update(pair.direct.get(), step, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_graph_update(pair.graphed.get(), nullptr), POLYAK_OK);
  }
  std::vector<float> dst(65537);
  EXPECT_EQ(polyak_get_shadow(pair.graphed.get(), 0, 0, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_STATE)
      << "zero_init debias needs the replay count";
  int64_t done = -1;
  ASSERT_EQ(polyak_graph_release(pair.graphed.get(), &done), POLYAK_OK);
  EXPECT_EQ(done, 4);
  int64_t step = 0;
  ASSERT_EQ(polyak_get_step(pair.graphed.get(), &step), POLYAK_OK);
  EXPECT_EQ(step, 4);
  // debiased read-outs agree, and direct updates continue from step 5
  EXPECT_TRUE(snapshot(pair.direct.get(), 1, pair.tensors) == snapshot(pair.graphed.get(), 1, pair.tensors));
  EXPECT_EQ(polyak_update(pair.graphed.get(), 4, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_update(pair.graphed.get(), 5, nullptr), POLYAK_OK);
}

TEST(Graph, ReplaysPastTheReservationAreDroppedAndReported)
{
  Pair pair(cpu_config(1, 0.9));
  ASSERT_EQ(polyak_graph_reserve(pair.graphed.get(), 1, 3, nullptr), POLYAK_OK);
  for (int replay = 0; replay < 5; replay++)
    ASSERT_EQ(polyak_graph_update(pair.graphed.get(), nullptr), POLYAK_OK);
  for (int64_t step = 1; step <= 3; step++)
    ASSERT_EQ(polyak_update(pair.direct.get(), step, nullptr), POLYAK_OK);
  int64_t done = -1;
  EXPECT_EQ(polyak_graph_release(pair.graphed.get(), &done), POLYAK_ERR_STATE);
  EXPECT_NE(std::string(polyak_last_error(pair.graphed.get())).find("2 replays"), std::string::npos)
      << polyak_last_error(pair.graphed.get());
  EXPECT_EQ(done, 3);
  EXPECT_TRUE(snapshot(pair.direct.get(), 1, pair.tensors) == snapshot(pair.graphed.get(), 1, pair.tensors));
}

TEST(Graph, ReservationsFollowOneAnotherAndSurviveALoad)
{
  TempDir dir;
  const std::string path = dir.file("ema");
  Pair pair(mixed_config());
  polyak_t *g = pair.graphed.get();
  int64_t done = -1;
  ASSERT_EQ(polyak_graph_reserve(g, 1, 5, nullptr), POLYAK_OK);
  for (int i = 0; i < 5; i++)
    ASSERT_EQ(polyak_graph_update(g, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_graph_release(g, &done), POLYAK_OK);
  ASSERT_EQ(polyak_save(g, path.c_str()), POLYAK_OK);
  ASSERT_EQ(polyak_graph_reserve(g, 6, 3, nullptr), POLYAK_OK);
  for (int i = 0; i < 3; i++)
    ASSERT_EQ(polyak_graph_update(g, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_graph_release(g, &done), POLYAK_OK);
  ASSERT_EQ(polyak_load(g, path.c_str()), POLYAK_OK) << polyak_last_error(g); // back to step 5
  ASSERT_EQ(polyak_graph_reserve(g, 6, 2, nullptr), POLYAK_OK);
  for (int i = 0; i < 2; i++)
    ASSERT_EQ(polyak_graph_update(g, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_graph_release(g, &done), POLYAK_OK);
  for (int64_t step = 1; step <= 7; step++)
    ASSERT_EQ(polyak_update(pair.direct.get(), step, nullptr), POLYAK_OK);
  EXPECT_TRUE(snapshot(pair.direct.get(), 3, pair.tensors) == snapshot(g, 3, pair.tensors));
}

TEST(Graph, MisuseIsRefusedAndChangesNothing)
{
  Pair pair(cpu_config(1, 0.9));
  polyak_t *p = pair.graphed.get();
  ASSERT_EQ(polyak_update(p, 3, nullptr), POLYAK_OK);
  Snapshot before = snapshot(p, 1, pair.tensors);
  EXPECT_EQ(polyak_graph_update(p, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_graph_release(p, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_graph_reserve(p, 3, 10, nullptr), POLYAK_ERR_INVALID_ARG) << "not after step 3";
  EXPECT_EQ(polyak_graph_reserve(p, 4, 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_graph_reserve(p, 4, INT64_MAX, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_graph_reserve(nullptr, 4, 1, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(snapshot(p, 1, pair.tensors) == before);
  ASSERT_EQ(polyak_graph_reserve(p, 4, 10, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_graph_reserve(p, 20, 10, nullptr), POLYAK_ERR_STATE) << "one reservation at a time";
  EXPECT_EQ(polyak_update(p, 4, nullptr), POLYAK_ERR_STATE) << "steps 4.. belong to the replays";
  int64_t done = -1;
  EXPECT_EQ(polyak_graph_release(p, &done), POLYAK_OK);
  EXPECT_EQ(done, 0);
  EXPECT_TRUE(snapshot(p, 1, pair.tensors) == before);
  Handle unfinalized = make_handle(cpu_config());
  EXPECT_EQ(polyak_graph_reserve(unfinalized.get(), 1, 1, nullptr), POLYAK_ERR_STATE);
}

TEST(Graph, AReservationTooLargeForItsTableIsRefusedAtOnce)
{
  // 1e9 steps would be a 4 GB table of weights and a pass of 1e9 rows to
  // fill it: refused, saying how many one reservation holds
  Pair pair(mixed_config());
  polyak_t *p = pair.graphed.get();
  ASSERT_EQ(polyak_update(p, 2, nullptr), POLYAK_OK);
  Snapshot before = snapshot(p, 3, pair.tensors);
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(polyak_graph_reserve(p, 3, 1000000000, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 0.1);
  EXPECT_TRUE(contains(polyak_last_error(p), "num_steps = 1000000000 is more than one reservation holds "
                                             "(POLYAK_MAX_GRAPH_STEPS = 4194304"))
      << polyak_last_error(p);
  EXPECT_EQ(polyak_graph_reserve(p, 3, POLYAK_MAX_GRAPH_STEPS + 1, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(snapshot(p, 3, pair.tensors) == before);
  // the limit itself is a reservation, after a gap as long as any
  ASSERT_EQ(polyak_graph_reserve(p, (int64_t)1 << 40, POLYAK_MAX_GRAPH_STEPS, nullptr), POLYAK_OK)
      << polyak_last_error(p);
  ASSERT_EQ(polyak_graph_update(p, nullptr), POLYAK_OK);
  int64_t done = 0;
  ASSERT_EQ(polyak_graph_release(p, &done), POLYAK_OK);
  EXPECT_EQ(done, 1);
  ASSERT_EQ(polyak_update(pair.direct.get(), 2, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(pair.direct.get(), (int64_t)1 << 40, nullptr), POLYAK_OK);
  EXPECT_TRUE(snapshot(p, 3, pair.tensors) == snapshot(pair.direct.get(), 3, pair.tensors));
}

TEST(Graph, SourcesOfTheUpdateCannotChangeWhileStepsAreReserved)
{
  // replays read the grad norm and LAWA's norms or gradients set at
  // reserve time: a change during the reservation is refused, and it
  // changes nothing (the replays still read what was set before)
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[0].grad_norm_c = 0.3;
  cfg.shadows[1].layerwise_beta0 = 0.95;
  Pair pair(cfg);
  float norm = 2.0f, other_norm = 7.0f;
  std::vector<float> layer_norms = {0.5f, 1.5f}, other_layer_norms = {3.0f, 0.1f};
  std::vector<void *> grads;
  for (auto &t : pair.tensors)
    grads.push_back(t.data());
  for (polyak_t *p : {pair.direct.get(), pair.graphed.get()}) {
    ASSERT_EQ(polyak_set_grad_norm(p, &norm), POLYAK_OK);
    ASSERT_EQ(polyak_set_layer_norms(p, layer_norms.data()), POLYAK_OK);
  }
  polyak_t *p = pair.graphed.get();
  ASSERT_EQ(polyak_graph_reserve(p, 1, 3, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_set_grad_norm(p, &other_norm), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(p), "polyak_graph_release")) << polyak_last_error(p);
  EXPECT_EQ(polyak_set_layer_norms(p, other_layer_norms.data()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_set_grads(p, grads.data()), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(p), "polyak_set_grads")) << polyak_last_error(p);
  for (int64_t step = 1; step <= 3; step++) {
    pair.perturb(300 + (int)step);
    ASSERT_EQ(polyak_graph_update(p, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_update(pair.direct.get(), step, nullptr), POLYAK_OK);
  }
  ASSERT_EQ(polyak_graph_release(p, nullptr), POLYAK_OK);
  EXPECT_TRUE(snapshot(p, 2, pair.tensors) == snapshot(pair.direct.get(), 2, pair.tensors));
  // released: the calls work again, and the next reservation reads them
  for (polyak_t *h : {pair.direct.get(), pair.graphed.get()}) {
    ASSERT_EQ(polyak_set_grad_norm(h, &other_norm), POLYAK_OK);
    ASSERT_EQ(polyak_set_grads(h, grads.data()), POLYAK_OK) << polyak_last_error(h);
  }
  ASSERT_EQ(polyak_graph_reserve(p, 4, 1, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_graph_update(p, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_graph_release(p, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(pair.direct.get(), 4, nullptr), POLYAK_OK);
  EXPECT_TRUE(snapshot(p, 2, pair.tensors) == snapshot(pair.direct.get(), 2, pair.tensors));
}

} // namespace
