/* bench_gpu_kernels.cu: helpers for the GPU benchmark: random non-zero
 * params, and the bf16 -> f32 cast a hand-written cuBLAS EMA needs. */
#include <cuda_runtime.h>
#include <stdint.h>

#include "polyak_math.h"

__global__ void bench_fill_kernel(void *data, size_t count, int bf16, uint64_t seed)
{
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = polyak_mix32((uint32_t)i ^ polyak_mix32((uint32_t)(i >> 32) + (uint32_t)seed));
    float value = 0.5f + (float)(h >> 8) * (1.0f / 16777216.0f); /* in [0.5, 1.5) */
    if (bf16)
      static_cast<uint16_t *>(data)[i] = polyak_f32_to_bf16_rne(value);
    else
      static_cast<float *>(data)[i] = value;
  }
}

__global__ void bench_cast_kernel(const uint16_t *from, float *to, size_t count)
{
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
    to[i] = polyak_bf16_to_f32(from[i]);
}

extern "C" cudaError_t bench_fill(void *data, size_t count, int bf16, uint64_t seed)
{
  bench_fill_kernel<<<4096, 256>>>(data, count, bf16, seed);
  return cudaGetLastError();
}

extern "C" cudaError_t bench_cast_bf16(const uint16_t *from, float *to, size_t count, cudaStream_t stream)
{
  size_t blocks = (count + 255) / 256;
  unsigned grid = blocks < 4096 ? (unsigned)blocks : 4096u;
  bench_cast_kernel<<<grid, 256, 0, stream>>>(from, to, count);
  return cudaGetLastError();
}
