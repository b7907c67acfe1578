/* nccl_comm.c: every NCCL call in polyak: checking a borrowed communicator,
 * the all-gather of shadows, and the agreements that keep the ranks' calls
 * in step. polyak never creates or destroys a communicator. */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdlib.h>

#include "nccl_comm.h"
#include "polyak_internal.h"

static polyak_status nccl_error(ncclResult_t result, const char *what, char *msg, size_t msg_num_bytes)
{
  return polyak_message(msg, msg_num_bytes, POLYAK_ERR_NCCL, "%s: %s%s", what, ncclGetErrorString(result),
                        result == ncclInProgress ? " (polyak needs a blocking communicator)" : "");
}

polyak_status polyak_nccl_check_comm(void *comm, int world_size, int rank, int device, char *msg, size_t msg_num_bytes)
{
  int count = 0, user_rank = 0, comm_device = 0;
  ncclResult_t result = ncclCommCount((ncclComm_t)comm, &count);
  if (result == ncclSuccess)
    result = ncclCommUserRank((ncclComm_t)comm, &user_rank);
  if (result == ncclSuccess)
    result = ncclCommCuDevice((ncclComm_t)comm, &comm_device);
  if (result != ncclSuccess)
    return nccl_error(result, "nccl_comm", msg, msg_num_bytes);
  if (count != world_size || user_rank != rank)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "nccl_comm has %d ranks and this process is rank %d there, but the "
                          "config says world_size %d, rank %d",
                          count, user_rank, world_size, rank);
  if (comm_device != device)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "nccl_comm runs on CUDA device %d, the config says device %d", comm_device, device);
  return POLYAK_OK;
}

polyak_status polyak_nccl_all_gather(void *comm, const void *send, void *recv, size_t count, int is_bf16, void *stream,
                                     char *msg, size_t msg_num_bytes)
{
  ncclResult_t result =
      ncclAllGather(send, recv, count, is_bf16 ? ncclBfloat16 : ncclFloat32, (ncclComm_t)comm, (cudaStream_t)stream);
  return result == ncclSuccess ? POLYAK_OK : nccl_error(result, "ncclAllGather", msg, msg_num_bytes);
}

polyak_status polyak_nccl_agree(void *comm, int *flag, int local_ok, int *all_ok, char *msg, size_t msg_num_bytes)
{
  int value = local_ok ? 1 : 0;
  cudaError_t err = cudaMemcpy(flag, &value, sizeof value, cudaMemcpyHostToDevice);
  if (err != cudaSuccess)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_CUDA, "agreeing: %s", cudaGetErrorString(err));
  ncclResult_t result = ncclAllReduce(flag, flag, 1, ncclInt32, ncclMin, (ncclComm_t)comm, NULL);
  if (result != ncclSuccess)
    return nccl_error(result, "ncclAllReduce", msg, msg_num_bytes);
  err = cudaMemcpy(&value, flag, sizeof value, cudaMemcpyDeviceToHost); /* waits for it */
  if (err != cudaSuccess)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_CUDA, "agreeing: %s", cudaGetErrorString(err));
  *all_ok = value;
  return POLYAK_OK;
}

polyak_status polyak_nccl_finalize_agree(void *comm, int world_size, uint64_t hash, int local_ok, int *all_ok,
                                         int *same, int *other, char *msg, size_t msg_num_bytes)
{
  uint64_t mine[2] = {hash, local_ok ? 1u : 0u};
  uint64_t *all = malloc(sizeof mine * (size_t)world_size), *device = NULL;
  cudaError_t err =
      all ? cudaMalloc((void **)&device, sizeof mine * (size_t)(world_size + 1)) : cudaErrorMemoryAllocation;
  ncclResult_t result = ncclSuccess;
  if (err == cudaSuccess)
    err = cudaMemcpy(device, mine, sizeof mine, cudaMemcpyHostToDevice);
  if (err == cudaSuccess)
    result = ncclAllGather(device, device + 2, sizeof mine, ncclUint8, (ncclComm_t)comm, NULL);
  if (err == cudaSuccess && result == ncclSuccess)
    err = cudaMemcpy(all, device + 2, sizeof mine * (size_t)world_size, cudaMemcpyDeviceToHost);
  cudaFree(device);
  polyak_status status = POLYAK_OK;
  if (result != ncclSuccess)
    status = nccl_error(result, "ncclAllGather", msg, msg_num_bytes);
  else if (err != cudaSuccess)
    status = polyak_message(msg, msg_num_bytes, POLYAK_ERR_CUDA, "finalize handshake: %s", cudaGetErrorString(err));
  *all_ok = 1;
  *same = 1;
  for (int r = 0; r < world_size && status == POLYAK_OK; r++) {
    *all_ok &= all[2 * r + 1] == 1u;
    if (all[2 * r] != hash && *same) {
      *same = 0;
      *other = r;
    }
  }
  free(all);
  return status;
}
