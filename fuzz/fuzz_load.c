/* fuzz_load.c: libFuzzer target for the checkpoint loader. Any input must
 * give a status, never a crash; a failing load must leave the handle's
 * shadows, step and count exactly as they were; the handle must keep
 * working afterwards. A broken invariant aborts, which libFuzzer reports. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz_model.h"

typedef struct {
  float shadows[2][15 + 7 + 1];
  int64_t step, nonfinite;
} observed;

static void observe(polyak_t *p, observed *o)
{
  memset(o, 0, sizeof *o);
  for (int k = 0; k < 2; k++) {
    if (polyak_get_shadow(p, k, 0, o->shadows[k], POLYAK_F32, NULL) != POLYAK_OK ||
        polyak_get_shadow(p, k, 1, o->shadows[k] + 15, POLYAK_F32, NULL) != POLYAK_OK ||
        polyak_get_shadow(p, k, 2, o->shadows[k] + 22, POLYAK_F32, NULL) != POLYAK_OK)
      abort();
  }
  if (polyak_get_step(p, &o->step) != POLYAK_OK || polyak_nonfinite_count(p, &o->nonfinite) != POLYAK_OK)
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static fuzz_params params;
  static polyak_t *handle;
  if (!handle && !(handle = fuzz_model_create(&params, POLYAK_F32)))
    abort();
  observed before, after;
  observe(handle, &before);
  polyak_status status = polyak_load_from_memory(handle, data, size);
  observe(handle, &after);
  switch (status) {
  case POLYAK_OK:
    break;
  case POLYAK_ERR_FORMAT:
  case POLYAK_ERR_MISMATCH:
  case POLYAK_ERR_IO:
  case POLYAK_ERR_NO_MEMORY:
    if (memcmp(&before, &after, sizeof before) != 0) {
      fprintf(stderr, "a failing load (%s: %s) changed the handle\n", polyak_status_name(status),
              polyak_last_error(handle));
      abort();
    }
    break;
  default:
    fprintf(stderr, "unexpected status %s\n", polyak_status_name(status));
    abort();
  }
  if (after.step < INT64_MAX && polyak_update(handle, after.step + 1, NULL) != POLYAK_OK)
    abort(); /* the handle still works */
  return 0;
}
