/*
 * shadow_io.cu: the kernels around the update: shadow initialization at
 * finalize, read-out, copying a shadow or a blend of shadows into the
 * params, and keeping and restoring a copy of the params. None is on the per-step path, so all are
 * plain grid-stride loops, using the same conversions as the CPU backend
 * (polyak_math.h).
 */
#include "launch.h"
#include "polyak_plan.h"

struct polyak_init_shadows {
  void *arena[POLYAK_MAX_SHADOWS];
};

/* Kernel arguments that loops index by shadow go to shared memory first,
 * each entry by a constant index: indexed by a variable in the argument
 * itself, the whole array would be copied to the stack (a local-memory
 * frame) in every thread. */
template <typename T> static __device__ void polyak_share(const T (&from)[POLYAK_MAX_SHADOWS], T *to)
{
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < POLYAK_MAX_SHADOWS; k++)
      to[k] = from[k];
  }
  __syncthreads();
}

__global__ void __launch_bounds__(POLYAK_BLOCK_THREADS)
    polyak_init_kernel(const polyak_tensor_desc *descs, const polyak_chunk *chunks, int64_t num_chunks,
                       polyak_init_shadows shadows, int first_shadow, int num_shadows, int shadow_dtype,
                       unsigned long long *nonfinite, unsigned long long *first_nonfinite)
{
  __shared__ void *arena[POLYAK_MAX_SHADOWS];
  polyak_share(shadows.arena, arena);
  unsigned long long count = 0;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const polyak_chunk chunk = chunks[c];
    const polyak_tensor_desc t = descs[chunk.tensor];
    for (int64_t i = chunk.first_elem + threadIdx.x; i < chunk.first_elem + chunk.num_elems; i += blockDim.x) {
      float value = polyak_load_f32(t.param, i, t.param_dtype);
      if (!polyak_is_finite(value) && nonfinite) {
        count++;
        atomicMin(first_nonfinite, (unsigned long long)(t.global_offset_elems + i));
      }
      for (int k = first_shadow; k < first_shadow + num_shadows; k++)
        polyak_shadow_store(&t, arena[k], shadow_dtype, k, i, value);
    }
  }
  if (count)
    atomicAdd(nonfinite, count);
}

extern "C" cudaError_t polyak_launch_init(const polyak_tensor_desc *descs, const polyak_chunk *chunks,
                                          int64_t num_chunks, void *const *shadows, int first_shadow, int num_shadows,
                                          int shadow_dtype, unsigned long long *nonfinite,
                                          unsigned long long *first_nonfinite, int grid, cudaStream_t stream)
{
  polyak_init_shadows arenas = {};
  for (int k = first_shadow; k < first_shadow + num_shadows; k++)
    arenas.arena[k] = shadows[k];
  void *params[] = {&descs,       &chunks,       &num_chunks, &arenas,         &first_shadow,
                    &num_shadows, &shadow_dtype, &nonfinite,  &first_nonfinite};
  return cudaLaunchKernel((void *)polyak_init_kernel, dim3(grid), dim3(POLYAK_BLOCK_THREADS), params, 0, stream);
}

__global__ void __launch_bounds__(POLYAK_BLOCK_THREADS)
    polyak_readout_kernel(const void *shadow, int shadow_dtype, int64_t num_elems, double debias_scale, void *dst,
                          int dst_dtype)
{
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < num_elems; i += stride)
    polyak_store_f32(dst, i, polyak_debias(polyak_load_f32(shadow, i, shadow_dtype), debias_scale), dst_dtype);
}

extern "C" cudaError_t polyak_launch_readout(const void *shadow, int shadow_dtype, int64_t num_elems,
                                             double debias_scale, void *dst, int dst_dtype, int grid,
                                             cudaStream_t stream)
{
  void *params[] = {&shadow, &shadow_dtype, &num_elems, &debias_scale, &dst, &dst_dtype};
  return cudaLaunchKernel((void *)polyak_readout_kernel, dim3(grid), dim3(POLYAK_BLOCK_THREADS), params, 0, stream);
}

__global__ void __launch_bounds__(POLYAK_BLOCK_THREADS)
    polyak_copy_to_params_kernel(const polyak_tensor_desc *descs, const polyak_chunk *chunks, int64_t num_chunks,
                                 const void *arena, int k, int shadow_dtype, double debias_scale)
{
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const polyak_chunk chunk = chunks[c];
    const polyak_tensor_desc t = descs[chunk.tensor];
    for (int64_t i = chunk.first_elem + threadIdx.x; i < chunk.first_elem + chunk.num_elems; i += blockDim.x) {
      float value = polyak_shadow_load(&t, arena, shadow_dtype, k, i);
      polyak_store_f32(t.param, i, polyak_debias(value, debias_scale), t.param_dtype);
    }
  }
}

extern "C" cudaError_t polyak_launch_copy_to_params(const polyak_tensor_desc *descs, const polyak_chunk *chunks,
                                                    int64_t num_chunks, const void *arena, int k, int shadow_dtype,
                                                    double debias_scale, int grid, cudaStream_t stream)
{
  void *params[] = {&descs, &chunks, &num_chunks, &arena, &k, &shadow_dtype, &debias_scale};
  return cudaLaunchKernel((void *)polyak_copy_to_params_kernel, dim3(grid), dim3(POLYAK_BLOCK_THREADS), params, 0,
                          stream);
}

__global__ void __launch_bounds__(POLYAK_BLOCK_THREADS)
    polyak_store_kernel(const polyak_tensor_desc *descs, const polyak_chunk *chunks, int64_t num_chunks, char *store,
                        int to_store)
{
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const polyak_chunk chunk = chunks[c];
    const polyak_tensor_desc t = descs[chunk.tensor];
    char *param = static_cast<char *>(t.param);
    char *kept = store + t.store_offset_bytes;
    for (int64_t i = chunk.first_elem + threadIdx.x; i < chunk.first_elem + chunk.num_elems; i += blockDim.x) {
      if (t.param_dtype == POLYAK_F32) {
        float *from = reinterpret_cast<float *>(to_store ? param : kept) + i;
        float *to = reinterpret_cast<float *>(to_store ? kept : param) + i;
        *to = *from;
      } else {
        uint16_t *from = reinterpret_cast<uint16_t *>(to_store ? param : kept) + i;
        uint16_t *to = reinterpret_cast<uint16_t *>(to_store ? kept : param) + i;
        *to = *from;
      }
    }
  }
}

extern "C" cudaError_t polyak_launch_store(const polyak_tensor_desc *descs, const polyak_chunk *chunks,
                                           int64_t num_chunks, void *store, int to_store, int grid, cudaStream_t stream)
{
  char *bytes = static_cast<char *>(store);
  void *params[] = {&descs, &chunks, &num_chunks, &bytes, &to_store};
  return cudaLaunchKernel((void *)polyak_store_kernel, dim3(grid), dim3(POLYAK_BLOCK_THREADS), params, 0, stream);
}

/* A blend's arenas and coefficients, in shared memory (polyak_share). */
struct polyak_shared_blend {
  const void *arenas[POLYAK_MAX_SHADOWS];
  float coefficient[POLYAK_MAX_SHADOWS];
};

static __device__ void polyak_share_blend(const polyak_blend_args &a, polyak_shared_blend *to)
{
  polyak_share(a.arenas, to->arenas);
  polyak_share(a.coefficient, to->coefficient);
}

static __device__ float polyak_blend_at(const polyak_shared_blend &b, int num_shadows, int shadow_dtype,
                                        const polyak_tensor_desc *t, int64_t i)
{
  float acc = 0.0f;
  for (int k = 0; k < num_shadows; k++)
    if (b.coefficient[k] != 0.0f)
      acc = polyak_blend_step(acc, b.coefficient[k], polyak_shadow_load(t, b.arenas[k], shadow_dtype, k, i));
  return acc;
}

__global__ void __launch_bounds__(POLYAK_BLOCK_THREADS)
    polyak_blend_to_params_kernel(const polyak_blend_args a, const polyak_tensor_desc *descs,
                                  const polyak_chunk *chunks, int64_t num_chunks)
{
  __shared__ polyak_shared_blend b;
  polyak_share_blend(a, &b);
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const polyak_chunk chunk = chunks[c];
    const polyak_tensor_desc t = descs[chunk.tensor];
    for (int64_t i = chunk.first_elem + threadIdx.x; i < chunk.first_elem + chunk.num_elems; i += blockDim.x)
      polyak_store_f32(t.param, i, polyak_blend_at(b, a.num_shadows, a.shadow_dtype, &t, i), t.param_dtype);
  }
}

extern "C" cudaError_t polyak_launch_blend_to_params(const polyak_blend_args *args, const polyak_tensor_desc *descs,
                                                     const polyak_chunk *chunks, int64_t num_chunks, int grid,
                                                     cudaStream_t stream)
{
  void *params[] = {(void *)args, &descs, &chunks, &num_chunks};
  return cudaLaunchKernel((void *)polyak_blend_to_params_kernel, dim3(grid), dim3(POLYAK_BLOCK_THREADS), params, 0,
                          stream);
}

__global__ void __launch_bounds__(POLYAK_BLOCK_THREADS)
    polyak_blend_kernel(const polyak_blend_args a, const polyak_tensor_desc t, void *dst, int dst_dtype)
{
  __shared__ polyak_shared_blend b;
  polyak_share_blend(a, &b);
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < t.num_elems; i += stride)
    polyak_store_f32(dst, i, polyak_blend_at(b, a.num_shadows, a.shadow_dtype, &t, i), dst_dtype);
}

extern "C" cudaError_t polyak_launch_blend(const polyak_blend_args *args, const polyak_tensor_desc *t, void *dst,
                                           int dst_dtype, int grid, cudaStream_t stream)
{
  void *params[] = {(void *)args, (void *)t, &dst, &dst_dtype};
  return cudaLaunchKernel((void *)polyak_blend_kernel, dim3(grid), dim3(POLYAK_BLOCK_THREADS), params, 0, stream);
}
