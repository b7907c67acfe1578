/* cuda_backend.c: the CUDA backend's host side, its core: finalize (the
 * arenas allocated, the plan uploaded, the shadows initialized) and
 * release, and the table of operations whose other entries live in
 * cuda_device.c, cuda_update.c, cuda_readout.c and cuda_transfer.c.
 * Shadows live in one cudaMalloc arena each; every update is one kernel
 * launch (kernels/update.cu) enqueued on the caller's stream without
 * synchronizing. Every call runs in the handle's device's primary context
 * and leaves the caller's CUDA state as it was (cuda_device.c). */
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
  polyak_cuda_scope scope;
  if (polyak_cuda_enter(p, &scope) == cudaSuccess) {
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
    cudaFree(state->agreement);
    cudaFree(state->products);
    cudaFree(state->graph);
    cudaFree(state->graph_weights);
    if (state->blas)
      cublasDestroy(state->blas);
    polyak_cuda_free_layerwise(state);
    polyak_cuda_leave(&scope);
  }
  cudaGetLastError();
  polyak_cuda_drop_context(state);
  free(state);
  p->backend = NULL;
}

static polyak_status check_params(polyak_t *p)
{
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_finalize: entering the handle's device");
  polyak_status status = POLYAK_OK;
  char what[POLYAK_ERROR_BYTES];
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (t->num_elems == 0)
      continue;
    snprintf(what, sizeof what, "polyak_finalize: tensor %d (\"%s\") param", i, t->name);
    status =
        polyak_cuda_check_pointer(p, &scope, t->param, (size_t)t->num_elems * polyak_dtype_num_bytes(t->dtype), what);
    if (status == POLYAK_OK && t->owned) {
      snprintf(what, sizeof what, "polyak_finalize: tensor %d (\"%s\") shadow", i, t->name);
      status = polyak_cuda_check_pointer(p, &scope, t->shadow,
                                         (size_t)t->num_elems * polyak_dtype_num_bytes(t->shadow_dtype), what);
    }
  }
  polyak_cuda_leave(&scope);
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

/* With a communicator, before anything else of finalize can fail: the
 * device memory of the ranks' agreements, zeroed (agreement.h), so that
 * this rank reaches the handshake with its failure whatever happens next. */
static cudaError_t allocate_agreement(const polyak_t *p, uint64_t **slots)
{
  size_t num_bytes = POLYAK_AGREEMENT_SLOTS(p->cfg.world_size) * sizeof **slots;
  cudaError_t err = cudaMalloc((void **)slots, num_bytes);
  if (err == cudaSuccess)
    err = cudaMemset(*slots, 0, num_bytes);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* the memset is in place before any stream's collective */
  if (err != cudaSuccess) {
    cudaFree(*slots);
    *slots = NULL;
  }
  return err;
}

#ifdef POLYAK_HAVE_NCCL
/* Every rank gathers every rank's (tensors-and-config hash, finalize ok):
 * a rank registered differently would gather other counts and hang or
 * corrupt memory, and a rank that failed would leave the others waiting at
 * their first gather. Issued whatever failed before, through `slots`. */
static polyak_status finalize_handshake(polyak_t *p, uint64_t *slots, polyak_status status)
{
  char reason[POLYAK_ERROR_BYTES];
  int all_ok = 0, same = 0, other = -1;
  polyak_status agreed = polyak_nccl_finalize_agree(p->cfg.nccl_comm, slots, p->cfg.world_size, polyak_layout_hash(p),
                                                    status == POLYAK_OK, &all_ok, &same, &other, reason, sizeof reason);
  if (status != POLYAK_OK)
    return status;
  if (agreed != POLYAK_OK)
    return polyak_fail(p, agreed, "polyak_finalize: %s", reason);
  if (!all_ok) /* first: a failed rank's hash may never have been written */
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_finalize: another rank failed to finalize");
  if (!same)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_finalize: rank %d registered other tensors or has another config than "
                       "rank %d; every rank must register the same tensors with the same config",
                       other, p->cfg.rank);
  return POLYAK_OK;
}
#endif

static polyak_status cuda_finalize(polyak_t *p, void *stream, polyak_status prior)
{
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  polyak_status status = prior;
  if (err != cudaSuccess && status == POLYAK_OK)
    status = polyak_cuda_fail(p, err, "polyak_finalize: entering the handle's device");
  uint64_t *agreement = NULL; /* first: every rank must reach the handshake */
  cudaError_t agreement_err = cudaSuccess;
  if (p->cfg.nccl_comm && err == cudaSuccess)
    agreement_err = allocate_agreement(p, &agreement);
  if (agreement_err != cudaSuccess && status == POLYAK_OK)
    status = polyak_cuda_fail(p, agreement_err, "polyak_finalize: the ranks' agreement");
  cuda_state *state = NULL;
  if (status == POLYAK_OK && !(state = calloc(1, sizeof *state)))
    status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory");
  if (status == POLYAK_OK) {
    p->backend = state;
    state->agreement = agreement; /* the state's from now on: freed with it */
    agreement = NULL;
    int sms = 0;
    err = polyak_cuda_hold_context(p, state);
    if (err == cudaSuccess)
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
  /* all ranks finalize, with the same tensors and config, or none does; a
   * rank that could not even enter its device or allocate the agreement
   * cannot take part (as one that failed before finalize) */
  uint64_t *slots = state && state->agreement ? state->agreement : agreement;
  if (p->cfg.nccl_comm && slots)
    status = finalize_handshake(p, slots, status);
#endif
  if (status != POLYAK_OK)
    cuda_release(p);
  if (agreement) /* state never took it */
    cudaFree(agreement);
  cudaGetLastError();
  polyak_cuda_leave(&scope);
  return status;
}

const polyak_backend_ops polyak_cuda_ops = {
    .available = polyak_cuda_available,
    .check_config = polyak_cuda_check_config,
    .owns_memory = polyak_cuda_owns_memory,
    .memory_name = "CUDA device memory",
    .check_params = check_params,
    .finalize = cuda_finalize,
    .update = polyak_cuda_update,
    .arena = polyak_cuda_arena,
    .read_out = polyak_cuda_read_out,
    .check_read_out = polyak_cuda_check_read_out,
    .nonfinite_count = polyak_cuda_nonfinite_count,
    .set_nonfinite_count = polyak_cuda_set_nonfinite_count,
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
    .set_nonfinite_count = polyak_cuda_set_nonfinite_count,
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
    .compare = polyak_cuda_compare,
    .capturing = polyak_cuda_capturing,
    .capture_under_way = polyak_cuda_capture_under_way,
};
