/* bench_cpu.c: the CPU backend against the machine's memory bandwidth,
 * measured in the same run by a triad loop (a = b + s*c: two reads and a
 * write per element, like an update's param read and shadow read+write),
 * both on one thread. */
#include <stdlib.h>
#include <string.h>

#include "bench_sections.h"

static size_t align_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

size_t bench_params_bytes(const bench_list *list, polyak_dtype dtype)
{
  size_t total = 0;
  for (int i = 0; i < list->num_tensors; i++)
    total += align_up((size_t)list->tensors[i].num_elems * bench_dtype_bytes(dtype), 256);
  return total;
}

polyak_status bench_register(polyak_t *p, const bench_list *list, char *params, polyak_dtype dtype)
{
  size_t offset = 0;
  for (int i = 0; i < list->num_tensors; i++) {
    const bench_tensor *t = &list->tensors[i];
    polyak_status status = polyak_add(p, t->name, params + offset, dtype, t->ndim, t->shape);
    if (status != POLYAK_OK)
      return status;
    offset += align_up((size_t)t->num_elems * bench_dtype_bytes(dtype), 256);
  }
  return POLYAK_OK;
}

/* Non-zero values around 1, different per element. */
static void fill_host(char *params, size_t num_bytes, polyak_dtype dtype)
{
  uint64_t state = 12345;
  size_t count = num_bytes / bench_dtype_bytes(dtype);
  for (size_t i = 0; i < count; i++) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    float value = 0.5f + (float)(state >> 40) * (1.0f / 16777216.0f);
    if (dtype == POLYAK_F32) {
      ((float *)params)[i] = value;
    } else {
      uint32_t bits;
      memcpy(&bits, &value, 4);
      ((uint16_t *)params)[i] = (uint16_t)(bits >> 16);
    }
  }
}

/* Median seconds of a triad over n floats. */
static double triad_seconds(int64_t n, int iters)
{
  float *a = aligned_alloc(64, (size_t)n * 4), *b = aligned_alloc(64, (size_t)n * 4),
        *c = aligned_alloc(64, (size_t)n * 4);
  double *times = malloc(sizeof(double) * (size_t)iters);
  for (int64_t i = 0; i < n; i++) {
    b[i] = 1.0f + (float)(i % 7);
    c[i] = 2.0f + (float)(i % 5);
    a[i] = 0.0f;
  }
  for (int it = -2; it < iters; it++) {
    double start = bench_seconds();
    for (int64_t i = 0; i < n; i++)
      a[i] = b[i] + 0.5f * c[i];
    if (it >= 0)
      times[it] = bench_seconds() - start;
  }
  volatile float sink = a[n / 3];
  (void)sink;
  double median = bench_median(times, iters);
  free(a);
  free(b);
  free(c);
  free(times);
  return median;
}

/* One row: `rounding` for every shadow (f32 shadows; bf16 ones always
 * round stochastically). */
static int measure(bench_output *out, const bench_list *list, polyak_dtype param_dtype,
                   polyak_dtype shadow_dtype, int num_shadows, int rounding, int iters, double triad_gbps)
{
  size_t params_bytes = bench_params_bytes(list, param_dtype);
  char *params = aligned_alloc(256, params_bytes);
  if (!params)
    return -1;
  fill_host(params, params_bytes, param_dtype);
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = num_shadows;
  cfg.shadow_dtype = shadow_dtype;
  for (int k = 0; k < num_shadows; k++)
    cfg.rounding[k] = rounding;
  polyak_t *p = NULL;
  double *times = malloc(sizeof(double) * (size_t)iters);
  int failed = polyak_create(&p, &cfg) != POLYAK_OK || bench_register(p, list, params, param_dtype) ||
               polyak_finalize(p, NULL) != POLYAK_OK;
  for (int it = -2; it < iters && !failed; it++) {
    double start = bench_seconds();
    failed = polyak_update(p, it + 3, NULL) != POLYAK_OK;
    if (it >= 0)
      times[it] = bench_seconds() - start;
  }
  if (failed) {
    fprintf(stderr, "bench: %s: %s\n", list->name, polyak_last_error(p));
  } else {
    double seconds = bench_median(times, iters);
    double gbps = bench_required_bytes(list->num_elems, param_dtype, shadow_dtype, num_shadows) / seconds / 1e9;
    bench_record r = {list->name, bench_dtype_name(param_dtype), bench_dtype_name(shadow_dtype), num_shadows,
                      rounding == POLYAK_ROUND_STOCHASTIC ? "polyak_cpu_round_stochastic" : "polyak_cpu",
                      1e3 * seconds, gbps, gbps / triad_gbps};
    bench_emit(out, &r);
  }
  polyak_destroy(p);
  free(times);
  free(params);
  return failed ? -1 : 0;
}

int bench_cpu(const bench_options *options)
{
  char name[128];
  bench_cpu_name(name, sizeof name);
  bench_output out;
  if (bench_output_open(&out, name, options->out_dir) != 0)
    return -1;
  printf("\nCPU backend on %s (one thread), date %s, commit %s\n", name, out.date, out.commit);
  const int64_t triad_elems = (int64_t)1 << 25; /* 3 x 128 MiB: far beyond the caches */
  double triad_gbps = 12.0 * (double)triad_elems / triad_seconds(triad_elems, options->iters) / 1e9;
  bench_table_header("of copy = of the triad loop's bandwidth");
  bench_record triad = {"triad", "f32", "f32", 1, "cpu_triad", 0.0, triad_gbps, 1.0};
  triad.ms_median = 12.0 * (double)triad_elems / triad_gbps / 1e6;
  bench_emit(&out, &triad);
  int failed = 0;
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16};
  for (int l = 0; l < options->num_lists && !failed; l++) {
    bench_list list;
    if (bench_list_load(&list, options->lists[l], options->models_dir) != 0) {
      failed = 1;
      break;
    }
    for (int pd = 0; pd < 2 && !failed; pd++)
      for (int sd = 0; sd < 2 && !failed; sd++)
        for (int num_shadows = 1; num_shadows <= 4 && !failed; num_shadows += 3) {
          failed = measure(&out, &list, dtypes[pd], dtypes[sd], num_shadows, POLYAK_ROUND_NEAREST, options->iters,
                           triad_gbps) != 0;
          if (!failed && dtypes[sd] == POLYAK_F32) /* the same f32 shadows rounded stochastically, next */
            failed = measure(&out, &list, dtypes[pd], dtypes[sd], num_shadows, POLYAK_ROUND_STOCHASTIC,
                             options->iters, triad_gbps) != 0;
        }
    bench_list_free(&list);
  }
  bench_output_close(&out);
  return failed ? -1 : 0;
}
