/* cpu_kernels.h: the CPU backend's update in blocks: the kernel tables
 * (portable C over polyak_math.h, AVX2 with FMA, and AVX-512 for the
 * stochastic roundings; the same bits), the element loops they share, the
 * choice of table, and the per-chunk entry points (cpu_update.c). No
 * handle state: the tests call these directly. */
#ifndef POLYAK_CPU_KERNELS_H
#define POLYAK_CPU_KERNELS_H

#include "polyak_internal.h"
#include "polyak_math.h"

#ifdef __cplusplus
extern "C" { /* the tests reach the kernels */
#endif

/* Elements an update handles at a time: a block's params as f32 (8 KiB)
 * stay in the L1 cache while every shadow streams past them. */
#define CPU_BLOCK_ELEMS 2048

/* The loops of an update over num_elems elements of one block, as f32
 * params (param) against one shadow: shadow <- the step's lerp, left as it
 * was where guard is set and the param is NaN or Inf. `first_elem` is
 * element 0's global index (the stochastic-rounding counter); the block's
 * indices share their high 32 bits. Each returns
 * the non-finite params it met. Three tables have them: portable C over
 * polyak_math.h (the reference), AVX2 with FMA, and AVX-512 (its own
 * stochastic kernels, AVX2's other entries); they give the same bits. */
typedef struct {
  const char *isa; /* "portable", "avx2", "avx512" */
  int64_t (*f32_nearest)(float *shadow, const float *param, int64_t num_elems, float weight, int guard);
  int64_t (*f32_stochastic)(float *shadow, const float *param, int64_t num_elems, float weight, int guard, uint64_t key,
                            int64_t first_elem);
  int64_t (*bf16_stochastic)(uint16_t *shadow, const float *param, int64_t num_elems, float weight, int guard,
                             uint64_t key, int64_t first_elem);
  int64_t (*f16_stochastic)(uint16_t *shadow, const float *param, int64_t num_elems, float weight, int guard,
                            uint64_t key, int64_t first_elem); /* a caller's f16 shadow */
  int64_t (*count_nonfinite)(const float *param, int64_t num_elems);
  /* conversions: exact widening, round-to-nearest-even narrowing */
  void (*bf16_to_f32)(float *dst, const uint16_t *src, int64_t num_elems);
  void (*f16_to_f32)(float *dst, const uint16_t *src, int64_t num_elems);
  void (*f32_to_bf16)(uint16_t *dst, const float *src, int64_t num_elems);
  /* LAWA: acc[t] = fmaf(row[t], row[t], acc[t]) for t < num_elems (<= 256) */
  void (*sumsq_row)(float *acc, const float *row, int64_t num_elems);
} cpu_kernels;

extern const cpu_kernels polyak_cpu_portable_kernels;

/* The AVX2 table where this build and CPU have AVX2 and FMA, else NULL. */
const cpu_kernels *polyak_cpu_avx2_kernels(void);

/* The AVX-512 table where this build and CPU have AVX-512 F, BW, DQ and VL
 * (and the OS saves their registers) besides AVX2, else NULL. */
const cpu_kernels *polyak_cpu_avx512_kernels(void);

/* The table a handle uses: the widest this CPU runs, at most the one the
 * environment variable POLYAK_CPU_ISA names ("avx512", "avx2" or
 * "portable": for measuring and testing the narrower ones). NULL for any
 * other value of it. */
const cpu_kernels *polyak_cpu_pick_kernels(void);

/* AVX2's kernels that the AVX-512 table shares (x86-64 builds only). */
int64_t polyak_cpu_avx2_f32_nearest(float *shadow, const float *param, int64_t num_elems, float weight, int guard);
int64_t polyak_cpu_avx2_count_nonfinite(const float *param, int64_t num_elems);
void polyak_cpu_avx2_bf16_to_f32(float *dst, const uint16_t *src, int64_t num_elems);
void polyak_cpu_avx2_f16_to_f32(float *dst, const uint16_t *src, int64_t num_elems);
void polyak_cpu_avx2_f32_to_bf16(uint16_t *dst, const float *src, int64_t num_elems);
void polyak_cpu_avx2_sumsq_row(float *acc, const float *row, int64_t num_elems);

/* One chunk of an update (the kernel's polyak_update_chunk, block by
 * block): every shadow of its elements, Lookahead's write-back, and the
 * non-finite params met, returned. The one place a chunk's kind is told
 * apart: tensors whose shadow is the caller's go their own way here. */
int64_t polyak_cpu_update_chunk(const cpu_kernels *kernels, const polyak_tensor_desc *t, const polyak_chunk *chunk,
                                void *const *shadows, polyak_dtype shadow_dtype, const polyak_update_args *args);

/* LAWA step 1 for one chunk (layerwise.h's order, POLYAK_LAYER_THREADS
 * partial sums added in order): the sum of squares of its gradient. */
float polyak_cpu_chunk_sumsq(const cpu_kernels *kernels, const void *grad, polyak_dtype dtype,
                             const polyak_chunk *chunk);

/* ---- the element loops the kernel tables share (the vector ones for
 * their tails and rare cases), over [begin, end) ---- */

static inline int64_t cpu_f32_nearest_loop(float *shadow, const float *param, int64_t begin, int64_t end, float weight,
                                           int guard)
{
  int64_t nonfinite = 0;
  for (int64_t i = begin; i < end; i++) {
    int bad = !polyak_is_finite(param[i]);
    nonfinite += bad;
    shadow[i] = polyak_pick_f32(bad & guard, shadow[i], polyak_lerp(shadow[i], param[i], weight));
  }
  return nonfinite;
}

static inline int64_t cpu_f32_stochastic_loop(float *shadow, const float *param, int64_t begin, int64_t end,
                                              float weight, int guard, uint64_t key, int64_t first_elem)
{
  int64_t nonfinite = 0;
  for (int64_t i = begin; i < end; i++) {
    int bad = !polyak_is_finite(param[i]);
    nonfinite += bad;
    shadow[i] =
        polyak_pick_f32(bad & guard, shadow[i], polyak_next_f32_sr(shadow[i], param[i], weight, key, first_elem + i));
  }
  return nonfinite;
}

/* A 16-bit shadow (dtype POLYAK_BF16 or POLYAK_F16), rounded stochastically. */
static inline int64_t cpu_half_stochastic_loop(uint16_t *shadow, const float *param, int64_t begin, int64_t end,
                                               float weight, int guard, uint64_t key, int64_t first_elem, int dtype)
{
  int64_t nonfinite = 0;
  for (int64_t i = begin; i < end; i++) {
    int bad = !polyak_is_finite(param[i]);
    nonfinite += bad;
    uint16_t next = dtype == POLYAK_BF16
                        ? polyak_next_bf16(shadow[i], param[i], weight, key, first_elem + i)
                        : polyak_f32_to_f16_sr(polyak_lerp(polyak_f16_to_f32(shadow[i]), param[i], weight),
                                               polyak_sr_bits(key, first_elem + i));
    shadow[i] = (bad & guard) ? shadow[i] : next;
  }
  return nonfinite;
}

/* 1 where weight is exactly 1 (the update copies the params). */
static inline int cpu_weight_is_one(float weight)
{
  return polyak_f32_bits(weight) == 0x3F800000u;
}

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_CPU_KERNELS_H */
