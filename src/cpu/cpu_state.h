/* cpu_state.h: a CPU handle's state (p->backend) and the parallel walks
 * over its plan (cpu_walk.c) that every CPU call uses:
 *
 *   cpu_backend.c        finalize and release, the update, LAWA's norms, graph mode, the table
 *   cpu_update.c         the per-chunk update and the portable kernels (cpu_kernels.h)
 *   cpu_update_avx2.c    the same kernels for AVX2 with FMA, picked at run time
 *   cpu_update_avx512.c  the stochastic-rounding kernels for AVX-512, likewise
 *   cpu_walk.c           the plan's chunks across the handle's threads
 *   cpu_pool.c           the worker threads
 *   cpu_readout.c        read-outs, evaluation, hard updates and transfers (cpu_readout.h) */
#ifndef POLYAK_CPU_STATE_H
#define POLYAK_CPU_STATE_H

#include "cpu_kernels.h"
#include "cpu_pool.h"

#ifdef __cplusplus
extern "C" { /* the tests reach the kernels */
#endif

/* Elements a work item of a parallel walk has at least (consecutive
 * chunks; a tensor larger than this is an item per chunk). */
#define CPU_ITEM_ELEMS 65536

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

/* Calls visit(p, chunk, arg) for every chunk of the plan across the
 * handle's threads (each chunk once, in no fixed order) and returns the sum
 * of what they returned. */
typedef int64_t (*cpu_chunk_visit)(const polyak_t *p, const polyak_chunk *chunk, void *arg);
int64_t polyak_cpu_for_chunks(const polyak_t *p, cpu_chunk_visit visit, void *arg);

/* The same over chunks [first_chunk, end_chunk) of the plan, one work
 * item each (the offloaded handle's update, a group of chunks at a time). */
int64_t polyak_cpu_for_chunk_range(const polyak_t *p, int64_t first_chunk, int64_t end_chunk, cpu_chunk_visit visit,
                                   void *arg);

/* Calls visit(arg, first, num_elems) over [0, num_elems) in ranges of
 * CPU_ITEM_ELEMS across the handle's threads. */
typedef void (*cpu_range_visit)(void *arg, int64_t first_elem, int64_t num_elems);
void polyak_cpu_for_range(const polyak_t *p, int64_t num_elems, cpu_range_visit visit, void *arg);

/* Work items (state->item_chunks): runs of consecutive chunks of at least
 * CPU_ITEM_ELEMS elements. -1 when out of memory. */
int polyak_cpu_build_items(const polyak_t *p, cpu_state *state);

/* ---- cpu_backend.c: what the offloaded handle (src/offload/) shares ---- */

/* A state's workers, kernels, work items and arenas, the shadows set from
 * the params the plan's descs point at; on failure the state is freed
 * (polyak_cpu_state_free) and the reason recorded. */
polyak_status polyak_cpu_state_init(polyak_t *p, cpu_state *state);
/* Frees what a state holds (not the state) and zeroes it. */
void polyak_cpu_state_free(cpu_state *state);
/* An update's weights resolved for the arithmetic: the grad-norm shadows'
 * from *grad_norm (NULL: none; their products multiplied), LAWA's betas
 * computed from the state's source. */
void polyak_cpu_resolve_update(const polyak_t *p, cpu_state *state, const polyak_update_args *args,
                               const float *grad_norm, polyak_update_args *resolved);
/* The update's arithmetic over chunks [first_chunk, end_chunk) across the
 * handle's threads; returns the non-finite params met. */
int64_t polyak_cpu_update_chunks(const polyak_t *p, const cpu_state *state, const polyak_update_args *resolved,
                                 int64_t first_chunk, int64_t end_chunk);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_CPU_STATE_H */
