/* bench_util.h: what every benchmark section shares: clocks, medians, the
 * results file (one JSON object per line) and the table on stdout. */
#ifndef POLYAK_BENCH_UTIL_H
#define POLYAK_BENCH_UTIL_H

#include <stdint.h>
#include <stdio.h>

#include "polyak.h"

typedef struct {
  const char *list;
  const char *param_dtype, *shadow_dtype; /* "f32", "bf16", "f16" */
  int num_shadows;
  const char *impl;
  double ms_median;
  double gbps;         /* required bytes / median time */
  double frac_of_copy; /* gbps / the same run's copy bandwidth (CPU: the in-place loop's) */
  int threads;         /* CPU rows: threads of the update; 0 elsewhere */
  double of_loop;      /* CPU rows: the same run's in-place loop's time over this row's */
  const char *isa;     /* CPU rows of polyak: its kernels' instruction set (polyak_cpu_isa); NULL elsewhere */
} bench_record;

typedef struct {
  char card[128], date[16], commit[64];
  FILE *jsonl; /* NULL: stdout only */
} bench_output;

/* Opens <out_dir>/<date>-<card>.jsonl for appending (out_dir NULL: none). */
int bench_output_open(bench_output *out, const char *card, const char *out_dir);
void bench_output_close(bench_output *out);
void bench_emit(bench_output *out, const bench_record *r);
void bench_table_header(const char *title);
void bench_cpu_table_header(const char *title); /* with the CPU rows' columns */

double bench_seconds(void);                     /* a monotonic clock */
double bench_median(double *values, int count); /* sorts values */
const char *bench_dtype_name(polyak_dtype d);
size_t bench_dtype_bytes(polyak_dtype d);

/* The bytes an update must move: each param read once, each shadow read
 * and written once. */
double bench_required_bytes(int64_t num_elems, polyak_dtype param, polyak_dtype shadow, int num_shadows);

/* "Intel(R) Xeon(R) ..." from /proc/cpuinfo, or "cpu". */
void bench_cpu_name(char *name, size_t num_bytes);

#endif /* POLYAK_BENCH_UTIL_H */
