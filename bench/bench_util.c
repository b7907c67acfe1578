/* bench_util.c: see bench_util.h. */
#include "bench_util.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int compare_doubles(const void *a, const void *b)
{
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double bench_median(double *values, int count)
{
  qsort(values, (size_t)count, sizeof *values, compare_doubles);
  return count % 2 ? values[count / 2] : 0.5 * (values[count / 2 - 1] + values[count / 2]);
}

double bench_seconds(void)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

const char *bench_dtype_name(polyak_dtype d)
{
  return d == POLYAK_F32 ? "f32" : d == POLYAK_BF16 ? "bf16" : "f16";
}

size_t bench_dtype_bytes(polyak_dtype d)
{
  return d == POLYAK_F32 ? 4 : 2;
}

double bench_required_bytes(int64_t num_elems, polyak_dtype param, polyak_dtype shadow, int num_shadows)
{
  return (double)num_elems * ((double)bench_dtype_bytes(param) + 2.0 * num_shadows * (double)bench_dtype_bytes(shadow));
}

void bench_cpu_name(char *name, size_t num_bytes)
{
  snprintf(name, num_bytes, "cpu");
  FILE *in = fopen("/proc/cpuinfo", "r");
  char line[512];
  while (in && fgets(line, sizeof line, in)) {
    char *colon = strchr(line, ':');
    if (strncmp(line, "model name", 10) == 0 && colon) {
      snprintf(name, num_bytes, "%s", colon + 2);
      name[strcspn(name, "\n")] = '\0';
      break;
    }
  }
  if (in)
    fclose(in);
}

/* The commit being measured: $POLYAK_COMMIT, else git's, else "unknown". */
static void find_commit(char *commit, size_t num_bytes)
{
  const char *env = getenv("POLYAK_COMMIT");
  snprintf(commit, num_bytes, "%s", env ? env : "unknown");
  if (env)
    return;
  FILE *git = popen("git rev-parse --short HEAD 2>/dev/null", "r");
  if (git && fgets(commit, (int)num_bytes, git))
    commit[strcspn(commit, "\n")] = '\0';
  else
    snprintf(commit, num_bytes, "unknown");
  if (git)
    pclose(git);
}

int bench_output_open(bench_output *out, const char *card, const char *out_dir)
{
  memset(out, 0, sizeof *out);
  snprintf(out->card, sizeof out->card, "%s", card);
  time_t now = time(NULL);
  strftime(out->date, sizeof out->date, "%Y-%m-%d", gmtime(&now));
  find_commit(out->commit, sizeof out->commit);
  if (!out_dir)
    return 0;
  char file_card[128], path[4096];
  snprintf(file_card, sizeof file_card, "%s", card);
  for (char *c = file_card; *c; c++)
    if (!((*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '.' || *c == '_' ||
          *c == '-'))
      *c = '-';
  snprintf(path, sizeof path, "%s/%s-%s.jsonl", out_dir, out->date, file_card);
  out->jsonl = fopen(path, "a");
  if (!out->jsonl) {
    fprintf(stderr, "bench: cannot write %s\n", path);
    return -1;
  }
  printf("results: %s\n", path);
  return 0;
}

void bench_output_close(bench_output *out)
{
  if (out->jsonl)
    fclose(out->jsonl);
  out->jsonl = NULL;
}

void bench_table_header(const char *title)
{
  printf("\n%s\n%-10s %-5s %-5s %2s %-24s %10s %9s %8s\n", title, "list", "param", "shadw", "K", "impl", "ms median",
         "GB/s", "of copy");
}

void bench_cpu_table_header(const char *title)
{
  printf("\n%s\n%-10s %-5s %-5s %2s %-36s %10s %9s %8s %3s %8s %s\n", title, "list", "param", "shadw", "K", "impl",
         "ms median", "GB/s", "of copy", "thr", "of loop", "isa");
}

void bench_emit(bench_output *out, const bench_record *r)
{
  if (r->threads > 0)
    printf("%-10s %-5s %-5s %2d %-36s %10.4f %9.1f %8.3f %3d %8.3f %s\n", r->list, r->param_dtype, r->shadow_dtype,
           r->num_shadows, r->impl, r->ms_median, r->gbps, r->frac_of_copy, r->threads, r->of_loop,
           r->isa ? r->isa : "");
  else
    printf("%-10s %-5s %-5s %2d %-24s %10.4f %9.1f %8.3f\n", r->list, r->param_dtype, r->shadow_dtype, r->num_shadows,
           r->impl, r->ms_median, r->gbps, r->frac_of_copy);
  fflush(stdout);
  if (!out->jsonl)
    return;
  json_t *line = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:i, s:s, s:f, s:f, s:f}", "card", out->card, "date",
                           out->date, "commit", out->commit, "list", r->list, "param_dtype", r->param_dtype,
                           "shadow_dtype", r->shadow_dtype, "num_shadows", r->num_shadows, "impl", r->impl, "ms_median",
                           r->ms_median, "gbps", r->gbps, "frac_of_copy", r->frac_of_copy);
  if (r->threads > 0) {
    json_object_set_new(line, "threads", json_integer(r->threads));
    json_object_set_new(line, "of_loop", json_real(r->of_loop));
  }
  if (r->isa)
    json_object_set_new(line, "isa", json_string(r->isa));
  char *text = json_dumps(line, JSON_COMPACT | JSON_PRESERVE_ORDER);
  if (text)
    fprintf(out->jsonl, "%s\n", text);
  free(text);
  json_decref(line);
  fflush(out->jsonl);
}
