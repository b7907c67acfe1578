/* bench_cpu.c: the CPU backend against the in-place guarded loop
 * (inplace_loop.c) over as many elements as the list has, in the same run
 * and on as many threads: the loop sets what this machine's memory allows,
 * so "of loop" (its time over a row's) is the row's element rate as a
 * fraction of it. Rows: each param and shadow dtype, K = 1 and 4, f32
 * shadows rounded to nearest and stochastically, and K = 4 as four
 * one-shadow handles updated in turn; then the targets, computed from them. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bench_sections.h"

#define WARMUP 2

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

/* ---- the in-place loop on `threads` threads ------------------------------------ */

/* The caller and threads - 1 workers, started once and released per timed
 * run by a barrier, each on a contiguous slice. */
typedef struct {
  float *shadow;
  const float *param;
  int64_t num_elems;
  int threads, stop;
  pthread_barrier_t start, done;
} loop_team;

typedef struct {
  loop_team *team;
  int index;
} loop_worker;

static void run_slice(const loop_team *team, int index)
{
  int64_t first = team->num_elems * index / team->threads / 16 * 16;
  int64_t end = index + 1 == team->threads ? team->num_elems : team->num_elems * (index + 1) / team->threads / 16 * 16;
  bench_inplace_loop(team->shadow + first, team->param + first, end - first, 0.001f);
}

static void *loop_worker_main(void *arg)
{
  const loop_worker *w = arg;
  for (;;) {
    pthread_barrier_wait(&w->team->start);
    if (w->team->stop)
      return NULL;
    run_slice(w->team, w->index);
    pthread_barrier_wait(&w->team->done);
  }
}

/* Median seconds of the loop over num_elems elements. */
static double loop_seconds(int64_t num_elems, int threads, int iters)
{
  loop_team team = {.shadow = aligned_alloc(64, align_up((size_t)num_elems * 4, 64)), .num_elems = num_elems,
                    .threads = threads};
  float *param = aligned_alloc(64, align_up((size_t)num_elems * 4, 64));
  double *times = malloc(sizeof(double) * (size_t)iters);
  fill_host((char *)param, (size_t)num_elems * 4, POLYAK_F32);
  memcpy(team.shadow, param, (size_t)num_elems * 4);
  team.param = param;
  pthread_barrier_init(&team.start, NULL, (unsigned)threads);
  pthread_barrier_init(&team.done, NULL, (unsigned)threads);
  pthread_t ids[64];
  loop_worker workers[64];
  for (int t = 1; t < threads; t++) {
    workers[t] = (loop_worker){&team, t};
    pthread_create(&ids[t], NULL, loop_worker_main, &workers[t]);
  }
  for (int it = -WARMUP; it < iters; it++) {
    double start = bench_seconds();
    if (threads > 1)
      pthread_barrier_wait(&team.start);
    run_slice(&team, 0);
    if (threads > 1)
      pthread_barrier_wait(&team.done);
    if (it >= 0)
      times[it] = bench_seconds() - start;
  }
  team.stop = 1;
  if (threads > 1)
    pthread_barrier_wait(&team.start);
  for (int t = 1; t < threads; t++)
    pthread_join(ids[t], NULL);
  pthread_barrier_destroy(&team.start);
  pthread_barrier_destroy(&team.done);
  double median = bench_median(times, iters);
  free(team.shadow);
  free(param);
  free(times);
  return median;
}

/* ---- polyak's rows -------------------------------------------------------------- */

typedef struct {
  bench_output *out;
  const bench_list *list;
  char *params[3]; /* by param dtype */
  int threads, iters;
  double loop_ms;
} cpu_run;

/* One row: K shadows of `shadow_dtype` rounded by `rounding` (bf16 ones
 * always round stochastically), in one handle or (separate) K handles of
 * one shadow updated in turn. Returns the median ms, or -1. */
static double measure(const cpu_run *run, polyak_dtype param_dtype, polyak_dtype shadow_dtype, int num_shadows,
                      int rounding, int separate)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = separate ? 1 : num_shadows;
  cfg.shadow_dtype = shadow_dtype;
  cfg.cpu_threads = run->threads;
  for (int k = 0; k < num_shadows; k++)
    cfg.rounding[k] = rounding;
  polyak_t *handles[POLYAK_MAX_SHADOWS] = {0};
  int count = separate ? num_shadows : 1, failed = 0, culprit = 0;
  double *times = malloc(sizeof(double) * (size_t)run->iters);
  for (int h = 0; h < count && !failed; h++) {
    culprit = h;
    failed = polyak_create(&handles[h], &cfg) != POLYAK_OK ||
             bench_register(handles[h], run->list, run->params[param_dtype], param_dtype) != POLYAK_OK ||
             polyak_finalize(handles[h], NULL) != POLYAK_OK;
  }
  for (int it = -WARMUP; it < run->iters && !failed; it++) {
    double start = bench_seconds();
    for (int h = 0; h < count && !failed; h++) {
      culprit = h;
      failed = polyak_update(handles[h], it + WARMUP + 1, NULL) != POLYAK_OK;
    }
    if (it >= 0)
      times[it] = bench_seconds() - start;
  }
  double ms = -1.0;
  if (failed) {
    fprintf(stderr, "bench: %s: %s\n", run->list->name, polyak_last_error(handles[culprit]));
  } else {
    ms = 1e3 * bench_median(times, run->iters);
    double gbps = bench_required_bytes(run->list->num_elems, param_dtype, shadow_dtype, num_shadows) / ms / 1e6;
    double loop_gbps = 12.0 * (double)run->list->num_elems / run->loop_ms / 1e6;
    const char *impl = separate                              ? "polyak_cpu_separate_passes"
                       : rounding == POLYAK_ROUND_STOCHASTIC ? "polyak_cpu_round_stochastic"
                                                             : "polyak_cpu";
    bench_record r = {run->list->name, bench_dtype_name(param_dtype), bench_dtype_name(shadow_dtype), num_shadows,
                      impl, ms, gbps, gbps / loop_gbps, run->threads, run->loop_ms / ms};
    bench_emit(run->out, &r);
  }
  for (int h = 0; h < count; h++)
    polyak_destroy(handles[h]);
  free(times);
  return ms;
}

/* Medians of one list at one thread count, for the targets. */
typedef struct {
  double loop, f32_k1, f32_k4, f32_separate, bf16_sr_k1;
} cpu_times;

static int run_threads(cpu_run *run, cpu_times *t)
{
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16};
  run->loop_ms = 1e3 * loop_seconds(run->list->num_elems, run->threads, run->iters);
  t->loop = run->loop_ms;
  double loop_gbps = 12.0 * (double)run->list->num_elems / run->loop_ms / 1e6;
  bench_record loop = {run->list->name, "f32", "f32", 1, "inplace_loop", run->loop_ms, loop_gbps, 1.0, run->threads,
                       1.0};
  bench_emit(run->out, &loop);
  for (int pd = 0; pd < 2; pd++)
    for (int sd = 0; sd < 2; sd++)
      for (int num_shadows = 1; num_shadows <= 4; num_shadows += 3) {
        double ms = measure(run, dtypes[pd], dtypes[sd], num_shadows, POLYAK_ROUND_NEAREST, 0);
        if (ms < 0)
          return -1;
        if (pd == 0 && sd == 0)
          *(num_shadows == 1 ? &t->f32_k1 : &t->f32_k4) = ms;
        if (pd == 0 && sd == 1 && num_shadows == 1)
          t->bf16_sr_k1 = ms;
        int stochastic = dtypes[sd] == POLYAK_F32; /* the same f32 shadows rounded stochastically, next */
        if (stochastic && measure(run, dtypes[pd], dtypes[sd], num_shadows, POLYAK_ROUND_STOCHASTIC, 0) < 0)
          return -1;
        if (dtypes[sd] == POLYAK_F32 && num_shadows == 4) {
          ms = measure(run, dtypes[pd], dtypes[sd], num_shadows, POLYAK_ROUND_NEAREST, 1);
          if (ms < 0)
            return -1;
          if (pd == 0)
            t->f32_separate = ms;
        }
      }
  return 0;
}

/* The targets from one list's medians; times[i] at threads[i]. */
static void print_targets(const char *list, const cpu_times *times, const int *threads, int num_counts)
{
  for (int i = 0; i < num_counts; i++) {
    const cpu_times *t = &times[i];
    printf("targets %s, %d thread%s: f32 K=1 %.2f of the loop (0.9); K=4 %.2fx four K=1 passes (1.5; bytes allow "
           "1.33); bf16 shadows %.2f of the loop's element rate (0.7)\n",
           list, threads[i], threads[i] > 1 ? "s" : "", t->loop / t->f32_k1, t->f32_separate / t->f32_k4,
           t->loop / t->bf16_sr_k1);
    if (threads[i] == 2 && threads[0] == 1)
      printf("targets %s, 2 threads against 1: polyak f32 K=1 %.2fx, bf16 shadows %.2fx (1.6 where memory allows); "
             "the loop %.2fx\n",
             list, times[0].f32_k1 / t->f32_k1, times[0].bf16_sr_k1 / t->bf16_sr_k1, times[0].loop / t->loop);
  }
}

int bench_cpu(const bench_options *options)
{
  char name[128];
  bench_cpu_name(name, sizeof name);
  bench_output out;
  if (bench_output_open(&out, name, options->out_dir) != 0)
    return -1;
  printf("\nCPU backend on %s, date %s, commit %s\n", name, out.date, out.commit);
  bench_cpu_table_header("of loop = the in-place loop's time over this row's, same list and threads (element rate)");
  int failed = 0;
  for (int l = 0; l < options->num_lists && !failed; l++) {
    bench_list list;
    if (bench_list_load(&list, options->lists[l], options->models_dir) != 0) {
      failed = 1;
      break;
    }
    cpu_run run = {&out, &list, {NULL, NULL, NULL}, 1, options->iters, 0.0};
    for (int pd = 0; pd < 2 && !failed; pd++) {
      size_t num_bytes = bench_params_bytes(&list, (polyak_dtype)pd);
      failed = !(run.params[pd] = aligned_alloc(256, num_bytes));
      if (!failed)
        fill_host(run.params[pd], num_bytes, (polyak_dtype)pd);
    }
    cpu_times times[8] = {{0}}; /* main takes at most 8 counts */
    for (int i = 0; i < options->num_cpu_threads && !failed; i++) {
      run.threads = options->cpu_threads[i];
      failed = run_threads(&run, &times[i]) != 0;
    }
    if (!failed)
      print_targets(list.name, times, options->cpu_threads, options->num_cpu_threads);
    free(run.params[0]);
    free(run.params[1]);
    bench_list_free(&list);
  }
  bench_output_close(&out);
  return failed ? -1 : 0;
}
