/* cuda_transfer.c: shadow bytes moving between the device and the host
 * (checkpoints, through pinned memory and staging arenas) and between
 * ranks (gathers over NCCL, agreements). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_state.h"
#ifdef POLYAK_HAVE_NCCL
#include "nccl_comm.h"
#endif

/* ---- checkpoints: raw shadow bytes through pinned host memory ------------ */

void *polyak_cuda_host_buffer(polyak_t *p, size_t num_bytes)
{
  void *buffer = NULL;
  polyak_cuda_scope scope;
  if (polyak_cuda_enter(p, &scope) == cudaSuccess) {
    if (cudaMallocHost(&buffer, num_bytes) != cudaSuccess)
      buffer = NULL;
    polyak_cuda_leave(&scope);
  }
  cudaGetLastError();
  return buffer;
}

void polyak_cuda_free_host_buffer(polyak_t *p, void *buffer)
{
  (void)p;
  cudaFreeHost(buffer);
}

/* Copies between an arena range and host memory on the handle's device,
 * ordered after all work already on it (save and load are rare). */
static polyak_status copy_arena(polyak_t *p, void *dst, const void *src, size_t num_bytes, enum cudaMemcpyKind kind,
                                const char *what)
{
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaMemcpy(dst, src, num_bytes, kind);
  if (err == cudaSuccess && kind == cudaMemcpyHostToDevice) /* from pageable memory it may land later */
    err = cudaStreamSynchronize(0);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, what);
}

polyak_status polyak_cuda_copy_to_host(polyak_t *p, void *host, const void *src, size_t num_bytes)
{
  return copy_arena(p, host, src, num_bytes, cudaMemcpyDeviceToHost, "copying shadows to the host");
}

polyak_status polyak_cuda_copy_from_host(polyak_t *p, void *dst, const void *host, size_t num_bytes)
{
  return copy_arena(p, dst, host, num_bytes, cudaMemcpyHostToDevice, "copying to the device");
}

static void free_staging(polyak_t *p, cuda_state *state)
{
  polyak_cuda_scope scope;
  if (polyak_cuda_enter(p, &scope) == cudaSuccess) {
    for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
      cudaFree(state->staging[k]);
      state->staging[k] = NULL;
    }
    polyak_cuda_leave(&scope);
  }
  cudaGetLastError();
}

polyak_status polyak_cuda_staging_begin(polyak_t *p)
{
  cuda_state *state = p->backend;
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  for (int k = 0; k < p->cfg.num_shadows && err == cudaSuccess; k++)
    err = cudaMalloc(&state->staging[k], arena_num_bytes > 0 ? arena_num_bytes : 16);
  polyak_cuda_leave(&scope);
  if (err != cudaSuccess) {
    free_staging(p, state);
    return polyak_cuda_fail(p, err, "polyak_load: cudaMalloc of a second set of shadows");
  }
  return POLYAK_OK;
}

polyak_status polyak_cuda_staging_write(polyak_t *p, int shadow, int64_t first_elem, int64_t num_elems,
                                        const void *host)
{
  cuda_state *state = p->backend;
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  return copy_arena(p, (char *)state->staging[shadow] + first_elem * elem_bytes, host, (size_t)num_elems * elem_bytes,
                    cudaMemcpyHostToDevice, "polyak_load: copying a shadow to the device");
}

polyak_status polyak_cuda_staging_commit(polyak_t *p, int64_t nonfinite_count, const void *copies)
{
  cuda_state *state = p->backend;
  unsigned long long count = (unsigned long long)nonfinite_count;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* no update may still read the old shadows */
  /* copied, not swapped: captured graphs hold the arenas' addresses */
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  for (int k = 0; k < p->cfg.num_shadows && err == cudaSuccess; k++)
    err = cudaMemcpy(state->shadows[k], state->staging[k], arena_num_bytes, cudaMemcpyDeviceToDevice);
  if (err == cudaSuccess && copies)
    err = cudaMemcpy(p->copies, copies, (size_t)p->copies_num_bytes, cudaMemcpyHostToDevice);
  if (err == cudaSuccess)
    err = cudaMemcpy(&state->counters[COUNT_UPDATES], &count, sizeof count, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) /* pageable copies may land after they return */
    err = cudaDeviceSynchronize();
  polyak_cuda_leave(&scope);
  free_staging(p, state);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_load");
}

void polyak_cuda_staging_abort(polyak_t *p)
{
  free_staging(p, p->backend);
}

/* ---- gathers ------------------------------------------------------------------ */

void *polyak_cuda_scratch_alloc(polyak_t *p, size_t num_bytes)
{
  void *scratch = NULL;
  polyak_cuda_scope scope;
  if (polyak_cuda_enter(p, &scope) == cudaSuccess) {
    if (cudaMalloc(&scratch, num_bytes ? num_bytes : 16) != cudaSuccess)
      scratch = NULL;
    polyak_cuda_leave(&scope);
  }
  cudaGetLastError();
  return scratch;
}

void polyak_cuda_scratch_free(polyak_t *p, void *scratch)
{
  polyak_cuda_scope scope;
  if (polyak_cuda_enter(p, &scope) == cudaSuccess) {
    cudaDeviceSynchronize(); /* gathers read it on the caller's stream */
    cudaFree(scratch);
    polyak_cuda_leave(&scope);
  }
  cudaGetLastError();
}

polyak_status polyak_cuda_copy_bytes(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream)
{
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(dst, src, num_bytes, cudaMemcpyDeviceToDevice, (cudaStream_t)stream);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "cudaMemcpyAsync");
}

polyak_status polyak_cuda_agree(polyak_t *p, int local_ok, int *all_ok)
{
  *all_ok = local_ok;
#ifdef POLYAK_HAVE_NCCL
  cuda_state *state = p->backend;
  if (p->cfg.nccl_comm) {
    char reason[POLYAK_ERROR_BYTES] = "";
    polyak_cuda_scope scope;
    cudaError_t err = polyak_cuda_enter(p, &scope);
    /* the collective is issued even where the device could not be entered
     * (NCCL enters the communicator's device itself): the other ranks wait
     * in it, and learn of this rank's failure from it */
    polyak_status status =
        polyak_nccl_agree(p->cfg.nccl_comm, state->agreement, ++state->agreements, local_ok && err == cudaSuccess,
                          err == cudaSuccess, all_ok, reason, sizeof reason);
    polyak_cuda_leave(&scope);
    if (err != cudaSuccess)
      return polyak_cuda_fail(p, err, "agreeing: entering the handle's device");
    return status == POLYAK_OK ? status : polyak_fail(p, status, "%s", reason);
  }
#else
  (void)p; /* one rank: nothing to agree on */
#endif
  return POLYAK_OK;
}

/* The finalize handshake's slots again (finalize is over): every rank's
 * value gathered. A rank that could not write its slot fails here, and the
 * agreement that follows every comparison makes all of them fail. */
polyak_status polyak_cuda_compare(polyak_t *p, uint64_t value, int *other)
{
  *other = -1;
#ifdef POLYAK_HAVE_NCCL
  cuda_state *state = p->backend;
  if (p->cfg.nccl_comm) {
    char reason[POLYAK_ERROR_BYTES] = "";
    polyak_cuda_scope scope;
    cudaError_t err = polyak_cuda_enter(p, &scope);
    int all_ok = 0, same = 1;
    polyak_status status = polyak_nccl_finalize_agree(p->cfg.nccl_comm, state->agreement, p->cfg.world_size, value, 1,
                                                      &all_ok, &same, other, reason, sizeof reason);
    polyak_cuda_leave(&scope);
    if (err != cudaSuccess)
      return polyak_cuda_fail(p, err, "comparing: entering the handle's device");
    if (same)
      *other = -1;
    return status == POLYAK_OK ? status : polyak_fail(p, status, "%s", reason);
  }
#else
  (void)p;
  (void)value;
#endif
  return POLYAK_OK;
}

#ifdef POLYAK_HAVE_NCCL
polyak_status polyak_cuda_all_gather(polyak_t *p, const void *send, void *recv, int64_t count, void *stream)
{
  char reason[POLYAK_ERROR_BYTES];
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "all-gather: entering the handle's device");
  polyak_status status = polyak_nccl_all_gather(p->cfg.nccl_comm, send, recv, (size_t)count,
                                                p->cfg.shadow_dtype == POLYAK_BF16, stream, reason, sizeof reason);
  polyak_cuda_leave(&scope);
  return status == POLYAK_OK ? status : polyak_fail(p, status, "%s", reason);
}
#endif
