/*
 * launch_counter.h: how a block learns that it is the last of its launch to
 * finish (graph mode's reservation and LAWA's betas advance there), and how
 * that block counts its launch. Host+device: the CPU tests run them from
 * threads that stand in for the blocks of overlapping launches.
 *
 * The counter wraps atomically, as atomicInc(counter, num_blocks - 1) does:
 * each arrival returns the count before it and the arrival that finds
 * num_blocks - 1 stores 0, so one arrival in every num_blocks is the last
 * and no plain store ever resets the counter under another launch's blocks.
 * Every launch of a handle has the same grid, so however launches
 * interleave each yields one last block and the counts it advances add up
 * to the number of launches. Which step overlapping launches apply is
 * another matter: launches of one handle must not overlap (docs/cuda-graphs.md).
 */
#ifndef POLYAK_LAUNCH_COUNTER_H
#define POLYAK_LAUNCH_COUNTER_H

#include <stdint.h>

#include "polyak_math.h"

/* Counts one block of a launch of num_blocks into *counter; 1 for the
 * block that completes a launch's count (the counter is then back at 0). */
POLYAK_HD int polyak_block_is_last(uint32_t *counter, uint32_t num_blocks)
{
#if defined(__CUDA_ARCH__)
  return atomicInc(counter, num_blocks - 1) == num_blocks - 1;
#else
  uint32_t seen = __atomic_load_n(counter, __ATOMIC_RELAXED), next;
  do
    next = seen >= num_blocks - 1 ? 0 : seen + 1;
  while (!__atomic_compare_exchange_n(counter, &seen, next, 1, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
  return seen == num_blocks - 1;
#endif
}

/* *count += 1, atomically: a last block counting its launch as consumed or
 * dropped (two launches' last blocks may do so at once). */
POLYAK_HD void polyak_count_launch(int64_t *count)
{
#if defined(__CUDA_ARCH__)
  atomicAdd((unsigned long long *)count, 1ull);
#else
  __atomic_fetch_add(count, 1, __ATOMIC_RELAXED);
#endif
}

#endif /* POLYAK_LAUNCH_COUNTER_H */
