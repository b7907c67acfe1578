/* update.c: the calls that follow registration. Each validates its inputs
 * and the handle's state, computes on the host what the backend needs
 * (per-shadow weights in double, debias scales), then hands over to the
 * backend. Step state changes only after the backend succeeded. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "polyak_internal.h"
#include "polyak_math.h"

void polyak_update_args_init(const polyak_t *p, int64_t step, int64_t gap, const float *weight,
                             polyak_update_args *args)
{
  memset(args, 0, sizeof *args);
  args->step = step;
  args->gap = gap;
  args->num_shadows = p->cfg.num_shadows;
  args->skip_nonfinite = p->cfg.skip_nonfinite;
  args->stochastic_f32 = polyak_stochastic_f32_mask(&p->cfg);
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    args->weight[k] = weight[k];
    args->sr_key[k] = polyak_sr_key(p->cfg.seed, step, k);
  }
  polyak_resolve_lookahead(args, p->cfg.lookahead_every);
}

polyak_status polyak_check_next_step(polyak_t *p, int64_t step, const char *what)
{
  if (step < 1)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s = %lld; steps count from 1", what, (long long)step);
  if (step <= p->last_step)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s = %lld does not follow the last update (step %lld)",
                       what, (long long)step, (long long)p->last_step);
  int64_t sync = polyak_next_sync(&p->cfg, p->last_step);
  if (sync < step)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s = %lld skips the Lookahead sync at step %lld (lookahead_every = %lld)", what,
                       (long long)step, (long long)sync, (long long)p->cfg.lookahead_every);
  return POLYAK_OK;
}

polyak_status polyak_check_update_sources(polyak_t *p, const char *function)
{
  if (polyak_has_grad_norm(&p->cfg) && !p->grad_norm)
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: shadows follow the grad norm; call polyak_set_grad_norm first",
                       function);
  if (polyak_has_layerwise(&p->cfg) && !p->layer_source)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "%s: shadows are layer-wise; call polyak_set_grads or polyak_set_layer_norms first", function);
  return POLYAK_OK;
}

polyak_status polyak_check_shadow(polyak_t *p, int shadow, const char *function)
{
  if (shadow < 0 || shadow >= p->cfg.num_shadows)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: shadow = %d is outside 0..%d", function, shadow,
                       p->cfg.num_shadows - 1);
  return POLYAK_OK;
}

polyak_status polyak_refuse_capture(polyak_t *p, void *stream, const char *format, ...)
{
  int capturing = 0;
  polyak_status status = p->ops->capturing(p, stream, &capturing);
  if (status != POLYAK_OK || !capturing)
    return status;
  va_list args;
  va_start(args, format);
  vsnprintf(p->last_error, sizeof p->last_error, format, args);
  va_end(args);
  return POLYAK_ERR_STATE;
}

polyak_status polyak_finalize(polyak_t *p, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_finalize: the handle is already finalized");
  polyak_status status = polyak_plan_build(p);
  if (status != POLYAK_OK)
    return status;
  status = p->ops->finalize(p, stream);
  if (status != POLYAK_OK) {
    polyak_plan_free(p);
    return status;
  }
  p->finalized = 1;
  return POLYAK_OK;
}

polyak_status polyak_update(polyak_t *p, int64_t step, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_update: call polyak_finalize first");
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_update: steps %lld.. are reserved for graph replays; call "
                       "polyak_graph_release first",
                       (long long)p->graph_first_step);
  polyak_status status = polyak_check_next_step(p, step, "polyak_update: step");
  if (status == POLYAK_OK)
    status = polyak_check_update_sources(p, "polyak_update");
  if (status != POLYAK_OK)
    return status;

  double decay[POLYAK_MAX_SHADOWS];
  float weight[POLYAK_MAX_SHADOWS];
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    decay[k] = polyak_update_decay(p, k, p->last_step, step, p->updates_counted[k]);
    weight[k] = (float)(1.0 - decay[k]);
  }
  polyak_update_args args;
  polyak_update_args_init(p, step, step - p->last_step, weight, &args);
  status = p->ops->update(p, &args, stream);
  if (status != POLYAK_OK)
    return status;
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    if (polyak_host_product(&p->cfg, k))
      p->beta_prod[k] *= decay[k];
    p->updates_counted[k] += polyak_updates_counted_in(p, k, step - 1, step);
  }
  p->last_step = step;
  return POLYAK_OK;
}

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
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: with zero_init, shadow %d has no average yet (%s)",
                       function, shadow,
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

polyak_status polyak_set_grad_norm(polyak_t *p, const float *grad_norm)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!polyak_has_grad_norm(&p->cfg))
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_set_grad_norm: no shadow follows the grad norm (grad_norm_c is 0 for all)");
  if (!grad_norm)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_grad_norm: grad_norm is NULL");
  if ((uintptr_t)grad_norm % sizeof(float) != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_grad_norm: grad_norm %p is not 4-byte aligned",
                       (const void *)grad_norm);
  polyak_status status = p->ops->check_grad_norm(p, grad_norm);
  if (status == POLYAK_OK)
    p->grad_norm = grad_norm;
  return status;
}

/* What polyak_set_grads and polyak_set_layer_norms ask of the handle. */
static polyak_status check_layer_source(polyak_t *p, const char *function)
{
  if (!polyak_has_layerwise(&p->cfg))
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: no shadow is layer-wise (layerwise_beta0 is 0 for all)", function);
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: call polyak_finalize first", function);
  return POLYAK_OK;
}

polyak_status polyak_set_grads(polyak_t *p, void *const *grads)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  polyak_status status = check_layer_source(p, "polyak_set_grads");
  if (status != POLYAK_OK)
    return status;
  if (!grads && p->num_tensors > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_grads: grads is NULL");
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (t->num_elems > 0 && !grads[i])
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_grads: grads[%d] (\"%s\") is NULL", i, t->name);
    if ((uintptr_t)grads[i] % polyak_dtype_num_bytes(t->dtype) != 0)
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                         "polyak_set_grads: grads[%d] (\"%s\") %p is not aligned to its %zu-byte elements", i,
                         t->name, grads[i], polyak_dtype_num_bytes(t->dtype));
  }
  status = p->ops->set_layer_source(p, grads, NULL);
  if (status == POLYAK_OK)
    p->layer_source = 1;
  return status;
}

polyak_status polyak_set_layer_norms(polyak_t *p, const float *norms)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  polyak_status status = check_layer_source(p, "polyak_set_layer_norms");
  if (status != POLYAK_OK)
    return status;
  if (!norms && p->num_tensors > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_layer_norms: norms is NULL");
  if ((uintptr_t)norms % sizeof(float) != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_layer_norms: norms %p is not 4-byte aligned",
                       (const void *)norms);
  status = p->ops->set_layer_source(p, NULL, norms);
  if (status == POLYAK_OK)
    p->layer_source = 2;
  return status;
}

polyak_status polyak_get_layer_betas(polyak_t *p, int shadow, double *betas)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_get_layer_betas: call polyak_finalize first");
  if (shadow < 0 || shadow >= p->cfg.num_shadows || !(p->cfg.layerwise_beta0[shadow] > 0.0))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_get_layer_betas: shadow %d is not a layer-wise one", shadow);
  if (!betas && p->num_tensors > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_get_layer_betas: betas is NULL");
  if (!p->layer_source) /* nothing to compute betas from yet */
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_get_layer_betas: no gradients or norms are set");
  size_t count = (size_t)p->num_tensors * POLYAK_MAX_SHADOWS;
  double *all = malloc((count + 1) * sizeof *all);
  if (!all)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_get_layer_betas: out of host memory");
  polyak_status status = p->ops->layer_betas(p, all);
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++)
    betas[i] = all[(size_t)i * POLYAK_MAX_SHADOWS + (size_t)shadow];
  free(all);
  return status;
}

polyak_status polyak_get_beta_product(polyak_t *p, int shadow, double *beta_product)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  polyak_status status = polyak_check_shadow(p, shadow, "polyak_get_beta_product");
  if (status != POLYAK_OK)
    return status;
  if (!beta_product)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_get_beta_product: beta_product is NULL");
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_get_beta_product: steps are reserved for graph replays; call "
                       "polyak_graph_release first");
  if (p->cfg.layerwise_beta0[shadow] > 0.0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_get_beta_product: shadow %d is layer-wise: its betas are per tensor "
                       "(polyak_get_layer_betas)",
                       shadow);
  status = polyak_is_grad_norm(&p->cfg, shadow) ? polyak_refresh_products(p) : POLYAK_OK;
  if (status == POLYAK_OK)
    *beta_product = p->beta_prod[shadow];
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
  return status == POLYAK_OK && !p->graph_reserved ? polyak_refresh_products(p) : status;
}

polyak_status polyak_debias_scale(polyak_t *p, int shadow, void *stream, const char *function, double *scale)
{
  polyak_status status = prepare_debias(p, stream, function);
  return status == POLYAK_OK ? debias_scale_of(p, shadow, function, scale) : status;
}

/* The checks polyak_get_shadow and polyak_get_local_shadow share. */
static polyak_status check_read(polyak_t *p, int shadow, int tensor, const void *dst,
                                polyak_dtype dst_dtype, const char *function)
{
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: call polyak_finalize first", function);
  polyak_status status = polyak_check_shadow(p, shadow, function);
  if (status != POLYAK_OK)
    return status;
  if (tensor < 0 || tensor >= p->num_tensors)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: tensor = %d is outside 0..%d", function, tensor,
                       p->num_tensors - 1);
  if (!polyak_dtype_valid(dst_dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: dst_dtype = %d is not a polyak_dtype", function,
                       (int)dst_dtype);
  if (!dst && p->tensors[tensor].num_elems > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: dst is NULL", function);
  if ((uintptr_t)dst % polyak_dtype_num_bytes(dst_dtype) != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: dst %p is not aligned to its %zu-byte elements",
                       function, dst, polyak_dtype_num_bytes(dst_dtype));
  return POLYAK_OK;
}

/* polyak_get_shadow (whole: the other ranks' pieces gathered where the
 * handle has them) and polyak_get_local_shadow (this rank's piece). */
static polyak_status read_shadow(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                 void *stream, int whole, const char *function)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  double debias_scale = 1.0;
  polyak_status status = check_read(p, shadow, tensor, dst, dst_dtype, function);
  if (status == POLYAK_OK &&
      (whole ? p->tensors[tensor].num_elems : p->descs[tensor].local_num_elems) > 0)
    status = p->ops->check_read_out(p, dst, stream, function);
  if (status == POLYAK_OK)
    status = polyak_debias_scale(p, shadow, stream, function, &debias_scale);
  if (status != POLYAK_OK)
    return status;
  if (whole && polyak_needs_gather(p, tensor))
    return polyak_gather_tensor(p, shadow, tensor, debias_scale, dst, dst_dtype, stream);
  polyak_dtype src_dtype;
  const void *src = polyak_local_slice(p, shadow, tensor, &src_dtype);
  return p->ops->read_out(p, src, src_dtype, p->descs[tensor].local_num_elems, debias_scale, dst, dst_dtype,
                          stream);
}

polyak_status polyak_get_shadow(polyak_t *p, int shadow, int tensor, void *dst,
                                polyak_dtype dst_dtype, void *stream)
{
  return read_shadow(p, shadow, tensor, dst, dst_dtype, stream, 1, "polyak_get_shadow");
}

polyak_status polyak_get_local_shadow(polyak_t *p, int shadow, int tensor, void *dst,
                                      polyak_dtype dst_dtype, void *stream)
{
  return read_shadow(p, shadow, tensor, dst, dst_dtype, stream, 0, "polyak_get_local_shadow");
}

polyak_status polyak_local_range(polyak_t *p, int tensor, int64_t *first_elem, int64_t *num_elems)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_local_range: call polyak_finalize first");
  if (tensor < 0 || tensor >= p->num_tensors)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_local_range: tensor = %d is outside 0..%d",
                       tensor, p->num_tensors - 1);
  if (!first_elem || !num_elems)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_local_range: an output pointer is NULL");
  *first_elem = p->descs[tensor].local_first_elem;
  *num_elems = p->descs[tensor].local_num_elems;
  return POLYAK_OK;
}

polyak_status polyak_copy_to_params(polyak_t *p, int shadow, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_copy_to_params: call polyak_finalize first");
  double debias_scale = 1.0;
  polyak_status status = polyak_check_shadow(p, shadow, "polyak_copy_to_params");
  if (status == POLYAK_OK)
    status = polyak_debias_scale(p, shadow, stream, "polyak_copy_to_params", &debias_scale);
  if (status != POLYAK_OK)
    return status;
  for (int i = 0; i < p->num_tensors; i++)
    if (polyak_needs_gather(p, i))
      return polyak_gather_to_params(p, shadow, debias_scale, stream);
  return p->ops->copy_to_params(p, shadow, debias_scale, stream);
}

/* The checks of a blend and its coefficients: weight * debias, as float. */
static polyak_status blend_coefficients(polyak_t *p, const double *weights, int flags, float *coefficient,
                                        void *stream, const char *function)
{
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: call polyak_finalize first", function);
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
                       "%s: the weights sum to %.9g, not 1 (pass POLYAK_BLEND_ANY_WEIGHTS to allow it)",
                       function, sum);
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
  return status == POLYAK_OK ? p->ops->blend(p, coefficient, -1, NULL, POLYAK_F32, stream) : status;
}

polyak_status polyak_get_blend(polyak_t *p, const double *weights, int flags, int tensor, void *dst,
                               polyak_dtype dst_dtype, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  float coefficient[POLYAK_MAX_SHADOWS];
  polyak_status status = blend_coefficients(p, weights, flags, coefficient, stream, "polyak_get_blend");
  if (status == POLYAK_OK)
    status = check_read(p, 0, tensor, dst, dst_dtype, "polyak_get_blend");
  if (status == POLYAK_OK && p->tensors[tensor].num_elems > 0)
    status = p->ops->check_read_out(p, dst, stream, "polyak_get_blend");
  return status == POLYAK_OK ? p->ops->blend(p, coefficient, tensor, dst, dst_dtype, stream) : status;
}

polyak_status polyak_hard_update(polyak_t *p, int shadow, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_hard_update: call polyak_finalize first");
  polyak_status status = polyak_check_shadow(p, shadow, "polyak_hard_update");
  if (status != POLYAK_OK)
    return status;
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_hard_update: steps are reserved for graph replays; call polyak_graph_release "
                       "first");
  status = polyak_refuse_capture(
      p, stream, "polyak_hard_update: a captured hard update would reset the beta product only once, not at every "
                 "replay");
  /* a grad-norm shadow's product lives on the backend: reset there first,
   * put back if the copy fails */
  double products[POLYAK_MAX_SHADOWS], kept = 1.0;
  int grad_norm = polyak_is_grad_norm(&p->cfg, shadow);
  if (status == POLYAK_OK && grad_norm)
    status = p->ops->products_read(p, products);
  if (status == POLYAK_OK && grad_norm) {
    kept = products[shadow];
    products[shadow] = 0.0;
    status = p->ops->products_write(p, products);
  }
  if (status != POLYAK_OK)
    return status;
  status = p->ops->hard_update(p, shadow, stream);
  if (status != POLYAK_OK && grad_norm) {
    products[shadow] = kept;
    p->ops->products_write(p, products);
  }
  if (status == POLYAK_OK)
    p->beta_prod[shadow] = 0.0;
  return status;
}

polyak_status polyak_store(polyak_t *p, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_store: call polyak_finalize first");
  polyak_status status = p->ops->store(p, stream);
  if (status == POLYAK_OK)
    p->stored = 1;
  return status;
}

polyak_status polyak_restore(polyak_t *p, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->stored)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_restore: nothing is stored; call polyak_store first");
  return p->ops->restore(p, stream);
}

polyak_status polyak_nonfinite_count(polyak_t *p, int64_t *count)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!count)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_nonfinite_count: count is NULL");
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_nonfinite_count: call polyak_finalize first");
  return p->ops->nonfinite_count(p, count);
}
