/* cuda_readout.c: the CUDA backend's reads of the shadows: one tensor
 * into a buffer, a shadow or a blend into the params, EDM2's synthesis by
 * cuBLAS, and the params' copy for polyak_store and polyak_restore. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_state.h"

/* ---- read-out -------------------------------------------------------------- */

void *polyak_cuda_arena(polyak_t *p, int shadow)
{
  return ((cuda_state *)p->backend)->shadows[shadow];
}

polyak_status polyak_cuda_check_read_out(polyak_t *p, const void *dst, size_t num_bytes, void *stream,
                                         const char *function)
{
  (void)stream;
  char what[128];
  snprintf(what, sizeof what, "%s: dst", function);
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  polyak_status status = err == cudaSuccess ? polyak_cuda_check_pointer(p, &scope, dst, num_bytes, what) : POLYAK_OK;
  if (err != cudaSuccess)
    status = polyak_cuda_fail(p, err, function);
  polyak_cuda_leave(&scope);
  return status;
}

polyak_status polyak_cuda_read_out(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                                   double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream)
{
  const cuda_state *state = p->backend;
  if (num_elems == 0)
    return POLYAK_OK;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess) {
    int64_t blocks = (num_elems + POLYAK_BLOCK_THREADS - 1) / POLYAK_BLOCK_THREADS;
    int grid = blocks < state->io_grid ? (int)blocks : state->io_grid;
    err = polyak_launch_readout(src, src_dtype, num_elems, debias_scale, dst, dst_dtype, grid, (cudaStream_t)stream);
  }
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "read-out kernel launch");
}

/* ---- evaluation ------------------------------------------------------------- */

int polyak_cuda_io_grid(const polyak_t *p, const cuda_state *state)
{
  return p->num_chunks < state->io_grid ? (int)p->num_chunks : state->io_grid;
}

polyak_status polyak_cuda_copy_to_params(polyak_t *p, int shadow, double debias_scale, void *stream)
{
  const cuda_state *state = p->backend;
  if (p->num_chunks == 0)
    return POLYAK_OK;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = polyak_launch_copy_to_params(state->descs, state->chunks, p->num_chunks, state->shadows[shadow], shadow,
                                       p->cfg.shadow_dtype, debias_scale, polyak_cuda_io_grid(p, state),
                                       (cudaStream_t)stream);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_copy_to_params");
}

/* The snapshots as the columns of an arena_elems x num_snapshots matrix:
 * one SGEMV into a scratch arena, then one kernel into the params. */
polyak_status polyak_cuda_synthesize(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                                     void *stream)
{
  cuda_state *state = p->backend;
  if (p->num_chunks == 0)
    return POLYAK_OK;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_synthesize_to_params");
  float *x = NULL, *y = NULL;
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t blas = state->blas ? CUBLAS_STATUS_SUCCESS : cublasCreate(&state->blas);
  err = cudaMalloc((void **)&x, (size_t)num_snapshots * sizeof *x);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&y, (size_t)p->arena_elems * sizeof *y);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(x, weight, (size_t)num_snapshots * sizeof *x, cudaMemcpyHostToDevice, (cudaStream_t)stream);
  if (err == cudaSuccess && blas == CUBLAS_STATUS_SUCCESS)
    blas = cublasSetStream(state->blas, (cudaStream_t)stream);
  if (err == cudaSuccess && blas == CUBLAS_STATUS_SUCCESS)
    blas = cublasSgemv_64(state->blas, CUBLAS_OP_N, p->arena_elems, num_snapshots, &one, snapshots, p->arena_elems, x,
                          1, &zero, y, 1);
  if (err == cudaSuccess && blas == CUBLAS_STATUS_SUCCESS)
    err = polyak_launch_copy_to_params(state->descs, state->chunks, p->num_chunks, y, -1, POLYAK_F32, 1.0,
                                       polyak_cuda_io_grid(p, state), (cudaStream_t)stream);
  if (err == cudaSuccess)
    err = cudaStreamSynchronize((cudaStream_t)stream); /* before the scratch goes */
  cudaFree(x);
  cudaFree(y);
  polyak_cuda_leave(&scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_synthesize_to_params");
  if (blas != CUBLAS_STATUS_SUCCESS)
    return polyak_fail(p, POLYAK_ERR_CUDA, "polyak_synthesize_to_params: cuBLAS: %s: %s", cublasGetStatusName(blas),
                       cublasGetStatusString(blas));
  return POLYAK_OK;
}

polyak_status polyak_cuda_blend(polyak_t *p, const float *coefficient, int tensor, void *dst, polyak_dtype dst_dtype,
                                void *stream)
{
  const cuda_state *state = p->backend;
  polyak_blend_args args;
  memset(&args, 0, sizeof args);
  args.num_shadows = p->cfg.num_shadows;
  args.shadow_dtype = p->cfg.shadow_dtype;
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    args.arenas[k] = state->shadows[k];
    args.coefficient[k] = coefficient[k];
  }
  int64_t work =
      tensor < 0 ? p->num_chunks : (p->tensors[tensor].num_elems + POLYAK_BLOCK_THREADS - 1) / POLYAK_BLOCK_THREADS;
  if (work == 0)
    return POLYAK_OK;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  int grid = work < state->io_grid ? (int)work : state->io_grid;
  if (err == cudaSuccess)
    err = tensor < 0 ? polyak_launch_blend_to_params(&args, state->descs, state->chunks, p->num_chunks, grid,
                                                     (cudaStream_t)stream)
                     : polyak_launch_blend(&args, &p->descs[tensor], dst, dst_dtype, grid, (cudaStream_t)stream);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "blend kernel launch");
}

static polyak_status store_or_restore(polyak_t *p, int to_store, void *stream, const char *what)
{
  cuda_state *state = p->backend;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  polyak_status status = err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, what);
  const polyak_chunk *chunks = state->store_chunks ? state->store_chunks : state->chunks;
  int64_t num_chunks = state->store_chunks ? state->num_store_chunks : p->num_chunks;
  if (status == POLYAK_OK && !state->store &&
      (err = cudaMalloc(&state->store, (size_t)p->store_bytes + 16)) != cudaSuccess)
    status = polyak_cuda_fail(p, err, what);
  if (status == POLYAK_OK && num_chunks > 0) {
    int grid = num_chunks < state->io_grid ? (int)num_chunks : state->io_grid;
    err = polyak_launch_store(state->descs, chunks, num_chunks, state->store, to_store, grid, (cudaStream_t)stream);
    if (err != cudaSuccess)
      status = polyak_cuda_fail(p, err, what);
  }
  polyak_cuda_leave(&scope);
  return status;
}

polyak_status polyak_cuda_store(polyak_t *p, void *stream)
{
  return store_or_restore(p, 1, stream, "polyak_store");
}

polyak_status polyak_cuda_restore(polyak_t *p, void *stream)
{
  return store_or_restore(p, 0, stream, "polyak_restore");
}
