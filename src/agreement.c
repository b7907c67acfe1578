/* agreement.c: the ranks' agreements (agreement.h): every collective
 * issued by every rank, local failures carried in what it sends. */
#include "agreement.h"

#include <stdlib.h>

#include "polyak_internal.h"

/* The handshake's "ok": a value a zeroed or stale slot does not hold. */
#define HANDSHAKE_OK 0x706f6c79616b4f4bull /* "polyakOK" */

/* The first failure of a call's steps. */
static polyak_status first(polyak_status a, polyak_status b)
{
  return a != POLYAK_OK ? a : b;
}

polyak_status polyak_agreement_run(const polyak_agreement_io *io, uint64_t *slots, uint64_t sequence, int local_ok,
                                   int can_copy, int *all_ok)
{
  uint64_t mine = local_ok ? sequence : 0, all = 0;
  polyak_status status = POLYAK_OK;
  *all_ok = 0;
  if (can_copy)
    status = io->write(io->context, &slots[0], &mine, 1, io->msg, io->msg_num_bytes);
  /* issued whatever happened above: the other ranks are waiting in it */
  polyak_status reduced =
      io->all_reduce_min(io->context, &slots[0], &slots[1], 1, status == POLYAK_OK ? io->msg : NULL, io->msg_num_bytes);
  status = first(status, reduced);
  if (status == POLYAK_OK && can_copy)
    status = io->read(io->context, &all, &slots[1], 1, io->msg, io->msg_num_bytes);
  *all_ok = status == POLYAK_OK && can_copy && all == sequence;
  return status;
}

polyak_status polyak_handshake_run(const polyak_agreement_io *io, uint64_t *slots, int world_size, uint64_t hash,
                                   int local_ok, int *all_ok, int *same, int *other)
{
  uint64_t mine[2] = {hash, local_ok ? HANDSHAKE_OK : 0};
  uint64_t *all = malloc(2 * sizeof *all * (size_t)world_size);
  *all_ok = 0;
  *same = 1;
  *other = -1;
  polyak_status status = io->write(io->context, &slots[2], mine, 2, io->msg, io->msg_num_bytes);
  /* issued whatever happened above: the other ranks are waiting in it */
  polyak_status gathered =
      io->all_gather(io->context, &slots[2], &slots[4], 2, status == POLYAK_OK ? io->msg : NULL, io->msg_num_bytes);
  status = first(status, gathered);
  if (status == POLYAK_OK && !all)
    status = polyak_message(io->msg, io->msg_num_bytes, POLYAK_ERR_NO_MEMORY, "finalize handshake: out of host memory");
  if (status == POLYAK_OK)
    status = io->read(io->context, all, &slots[4], 2 * (size_t)world_size, io->msg, io->msg_num_bytes);
  if (status == POLYAK_OK) {
    *all_ok = 1;
    for (int r = 0; r < world_size; r++) {
      *all_ok &= all[2 * r + 1] == HANDSHAKE_OK;
      if (all[2 * r] != hash && *same) {
        *same = 0;
        *other = r;
      }
    }
  }
  free(all);
  return status;
}
