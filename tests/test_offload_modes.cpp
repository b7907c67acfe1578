// test_offload_modes.cpp: an offloaded handle (shadows in host memory, its
// device side the stand-in) gives the CPU backend's bits in every mode:
// schedules and gaps, several shadows, bf16 and stochastic rounding, the
// guard, zero_init, counted updates, grad-norm and layer-wise shadows,
// Lookahead's write-back, copy-only tensors, hard updates, evaluation,
// blends, post-hoc synthesis, checkpoints both ways, sharded slices.
#include "offload_pair.h"

using namespace polyak_test;

namespace {

polyak_config config(int num_shadows, int cpu_threads = 1)
{
  polyak_config cfg = cpu_config(num_shadows, 0.9);
  cfg.cpu_threads = cpu_threads;
  cfg.shadow_location = POLYAK_SHADOWS_HOST; // the CPU handle: its own shadows anyway
  return cfg;
}

} // namespace

TEST(OffloadModes, SchedulesGapsAndTheGuardGiveTheCpuBackendsBits)
{
  polyak_config cfg = config(3, 3);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[1].schedule.beta = 0.9999;
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  Pair pair(cfg, odd_specs());
  pair.train({1, 2, 3, 5, 9, 10, 17}, true);
  pair.expect_same();
}

TEST(OffloadModes, Bf16ShadowsRoundStochasticallyAsOnTheCpu)
{
  polyak_config cfg = config(2, 2);
  cfg.shadow_dtype = POLYAK_BF16;
  cfg.seed = 1234567;
  cfg.shadows[1].schedule.beta = 0.999;
  Pair pair(cfg, odd_specs(), 64 << 10, 2);
  pair.train({1, 2, 4, 8});
  pair.expect_same();
}

TEST(OffloadModes, StochasticF32ShadowsAndZeroInit)
{
  polyak_config cfg = config(2);
  cfg.zero_init = 1;
  cfg.seed = 99;
  cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_COSINE;
  cfg.shadows[1].schedule.ramp_steps = 5;
  Pair pair(cfg, odd_specs(), 16 << 10, 3);
  pair.train({1, 3, 4, 6});
  pair.expect_same();
}

TEST(OffloadModes, CountedUpdatesStartStepsAndPowerShadows)
{
  polyak_config cfg = config(3, 2);
  cfg.shadows[0].count_updates = 1;
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_TF;
  cfg.shadows[1].schedule.start_step = 3;
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_POWER;
  Pair pair(cfg, odd_specs(), 16 << 10, 4);
  pair.train({2, 3, 4, 7, 8});
  pair.expect_same();
}

TEST(OffloadModes, GradNormShadowsReadTheNormFromTheDevice)
{
  polyak_config cfg = config(2);
  cfg.shadows[1].grad_norm_c = 0.5;
  Pair pair(cfg, odd_specs(), 16 << 10, 5);
  pair.train({1, 2, 5, 6});
  pair.expect_same();
}

TEST(OffloadModes, LayerwiseShadowsReadTheNormsFromTheDevice)
{
  polyak_config cfg = config(2, 2);
  cfg.shadows[0].layerwise_beta0 = 0.99;
  Pair pair(cfg, odd_specs(), 16 << 10, 6);
  pair.train({1, 2, 3, 7});
  pair.expect_same();
  std::vector<double> a(pair.specs.size()), b(pair.specs.size());
  ASSERT_EQ(polyak_get_layer_betas(pair.cpu.get(), 0, a.data()), POLYAK_OK);
  ASSERT_EQ(polyak_get_layer_betas(pair.off.get(), 0, b.data()), POLYAK_OK);
  EXPECT_EQ(a, b);
}

TEST(OffloadModes, LookaheadWritesTheParamsBackAtEachSync)
{
  polyak_config cfg = config(2, 2);
  cfg.lookahead_every = 3;
  cfg.shadows[1].schedule.beta = 0.5;
  Pair pair(cfg, odd_specs(), 16 << 10, 7);
  pair.finalize();
  for (int64_t step = 1; step <= 7; step++) {
    pair.set_params(2000 + (uint64_t)step);
    pair.update(step);
    pair.expect_params_same(); // at 3 and 6 the slow weights, else the trainer's
  }
  pair.expect_same();
}

TEST(OffloadModes, HardUpdatesCopyTheParams)
{
  polyak_config cfg = config(2);
  Pair pair(cfg, odd_specs(), 16 << 10, 8);
  pair.train({1, 2});
  pair.set_params(77);
  ASSERT_EQ(polyak_hard_update(pair.cpu.get(), 1, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_hard_update(pair.off.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(pair.off.get());
  pair.expect_same();
  // a non-finite param is refused alike, nothing written
  pair.set_params(78, nullptr, true);
  EXPECT_EQ(polyak_hard_update(pair.cpu.get(), 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_hard_update(pair.off.get(), 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_NE(std::string(polyak_last_error(pair.off.get())).find("\"b\""), std::string::npos)
      << polyak_last_error(pair.off.get());
  pair.expect_same();
}

TEST(OffloadModes, EvaluationBlendsAndTheirReadOutsWriteTheDeviceParams)
{
  polyak_config cfg = config(2, 2);
  cfg.zero_init = 1;
  Pair pair(cfg, odd_specs(), 16 << 10, 9);
  pair.train({1, 2, 3});
  for (polyak_t *p : {pair.cpu.get(), pair.off.get()}) {
    ASSERT_EQ(polyak_store(p, nullptr), POLYAK_OK) << polyak_last_error(p);
    ASSERT_EQ(polyak_copy_to_params(p, 1, nullptr), POLYAK_OK) << polyak_last_error(p);
  }
  pair.expect_params_same();
  const double weights[2] = {0.25, 0.75};
  for (polyak_t *p : {pair.cpu.get(), pair.off.get()})
    ASSERT_EQ(polyak_blend_to_params(p, weights, 0, nullptr), POLYAK_OK) << polyak_last_error(p);
  pair.expect_params_same();
  for (polyak_t *p : {pair.cpu.get(), pair.off.get()})
    ASSERT_EQ(polyak_restore(p, nullptr), POLYAK_OK) << polyak_last_error(p);
  pair.expect_params_same();
  // a blend of one tensor into host and into device memory
  int64_t n = pair.specs[6].num_elems;
  std::vector<uint16_t> want(n), got(n);
  void *dst = pair.standin.device_alloc(n * 2);
  ASSERT_EQ(polyak_get_blend(pair.cpu.get(), weights, 0, 6, want.data(), POLYAK_BF16, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_get_blend(pair.off.get(), weights, 0, 6, dst, POLYAK_BF16, nullptr), POLYAK_OK);
  pair.standin.read_device(nullptr, got.data(), dst, n * 2);
  EXPECT_EQ(want, got);
  ASSERT_EQ(polyak_get_blend(pair.off.get(), weights, 0, 6, got.data(), POLYAK_BF16, nullptr), POLYAK_OK);
  EXPECT_EQ(want, got);
  pair.expect_same();
}

TEST(OffloadModes, PostHocSynthesisFromSnapshotsInHostMemory)
{
  polyak_config cfg = config(2, 2);
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_POWER;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_POWER;
  cfg.shadows[1].schedule.gamma = 16.97;
  Pair pair(cfg, odd_specs(), 16 << 10, 10);
  pair.train({1, 2, 3, 4});
  int64_t elems = 0;
  ASSERT_EQ(polyak_snapshot_elems(pair.off.get(), &elems), POLYAK_OK);
  std::vector<float> a(2 * elems), b(2 * elems);
  for (int k = 0; k < 2; k++) {
    ASSERT_EQ(polyak_snapshot(pair.cpu.get(), k, a.data() + k * elems, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_snapshot(pair.off.get(), k, b.data() + k * elems, nullptr), POLYAK_OK);
  }
  ASSERT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
  const double coefficients[2] = {0.6, 0.4};
  ASSERT_EQ(polyak_synthesize_to_params(pair.cpu.get(), a.data(), 2, coefficients, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_synthesize_to_params(pair.off.get(), b.data(), 2, coefficients, nullptr), POLYAK_OK)
      << polyak_last_error(pair.off.get());
  pair.expect_params_same();
  // from device memory: refused, the params untouched
  float *device = static_cast<float *>(pair.standin.device_alloc(2 * elems * sizeof(float)));
  EXPECT_EQ(polyak_synthesize_to_params(pair.off.get(), device, 2, coefficients, nullptr), POLYAK_ERR_UNSUPPORTED);
  pair.expect_params_same();
}

TEST(OffloadModes, CheckpointsLoadBothWaysAndTheUpdatesGoOn)
{
  polyak_config cfg = config(2, 2);
  cfg.shadow_dtype = POLYAK_BF16;
  Pair pair(cfg, odd_specs(), 16 << 10, 11);
  pair.train({1, 2, 3});
  std::vector<char> from_cpu = Pair::checkpoint(pair.cpu.get());
  pair.set_params(5);
  ASSERT_EQ(polyak_update(pair.off.get(), 4, nullptr), POLYAK_OK); // moved away, then back by the load
  ASSERT_EQ(polyak_load_from_memory(pair.off.get(), from_cpu.data(), from_cpu.size()), POLYAK_OK)
      << polyak_last_error(pair.off.get());
  pair.expect_same();
  pair.set_params(6);
  pair.update(5);
  pair.expect_same();
  // the offloaded handle's checkpoint into a fresh CPU handle
  std::vector<char> from_off = Pair::checkpoint(pair.off.get());
  Handle fresh = make_handle(cfg);
  for (size_t i = 0; i < pair.specs.size(); i++) {
    int64_t shape[1] = {pair.specs[i].num_elems};
    auto add = pair.specs[i].copy_only ? polyak_add_copy : polyak_add;
    ASSERT_EQ(add(fresh.get(), pair.specs[i].name.c_str(), pair.host[i].data(), pair.specs[i].dtype, 1, shape),
              POLYAK_OK);
  }
  ASSERT_EQ(polyak_finalize(fresh.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_load_from_memory(fresh.get(), from_off.data(), from_off.size()), POLYAK_OK)
      << polyak_last_error(fresh.get());
  EXPECT_EQ(Pair::checkpoint(fresh.get()), from_off);
}

TEST(OffloadModes, ShardedRanksOffloadTheirSlices)
{
  const int world = 3;
  for (int rank = 0; rank < world; rank++) {
    polyak_config cfg = config(2, 2);
    cfg.world_size = world;
    cfg.rank = rank;
    cfg.shadow_dtype = POLYAK_BF16;
    Pair pair(cfg, odd_specs(), 16 << 10, 12);
    pair.checkpoints = false; // sharded saves gather (a communicator)
    pair.train({1, 2, 4});
    pair.expect_same();
    // every rank scans the whole params before a hard update, and refuses alike
    pair.set_params(9, nullptr, true);
    EXPECT_EQ(polyak_hard_update(pair.cpu.get(), 1, nullptr), POLYAK_ERR_INVALID_ARG) << "rank " << rank;
    EXPECT_EQ(polyak_hard_update(pair.off.get(), 1, nullptr), POLYAK_ERR_INVALID_ARG) << "rank " << rank;
    pair.set_params(10);
    ASSERT_EQ(polyak_hard_update(pair.cpu.get(), 1, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_hard_update(pair.off.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(pair.off.get());
    pair.expect_same();
  }
}
