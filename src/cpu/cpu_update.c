/* cpu_update.c: one chunk of the CPU update, and the portable kernels it is
 * made of. A chunk is worked through in blocks of CPU_BLOCK_ELEMS: the
 * block's params as f32 (read in place for f32 params, widened into an L1
 * scratch otherwise), folded into each shadow in turn by one kernel call,
 * then Lookahead's write-back. The kernels are plain loops over the
 * functions of polyak_math.h; the AVX2 and AVX-512 tables
 * (cpu_update_avx2.c, cpu_update_avx512.c) give the same bits faster, and
 * polyak_cpu_pick_kernels chooses among them. The element math is the GPU
 * kernel's, so the CPU backend defines the bits both produce. */
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "layerwise.h"

/* ---- the portable kernels ---------------------------------------------------- */

static int64_t f32_nearest(float *shadow, const float *param, int64_t num_elems, float weight, int guard)
{
  return cpu_f32_nearest_loop(shadow, param, 0, num_elems, weight, guard);
}

static int64_t f32_stochastic(float *shadow, const float *param, int64_t num_elems, float weight, int guard,
                              uint64_t key, int64_t first_elem)
{
  return cpu_f32_stochastic_loop(shadow, param, 0, num_elems, weight, guard, key, first_elem);
}

static int64_t bf16_stochastic(uint16_t *shadow, const float *param, int64_t num_elems, float weight, int guard,
                               uint64_t key, int64_t first_elem)
{
  return cpu_half_stochastic_loop(shadow, param, 0, num_elems, weight, guard, key, first_elem, POLYAK_BF16);
}

static int64_t f16_stochastic(uint16_t *shadow, const float *param, int64_t num_elems, float weight, int guard,
                              uint64_t key, int64_t first_elem)
{
  return cpu_half_stochastic_loop(shadow, param, 0, num_elems, weight, guard, key, first_elem, POLYAK_F16);
}

static int64_t count_nonfinite(const float *param, int64_t num_elems)
{
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < num_elems; i++)
    nonfinite += !polyak_is_finite(param[i]);
  return nonfinite;
}

static void bf16_to_f32(float *dst, const uint16_t *src, int64_t num_elems)
{
  for (int64_t i = 0; i < num_elems; i++)
    dst[i] = polyak_bf16_to_f32(src[i]);
}

static void f16_to_f32(float *dst, const uint16_t *src, int64_t num_elems)
{
  for (int64_t i = 0; i < num_elems; i++)
    dst[i] = polyak_f16_to_f32(src[i]);
}

static void f32_to_bf16(uint16_t *dst, const float *src, int64_t num_elems)
{
  for (int64_t i = 0; i < num_elems; i++)
    dst[i] = polyak_f32_to_bf16_rne(src[i]);
}

static void sumsq_row(float *acc, const float *row, int64_t num_elems)
{
  for (int64_t t = 0; t < num_elems; t++)
    acc[t] = fmaf(row[t], row[t], acc[t]);
}

const cpu_kernels polyak_cpu_portable_kernels = {
    .isa = "portable",
    .f32_nearest = f32_nearest,
    .f32_stochastic = f32_stochastic,
    .bf16_stochastic = bf16_stochastic,
    .f16_stochastic = f16_stochastic,
    .count_nonfinite = count_nonfinite,
    .bf16_to_f32 = bf16_to_f32,
    .f16_to_f32 = f16_to_f32,
    .f32_to_bf16 = f32_to_bf16,
    .sumsq_row = sumsq_row,
};

/* The widest table the CPU runs, capped by POLYAK_CPU_ISA: read at each
 * finalize (no state of its own), so that a benchmark or a test can hold a
 * handle to AVX2 or to the reference on a CPU that has more. */
const cpu_kernels *polyak_cpu_pick_kernels(void)
{
  const char *cap = getenv("POLYAK_CPU_ISA");
  const cpu_kernels *avx512 = polyak_cpu_avx512_kernels(), *avx2 = polyak_cpu_avx2_kernels();
  if (!cap || !*cap || strcmp(cap, "avx512") == 0)
    return avx512 ? avx512 : avx2 ? avx2 : &polyak_cpu_portable_kernels;
  if (strcmp(cap, "avx2") == 0)
    return avx2 ? avx2 : &polyak_cpu_portable_kernels;
  return strcmp(cap, "portable") == 0 ? &polyak_cpu_portable_kernels : NULL;
}

/* ---- one chunk ------------------------------------------------------------------ */

/* Elements of a block starting at chunk-relative `done`: at most
 * CPU_BLOCK_ELEMS, and none past a multiple of 2^32 in the global index,
 * so that a kernel's hash counters share their high 32 bits. */
static int64_t block_elems(const polyak_tensor_desc *t, const polyak_chunk *chunk, int64_t done)
{
  int64_t rest = chunk->num_elems - done, elem = t->global_offset_elems + chunk->first_elem + done;
  int64_t to_boundary = (int64_t)((((uint64_t)elem >> 32) + 1) << 32) - elem;
  int64_t n = rest < CPU_BLOCK_ELEMS ? rest : CPU_BLOCK_ELEMS;
  return n < to_boundary ? n : to_boundary;
}

/* Elements first .. first + num_elems - 1 of `base` (a polyak_dtype
 * array) as f32: in place for F32, else widened into scratch. */
static const float *as_f32(const cpu_kernels *kernels, const void *base, int dtype, int64_t first, int64_t num_elems,
                           float *scratch)
{
  if (dtype == POLYAK_F32)
    return (const float *)base + first;
  if (dtype == POLYAK_BF16)
    kernels->bf16_to_f32(scratch, (const uint16_t *)base + first, num_elems);
  else
    kernels->f16_to_f32(scratch, (const uint16_t *)base + first, num_elems);
  return scratch;
}

/* One shadow of a block: `shadow` points at the block's first element. */
static int64_t fold(const cpu_kernels *kernels, void *shadow, polyak_dtype dtype, int stochastic, const float *param,
                    int64_t num_elems, float weight, int guard, uint64_t key, int64_t elem)
{
  if (dtype == POLYAK_BF16)
    return kernels->bf16_stochastic(shadow, param, num_elems, weight, guard, key, elem);
  if (stochastic)
    return kernels->f32_stochastic(shadow, param, num_elems, weight, guard, key, elem);
  return kernels->f32_nearest(shadow, param, num_elems, weight, guard);
}

/* Lookahead: params first .. first + num_elems - 1 <- the slow weights
 * (`slow`, the block's first), rounded to nearest even. */
static void write_back(const cpu_kernels *kernels, const polyak_tensor_desc *t, int64_t first, int64_t num_elems,
                       const void *slow, polyak_dtype shadow_dtype)
{
  void *param = t->param;
  if (shadow_dtype == POLYAK_F32 && t->param_dtype == POLYAK_F32)
    memcpy((float *)param + first, slow, (size_t)num_elems * sizeof(float));
  else if (shadow_dtype == POLYAK_F32 && t->param_dtype == POLYAK_BF16)
    kernels->f32_to_bf16((uint16_t *)param + first, slow, num_elems);
  else
    for (int64_t i = 0; i < num_elems; i++)
      polyak_store_f32(param, first + i, polyak_load_f32(slow, i, shadow_dtype), t->param_dtype);
}

/* A chunk of a tensor whose shadow is the caller's (its only one), in the
 * dtype and rounding the tensor has: the update's kernels where they fit,
 * polyak_next_owned element by element otherwise. */
static int64_t update_owned_chunk(const cpu_kernels *kernels, const polyak_tensor_desc *t, const polyak_chunk *chunk,
                                  const polyak_update_args *args)
{
  float scratch[CPU_BLOCK_ELEMS];
  int64_t nonfinite = 0;
  int guard = args->skip_nonfinite, nearest = t->owned_round_nearest;
  float weight = args->weight[0];
  uint64_t key = args->sr_key[0];
  for (int64_t done = 0, n; done < chunk->num_elems; done += n) {
    n = block_elems(t, chunk, done);
    int64_t first = chunk->first_elem + done, elem = t->global_offset_elems + first;
    const float *param = as_f32(kernels, t->param, t->param_dtype, first, n, scratch);
    if (args->num_shadows == 0)
      nonfinite += kernels->count_nonfinite(param, n);
    else if (t->owned_dtype == POLYAK_F32)
      nonfinite += fold(kernels, (float *)t->owned + first, POLYAK_F32, !nearest, param, n, weight, guard, key, elem);
    else if (t->owned_dtype == POLYAK_BF16 && !nearest)
      nonfinite += fold(kernels, (uint16_t *)t->owned + first, POLYAK_BF16, 1, param, n, weight, guard, key, elem);
    else if (t->owned_dtype == POLYAK_F16 && !nearest)
      nonfinite += kernels->f16_stochastic((uint16_t *)t->owned + first, param, n, weight, guard, key, elem);
    else /* 16-bit shadows rounded to nearest: rare enough to go element by element */
      for (int64_t i = 0; i < n; i++) {
        int bad = !polyak_is_finite(param[i]);
        nonfinite += bad;
        if (!(bad && guard))
          polyak_next_owned(t->owned, first + i, t->owned_dtype, nearest, param[i], weight, key, elem + i);
      }
  }
  return nonfinite;
}

int64_t polyak_cpu_update_chunk(const cpu_kernels *kernels, const polyak_tensor_desc *t, const polyak_chunk *chunk,
                                void *const *shadows, polyak_dtype shadow_dtype, const polyak_update_args *args)
{
  if (t->owned)
    return update_owned_chunk(kernels, t, chunk, args);
  float scratch[CPU_BLOCK_ELEMS];
  size_t shadow_bytes = polyak_dtype_num_bytes(shadow_dtype);
  int64_t nonfinite = 0;
  for (int64_t done = 0, n; done < chunk->num_elems; done += n) {
    n = block_elems(t, chunk, done);
    int64_t first = chunk->first_elem + done, elem = t->global_offset_elems + first;
    int64_t slot_bytes = (t->shadow_offset_elems + first) * (int64_t)shadow_bytes;
    const float *param = as_f32(kernels, t->param, t->param_dtype, first, n, scratch);
    /* the first shadow's kernel counts the block's non-finite params */
    int64_t counted = args->num_shadows > 0 ? -1 : kernels->count_nonfinite(param, n);
    for (int k = 0; k < args->num_shadows; k++) {
      int64_t met = fold(kernels, (char *)shadows[k] + slot_bytes, shadow_dtype, (args->stochastic_f32 >> k) & 1u,
                         param, n, args->weight[k], args->skip_nonfinite, args->sr_key[k], elem);
      counted = k == 0 ? met : counted;
    }
    nonfinite += counted;
    if (args->write_back)
      write_back(kernels, t, first, n, (const char *)shadows[args->num_shadows - 1] + slot_bytes, shadow_dtype);
  }
  return nonfinite;
}

float polyak_cpu_chunk_sumsq(const cpu_kernels *kernels, const void *grad, polyak_dtype dtype,
                             const polyak_chunk *chunk)
{
  float acc[POLYAK_LAYER_THREADS] = {0}, scratch[POLYAK_LAYER_THREADS];
  /* row r holds element t of thread t's r-th term: each partial sum takes
   * the same fmaf steps in the same order as the kernel's strided loop */
  for (int64_t done = 0; done < chunk->num_elems; done += POLYAK_LAYER_THREADS) {
    int64_t n = chunk->num_elems - done < POLYAK_LAYER_THREADS ? chunk->num_elems - done : POLYAK_LAYER_THREADS;
    kernels->sumsq_row(acc, as_f32(kernels, grad, dtype, chunk->first_elem + done, n, scratch), n);
  }
  return polyak_sum_parts_f32(acc);
}
