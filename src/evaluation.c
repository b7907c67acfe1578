/* evaluation.c: an exact copy of the params kept aside while they hold an
 * average for evaluation, and written back. While a store is pending
 * (polyak_store until polyak_restore or polyak_discard_store), the calls
 * that would fold the params into the shadows refuse: the params are
 * likely an average, and training would go on from it unnoticed. */
#include "polyak_internal.h"

polyak_status polyak_refuse_pending_store(polyak_t *p, const char *function)
{
  if (!p->store_pending)
    return POLYAK_OK;
  return polyak_fail(p, POLYAK_ERR_STATE,
                     "%s: a polyak_store is pending, so the params may hold an average, not the trained "
                     "weights; call polyak_restore first (or polyak_discard_store to go on from the params "
                     "as they are)",
                     function);
}

polyak_status polyak_store(polyak_t *p, void *stream)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_store"));
  if (p->store_pending) /* a second store would keep whatever the params hold now */
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_store: a store is pending already; polyak_restore or polyak_discard_store it "
                       "first");
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_store: steps are reserved for graph replays, which would fold what the params "
                       "hold during the store; call polyak_graph_release first");
  /* a captured store would keep the params once, and the host would think
   * a store pending at every replay (and its first use allocates) */
  polyak_status status = polyak_refuse_during_capture(p, stream, 1, "polyak_store");
  if (status == POLYAK_OK)
    status = p->ops->store(p, stream);
  if (status == POLYAK_OK)
    status = polyak_copies_store(p, 1, stream);
  if (status == POLYAK_OK)
    p->stored = p->store_pending = 1;
  return status;
}

polyak_status polyak_restore(polyak_t *p, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->stored)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_restore: nothing is stored; call polyak_store first");
  polyak_status status = polyak_refuse_during_capture(p, stream, 1, "polyak_restore");
  if (status == POLYAK_OK)
    status = p->ops->restore(p, stream);
  if (status == POLYAK_OK)
    status = polyak_copies_store(p, 0, stream);
  if (status == POLYAK_OK)
    p->store_pending = 0;
  return status;
}

polyak_status polyak_discard_store(polyak_t *p)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!p->stored)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_discard_store: nothing is stored");
  POLYAK_TRY(polyak_refuse_during_capture(p, NULL, 0, "polyak_discard_store"));
  p->stored = p->store_pending = 0;
  return POLYAK_OK;
}
