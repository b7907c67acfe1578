/* model_list.h: the tensor lists the benchmark runs on: real architectures
 * from bench/models/<name>.tsv and the synthetic tiny-10k and cache-32k. */
#ifndef POLYAK_BENCH_MODEL_LIST_H
#define POLYAK_BENCH_MODEL_LIST_H

#include <stdint.h>

typedef struct {
  char name[128];
  int ndim;
  int64_t shape[8];
  int64_t num_elems;
} bench_tensor;

typedef struct {
  char name[32];
  int num_tensors;
  int64_t num_elems; /* all tensors together */
  bench_tensor *tensors;
} bench_list;

/* Loads list `name` ("tiny-10k" is made up: 10,000 tensors of 1..4096
 * elements, the same every run; "cache-32k" one tensor of 32,768 elements,
 * small enough to stay in the L2 cache) from `models_dir`. Returns 0, or -1
 * with a message on stderr. */
int bench_list_load(bench_list *list, const char *name, const char *models_dir);
void bench_list_free(bench_list *list);

#endif /* POLYAK_BENCH_MODEL_LIST_H */
