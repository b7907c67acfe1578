/* cuda_device.c: the CUDA backend's dealings with the driver and the
 * device: errors, whether a device is there (and if not, which driver and
 * runtime failed to meet), entering the handle's device and leaving the
 * caller's CUDA state exactly as it was, and the checks of the caller's
 * pointers. The driver functions come through the runtime
 * (cudaGetDriverEntryPointByVersion; cudaGetDriverEntryPoint for CUDA 12),
 * so that libpolyak loads, and its CPU backend works, on machines without
 * a CUDA driver. */
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#include "cuda_span.h"
#include "cuda_state.h"
#ifdef POLYAK_HAVE_NCCL
#include "nccl_comm.h"
#endif

/* ---- errors ------------------------------------------------------------------ */

polyak_status polyak_cuda_fail(polyak_t *p, cudaError_t err, const char *what)
{
  cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
  return polyak_fail(p, err == cudaErrorMemoryAllocation ? POLYAK_ERR_NO_MEMORY : POLYAK_ERR_CUDA, "%s: %s: %s", what,
                     cudaGetErrorName(err), cudaGetErrorString(err));
}

/* A driver function's failure as the runtime's error of the same number
 * (the two enumerations share their values), unknown ones as
 * cudaErrorUnknown. */
static cudaError_t runtime_error(CUresult result)
{
  if (result == CUDA_SUCCESS)
    return cudaSuccess;
  const char *name = cudaGetErrorName((cudaError_t)result);
  return name && strcmp(name, "unrecognized error code") != 0 ? (cudaError_t)result : cudaErrorUnknown;
}

/* ---- the driver functions ------------------------------------------------- */

static cudaError_t find(const char *symbol, void **function)
{
  enum cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  *function = NULL;
#if CUDART_VERSION >= 13000
  cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, function, 12000, cudaEnableDefault, &found);
#else
  /* a CUDA 12 build binds whichever libcudart.so.12 the process has (torch's):
   * every CUDA 12 runtime has this call, ByVersion only those from 12.5 on */
  cudaError_t err = cudaGetDriverEntryPoint(symbol, function, cudaEnableDefault, &found);
#endif
  if (err == cudaSuccess && (found != cudaDriverEntryPointSuccess || !*function))
    err = cudaErrorSymbolNotFound;
  if (err != cudaSuccess)
    cudaGetLastError();
  return err;
}

cudaError_t polyak_cuda_driver_load(polyak_cuda_driver *driver)
{
  memset(driver, 0, sizeof *driver);
  cudaError_t err = find("cuDeviceGet", (void **)&driver->device_get);
  if (err == cudaSuccess)
    err = find("cuDevicePrimaryCtxRetain", (void **)&driver->primary_ctx_retain);
  if (err == cudaSuccess)
    err = find("cuDevicePrimaryCtxRelease", (void **)&driver->primary_ctx_release);
  if (err == cudaSuccess)
    err = find("cuDevicePrimaryCtxGetState", (void **)&driver->primary_ctx_get_state);
  if (err == cudaSuccess)
    err = find("cuCtxPushCurrent", (void **)&driver->ctx_push);
  if (err == cudaSuccess)
    err = find("cuCtxPopCurrent", (void **)&driver->ctx_pop);
  if (err == cudaSuccess)
    err = find("cuCtxGetCurrent", (void **)&driver->ctx_get_current);
  if (err == cudaSuccess)
    err = find("cuMemGetAddressRange", (void **)&driver->mem_get_address_range);
  if (err == cudaSuccess)
    err = find("cuPointerGetAttributes", (void **)&driver->pointer_get_attributes);
  return err;
}

/* ---- entering and leaving the handle's device ---------------------------------- */

/* A reference to the primary context of CUDA device `ordinal` (made if
 * the device has none yet): *context, and *device for the release. */
static cudaError_t retain(const polyak_cuda_driver *driver, int ordinal, CUdevice *device, CUcontext *context)
{
  cudaError_t err = runtime_error(driver->device_get(device, ordinal));
  if (err == cudaSuccess)
    err = runtime_error(driver->primary_ctx_retain(context, *device));
  return err;
}

cudaError_t polyak_cuda_enter(const polyak_t *p, polyak_cuda_scope *scope)
{
  const cuda_state *state = p->backend;
  CUcontext context = NULL;
  memset(scope, 0, sizeof *scope);
  cudaError_t err = cudaSuccess;
  if (state && state->context) { /* the handle's own reference */
    scope->driver = state->driver;
    context = state->context;
  } else { /* before finalize: a reference for this call */
    err = polyak_cuda_driver_load(&scope->driver);
    if (err == cudaSuccess)
      err = retain(&scope->driver, p->cfg.device, &scope->device, &context);
    scope->retained = err == cudaSuccess;
  }
  if (err == cudaSuccess)
    err = runtime_error(scope->driver.ctx_push(context));
  scope->pushed = err == cudaSuccess;
  if (err != cudaSuccess)
    polyak_cuda_leave(scope);
  return err;
}

void polyak_cuda_leave(polyak_cuda_scope *scope)
{
  CUcontext popped = NULL;
  if (scope->pushed)
    scope->driver.ctx_pop(&popped);
  if (scope->retained)
    scope->driver.primary_ctx_release(scope->device);
  scope->pushed = scope->retained = 0;
}

cudaError_t polyak_cuda_hold_context(polyak_t *p, cuda_state *state)
{
  cudaError_t err = polyak_cuda_driver_load(&state->driver);
  if (err == cudaSuccess)
    err = retain(&state->driver, p->cfg.device, &state->device, &state->context);
  if (err != cudaSuccess)
    state->context = NULL;
  return err;
}

void polyak_cuda_drop_context(cuda_state *state)
{
  if (state->context)
    state->driver.primary_ctx_release(state->device);
  state->context = NULL;
}

/* ---- devices ------------------------------------------------------------------- */

/* "driver CUDA 12.4, runtime CUDA 13.0" (driver "none" where there is no
 * driver): what a machine that cannot run the backend has, in messages. */
static void versions(char *text, size_t text_num_bytes)
{
  int driver = 0, runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess)
    driver = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess)
    runtime = 0;
  cudaGetLastError();
  char driver_text[32] = "none";
  if (driver > 0)
    snprintf(driver_text, sizeof driver_text, "CUDA %d.%d", driver / 1000, driver % 1000 / 10);
  snprintf(text, text_num_bytes, "cudaDriverGetVersion: %s, cudaRuntimeGetVersion: CUDA %d.%d%s", driver_text,
           runtime / 1000, runtime % 1000 / 10,
           driver > 0 && driver < runtime ? ": this runtime needs a newer driver" : "");
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
 * driver, a driver too old for the runtime: the message says which driver
 * and runtime) or POLYAK_ERR_INVALID_ARG (ordinal out of range). */
static polyak_status check_device(int device, char *msg, size_t msg_num_bytes)
{
  char reason[POLYAK_ERROR_BYTES / 2], found[128];
  int count = device_count(reason, sizeof reason);
  if (count <= 0) {
    versions(found, sizeof found);
    if (count < 0)
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                            "the CUDA backend found no usable device (cudaGetDeviceCount: %s; %s)", reason, found);
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                          "the CUDA backend found no CUDA device on this machine (%s)", found);
  }
  if (device < 0 || device >= count)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "device = %d is outside the %d visible CUDA devices", device, count);
  return POLYAK_OK;
}

/* 1 if ptr is CUDA device memory (not managed or host); 0 otherwise,
 * including when no CUDA driver or device is present. */
int polyak_cuda_owns_memory(const void *ptr)
{
  struct cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return attr.type == cudaMemoryTypeDevice;
}

int polyak_cuda_available(void)
{
  return device_count(NULL, 0) > 0;
}

/* The device, then the communicator: it must hold these ranks, on it. */
polyak_status polyak_cuda_check_config(const polyak_config *cfg, char *msg, size_t msg_num_bytes)
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

/* ---- the caller's pointers -------------------------------------------------------- */

static int piece_of(void *context, uint64_t addr, uint64_t *base, uint64_t *num_bytes)
{
  const polyak_cuda_driver *driver = context;
  CUdeviceptr piece_base = 0;
  size_t piece_num_bytes = 0;
  if (driver->mem_get_address_range(&piece_base, &piece_num_bytes, (CUdeviceptr)addr) != CUDA_SUCCESS)
    return 1;
  *base = (uint64_t)piece_base;
  *num_bytes = (uint64_t)piece_num_bytes;
  return 0;
}

/* The allocation `ptr` is in: its whole address range (a VMM reservation),
 * else the mapped piece holding it; 0 if the driver cannot tell. */
static int allocation_of(const polyak_cuda_driver *driver, const void *ptr, uint64_t *base, uint64_t *num_bytes)
{
  CUpointer_attribute asked[2] = {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE};
  CUdeviceptr range_base = 0;
  size_t range_num_bytes = 0;
  void *data[2] = {&range_base, &range_num_bytes};
  if (driver->pointer_get_attributes(2, asked, data, (CUdeviceptr)(uintptr_t)ptr) == CUDA_SUCCESS &&
      range_num_bytes > 0) {
    *base = (uint64_t)range_base;
    *num_bytes = (uint64_t)range_num_bytes;
    return 1;
  }
  return piece_of((void *)driver, (uint64_t)(uintptr_t)ptr, base, num_bytes) == 0;
}

polyak_status polyak_cuda_check_pointer(polyak_t *p, const polyak_cuda_scope *scope, const void *ptr, size_t num_bytes,
                                        const char *what)
{
  struct cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, what);
  if (attr.type == cudaMemoryTypeDevice && attr.device != p->cfg.device)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: %p is memory of CUDA device %d; this handle runs on device %d",
                       what, ptr, attr.device, p->cfg.device);
  if (attr.type != cudaMemoryTypeManaged && attr.type != cudaMemoryTypeDevice)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s: %p is host memory; the CUDA backend needs device memory on device %d", what, ptr,
                       p->cfg.device);
  /* the whole span: a shape that runs past its allocation would make the
   * kernels fault, and the fault is sticky (the caller's context dies) */
  uint64_t base = 0, size = 0, usable = 0;
  if (num_bytes == 0 || !allocation_of(&scope->driver, ptr, &base, &size))
    return POLYAK_OK; /* the driver cannot tell: as far as can be checked */
  polyak_span_verdict verdict = polyak_span_check((uint64_t)(uintptr_t)ptr, (uint64_t)num_bytes, base, size, piece_of,
                                                  (void *)&scope->driver, &usable);
  if (verdict != POLYAK_SPAN_OUTSIDE)
    return POLYAK_OK;
  return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                     "%s: %p needs %zu bytes, but its CUDA allocation (%zu bytes from %p) ends, or is unmapped, "
                     "%llu bytes after it: is the shape larger than the tensor?",
                     what, ptr, num_bytes, (size_t)size, (void *)(uintptr_t)base, (unsigned long long)usable);
}
