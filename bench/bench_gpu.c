/* bench_gpu.c: polyak's fused CUDA update against the card's copy
 * bandwidth (cudaMemcpyAsync device to device, same run) and against what
 * trainers write today: per-tensor cuBLAS scal + axpy on f32 shadows (with
 * a cast for bf16 params), and one polyak handle per shadow. Every update
 * is timed between CUDA events; the median of `iters` counts. */
#include "bench_sections.h"

#ifndef POLYAK_HAVE_CUDA
int bench_gpu(const bench_options *options)
{
  (void)options;
  printf("\nGPU section: this build has no CUDA\n");
  return 0;
}
#else
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>

cudaError_t bench_fill(void *data, size_t count, int bf16, uint64_t seed);
cudaError_t bench_cast_bf16(const uint16_t *from, float *to, size_t count, cudaStream_t stream);

#define WARMUP     5
#define WARM_BYTES ((size_t)64 << 20)

/* Two WARM_BYTES buffers that warm_up() copies between (NULL: no warm-up). */
static void *warm_buffers[2];

/* Keeps the GPU copying for 100 ms before a timing, so that it starts at
 * a busy GPU's clocks: an idle one lowers them, and the small lists' few
 * warm-up calls take a millisecond. */
static void warm_up(void)
{
  if (!warm_buffers[0])
    return;
  double until = bench_seconds() + 0.1;
  while (bench_seconds() < until) {
    for (int i = 0; i < 20; i++)
      cudaMemcpyAsync(warm_buffers[i & 1], warm_buffers[!(i & 1)], WARM_BYTES, cudaMemcpyDeviceToDevice, NULL);
    if (cudaStreamSynchronize(NULL) != cudaSuccess)
      break;
  }
}

typedef struct {
  bench_output *out;
  const bench_list *list;
  char *params; /* device */
  polyak_dtype param_dtype;
  int iters;
  double copy_gbps;
  cudaEvent_t *events; /* iters + 1 */
} gpu_run;

/* Median milliseconds between consecutive events around `iters` calls. */
static double median_ms(const gpu_run *run)
{
  double *ms = malloc(sizeof(double) * (size_t)run->iters);
  for (int i = 0; i < run->iters; i++) {
    float elapsed = 0.0f;
    cudaEventElapsedTime(&elapsed, run->events[i], run->events[i + 1]);
    ms[i] = elapsed;
  }
  double median = bench_median(ms, run->iters);
  free(ms);
  return median;
}

static void emit(const gpu_run *run, polyak_dtype shadow_dtype, int num_shadows, const char *impl, double ms)
{
  double gbps = bench_required_bytes(run->list->num_elems, run->param_dtype, shadow_dtype, num_shadows) / ms / 1e6;
  bench_record r = {run->list->name,
                    bench_dtype_name(run->param_dtype),
                    bench_dtype_name(shadow_dtype),
                    num_shadows,
                    impl,
                    ms,
                    gbps,
                    gbps / run->copy_gbps,
                    0,
                    0.0,
                    NULL};
  bench_emit(run->out, &r);
}

/* A CUDA handle over the run's params; with world_size > 1, rank 0's
 * slice; every shadow rounded as `rounding` says. */
static polyak_t *make_sharded_handle(const gpu_run *run, polyak_dtype shadow_dtype, int num_shadows, int world_size,
                                     int rounding)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.backend = POLYAK_BACKEND_CUDA;
  cfg.num_shadows = num_shadows;
  cfg.shadow_dtype = shadow_dtype;
  cfg.world_size = world_size;
  for (int k = 0; k < num_shadows; k++) {
    cfg.shadows[k].schedule.beta = 0.999 + 0.0001 * k;
    cfg.shadows[k].rounding = rounding;
  }
  polyak_t *p = NULL;
  if (polyak_create(&p, &cfg) != POLYAK_OK || bench_register(p, run->list, run->params, run->param_dtype) ||
      polyak_finalize(p, NULL) != POLYAK_OK) {
    fprintf(stderr, "bench: %s: %s\n", run->list->name, polyak_last_error(p));
    polyak_destroy(p);
    return NULL;
  }
  return p;
}

static polyak_t *make_handle(const gpu_run *run, polyak_dtype shadow_dtype, int num_shadows)
{
  return make_sharded_handle(run, shadow_dtype, num_shadows, 1, POLYAK_ROUND_NEAREST);
}

/* `count` handles updated in turn per timed step (1: the fused pass over
 * every shadow; K: polyak_separate_passes). */
static int time_handles(const gpu_run *run, polyak_t **handles, int count)
{
  warm_up();
  for (int it = -WARMUP; it < run->iters; it++) {
    if (it >= 0)
      cudaEventRecord(run->events[it], NULL);
    for (int h = 0; h < count; h++)
      if (polyak_update(handles[h], it + WARMUP + 1, NULL) != POLYAK_OK) {
        fprintf(stderr, "bench: %s\n", polyak_last_error(handles[h]));
        return -1;
      }
  }
  cudaEventRecord(run->events[run->iters], NULL);
  return cudaEventSynchronize(run->events[run->iters]) == cudaSuccess ? 0 : -1;
}

static int run_polyak(const gpu_run *run, polyak_dtype shadow_dtype, int num_shadows, int separate)
{
  polyak_t *handles[POLYAK_MAX_SHADOWS] = {0};
  int count = separate ? num_shadows : 1, failed = 0;
  for (int h = 0; h < count && !failed; h++)
    failed = !(handles[h] = make_handle(run, shadow_dtype, separate ? 1 : num_shadows));
  if (!failed)
    failed = time_handles(run, handles, count);
  if (!failed)
    emit(run, shadow_dtype, num_shadows, separate ? "polyak_separate_passes" : "polyak", median_ms(run));
  for (int h = 0; h < count; h++)
    polyak_destroy(handles[h]);
  return failed ? -1 : 0;
}

/* Sharded shadows: what rank 0 of W keeps and how long its update takes
 * (its slice only, timed on this one GPU; no communicator needed). */
static int run_sharding(const gpu_run *run)
{
  const int worlds[] = {1, 8};
  for (int w = 0; w < 2; w++) {
    polyak_t *h = make_sharded_handle(run, POLYAK_F32, 1, worlds[w], POLYAK_ROUND_NEAREST);
    if (!h)
      return -1;
    int64_t kept = 0, first, count;
    for (int i = 0; i < run->list->num_tensors; i++) {
      polyak_local_range(h, i, &first, &count);
      kept += count;
    }
    int failed = time_handles(run, &h, 1);
    polyak_destroy(h);
    if (failed)
      return -1;
    double ms = median_ms(run);
    double gbps = bench_required_bytes(kept, run->param_dtype, POLYAK_F32, 1) / ms / 1e6;
    printf("%-10s %-5s f32    1 sharded: world %d, rank 0 keeps %lld elements = %.2f GB per shadow; "
           "update %.3f ms (%.0f GB/s, %.3f of copy)\n",
           run->list->name, bench_dtype_name(run->param_dtype), worlds[w], (long long)kept, kept * 4.0 / 1e9, ms, gbps,
           gbps / run->copy_gbps);
    bench_record r = {run->list->name,
                      bench_dtype_name(run->param_dtype),
                      "f32",
                      1,
                      worlds[w] == 1 ? "polyak_world1" : "polyak_world8_rank0",
                      ms,
                      gbps,
                      gbps / run->copy_gbps,
                      0,
                      0.0,
                      NULL};
    bench_emit(run->out, &r);
  }
  return 0;
}

/* Enough free device memory for `num_bytes` and some slack? */
static int fits(double num_bytes)
{
  size_t free_bytes = 0, total = 0;
  cudaMemGetInfo(&free_bytes, &total);
  return num_bytes * 1.02 + (double)(512u << 20) < (double)free_bytes;
}

/* f32 shadows rounded stochastically against the same shadows rounded to
 * nearest, same run, K = 1 and 4: the hash and the double arithmetic are
 * the only extra work, so the update should stay at the memory limit
 * (target: at least 0.97 of the nearest update's throughput). */
static int run_rounding(const gpu_run *run)
{
  static const char *impl[2] = {"polyak_round_nearest", "polyak_round_stochastic"};
  for (int num_shadows = 1; num_shadows <= 4; num_shadows += 3) {
    double ms[2];
    if (!fits((double)run->list->num_elems * 4.0 * num_shadows))
      continue;
    for (int r = 0; r < 2; r++) { /* r is the rounding mode */
      polyak_t *h = make_sharded_handle(run, POLYAK_F32, num_shadows, 1, r);
      int failed = !h || time_handles(run, &h, 1);
      polyak_destroy(h);
      if (failed)
        return -1;
      ms[r] = median_ms(run);
      emit(run, POLYAK_F32, num_shadows, impl[r], ms[r]);
    }
    printf("%-10s %-5s f32   %d stochastic rounding: %.3f ms, nearest %.3f ms: %.3f of nearest's throughput "
           "(target >= 0.97)\n",
           run->list->name, bench_dtype_name(run->param_dtype), num_shadows, ms[1], ms[0], ms[0] / ms[1]);
  }
  return 0;
}

/* Tensor i's place in the packed buffer `base` (bench_register's layout). */
static void tensor_pointers(const bench_list *list, char *base, polyak_dtype dtype, void **out)
{
  size_t offset = 0;
  for (int i = 0; i < list->num_tensors; i++) {
    out[i] = base + offset;
    offset += ((size_t)list->tensors[i].num_elems * bench_dtype_bytes(dtype) + 255) / 256 * 256;
  }
}

enum { MODE_PLAIN, MODE_LOOKAHEAD, MODE_OWNED, MODE_GRAD_NORM, MODE_LAWA, NUM_MODES };

/* A one-shadow f32 handle over the run's params in one of the modes. */
static polyak_t *make_mode_handle(const gpu_run *run, int mode, void **params, void **owned, float *norm)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.backend = POLYAK_BACKEND_CUDA;
  cfg.lookahead_every = mode == MODE_LOOKAHEAD ? 1 : 0; /* a sync every step: the write-back's worst case */
  cfg.shadows[0].schedule.beta = mode == MODE_LOOKAHEAD ? 0.5 : 0.999;
  cfg.shadows[0].grad_norm_c = mode == MODE_GRAD_NORM ? 0.1 : 0.0;
  cfg.shadows[0].layerwise_beta0 = mode == MODE_LAWA ? 0.999 : 0.0;
  polyak_t *p = NULL;
  polyak_status s = polyak_create(&p, &cfg);
  for (int i = 0; i < run->list->num_tensors && s == POLYAK_OK; i++) {
    const bench_tensor *t = &run->list->tensors[i];
    s = mode == MODE_OWNED ? polyak_add_with_shadow(p, t->name, params[i], run->param_dtype, t->ndim, t->shape,
                                                    owned[i], POLYAK_BF16, 0)
                           : polyak_add(p, t->name, params[i], run->param_dtype, t->ndim, t->shape);
  }
  if (s == POLYAK_OK)
    s = polyak_finalize(p, NULL);
  if (s == POLYAK_OK && mode == MODE_GRAD_NORM)
    s = polyak_set_grad_norm(p, norm);
  if (s == POLYAK_OK && mode == MODE_LAWA)
    s = polyak_set_grads(p, params); /* the params stand in for gradients */
  if (s != POLYAK_OK) {
    fprintf(stderr, "bench: %s mode %d: %s\n", run->list->name, mode, p ? polyak_last_error(p) : "create failed");
    polyak_destroy(p);
    return NULL;
  }
  return p;
}

/* The modes beyond one EMA against the plain update, same run, one f32
 * shadow: Lookahead writing the params back at every step, a bf16 shadow
 * in the caller's memory (the element-wise path), the grad-norm beta
 * (a device scalar) and LAWA (its norm launch reads the gradients too). */
static int run_modes(const gpu_run *run)
{
  static const char *impl[NUM_MODES] = {"polyak_mode_plain", "polyak_lookahead_every1", "polyak_owned_bf16",
                                        "polyak_grad_norm", "polyak_lawa"};
  size_t n = (size_t)run->list->num_tensors;
  void **params = malloc((n + 1) * sizeof *params), **owned = malloc((n + 1) * sizeof *owned);
  char *owned_base = NULL;
  float *norm = NULL, one = 1.0f;
  int failed = !params || !owned || cudaMalloc((void **)&owned_base, bench_params_bytes(run->list, POLYAK_BF16)) ||
               cudaMalloc((void **)&norm, sizeof *norm) || cudaMemcpy(norm, &one, sizeof one, cudaMemcpyHostToDevice);
  if (!failed) {
    tensor_pointers(run->list, run->params, run->param_dtype, params);
    tensor_pointers(run->list, owned_base, POLYAK_BF16, owned);
  }
  double plain_ms = 0.0;
  for (int mode = 0; mode < NUM_MODES && !failed; mode++) {
    polyak_t *h = make_mode_handle(run, mode, params, owned, norm);
    failed = !h || time_handles(run, &h, 1);
    polyak_destroy(h);
    if (failed)
      break;
    double ms = median_ms(run);
    plain_ms = mode == MODE_PLAIN ? ms : plain_ms;
    polyak_dtype shadow_dtype = mode == MODE_OWNED ? POLYAK_BF16 : POLYAK_F32;
    emit(run, shadow_dtype, 1, impl[mode], ms);
    printf("%-10s %-5s mode %-24s %.3f ms, %.2fx the plain update\n", run->list->name,
           bench_dtype_name(run->param_dtype), impl[mode], ms, ms / plain_ms);
  }
  cudaFree(owned_base);
  cudaFree(norm);
  free(params);
  free(owned);
  return failed ? -1 : 0;
}

/* What a C trainer writes by hand: per tensor and shadow, shadow *= beta,
 * then shadow += (1 - beta) * param, on f32 shadows; bf16 params are cast
 * to an f32 scratch first. */
static int run_cublas(const gpu_run *run, cublasHandle_t blas, int num_shadows)
{
  const bench_list *list = run->list;
  float *shadows = NULL, *scratch = NULL;
  int64_t largest = 0;
  for (int i = 0; i < list->num_tensors; i++)
    largest = list->tensors[i].num_elems > largest ? list->tensors[i].num_elems : largest;
  int failed = cudaMalloc((void **)&shadows, (size_t)list->num_elems * num_shadows * 4) != cudaSuccess ||
               (run->param_dtype == POLYAK_BF16 && cudaMalloc((void **)&scratch, (size_t)largest * 4) != cudaSuccess);
  if (!failed)
    failed = bench_fill(shadows, (size_t)list->num_elems * num_shadows, 0, 99) != cudaSuccess;
  const float beta = 0.999f, weight = 0.001f;
  warm_up();
  for (int it = -WARMUP; it < run->iters && !failed; it++) {
    if (it >= 0)
      cudaEventRecord(run->events[it], NULL);
    size_t param_offset = 0, shadow_offset = 0;
    for (int i = 0; i < list->num_tensors && !failed; i++) {
      int n = (int)list->tensors[i].num_elems;
      const float *x = (const float *)(run->params + param_offset);
      if (run->param_dtype == POLYAK_BF16) {
        failed |=
            bench_cast_bf16((const uint16_t *)(run->params + param_offset), scratch, (size_t)n, NULL) != cudaSuccess;
        x = scratch;
      }
      for (int k = 0; k < num_shadows; k++) {
        float *y = shadows + (size_t)k * list->num_elems + shadow_offset;
        failed |= cublasSscal(blas, n, &beta, y, 1) != CUBLAS_STATUS_SUCCESS;
        failed |= cublasSaxpy(blas, n, &weight, x, 1, y, 1) != CUBLAS_STATUS_SUCCESS;
      }
      param_offset += ((size_t)n * bench_dtype_bytes(run->param_dtype) + 255) / 256 * 256;
      shadow_offset += (size_t)n;
    }
  }
  cudaEventRecord(run->events[run->iters], NULL);
  failed |= cudaEventSynchronize(run->events[run->iters]) != cudaSuccess;
  if (!failed)
    emit(run, POLYAK_F32, num_shadows, "cublas_per_tensor", median_ms(run));
  else
    fprintf(stderr, "bench: cublas_per_tensor failed on %s\n", list->name);
  cudaFree(shadows);
  cudaFree(scratch);
  return failed ? -1 : 0;
}

/* Device-to-device copy of 2 GiB; bytes read plus written per second. */
static double copy_gbps(int iters, cudaEvent_t *events)
{
  const size_t num_bytes = (size_t)2 << 30;
  void *src = NULL, *dst = NULL;
  if (cudaMalloc(&src, num_bytes) != cudaSuccess || cudaMalloc(&dst, num_bytes) != cudaSuccess)
    return 0.0;
  bench_fill(src, num_bytes / 4, 0, 7);
  gpu_run run = {0};
  run.iters = iters;
  run.events = events;
  warm_up();
  for (int it = -WARMUP; it < iters; it++) {
    if (it >= 0)
      cudaEventRecord(events[it], NULL);
    cudaMemcpyAsync(dst, src, num_bytes, cudaMemcpyDeviceToDevice, NULL);
  }
  cudaEventRecord(events[iters], NULL);
  cudaEventSynchronize(events[iters]);
  double ms = median_ms(&run);
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * (double)num_bytes / ms / 1e6;
}

int bench_gpu(const bench_options *options)
{
  polyak_config probe;
  char reason[512] = "";
  polyak_config_init(&probe);
  probe.backend = POLYAK_BACKEND_CUDA;
  if (polyak_check_config(&probe, reason, sizeof reason) != POLYAK_OK) {
    printf("\nGPU section skipped: %s\n", reason);
    return 0;
  }
  struct cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  bench_output out;
  if (bench_output_open(&out, prop.name, options->out_dir) != 0)
    return -1;
  cudaEvent_t *events = malloc(sizeof(cudaEvent_t) * (size_t)(options->iters + 1));
  for (int i = 0; i <= options->iters; i++)
    cudaEventCreate(&events[i]);
  cublasHandle_t blas;
  cublasCreate(&blas);
  for (int b = 0; b < 2; b++)
    if (cudaMalloc(&warm_buffers[b], WARM_BYTES) != cudaSuccess)
      warm_buffers[b] = NULL;
  if (!warm_buffers[0] || !warm_buffers[1]) {
    cudaFree(warm_buffers[0]);
    cudaFree(warm_buffers[1]);
    warm_buffers[0] = warm_buffers[1] = NULL;
    cudaGetLastError();
    printf("bench: no memory for the warm-up copies; timings start cold\n");
  }
  gpu_run run = {&out, NULL, NULL, POLYAK_F32, options->iters, copy_gbps(options->iters, events), events};
  printf("\nGPU: %s, %d SMs, %.0f GB; copy bandwidth %.0f GB/s (read + write); date %s, commit %s\n", prop.name,
         prop.multiProcessorCount, (double)prop.totalGlobalMem / 1e9, run.copy_gbps, out.date, out.commit);
  bench_table_header("of copy = of the same run's device-to-device copy bandwidth");
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16};
  int failed = 0;
  for (int l = 0; l < options->num_lists && !failed; l++) {
    bench_list list;
    if (bench_list_load(&list, options->lists[l], options->models_dir) != 0) {
      failed = 1;
      break;
    }
    run.list = &list;
    for (int pd = 0; pd < 2 && !failed; pd++) {
      run.param_dtype = dtypes[pd];
      size_t params_bytes = bench_params_bytes(&list, run.param_dtype);
      if (!fits((double)params_bytes) || cudaMalloc((void **)&run.params, params_bytes) != cudaSuccess) {
        printf("%-10s %-5s skipped: the params need %.1f GB\n", list.name, bench_dtype_name(run.param_dtype),
               (double)params_bytes / 1e9);
        continue;
      }
      bench_fill(run.params, params_bytes / bench_dtype_bytes(run.param_dtype), run.param_dtype == POLYAK_BF16, 5);
      if (strcmp(list.name, "llama2-7b") == 0 && run.param_dtype == POLYAK_F32 && fits((double)list.num_elems * 4.0))
        failed = run_sharding(&run);
      if (!failed && run.param_dtype == POLYAK_F32 &&
          (strcmp(list.name, "gpt2-124m") == 0 || strcmp(list.name, "llama2-7b") == 0) &&
          fits((double)list.num_elems * 6.0))
        failed = run_modes(&run);
      if (!failed && (strcmp(list.name, "gpt2-124m") == 0 || strcmp(list.name, "llama2-7b") == 0))
        failed = run_rounding(&run);
      for (int sd = 0; sd < 2 && !failed; sd++)
        for (int num_shadows = 1; num_shadows <= 4 && !failed; num_shadows += 3) {
          double shadows_bytes = (double)list.num_elems * num_shadows * (double)bench_dtype_bytes(dtypes[sd]);
          if (!fits(shadows_bytes)) {
            printf("%-10s %-5s %-5s %2d skipped: %d shadows need %.1f GB\n", list.name,
                   bench_dtype_name(run.param_dtype), bench_dtype_name(dtypes[sd]), num_shadows, num_shadows,
                   shadows_bytes / 1e9);
            continue;
          }
          failed = run_polyak(&run, dtypes[sd], num_shadows, 0);
          if (!failed && num_shadows > 1)
            failed = run_polyak(&run, dtypes[sd], num_shadows, 1);
          if (!failed && dtypes[sd] == POLYAK_F32)
            failed = run_cublas(&run, blas, num_shadows);
        }
      cudaFree(run.params);
    }
    bench_list_free(&list);
  }
  cublasDestroy(blas);
  cudaFree(warm_buffers[0]);
  cudaFree(warm_buffers[1]);
  warm_buffers[0] = warm_buffers[1] = NULL;
  for (int i = 0; i <= options->iters; i++)
    cudaEventDestroy(events[i]);
  free(events);
  bench_output_close(&out);
  return failed ? -1 : 0;
}
#endif
