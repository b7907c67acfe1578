/*
 * polyak_plan.h: the work description shared by the CPU path and the CUDA
 * kernels. finalize builds it once (src/plan.c); every update walks it.
 *
 *   tensors[]  one entry per registered tensor: where its param lives, its
 *              dtype, which of its elements this rank keeps shadows of (all,
 *              unless sharded), where they sit in each shadow arena.
 *   chunks[]   a flat table of {tensor, first element, count}: each tensor's
 *              kept elements cut into pieces of at most POLYAK_CHUNK_ELEMS,
 *              in registration order. Empty pieces have no chunk.
 */
#ifndef POLYAK_PLAN_H
#define POLYAK_PLAN_H

#include <stdint.h>

#include "polyak.h"
#include "polyak_math.h"

/* Elements per chunk. A multiple of 8, so every chunk of a tensor starts at
 * the same 16-byte phase as the tensor itself. */
#define POLYAK_CHUNK_ELEMS 65536

/* Shadow slices start on 16-byte boundaries of their arena. */
#define POLYAK_SHADOW_ALIGN_BYTES 16

typedef struct {
  void *param; /* num_elems elements of param_dtype; written by Lookahead and copies to the params */
  int64_t num_elems;
  int64_t global_offset_elems; /* first element's index in the flattened
                                  registration order (the hash's counter) */
  int64_t local_first_elem;    /* the elements whose shadows this rank keeps: */
  int64_t local_num_elems;     /* [local_first, local_first + local_num) */
  int64_t shadow_offset_elems; /* element e's shadow is at arena[shadow_offset + e]
                                  (negative where the rank's piece starts late) */
  int64_t store_offset_bytes;  /* where polyak_store keeps a copy of the param */
  int32_t param_dtype;         /* a polyak_dtype */
  int32_t owned_dtype;         /* owned: its dtype */
  void *owned;                 /* the caller's shadow 0 (no arena space), or NULL */
  int32_t owned_round_nearest; /* owned: round to nearest even, not stochastically */
  int32_t copy_only;           /* a copy-only tensor: no chunks, no gradient norm */
} polyak_tensor_desc;

typedef struct {
  int64_t first_elem; /* within the tensor */
  int32_t tensor;     /* index into the tensor table */
  int32_t num_elems;  /* 1..POLYAK_CHUNK_ELEMS */
} polyak_chunk;

/* Bytes of a copy-only tensor per copy chunk: a multiple of 16, so every
 * chunk of a param starts at the param's 16-byte phase. */
#define POLYAK_COPY_CHUNK_BYTES (1 << 20)

/* A piece of a copy-only tensor that the update copies into its mirror. */
typedef struct {
  const void *param;           /* the piece's first byte */
  int64_t mirror_offset_bytes; /* where it goes in the mirrors' allocation (16-byte aligned) */
  int64_t num_bytes;           /* 1..POLYAK_COPY_CHUNK_BYTES */
} polyak_copy_chunk;

/* What one update needs, computed on the host and passed by value. */
typedef struct {
  int64_t step;
  int64_t gap; /* steps since the last update: grad-norm shadows apply beta^gap */
  int32_t num_shadows;
  int32_t skip_nonfinite;
  float weight[POLYAK_MAX_SHADOWS];    /* per shadow: 1 - B, computed in double */
  uint64_t sr_key[POLYAK_MAX_SHADOWS]; /* per shadow: stochastic-rounding key (bf16 shadows, and f32
                                           shadows in stochastic_f32) */
  int32_t write_back;                  /* 1: params <- shadow num_shadows - 1 after the fold */
  uint32_t stochastic_f32;             /* bit k: f32 shadow k rounds stochastically */
} polyak_update_args;

/* Shadow k of tensor t's element i as f32: in the caller's memory for an
 * owned shadow, else in `arena` (shadow k's, of shadow_dtype). */
POLYAK_HD float polyak_shadow_load(const polyak_tensor_desc *t, const void *arena, int shadow_dtype, int k, int64_t i)
{
  if (t->owned && k == 0)
    return polyak_load_f32(t->owned, i, t->owned_dtype);
  return polyak_load_f32(arena, t->shadow_offset_elems + i, shadow_dtype);
}

/* ... and set to `value`, rounded to nearest even. */
POLYAK_HD void polyak_shadow_store(const polyak_tensor_desc *t, void *arena, int shadow_dtype, int k, int64_t i,
                                   float value)
{
  if (t->owned && k == 0)
    polyak_store_f32(t->owned, i, value, t->owned_dtype);
  else
    polyak_store_f32(arena, t->shadow_offset_elems + i, value, shadow_dtype);
}

/* beta^gap in double by repeated squaring: correctly rounded products in
 * a fixed order, so host and device give the same bits. */
POLYAK_HD double polyak_power_of_gap(double beta, int64_t gap)
{
  double decay = 1.0;
  for (int64_t n = gap; n > 0; n >>= 1) {
    if (n & 1)
      decay *= beta;
    beta *= beta;
  }
  return decay;
}

/* Grad-norm decay over `gap` steps: (1 - c / sqrt(1 + g^2))^gap in double;
 * 1 (no change) for a non-finite g. sqrt and division are correctly
 * rounded too. */
POLYAK_HD double polyak_grad_norm_decay(double c, float grad_norm, int64_t gap)
{
  if (!polyak_is_finite(grad_norm))
    return 1.0;
  double g = (double)grad_norm;
  return polyak_power_of_gap(1.0 - c / sqrt(1.0 + g * g), gap);
}

/* The weights of the grad-norm shadows (c[k] > 0) of an update from the
 * norm; their beta products, unless NULL, are multiplied by each B. */
POLYAK_HD void polyak_apply_grad_norm(polyak_update_args *a, const double *c, float grad_norm, double *products)
{
  for (int k = 0; k < a->num_shadows; k++) {
    if (!(c[k] > 0.0))
      continue;
    double decay = polyak_grad_norm_decay(c[k], grad_norm, a->gap);
    a->weight[k] = (float)(1.0 - decay);
    if (products)
      products[k] *= decay;
  }
}

/* Lookahead's part of the update at a->step (a->num_shadows set to all of
 * them): the slow weights, the last shadow, fold and are written back at
 * multiples of `every` and are left out otherwise. every = 0: no Lookahead.
 * The host resolves direct updates, the kernel each graph replay's step. */
POLYAK_HD void polyak_resolve_lookahead(polyak_update_args *a, int64_t every)
{
  a->write_back = every > 0 && a->step % every == 0;
  if (every > 0 && !a->write_back)
    a->num_shadows -= 1;
}

#endif /* POLYAK_PLAN_H */
