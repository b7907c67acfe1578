/* fuzz_load.c: libFuzzer target for the checkpoint loader, through both of
 * its sources. Each input is loaded from memory (the input is the whole
 * checkpoint: polyak_load_from_memory), then from a file at an offset,
 * behind a few bytes of a trainer's own state (the checkpoint ends where its
 * header says: polyak_load_fd; polyak_load reads files the same way).
 * Any input must give a status, never a crash; a failing load must leave
 * the handle's shadows, step and count exactly as they were, and the fd's
 * offset where it was; what loads from memory must load from the file too,
 * to the same state, leaving the offset just past it; the handle must keep
 * working afterwards. And a load that succeeds must restore exactly what the
 * checksum vouches for: the input must be a valid checkpoint by an
 * independent reading (reference.h), its step state and shadow bytes the
 * handle's. A broken invariant aborts, which libFuzzer reports.
 *
 * The mutator gives three mutants in four a valid checksum (the library's
 * polyak_checkpoint_reseal), so that edited headers get past the checksum
 * to every check behind it, and to loads that succeed. */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz_model.h"
#include "reference.h"

#define PREFIX "run"

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

static void expect(int ok, const char *what, polyak_t *p)
{
  if (!ok) {
    fprintf(stderr, "%s (last error: %s)\n", what, polyak_last_error(p));
    abort();
  }
}

/* The load that gave `status` changed the handle from `before` to `after`. */
static void check(polyak_t *p, polyak_status status, int from_fd, const observed *before, const observed *after)
{
  int refused = status == POLYAK_ERR_FORMAT || status == POLYAK_ERR_MISMATCH || status == POLYAK_ERR_NO_MEMORY ||
                (from_fd && status == POLYAK_ERR_IO);
  expect(status == POLYAK_OK || refused, "an unexpected status", p);
  expect(status == POLYAK_OK || memcmp(before, after, sizeof *before) == 0, "a failing load changed the handle", p);
}

/* The handle holds what the checkpoint in `data` says (a load succeeded). */
static void check_against_reference(polyak_t *p, const uint8_t *data, size_t size, const observed *loaded)
{
  reference_state want;
  expect(reference_read(data, size, &want), "a load succeeded that the reference reading refuses", p);
  expect(loaded->step == want.step, "the step is not the file's", p);
  expect(loaded->nonfinite == want.nonfinite, "the non-finite count is not the file's", p);
  for (int k = 0; k < 2; k++) {
    double product;
    expect(polyak_get_beta_product(p, k, &product) == POLYAK_OK, "polyak_get_beta_product failed", p);
    expect(memcmp(&product, &want.products[k], sizeof product) == 0, "a beta product is not the file's", p);
    for (int e = 0; e < 15 + 7 + 1; e++) {
      float got = loaded->shadows[k][e], file = want.shadows[k][e];
      expect(memcmp(&got, &file, 4) == 0 || (isnan(got) && isnan(file)), "a shadow is not the file's", p);
    }
  }
}

size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed)
{
  size = LLVMFuzzerMutate(data, size, max_size);
  if (seed % 4 != 0)
    polyak_checkpoint_reseal(data, size); /* leaves what it cannot reseal as it is */
  return size;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static fuzz_params params;
  static polyak_t *handle;
  static int fd = -1;
  if (!handle && !(handle = fuzz_model_create(&params, POLYAK_F32)))
    abort();
  if (fd < 0 && (fd = memfd_create("polyak-fuzz", MFD_CLOEXEC)) < 0)
    abort();
  observed before, from_memory, from_fd;
  observe(handle, &before);
  polyak_status memory_status = polyak_load_from_memory(handle, data, size);
  observe(handle, &from_memory);
  check(handle, memory_status, 0, &before, &from_memory);
  if (memory_status == POLYAK_OK)
    check_against_reference(handle, data, size, &from_memory);

  const off_t start = (off_t)strlen(PREFIX);
  if (ftruncate(fd, 0) != 0 || pwrite(fd, PREFIX, (size_t)start, 0) != start ||
      (size > 0 && pwrite(fd, data, size, start) != (ssize_t)size) || lseek(fd, start, SEEK_SET) != start)
    abort();
  polyak_status fd_status = polyak_load_fd(handle, fd);
  observe(handle, &from_fd);
  check(handle, fd_status, 1, &from_memory, &from_fd);
  off_t offset = lseek(fd, 0, SEEK_CUR);
  expect(fd_status == POLYAK_OK ? offset > start && offset <= start + (off_t)size : offset == start,
         "the fd's offset is not where the load should leave it", handle);
  if (memory_status == POLYAK_OK) { /* the file holds exactly the same checkpoint */
    expect(fd_status == POLYAK_OK, "what loads from memory fails from a file", handle);
    expect(offset == start + (off_t)size, "the fd load did not stop at the checkpoint's end", handle);
    expect(memcmp(&from_memory, &from_fd, sizeof from_fd) == 0, "memory and fd loads disagree", handle);
  }
  if (from_fd.step < INT64_MAX && polyak_update(handle, from_fd.step + 1, NULL) != POLYAK_OK)
    abort(); /* the handle still works */
  return 0;
}
