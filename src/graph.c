/* graph.c: steps reserved ahead for replays of a captured update. The host
 * computes every reserved step's weights exactly as polyak_update would, so
 * replays and direct updates give the same bits. */
#include <stdint.h>
#include <stdlib.h>

#include "polyak_internal.h"

/* The updates shadow k has counted before reserved row `row`. */
static int64_t counted_before(const polyak_t *p, int k, int64_t row)
{
  int64_t first = p->graph_first_step;
  return p->updates_counted[k] + polyak_updates_counted_in(p, k, first - 1, first + row - 1);
}

/* The decay of reserved step `row`: the first one also covers the gap
 * since the last update. */
static double reserved_decay(const polyak_t *p, int k, int64_t row)
{
  int64_t step = p->graph_first_step + row;
  int64_t previous = row == 0 ? p->last_step : step - 1;
  return polyak_update_decay(p, k, previous, step, counted_before(p, k, row));
}

polyak_status polyak_graph_reserve(polyak_t *p, int64_t first_step, int64_t num_steps, void *stream)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_graph_reserve"));
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_graph_reserve: steps %lld..%lld are reserved already; call "
                       "polyak_graph_release first",
                       (long long)p->graph_first_step, (long long)(p->graph_first_step + p->graph_num_steps - 1));
  polyak_status status = polyak_refuse_open_shadows(p, "polyak_graph_reserve");
  if (status == POLYAK_OK)
    status = polyak_refuse_pending_store(p, "polyak_graph_reserve");
  if (status == POLYAK_OK) /* it waits for the device */
    status = polyak_refuse_during_capture(p, stream, 1, "polyak_graph_reserve");
  if (status == POLYAK_OK)
    status = polyak_check_next_step(p, first_step, "polyak_graph_reserve: first_step");
  if (status == POLYAK_OK)
    status = polyak_check_update_sources(p, "polyak_graph_reserve");
  if (status != POLYAK_OK)
    return status;
  size_t row_num_bytes = (size_t)p->cfg.num_shadows * sizeof(float);
  if (num_steps < 1 || num_steps > INT64_MAX - first_step)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_graph_reserve: num_steps = %lld is not a count of steps from "
                       "step %lld",
                       (long long)num_steps, (long long)first_step);
  /* the table costs host and device memory and a pass to fill: bounded */
  if (num_steps > POLYAK_MAX_GRAPH_STEPS)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_graph_reserve: num_steps = %lld is more than one reservation holds "
                       "(POLYAK_MAX_GRAPH_STEPS = %lld, a table of %zu bytes a step); reserve fewer and "
                       "reserve again after polyak_graph_release",
                       (long long)num_steps, (long long)POLYAK_MAX_GRAPH_STEPS, row_num_bytes);
  float *weights = malloc((size_t)num_steps * row_num_bytes);
  if (!weights)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_graph_reserve: out of host memory for %lld steps",
                       (long long)num_steps);
  p->graph_first_step = first_step;
  p->graph_num_steps = num_steps;
  p->graph_weights = weights;
  for (int64_t row = 0; row < num_steps; row++)
    for (int k = 0; k < p->cfg.num_shadows; k++)
      weights[row * p->cfg.num_shadows + k] = (float)(1.0 - reserved_decay(p, k, row));
  status = p->ops->graph_reserve(p, stream);
  if (status != POLYAK_OK) {
    free(weights);
    p->graph_weights = NULL;
    return status;
  }
  p->graph_reserved = 1;
  return POLYAK_OK;
}

polyak_status polyak_graph_update(polyak_t *p, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_graph_update: no steps reserved; call polyak_graph_reserve first");
  return p->ops->graph_update(p, stream);
}

polyak_status polyak_graph_release(polyak_t *p, int64_t *num_steps_done)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_graph_release: no steps are reserved");
  int64_t consumed = 0, dropped = 0;
  polyak_status status = polyak_refuse_during_capture(p, NULL, 0, "polyak_graph_release"); /* it waits */
  if (status == POLYAK_OK)
    status = p->ops->graph_release(p, &consumed, &dropped);
  if (status != POLYAK_OK)
    return status;
  for (int64_t row = 0; row < consumed; row++)
    for (int k = 0; k < p->cfg.num_shadows; k++)
      if (polyak_host_product(&p->cfg, k))
        p->beta_prod[k] *= reserved_decay(p, k, row);
  for (int k = 0; k < p->cfg.num_shadows; k++)
    p->updates_counted[k] = counted_before(p, k, consumed);
  if (consumed > 0)
    p->last_step = p->graph_first_step + consumed - 1;
  free(p->graph_weights);
  p->graph_weights = NULL;
  p->graph_reserved = 0;
  if (num_steps_done)
    *num_steps_done = consumed;
  if (dropped > 0)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_graph_release: %lld replays came after the %lld reserved steps "
                       "and changed nothing; reserve more steps",
                       (long long)dropped, (long long)p->graph_num_steps);
  return POLYAK_OK;
}
