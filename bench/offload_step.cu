// offload_step.cu: what an EMA with shadows in host memory (POLYAK_SHADOWS_HOST)
// costs a training step. A synthetic step (a loop of f32 GEMMs on the device,
// calibrated to --step-ms) runs --steps times alone, then with an offloaded
// handle over a model list's params (bf16 on the device, one f32 shadow in
// host memory) updated every k steps, with the update's stream waiting for
// the param reads (the default) and with the reads overlapped
// (polyak_overlap_param_reads, polyak_wait_param_reads where the optimizer
// would next write the params). Prints a row per case, the overhead as a
// fraction of the step and the host time blocked in polyak_update (a fold
// still in flight at the next update), and appends them to
// <out>/<date>-offload.jsonl. The timed window ends when the stream's work
// is done: the last update's fold, which no later step waits for, is left
// out of it (and reported apart), and each case runs at least 10 updates.
//
//   polyak_offload_bench [--lists gpt2-xl,llama2-7b] [--every 1,10] [--steps 100] [--step-ms 500] [--out DIR]
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <sstream>
#include <string>
#include <vector>

#include "polyak.h"

extern "C" {
#include "model_list.h"
}

namespace {

double now_s()
{
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<std::string> split(const std::string &text)
{
  std::vector<std::string> parts;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');)
    parts.push_back(part);
  return parts;
}

// The synthetic step: `gemms` GEMMs of n x n f32 on `stream`.
struct Step {
  cublasHandle_t blas = nullptr;
  float *a = nullptr, *c = nullptr;
  int n = 4096, gemms = 1;
  bool init(cudaStream_t stream)
  {
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS || cudaMalloc(&a, sizeof(float) * n * n) != cudaSuccess ||
        cudaMalloc(&c, sizeof(float) * n * n) != cudaSuccess)
      return false;
    cudaMemset(a, 0, sizeof(float) * n * n);
    cublasSetStream(blas, stream);
    return true;
  }
  void enqueue()
  {
    const float one = 1.0f, zero = 0.0f;
    for (int i = 0; i < gemms; i++)
      cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, n, a, n, &zero, c, n);
  }
  ~Step()
  {
    cudaFree(a);
    cudaFree(c);
    if (blas)
      cublasDestroy(blas);
  }
};

struct Timing {
  double step_s = -1;   // per step, until the stream's work is done (the last fold left out)
  double blocked_s = 0; // the host's time inside polyak_update, in all
  double blocked_max_s = 0;
  int updates = 0;
  double last_fold_s = 0; // the last fold's time past the stream's end
};

// `steps` steps, an update every `every` (0: none).
Timing run(Step &step, cudaStream_t stream, polyak_t *p, int every, int overlap, int steps, int64_t first_step)
{
  Timing timing;
  step.enqueue(); // warm
  cudaStreamSynchronize(stream);
  double start = now_s();
  for (int s = 1; s <= steps; s++) {
    step.enqueue(); // forward, backward
    if (p && overlap)
      polyak_wait_param_reads(p, stream); // before the optimizer writes the params
    // (the optimizer step would be here)
    if (p && every > 0 && s % every == 0) {
      double begin = now_s();
      polyak_status status = polyak_update(p, first_step + s, stream);
      double blocked = now_s() - begin;
      if (status != POLYAK_OK) {
        fprintf(stderr, "polyak_update: %s\n", polyak_last_error(p));
        return timing;
      }
      timing.blocked_s += blocked;
      timing.blocked_max_s = blocked > timing.blocked_max_s ? blocked : timing.blocked_max_s;
      timing.updates++;
    }
  }
  cudaStreamSynchronize(stream);
  double end = now_s();
  timing.step_s = (end - start) / steps;
  int64_t count = 0;
  if (p)
    polyak_nonfinite_count(p, &count); // waits for the last fold, outside the window
  timing.last_fold_s = now_s() - end;
  return timing;
}

} // namespace

int main(int argc, char **argv)
{
  std::string lists = "gpt2-xl,llama2-7b", every_list = "1,10", out_dir;
  int steps = 100;
  double step_ms = 500;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--lists")
      lists = argv[i + 1];
    else if (flag == "--every")
      every_list = argv[i + 1];
    else if (flag == "--steps")
      steps = atoi(argv[i + 1]);
    else if (flag == "--step-ms")
      step_ms = atof(argv[i + 1]);
    else if (flag == "--out")
      out_dir = argv[i + 1];
    else {
      fprintf(stderr, "usage: %s [--lists A,B] [--every 1,10] [--steps N] [--step-ms MS] [--out DIR]\n", argv[0]);
      return 2;
    }
  }
  if (!polyak_backend_available(POLYAK_BACKEND_CUDA)) {
    printf("offload benchmark: GPU not used: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  char date[16];
  time_t t = time(nullptr);
  strftime(date, sizeof date, "%Y-%m-%d", gmtime(&t));
  FILE *jsonl = nullptr;
  if (!out_dir.empty())
    jsonl = fopen((out_dir + "/" + date + "-offload.jsonl").c_str(), "a");
  const char *commit = getenv("POLYAK_COMMIT");

  cudaStream_t stream = nullptr;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  Step step;
  if (!step.init(stream)) {
    fprintf(stderr, "the synthetic step's buffers could not be allocated\n");
    return 1;
  }
  // calibrate the step's GEMM count to step_ms
  step.gemms = 10;
  double one = run(step, stream, nullptr, 0, 0, 3, 0).step_s / step.gemms;
  step.gemms = one > 0 ? (int)(step_ms / 1000.0 / one + 0.5) : 1;
  if (step.gemms < 1)
    step.gemms = 1;
  printf("card %s; synthetic step: %d GEMMs of 4096^2 f32, target %.0f ms\n", prop.name, step.gemms, step_ms);
  printf("%-10s %6s %8s %6s %10s %12s %9s %14s %12s %13s\n", "list", "every", "overlap", "steps", "step ms",
         "with EMA ms", "overhead", "blocked ms/upd", "blocked max", "last fold ms");

  int status = 0;
  for (const std::string &name : split(lists)) {
    bench_list list;
    if (bench_list_load(&list, name.c_str(), POLYAK_BENCH_MODELS_DIR) != 0)
      return 1;
    char *params = nullptr;
    if (cudaMalloc(&params, (size_t)list.num_elems * 2) != cudaSuccess) {
      fprintf(stderr, "%s: %lld bf16 params do not fit on the device\n", name.c_str(), (long long)list.num_elems);
      bench_list_free(&list);
      status = 1;
      continue;
    }
    cudaMemset(params, 0x3f, (size_t)list.num_elems * 2); // 0x3f3f: a finite bf16
    cudaDeviceSynchronize();
    polyak_config cfg;
    polyak_config_init(&cfg);
    cfg.backend = POLYAK_BACKEND_CUDA;
    cfg.shadow_location = POLYAK_SHADOWS_HOST;
    cfg.shadows[0].schedule.beta = 0.999;
    cfg.cpu_threads = 0; // a core each
    polyak_t *p = nullptr;
    if (polyak_create(&p, &cfg) != POLYAK_OK)
      return 1;
    size_t offset = 0;
    for (int i = 0; i < list.num_tensors; i++) {
      const bench_tensor *bt = &list.tensors[i];
      polyak_add(p, bt->name, params + offset * 2, POLYAK_BF16, bt->ndim, bt->shape);
      offset += (size_t)bt->num_elems;
    }
    double begin = now_s();
    if (polyak_finalize(p, stream) != POLYAK_OK) {
      fprintf(stderr, "%s: polyak_finalize: %s\n", name.c_str(), polyak_last_error(p));
      polyak_destroy(p);
      cudaFree(params);
      bench_list_free(&list);
      status = 1;
      continue;
    }
    double finalize_s = now_s() - begin;
    double base = run(step, stream, nullptr, 0, 0, steps, 0).step_s;
    int64_t next_step = 0;
    for (const std::string &every_text : split(every_list))
      for (int overlap : {0, 1}) {
        int every = atoi(every_text.c_str());
        int n = every > 0 && steps < 10 * every ? 10 * every : steps; // 10 updates at least
        polyak_overlap_param_reads(p, overlap);
        Timing timing = run(step, stream, p, every, overlap, n, next_step);
        next_step += n;
        if (timing.step_s < 0) {
          status = 1;
          continue;
        }
        double with = timing.step_s, overhead = (with - base) / base;
        double blocked_ms = timing.updates ? timing.blocked_s / timing.updates * 1e3 : 0;
        printf("%-10s %6d %8d %6d %10.1f %12.1f %8.1f%% %14.2f %12.2f %13.1f\n", name.c_str(), every, overlap, n,
               base * 1e3, with * 1e3, overhead * 100, blocked_ms, timing.blocked_max_s * 1e3,
               timing.last_fold_s * 1e3);
        if (jsonl)
          fprintf(jsonl,
                  "{\"bench\": \"offload_step\", \"date\": \"%s\", \"card\": \"%s\", \"commit\": \"%s\", \"list\": "
                  "\"%s\", \"num_elems\": %lld, \"update_every\": %d, \"overlap_reads\": %d, \"steps\": %d, "
                  "\"step_ms\": %.3f, \"with_ema_ms\": %.3f, \"overhead\": %.5f, \"update_blocked_ms\": %.3f, "
                  "\"update_blocked_max_ms\": %.3f, \"last_fold_ms\": %.3f, \"finalize_s\": %.3f}\n",
                  date, prop.name, commit ? commit : "unknown", name.c_str(), (long long)list.num_elems, every, overlap,
                  n, base * 1e3, with * 1e3, overhead, blocked_ms, timing.blocked_max_s * 1e3, timing.last_fold_s * 1e3,
                  finalize_s);
      }
    polyak_destroy(p);
    cudaFree(params);
    bench_list_free(&list);
  }
  if (jsonl)
    fclose(jsonl);
  cudaStreamDestroy(stream);
  return status;
}
