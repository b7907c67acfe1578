/* cuda_backend.c: the CUDA backend's host side. */
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "polyak_internal.h"

int polyak_cuda_device_count(char *msg, size_t msg_num_bytes)
{
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
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
  return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                        "the CUDA backend's fused update is not built yet: use the CPU backend");
}

static polyak_status cuda_unsupported(polyak_t *p)
{
  return polyak_fail(p, POLYAK_ERR_UNSUPPORTED, "the CUDA backend's fused update is not built yet");
}

static polyak_status cuda_finalize(polyak_t *p, void *stream)
{
  (void)stream;
  return cuda_unsupported(p);
}

static polyak_status cuda_update(polyak_t *p, const polyak_update_args *args, void *stream)
{
  (void)args;
  (void)stream;
  return cuda_unsupported(p);
}

static polyak_status cuda_get_shadow(polyak_t *p, int shadow, int tensor, void *dst,
                                     polyak_dtype dst_dtype, double debias_scale, void *stream)
{
  (void)shadow, (void)tensor, (void)dst, (void)dst_dtype, (void)debias_scale, (void)stream;
  return cuda_unsupported(p);
}

static polyak_status cuda_nonfinite_count(polyak_t *p, int64_t *count)
{
  (void)count;
  return cuda_unsupported(p);
}

static void cuda_release(polyak_t *p)
{
  (void)p;
}

const polyak_backend_ops polyak_cuda_ops = {
    .finalize = cuda_finalize,
    .update = cuda_update,
    .get_shadow = cuda_get_shadow,
    .nonfinite_count = cuda_nonfinite_count,
    .release = cuda_release,
};
