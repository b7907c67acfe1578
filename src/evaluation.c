/* evaluation.c: an exact copy of the params kept aside while they hold an
 * average for evaluation, and written back. */
#include "polyak_internal.h"

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
