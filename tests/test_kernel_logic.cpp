// test_kernel_logic.cpp: the fused CUDA kernel's own per-chunk code
// (kernels/update_chunk.h), run on the CPU for every block and thread index
// over a whole plan, must produce the CPU backend's bits exactly: heads,
// 16-byte vector middles, tails, misaligned starts, every dtype pair,
// K = 1..8, the guard, stochastic rounding (bf16, and f32 shadows that ask
// for it) and Lookahead's write-back into the params. This runs without a
// GPU.
#include "test_util.h"

#include <cstdlib>

#include "polyak_internal.h"
#include "layerwise.h"
#include "update_chunk.h"

using namespace polyak_test;

namespace {

constexpr int kBlockThreads = 256;

struct AlignedArena {
  void *data = nullptr;
  explicit AlignedArena(size_t num_bytes)
  {
    data = std::aligned_alloc(64, (num_bytes + 63) / 64 * 64 + 64);
  }
  ~AlignedArena()
  {
    std::free(data);
  }
};

// The GPU run emulated: `grid` blocks walking the chunks grid-stride, each
// thread of each block taking its share, sequentially; `descs` is the
// plan's tensor table pointing at the emulation's own params. With LAWA
// betas ([tensor][POLYAK_MAX_SHADOWS]) each chunk resolves its weights.
int64_t run_kernel_logic(const polyak_t *p, const std::vector<polyak_tensor_desc> &descs, void *const *shadows,
                         const polyak_update_args &all_chunks, int grid, int threads,
                         const double *layer_beta = nullptr)
{
  int64_t nonfinite = 0;
  polyak_update_args args = all_chunks;
  for (int block = 0; block < grid; block++)
    for (int64_t c = block; c < p->num_chunks; c += grid)
      for (int thread = 0; thread < threads; thread++) {
        const polyak_chunk &chunk = p->chunks[c];
        const polyak_tensor_desc &t = descs[chunk.tensor];
        if (layer_beta) {
          double grad_norm_c[POLYAK_MAX_SHADOWS], beta0[POLYAK_MAX_SHADOWS];
          polyak_adaptive_arrays(&p->cfg, grad_norm_c, beta0);
          polyak_resolve_layerwise(&args, beta0, layer_beta + (int64_t)chunk.tensor * POLYAK_MAX_SHADOWS);
        }
        // the kernel the launcher picks (update.cu): f32 shadows' stochastic
        // rounding only in the kernel for handles that use it
        if (p->cfg.shadow_dtype != POLYAK_F32)
          nonfinite += polyak_update_chunk<POLYAK_BF16, false>(t, chunk, shadows, args, thread, threads);
        else if (args.stochastic_f32)
          nonfinite += polyak_update_chunk<POLYAK_F32, true>(t, chunk, shadows, args, thread, threads);
        else
          nonfinite += polyak_update_chunk<POLYAK_F32, false>(t, chunk, shadows, args, thread, threads);
      }
  return nonfinite;
}

// The args polyak_update computes for `step` after the handle's last update.
polyak_update_args args_for(const polyak_t *p, int64_t step)
{
  float weight[POLYAK_MAX_SHADOWS];
  for (int k = 0; k < p->cfg.num_shadows; k++)
    weight[k] = (float)(1.0 - polyak_update_decay(p, k, p->last_step, step, p->updates_counted[k]));
  polyak_update_args args;
  polyak_update_args_init(p, step, step - p->last_step, weight, &args);
  if (p->grad_norm) { // as the kernel's first threads resolve them
    double grad_norm_c[POLYAK_MAX_SHADOWS], beta0[POLYAK_MAX_SHADOWS];
    polyak_adaptive_arrays(&p->cfg, grad_norm_c, beta0);
    polyak_apply_grad_norm(&args, grad_norm_c, *p->grad_norm, nullptr);
  }
  return args;
}

// Reads the reference handle's shadow k of tensor i in the shadow dtype and
// compares it to the emulated arena's slice, read out the same way (debiased
// with zero_init), bit for bit.
void expect_same_bits(polyak_t *reference, const void *arena, int k, int i)
{
  const polyak_tensor_desc &t = reference->descs[i];
  polyak_dtype dtype = reference->cfg.shadow_dtype;
  size_t bytes = dtype == POLYAK_F32 ? 4 : 2;
  double scale = reference->cfg.zero_init ? 1.0 / (1.0 - reference->beta_prod[k]) : 1.0;
  std::vector<char> expected(t.num_elems * bytes + 1), got(t.num_elems * bytes + 1);
  ASSERT_EQ(polyak_get_shadow(reference, k, i, expected.data(), dtype, nullptr), POLYAK_OK);
  const char *slice = static_cast<const char *>(arena) + t.shadow_offset_elems * bytes;
  for (int64_t e = 0; e < t.num_elems; e++)
    store_as(dtype, got.data(), e, polyak_debias(load_as(dtype, slice, e), scale));
  for (int64_t e = 0; e < t.num_elems; e++)
    if (std::memcmp(got.data() + e * bytes, expected.data() + e * bytes, bytes) != 0) {
      ADD_FAILURE() << "shadow " << k << " tensor " << reference->tensors[i].name << " element " << e
                    << " differs from the CPU backend";
      return;
    }
}

struct Case {
  polyak_config cfg;
  std::vector<Tensor> tensors;
  std::vector<int64_t> steps;
  bool poison = false;
  bool grad_norm = false; // a norm that changes every step, for the grad-norm shadows
  bool layerwise = false; // gradients for the LAWA shadows
};

// Runs `c` on a CPU handle and through the kernel logic on arenas that
// start as copies of the handle's initial shadows; compares every step.
void check_case(Case &c, int grid, int threads)
{
  std::mt19937_64 rng(77);
  for (auto &t : c.tensors)
    t.randomize(rng, 0.25f, 2.0f);
  Handle h = make_handle(c.cfg);
  add_all(h.get(), c.tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  polyak_t *p = h.get();
  size_t bytes = p->cfg.shadow_dtype == POLYAK_F32 ? 4 : 2;

  std::vector<std::unique_ptr<AlignedArena>> arenas;
  void *shadows[POLYAK_MAX_SHADOWS] = {};
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    arenas.push_back(std::make_unique<AlignedArena>(p->arena_elems * bytes));
    shadows[k] = arenas.back()->data;
    std::memset(shadows[k], 0, p->arena_elems * bytes);
    for (int i = 0; i < p->num_tensors && !p->cfg.zero_init; i++) {
      char *slice = static_cast<char *>(shadows[k]) + p->descs[i].shadow_offset_elems * bytes;
      ASSERT_EQ(polyak_get_shadow(p, k, i, slice, p->cfg.shadow_dtype, nullptr), POLYAK_OK);
    }
  }

  // the emulation's params: copies at the same alignments, so that params
  // the kernel writes (Lookahead) can be compared with the handle's
  std::vector<Tensor> own = c.tensors;
  std::vector<polyak_tensor_desc> descs(p->descs, p->descs + p->num_tensors);
  for (int i = 0; i < p->num_tensors; i++)
    descs[i].param = own[i].data();

  float norm = 0.0f;
  if (c.grad_norm) {
    ASSERT_EQ(polyak_set_grad_norm(p, &norm), POLYAK_OK);
  }
  std::vector<Tensor> grads = c.tensors;
  std::vector<void *> grad_table;
  for (auto &g : grads)
    grad_table.push_back(g.data());
  if (c.layerwise) {
    ASSERT_EQ(polyak_set_grads(p, grad_table.data()), POLYAK_OK);
  }
  int64_t count_before = 0, emulated_nonfinite = 0;
  for (int64_t step : c.steps) {
    norm = 0.37f * (float)step;
    for (size_t i = 0; i < c.tensors.size(); i++) {
      Tensor &t = c.tensors[i];
      t.randomize(rng, 0.25f, 2.0f);
      if (c.poison && t.num_elems > 0) { // heads, tails, chunk edges
        t.set(0, NAN);
        t.set(t.num_elems - 1, INFINITY);
        if (t.num_elems > 65536)
          t.set(65536, -INFINITY);
      }
      std::memcpy(own[i].data(), t.data(), t.num_elems * dtype_bytes(t.dtype));
      grads[i].randomize(rng, 0.0f, 0.1f * (float)(i % 5 + 1));
    }
    polyak_update_args args = args_for(p, step);
    ASSERT_EQ(polyak_update(p, step, nullptr), POLYAK_OK); // first: the emulation takes its LAWA betas
    std::vector<double> layer_beta(p->num_tensors * POLYAK_MAX_SHADOWS, 1.0), betas(p->num_tensors);
    for (int k = 0; k < p->cfg.num_shadows && c.layerwise; k++)
      if (p->cfg.shadows[k].layerwise_beta0 > 0.0) {
        ASSERT_EQ(polyak_get_layer_betas(p, k, betas.data()), POLYAK_OK);
        for (int i = 0; i < p->num_tensors; i++)
          layer_beta[i * POLYAK_MAX_SHADOWS + k] = betas[i];
      }
    emulated_nonfinite +=
        run_kernel_logic(p, descs, shadows, args, grid, threads, c.layerwise ? layer_beta.data() : nullptr);
    for (size_t i = 0; i < c.tensors.size(); i++)
      ASSERT_EQ(
          0, std::memcmp(own[i].data(), c.tensors[i].data(), c.tensors[i].num_elems * dtype_bytes(c.tensors[i].dtype)))
          << "params of tensor " << c.tensors[i].name << " after step " << step;
  }
  for (int k = 0; k < p->cfg.num_shadows; k++)
    for (int i = 0; i < p->num_tensors; i++)
      expect_same_bits(p, shadows[k], k, i);
  int64_t count = 0;
  ASSERT_EQ(polyak_nonfinite_count(p, &count), POLYAK_OK);
  EXPECT_EQ(emulated_nonfinite, count - count_before);
}

// Odd sizes, every dtype, starts at every alignment a dtype allows.
std::vector<Tensor> awkward_tensors()
{
  const int64_t sizes[] = {0, 1, 3, 4, 5, 65535, 65536, 65537, 130001, 9, 17, 8};
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16};
  std::vector<Tensor> tensors;
  int i = 0;
  for (int64_t size : sizes)
    for (polyak_dtype d : dtypes) {
      size_t unit = dtype_bytes(d);
      size_t offset = unit * (size_t)(i % (16 / unit)); // 0, 2, 4, ... 14 bytes
      tensors.emplace_back("t" + std::to_string(i), d, size, offset);
      i++;
    }
  return tensors;
}

TEST(KernelLogic, MatchesTheCpuBackendOnF32Shadows)
{
  Case c{cpu_config(1, 0.9), awkward_tensors(), {1, 2, 3, 7}};
  check_case(c, 7, kBlockThreads);
}

TEST(KernelLogic, MatchesTheCpuBackendOnBf16ShadowsWithStochasticRounding)
{
  Case c{cpu_config(2, 0.99), awkward_tensors(), {1, 2, 5}};
  c.cfg.shadow_dtype = POLYAK_BF16;
  c.cfg.seed = 2024;
  check_case(c, 5, kBlockThreads);
}

TEST(KernelLogic, MatchesTheCpuBackendOnStochasticF32Shadows)
{
  // stochastic and nearest shadows side by side, the guard, gaps, a
  // grad-norm shadow; then zero_init and start_step
  Case c{cpu_config(4, 0.99), awkward_tensors(), {1, 2, 5, 6, 30}};
  c.cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_POWER;
  c.cfg.shadows[3].grad_norm_c = 0.5;
  c.cfg.shadows[0].rounding = c.cfg.shadows[1].rounding = c.cfg.shadows[3].rounding = POLYAK_ROUND_STOCHASTIC;
  c.cfg.seed = 99;
  c.poison = true;
  c.grad_norm = true;
  check_case(c, 7, kBlockThreads);
  Case z{cpu_config(2, 0.9), awkward_tensors(), {2, 3, 9}};
  z.cfg.zero_init = 1;
  z.cfg.shadows[1].schedule.start_step = 2;
  z.cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
  z.cfg.skip_nonfinite = 0;
  z.poison = true;
  check_case(z, 5, kBlockThreads);
}

TEST(KernelLogic, EveryShadowCountFrom1To8)
{
  for (int num_shadows = 1; num_shadows <= 8; num_shadows++) {
    Case c{cpu_config(num_shadows), {}, {1, 4}};
    for (int k = 0; k < num_shadows; k++) {
      c.cfg.shadows[k].schedule.kind = (polyak_schedule_kind)(k % 7);
      c.cfg.shadows[k].schedule.beta = 0.5 + 0.06 * k;
    }
    c.cfg.shadow_dtype = num_shadows % 2 ? POLYAK_F32 : POLYAK_BF16;
    c.tensors.emplace_back("a", POLYAK_BF16, 65537, 6);
    c.tensors.emplace_back("b", POLYAK_F32, 1003, 4);
    c.tensors.emplace_back("c", POLYAK_F16, 77, 2);
    check_case(c, 3, kBlockThreads);
    if (HasFailure())
      FAIL() << "num_shadows " << num_shadows;
  }
}

TEST(KernelLogic, TheGuardCountsAndSkipsLikeTheCpuBackend)
{
  Case c{cpu_config(3), awkward_tensors(), {1, 2, 9}};
  c.poison = true;
  c.cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  check_case(c, 4, kBlockThreads);
  Case off{cpu_config(2), awkward_tensors(), {1, 2}};
  off.poison = true;
  off.cfg.skip_nonfinite = 0;
  off.cfg.shadow_dtype = POLYAK_BF16;
  check_case(off, 4, kBlockThreads);
}

TEST(KernelLogic, GapsZeroInitAndStartStep)
{
  Case c{cpu_config(3), awkward_tensors(), {2, 3, 10, 11, 50}};
  c.cfg.zero_init = 1;
  c.cfg.shadows[0].schedule.start_step = 3;
  c.cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  c.cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_POWER;
  check_case(c, 6, kBlockThreads);
}

TEST(KernelLogic, LookaheadWritesTheSlowWeightsBackLikeTheCpuBackend)
{
  struct {
    polyak_dtype shadow_dtype;
    bool poison;
    int skip_nonfinite;
    int rounding; // the slow weights'
  } variants[] = {{POLYAK_F32, false, 1, POLYAK_ROUND_NEAREST},
                  {POLYAK_BF16, false, 1, POLYAK_ROUND_NEAREST},
                  {POLYAK_F32, true, 1, POLYAK_ROUND_NEAREST},
                  {POLYAK_BF16, true, 0, POLYAK_ROUND_NEAREST},
                  {POLYAK_F32, true, 1, POLYAK_ROUND_STOCHASTIC}};
  for (auto v : variants) {
    Case c{cpu_config(3, 0.9), awkward_tensors(), {1, 2, 3, 4, 6, 8, 9}};
    c.cfg.lookahead_every = 2;
    c.cfg.shadows[2].schedule.beta = 0.5;
    c.cfg.shadows[2].rounding = v.rounding;
    c.cfg.shadow_dtype = v.shadow_dtype;
    c.cfg.skip_nonfinite = v.skip_nonfinite;
    c.poison = v.poison;
    check_case(c, 7, kBlockThreads);
    if (HasFailure())
      FAIL() << "shadow dtype " << v.shadow_dtype << " poison " << v.poison << " rounding " << v.rounding;
  }
  Case alone{cpu_config(1, 0.25), awkward_tensors(), {1, 2, 3, 5, 6}}; // no shadow between syncs
  alone.cfg.lookahead_every = 3;
  check_case(alone, 5, kBlockThreads);
}

TEST(KernelLogic, GradNormShadowsTakeTheWeightsTheKernelResolves)
{
  Case c{cpu_config(3, 0.9), awkward_tensors(), {1, 2, 5, 6}};
  c.cfg.shadows[0].grad_norm_c = 0.3;
  c.cfg.shadows[2].grad_norm_c = 1.0;
  c.cfg.shadow_dtype = POLYAK_BF16;
  c.grad_norm = true;
  check_case(c, 5, kBlockThreads);
}

TEST(KernelLogic, ShadowsInTheCallersMemoryMatchTheCpuBackend)
{
  for (int variant = 0; variant < 3; variant++) { // clean, poisoned, poisoned with stochastic f32 shadows
    bool poison = variant > 0;
    std::vector<Tensor> params = awkward_tensors(), shadows, emulated;
    const polyak_dtype dtypes[] = {POLYAK_BF16, POLYAK_F16, POLYAK_F32};
    polyak_config cfg = cpu_config(1, 0.9);
    cfg.seed = 5;
    cfg.shadows[0].rounding = variant == 2 ? POLYAK_ROUND_STOCHASTIC : POLYAK_ROUND_NEAREST;
    Handle h = make_handle(cfg);
    std::mt19937_64 rng(78);
    for (size_t i = 0; i < params.size(); i++) {
      polyak_dtype d = dtypes[i % 3];
      shadows.emplace_back("s", d, params[i].num_elems, dtype_bytes(d) * (i % 5));
      params[i].randomize(rng, 0.25f, 2.0f);
      int64_t shape[1] = {params[i].num_elems};
      ASSERT_EQ(polyak_add_with_shadow(h.get(), params[i].name.c_str(), params[i].data(), params[i].dtype, 1, shape,
                                       shadows[i].data(), d, i % 7 == 0 ? POLYAK_SHADOW_ROUND_NEAREST : 0),
                POLYAK_OK);
    }
    ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    polyak_t *p = h.get();
    std::vector<Tensor> own = params;
    emulated = shadows; // after finalize: the params, copied in
    std::vector<polyak_tensor_desc> descs(p->descs, p->descs + p->num_tensors);
    for (int i = 0; i < p->num_tensors; i++) {
      descs[i].param = own[i].data();
      descs[i].owned = p->descs[i].owned ? emulated[i].data() : nullptr;
    }
    for (int64_t step : {1, 2, 4}) {
      for (size_t i = 0; i < params.size(); i++) {
        params[i].randomize(rng, 0.25f, 2.0f);
        if (poison && params[i].num_elems > 2)
          params[i].set(1, NAN);
        std::memcpy(own[i].data(), params[i].data(), params[i].num_elems * dtype_bytes(params[i].dtype));
      }
      polyak_update_args args = args_for(p, step);
      int64_t nonfinite = run_kernel_logic(p, descs, nullptr, args, 9, kBlockThreads);
      int64_t before = 0, after = 0;
      ASSERT_EQ(polyak_nonfinite_count(p, &before), POLYAK_OK);
      ASSERT_EQ(polyak_update(p, step, nullptr), POLYAK_OK);
      ASSERT_EQ(polyak_nonfinite_count(p, &after), POLYAK_OK);
      EXPECT_EQ(nonfinite, after - before);
      for (size_t i = 0; i < shadows.size(); i++)
        ASSERT_EQ(
            0, std::memcmp(emulated[i].data(), shadows[i].data(), shadows[i].num_elems * dtype_bytes(shadows[i].dtype)))
            << params[i].name << " after step " << step << " variant " << variant;
    }
  }
}

TEST(KernelLogic, LayerwiseChunksTakeTheirTensorsWeights)
{
  Case c{cpu_config(3, 0.9), awkward_tensors(), {1, 2, 5}};
  c.cfg.shadows[0].layerwise_beta0 = 0.99;
  c.cfg.shadows[2].layerwise_beta0 = 0.9;
  c.cfg.shadow_dtype = POLYAK_BF16;
  c.layerwise = true;
  check_case(c, 6, kBlockThreads);
}

TEST(KernelLogic, ResultsDoNotDependOnGridOrBlockSize)
{
  for (int threads : {1, 32, 256, 1024}) {
    Case c{cpu_config(2), awkward_tensors(), {1, 3}};
    c.cfg.shadow_dtype = POLYAK_BF16;
    check_case(c, threads == 1 ? 1 : 13, threads);
  }
}

TEST(KernelLogic, HeadsAreScalarUntilParamAndShadowAlign)
{
  // the split the kernel makes, for each start phase of a 2-byte param
  polyak_tensor_desc t{};
  polyak_chunk chunk{0, 0, 1000};
  alignas(64) static uint16_t buffer[2048];
  for (int phase = 0; phase < 8; phase++) {
    t.param = buffer + phase;
    t.param_dtype = POLYAK_BF16;
    int64_t f32_head = polyak_chunk_head<POLYAK_BF16, POLYAK_F32>(t, chunk);
    int64_t bf16_head = polyak_chunk_head<POLYAK_BF16, POLYAK_BF16>(t, chunk);
    int64_t to_aligned = (8 - phase) % 8; // elements until 16-byte alignment
    EXPECT_EQ(f32_head, to_aligned % 4 == 0 ? to_aligned : 1000) << phase;
    EXPECT_EQ(bf16_head, to_aligned == 0 ? 0 : 1000) << phase;
  }
}

} // namespace
