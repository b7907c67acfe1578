/* nccl_comm.h: the NCCL side of sharded handles (NCCL builds only). */
#ifndef POLYAK_NCCL_COMM_H
#define POLYAK_NCCL_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "polyak.h"

/* POLYAK_OK if `comm` has world_size ranks and this process is `rank`
 * there; else POLYAK_ERR_INVALID_ARG (disagreeing) or POLYAK_ERR_NCCL. */
polyak_status polyak_nccl_check_comm(void *comm, int world_size, int rank, char *msg,
                                     size_t msg_num_bytes);

/* ncclAllGather of `count` elements (4-byte floats, or 2-byte bf16 with
 * is_bf16) per rank from `send` into `recv`, on `stream`. */
polyak_status polyak_nccl_all_gather(void *comm, const void *send, void *recv, size_t count,
                                     int is_bf16, void *stream, char *msg, size_t msg_num_bytes);

#endif /* POLYAK_NCCL_COMM_H */
