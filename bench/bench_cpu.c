/* bench_cpu.c: the CPU backend against the in-place guarded loop
 * (inplace_loop.c) over as many elements as the list has, on as many
 * threads, each timed update followed by one timed pass of the loop: the
 * loop sets what this machine's memory allows at that moment (a shared
 * machine's bandwidth drifts from second to second), so "of loop" (the
 * loop's median over the row's) is the row's element rate as a fraction of
 * it. Rows: each param and shadow dtype, K = 1 and 4, f32 shadows rounded to
 * nearest and stochastically, and K = 4 as four one-shadow handles updated
 * in turn; the stochastic rows (f32 shadows rounded so, bf16 shadows) once
 * more on each narrower kernel table the CPU has (POLYAK_CPU_ISA: AVX2 on
 * an AVX-512 CPU, and the portable reference at K = 1), so that each
 * instruction set's figures show; then the targets, computed from them. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bench_sections.h"

#define WARMUP 2

static size_t align_up(size_t n, size_t to)
{
  return (n + to - 1) / to * to;
}

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

/* The loop's arrays and threads, started once per list and thread count. */
static loop_team *loop_start(int64_t num_elems, int threads, pthread_t *ids, loop_worker *workers)
{
  loop_team *team = calloc(1, sizeof *team);
  float *param = aligned_alloc(64, align_up((size_t)num_elems * 4, 64));
  team->shadow = aligned_alloc(64, align_up((size_t)num_elems * 4, 64));
  fill_host((char *)param, (size_t)num_elems * 4, POLYAK_F32);
  memcpy(team->shadow, param, (size_t)num_elems * 4);
  team->param = param;
  team->num_elems = num_elems;
  team->threads = threads;
  pthread_barrier_init(&team->start, NULL, (unsigned)threads);
  pthread_barrier_init(&team->done, NULL, (unsigned)threads);
  for (int t = 1; t < threads; t++) {
    workers[t] = (loop_worker){team, t};
    pthread_create(&ids[t], NULL, loop_worker_main, &workers[t]);
  }
  return team;
}

/* Seconds of one pass of the loop over all its elements. */
static double loop_pass(loop_team *team)
{
  double start = bench_seconds();
  if (team->threads > 1)
    pthread_barrier_wait(&team->start);
  run_slice(team, 0);
  if (team->threads > 1)
    pthread_barrier_wait(&team->done);
  return bench_seconds() - start;
}

static void loop_stop(loop_team *team, pthread_t *ids)
{
  team->stop = 1;
  if (team->threads > 1)
    pthread_barrier_wait(&team->start);
  for (int t = 1; t < team->threads; t++)
    pthread_join(ids[t], NULL);
  pthread_barrier_destroy(&team->start);
  pthread_barrier_destroy(&team->done);
  free(team->shadow);
  free((void *)team->param);
  free(team);
}

/* ---- polyak's rows -------------------------------------------------------------- */

typedef struct {
  bench_output *out;
  const bench_list *list;
  char *params[3]; /* by param dtype */
  int threads, iters;
  loop_team *loop;
} cpu_run;

/* One row: K shadows of `shadow_dtype` rounded by `rounding` (bf16 ones
 * always round stochastically), in one handle or (separate) K handles of
 * one shadow updated in turn, each update followed by a pass of the loop;
 * on the kernels of instruction set `isa` (POLYAK_CPU_ISA while the handles
 * are finalized), or the widest the CPU has (NULL). Returns the median ms
 * and the loop's beside it and the instruction set that ran; ms -1 on a
 * failure, 0 where the CPU lacks `isa` (no row). */
typedef struct {
  double ms, loop_ms;
  const char *isa;
} cpu_row;

static cpu_row measure(const cpu_run *run, polyak_dtype param_dtype, polyak_dtype shadow_dtype, int num_shadows,
                       int rounding, int separate, const char *isa)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = separate ? 1 : num_shadows;
  cfg.shadow_dtype = shadow_dtype;
  cfg.cpu_threads = run->threads;
  for (int k = 0; k < num_shadows; k++)
    cfg.shadows[k].rounding = rounding;
  polyak_t *handles[POLYAK_MAX_SHADOWS] = {0};
  int count = separate ? num_shadows : 1, failed = 0, culprit = 0;
  double *times = malloc(sizeof(double) * (size_t)run->iters),
         *loop_times = malloc(sizeof(double) * (size_t)run->iters);
  if (isa) /* read at finalize; the loop's threads never read the environment */
    setenv("POLYAK_CPU_ISA", isa, 1);
  for (int h = 0; h < count && !failed; h++) {
    culprit = h;
    failed = polyak_create(&handles[h], &cfg) != POLYAK_OK ||
             bench_register(handles[h], run->list, run->params[param_dtype], param_dtype) != POLYAK_OK ||
             polyak_finalize(handles[h], NULL) != POLYAK_OK;
  }
  if (isa)
    unsetenv("POLYAK_CPU_ISA");
  const char *ran = "";
  failed = failed || polyak_cpu_isa(handles[0], &ran) != POLYAK_OK;
  int absent = !failed && isa && strcmp(isa, ran) != 0;
  for (int it = -WARMUP; it < run->iters && !failed && !absent; it++) {
    double start = bench_seconds();
    for (int h = 0; h < count && !failed; h++) {
      culprit = h;
      failed = polyak_update(handles[h], it + WARMUP + 1, NULL) != POLYAK_OK;
    }
    if (it >= 0)
      times[it] = bench_seconds() - start;
    double loop_seconds = loop_pass(run->loop);
    if (it >= 0)
      loop_times[it] = loop_seconds;
  }
  double ms = absent ? 0.0 : -1.0, loop_ms = 0.0;
  if (failed) {
    fprintf(stderr, "bench: %s: %s\n", run->list->name, polyak_last_error(handles[culprit]));
  } else if (!absent) {
    ms = 1e3 * bench_median(times, run->iters);
    loop_ms = 1e3 * bench_median(loop_times, run->iters);
    double gbps = bench_required_bytes(run->list->num_elems, param_dtype, shadow_dtype, num_shadows) / ms / 1e6;
    double loop_gbps = 12.0 * (double)run->list->num_elems / loop_ms / 1e6;
    char impl[64];
    snprintf(impl, sizeof impl, "%s%s%s",
             separate                              ? "polyak_cpu_separate_passes"
             : rounding == POLYAK_ROUND_STOCHASTIC ? "polyak_cpu_round_stochastic"
                                                   : "polyak_cpu",
             isa ? "_" : "", isa ? isa : "");
    bench_record r = {run->list->name,
                      bench_dtype_name(param_dtype),
                      bench_dtype_name(shadow_dtype),
                      num_shadows,
                      impl,
                      ms,
                      gbps,
                      gbps / loop_gbps,
                      run->threads,
                      loop_ms / ms,
                      ran};
    bench_emit(run->out, &r);
  }
  for (int h = 0; h < count; h++)
    polyak_destroy(handles[h]);
  free(times);
  free(loop_times);
  return (cpu_row){ms, loop_ms, ran};
}

/* The kernel tables POLYAK_CPU_ISA can name, widest first. */
static const char *const isas[] = {"avx512", "avx2", "portable"};
#define NUM_ISAS 3

static int isa_rank(const char *isa)
{
  for (int i = 0; i < NUM_ISAS; i++)
    if (strcmp(isa, isas[i]) == 0)
      return i;
  return NUM_ISAS;
}

/* The stochastic rows of one list, thread count and instruction set, for the targets. */
typedef struct {
  cpu_row f32_sr_k1, f32_sr_k4, bf16_k1;
} cpu_isa_times;

/* One list at one thread count, for the targets; by_isa[i] on isas[i]
 * (ms 0: not run). */
typedef struct {
  cpu_row f32_k1, f32_k4, f32_separate, bf16_sr_k1;
  double loop_gbps;
  cpu_isa_times by_isa[NUM_ISAS];
} cpu_times;

/* A stochastic row (f32 shadows rounded so, or bf16 shadows, which always
 * are), then the same on each narrower table the CPU has: AVX2 at K = 1
 * and 4, the portable reference at K = 1 (it is slow). Returns the first
 * row (ms -1 on a failure); *kept[i], where given, gets isas[i]'s. */
static cpu_row stochastic_rows(cpu_run *run, polyak_dtype param_dtype, polyak_dtype shadow_dtype, int num_shadows,
                               cpu_row *const kept[NUM_ISAS])
{
  int rounding = shadow_dtype == POLYAK_F32 ? POLYAK_ROUND_STOCHASTIC : POLYAK_ROUND_NEAREST;
  cpu_row widest = measure(run, param_dtype, shadow_dtype, num_shadows, rounding, 0, NULL);
  if (widest.ms < 0)
    return widest;
  int first = isa_rank(widest.isa);
  if (first < NUM_ISAS && kept[first])
    *kept[first] = widest;
  for (int i = first + 1; i < NUM_ISAS && (i < NUM_ISAS - 1 || num_shadows == 1); i++) {
    cpu_row row = measure(run, param_dtype, shadow_dtype, num_shadows, rounding, 0, isas[i]);
    if (row.ms < 0)
      return row;
    if (row.ms > 0 && kept[i])
      *kept[i] = row;
  }
  return widest;
}

static int run_threads(cpu_run *run, cpu_times *t)
{
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16};
  double *times = malloc(sizeof(double) * (size_t)run->iters);
  for (int it = -WARMUP; it < run->iters; it++) {
    double seconds = loop_pass(run->loop);
    if (it >= 0)
      times[it] = seconds;
  }
  double loop_ms = 1e3 * bench_median(times, run->iters);
  free(times);
  t->loop_gbps = 12.0 * (double)run->list->num_elems / loop_ms / 1e6;
  bench_record loop = {run->list->name, "f32", "f32", 1, "inplace_loop", loop_ms, t->loop_gbps, 1.0,
                       run->threads,    1.0,   NULL};
  bench_emit(run->out, &loop);
  for (int pd = 0; pd < 2; pd++)
    for (int sd = 0; sd < 2; sd++)
      for (int num_shadows = 1; num_shadows <= 4; num_shadows += 3) {
        cpu_row *kept[NUM_ISAS] = {NULL, NULL, NULL}; /* f32 params: the targets' rows */
        for (int i = 0; i < NUM_ISAS && pd == 0; i++)
          kept[i] = sd == 1            ? (num_shadows == 1 ? &t->by_isa[i].bf16_k1 : NULL)
                    : num_shadows == 1 ? &t->by_isa[i].f32_sr_k1
                                       : &t->by_isa[i].f32_sr_k4;
        if (dtypes[sd] == POLYAK_BF16) {
          cpu_row row = stochastic_rows(run, dtypes[pd], dtypes[sd], num_shadows, kept);
          if (row.ms < 0)
            return -1;
          if (pd == 0 && num_shadows == 1)
            t->bf16_sr_k1 = row;
          continue;
        }
        cpu_row row = measure(run, dtypes[pd], dtypes[sd], num_shadows, POLYAK_ROUND_NEAREST, 0, NULL);
        if (row.ms < 0)
          return -1;
        if (pd == 0)
          *(num_shadows == 1 ? &t->f32_k1 : &t->f32_k4) = row;
        if (stochastic_rows(run, dtypes[pd], dtypes[sd], num_shadows, kept).ms < 0) /* the same, stochastically */
          return -1;
        if (num_shadows == 4) {
          row = measure(run, dtypes[pd], dtypes[sd], num_shadows, POLYAK_ROUND_NEAREST, 1, NULL);
          if (row.ms < 0)
            return -1;
          if (pd == 0)
            t->f32_separate = row;
        }
      }
  return 0;
}

/* A row's element rate over the loop's beside it, as text: "-" where not run. */
static const char *ratio(const cpu_row *row, char *text, size_t num_bytes)
{
  if (row->ms > 0)
    snprintf(text, num_bytes, "%.2f", row->loop_ms / row->ms);
  else
    snprintf(text, num_bytes, "-");
  return text;
}

/* The ratios the CPU path aims at, from one list's rows; times[i] at
 * threads[i]. Against the loop, each row's loop passes beside it; K = 4
 * against four passes as time over time of the loop; the thread counts as
 * plain medians, beside the loop's own speed-up. */
static void print_targets(const bench_list *list, const cpu_times *times, const int *threads, int num_counts)
{
  for (int i = 0; i < num_counts; i++) {
    const cpu_times *t = &times[i];
    printf("targets %s, %d thread%s: f32 K=1 %.2f of the loop (0.9); K=4 %.2fx four K=1 passes (1.5; bytes allow "
           "1.33); bf16 shadows %.2f of the loop's element rate (0.7)\n",
           list->name, threads[i], threads[i] > 1 ? "s" : "", t->f32_k1.loop_ms / t->f32_k1.ms,
           (t->f32_separate.ms / t->f32_separate.loop_ms) / (t->f32_k4.ms / t->f32_k4.loop_ms),
           t->bf16_sr_k1.loop_ms / t->bf16_sr_k1.ms);
    /* f32 params: 12 bytes an element for the loop, 4 + 8K for f32 shadows, 4 + 4K for bf16 ones */
    for (int k = 0; k < NUM_ISAS; k++) {
      const cpu_isa_times *s = &t->by_isa[k];
      if (s->f32_sr_k1.ms <= 0 && s->bf16_k1.ms <= 0)
        continue;
      char a[16], b[16], c[16];
      printf("targets %s, %d thread%s, stochastic rounding on %s: f32 K=1 %s of the loop's element rate (0.8; "
             "bytes allow 1.0); bf16 shadows %s (0.9; bytes allow 1.5); f32 K=4 %s (0.25; bytes allow 0.33); "
             "the loop %.1f GB/s\n",
             list->name, threads[i], threads[i] > 1 ? "s" : "", isas[k], ratio(&s->f32_sr_k1, a, sizeof a),
             ratio(&s->bf16_k1, b, sizeof b), ratio(&s->f32_sr_k4, c, sizeof c), t->loop_gbps);
    }
    if (threads[i] == 2 && threads[0] == 1) {
      const cpu_times *one = &times[0];
      double bytes = 12.0 * (double)list->num_elems;
      printf("targets %s, 2 threads against 1: polyak f32 K=1 %.2fx, bf16 shadows %.2fx (1.6 where memory "
             "allows); the loop beside them %.2fx (%.0f -> %.0f GB/s)\n",
             list->name, one->f32_k1.ms / t->f32_k1.ms, one->bf16_sr_k1.ms / t->bf16_sr_k1.ms,
             one->f32_k1.loop_ms / t->f32_k1.loop_ms, bytes / one->f32_k1.loop_ms / 1e6,
             bytes / t->f32_k1.loop_ms / 1e6);
    }
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
    cpu_run run = {&out, &list, {NULL, NULL, NULL}, 1, options->iters, NULL};
    for (int pd = 0; pd < 2 && !failed; pd++) {
      size_t num_bytes = bench_params_bytes(&list, (polyak_dtype)pd);
      failed = !(run.params[pd] = aligned_alloc(256, num_bytes));
      if (!failed)
        fill_host(run.params[pd], num_bytes, (polyak_dtype)pd);
    }
    cpu_times times[8]; /* main takes at most 8 counts */
    memset(times, 0, sizeof times);
    for (int i = 0; i < options->num_cpu_threads && !failed; i++) {
      pthread_t ids[64];
      loop_worker workers[64];
      run.threads = options->cpu_threads[i];
      run.loop = loop_start(list.num_elems, run.threads, ids, workers);
      failed = run_threads(&run, &times[i]) != 0;
      loop_stop(run.loop, ids);
    }
    if (!failed)
      print_targets(&list, times, options->cpu_threads, options->num_cpu_threads);
    free(run.params[0]);
    free(run.params[1]);
    bench_list_free(&list);
  }
  bench_output_close(&out);
  return failed ? -1 : 0;
}
