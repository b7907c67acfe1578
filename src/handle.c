/* handle.c: creating, inspecting and destroying a handle. */
#include <stdlib.h>

#include "offload/offload.h"
#include "polyak_internal.h"

polyak_status polyak_create(polyak_t **out, const polyak_config *cfg)
{
  if (!out)
    return POLYAK_ERR_INVALID_ARG;
  *out = NULL;
  polyak_status status = polyak_check_config(cfg, NULL, 0);
  if (status != POLYAK_OK)
    return status;
  polyak_t *p = calloc(1, sizeof *p);
  if (!p)
    return POLYAK_ERR_NO_MEMORY;
  polyak_config_normalize(cfg, &p->cfg);
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++)
    p->beta_prod[k] = 1.0;
  p->ops = &polyak_cpu_ops; /* host shadows of host params: the CPU backend's own */
#ifdef POLYAK_HAVE_CUDA
  if (p->cfg.backend == POLYAK_BACKEND_CUDA && p->cfg.shadow_location == POLYAK_SHADOWS_HOST)
    polyak_offload_use(p, &polyak_cuda_transfer_ops, NULL); /* the CUDA backend's params, host shadows */
  else if (p->cfg.backend == POLYAK_BACKEND_CUDA)
    p->ops = &polyak_cuda_ops;
#endif
  *out = p;
  return POLYAK_OK;
}

void polyak_destroy(polyak_t *p)
{
  if (!p)
    return;
  polyak_copies_release(p);
  p->ops->release(p);
  free(p->graph_weights);
  free(p->grads_set);
  polyak_plan_free(p);
  polyak_registry_free(p);
  free(p);
}

polyak_status polyak_require_loadable(polyak_t *p, const char *function)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: call polyak_finalize first", function);
  return POLYAK_OK;
}

polyak_status polyak_require_finalized(polyak_t *p, const char *function)
{
  POLYAK_TRY(polyak_require_loadable(p, function));
  if (p->torn)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "%s: a polyak_load_shards failed while writing the shadows (a file changed or could not "
                       "be read between its checking and its copying pass), so they are partly loaded: load a "
                       "checkpoint before anything else",
                       function);
  return POLYAK_OK;
}

/* The getters take a const handle, but a failure still records its reason:
 * the message buffer is the handle's own, never the caller's data. */
polyak_status polyak_get_step(const polyak_t *p, int64_t *step)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!step)
    return polyak_fail((polyak_t *)p, POLYAK_ERR_INVALID_ARG, "polyak_get_step: step is NULL");
  *step = p->last_step;
  return POLYAK_OK;
}

polyak_status polyak_num_tensors(const polyak_t *p, int *num_tensors)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!num_tensors)
    return polyak_fail((polyak_t *)p, POLYAK_ERR_INVALID_ARG, "polyak_num_tensors: num_tensors is NULL");
  *num_tensors = p->num_tensors;
  return POLYAK_OK;
}
