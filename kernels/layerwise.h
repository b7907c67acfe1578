/*
 * layerwise.h: layer-wise adaptive decay (LAWA), host+device. Shadow k with
 * beta0_k > 0 decays tensor l by beta_l = beta0_k exp(-|g_l| / sum_j |g_j|)
 * from the gradient norms of the step. The norms are reduced in a fixed
 * order that both backends follow exactly (the CUDA kernel in
 * layerwise.cu, the CPU backend in plain loops over the same functions),
 * so the same gradients give the same bits on every run and backend:
 *   1. per chunk, thread t of POLYAK_LAYER_THREADS sums g^2 over elements
 *      t, t + POLYAK_LAYER_THREADS, ... with fmaf; the chunk's sum is those
 *      partials added in thread order (float);
 *   2. per tensor, |g_l| = sqrt of its chunks' sums added in chunk order
 *      (double);
 *   3. the total: thread t adds |g_l| for l = t, t + POLYAK_LAYER_THREADS,
 *      ..., then the partials are added in thread order (double);
 *   4. exp by a fixed polynomial of +, *, / only (correctly rounded
 *      everywhere, unlike each platform's exp).
 */
#ifndef POLYAK_LAYERWISE_H
#define POLYAK_LAYERWISE_H

#include "polyak_plan.h"

#define POLYAK_LAYER_THREADS 256

/* Step 1, one thread's part: its strided sum of squares over the chunk's
 * gradient elements (of the param's dtype). */
POLYAK_HD float polyak_chunk_sumsq_part(const void *grad, int dtype, const polyak_chunk *chunk, int thread)
{
  float acc = 0.0f;
  for (int64_t i = chunk->first_elem + thread; i < chunk->first_elem + chunk->num_elems; i += POLYAK_LAYER_THREADS) {
    float g = polyak_load_f32(grad, i, dtype);
    acc = fmaf(g, g, acc);
  }
  return acc;
}

/* Steps 1 and 3: the partials of the threads, added in thread order. */
POLYAK_HD float polyak_sum_parts_f32(const float *part)
{
  float sum = 0.0f;
  for (int t = 0; t < POLYAK_LAYER_THREADS; t++)
    sum += part[t];
  return sum;
}

POLYAK_HD double polyak_sum_parts_f64(const double *part)
{
  double sum = 0.0;
  for (int t = 0; t < POLYAK_LAYER_THREADS; t++)
    sum += part[t];
  return sum;
}

/* Other blocks wrote the chunk sums: read them from L2, not a stale L1. */
#if defined(__CUDA_ARCH__)
#define POLYAK_LOAD_FROM_L2(p) __ldcg(p)
#else
#define POLYAK_LOAD_FROM_L2(p) (*(p))
#endif

/* Step 2: |g_l| from the sums of its chunks [first, end). */
POLYAK_HD double polyak_tensor_norm(const float *chunk_sumsq, int64_t first, int64_t end)
{
  double sum = 0.0;
  for (int64_t c = first; c < end; c++)
    sum += (double)POLYAK_LOAD_FROM_L2(chunk_sumsq + c);
  return sqrt(sum);
}

/* Step 2 for tensor l: its norm given, or from its chunks' sums [first,
 * end); 0 for a copy-only tensor, which is not averaged and has no
 * gradient. */
POLYAK_HD double polyak_layer_norm(const polyak_tensor_desc *t, const float *norms, int64_t l, const float *chunk_sumsq,
                                   int64_t first, int64_t end)
{
  if (t->copy_only)
    return 0.0;
  return norms ? (double)norms[l] : polyak_tensor_norm(chunk_sumsq, first, end);
}

/* A norm's term in the total: a negative or NaN norm (given to
 * polyak_set_layer_norms) makes the total NaN, so every beta is 1. */
POLYAK_HD double polyak_norm_term(double norm)
{
  return norm >= 0.0 ? norm : NAN;
}

/* exp(x) for x in [-1, 0], to a few units in the last place: the Taylor
 * series to x^20 (remainder below 2e-20), nested from the inside. */
POLYAK_HD double polyak_exp_unit(double x)
{
  double r = 1.0;
  for (int n = 20; n >= 1; n--)
    r = 1.0 + r * x / (double)n;
  return r;
}

/* Betas are kept tensor-major, POLYAK_MAX_SHADOWS to a tensor. */

/* Step 4: tensor l's beta for each LAWA shadow (beta0[k] > 0; others get
 * 1). A total that is 0 gives beta0; a non-finite one (a NaN or Inf
 * gradient somewhere, or a negative norm given) gives 1: the shadows stay as
 * they were. */
POLYAK_HD void polyak_layer_betas(double norm, double total, const double *beta0, int num_shadows, double *beta)
{
  int finite = total - total == 0.0; /* not NaN, not Inf */
  double ratio = total > 0.0 ? norm / total : 0.0;
  for (int k = 0; k < num_shadows; k++)
    beta[k] = beta0[k] > 0.0 && finite ? beta0[k] * polyak_exp_unit(-ratio) : 1.0;
}

/* The weights of a chunk of tensor l for the LAWA shadows: 1 - beta_l^gap
 * (by repeated squaring, in double). */
POLYAK_HD void polyak_resolve_layerwise(polyak_update_args *a, const double *beta0, const double *layer_beta)
{
  for (int k = 0; k < a->num_shadows; k++) {
    if (!(beta0[k] > 0.0))
      continue;
    a->weight[k] = (float)(1.0 - polyak_power_of_gap(layer_beta[k], a->gap));
  }
}

#endif /* POLYAK_LAYERWISE_H */
