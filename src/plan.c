/* plan.c: the flat chunk table every update walks, built once at finalize.
 * Each tensor becomes ceil(num_elems / POLYAK_CHUNK_ELEMS) chunks in
 * registration order; its slice of each shadow arena starts on a 16-byte
 * boundary. */
#include <stdlib.h>

#include "polyak_internal.h"

polyak_status polyak_plan_build(polyak_t *p)
{
  int64_t align_elems =
      POLYAK_SHADOW_ALIGN_BYTES / (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t num_chunks = 0;
  for (int i = 0; i < p->num_tensors; i++)
    num_chunks += (p->tensors[i].num_elems + POLYAK_CHUNK_ELEMS - 1) / POLYAK_CHUNK_ELEMS;

  polyak_tensor_desc *descs = calloc((size_t)p->num_tensors + 1, sizeof *descs);
  polyak_chunk *chunks = malloc(((size_t)num_chunks + 1) * sizeof *chunks);
  if (!descs || !chunks) {
    free(descs);
    free(chunks);
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY,
                       "polyak_finalize: out of host memory for a plan of %lld chunks",
                       (long long)num_chunks);
  }

  int64_t global_offset = 0, shadow_offset = 0, store_offset = 0, chunk = 0;
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    descs[i].param = t->param;
    descs[i].num_elems = t->num_elems;
    descs[i].global_offset_elems = global_offset;
    descs[i].shadow_offset_elems = shadow_offset;
    descs[i].store_offset_bytes = store_offset;
    descs[i].param_dtype = (int32_t)t->dtype;
    for (int64_t first = 0; first < t->num_elems; first += POLYAK_CHUNK_ELEMS) {
      int64_t rest = t->num_elems - first;
      chunks[chunk].first_elem = first;
      chunks[chunk].tensor = i;
      chunks[chunk].num_elems = (int32_t)(rest < POLYAK_CHUNK_ELEMS ? rest : POLYAK_CHUNK_ELEMS);
      chunk++;
    }
    global_offset += t->num_elems;
    shadow_offset += (t->num_elems + align_elems - 1) / align_elems * align_elems;
    store_offset += (t->num_elems * (int64_t)polyak_dtype_num_bytes(t->dtype) + 15) / 16 * 16;
  }
  p->descs = descs;
  p->chunks = chunks;
  p->num_chunks = num_chunks;
  p->arena_elems = shadow_offset;
  p->store_bytes = store_offset;
  return POLYAK_OK;
}

void polyak_plan_free(polyak_t *p)
{
  free(p->descs);
  free(p->chunks);
  p->descs = NULL;
  p->chunks = NULL;
  p->num_chunks = 0;
  p->arena_elems = 0;
  p->store_bytes = 0;
}
