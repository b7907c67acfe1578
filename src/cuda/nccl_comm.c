/* nccl_comm.c: every NCCL call in polyak: checking a borrowed communicator,
 * the all-gather of shadows, and the agreements that keep the ranks' calls
 * in step. polyak never creates or destroys a communicator. */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdlib.h>

#include "agreement.h"
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

/* ---- the agreements' moves (agreement.h) over NCCL, on the legacy stream */

static polyak_status copy(void *to, const void *from, size_t num_bytes, enum cudaMemcpyKind kind, char *msg,
                          size_t msg_num_bytes)
{
  cudaError_t err = cudaMemcpy(to, from, num_bytes, kind); /* ordered with the collectives on the legacy stream */
  if (err == cudaSuccess)
    return POLYAK_OK;
  cudaGetLastError();
  return polyak_message(msg, msg_num_bytes, POLYAK_ERR_CUDA, "agreeing: %s", cudaGetErrorString(err));
}

static polyak_status write_slots(void *comm, uint64_t *device, const uint64_t *host, size_t count, char *msg,
                                 size_t msg_num_bytes)
{
  (void)comm;
  return copy(device, host, count * sizeof *host, cudaMemcpyHostToDevice, msg, msg_num_bytes);
}

static polyak_status read_slots(void *comm, uint64_t *host, const uint64_t *device, size_t count, char *msg,
                                size_t msg_num_bytes)
{
  (void)comm;
  return copy(host, device, count * sizeof *host, cudaMemcpyDeviceToHost, msg, msg_num_bytes); /* waits */
}

static polyak_status all_reduce_min(void *comm, const uint64_t *send, uint64_t *recv, size_t count, char *msg,
                                    size_t msg_num_bytes)
{
  ncclResult_t result = ncclAllReduce(send, recv, count, ncclUint64, ncclMin, (ncclComm_t)comm, NULL);
  return result == ncclSuccess ? POLYAK_OK : nccl_error(result, "ncclAllReduce", msg, msg_num_bytes);
}

static polyak_status all_gather(void *comm, const uint64_t *send, uint64_t *recv, size_t count_per_rank, char *msg,
                                size_t msg_num_bytes)
{
  ncclResult_t result = ncclAllGather(send, recv, count_per_rank, ncclUint64, (ncclComm_t)comm, NULL);
  return result == ncclSuccess ? POLYAK_OK : nccl_error(result, "ncclAllGather", msg, msg_num_bytes);
}

static polyak_agreement_io nccl_io(void *comm, char *msg, size_t msg_num_bytes)
{
  polyak_agreement_io io = {comm, msg, msg_num_bytes, write_slots, read_slots, all_reduce_min, all_gather};
  return io;
}

polyak_status polyak_nccl_agree(void *comm, uint64_t *slots, uint64_t sequence, int local_ok, int can_copy, int *all_ok,
                                char *msg, size_t msg_num_bytes)
{
  polyak_agreement_io io = nccl_io(comm, msg, msg_num_bytes);
  return polyak_agreement_run(&io, slots, sequence, local_ok, can_copy, all_ok);
}

polyak_status polyak_nccl_finalize_agree(void *comm, uint64_t *slots, int world_size, uint64_t hash, int local_ok,
                                         int *all_ok, int *same, int *other, char *msg, size_t msg_num_bytes)
{
  polyak_agreement_io io = nccl_io(comm, msg, msg_num_bytes);
  return polyak_handshake_run(&io, slots, world_size, hash, local_ok, all_ok, same, other);
}
