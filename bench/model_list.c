/* model_list.c: reading the model TSVs ("name<TAB>AxBxC<TAB>numel"). */
#include "model_list.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int append(bench_list *list, int *capacity, const bench_tensor *t)
{
  if (list->num_tensors == *capacity) {
    *capacity = *capacity ? 2 * *capacity : 256;
    bench_tensor *grown = realloc(list->tensors, (size_t)*capacity * sizeof *grown);
    if (!grown)
      return -1;
    list->tensors = grown;
  }
  list->tensors[list->num_tensors++] = *t;
  list->num_elems += t->num_elems;
  return 0;
}

static int make_tiny(bench_list *list)
{
  int capacity = 0;
  uint64_t state = 10000;
  for (int i = 0; i < 10000; i++) {
    state = state * 6364136223846793005ull + 1442695040888963407ull; /* LCG */
    bench_tensor t = {{0}, 1, {1 + (int64_t)((state >> 33) % 4096)}, 0};
    t.num_elems = t.shape[0];
    snprintf(t.name, sizeof t.name, "tiny.%d", i);
    if (append(list, &capacity, &t) != 0)
      return -1;
  }
  return 0;
}

/* One tensor of 32,768 elements: its param and four f32 shadows (640 KB)
 * stay in a core's L2 cache, so an update there shows what the kernels'
 * arithmetic costs without the memory's time. */
static int make_cache(bench_list *list)
{
  int capacity = 0;
  bench_tensor t = {"cache.0", 1, {32768}, 32768};
  return append(list, &capacity, &t);
}

int bench_list_load(bench_list *list, const char *name, const char *models_dir)
{
  memset(list, 0, sizeof *list);
  snprintf(list->name, sizeof list->name, "%s", name);
  if (strcmp(name, "tiny-10k") == 0)
    return make_tiny(list);
  if (strcmp(name, "cache-32k") == 0)
    return make_cache(list);
  char path[4096], line[1024];
  snprintf(path, sizeof path, "%s/%s.tsv", models_dir, name);
  FILE *in = fopen(path, "r");
  if (!in) {
    fprintf(stderr, "bench: no list %s (looked for %s)\n", name, path);
    return -1;
  }
  int capacity = 0, failed = 0;
  while (!failed && fgets(line, sizeof line, in)) {
    if (line[0] == '#' || line[0] == '\n')
      continue;
    bench_tensor t = {{0}, 0, {0}, 0};
    char shape[256];
    long long numel = 0;
    if (sscanf(line, "%127s %255s %lld", t.name, shape, &numel) != 3) {
      failed = 1;
      break;
    }
    int64_t product = 1;
    for (char *dim = strtok(shape, "x"); dim && t.ndim < 8; dim = strtok(NULL, "x")) {
      t.shape[t.ndim++] = atoll(dim);
      product *= t.shape[t.ndim - 1];
    }
    t.num_elems = numel;
    failed = product != numel || append(list, &capacity, &t) != 0;
  }
  fclose(in);
  if (failed) {
    fprintf(stderr, "bench: %s: a line is not name, shape, numel\n", path);
    bench_list_free(list);
    return -1;
  }
  return 0;
}

void bench_list_free(bench_list *list)
{
  free(list->tensors);
  list->tensors = NULL;
  list->num_tensors = 0;
}
