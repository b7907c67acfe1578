/* readout.c: reading averages out: one shadow of one tensor (whole or
 * this rank's piece), every shadow into the params, and blends of
 * shadows; each with zero_init's debias, computed on the host in double. */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "polyak_internal.h"
#include "polyak_math.h"

/* The factor a read-out of `shadow` multiplies by: 1, or with zero_init
 * 1 / (1 - prod beta), which needs at least one applied beta below 1.
 * Grad-norm shadows' products must be fetched first (fetch_products). */
static polyak_status debias_scale_of(polyak_t *p, int shadow, const char *function, double *scale)
{
  *scale = 1.0;
  if (!p->cfg.zero_init)
    return POLYAK_OK;
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "%s: with zero_init the debias needs the replayed step count; call "
                       "polyak_graph_release first",
                       function);
  double mass = 1.0 - p->beta_prod[shadow]; /* weight the zero start lacks */
  if (!(mass > 0.0))
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: with zero_init, shadow %d has no average yet (%s)", function, shadow,
                       p->last_step == 0 ? "no update so far" : "every applied beta was 1");
  *scale = 1.0 / mass;
  return POLYAK_OK;
}

polyak_status polyak_refresh_products(polyak_t *p)
{
  if (!polyak_has_grad_norm(&p->cfg) || !p->finalized)
    return POLYAK_OK;
  double products[POLYAK_MAX_SHADOWS];
  polyak_status status = p->ops->products_read(p, products);
  for (int k = 0; k < p->cfg.num_shadows && status == POLYAK_OK; k++)
    if (polyak_is_grad_norm(&p->cfg, k))
      p->beta_prod[k] = products[k];
  return status;
}

/* What a read-out's debias needs before the factors: with zero_init, a
 * stream not being captured (a graph would keep this step's factor at
 * every replay; fetching a grad-norm product synchronizes, which would
 * break the capture), then the grad-norm products, fetched once. */
static polyak_status prepare_debias(polyak_t *p, void *stream, const char *function)
{
  if (!p->cfg.zero_init)
    return POLYAK_OK;
  polyak_status status = polyak_refuse_capture(
      p, stream, "%s: with zero_init a captured read-out would keep this step's debias factor at every replay",
      function);
  if (status != POLYAK_OK || p->graph_reserved || !polyak_has_grad_norm(&p->cfg))
    return status;
  /* the grad-norm products are fetched from the device, waiting for it */
  status = polyak_refuse_during_capture(p, stream, 0, function);
  return status == POLYAK_OK ? polyak_refresh_products(p) : status;
}

polyak_status polyak_debias_scale(polyak_t *p, int shadow, void *stream, const char *function, double *scale)
{
  polyak_status status = prepare_debias(p, stream, function);
  return status == POLYAK_OK ? debias_scale_of(p, shadow, function, scale) : status;
}

/* The checks of a read-out of one tensor into dst (dst_num_bytes of it;
 * SIZE_MAX where the caller did not say), whole or this rank's piece.
 * BLEND for `shadow`: a blend, which reads them all. (shadow, tensor) are
 * two ints in a row, easy to swap: the messages name both. */
#define BLEND INT_MIN
static polyak_status check_read(polyak_t *p, int shadow, int tensor, const void *dst, polyak_dtype dst_dtype,
                                size_t dst_num_bytes, int whole, const char *function)
{
  char where[96];
  if (shadow != BLEND)
    snprintf(where, sizeof where, "%s(shadow = %d, tensor = %d)", function, shadow, tensor);
  else
    snprintf(where, sizeof where, "%s(tensor = %d)", function, tensor);
  POLYAK_TRY(polyak_require_finalized(p, where));
  if (shadow != BLEND && (shadow < 0 || shadow >= p->cfg.num_shadows))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s: shadow %d is outside 0..%d, this handle's shadows (the tensor comes next)", where, shadow,
                       p->cfg.num_shadows - 1);
  if (tensor < 0 || tensor >= p->num_tensors)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: tensor %d is outside 0..%d, the registered tensors%s", where,
                       tensor, p->num_tensors - 1, shadow != BLEND ? " (the shadow comes first)" : "");
  const polyak_tensor *t = &p->tensors[tensor];
  if (!polyak_dtype_copyable(dst_dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: dst_dtype = %d is not a polyak_dtype", where, (int)dst_dtype);
  if (!t->copy_only && !polyak_dtype_valid(dst_dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s: dst_dtype %s is not one an average reads out as (F32, BF16, F16)", where,
                       polyak_dtype_name(dst_dtype));
  if (t->copy_only && !polyak_copy_readable_as(t->dtype, dst_dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: \"%s\" is a copy of a %s tensor and reads out as %s only", where,
                       t->name, polyak_dtype_name(t->dtype), polyak_dtype_name(t->dtype));
  int64_t num_elems = whole || t->copy_only ? t->num_elems : p->descs[tensor].local_num_elems;
  size_t elem_num_bytes = polyak_dtype_num_bytes(dst_dtype);
  if (!dst && num_elems > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: dst is NULL", where);
  if ((uintptr_t)dst % elem_num_bytes != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: dst %p is not aligned to its %zu-byte elements", where, dst,
                       elem_num_bytes);
  if ((uint64_t)num_elems > dst_num_bytes / elem_num_bytes)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s: dst holds %zu bytes; the %lld elements of \"%s\"%s need %llu as %s", where, dst_num_bytes,
                       (long long)num_elems, p->tensors[tensor].name, whole ? "" : " kept by this rank",
                       (unsigned long long)num_elems * elem_num_bytes, polyak_dtype_name(dst_dtype));
  return POLYAK_OK;
}

/* polyak_get_shadow (whole: the other ranks' pieces gathered where the
 * handle has them) and polyak_get_local_shadow (this rank's piece). */
static polyak_status read_shadow(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                 size_t dst_num_bytes, void *stream, int whole, const char *function)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  double debias_scale = 1.0;
  polyak_status status = check_read(p, shadow, tensor, dst, dst_dtype, dst_num_bytes, whole, function);
  int copy_only = status == POLYAK_OK && p->tensors[tensor].copy_only;
  int64_t num_elems = status != POLYAK_OK  ? 0
                      : whole || copy_only ? p->tensors[tensor].num_elems
                                           : p->descs[tensor].local_num_elems;
  if (status == POLYAK_OK && num_elems > 0)
    status = p->ops->check_read_out(p, dst, (size_t)num_elems * polyak_dtype_num_bytes(dst_dtype), stream, function);
  if (copy_only) /* its one mirror, not averaged, so not debiased */
    return status == POLYAK_OK ? polyak_copy_read(p, tensor, dst, dst_dtype, stream) : status;
  if (status == POLYAK_OK)
    status = polyak_debias_scale(p, shadow, stream, function, &debias_scale);
  if (status != POLYAK_OK)
    return status;
  if (whole && polyak_needs_gather(p, tensor))
    return polyak_gather_tensor(p, shadow, tensor, debias_scale, dst, dst_dtype, stream);
  polyak_dtype src_dtype;
  const void *src = polyak_local_slice(p, shadow, tensor, &src_dtype);
  return p->ops->read_out(p, src, src_dtype, p->descs[tensor].local_num_elems, debias_scale, dst, dst_dtype, stream);
}

polyak_status polyak_get_shadow(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype, void *stream)
{
  return read_shadow(p, shadow, tensor, dst, dst_dtype, SIZE_MAX, stream, 1, "polyak_get_shadow");
}

polyak_status polyak_get_shadow_n(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                  size_t dst_num_bytes, void *stream)
{
  return read_shadow(p, shadow, tensor, dst, dst_dtype, dst_num_bytes, stream, 1, "polyak_get_shadow_n");
}

polyak_status polyak_get_local_shadow(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                      void *stream)
{
  return read_shadow(p, shadow, tensor, dst, dst_dtype, SIZE_MAX, stream, 0, "polyak_get_local_shadow");
}

polyak_status polyak_get_local_shadow_n(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                        size_t dst_num_bytes, void *stream)
{
  return read_shadow(p, shadow, tensor, dst, dst_dtype, dst_num_bytes, stream, 0, "polyak_get_local_shadow_n");
}

polyak_status polyak_local_range(polyak_t *p, int tensor, int64_t *first_elem, int64_t *num_elems)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_local_range"));
  if (tensor < 0 || tensor >= p->num_tensors)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_local_range: tensor = %d is outside 0..%d", tensor,
                       p->num_tensors - 1);
  if (!first_elem || !num_elems)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_local_range: an output pointer is NULL");
  *first_elem = p->descs[tensor].local_first_elem;
  *num_elems = p->descs[tensor].local_num_elems;
  return POLYAK_OK;
}

polyak_status polyak_copy_to_params(polyak_t *p, int shadow, void *stream)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_copy_to_params"));
  double debias_scale = 1.0;
  polyak_status status = polyak_check_shadow(p, shadow, "polyak_copy_to_params");
  if (status == POLYAK_OK)
    status = polyak_debias_scale(p, shadow, stream, "polyak_copy_to_params", &debias_scale);
  if (status != POLYAK_OK)
    return status;
  int gather = 0;
  for (int i = 0; i < p->num_tensors && !gather; i++)
    gather = polyak_needs_gather(p, i);
  status = gather ? polyak_gather_to_params(p, shadow, debias_scale, stream)
                  : p->ops->copy_to_params(p, shadow, debias_scale, stream);
  return status == POLYAK_OK ? polyak_copies_to_params(p, stream) : status;
}

/* The checks of a blend and its coefficients: weight * debias, as float. */
static polyak_status blend_coefficients(polyak_t *p, const double *weights, int flags, float *coefficient, void *stream,
                                        const char *function)
{
  POLYAK_TRY(polyak_require_finalized(p, function));
  if (p->cfg.world_size > 1)
    return polyak_fail(p, POLYAK_ERR_UNSUPPORTED, "%s: blends on sharded handles are not built yet", function);
  if (!weights)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: weights is NULL", function);
  if (flags & ~POLYAK_BLEND_ANY_WEIGHTS)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: flags = %d has unknown bits", function, flags);
  double sum = 0.0;
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    if (!isfinite(weights[k]))
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: weights[%d] = %g is not finite", function, k, weights[k]);
    sum += weights[k];
  }
  if (!(flags & POLYAK_BLEND_ANY_WEIGHTS) && fabs(sum - 1.0) > 1e-6)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s: the weights sum to %.9g, not 1 (pass POLYAK_BLEND_ANY_WEIGHTS to allow it)", function, sum);
  polyak_status status = prepare_debias(p, stream, function);
  for (int k = 0; k < p->cfg.num_shadows && status == POLYAK_OK; k++) {
    double debias_scale = 1.0;
    if (weights[k] != 0.0)
      status = debias_scale_of(p, k, function, &debias_scale);
    coefficient[k] = (float)(weights[k] * debias_scale);
    if (status == POLYAK_OK && !isfinite(coefficient[k]))
      status = polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: weights[%d] * debias overflows a float", function, k);
  }
  return status;
}

polyak_status polyak_blend_to_params(polyak_t *p, const double *weights, int flags, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  float coefficient[POLYAK_MAX_SHADOWS];
  polyak_status status = blend_coefficients(p, weights, flags, coefficient, stream, "polyak_blend_to_params");
  if (status == POLYAK_OK)
    status = p->ops->blend(p, coefficient, -1, NULL, POLYAK_F32, stream);
  return status == POLYAK_OK ? polyak_copies_to_params(p, stream) : status;
}

static polyak_status get_blend(polyak_t *p, const double *weights, int flags, int tensor, void *dst,
                               polyak_dtype dst_dtype, size_t dst_num_bytes, void *stream, const char *function)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  float coefficient[POLYAK_MAX_SHADOWS];
  polyak_status status = blend_coefficients(p, weights, flags, coefficient, stream, function);
  if (status == POLYAK_OK)
    status = check_read(p, BLEND, tensor, dst, dst_dtype, dst_num_bytes, 1, function);
  if (status == POLYAK_OK && p->tensors[tensor].num_elems > 0)
    status = p->ops->check_read_out(p, dst, (size_t)p->tensors[tensor].num_elems * polyak_dtype_num_bytes(dst_dtype),
                                    stream, function);
  if (status == POLYAK_OK && p->tensors[tensor].copy_only) /* every shadow is its mirror */
    return polyak_copy_read(p, tensor, dst, dst_dtype, stream);
  return status == POLYAK_OK ? p->ops->blend(p, coefficient, tensor, dst, dst_dtype, stream) : status;
}

polyak_status polyak_get_blend(polyak_t *p, const double *weights, int flags, int tensor, void *dst,
                               polyak_dtype dst_dtype, void *stream)
{
  return get_blend(p, weights, flags, tensor, dst, dst_dtype, SIZE_MAX, stream, "polyak_get_blend");
}

polyak_status polyak_get_blend_n(polyak_t *p, const double *weights, int flags, int tensor, void *dst,
                                 polyak_dtype dst_dtype, size_t dst_num_bytes, void *stream)
{
  return get_blend(p, weights, flags, tensor, dst, dst_dtype, dst_num_bytes, stream, "polyak_get_blend_n");
}
