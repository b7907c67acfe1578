/*
 * layerwise.cu: LAWA's betas, one launch before the update: every block
 * sums the squares of its chunks' gradients, and the last block to finish
 * turns those sums into per-tensor norms, their total and the betas, all
 * in the order layerwise.h fixes (the CPU backend follows it too).
 */
#include "launch.h"
#include "launch_counter.h"
#include "layerwise.h"

__global__ void __launch_bounds__(POLYAK_LAYER_THREADS) polyak_layer_kernel(const polyak_layer_args a)
{
  __shared__ float part[POLYAK_LAYER_THREADS];
  __shared__ double total_part[POLYAK_LAYER_THREADS];
  __shared__ double total;
  __shared__ int last;
  /* a replay past the reservation computes nothing, as its update will
   * change nothing; its blocks still count themselves, so that the counter
   * wraps with every launch */
  const int dropped = a.graph && a.graph->consumed >= a.graph->num_steps;
  const float *norms = a.graph ? a.graph->layer_norms : a.norms;
  void *const *grads = norms || dropped ? NULL : a.grads;
  for (int64_t c = blockIdx.x; c < a.num_chunks && grads; c += gridDim.x) {
    const polyak_chunk chunk = a.chunks[c];
    part[threadIdx.x] =
        polyak_chunk_sumsq_part(grads[chunk.tensor], a.descs[chunk.tensor].param_dtype, &chunk, threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0)
      a.chunk_sumsq[c] = polyak_sum_parts_f32(part);
    __syncthreads();
  }
  /* the last block to get here sees every chunk's sum */
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0)
    last = polyak_block_is_last(a.blocks_done, gridDim.x) && !dropped;
  __syncthreads();
  if (!last)
    return;
  __threadfence();
  double mine = 0.0;
  for (int64_t l = threadIdx.x; l < a.num_tensors; l += POLYAK_LAYER_THREADS) {
    double norm = polyak_layer_norm(&a.descs[l], norms, l, a.chunk_sumsq, a.tensor_chunks[l], a.tensor_chunks[l + 1]);
    a.layer_norm[l] = norm;
    mine += polyak_norm_term(norm);
  }
  total_part[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0)
    total = polyak_sum_parts_f64(total_part);
  __syncthreads();
  for (int64_t l = threadIdx.x; l < a.num_tensors; l += POLYAK_LAYER_THREADS)
    polyak_layer_betas(a.layer_norm[l], total, a.beta0, a.num_shadows, a.layer_beta + l * POLYAK_MAX_SHADOWS);
}

extern "C" cudaError_t polyak_launch_layer_betas(const polyak_layer_args *args, int grid, cudaStream_t stream)
{
  void *params[] = {(void *)args};
  return cudaLaunchKernel((void *)polyak_layer_kernel, dim3(grid), dim3(POLYAK_LAYER_THREADS), params, 0, stream);
}
