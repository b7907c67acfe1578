/*
 * update.cu: the fused update. One launch updates every shadow of every
 * registered tensor, whatever their count and dtypes: blocks walk the
 * plan's chunks grid-stride, and each thread runs its share of a chunk
 * (update_chunk.h). The step's weights come by value, or in graph mode
 * from the steps reserved on the device, so a captured launch applies the
 * right step at every replay.
 */
#include "launch.h"
#include "launch_counter.h"
#include "layerwise.h"
#include "update_chunk.h"

/* What this launch applies, resolved once per block into shared memory,
 * where the shadow loop indexes it. */
struct polyak_resolved_step {
  polyak_update_args args;
  void *shadows[POLYAK_MAX_SHADOWS];
  int dropped; /* graph mode: no reserved step left */
};

/* Thread 0 of each block: the direct step, or the next reserved one. Every
 * block reads `consumed` before it counts itself done (see below), so all
 * blocks of a launch see the same step. */
static __device__ void polyak_resolve_step(const polyak_update_kernel_args &a, polyak_resolved_step *out)
{
  out->args = a.step;
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++)
    out->shadows[k] = a.shadows[k];
  out->dropped = 0;
  if (!a.graph)
    return;
  volatile polyak_graph_state *graph = a.graph;
  int64_t row = graph->consumed;
  if (row >= graph->num_steps) {
    out->dropped = 1;
    return;
  }
  out->args.step = graph->first_step + row;
  out->args.gap = row == 0 ? graph->first_gap : 1;
  for (int k = 0; k < out->args.num_shadows; k++) {
    out->args.weight[k] = graph->weights[row * out->args.num_shadows + k];
    out->args.sr_key[k] = polyak_sr_key(a.seed, out->args.step, k);
  }
  polyak_resolve_lookahead(&out->args, a.lookahead_every);
}

/* Grad-norm shadows: every block derives their weights from the norm the
 * same way; block 0 alone multiplies their products. */
static __device__ void polyak_resolve_grad_norm(const polyak_update_kernel_args &a, polyak_resolved_step *out)
{
  const float *grad_norm = a.graph ? a.graph->grad_norm : a.grad_norm;
  if (!grad_norm || out->dropped)
    return;
  polyak_apply_grad_norm(&out->args, a.grad_norm_c, *grad_norm, blockIdx.x == 0 ? a.products : NULL);
}

/* Graph mode: the last block to finish advances the reservation; the
 * counter wraps by itself (launch_counter.h). */
static __device__ void polyak_finish_step(const polyak_update_kernel_args &a, int dropped)
{
  __threadfence();
  if (polyak_block_is_last(&a.graph->blocks_done, gridDim.x)) {
    __threadfence(); /* every block's read of `consumed` happened before */
    polyak_count_launch(dropped ? &a.graph->dropped : &a.graph->consumed);
    __threadfence();
  }
}

/* A copy-only tensor's piece into its mirror: 16 bytes a thread where the
 * param is 16-byte aligned (the mirror always is), else bytes. */
static __device__ void polyak_copy_chunk_block(const polyak_copy_chunk &c, char *copies)
{
  const char *src = static_cast<const char *>(c.param);
  char *dst = copies + c.mirror_offset_bytes;
  int64_t words = reinterpret_cast<uintptr_t>(src) % 16 == 0 ? c.num_bytes / 16 : 0;
  for (int64_t w = threadIdx.x; w < words; w += POLYAK_BLOCK_THREADS)
    __stcg(reinterpret_cast<uint4 *>(dst) + w, __ldg(reinterpret_cast<const uint4 *>(src) + w));
  for (int64_t b = 16 * words + threadIdx.x; b < c.num_bytes; b += POLYAK_BLOCK_THREADS)
    dst[b] = src[b];
}

static __device__ int64_t polyak_block_sum(int64_t value)
{
  __shared__ int64_t warp_sums[POLYAK_BLOCK_THREADS / 32];
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
  if (threadIdx.x % 32 == 0)
    warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  int64_t total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < POLYAK_BLOCK_THREADS / 32; w++)
      total += warp_sums[w];
  return total; /* valid in thread 0 */
}

/* At least 4 blocks of 256 threads per SM (half the threads a Hopper SM
 * holds): up to 64 registers a thread. Left to itself ptxas picked 40 and
 * spilled. f32 shadows that round stochastically (SR_F32) have a kernel of
 * their own: the double arithmetic of 8 elements at once needs about 72
 * registers (64 spilled on sm_80), so 3 blocks; the common kernels keep 4. */
template <int SHADOW_DTYPE, bool SR_F32>
__global__ void __launch_bounds__(POLYAK_BLOCK_THREADS, SR_F32 ? 3 : 4)
    polyak_update_kernel(const polyak_update_kernel_args a)
{
  __shared__ polyak_resolved_step step;
  if (threadIdx.x == 0) {
    polyak_resolve_step(a, &step);
    polyak_resolve_grad_norm(a, &step);
  }
  __syncthreads();

  int64_t nonfinite = 0;
  if (!step.dropped) {
    for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
      const polyak_chunk chunk = a.chunks[c];
      const polyak_tensor_desc t = a.descs[chunk.tensor];
      if (a.layer_beta) { /* uniform across the launch: the block syncs around the write */
        __syncthreads();
        if (threadIdx.x == 0)
          polyak_resolve_layerwise(&step.args, a.layer_beta0,
                                   a.layer_beta + (int64_t)chunk.tensor * POLYAK_MAX_SHADOWS);
        __syncthreads();
      }
      nonfinite += polyak_update_chunk<SHADOW_DTYPE, SR_F32>(t, chunk, step.shadows, step.args, threadIdx.x,
                                                             POLYAK_BLOCK_THREADS);
    }
    for (int64_t c = blockIdx.x; c < a.num_copy_chunks; c += gridDim.x)
      polyak_copy_chunk_block(a.copy_chunks[c], static_cast<char *>(a.copies));
  }
  int64_t block_nonfinite = polyak_block_sum(nonfinite);
  if (threadIdx.x == 0) {
    if (block_nonfinite > 0)
      atomicAdd(a.nonfinite_count, (unsigned long long)block_nonfinite);
    if (a.graph)
      polyak_finish_step(a, step.dropped);
  }
}

/* The kernel for shadows of `shadow_dtype` where the f32 ones round
 * stochastically (stochastic_f32 != 0) or not. */
static void *polyak_update_kernel_for(int shadow_dtype, uint32_t stochastic_f32)
{
  if (shadow_dtype != POLYAK_F32)
    return (void *)polyak_update_kernel<POLYAK_BF16, false>;
  return stochastic_f32 ? (void *)polyak_update_kernel<POLYAK_F32, true>
                        : (void *)polyak_update_kernel<POLYAK_F32, false>;
}

/* cudaLaunchKernel returns this launch's status alone; cudaGetLastError
 * after <<<>>> would also return (and clear) an unrelated earlier error. */
extern "C" cudaError_t polyak_launch_update(const polyak_update_kernel_args *args, int grid, cudaStream_t stream)
{
  void *kernel = polyak_update_kernel_for(args->shadow_dtype, args->step.stochastic_f32);
  void *params[] = {(void *)args};
  return cudaLaunchKernel(kernel, dim3(grid), dim3(POLYAK_BLOCK_THREADS), params, 0, stream);
}

extern "C" cudaError_t polyak_update_grid_limit(int device, int shadow_dtype, uint32_t stochastic_f32, int *grid)
{
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, polyak_update_kernel_for(shadow_dtype, stochastic_f32),
                                                        POLYAK_BLOCK_THREADS, 0);
  *grid = sms * (per_sm > 0 ? per_sm : 1);
  return err;
}
