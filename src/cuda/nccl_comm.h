/* nccl_comm.h: the NCCL side of sharded handles (NCCL builds only). polyak
 * needs a blocking communicator (NCCL's default) and one process or thread
 * per rank. */
#ifndef POLYAK_NCCL_COMM_H
#define POLYAK_NCCL_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "polyak.h"

/* POLYAK_OK if `comm` has world_size ranks, this process is `rank` there,
 * and it runs on CUDA device `device`; else POLYAK_ERR_INVALID_ARG
 * (disagreeing) or POLYAK_ERR_NCCL. */
polyak_status polyak_nccl_check_comm(void *comm, int world_size, int rank, int device, char *msg, size_t msg_num_bytes);

/* ncclAllGather of `count` elements (4-byte floats, or 2-byte bf16 with
 * is_bf16) per rank from `send` into `recv`, on `stream`. */
polyak_status polyak_nccl_all_gather(void *comm, const void *send, void *recv, size_t count, int is_bf16, void *stream,
                                     char *msg, size_t msg_num_bytes);

/* An agreement over `comm` (agreement.h: polyak_agreement_run) through
 * `slots` (POLYAK_AGREEMENT_SLOTS device memory, zeroed at allocation);
 * waits for it. The collective is issued whatever failed before it. */
polyak_status polyak_nccl_agree(void *comm, uint64_t *slots, uint64_t sequence, int local_ok, int can_copy, int *all_ok,
                                char *msg, size_t msg_num_bytes);

/* Finalize's handshake over `comm` (agreement.h: polyak_handshake_run),
 * through the same slots. */
polyak_status polyak_nccl_finalize_agree(void *comm, uint64_t *slots, int world_size, uint64_t hash, int local_ok,
                                         int *all_ok, int *same, int *other, char *msg, size_t msg_num_bytes);

#endif /* POLYAK_NCCL_COMM_H */
