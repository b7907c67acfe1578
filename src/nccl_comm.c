/* nccl_comm.c: the only NCCL calls in polyak: checking a borrowed
 * communicator, and the all-gather of shadow arenas. polyak never creates or
 * destroys a communicator. */
#include <cuda_runtime.h>
#include <nccl.h>

#include "nccl_comm.h"
#include "polyak_internal.h"

polyak_status polyak_nccl_check_comm(void *comm, int world_size, int rank, char *msg,
                                     size_t msg_num_bytes)
{
  int count = 0, user_rank = 0;
  ncclResult_t result = ncclCommCount((ncclComm_t)comm, &count);
  if (result == ncclSuccess)
    result = ncclCommUserRank((ncclComm_t)comm, &user_rank);
  if (result != ncclSuccess)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_NCCL, "nccl_comm: %s",
                          ncclGetErrorString(result));
  if (count != world_size || user_rank != rank)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "nccl_comm has %d ranks and this process is rank %d there, but the "
                          "config says world_size %d, rank %d",
                          count, user_rank, world_size, rank);
  return POLYAK_OK;
}

polyak_status polyak_nccl_all_gather(void *comm, const void *send, void *recv, size_t count,
                                     int is_bf16, void *stream, char *msg, size_t msg_num_bytes)
{
  ncclResult_t result = ncclAllGather(send, recv, count, is_bf16 ? ncclBfloat16 : ncclFloat32,
                                      (ncclComm_t)comm, (cudaStream_t)stream);
  if (result != ncclSuccess)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_NCCL, "ncclAllGather: %s",
                          ncclGetErrorString(result));
  return POLYAK_OK;
}
