// test_lookahead.cpp: Lookahead's slow weights (the last shadow with
// lookahead_every = k) against float64: syncs at multiples of k fold the
// params in and write the slow weights back, in each param's dtype; other
// steps leave them alone; gaps over a sync are refused; replays and
// checkpoints give the bits of direct updates.
#include "test_util.h"

using namespace polyak_test;

namespace {

// A trainer whose inner optimizer adds a step-dependent nudge to every
// param: runs with the same history end with the same bits.
struct Trainer {
  std::vector<Tensor> tensors;
  Handle h;
  explicit Trainer(const polyak_config &cfg)
  {
    tensors.emplace_back("f32", POLYAK_F32, 1001);
    tensors.emplace_back("bf16", POLYAK_BF16, 777, 2);
    tensors.emplace_back("f16", POLYAK_F16, 65, 6);
    std::mt19937_64 rng(31);
    for (auto &t : tensors)
      t.randomize(rng);
    h = make_handle(cfg);
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  void inner_step(int64_t step)
  {
    std::mt19937_64 rng(500 + step);
    std::normal_distribution<float> nudge(0.0f, 0.1f);
    for (auto &t : tensors)
      for (int64_t e = 0; e < t.num_elems; e++)
        t.set(e, t.get(e) + nudge(rng));
  }
  void step(int64_t step)
  {
    inner_step(step);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  std::vector<std::vector<char>> param_bytes() const
  {
    std::vector<std::vector<char>> out;
    for (auto &t : tensors) {
      const char *data = static_cast<const char *>(t.data());
      out.emplace_back(data, data + t.num_elems * dtype_bytes(t.dtype));
    }
    return out;
  }
};

polyak_config lookahead_config(int64_t every, double alpha)
{
  polyak_config cfg = cpu_config(2, 0.9); // shadow 0: an EMA beside it
  cfg.lookahead_every = every;
  cfg.shadows[1].schedule.beta = 1.0 - alpha;
  return cfg;
}

// float64 values of a tensor's params
std::vector<double> values(const Tensor &t)
{
  std::vector<double> out(t.num_elems);
  for (int64_t e = 0; e < t.num_elems; e++)
    out[e] = t.get(e);
  return out;
}

double ulp_of(polyak_dtype d)
{
  return d == POLYAK_F32 ? 0x1p-23 : d == POLYAK_BF16 ? 0x1p-7 : 0x1p-10;
}

TEST(Lookahead, FollowsTheAlgorithmInFloat64)
{
  const int64_t every = 3;
  const double alpha = 0.5;
  Trainer run(lookahead_config(every, alpha));
  std::vector<std::vector<double>> slow, ema;
  for (auto &t : run.tensors) {
    slow.push_back(values(t));
    ema.push_back(values(t));
  }
  for (int64_t step = 1; step <= 12; step++) {
    run.inner_step(step);
    auto before = run.param_bytes();
    std::vector<std::vector<float>> slow_before;
    for (size_t i = 0; i < run.tensors.size(); i++)
      slow_before.push_back(read_shadow(run.h.get(), 1, (int)i, run.tensors[i].num_elems));
    const bool sync = step % every == 0;
    for (size_t i = 0; i < run.tensors.size(); i++) {
      auto fast = values(run.tensors[i]);
      for (size_t e = 0; e < fast.size(); e++) {
        ema[i][e] = 0.9 * ema[i][e] + 0.1 * fast[e]; // the EMA folds the fast weights
        if (sync)
          slow[i][e] += alpha * (fast[e] - slow[i][e]);
      }
    }
    ASSERT_EQ(polyak_update(run.h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(run.h.get());
    for (size_t i = 0; i < run.tensors.size(); i++) {
      const Tensor &t = run.tensors[i];
      auto got_slow = read_shadow(run.h.get(), 1, (int)i, t.num_elems);
      auto got_ema = read_shadow(run.h.get(), 0, (int)i, t.num_elems);
      for (int64_t e = 0; e < t.num_elems; e++) {
        ASSERT_NEAR(got_ema[e], ema[i][e], 1e-5 * (1 + std::fabs(ema[i][e]))) << t.name << " " << e;
        if (!sync) { // the slow weights and the params stay as they were
          ASSERT_EQ(float_bits(got_slow[e]), float_bits(slow_before[i][e])) << t.name << " " << e;
          continue;
        }
        ASSERT_NEAR(got_slow[e], slow[i][e], 1e-5 * (1 + std::fabs(slow[i][e]))) << t.name << " " << e;
        // the params are the slow weights, rounded to nearest even into their dtype
        std::vector<char> want(4);
        store_as(t.dtype, want.data(), 0, got_slow[e]);
        ASSERT_EQ(0, std::memcmp(static_cast<const char *>(t.data()) + e * dtype_bytes(t.dtype), want.data(),
                                 dtype_bytes(t.dtype)))
            << t.name << " element " << e << " after step " << step;
        ASSERT_NEAR(t.get(e), slow[i][e], 1e-5 + ulp_of(t.dtype) * std::fabs(slow[i][e])) << t.name << " " << e;
      }
      if (!sync) {
        ASSERT_EQ(run.param_bytes()[i], before[i]) << "params change only at syncs";
      }
    }
  }
}

TEST(Lookahead, TheFirstSyncsAfterStartStepCountForItsSchedule)
{
  // an EQUAL schedule over syncs: the slow weights are the mean of the fast
  // weights at the syncs after start_step (a copy up to it)
  polyak_config cfg = lookahead_config(2, 0.5);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[1].schedule.start_step = 3;
  Trainer run(cfg);
  std::vector<std::vector<double>> fast_at_sync;
  for (int64_t step = 1; step <= 8; step++) {
    run.inner_step(step);
    if (step % 2 == 0)
      fast_at_sync.push_back(values(run.tensors[0]));
    ASSERT_EQ(polyak_update(run.h.get(), step, nullptr), POLYAK_OK);
  }
  // syncs at 2 (a copy: step <= start_step), 4 (t 0: beta 0), 6 (t 1), 8 (t 2):
  // the mean of the fast weights at 4, 6 and 8, where each sync's fast
  // weights started from the last sync's slow ones
  auto got = read_shadow(run.h.get(), 1, 0, run.tensors[0].num_elems);
  for (int64_t e = 0; e < run.tensors[0].num_elems; e++) {
    double want = (fast_at_sync[1][e] + fast_at_sync[2][e] + fast_at_sync[3][e]) / 3;
    ASSERT_NEAR(got[e], want, 1e-5 * (1 + std::fabs(want))) << e;
  }
}

TEST(Lookahead, TheGuardKeepsTheSlowWeightsAndTheSyncRepairsTheParams)
{
  polyak_config cfg = cpu_config(1, 0.5);
  cfg.lookahead_every = 2;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 33);
  std::mt19937_64 rng(12);
  tensors[0].randomize(rng);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  auto start = read_shadow(h.get(), 0, 0, 33);
  Tensor &w = tensors[0];
  w.set(0, NAN);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK); // no sync: nothing written
  EXPECT_TRUE(std::isnan(w.get(0)));
  w.set(1, INFINITY);
  ASSERT_EQ(polyak_update(h.get(), 2, nullptr), POLYAK_OK); // sync
  auto slow = read_shadow(h.get(), 0, 0, 33);
  EXPECT_EQ(float_bits(slow[0]), float_bits(start[0])) << "a NaN param leaves its slow weight";
  EXPECT_EQ(float_bits(slow[1]), float_bits(start[1]));
  EXPECT_EQ(float_bits(w.get(0)), float_bits(start[0])) << "and gets it back";
  EXPECT_EQ(float_bits(w.get(1)), float_bits(start[1]));
  for (int64_t e = 2; e < 33; e++)
    EXPECT_EQ(float_bits(w.get(e)), float_bits(slow[e])) << e;
  int64_t count = 0;
  ASSERT_EQ(polyak_nonfinite_count(h.get(), &count), POLYAK_OK);
  EXPECT_EQ(count, 3); // 1 at step 1, 2 at step 2
}

TEST(Lookahead, BetweenSyncsTheSlowWeightsAreNotTouchedEvenWithoutTheGuard)
{
  polyak_config cfg = lookahead_config(4, 0.5);
  cfg.skip_nonfinite = 0;
  Trainer run(cfg);
  auto start = read_shadow(run.h.get(), 1, 0, run.tensors[0].num_elems);
  run.tensors[0].set(5, NAN); // an optimizer step gone bad, then repaired before the sync
  ASSERT_EQ(polyak_update(run.h.get(), 1, nullptr), POLYAK_OK);
  auto slow = read_shadow(run.h.get(), 1, 0, run.tensors[0].num_elems);
  EXPECT_TRUE(std::isnan(read_shadow(run.h.get(), 0, 0, run.tensors[0].num_elems)[5])) << "the EMA takes the NaN";
  for (size_t e = 0; e < slow.size(); e++)
    ASSERT_EQ(float_bits(slow[e]), float_bits(start[e])) << e;
}

TEST(Lookahead, UpdatesThatSkipASyncAreRefusedAndChangeNothing)
{
  Trainer run(lookahead_config(5, 0.5));
  run.step(3);
  auto params = run.param_bytes();
  Snapshot before = snapshot(run.h.get(), 2, run.tensors);
  EXPECT_EQ(polyak_update(run.h.get(), 7, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(run.h.get()), "skips the Lookahead sync at step 5"))
      << polyak_last_error(run.h.get());
  EXPECT_EQ(polyak_graph_reserve(run.h.get(), 6, 10, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(snapshot(run.h.get(), 2, run.tensors) == before);
  EXPECT_EQ(run.param_bytes(), params);
  run.step(5);
  ASSERT_EQ(polyak_graph_reserve(run.h.get(), 10, 3, nullptr), POLYAK_OK) << "10 is the next sync";
  ASSERT_EQ(polyak_graph_release(run.h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_graph_reserve(run.h.get(), 11, 3, nullptr), POLYAK_ERR_INVALID_ARG);
}

TEST(Lookahead, ConfigIsValidated)
{
  struct Bad {
    const char *what;
    void (*set)(polyak_config &);
    polyak_status status;
  } bad[] = {
      {"lookahead_every", [](polyak_config &c) { c.lookahead_every = -1; }, POLYAK_ERR_INVALID_ARG},
      {"zero_init", [](polyak_config &c) { c.zero_init = 1; }, POLYAK_ERR_INVALID_ARG},
      {"alpha", [](polyak_config &c) { c.shadows[1].schedule.beta = 1.0; }, POLYAK_ERR_INVALID_ARG},
      {"alpha",
       [](polyak_config &c) {
         c.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
         c.shadows[1].schedule.beta = 1.0;
       },
       POLYAK_ERR_INVALID_ARG},
      {"sharded", [](polyak_config &c) { c.world_size = 2; }, POLYAK_ERR_UNSUPPORTED},
  };
  for (auto &b : bad) {
    polyak_config cfg = lookahead_config(4, 0.5);
    b.set(cfg);
    polyak_t *p = nullptr;
    EXPECT_EQ(polyak_create(&p, &cfg), b.status) << b.what;
    EXPECT_EQ(p, nullptr);
    char why[256];
    polyak_check_config(&cfg, why, sizeof why);
    EXPECT_TRUE(contains(why, "Lookahead") || contains(why, "lookahead")) << why;
  }
  polyak_config equal = lookahead_config(4, 0.5);
  equal.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL; // never 1: fine
  EXPECT_EQ(polyak_check_config(&equal, nullptr, 0), POLYAK_OK);
}

TEST(Lookahead, ReplaysAndCheckpointsGiveTheBitsOfDirectUpdates)
{
  polyak_config cfg = lookahead_config(3, 0.5);
  cfg.shadow_dtype = POLYAK_BF16;
  Trainer direct(cfg), graphed(cfg), resumed(cfg);
  TempDir dir;
  for (int64_t step = 1; step <= 4; step++) {
    direct.step(step);
    resumed.step(step);
  }
  ASSERT_EQ(polyak_save(resumed.h.get(), dir.file("la").c_str()), POLYAK_OK);
  resumed.h = make_handle(cfg); // a restarted process: its params carry on, its handle loads
  add_all(resumed.h.get(), resumed.tensors);
  ASSERT_EQ(polyak_finalize(resumed.h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_load(resumed.h.get(), dir.file("la").c_str()), POLYAK_OK) << polyak_last_error(resumed.h.get());
  ASSERT_EQ(polyak_graph_reserve(graphed.h.get(), 1, 9, nullptr), POLYAK_OK);
  for (int64_t step = 1; step <= 9; step++) {
    graphed.inner_step(step);
    ASSERT_EQ(polyak_graph_update(graphed.h.get(), nullptr), POLYAK_OK);
    if (step > 4) {
      direct.step(step);
      resumed.step(step);
    }
  }
  ASSERT_EQ(polyak_graph_release(graphed.h.get(), nullptr), POLYAK_OK);
  EXPECT_TRUE(snapshot(graphed.h.get(), 2, graphed.tensors) == snapshot(direct.h.get(), 2, direct.tensors));
  EXPECT_TRUE(snapshot(resumed.h.get(), 2, resumed.tensors) == snapshot(direct.h.get(), 2, direct.tensors));
  EXPECT_EQ(graphed.param_bytes(), direct.param_bytes());
  EXPECT_EQ(resumed.param_bytes(), direct.param_bytes());

  polyak_config other = lookahead_config(4, 0.5);
  other.shadow_dtype = POLYAK_BF16;
  Trainer mismatched(other);
  EXPECT_EQ(polyak_load(mismatched.h.get(), dir.file("la").c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(mismatched.h.get()), "lookahead_every"))
      << polyak_last_error(mismatched.h.get());
}

} // namespace
