/* agreement.h: how the ranks of a sharded handle agree, with every rank
 * issuing every collective whatever failed before it on that rank: a rank
 * that skipped one would leave the others waiting in it forever. The steps
 * run over an interface (the NCCL backend's in src/cuda/nccl_comm.c), so
 * that CPU tests drive them with stand-ins for the device copies and the
 * collectives. No CUDA or NCCL header. */
#ifndef POLYAK_AGREEMENT_H
#define POLYAK_AGREEMENT_H

#include <stddef.h>
#include <stdint.h>

#include "polyak.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What an agreement moves: `count` uint64s between the host and device
 * memory, and the collectives over uint64s. Each returns POLYAK_OK or a
 * failure, with its reason written to msg. */
typedef struct {
  void *context;
  char *msg;
  size_t msg_num_bytes;
  polyak_status (*write)(void *context, uint64_t *device, const uint64_t *host, size_t count, char *msg,
                         size_t msg_num_bytes);
  polyak_status (*read)(void *context, uint64_t *host, const uint64_t *device, size_t count, char *msg,
                        size_t msg_num_bytes);
  polyak_status (*all_reduce_min)(void *context, const uint64_t *send, uint64_t *recv, size_t count, char *msg,
                                  size_t msg_num_bytes);
  polyak_status (*all_gather)(void *context, const uint64_t *send, uint64_t *recv, size_t count_per_rank, char *msg,
                              size_t msg_num_bytes);
} polyak_agreement_io;

/* The device memory of a handle's agreements, in uint64s: two for each
 * agreement (what this rank sends, what all agreed), then finalize's
 * handshake: two sent, two from each rank received. Zeroed when allocated,
 * so that a slot this rank failed to write says "not ok". */
#define POLYAK_AGREEMENT_SLOTS(world_size) (4 + 2 * (size_t)(world_size))

/* An agreement after finalize: *all_ok = 1 if every rank's local_ok is.
 * Agreement number `sequence` (1, 2, ...: every rank counts its agreements
 * alike) has each rank send `sequence` if it is ready and 0 if not; the
 * minimum is `sequence` only if every rank sent it: a rank that failed to
 * write its slot leaves an earlier agreement's number there, or 0, and so
 * says "not ok" too. can_copy 0 (the device could not be entered): nothing
 * is written or read, only the collective issued. Returns this rank's
 * first failure (*all_ok is then 0). */
polyak_status polyak_agreement_run(const polyak_agreement_io *io, uint64_t *slots, uint64_t sequence, int local_ok,
                                   int can_copy, int *all_ok);

/* Finalize's handshake: every rank's (tensors-and-config hash, ok) gathered.
 * *all_ok if every rank is ok, *same if every hash equals this rank's (else
 * *other is a rank that differs). The gather is issued whatever failed
 * before it. */
polyak_status polyak_handshake_run(const polyak_agreement_io *io, uint64_t *slots, int world_size, uint64_t hash,
                                   int local_ok, int *all_ok, int *same, int *other);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_AGREEMENT_H */
