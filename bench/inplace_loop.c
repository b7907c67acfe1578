/* inplace_loop.c: the reference the CPU backend is measured against: the
 * in-place guarded EMA loop anyone would write, compiled -O3 -march=native
 * where the compiler takes it (bench/CMakeLists.txt), so it runs at what
 * this machine's memory allows. */
#include <math.h>

#include "bench_sections.h"

void bench_inplace_loop(float *restrict shadow, const float *restrict param, int64_t num_elems, float weight)
{
  for (int64_t i = 0; i < num_elems; i++) {
    int ok = isfinite(param[i]);
    float next = fmaf(weight, param[i] - shadow[i], shadow[i]);
    shadow[i] = ok ? next : shadow[i];
  }
}
