/* cuda_backend.c: the CUDA backend's host side. Shadows live in one
 * cudaMalloc arena each; the plan and the tensor table are uploaded once at
 * finalize; every update is one kernel launch (kernels/update.cu) enqueued
 * on the caller's stream without synchronizing. Every call runs on the
 * handle's device and puts the caller's current device back. */
#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"
#include "launch.h"
#ifdef POLYAK_HAVE_NCCL
#include "nccl_comm.h"
#endif
#include "polyak_internal.h"

enum { COUNT_UPDATES, COUNT_INIT, FIRST_NONFINITE, NUM_COUNTERS };

typedef struct {
  int update_grid; /* blocks that fit on the device at once */
  int io_grid;     /* blocks for the init and read-out kernels */
  void *shadows[POLYAK_MAX_SHADOWS];
  polyak_tensor_desc *descs;
  polyak_chunk *chunks;
  unsigned long long *counters; /* [NUM_COUNTERS] */
  polyak_graph_state *graph;
  float *graph_weights;
  void *staging[POLYAK_MAX_SHADOWS]; /* a load's fresh arenas */
  void *store;                       /* polyak_store's copy of the params */
  polyak_chunk *store_chunks;        /* whole params, where the plan holds a slice */
  int64_t num_store_chunks;
  int *flag;                         /* one int for the ranks' agreements (with nccl_comm) */
  double *products;                  /* [POLYAK_MAX_SHADOWS]: grad-norm shadows' beta products */
  cublasHandle_t blas;               /* post-hoc synthesis; made at its first use */
  /* LAWA, allocated at the first polyak_set_grads or _set_layer_norms */
  void **layer_grads;                /* [num_tensors] device table, or unused with: */
  const float *layer_norms;          /* the caller's [num_tensors], or NULL */
  int64_t *tensor_chunks;            /* [num_tensors + 1] */
  float *chunk_sumsq;                /* [num_chunks] */
  double *layer_norm;                /* [num_tensors] */
  double *layer_beta;                /* [num_tensors][POLYAK_MAX_SHADOWS] */
  unsigned int *layer_blocks_done;
} cuda_state;

/* ---- errors and devices ----------------------------------------------------- */

static polyak_status cuda_fail(polyak_t *p, cudaError_t err, const char *what)
{
  cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
  return polyak_fail(p, err == cudaErrorMemoryAllocation ? POLYAK_ERR_NO_MEMORY : POLYAK_ERR_CUDA,
                     "%s: %s: %s", what, cudaGetErrorName(err), cudaGetErrorString(err));
}

/* Makes the handle's device current; *previous gets the caller's. */
static cudaError_t enter_device(const polyak_t *p, int *previous)
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
static void leave_device(const polyak_t *p, int previous)
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
  if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &entry, 12000, cudaEnableDefault,
                                       &found) == cudaSuccess &&
      found == cudaDriverEntryPointSuccess &&
      ((primary_ctx_state_fn)entry)((CUdevice)previous, &flags, &active) == CUDA_SUCCESS && active)
    cudaSetDevice(previous);
}

int polyak_cuda_device_count(char *msg, size_t msg_num_bytes)
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

polyak_status polyak_cuda_check_device(int device, char *msg, size_t msg_num_bytes)
{
  char reason[POLYAK_ERROR_BYTES];
  int count = polyak_cuda_device_count(reason, sizeof reason);
  if (count < 0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                          "the CUDA backend found no usable device (cudaGetDeviceCount: %s)",
                          reason);
  if (count == 0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                          "the CUDA backend found no CUDA device on this machine");
  if (device < 0 || device >= count)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "device = %d is outside the %d visible CUDA devices", device, count);
  return POLYAK_OK;
}

int polyak_cuda_is_device_memory(const void *ptr)
{
  struct cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return attr.type == cudaMemoryTypeDevice;
}

/* POLYAK_OK if [ptr, ptr + num_bytes) may be read by kernels on the
 * handle's device: device memory of that device, or managed memory. */
static polyak_status check_device_pointer(polyak_t *p, const void *ptr, const char *what)
{
  struct cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess)
    return cuda_fail(p, err, what);
  if (attr.type == cudaMemoryTypeManaged ||
      (attr.type == cudaMemoryTypeDevice && attr.device == p->cfg.device))
    return POLYAK_OK;
  if (attr.type == cudaMemoryTypeDevice)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s: %p is memory of CUDA device %d; this handle runs on device %d", what,
                       ptr, attr.device, p->cfg.device);
  return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                     "%s: %p is host memory; the CUDA backend needs device memory on device %d",
                     what, ptr, p->cfg.device);
}

/* ---- finalize and destroy ------------------------------------------------ */

/* LAWA's arrays (cudaFree of NULL is a no-op), left NULL. */
static void free_layerwise(cuda_state *s)
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
  if (enter_device(p, &previous) == cudaSuccess) {
    cudaDeviceSynchronize(); /* the handle's work may still be in flight */
    for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
      cudaFree(state->shadows[k]);
      cudaFree(state->staging[k]);
    }
    cudaFree(state->descs);
    cudaFree(state->chunks);
    cudaFree(state->counters);
    cudaFree(state->store);
    cudaFree(state->store_chunks);
    cudaFree(state->flag);
    cudaFree(state->products);
    cudaFree(state->graph);
    cudaFree(state->graph_weights);
    if (state->blas)
      cublasDestroy(state->blas);
    free_layerwise(state);
    leave_device(p, previous);
  }
  cudaGetLastError();
  free(state);
  p->backend = NULL;
}

static polyak_status check_params(polyak_t *p)
{
  char what[POLYAK_ERROR_BYTES];
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (t->num_elems == 0)
      continue;
    snprintf(what, sizeof what, "polyak_finalize: tensor %d (\"%s\") param", i, t->name);
    polyak_status status = check_device_pointer(p, t->param, what);
    if (status == POLYAK_OK && t->owned) {
      snprintf(what, sizeof what, "polyak_finalize: tensor %d (\"%s\") shadow", i, t->name);
      status = check_device_pointer(p, t->shadow, what);
    }
    if (status != POLYAK_OK)
      return status;
  }
  return POLYAK_OK;
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
    err = cudaMalloc((void **)&state->counters, NUM_COUNTERS * sizeof *state->counters);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&state->graph, sizeof *state->graph);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&state->products, POLYAK_MAX_SHADOWS * sizeof *state->products);
  if (err == cudaSuccess && p->cfg.nccl_comm)
    err = cudaMalloc((void **)&state->flag, sizeof *state->flag);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_finalize: cudaMalloc");
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
static polyak_status refuse_nonfinite_params(polyak_t *p, cuda_state *state, const polyak_chunk *chunks,
                                             int64_t num_chunks, cudaStream_t stream, const char *function)
{
  unsigned long long found[NUM_COUNTERS];
  cudaError_t err = scan_params(p, state, chunks, num_chunks, stream, found);
  if (err != cudaSuccess)
    return cuda_fail(p, err, function);
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

static polyak_status upload_and_init(polyak_t *p, cuda_state *state, cudaStream_t stream)
{
  const unsigned long long counters[NUM_COUNTERS] = {0, 0, UINT64_MAX};
  const double products[POLYAK_MAX_SHADOWS] = {1, 1, 1, 1, 1, 1, 1, 1};
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  cudaError_t err = cudaMemcpyAsync(state->descs, p->descs, (size_t)p->num_tensors * sizeof *p->descs,
                                    cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(state->chunks, p->chunks, (size_t)p->num_chunks * sizeof *p->chunks,
                          cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(state->counters, counters, sizeof counters, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(state->products, products, sizeof products, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess)
    err = cudaMemsetAsync(state->graph, 0, sizeof *state->graph, stream);
  for (int k = 0; k < p->cfg.num_shadows && err == cudaSuccess; k++)
    err = cudaMemsetAsync(state->shadows[k], 0, arena_num_bytes, stream); /* padding, zero_init */
  polyak_status status = err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_finalize: initializing the shadows");
  if (status == POLYAK_OK && p->cfg.skip_nonfinite && !p->cfg.zero_init)
    status = refuse_nonfinite_params(p, state, state->chunks, p->num_chunks, stream, "polyak_finalize");
  if (status != POLYAK_OK)
    return status;
  if (p->num_chunks > 0 && !p->cfg.zero_init)
    err = polyak_launch_init(state->descs, state->chunks, p->num_chunks, state->shadows, 0, p->cfg.num_shadows,
                             p->cfg.shadow_dtype, NULL, NULL, state->io_grid, stream);
  if (err == cudaSuccess)
    err = cudaStreamSynchronize(stream);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_finalize: initializing the shadows");
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
                                                    status == POLYAK_OK, &all_ok, &same, &other, reason,
                                                    sizeof reason);
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

static polyak_status cuda_finalize(polyak_t *p, void *stream)
{
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, "polyak_finalize: cudaSetDevice");
  polyak_status status = check_params(p);
  cuda_state *state = NULL;
  if (status == POLYAK_OK) {
    state = calloc(1, sizeof *state);
    if (!state)
      status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory");
  }
  if (status == POLYAK_OK) {
    p->backend = state;
    int sms = 0;
    err = polyak_update_grid_limit(p->cfg.device, &state->update_grid);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p->cfg.device);
    state->io_grid = 4 * sms;
    status = err == cudaSuccess ? allocate(p, state) : cuda_fail(p, err, "polyak_finalize");
  }
  if (status == POLYAK_OK)
    status = upload_and_init(p, state, (cudaStream_t)stream);
#ifdef POLYAK_HAVE_NCCL
  if (p->cfg.nccl_comm) /* all ranks finalize, with the same tensors and config, or none does */
    status = finalize_handshake(p, status);
#endif
  if (status != POLYAK_OK)
    cuda_release(p);
  leave_device(p, previous);
  return status;
}

/* ---- update ------------------------------------------------------------------ */

static void fill_kernel_args(const polyak_t *p, const cuda_state *state,
                             polyak_update_kernel_args *args)
{
  memset(args, 0, sizeof *args);
  args->descs = state->descs;
  args->chunks = state->chunks;
  args->num_chunks = p->num_chunks;
  for (int k = 0; k < p->cfg.num_shadows; k++)
    args->shadows[k] = state->shadows[k];
  args->shadow_dtype = p->cfg.shadow_dtype;
  args->seed = p->cfg.seed;
  args->lookahead_every = p->cfg.lookahead_every;
  args->grad_norm = p->grad_norm;
  args->products = state->products;
  args->layer_beta = p->layer_source ? state->layer_beta : NULL;
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    args->grad_norm_c[k] = p->cfg.grad_norm_c[k];
    args->layer_beta0[k] = p->cfg.layerwise_beta0[k];
  }
  args->nonfinite_count = &state->counters[COUNT_UPDATES];
}

/* LAWA: this update's betas, one launch ahead of it on the stream. */
static cudaError_t launch_layer_betas(const polyak_t *p, const cuda_state *state, const polyak_graph_state *graph,
                                      cudaStream_t stream)
{
  if (!p->layer_source)
    return cudaSuccess;
  polyak_layer_args args;
  memset(&args, 0, sizeof args);
  args.descs = state->descs;
  args.chunks = state->chunks;
  args.num_chunks = p->num_chunks;
  args.tensor_chunks = state->tensor_chunks;
  args.num_tensors = p->num_tensors;
  args.grads = state->layer_norms ? NULL : state->layer_grads;
  args.norms = state->layer_norms;
  args.chunk_sumsq = state->chunk_sumsq;
  args.layer_norm = state->layer_norm;
  args.layer_beta = state->layer_beta;
  args.blocks_done = state->layer_blocks_done;
  args.graph = graph;
  args.num_shadows = p->cfg.num_shadows;
  for (int k = 0; k < p->cfg.num_shadows; k++)
    args.beta0[k] = p->cfg.layerwise_beta0[k];
  int grid = p->num_chunks < state->io_grid ? (p->num_chunks > 0 ? (int)p->num_chunks : 1) : state->io_grid;
  return polyak_launch_layer_betas(&args, grid, stream);
}

static int update_grid(const polyak_t *p, const cuda_state *state)
{
  return p->num_chunks < state->update_grid ? (p->num_chunks > 0 ? (int)p->num_chunks : 1)
                                            : state->update_grid;
}

/* 1 if `stream` is being captured into a graph (on the handle's device). */
static cudaError_t is_capturing(void *stream, int *capturing)
{
  enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t err = cudaStreamIsCapturing((cudaStream_t)stream, &capture);
  *capturing = capture != cudaStreamCaptureStatusNone;
  return err;
}

static polyak_status cuda_update(polyak_t *p, const polyak_update_args *step, void *stream)
{
  cuda_state *state = p->backend;
  int previous, capturing = 0;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = is_capturing(stream, &capturing);
  polyak_status status = POLYAK_OK;
  if (err != cudaSuccess) {
    status = cuda_fail(p, err, "polyak_update");
  } else if (capturing) {
    status = polyak_fail(p, POLYAK_ERR_STATE,
                         "polyak_update: the stream is being captured, and a captured update "
                         "would apply step %lld at every replay; capture polyak_graph_update instead",
                         (long long)step->step);
  } else if (p->num_chunks > 0 || p->grad_norm || p->layer_source) { /* products and betas move regardless */
    polyak_update_kernel_args args;
    fill_kernel_args(p, state, &args);
    args.step = *step;
    err = launch_layer_betas(p, state, NULL, (cudaStream_t)stream);
    if (err == cudaSuccess)
      err = polyak_launch_update(&args, update_grid(p, state), (cudaStream_t)stream);
    if (err != cudaSuccess)
      status = cuda_fail(p, err, "polyak_update: kernel launch");
  }
  leave_device(p, previous);
  return status;
}

/* ---- read-out -------------------------------------------------------------- */

static void *cuda_arena(polyak_t *p, int shadow)
{
  return ((cuda_state *)p->backend)->shadows[shadow];
}

static polyak_status cuda_check_read_out(polyak_t *p, const void *dst, void *stream, const char *function)
{
  (void)stream;
  char what[128];
  snprintf(what, sizeof what, "%s: dst", function);
  int previous;
  cudaError_t err = enter_device(p, &previous);
  polyak_status status = err == cudaSuccess ? check_device_pointer(p, dst, what) : POLYAK_OK;
  if (err != cudaSuccess)
    status = cuda_fail(p, err, function);
  leave_device(p, previous);
  return status;
}

static polyak_status cuda_read_out(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                                   double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream)
{
  const cuda_state *state = p->backend;
  if (num_elems == 0)
    return POLYAK_OK;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess) {
    int64_t blocks = (num_elems + POLYAK_BLOCK_THREADS - 1) / POLYAK_BLOCK_THREADS;
    int grid = blocks < state->io_grid ? (int)blocks : state->io_grid;
    err = polyak_launch_readout(src, src_dtype, num_elems, debias_scale, dst, dst_dtype, grid,
                                (cudaStream_t)stream);
  }
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "read-out kernel launch");
}

/* ---- grad-norm shadows' beta products ------------------------------------- */

static polyak_status cuda_products_read(polyak_t *p, double *products)
{
  const cuda_state *state = p->backend;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* the updates may run on any stream */
  if (err == cudaSuccess)
    err = cudaMemcpy(products, state->products, POLYAK_MAX_SHADOWS * sizeof *products, cudaMemcpyDeviceToHost);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "reading the grad-norm beta products");
}

static polyak_status cuda_products_write(polyak_t *p, const double *products)
{
  const cuda_state *state = p->backend;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize();
  if (err == cudaSuccess)
    err = cudaMemcpy(state->products, products, POLYAK_MAX_SHADOWS * sizeof *products, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) /* a pageable copy may land after it returns: before any stream's next update */
    err = cudaDeviceSynchronize();
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "writing the grad-norm beta products");
}

/* The first time: the per-update arrays, the chunk ranges uploaded, the
 * betas at 1. All or nothing. */
static cudaError_t allocate_layerwise(const polyak_t *p, cuda_state *s)
{
  if (s->layer_beta)
    return cudaSuccess;
  size_t n = (size_t)p->num_tensors;
  double *ones = malloc((n * POLYAK_MAX_SHADOWS + 1) * sizeof *ones);
  cudaError_t err = ones ? cudaSuccess : cudaErrorMemoryAllocation;
  for (size_t j = 0; ones && j < n * POLYAK_MAX_SHADOWS; j++)
    ones[j] = 1.0;
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->layer_grads, (n + 1) * sizeof *s->layer_grads);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->tensor_chunks, (n + 1) * sizeof *s->tensor_chunks);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->chunk_sumsq, ((size_t)p->num_chunks + 1) * sizeof *s->chunk_sumsq);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->layer_norm, (n + 1) * sizeof *s->layer_norm);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->layer_blocks_done, sizeof *s->layer_blocks_done);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->layer_beta, (n * POLYAK_MAX_SHADOWS + 1) * sizeof *s->layer_beta);
  if (err == cudaSuccess)
    err = cudaMemcpy(s->tensor_chunks, p->tensor_chunks, (n + 1) * sizeof *s->tensor_chunks, cudaMemcpyHostToDevice);
  if (err == cudaSuccess)
    err = cudaMemset(s->layer_blocks_done, 0, sizeof *s->layer_blocks_done);
  if (err == cudaSuccess)
    err = cudaMemcpy(s->layer_beta, ones, n * POLYAK_MAX_SHADOWS * sizeof *ones, cudaMemcpyHostToDevice);
  free(ones);
  if (err != cudaSuccess)
    free_layerwise(s);
  return err;
}

static polyak_status cuda_set_layer_source(polyak_t *p, void *const *grads, const float *norms)
{
  cuda_state *s = p->backend;
  char what[64];
  polyak_status status = norms ? check_device_pointer(p, norms, "polyak_set_layer_norms: norms") : POLYAK_OK;
  for (int i = 0; i < p->num_tensors && grads && status == POLYAK_OK; i++) {
    snprintf(what, sizeof what, "polyak_set_grads: grads[%d]", i);
    status = p->tensors[i].num_elems > 0 ? check_device_pointer(p, grads[i], what) : POLYAK_OK;
  }
  if (status != POLYAK_OK)
    return status;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = allocate_layerwise(p, s);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* no update still reads the old table */
  if (err == cudaSuccess && grads) /* in place: captured graphs read the new one */
    err = cudaMemcpy(s->layer_grads, grads, (size_t)p->num_tensors * sizeof *grads, cudaMemcpyHostToDevice);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize();
  leave_device(p, previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, grads ? "polyak_set_grads" : "polyak_set_layer_norms");
  s->layer_norms = norms;
  return POLYAK_OK;
}

static polyak_status cuda_layer_betas_read(polyak_t *p, double *betas)
{
  const cuda_state *s = p->backend;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize();
  if (err == cudaSuccess)
    err = cudaMemcpy(betas, s->layer_beta, (size_t)p->num_tensors * POLYAK_MAX_SHADOWS * sizeof *betas,
                     cudaMemcpyDeviceToHost);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_get_layer_betas");
}

static polyak_status cuda_check_grad_norm(polyak_t *p, const float *grad_norm)
{
  return check_device_pointer(p, grad_norm, "polyak_set_grad_norm: grad_norm");
}

static polyak_status cuda_nonfinite_count(polyak_t *p, int64_t *count)
{
  const cuda_state *state = p->backend;
  int previous;
  unsigned long long value = 0;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* the updates may run on any stream */
  if (err == cudaSuccess)
    err = cudaMemcpy(&value, &state->counters[COUNT_UPDATES], sizeof value, cudaMemcpyDeviceToHost);
  leave_device(p, previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, "polyak_nonfinite_count");
  *count = (int64_t)value;
  return POLYAK_OK;
}

/* ---- graph mode ------------------------------------------------------------ */

static polyak_status cuda_graph_reserve(polyak_t *p, void *stream)
{
  cuda_state *state = p->backend;
  size_t num_bytes = (size_t)p->graph_num_steps * p->cfg.num_shadows * sizeof(float);
  polyak_graph_state graph = {0};
  graph.first_step = p->graph_first_step;
  graph.num_steps = p->graph_num_steps;
  graph.first_gap = p->graph_first_step - p->last_step;
  int previous;
  float *weights = NULL;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&weights, num_bytes);
  graph.weights = weights;
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(weights, p->graph_weights, num_bytes, cudaMemcpyHostToDevice,
                          (cudaStream_t)stream);
  if (err == cudaSuccess) /* arms every graph that captured this handle's update */
    err = cudaMemcpyAsync(state->graph, &graph, sizeof graph, cudaMemcpyHostToDevice,
                          (cudaStream_t)stream);
  if (err == cudaSuccess)
    err = cudaStreamSynchronize((cudaStream_t)stream);
  if (err == cudaSuccess)
    state->graph_weights = weights;
  else
    cudaFree(weights);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_graph_reserve");
}

static polyak_status cuda_graph_update(polyak_t *p, void *stream)
{
  cuda_state *state = p->backend;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, "polyak_graph_update: cudaSetDevice");
  polyak_update_kernel_args args;
  fill_kernel_args(p, state, &args);
  args.step.num_shadows = p->cfg.num_shadows; /* step, weights and keys: from the device */
  args.step.skip_nonfinite = p->cfg.skip_nonfinite;
  args.step.stochastic_f32 = polyak_stochastic_f32_mask(&p->cfg);
  args.graph = state->graph;
  err = launch_layer_betas(p, state, state->graph, (cudaStream_t)stream);
  if (err == cudaSuccess)
    err = polyak_launch_update(&args, update_grid(p, state), (cudaStream_t)stream);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_graph_update: kernel launch");
}

static polyak_status cuda_graph_release(polyak_t *p, int64_t *consumed, int64_t *dropped)
{
  cuda_state *state = p->backend;
  polyak_graph_state graph, disarmed = {0};
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize();
  if (err == cudaSuccess)
    err = cudaMemcpy(&graph, state->graph, sizeof graph, cudaMemcpyDeviceToHost);
  if (err == cudaSuccess) /* later replays find nothing reserved and change nothing */
    err = cudaMemcpy(state->graph, &disarmed, sizeof disarmed, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) {
    cudaFree(state->graph_weights);
    state->graph_weights = NULL;
  }
  leave_device(p, previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, "polyak_graph_release");
  *consumed = graph.consumed;
  *dropped = graph.dropped;
  return POLYAK_OK;
}

/* ---- checkpoints: raw shadow bytes through pinned host memory ------------ */

static void *cuda_host_buffer(polyak_t *p, size_t num_bytes)
{
  void *buffer = NULL;
  int previous;
  if (enter_device(p, &previous) == cudaSuccess) {
    if (cudaMallocHost(&buffer, num_bytes) != cudaSuccess)
      buffer = NULL;
    leave_device(p, previous);
  }
  cudaGetLastError();
  return buffer;
}

static void cuda_free_host_buffer(polyak_t *p, void *buffer)
{
  (void)p;
  cudaFreeHost(buffer);
}

/* Copies between an arena range and host memory on the handle's device,
 * ordered after all work already on it (save and load are rare). */
static polyak_status copy_arena(polyak_t *p, void *dst, const void *src, size_t num_bytes,
                                enum cudaMemcpyKind kind, const char *what)
{
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaMemcpy(dst, src, num_bytes, kind);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, what);
}

static polyak_status cuda_copy_to_host(polyak_t *p, void *host, const void *src, size_t num_bytes)
{
  return copy_arena(p, host, src, num_bytes, cudaMemcpyDeviceToHost, "copying shadows to the host");
}

static polyak_status cuda_copy_from_host(polyak_t *p, void *dst, const void *host, size_t num_bytes)
{
  return copy_arena(p, dst, host, num_bytes, cudaMemcpyHostToDevice, "copying to the device");
}

static void free_staging(polyak_t *p, cuda_state *state)
{
  int previous;
  if (enter_device(p, &previous) == cudaSuccess) {
    for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
      cudaFree(state->staging[k]);
      state->staging[k] = NULL;
    }
    leave_device(p, previous);
  }
  cudaGetLastError();
}

static polyak_status cuda_staging_begin(polyak_t *p)
{
  cuda_state *state = p->backend;
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int previous;
  cudaError_t err = enter_device(p, &previous);
  for (int k = 0; k < p->cfg.num_shadows && err == cudaSuccess; k++)
    err = cudaMalloc(&state->staging[k], arena_num_bytes > 0 ? arena_num_bytes : 16);
  leave_device(p, previous);
  if (err != cudaSuccess) {
    free_staging(p, state);
    return cuda_fail(p, err, "polyak_load: cudaMalloc of a second set of shadows");
  }
  return POLYAK_OK;
}

static polyak_status cuda_staging_write(polyak_t *p, int shadow, int64_t first_elem,
                                        int64_t num_elems, const void *host)
{
  cuda_state *state = p->backend;
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  return copy_arena(p, (char *)state->staging[shadow] + first_elem * elem_bytes, host,
                    (size_t)num_elems * elem_bytes, cudaMemcpyHostToDevice,
                    "polyak_load: copying a shadow to the device");
}

static polyak_status cuda_staging_commit(polyak_t *p, int64_t nonfinite_count)
{
  cuda_state *state = p->backend;
  unsigned long long count = (unsigned long long)nonfinite_count;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* no update may still read the old shadows */
  /* copied, not swapped: captured graphs hold the arenas' addresses */
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  for (int k = 0; k < p->cfg.num_shadows && err == cudaSuccess; k++)
    err = cudaMemcpy(state->shadows[k], state->staging[k], arena_num_bytes, cudaMemcpyDeviceToDevice);
  if (err == cudaSuccess)
    err = cudaMemcpy(&state->counters[COUNT_UPDATES], &count, sizeof count, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) /* a pageable copy may land after it returns */
    err = cudaDeviceSynchronize();
  leave_device(p, previous);
  free_staging(p, state);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_load");
}

static void cuda_staging_abort(polyak_t *p)
{
  free_staging(p, p->backend);
}

/* ---- evaluation ------------------------------------------------------------- */

static int io_grid_for(const polyak_t *p, const cuda_state *state)
{
  return p->num_chunks < state->io_grid ? (int)p->num_chunks : state->io_grid;
}

static polyak_status cuda_copy_to_params(polyak_t *p, int shadow, double debias_scale, void *stream)
{
  const cuda_state *state = p->backend;
  if (p->num_chunks == 0)
    return POLYAK_OK;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = polyak_launch_copy_to_params(state->descs, state->chunks, p->num_chunks, state->shadows[shadow], shadow,
                                       p->cfg.shadow_dtype, debias_scale, io_grid_for(p, state),
                                       (cudaStream_t)stream);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_copy_to_params");
}

/* The snapshots as the columns of an arena_elems x num_snapshots matrix:
 * one SGEMV into a scratch arena, then one kernel into the params. */
static polyak_status cuda_synthesize(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                                     void *stream)
{
  cuda_state *state = p->backend;
  if (p->num_chunks == 0)
    return POLYAK_OK;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, "polyak_synthesize_to_params");
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
    blas = cublasSgemv_64(state->blas, CUBLAS_OP_N, p->arena_elems, num_snapshots, &one, snapshots, p->arena_elems,
                          x, 1, &zero, y, 1);
  if (err == cudaSuccess && blas == CUBLAS_STATUS_SUCCESS)
    err = polyak_launch_copy_to_params(state->descs, state->chunks, p->num_chunks, y, -1, POLYAK_F32, 1.0,
                                       io_grid_for(p, state), (cudaStream_t)stream);
  if (err == cudaSuccess)
    err = cudaStreamSynchronize((cudaStream_t)stream); /* before the scratch goes */
  cudaFree(x);
  cudaFree(y);
  leave_device(p, previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, "polyak_synthesize_to_params");
  if (blas != CUBLAS_STATUS_SUCCESS)
    return polyak_fail(p, POLYAK_ERR_CUDA, "polyak_synthesize_to_params: cuBLAS: %s: %s",
                       cublasGetStatusName(blas), cublasGetStatusString(blas));
  return POLYAK_OK;
}

static polyak_status store_chunks(polyak_t *p, cuda_state *state);

static polyak_status cuda_hard_update(polyak_t *p, int shadow, void *stream)
{
  cuda_state *state = p->backend;
  if (p->num_chunks == 0)
    return POLYAK_OK;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, "polyak_hard_update");
  polyak_status status = p->cfg.skip_nonfinite ? store_chunks(p, state) : POLYAK_OK; /* the whole params */
  int whole = p->cfg.world_size > 1;
  if (status == POLYAK_OK && p->cfg.skip_nonfinite)
    status = refuse_nonfinite_params(p, state, whole ? state->store_chunks : state->chunks,
                                     whole ? state->num_store_chunks : p->num_chunks, (cudaStream_t)stream,
                                     "polyak_hard_update");
  if (status == POLYAK_OK)
    err = polyak_launch_init(state->descs, state->chunks, p->num_chunks, state->shadows, shadow, 1,
                             p->cfg.shadow_dtype, NULL, NULL, io_grid_for(p, state), (cudaStream_t)stream);
  leave_device(p, previous);
  return status != POLYAK_OK ? status : err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "polyak_hard_update");
}

/* The chunks covering whole params: the plan's, or (sharded) a table of
 * its own, built and uploaded at the first store. */
static polyak_status store_chunks(polyak_t *p, cuda_state *state)
{
  if (p->cfg.world_size == 1 || state->store_chunks)
    return POLYAK_OK;
  polyak_chunk *chunks = NULL;
  int64_t count = 0;
  polyak_status status = polyak_full_chunks(p, &chunks, &count);
  if (status != POLYAK_OK)
    return status;
  cudaError_t err = cudaMalloc((void **)&state->store_chunks, ((size_t)count + 1) * sizeof *chunks);
  if (err == cudaSuccess)
    err = cudaMemcpy(state->store_chunks, chunks, (size_t)count * sizeof *chunks, cudaMemcpyHostToDevice);
  free(chunks);
  if (err != cudaSuccess) {
    cudaFree(state->store_chunks);
    state->store_chunks = NULL;
    return cuda_fail(p, err, "polyak_store: the chunk table");
  }
  state->num_store_chunks = count;
  return POLYAK_OK;
}

static polyak_status cuda_blend(polyak_t *p, const float *coefficient, int tensor, void *dst,
                                polyak_dtype dst_dtype, void *stream)
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
  int64_t work = tensor < 0 ? p->num_chunks
                            : (p->tensors[tensor].num_elems + POLYAK_BLOCK_THREADS - 1) / POLYAK_BLOCK_THREADS;
  if (work == 0)
    return POLYAK_OK;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  int grid = work < state->io_grid ? (int)work : state->io_grid;
  if (err == cudaSuccess)
    err = tensor < 0 ? polyak_launch_blend_to_params(&args, state->descs, state->chunks, p->num_chunks, grid,
                                                     (cudaStream_t)stream)
                     : polyak_launch_blend(&args, &p->descs[tensor], dst, dst_dtype, grid, (cudaStream_t)stream);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "blend kernel launch");
}

static polyak_status store_or_restore(polyak_t *p, int to_store, void *stream, const char *what)
{
  cuda_state *state = p->backend;
  int previous;
  cudaError_t err = enter_device(p, &previous);
  polyak_status status = err == cudaSuccess ? store_chunks(p, state) : cuda_fail(p, err, what);
  const polyak_chunk *chunks = state->store_chunks ? state->store_chunks : state->chunks;
  int64_t num_chunks = state->store_chunks ? state->num_store_chunks : p->num_chunks;
  if (status == POLYAK_OK && !state->store && (err = cudaMalloc(&state->store, (size_t)p->store_bytes + 16)) != cudaSuccess)
    status = cuda_fail(p, err, what);
  if (status == POLYAK_OK && num_chunks > 0) {
    int grid = num_chunks < state->io_grid ? (int)num_chunks : state->io_grid;
    err = polyak_launch_store(state->descs, chunks, num_chunks, state->store, to_store, grid, (cudaStream_t)stream);
    if (err != cudaSuccess)
      status = cuda_fail(p, err, what);
  }
  leave_device(p, previous);
  return status;
}

static polyak_status cuda_store(polyak_t *p, void *stream)
{
  return store_or_restore(p, 1, stream, "polyak_store");
}

static polyak_status cuda_restore(polyak_t *p, void *stream)
{
  return store_or_restore(p, 0, stream, "polyak_restore");
}

/* ---- gathers ------------------------------------------------------------------ */

static void *cuda_scratch_alloc(polyak_t *p, size_t num_bytes)
{
  void *scratch = NULL;
  int previous;
  if (enter_device(p, &previous) == cudaSuccess) {
    if (cudaMalloc(&scratch, num_bytes ? num_bytes : 16) != cudaSuccess)
      scratch = NULL;
    leave_device(p, previous);
  }
  cudaGetLastError();
  return scratch;
}

static void cuda_scratch_free(polyak_t *p, void *scratch)
{
  int previous;
  if (enter_device(p, &previous) == cudaSuccess) {
    cudaDeviceSynchronize(); /* gathers read it on the caller's stream */
    cudaFree(scratch);
    leave_device(p, previous);
  }
  cudaGetLastError();
}

static polyak_status cuda_copy_bytes(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream)
{
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(dst, src, num_bytes, cudaMemcpyDeviceToDevice, (cudaStream_t)stream);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "cudaMemcpyAsync");
}

static polyak_status cuda_capturing(polyak_t *p, void *stream, int *capturing)
{
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err == cudaSuccess)
    err = is_capturing(stream, capturing);
  leave_device(p, previous);
  return err == cudaSuccess ? POLYAK_OK : cuda_fail(p, err, "cudaStreamIsCapturing");
}

static polyak_status cuda_agree(polyak_t *p, int local_ok, int *all_ok)
{
  *all_ok = local_ok;
#ifdef POLYAK_HAVE_NCCL
  const cuda_state *state = p->backend;
  if (p->cfg.nccl_comm) {
    char reason[POLYAK_ERROR_BYTES];
    int previous;
    cudaError_t err = enter_device(p, &previous);
    if (err != cudaSuccess)
      return cuda_fail(p, err, "agreeing: cudaSetDevice");
    polyak_status status = polyak_nccl_agree(p->cfg.nccl_comm, state->flag, local_ok, all_ok, reason, sizeof reason);
    leave_device(p, previous);
    return status == POLYAK_OK ? status : polyak_fail(p, status, "%s", reason);
  }
#endif
  return POLYAK_OK;
}

#ifdef POLYAK_HAVE_NCCL
static polyak_status cuda_all_gather(polyak_t *p, const void *send, void *recv, int64_t count, void *stream)
{
  char reason[POLYAK_ERROR_BYTES];
  int previous;
  cudaError_t err = enter_device(p, &previous);
  if (err != cudaSuccess)
    return cuda_fail(p, err, "all-gather: cudaSetDevice");
  polyak_status status = polyak_nccl_all_gather(p->cfg.nccl_comm, send, recv, (size_t)count,
                                                p->cfg.shadow_dtype == POLYAK_BF16, stream, reason,
                                                sizeof reason);
  leave_device(p, previous);
  return status == POLYAK_OK ? status : polyak_fail(p, status, "%s", reason);
}
#endif

const polyak_backend_ops polyak_cuda_ops = {
    .finalize = cuda_finalize,
    .update = cuda_update,
    .arena = cuda_arena,
    .read_out = cuda_read_out,
    .check_read_out = cuda_check_read_out,
    .nonfinite_count = cuda_nonfinite_count,
    .release = cuda_release,
    .graph_reserve = cuda_graph_reserve,
    .graph_update = cuda_graph_update,
    .graph_release = cuda_graph_release,
    .host_buffer = cuda_host_buffer,
    .free_host_buffer = cuda_free_host_buffer,
    .copy_to_host = cuda_copy_to_host,
    .copy_from_host = cuda_copy_from_host,
    .staging_begin = cuda_staging_begin,
    .staging_write = cuda_staging_write,
    .staging_commit = cuda_staging_commit,
    .staging_abort = cuda_staging_abort,
    .copy_to_params = cuda_copy_to_params,
    .blend = cuda_blend,
    .hard_update = cuda_hard_update,
    .set_layer_source = cuda_set_layer_source,
    .layer_betas = cuda_layer_betas_read,
    .synthesize = cuda_synthesize,
    .products_read = cuda_products_read,
    .products_write = cuda_products_write,
    .check_grad_norm = cuda_check_grad_norm,
    .store = cuda_store,
    .restore = cuda_restore,
    .scratch_alloc = cuda_scratch_alloc,
    .scratch_free = cuda_scratch_free,
    .copy_bytes = cuda_copy_bytes,
#ifdef POLYAK_HAVE_NCCL
    .all_gather = cuda_all_gather,
#else
    .all_gather = NULL,
#endif
    .agree = cuda_agree,
    .capturing = cuda_capturing,
};
