/* cpu_backend.h: what the CPU backend's files share: its state, the block
 * kernels an update is made of (portable C and AVX2, with the same bits),
 * the per-chunk entry point and the parallel walks over the plan.
 *
 *   cpu_backend.c      state, finalize and release, the update, LAWA's norms, graph mode
 *   cpu_update.c       the per-chunk update and the portable kernels
 *   cpu_update_avx2.c  the same kernels for AVX2 with FMA, picked at run time
 *   cpu_pool.c         the worker threads
 *   cpu_readout.c      read-outs, evaluation, hard updates and transfers */
#ifndef POLYAK_CPU_BACKEND_H
#define POLYAK_CPU_BACKEND_H

#include "cpu_pool.h"
#include "polyak_internal.h"
#include "polyak_math.h"

#ifdef __cplusplus
extern "C" { /* the tests reach the kernels */
#endif

/* Elements an update handles at a time: a block's params as f32 (8 KiB)
 * stay in the L1 cache while every shadow streams past them. */
#define CPU_BLOCK_ELEMS 2048

/* Elements a work item of a parallel walk has at least (consecutive
 * chunks; a tensor larger than this is an item per chunk). */
#define CPU_ITEM_ELEMS 65536

/* The loops of an update over num_elems elements of one block, as f32
 * params (param) against one shadow: shadow <- the step's lerp, left as it
 * was where guard is set and the param is NaN or Inf. `first_elem` is
 * element 0's global index (the stochastic-rounding counter); the block's
 * indices share their high 32 bits. Each returns
 * the non-finite params it met. Two tables have them: portable C over
 * polyak_math.h, and AVX2 with FMA; they give the same bits. */
typedef struct {
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

typedef struct {
  void *shadows[POLYAK_MAX_SHADOWS]; /* arena_elems elements of the shadow dtype each */
  int64_t nonfinite_count;
  int64_t graph_consumed, graph_dropped; /* graph mode counters */
  void *staging[POLYAK_MAX_SHADOWS];     /* a load's fresh arenas */
  void *store;                           /* polyak_store's copy of the params */
  double products[POLYAK_MAX_SHADOWS];   /* grad-norm shadows' beta products */
  /* LAWA: where the norms come from, and what each update computes */
  void **layer_grads;       /* [num_tensors], or NULL with layer_norms */
  const float *layer_norms; /* [num_tensors] given, or NULL */
  float *chunk_sumsq;       /* [num_chunks] */
  double *layer_norm;       /* [num_tensors] */
  double *layer_beta;       /* [num_tensors][POLYAK_MAX_SHADOWS] */
  const cpu_kernels *kernels;
  cpu_pool *pool;       /* NULL: one thread */
  int64_t *item_chunks; /* [num_items + 1]: work item i is chunks
                                            item_chunks[i] .. item_chunks[i + 1] - 1 */
  int64_t num_items;
} cpu_state;

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

/* Calls visit(p, chunk, arg) for every chunk of the plan across the
 * handle's threads (each chunk once, in no fixed order) and returns the sum
 * of what they returned. */
typedef int64_t (*cpu_chunk_visit)(const polyak_t *p, const polyak_chunk *chunk, void *arg);
int64_t polyak_cpu_for_chunks(const polyak_t *p, cpu_chunk_visit visit, void *arg);

/* Calls visit(arg, first, num_elems) over [0, num_elems) in ranges of
 * CPU_ITEM_ELEMS across the handle's threads. */
typedef void (*cpu_range_visit)(void *arg, int64_t first_elem, int64_t num_elems);
void polyak_cpu_for_range(const polyak_t *p, int64_t num_elems, cpu_range_visit visit, void *arg);

/* ---- shadow memory, read-outs and transfers (cpu_readout.c) ---- */

/* num_shadows arenas of the plan's size, 64-byte aligned; all or none
 * (-1). free_arenas frees and clears all POLYAK_MAX_SHADOWS. */
int polyak_cpu_alloc_arenas(const polyak_t *p, void **arenas);
void polyak_cpu_free_arenas(void **arenas);
/* Shadow k's arena <- 0, then the params (this rank's pieces) unless zero_init. */
void polyak_cpu_init_shadow(const polyak_t *p, void *arena, int k);
/* POLYAK_ERR_INVALID_ARG naming the first NaN or Inf param: among every
 * element (`whole`: a hard update, which every rank must refuse alike), else
 * this rank's (finalize). */
polyak_status polyak_cpu_find_nonfinite_param(polyak_t *p, int whole, const char *function);

/* the backend functions of polyak_backend_ops that cpu_readout.c holds */
void *polyak_cpu_arena(polyak_t *p, int shadow);
polyak_status polyak_cpu_read_out(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                                  double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream);
polyak_status polyak_cpu_check_read_out(polyak_t *p, const void *dst, void *stream, const char *function);
polyak_status polyak_cpu_copy_to_params(polyak_t *p, int shadow, double debias_scale, void *stream);
polyak_status polyak_cpu_blend(polyak_t *p, const float *coefficient, int tensor, void *dst, polyak_dtype dst_dtype,
                               void *stream);
polyak_status polyak_cpu_synthesize(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                                    void *stream);
polyak_status polyak_cpu_hard_update(polyak_t *p, int shadow, void *stream);
polyak_status polyak_cpu_store(polyak_t *p, void *stream);
polyak_status polyak_cpu_restore(polyak_t *p, void *stream);
void *polyak_cpu_host_buffer(polyak_t *p, size_t num_bytes);
void polyak_cpu_free_host_buffer(polyak_t *p, void *buffer);
polyak_status polyak_cpu_copy_to_host(polyak_t *p, void *host, const void *src, size_t num_bytes);
polyak_status polyak_cpu_copy_from_host(polyak_t *p, void *dst, const void *host, size_t num_bytes);
polyak_status polyak_cpu_staging_begin(polyak_t *p);
polyak_status polyak_cpu_staging_write(polyak_t *p, int shadow, int64_t first_elem, int64_t num_elems,
                                       const void *host);
polyak_status polyak_cpu_staging_commit(polyak_t *p, int64_t nonfinite_count, const void *copies);
void polyak_cpu_staging_abort(polyak_t *p);
void *polyak_cpu_scratch_alloc(polyak_t *p, size_t num_bytes);
void polyak_cpu_scratch_free(polyak_t *p, void *scratch);
polyak_status polyak_cpu_copy_bytes(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream);

/* ---- the element loops both kernel tables share (the AVX2 one for its
 * tails and the rare cases), over [begin, end) ---- */

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

#endif /* POLYAK_CPU_BACKEND_H */
