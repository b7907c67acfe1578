/* bench_sections.h: the benchmark's sections, each printing a table and
 * emitting one record per measurement. */
#ifndef POLYAK_BENCH_SECTIONS_H
#define POLYAK_BENCH_SECTIONS_H

#include "bench_util.h"
#include "model_list.h"

typedef struct {
  const char *models_dir;
  const char *out_dir; /* NULL: no results file */
  const char **lists;
  int num_lists;
  int iters;              /* timed updates per measurement */
  const int *cpu_threads; /* the CPU section's thread counts, each 1..64 */
  int num_cpu_threads;
} bench_options;

/* The CPU backend against the same run's in-place loop, at each thread count. */
int bench_cpu(const bench_options *options);

/* The CPU reference: shadow = isfinite(param) ? fmaf(weight, param - shadow,
 * shadow) : shadow, in place (inplace_loop.c). */
void bench_inplace_loop(float *restrict shadow, const float *restrict param, int64_t num_elems, float weight);

/* polyak's CUDA update against cudaMemcpy bandwidth and the baselines;
 * without a usable device it says why and returns 0 (main refuses
 * --gpu-only there). */
int bench_gpu(const bench_options *options);

/* Registers every tensor of `list` on `p`, params packed in `params`
 * (each tensor 256-byte aligned, as framework allocators place them). */
polyak_status bench_register(polyak_t *p, const bench_list *list, char *params, polyak_dtype dtype);
size_t bench_params_bytes(const bench_list *list, polyak_dtype dtype);

#endif /* POLYAK_BENCH_SECTIONS_H */
