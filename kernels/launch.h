/*
 * launch.h: the CUDA kernels' arguments and their launchers, called from
 * src/cuda/cuda_backend.c. C, so the host side stays C; the kernels are in
 * update.cu (the fused update) and shadow_io.cu (initialization, read-out).
 * Each launcher enqueues on `stream` and returns that launch's status.
 */
#ifndef POLYAK_LAUNCH_H
#define POLYAK_LAUNCH_H

#include <cuda_runtime.h>

#include "polyak_plan.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Threads per block of every kernel. */
#define POLYAK_BLOCK_THREADS 256

/* Graph mode: the steps reserved ahead, on the device. A captured launch
 * holds only this struct's address (and the arenas', which never move), so
 * one graph serves every later reservation: each replay applies the next
 * reserved step and advances `consumed`; a replay with none left changes
 * nothing but `dropped`. */
typedef struct {
  const float *weights; /* [num_steps][num_shadows]: 1 - B per reserved step */
  int64_t first_step;
  int64_t first_gap; /* steps from the last direct update to first_step */
  int64_t num_steps; /* 0 while nothing is reserved: replays are dropped */
  int64_t consumed;  /* reserved steps applied so far */
  int64_t dropped;   /* replays with no reserved step left */
  /* what replays read besides the params, as set when the steps were
   * reserved (a graph captured earlier holds only this struct's address) */
  const float *grad_norm;   /* grad-norm shadows' norm, or NULL */
  const float *layer_norms; /* LAWA's given norms, or NULL: from the gradients */
  uint32_t blocks_done;     /* wraps at each launch's last block, which advances
                               consumed or dropped (launch_counter.h) */
  uint32_t pad_;
} polyak_graph_state;

typedef struct {
  const polyak_tensor_desc *descs; /* device */
  const polyak_chunk *chunks;      /* device */
  int64_t num_chunks;
  void *shadows[POLYAK_MAX_SHADOWS]; /* device arenas */
  int32_t shadow_dtype;
  int32_t pad_;
  polyak_update_args step; /* direct mode: what this update applies */
  /* graph mode (graph != NULL): step, weights and keys come from here */
  polyak_graph_state *graph;
  uint64_t seed;
  int64_t lookahead_every; /* Lookahead's syncs, resolved per replayed step */
  /* grad-norm shadows (grad_norm_c[k] > 0): their weights from *grad_norm
   * (graph mode: the reservation's), their beta products multiplied in
   * place by block 0 */
  const float *grad_norm; /* NULL: no such shadows */
  double grad_norm_c[POLYAK_MAX_SHADOWS];
  double *products;
  /* LAWA shadows (layer_beta0[k] > 0): each chunk's weights from its
   * tensor's betas, [tensor][POLYAK_MAX_SHADOWS], or NULL */
  const double *layer_beta;
  double layer_beta0[POLYAK_MAX_SHADOWS];
  unsigned long long *nonfinite_count;
  /* copy-only tensors: each piece's param bytes into its mirror */
  const polyak_copy_chunk *copy_chunks; /* device */
  int64_t num_copy_chunks;
  void *copies; /* the mirrors (device) */
} polyak_update_kernel_args;

/* LAWA's betas for one update (layerwise.h): from the gradients (grads,
 * a device table) or the norms given (norms); blocks_done starts at 0 and
 * wraps back to it at each launch's last block (launch_counter.h). */
typedef struct {
  const polyak_tensor_desc *descs;
  const polyak_chunk *chunks;
  int64_t num_chunks;
  const int64_t *tensor_chunks; /* [num_tensors + 1] */
  int64_t num_tensors;
  void *const *grads; /* or NULL: */
  const float *norms; /* (graph mode: the reservation's norms, else grads) */
  float *chunk_sumsq; /* [num_chunks] */
  double *layer_norm; /* [num_tensors] */
  double *layer_beta; /* [num_tensors][POLYAK_MAX_SHADOWS] */
  unsigned int *blocks_done;
  const polyak_graph_state *graph; /* graph mode: a replay past the reservation computes nothing */
  int32_t num_shadows;
  int32_t pad_;
  double beta0[POLYAK_MAX_SHADOWS];
} polyak_layer_args;

cudaError_t polyak_launch_layer_betas(const polyak_layer_args *args, int grid, cudaStream_t stream);

/* One launch of `grid` blocks: every shadow of every chunk. */
cudaError_t polyak_launch_update(const polyak_update_kernel_args *args, int grid, cudaStream_t stream);

/* The largest useful grid of the update kernel on `device` for shadows of
 * shadow_dtype, stochastic_f32 as in the updates' args: the blocks that fit
 * on all of its multiprocessors at once. */
cudaError_t polyak_update_grid_limit(int device, int shadow_dtype, uint32_t stochastic_f32, int *grid);

/* Shadows first_shadow .. first_shadow + num_shadows - 1 (arenas, or the
 * caller's memory for shadows of theirs) get the params, rounded to
 * nearest even: at finalize, and for a hard update. Unless NULL, the
 * non-finite params are counted, with the smallest global index of one
 * recorded (*first_nonfinite must start at UINT64_MAX). Padding is left
 * alone. */
cudaError_t polyak_launch_init(const polyak_tensor_desc *descs, const polyak_chunk *chunks, int64_t num_chunks,
                               void *const *shadows, int first_shadow, int num_shadows, int shadow_dtype,
                               unsigned long long *nonfinite, unsigned long long *first_nonfinite, int grid,
                               cudaStream_t stream);

/* Read-out: num_elems shadow elements, times debias_scale, into dst as
 * dst_dtype (round to nearest even). */
cudaError_t polyak_launch_readout(const void *shadow, int shadow_dtype, int64_t num_elems, double debias_scale,
                                  void *dst, int dst_dtype, int grid, cudaStream_t stream);

/* Evaluation: every param <- its slice of shadow k (`arena`, or the
 * caller's memory) times debias_scale, in the param's dtype (round to
 * nearest even). */
cudaError_t polyak_launch_copy_to_params(const polyak_tensor_desc *descs, const polyak_chunk *chunks,
                                         int64_t num_chunks, const void *arena, int k, int shadow_dtype,
                                         double debias_scale, int grid, cudaStream_t stream);

/* polyak_store (to_store = 1) and polyak_restore (0): every param's bytes
 * to or from `store` at the tensors' store_offset_bytes. */
cudaError_t polyak_launch_store(const polyak_tensor_desc *descs, const polyak_chunk *chunks, int64_t num_chunks,
                                void *store, int to_store, int grid, cudaStream_t stream);

/* Blends: element e of every arena, weighted by coefficient[k] (0: not
 * read), accumulated with polyak_blend_step. */
typedef struct {
  const void *arenas[POLYAK_MAX_SHADOWS];
  float coefficient[POLYAK_MAX_SHADOWS];
  int32_t num_shadows;
  int32_t shadow_dtype;
} polyak_blend_args;

/* Into every param (in their dtypes), walking the plan. */
cudaError_t polyak_launch_blend_to_params(const polyak_blend_args *args, const polyak_tensor_desc *descs,
                                          const polyak_chunk *chunks, int64_t num_chunks, int grid,
                                          cudaStream_t stream);

/* Tensor t's blend into dst. */
cudaError_t polyak_launch_blend(const polyak_blend_args *args, const polyak_tensor_desc *t, void *dst, int dst_dtype,
                                int grid, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_LAUNCH_H */
