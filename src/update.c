/* update.c: finalize, the update and the hard update, and the checks of
 * the step an update applies. Each call validates its inputs and the
 * handle's state, computes on the host what the backend needs (per-shadow
 * weights in double), then hands over to the backend; the step state
 * changes only after the backend succeeded. */
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
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s = %lld does not follow the last update (step %lld)", what,
                       (long long)step, (long long)p->last_step);
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

polyak_status polyak_refuse_during_capture(polyak_t *p, void *stream, int has_stream, const char *function)
{
  int capturing = 0;
  polyak_status status = has_stream ? p->ops->capturing(p, stream, &capturing) : POLYAK_OK;
  if (status == POLYAK_OK && !capturing && p->ops->capture_under_way)
    status = p->ops->capture_under_way(p, &capturing);
  if (status != POLYAK_OK || !capturing)
    return status;
  return polyak_fail(p, POLYAK_ERR_STATE,
                     "%s: a CUDA graph is being captured (%s), and this call waits for the device, allocates or "
                     "changes host state, which would break the capture or not be replayed; call it before the "
                     "capture begins or after it ends",
                     function,
                     has_stream ? "on its stream, on a blocking stream, or where this handle's "
                                  "polyak_graph_update was captured"
                                : "on a blocking stream, or where this handle's polyak_graph_update was captured");
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
  /* the params checked, then the copy-only tensors' mirrors filled (the
   * backend's finalize waits for its stream, so they are in place when it
   * returns); the backend's finalize is called whatever happened here, so
   * that with a communicator every rank learns of a rank's failure */
  status = p->ops->check_params(p);
  if (status == POLYAK_OK)
    status = polyak_copies_allocate(p);
  if (status == POLYAK_OK)
    status = polyak_copies_refresh(p, stream);
  status = p->ops->finalize(p, stream, status);
  if (status != POLYAK_OK) {
    polyak_copies_release(p);
    polyak_plan_free(p);
    return status;
  }
  p->finalized = 1;
  return POLYAK_OK;
}

polyak_status polyak_update(polyak_t *p, int64_t step, void *stream)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_update"));
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_update: steps %lld.. are reserved for graph replays; call "
                       "polyak_graph_release first",
                       (long long)p->graph_first_step);
  polyak_status status = polyak_refuse_open_shadows(p, "polyak_update");
  if (status == POLYAK_OK)
    status = polyak_refuse_pending_store(p, "polyak_update");
  if (status == POLYAK_OK)
    status = polyak_check_next_step(p, step, "polyak_update: step");
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

polyak_status polyak_hard_update(polyak_t *p, int shadow, void *stream)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_hard_update"));
  polyak_status status = polyak_check_shadow(p, shadow, "polyak_hard_update");
  if (status != POLYAK_OK)
    return status;
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_hard_update: steps are reserved for graph replays; call polyak_graph_release "
                       "first");
  status = polyak_refuse_open_shadows(p, "polyak_hard_update");
  if (status == POLYAK_OK)
    status = polyak_refuse_pending_store(p, "polyak_hard_update");
  if (status == POLYAK_OK)
    status = polyak_refuse_capture(
        p, stream,
        "polyak_hard_update: a captured hard update would reset the beta product only once, not at every "
        "replay");
  if (status == POLYAK_OK) /* it waits for its scan of the params */
    status = polyak_refuse_during_capture(p, stream, 0, "polyak_hard_update");
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
  if (status != POLYAK_OK) {
    if (grad_norm) {
      products[shadow] = kept;
      p->ops->products_write(p, products);
    }
    return status;
  }
  /* the shadow is the params now, whatever the mirrors' copy reports (it
   * fails only with a CUDA error that every later call reports too) */
  p->beta_prod[shadow] = 0.0;
  return polyak_copies_refresh(p, stream);
}

polyak_status polyak_nonfinite_count(polyak_t *p, int64_t *count)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!count)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_nonfinite_count: count is NULL");
  POLYAK_TRY(polyak_require_finalized(p, "polyak_nonfinite_count"));
  POLYAK_TRY(polyak_refuse_during_capture(p, NULL, 0, "polyak_nonfinite_count")); /* it waits for the device */
  return p->ops->nonfinite_count(p, count);
}
