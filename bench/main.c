/* main.c: polyak_bench: how close an update comes to the memory-bandwidth
 * limit, on real model shapes, against the baselines.
 *
 *   polyak_bench [--out DIR] [--iters N] [--lists a,b,...] [--cpu-lists a,b,...]
 *                [--cpu-threads 1,2,...] [--cpu-only] [--gpu-only]
 *
 * Lists: gpt2-124m gpt2-xl llama2-7b vit-b16 resnet50 (the TSVs in bench/models),
 * tiny-10k and cache-32k (one tensor that stays in the L2 cache: the CPU
 * kernels' arithmetic without the memory's time). The CPU section runs at each of --cpu-threads (default 1,2).
 * Results go to stdout and, with --out, to
 * DIR/<date>-<card>.jsonl (one JSON object per measurement). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_sections.h"

#ifndef POLYAK_BENCH_MODELS_DIR
#define POLYAK_BENCH_MODELS_DIR "bench/models"
#endif

static int split(char *text, const char **items, int max_items)
{
  int count = 0;
  for (char *item = strtok(text, ","); item && count < max_items; item = strtok(NULL, ","))
    items[count++] = item;
  return count;
}

int main(int argc, char **argv)
{
  static char gpu_text[512] = "gpt2-124m,gpt2-xl,llama2-7b,vit-b16,resnet50,tiny-10k";
  static char cpu_text[512] = "resnet50,tiny-10k,gpt2-124m";
  char threads_text[128] = "1,2";
  const char *gpu_lists[16], *cpu_lists[16], *thread_items[8];
  int cpu_threads[8];
  bench_options options = {POLYAK_BENCH_MODELS_DIR, NULL, NULL, 0, 50, cpu_threads, 0};
  int cpu = 1, gpu = 1;
  for (int a = 1; a < argc; a++) {
    if (strcmp(argv[a], "--out") == 0 && a + 1 < argc)
      options.out_dir = argv[++a];
    else if (strcmp(argv[a], "--iters") == 0 && a + 1 < argc)
      options.iters = atoi(argv[++a]);
    else if (strcmp(argv[a], "--lists") == 0 && a + 1 < argc)
      snprintf(gpu_text, sizeof gpu_text, "%s", argv[++a]);
    else if (strcmp(argv[a], "--cpu-lists") == 0 && a + 1 < argc)
      snprintf(cpu_text, sizeof cpu_text, "%s", argv[++a]);
    else if (strcmp(argv[a], "--cpu-threads") == 0 && a + 1 < argc)
      snprintf(threads_text, sizeof threads_text, "%s", argv[++a]);
    else if (strcmp(argv[a], "--models") == 0 && a + 1 < argc)
      options.models_dir = argv[++a];
    else if (strcmp(argv[a], "--cpu-only") == 0)
      gpu = 0;
    else if (strcmp(argv[a], "--gpu-only") == 0)
      cpu = 0;
    else {
      fprintf(stderr,
              "usage: %s [--out DIR] [--iters N] [--lists a,b] [--cpu-lists a,b] [--cpu-threads 1,2] "
              "[--models DIR] [--cpu-only] [--gpu-only]\n",
              argv[0]);
      return 2;
    }
  }
  if (options.iters < 3) {
    fprintf(stderr, "bench: --iters must be at least 3\n");
    return 2;
  }
  options.num_cpu_threads = split(threads_text, thread_items, 8);
  for (int i = 0; i < options.num_cpu_threads; i++)
    if ((cpu_threads[i] = atoi(thread_items[i])) < 1 || cpu_threads[i] > 64) {
      fprintf(stderr, "bench: --cpu-threads takes counts from 1 to 64\n");
      return 2;
    }
  int failed = 0;
  if (!cpu && !polyak_backend_available(POLYAK_BACKEND_CUDA)) {
    /* asked for the GPU alone: without one there is nothing to measure */
    polyak_config cfg;
    char reason[512] = "this build has no CUDA backend";
    polyak_config_init(&cfg);
    cfg.backend = POLYAK_BACKEND_CUDA;
    polyak_check_config(&cfg, reason, sizeof reason);
    fprintf(stderr, "bench: --gpu-only, but the CUDA backend cannot run here: %s\n", reason);
    return 1;
  }
  if (cpu) {
    options.lists = cpu_lists;
    options.num_lists = split(cpu_text, cpu_lists, 16);
    failed |= bench_cpu(&options) != 0;
  }
  if (gpu && !failed) {
    options.lists = gpu_lists;
    options.num_lists = split(gpu_text, gpu_lists, 16);
    failed |= bench_gpu(&options) != 0;
  }
  return failed ? 1 : 0;
}
