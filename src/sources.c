/* sources.c: what updates read besides the params (the grad norm, LAWA's
 * gradients or norms) and what they leave to inspect (the beta products,
 * LAWA's betas per tensor). */
#include <stdint.h>
#include <stdlib.h>

#include "polyak_internal.h"

/* Replays read what was set when their steps were reserved: a change now
 * would apply to direct updates but not to them. */
static polyak_status refuse_while_reserved(polyak_t *p, const char *function)
{
  return polyak_fail(p, POLYAK_ERR_STATE,
                     "%s: steps %lld..%lld are reserved, and their replays read what was set at "
                     "polyak_graph_reserve; call polyak_graph_release first",
                     function, (long long)p->graph_first_step,
                     (long long)(p->graph_first_step + p->graph_num_steps - 1));
}

polyak_status polyak_set_grad_norm(polyak_t *p, const float *grad_norm)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!polyak_has_grad_norm(&p->cfg))
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_set_grad_norm: no shadow follows the grad norm (every shadows[k].grad_norm_c is 0)");
  if (p->graph_reserved)
    return refuse_while_reserved(p, "polyak_set_grad_norm");
  if (!grad_norm)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_grad_norm: grad_norm is NULL");
  if ((uintptr_t)grad_norm % sizeof(float) != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_grad_norm: grad_norm %p is not 4-byte aligned",
                       (const void *)grad_norm);
  polyak_status status = polyak_refuse_during_capture(p, NULL, 0, "polyak_set_grad_norm");
  if (status == POLYAK_OK)
    status = p->ops->check_grad_norm(p, grad_norm);
  if (status == POLYAK_OK)
    p->grad_norm = grad_norm;
  return status;
}

/* What polyak_set_grads and polyak_set_layer_norms ask of the handle:
 * layer-wise shadows and finalize, then (check_change) no reservation and
 * no capture, since the change waits for the device. */
static polyak_status check_layerwise(polyak_t *p, const char *function)
{
  if (!polyak_has_layerwise(&p->cfg))
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: no shadow is layer-wise (every shadows[k].layerwise_beta0 is 0)",
                       function);
  return polyak_require_finalized(p, function);
}

static polyak_status check_change(polyak_t *p, const char *function)
{
  if (p->graph_reserved)
    return refuse_while_reserved(p, function);
  return polyak_refuse_during_capture(p, NULL, 0, function);
}

/* 1 if `grads` is the table polyak_set_grads holds already. */
static int same_grads(const polyak_t *p, void *const *grads)
{
  if (p->layer_source != 1 || !p->grads_set)
    return 0;
  for (int i = 0; i < p->num_tensors; i++)
    if (p->grads_set[i] != grads[i])
      return 0;
  return 1;
}

polyak_status polyak_set_grads(polyak_t *p, void *const *grads)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  polyak_status status = check_layerwise(p, "polyak_set_grads");
  if (status != POLYAK_OK)
    return status;
  if (!grads && p->num_tensors > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_grads: grads is NULL");
  /* the table held already: nothing changes, nothing waits, so it may be
   * set again before every update (fresh .grad tensors most often reuse
   * their addresses), during captures and reservations too */
  if (p->num_tensors > 0 && same_grads(p, grads))
    return POLYAK_OK;
  POLYAK_TRY(check_change(p, "polyak_set_grads"));
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (t->copy_only) /* not averaged: no gradient read */
      continue;
    if (t->num_elems > 0 && !grads[i])
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_grads: grads[%d] (\"%s\") is NULL", i, t->name);
    if ((uintptr_t)grads[i] % polyak_dtype_num_bytes(t->dtype) != 0)
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                         "polyak_set_grads: grads[%d] (\"%s\") %p is not aligned to its %zu-byte elements", i, t->name,
                         grads[i], polyak_dtype_num_bytes(t->dtype));
  }
  void **kept = malloc(((size_t)p->num_tensors + 1) * sizeof *kept);
  if (!kept)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_set_grads: out of host memory");
  status = p->ops->set_layer_source(p, grads, NULL);
  if (status != POLYAK_OK) {
    free(kept);
    return status;
  }
  for (int i = 0; i < p->num_tensors; i++)
    kept[i] = grads[i];
  free(p->grads_set);
  p->grads_set = kept;
  p->layer_source = 1;
  return POLYAK_OK;
}

polyak_status polyak_set_layer_norms(polyak_t *p, const float *norms)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  polyak_status status = check_layerwise(p, "polyak_set_layer_norms");
  if (status == POLYAK_OK)
    status = check_change(p, "polyak_set_layer_norms");
  if (status != POLYAK_OK)
    return status;
  if (!norms && p->num_tensors > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_layer_norms: norms is NULL");
  if ((uintptr_t)norms % sizeof(float) != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_set_layer_norms: norms %p is not 4-byte aligned",
                       (const void *)norms);
  status = p->ops->set_layer_source(p, NULL, norms);
  if (status == POLYAK_OK) {
    p->layer_source = 2;
    free(p->grads_set);
    p->grads_set = NULL;
  }
  return status;
}

polyak_status polyak_get_layer_betas(polyak_t *p, int shadow, double *betas)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_get_layer_betas"));
  if (shadow < 0 || shadow >= p->cfg.num_shadows || !(p->cfg.shadows[shadow].layerwise_beta0 > 0.0))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_get_layer_betas: shadow %d is not a layer-wise one", shadow);
  if (!betas && p->num_tensors > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_get_layer_betas: betas is NULL");
  if (!p->layer_source) /* nothing to compute betas from yet */
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_get_layer_betas: no gradients or norms are set");
  POLYAK_TRY(polyak_refuse_during_capture(p, NULL, 0, "polyak_get_layer_betas")); /* it waits for the device */
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
  if (p->cfg.shadows[shadow].layerwise_beta0 > 0.0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_get_beta_product: shadow %d is layer-wise: its betas are per tensor "
                       "(polyak_get_layer_betas)",
                       shadow);
  if (polyak_is_grad_norm(&p->cfg, shadow)) /* its product is fetched from the device, waiting for it */
    status = polyak_refuse_during_capture(p, NULL, 0, "polyak_get_beta_product");
  if (status == POLYAK_OK && polyak_is_grad_norm(&p->cfg, shadow))
    status = polyak_refresh_products(p);
  if (status == POLYAK_OK)
    *beta_product = p->beta_prod[shadow];
  return status;
}
