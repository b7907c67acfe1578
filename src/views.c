/* views.c: the shadows in place (polyak.h part 2.8): their addresses, and
 * the step state a caller sets after writing them there.
 *
 * A write through the addresses bypasses every check a load makes, so the
 * handle refuses to fold params into (or save) what it holds until the step
 * state comes back through polyak_set_step_state, which checks it as the
 * checkpoint reader checks a file's metadata (checkpoint_keys.c). */
#include <math.h>

#include "polyak_internal.h"

polyak_status polyak_refuse_open_shadows(polyak_t *p, const char *function)
{
  if (!p->shadows_open)
    return POLYAK_OK;
  return polyak_fail(p, POLYAK_ERR_STATE,
                     "%s: the shadows are being written through their addresses (polyak_begin_shadow_write) and "
                     "may hold part of a state; call polyak_set_step_state after writing them all, or load a "
                     "checkpoint",
                     function);
}

polyak_status polyak_shadow_data(polyak_t *p, int shadow, int tensor, void **data, polyak_dtype *dtype,
                                 int64_t *num_elems)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_shadow_data"));
  if (!data)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_shadow_data: data is NULL");
  if (tensor < 0 || tensor >= p->num_tensors)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_shadow_data: tensor %d of %d", tensor, p->num_tensors);
  const polyak_tensor *t = &p->tensors[tensor];
  int shadows = t->copy_only ? 1 : p->cfg.num_shadows;
  if (shadow < 0 || shadow >= shadows)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_shadow_data: shadow %d of tensor %d (\"%s\"), which has %d",
                       shadow, tensor, t->name, shadows);
  void *where;
  polyak_dtype type;
  int64_t count;
  if (t->copy_only) { /* one mirror, whole on every rank */
    where = (char *)p->copies + t->mirror_offset_bytes;
    type = t->dtype;
    count = t->num_elems;
  } else {
    where = polyak_local_slice(p, shadow, tensor, &type);
    count = p->descs[tensor].local_num_elems;
  }
  *data = count > 0 ? where : NULL;
  if (dtype)
    *dtype = type;
  if (num_elems)
    *num_elems = count;
  return POLYAK_OK;
}

polyak_status polyak_get_step_state(polyak_t *p, polyak_step_state *state)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_get_step_state"));
  if (!state)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_get_step_state: state is NULL");
  polyak_step_state out = {.struct_size = sizeof out,
                           .num_shadows = p->cfg.num_shadows,
                           .shadows_open = p->shadows_open,
                           .step = p->last_step};
  POLYAK_TRY(polyak_refresh_products(p)); /* grad-norm shadows' products, from the device */
  POLYAK_TRY(p->ops->nonfinite_count(p, &out.nonfinite_count));
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    out.beta_products[k] = p->beta_prod[k];
    out.update_counts[k] = p->updates_counted[k];
  }
  *state = out;
  return POLYAK_OK;
}

/* What polyak_begin_shadow_write and polyak_set_step_state refuse. */
static polyak_status check_writable(polyak_t *p, const char *function)
{
  POLYAK_TRY(polyak_require_finalized(p, function));
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: steps are reserved for graph replays; call polyak_graph_release first",
                       function);
  POLYAK_TRY(polyak_refuse_pending_store(p, function));
  return polyak_refuse_during_capture(p, NULL, 0, function);
}

polyak_status polyak_begin_shadow_write(polyak_t *p)
{
  POLYAK_TRY(check_writable(p, "polyak_begin_shadow_write"));
  int64_t count;
  POLYAK_TRY(p->ops->nonfinite_count(p, &count)); /* waits for the device: no update still writes */
  p->shadows_open = 1;
  return POLYAK_OK;
}

polyak_status polyak_set_step_state(polyak_t *p, const polyak_step_state *state)
{
  const char *function = "polyak_set_step_state";
  POLYAK_TRY(check_writable(p, function));
  if (!state)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: state is NULL", function);
  if (state->struct_size != sizeof *state)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: struct_size is %zu, this library's polyak_step_state has %zu",
                       function, state->struct_size, sizeof *state);
  if (state->num_shadows != p->cfg.num_shadows)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: the state has %d shadows, this handle %d", function,
                       state->num_shadows, p->cfg.num_shadows);
  if (state->step < 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: step %lld is not a step", function, (long long)state->step);
  if (state->nonfinite_count < 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: nonfinite_count %lld is not a count", function,
                       (long long)state->nonfinite_count);
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    double product = state->beta_products[k];
    if (!(product >= 0.0 && product <= 1.0)) /* NaN fails too */
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: beta_products[%d] = %s is not in [0, 1]", function, k,
                         polyak_format_double(product).text);
    if (state->update_counts[k] < 0 || state->update_counts[k] > state->step)
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                         "%s: update_counts[%d] = %lld is not a count of updates up to step %lld", function, k,
                         (long long)state->update_counts[k], (long long)state->step);
  }
  /* the backend's parts first (grad-norm products, the count), each put back if a later one fails */
  double products_before[POLYAK_MAX_SHADOWS];
  int grad_norm = polyak_has_grad_norm(&p->cfg);
  int64_t count_before = 0;
  polyak_status status = p->ops->nonfinite_count(p, &count_before);
  if (status == POLYAK_OK && grad_norm) {
    status = p->ops->products_read(p, products_before);
    if (status == POLYAK_OK)
      status = p->ops->products_write(p, state->beta_products);
  }
  if (status == POLYAK_OK) {
    status = p->ops->set_nonfinite_count(p, state->nonfinite_count);
    if (status != POLYAK_OK && grad_norm)
      p->ops->products_write(p, products_before);
  }
  if (status != POLYAK_OK)
    return status;
  p->last_step = state->step;
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    p->beta_prod[k] = state->beta_products[k];
    p->updates_counted[k] = state->update_counts[k];
  }
  p->shadows_open = 0;
  return POLYAK_OK;
}
