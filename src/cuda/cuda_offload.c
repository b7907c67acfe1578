/* cuda_offload.c: the device side of an offloaded handle (shadows in host
 * memory for device params, src/offload/offload.h): copies, events and a
 * side stream of the handle's device, pinned host memory, the pointer
 * checks, and, with a communicator, the ranks' agreements and gathers
 * (host memory to host memory through device memory of the staging size,
 * allocated at the first gather). Every call makes the handle device's
 * primary context current for its duration and leaves the caller's CUDA
 * state as it was, so that the offload's thread may call too. */
#include <stdlib.h>
#include <string.h>

#include "cuda_state.h"
#include "offload/offload.h"
#ifdef POLYAK_HAVE_NCCL
#include "nccl_comm.h"
#endif

typedef struct {
  polyak_cuda_driver driver;
  CUcontext context; /* the device's primary context, referenced while open */
  CUdevice device;
  int ordinal;
  cudaStream_t side;
  cudaEvent_t *events;
  int num_events;
  /* ranks */
  void *comm;
  int world_size, is_bf16;
  uint64_t *agreement; /* POLYAK_AGREEMENT_SLOTS(world_size), zeroed */
  uint64_t agreements;
  size_t gather_num_bytes; /* the staging size */
  char *gather;            /* device memory for gathers, or NULL until the first */
} offload_ctx;

/* A CUDA failure as the offload's reason. */
static polyak_status failed(cudaError_t err, const char *what, char *why)
{
  cudaGetLastError(); /* a non-sticky error: the next call starts clean */
  polyak_message(why, POLYAK_ERROR_BYTES, POLYAK_ERR_CUDA, "%s: %s: %s", what, cudaGetErrorName(err),
                 cudaGetErrorString(err));
  return err == cudaErrorMemoryAllocation ? POLYAK_ERR_NO_MEMORY : POLYAK_ERR_CUDA;
}

static cudaError_t enter(const offload_ctx *c)
{
  return c->driver.ctx_push(c->context) == CUDA_SUCCESS ? cudaSuccess : cudaErrorDeviceUninitialized;
}

static void leave(const offload_ctx *c)
{
  CUcontext popped = NULL;
  c->driver.ctx_pop(&popped);
}

static void close_ctx(void *ctx)
{
  offload_ctx *c = ctx;
  if (!c)
    return;
  if (c->context && enter(c) == cudaSuccess) {
    for (int e = 0; e < c->num_events; e++)
      if (c->events[e]) {
        cudaEventSynchronize(c->events[e]);
        cudaEventDestroy(c->events[e]);
      }
    if (c->side)
      cudaStreamSynchronize(c->side);
    if (c->side)
      cudaStreamDestroy(c->side);
    cudaFree(c->agreement);
    cudaFree(c->gather);
    leave(c);
    cudaGetLastError();
  }
  if (c->context)
    c->driver.primary_ctx_release(c->device);
  free(c->events);
  free(c);
}

static polyak_status open_ctx(void *arg, const polyak_t *p, int num_events, void **ctx, void **side, char *why)
{
  (void)arg;
  offload_ctx *c = calloc(1, sizeof *c);
  cudaEvent_t *events = calloc((size_t)num_events + 1, sizeof *events);
  if (!c || !events) {
    free(c);
    free(events);
    return polyak_message(why, POLYAK_ERROR_BYTES, POLYAK_ERR_NO_MEMORY, "out of host memory");
  }
  c->events = events;
  c->ordinal = p->cfg.device;
  c->comm = p->cfg.nccl_comm;
  c->world_size = p->cfg.world_size;
  c->is_bf16 = p->cfg.shadow_dtype == POLYAK_BF16;
  c->gather_num_bytes = p->staging_num_bytes ? p->staging_num_bytes : OFFLOAD_DEFAULT_STAGING_BYTES;
  cudaError_t err = polyak_cuda_driver_load(&c->driver);
  const char *what = "loading the CUDA driver's functions";
  if (err == cudaSuccess && (c->driver.device_get(&c->device, c->ordinal) != CUDA_SUCCESS ||
                             c->driver.primary_ctx_retain(&c->context, c->device) != CUDA_SUCCESS)) {
    c->context = NULL;
    err = cudaErrorInvalidDevice;
    what = "retaining the device's primary context";
  }
  if (err != cudaSuccess) {
    close_ctx(c);
    return failed(err, what, why);
  }
  err = enter(c);
  what = "entering the handle's device";
  if (err == cudaSuccess) {
    what = "cudaStreamCreateWithFlags";
    err = cudaStreamCreateWithFlags(&c->side, cudaStreamNonBlocking);
    for (int e = 0; e < num_events && err == cudaSuccess; e++) {
      what = "cudaEventCreateWithFlags";
      err = cudaEventCreateWithFlags(&c->events[e], cudaEventDisableTiming);
      c->num_events = e + 1;
    }
    if (err == cudaSuccess && c->comm) {
      size_t num_bytes = POLYAK_AGREEMENT_SLOTS(c->world_size) * sizeof *c->agreement;
      what = "the ranks' agreement: cudaMalloc";
      err = cudaMalloc((void **)&c->agreement, num_bytes);
      if (err == cudaSuccess)
        err = cudaMemset(c->agreement, 0, num_bytes);
      if (err == cudaSuccess)
        err = cudaDeviceSynchronize(); /* zeroed before any stream's collective */
    }
    leave(c);
  }
  if (err != cudaSuccess) {
    polyak_status status = failed(err, what, why);
    close_ctx(c);
    return status;
  }
  *ctx = c;
  *side = c->side;
  return POLYAK_OK;
}

static void *alloc_pinned(void *ctx, size_t num_bytes)
{
  offload_ctx *c = ctx;
  void *host = NULL;
  if (enter(c) != cudaSuccess)
    return NULL;
  /* portable: any context may copy from it (the caller's streams included) */
  if (cudaHostAlloc(&host, num_bytes ? num_bytes : 64, cudaHostAllocPortable) != cudaSuccess)
    host = NULL;
  leave(c);
  cudaGetLastError();
  return host;
}

static void free_pinned(void *ctx, void *host)
{
  offload_ctx *c = ctx;
  if (enter(c) == cudaSuccess) {
    cudaFreeHost(host);
    leave(c);
  }
  cudaGetLastError();
}

static polyak_status copy(void *ctx, void *dst, const void *src, size_t num_bytes, int direction, void *stream,
                          char *why)
{
  offload_ctx *c = ctx;
  cudaError_t err = enter(c);
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(dst, src, num_bytes,
                          direction == POLYAK_TO_HOST ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice,
                          (cudaStream_t)stream);
    leave(c);
  }
  return err == cudaSuccess ? POLYAK_OK : failed(err, "cudaMemcpyAsync", why);
}

static polyak_status record(void *ctx, int event, void *stream, char *why)
{
  offload_ctx *c = ctx;
  cudaError_t err = enter(c);
  if (err == cudaSuccess) {
    err = cudaEventRecord(c->events[event], (cudaStream_t)stream);
    leave(c);
  }
  return err == cudaSuccess ? POLYAK_OK : failed(err, "cudaEventRecord", why);
}

static polyak_status stream_wait(void *ctx, void *stream, int event, char *why)
{
  offload_ctx *c = ctx;
  cudaError_t err = enter(c);
  if (err == cudaSuccess) {
    err = cudaStreamWaitEvent((cudaStream_t)stream, c->events[event], 0);
    leave(c);
  }
  return err == cudaSuccess ? POLYAK_OK : failed(err, "cudaStreamWaitEvent", why);
}

static polyak_status wait(void *ctx, int event, char *why)
{
  offload_ctx *c = ctx;
  cudaError_t err = enter(c);
  if (err == cudaSuccess) {
    err = cudaEventSynchronize(c->events[event]); /* success at once where never recorded */
    leave(c);
  }
  return err == cudaSuccess ? POLYAK_OK : failed(err, "cudaEventSynchronize", why);
}

static polyak_status locate(void *ctx, const void *ptr, size_t num_bytes, int *where, char *why)
{
  offload_ctx *c = ctx;
  struct cudaPointerAttributes attr;
  cudaError_t err = enter(c);
  if (err != cudaSuccess)
    return failed(err, "entering the handle's device", why);
  err = cudaPointerGetAttributes(&attr, ptr);
  CUdeviceptr base = 0;
  size_t size = 0;
  int ranged = err == cudaSuccess && attr.type == cudaMemoryTypeDevice &&
               c->driver.mem_get_address_range(&base, &size, (CUdeviceptr)(uintptr_t)ptr) == CUDA_SUCCESS;
  leave(c);
  if (err != cudaSuccess)
    return failed(err, "cudaPointerGetAttributes", why);
  *where = POLYAK_MEMORY_HOST;
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return POLYAK_OK; /* pageable or pinned host memory */
  if (attr.type == cudaMemoryTypeDevice && attr.device != c->ordinal)
    return polyak_message(why, POLYAK_ERROR_BYTES, POLYAK_ERR_INVALID_ARG,
                          "%p is memory of CUDA device %d; this handle runs on device %d", ptr, attr.device,
                          c->ordinal);
  /* a span past its allocation would make the copy fault */
  if (ranged && (uintptr_t)ptr + num_bytes > (uintptr_t)base + size)
    return polyak_message(why, POLYAK_ERROR_BYTES, POLYAK_ERR_INVALID_ARG,
                          "%p needs %zu bytes, but its CUDA allocation (%zu bytes from %p) ends %zu bytes after it: "
                          "is the shape larger than the tensor?",
                          ptr, num_bytes, size, (void *)(uintptr_t)base,
                          (size_t)((uintptr_t)base + size - (uintptr_t)ptr));
  *where = POLYAK_MEMORY_DEVICE;
  return POLYAK_OK;
}

static polyak_status capturing(void *ctx, void *stream, int any_visible, int *capturing, char *why)
{
  offload_ctx *c = ctx;
  cudaError_t err = enter(c);
  if (err == cudaSuccess) {
    /* the legacy stream's query sees a blocking stream's capture too */
    err = polyak_cuda_is_capturing(any_visible ? NULL : stream, capturing);
    leave(c);
  }
  return err == cudaSuccess ? POLYAK_OK : failed(err, "cudaStreamIsCapturing", why);
}

/* The fold thread's host waits (cudaEventSynchronize) are potentially
 * unsafe calls to a global-mode capture begun on another thread: relaxed,
 * this thread's calls never invalidate one. */
static void thread_start(void *ctx)
{
  (void)ctx;
  enum cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
}

/* ---- ranks ------------------------------------------------------------------------ */

static polyak_status agree(void *ctx, int local_ok, int *all_ok, char *why)
{
  offload_ctx *c = ctx;
  *all_ok = local_ok;
  if (!c->comm)
    return POLYAK_OK;
#ifdef POLYAK_HAVE_NCCL
  cudaError_t err = enter(c);
  /* issued whatever failed: the other ranks wait in it */
  polyak_status status = polyak_nccl_agree(c->comm, c->agreement, ++c->agreements, local_ok && err == cudaSuccess,
                                           err == cudaSuccess, all_ok, why, POLYAK_ERROR_BYTES);
  if (err == cudaSuccess)
    leave(c);
  return err == cudaSuccess ? status : failed(err, "agreeing: entering the handle's device", why);
#else
  (void)why;
  return POLYAK_OK; /* no NCCL: no communicator got past create */
#endif
}

static polyak_status finalize_agree(void *ctx, uint64_t layout_hash, int local_ok, int *all_ok, int *same, int *other,
                                    char *why)
{
  offload_ctx *c = ctx;
  *all_ok = local_ok, *same = 1, *other = -1;
  if (!c->comm)
    return POLYAK_OK;
#ifdef POLYAK_HAVE_NCCL
  cudaError_t err = enter(c);
  polyak_status status =
      polyak_nccl_finalize_agree(c->comm, c->agreement, c->world_size, layout_hash, local_ok && err == cudaSuccess,
                                 all_ok, same, other, why, POLYAK_ERROR_BYTES);
  if (err == cudaSuccess)
    leave(c);
  return err == cudaSuccess ? status : failed(err, "the ranks' handshake: entering the handle's device", why);
#else
  (void)layout_hash, (void)why;
  return POLYAK_OK;
#endif
}

/* count elements per rank from host `send` into host `recv` (rank r's at
 * r * count), through device memory in pieces: every rank takes the same
 * pieces, so their collectives pair up. Returns once recv is written. */
static polyak_status all_gather(void *ctx, const void *send, void *recv, int64_t count, size_t elem_num_bytes,
                                void *stream, char *why)
{
  offload_ctx *c = ctx;
  if (!c->comm)
    return polyak_message(why, POLYAK_ERROR_BYTES, POLYAK_ERR_UNSUPPORTED, "the handle has no communicator");
#ifdef POLYAK_HAVE_NCCL
  cudaStream_t s = (cudaStream_t)stream;
  int64_t piece = (int64_t)(c->gather_num_bytes / elem_num_bytes / (size_t)(c->world_size + 1));
  if (piece < 1)
    piece = 1;
  cudaError_t err = enter(c);
  if (err != cudaSuccess)
    return failed(err, "gathering: entering the handle's device", why);
  if (!c->gather)
    err = cudaMalloc((void **)&c->gather, (size_t)piece * elem_num_bytes * (size_t)(c->world_size + 1));
  polyak_status status = err == cudaSuccess ? POLYAK_OK : failed(err, "gathering: cudaMalloc", why);
  char *dev_send = c->gather, *dev_recv = c->gather + (size_t)piece * elem_num_bytes;
  for (int64_t first = 0; first < count && status == POLYAK_OK; first += piece) {
    int64_t n = count - first < piece ? count - first : piece;
    err = cudaMemcpyAsync(dev_send, (const char *)send + (size_t)first * elem_num_bytes, (size_t)n * elem_num_bytes,
                          cudaMemcpyHostToDevice, s);
    if (err != cudaSuccess) {
      status = failed(err, "gathering: cudaMemcpyAsync", why);
      break;
    }
    status = polyak_nccl_all_gather(c->comm, dev_send, dev_recv, (size_t)n, c->is_bf16, s, why, POLYAK_ERROR_BYTES);
    for (int r = 0; r < c->world_size && status == POLYAK_OK; r++) {
      err = cudaMemcpyAsync((char *)recv + ((size_t)r * (size_t)count + (size_t)first) * elem_num_bytes,
                            dev_recv + (size_t)r * (size_t)n * elem_num_bytes, (size_t)n * elem_num_bytes,
                            cudaMemcpyDeviceToHost, s);
      if (err != cudaSuccess)
        status = failed(err, "gathering: cudaMemcpyAsync", why);
    }
  }
  err = cudaStreamSynchronize(s); /* recv is host memory the caller reads next */
  leave(c);
  if (status == POLYAK_OK && err != cudaSuccess)
    status = failed(err, "gathering: cudaStreamSynchronize", why);
  return status;
#else
  (void)send, (void)recv, (void)count, (void)elem_num_bytes, (void)stream;
  return POLYAK_OK;
#endif
}

const polyak_transfer_ops polyak_cuda_transfer_ops = {
    .name = "CUDA",
    .open = open_ctx,
    .close = close_ctx,
    .alloc_pinned = alloc_pinned,
    .free_pinned = free_pinned,
    .copy = copy,
    .record = record,
    .stream_wait = stream_wait,
    .wait = wait,
    .locate = locate,
    .capturing = capturing,
    .agree = agree,
    .all_gather = all_gather,
    .finalize_agree = finalize_agree,
    .thread_start = thread_start,
};
