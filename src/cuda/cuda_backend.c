/* cuda_backend.c: the CUDA backend's host side, its core: errors and
 * devices, finalize (the arenas allocated, the plan uploaded, the shadows
 * initialized) and release, and the table of operations whose other
 * entries live in cuda_update.c, cuda_readout.c and cuda_transfer.c.
 * Shadows live in one cudaMalloc arena each; every update is one kernel
 * launch (kernels/update.cu) enqueued on the caller's stream without
 * synchronizing. Every call runs on the handle's device and puts the
 * caller's current device back. */
#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_state.h"
#ifdef POLYAK_HAVE_NCCL
#include "nccl_comm.h"
#endif

/* ---- errors and devices ----------------------------------------------------- */

polyak_status polyak_cuda_fail(polyak_t *p, cudaError_t err, const char *what)
{
  cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
  return polyak_fail(p, err == cudaErrorMemoryAllocation ? POLYAK_ERR_NO_MEMORY : POLYAK_ERR_CUDA, "%s: %s: %s", what,
                     cudaGetErrorName(err), cudaGetErrorString(err));
}

/* Makes the handle's device current; *previous gets the caller's. */
cudaError_t polyak_cuda_enter(const polyak_t *p, int *previous)
{
  cudaError_t err = cudaGetDevice(previous);
  if (err == cudaSuccess && *previous != p->cfg.device)
    err = cudaSetDevice(p->cfg.device);
  return err;
}

/* Gives the caller its device back, unless that device has no context yet
 * (cudaGetDevice says 0 to a caller that never chose one): switching to it
 * would create a context there, hundreds of MB on a GPU the caller may not
 * use at all. */
void polyak_cuda_leave(const polyak_t *p, int previous)
{
  /* the driver function comes through the runtime, so that libpolyak loads
   * on machines without a CUDA driver */
  typedef CUresult (*primary_ctx_state_fn)(CUdevice, unsigned int *, int *);
  void *entry = NULL;
  enum cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  unsigned int flags = 0;
  int active = 0;
  if (previous == p->cfg.device)
    return;
  if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &entry, 12000, cudaEnableDefault, &found) ==
          cudaSuccess &&
      found == cudaDriverEntryPointSuccess &&
      ((primary_ctx_state_fn)entry)((CUdevice)previous, &flags, &active) == CUDA_SUCCESS && active)
    cudaSetDevice(previous);
}

/* Visible devices, or -1 if the runtime fails (reason in msg). */
static int device_count(char *msg, size_t msg_num_bytes)
{
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED, "%s: %s", cudaGetErrorName(err),
                   cudaGetErrorString(err));
    return -1;
  }
  return count;
}

/* POLYAK_OK if `device` exists; else POLYAK_ERR_UNSUPPORTED (no device, no
 * driver) or POLYAK_ERR_INVALID_ARG (ordinal out of range). */
static polyak_status check_device(int device, char *msg, size_t msg_num_bytes)
{
  char reason[POLYAK_ERROR_BYTES];
  int count = device_count(reason, sizeof reason);
  if (count < 0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                          "the CUDA backend found no usable device (cudaGetDeviceCount: %s)", reason);
  if (count == 0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                          "the CUDA backend found no CUDA device on this machine");
  if (device < 0 || device >= count)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "device = %d is outside the %d visible CUDA devices", device, count);
  return POLYAK_OK;
}

/* 1 if ptr is CUDA device memory (not managed or host); 0 otherwise,
 * including when no CUDA driver or device is present. */
static int owns_memory(const void *ptr)
{
  struct cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return attr.type == cudaMemoryTypeDevice;
}

static int available(void)
{
  return device_count(NULL, 0) > 0;
}

/* The device, then the communicator: it must hold these ranks, on it. */
static polyak_status check_config(const polyak_config *cfg, char *msg, size_t msg_num_bytes)
{
  polyak_status status = check_device(cfg->device, msg, msg_num_bytes);
  if (status != POLYAK_OK || !cfg->nccl_comm)
    return status;
#ifdef POLYAK_HAVE_NCCL
  return polyak_nccl_check_comm(cfg->nccl_comm, cfg->world_size, cfg->rank, cfg->device, msg, msg_num_bytes);
#else
  return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                        "nccl_comm is set but this build of polyak has no NCCL (configured with "
                        "POLYAK_WITH_NCCL=OFF or without NCCL found)");
#endif
}

/* POLYAK_OK if [ptr, ptr + num_bytes) may be read by kernels on the
 * handle's device: device memory of that device, or managed memory. */
polyak_status polyak_cuda_check_pointer(polyak_t *p, const void *ptr, const char *what)
{
  struct cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, what);
  if (attr.type == cudaMemoryTypeManaged || (attr.type == cudaMemoryTypeDevice && attr.device == p->cfg.device))
    return POLYAK_OK;
  if (attr.type == cudaMemoryTypeDevice)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: %p is memory of CUDA device %d; this handle runs on device %d",
                       what, ptr, attr.device, p->cfg.device);
  return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                     "%s: %p is host memory; the CUDA backend needs device memory on device %d", what, ptr,
                     p->cfg.device);
}

/* ---- finalize and destroy ------------------------------------------------ */

/* LAWA's arrays (cudaFree of NULL is a no-op), left NULL. */
void polyak_cuda_free_layerwise(cuda_state *s)
{
  cudaFree(s->layer_grads);
  cudaFree(s->tensor_chunks);
  cudaFree(s->chunk_sumsq);
  cudaFree(s->layer_norm);
  cudaFree(s->layer_beta);
  cudaFree(s->layer_blocks_done);
  s->layer_grads = NULL, s->tensor_chunks = NULL, s->chunk_sumsq = NULL, s->layer_norm = NULL;
  s->layer_blocks_done = NULL, s->layer_beta = NULL;
}

static void cuda_release(polyak_t *p)
{
  cuda_state *state = p->backend;
  if (!state)
    return;
  int previous;
  if (polyak_cuda_enter(p, &previous) == cudaSuccess) {
    cudaDeviceSynchronize(); /* the handle's work may still be in flight */
    for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
      cudaFree(state->shadows[k]);
      cudaFree(state->staging[k]);
    }
    cudaFree(state->descs);
    cudaFree(state->chunks);
    cudaFree(state->copy_chunks);
    cudaFree(state->counters);
    cudaFree(state->store);
    cudaFree(state->store_chunks);
    cudaFree(state->flag);
    cudaFree(state->products);
    cudaFree(state->graph);
    cudaFree(state->graph_weights);
    if (state->blas)
      cublasDestroy(state->blas);
    polyak_cuda_free_layerwise(state);
    polyak_cuda_leave(p, previous);
  }
  cudaGetLastError();
  free(state);
  p->backend = NULL;
}

static polyak_status check_params(polyak_t *p)
{
  int previous;
  cudaError_t err = polyak_cuda_enter(p, &previous);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_finalize: cudaSetDevice");
  polyak_status status = POLYAK_OK;
  char what[POLYAK_ERROR_BYTES];
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (t->num_elems == 0)
      continue;
    snprintf(what, sizeof what, "polyak_finalize: tensor %d (\"%s\") param", i, t->name);
    status = polyak_cuda_check_pointer(p, t->param, what);
    if (status == POLYAK_OK && t->owned) {
      snprintf(what, sizeof what, "polyak_finalize: tensor %d (\"%s\") shadow", i, t->name);
      status = polyak_cuda_check_pointer(p, t->shadow, what);
    }
  }
  polyak_cuda_leave(p, previous);
  return status;
}

static polyak_status allocate(polyak_t *p, cuda_state *state)
{
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  cudaError_t err = cudaSuccess;
  for (int k = 0; k < p->cfg.num_shadows && err == cudaSuccess; k++)
    err = cudaMalloc(&state->shadows[k], arena_num_bytes > 0 ? arena_num_bytes : 16);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&state->descs, ((size_t)p->num_tensors + 1) * sizeof *state->descs);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&state->chunks, ((size_t)p->num_chunks + 1) * sizeof *state->chunks);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&state->copy_chunks, ((size_t)p->num_copy_chunks + 1) * sizeof *state->copy_chunks);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&state->counters, NUM_COUNTERS * sizeof *state->counters);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&state->graph, sizeof *state->graph);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&state->products, POLYAK_MAX_SHADOWS * sizeof *state->products);
  if (err == cudaSuccess && p->cfg.nccl_comm)
    err = cudaMalloc((void **)&state->flag, sizeof *state->flag);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_finalize: cudaMalloc");
}

/* The non-finite elements of the params `chunks` cover: found[COUNT_INIT]
 * counts them, found[FIRST_NONFINITE] is the first's global index. Waits. */
static cudaError_t scan_params(const polyak_t *p, cuda_state *state, const polyak_chunk *chunks, int64_t num_chunks,
                               cudaStream_t stream, unsigned long long found[NUM_COUNTERS])
{
  const unsigned long long fresh[2] = {0, UINT64_MAX}; /* COUNT_INIT, FIRST_NONFINITE */
  cudaError_t err = cudaMemcpyAsync(&state->counters[COUNT_INIT], fresh, sizeof fresh, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess && num_chunks > 0)
    err = polyak_launch_init(state->descs, chunks, num_chunks, state->shadows, 0, 0, p->cfg.shadow_dtype,
                             &state->counters[COUNT_INIT], &state->counters[FIRST_NONFINITE], state->io_grid, stream);
  if (err == cudaSuccess)
    err = cudaStreamSynchronize(stream);
  if (err == cudaSuccess)
    err = cudaMemcpy(found, state->counters, NUM_COUNTERS * sizeof *found, cudaMemcpyDeviceToHost);
  return err;
}

/* With skip_nonfinite, a non-finite param would keep its shadow so forever:
 * refused before any shadow is written (the caller's own ones included).
 * `chunks`: this rank's (finalize), or the whole params (a hard update,
 * which every rank must refuse alike). */
polyak_status polyak_cuda_refuse_nonfinite(polyak_t *p, cuda_state *state, const polyak_chunk *chunks,
                                           int64_t num_chunks, cudaStream_t stream, const char *function)
{
  unsigned long long found[NUM_COUNTERS];
  cudaError_t err = scan_params(p, state, chunks, num_chunks, stream, found);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, function);
  if (found[COUNT_INIT] == 0)
    return POLYAK_OK;
  int64_t elem = (int64_t)found[FIRST_NONFINITE];
  int i = polyak_tensor_of_element(p, elem);
  return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                     "%s: tensor %d (\"%s\") holds NaN or Inf at element %lld (%llu non-finite elements in "
                     "all); with skip_nonfinite its shadow would stay so forever (fix the params, or set "
                     "skip_nonfinite = 0)",
                     function, i, p->tensors[i].name, (long long)(elem - p->descs[i].global_offset_elems),
                     found[COUNT_INIT]);
}

/* Sharded: the chunks of the whole params, for the calls that work on
 * them (store, restore, a hard update's scan) where the plan holds this
 * rank's slice. Uploaded on the finalize stream, so later kernels on any
 * stream find them in place. */
static polyak_status upload_whole_chunks(polyak_t *p, cuda_state *state, cudaStream_t stream)
{
  if (p->cfg.world_size == 1)
    return POLYAK_OK;
  polyak_chunk *chunks = NULL;
  int64_t count = 0;
  polyak_status status = polyak_full_chunks(p, &chunks, &count);
  if (status != POLYAK_OK)
    return status;
  cudaError_t err = cudaMalloc((void **)&state->store_chunks, ((size_t)count + 1) * sizeof *chunks);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(state->store_chunks, chunks, (size_t)count * sizeof *chunks, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaStreamSynchronize(stream); /* before the host table goes */
  free(chunks);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_finalize: the chunks of the whole params");
  state->num_store_chunks = count;
  return POLYAK_OK;
}

static polyak_status upload_and_init(polyak_t *p, cuda_state *state, cudaStream_t stream)
{
  const unsigned long long counters[NUM_COUNTERS] = {0, 0, UINT64_MAX};
  const double products[POLYAK_MAX_SHADOWS] = {1, 1, 1, 1, 1, 1, 1, 1};
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  cudaError_t err = cudaMemcpyAsync(state->descs, p->descs, (size_t)p->num_tensors * sizeof *p->descs,
                                    cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(state->chunks, p->chunks, (size_t)p->num_chunks * sizeof *p->chunks, cudaMemcpyHostToDevice,
                          stream);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(state->copy_chunks, p->copy_chunks, (size_t)p->num_copy_chunks * sizeof *p->copy_chunks,
                          cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(state->counters, counters, sizeof counters, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(state->products, products, sizeof products, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaMemsetAsync(state->graph, 0, sizeof *state->graph, stream);
  for (int k = 0; k < p->cfg.num_shadows && err == cudaSuccess; k++)
    err = cudaMemsetAsync(state->shadows[k], 0, arena_num_bytes, stream); /* padding, zero_init */
  polyak_status status =
      err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_finalize: initializing the shadows");
  if (status == POLYAK_OK && p->cfg.skip_nonfinite && !p->cfg.zero_init)
    status = polyak_cuda_refuse_nonfinite(p, state, state->chunks, p->num_chunks, stream, "polyak_finalize");
  if (status != POLYAK_OK)
    return status;
  if (p->num_chunks > 0 && !p->cfg.zero_init)
    err = polyak_launch_init(state->descs, state->chunks, p->num_chunks, state->shadows, 0, p->cfg.num_shadows,
                             p->cfg.shadow_dtype, NULL, NULL, state->io_grid, stream);
  if (err == cudaSuccess)
    err = cudaStreamSynchronize(stream);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_finalize: initializing the shadows");
}

#ifdef POLYAK_HAVE_NCCL
/* Every rank gathers every rank's (tensors-and-config hash, finalize ok):
 * a rank registered differently would gather other counts and hang or
 * corrupt memory, and a rank that failed would leave the others waiting at
 * their first gather. */
static polyak_status finalize_handshake(polyak_t *p, polyak_status status)
{
  char reason[POLYAK_ERROR_BYTES];
  int all_ok = 0, same = 0, other = -1;
  polyak_status agreed = polyak_nccl_finalize_agree(p->cfg.nccl_comm, p->cfg.world_size, polyak_layout_hash(p),
                                                    status == POLYAK_OK, &all_ok, &same, &other, reason, sizeof reason);
  if (status != POLYAK_OK)
    return status;
  if (agreed != POLYAK_OK)
    return polyak_fail(p, agreed, "polyak_finalize: %s", reason);
  if (!same)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_finalize: rank %d registered other tensors or has another config than "
                       "rank %d; every rank must register the same tensors with the same config",
                       other, p->cfg.rank);
  if (!all_ok)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_finalize: another rank failed to finalize");
  return POLYAK_OK;
}
#endif

static polyak_status cuda_finalize(polyak_t *p, void *stream, polyak_status prior)
{
  int previous;
  cudaError_t err = polyak_cuda_enter(p, &previous);
  if (err != cudaSuccess)
    return prior != POLYAK_OK ? prior : polyak_cuda_fail(p, err, "polyak_finalize: cudaSetDevice");
  polyak_status status = prior;
  cuda_state *state = NULL;
  if (status == POLYAK_OK && !(state = calloc(1, sizeof *state)))
    status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory");
  if (status == POLYAK_OK) {
    p->backend = state;
    int sms = 0;
    err = polyak_update_grid_limit(p->cfg.device, p->cfg.shadow_dtype, polyak_stochastic_f32_mask(&p->cfg),
                                   &state->update_grid);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p->cfg.device);
    state->io_grid = 4 * sms;
    status = err == cudaSuccess ? allocate(p, state) : polyak_cuda_fail(p, err, "polyak_finalize");
  }
  if (status == POLYAK_OK)
    status = upload_whole_chunks(p, state, (cudaStream_t)stream);
  if (status == POLYAK_OK)
    status = upload_and_init(p, state, (cudaStream_t)stream);
#ifdef POLYAK_HAVE_NCCL
  if (p->cfg.nccl_comm) /* all ranks finalize, with the same tensors and config, or none does */
    status = finalize_handshake(p, status);
#endif
  if (status != POLYAK_OK)
    cuda_release(p);
  polyak_cuda_leave(p, previous);
  return status;
}

const polyak_backend_ops polyak_cuda_ops = {
    .available = available,
    .check_config = check_config,
    .owns_memory = owns_memory,
    .memory_name = "CUDA device memory",
    .check_params = check_params,
    .finalize = cuda_finalize,
    .update = polyak_cuda_update,
    .arena = polyak_cuda_arena,
    .read_out = polyak_cuda_read_out,
    .check_read_out = polyak_cuda_check_read_out,
    .nonfinite_count = polyak_cuda_nonfinite_count,
    .release = cuda_release,
    .graph_reserve = polyak_cuda_graph_reserve,
    .graph_update = polyak_cuda_graph_update,
    .graph_release = polyak_cuda_graph_release,
    .host_buffer = polyak_cuda_host_buffer,
    .free_host_buffer = polyak_cuda_free_host_buffer,
    .copy_to_host = polyak_cuda_copy_to_host,
    .copy_from_host = polyak_cuda_copy_from_host,
    .staging_begin = polyak_cuda_staging_begin,
    .staging_write = polyak_cuda_staging_write,
    .staging_commit = polyak_cuda_staging_commit,
    .staging_abort = polyak_cuda_staging_abort,
    .copy_to_params = polyak_cuda_copy_to_params,
    .blend = polyak_cuda_blend,
    .hard_update = polyak_cuda_hard_update,
    .set_layer_source = polyak_cuda_set_layer_source,
    .layer_betas = polyak_cuda_layer_betas_read,
    .synthesize = polyak_cuda_synthesize,
    .products_read = polyak_cuda_products_read,
    .products_write = polyak_cuda_products_write,
    .check_grad_norm = polyak_cuda_check_grad_norm,
    .store = polyak_cuda_store,
    .restore = polyak_cuda_restore,
    .scratch_alloc = polyak_cuda_scratch_alloc,
    .scratch_free = polyak_cuda_scratch_free,
    .copy_bytes = polyak_cuda_copy_bytes,
#ifdef POLYAK_HAVE_NCCL
    .all_gather = polyak_cuda_all_gather,
#else
    .all_gather = NULL,
#endif
    .agree = polyak_cuda_agree,
    .capturing = polyak_cuda_capturing,
};
