/* plan.c: the flat chunk table every update walks, built once at finalize.
 * Each tensor's kept elements (all of them, or the piece of this rank's
 * slice) become chunks of at most POLYAK_CHUNK_ELEMS elements in
 * registration order; each piece starts on a 16-byte boundary of the
 * shadow arenas. */
#include <stdlib.h>

#include "polyak_internal.h"

int polyak_tensor_of_element(const polyak_t *p, int64_t elem)
{
  int lo = 0, hi = p->num_tensors - 1; /* the first tensor whose end lies beyond elem */
  while (lo < hi) {
    int mid = lo + (hi - lo) / 2;
    const polyak_tensor *t = &p->tensors[mid];
    if (t->global_offset_elems + t->flat_elems > elem)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

int64_t polyak_shard_begin(const polyak_t *p, int world_size, int rank)
{
  int64_t total = p->total_elems, world = world_size;
  if (rank <= 0 || total == 0)
    return 0;
  if (rank >= world)
    return total;
  int64_t even = total / world * rank + total % world * rank / world; /* total*rank/world */
  int64_t offset = p->tensors[polyak_tensor_of_element(p, even)].global_offset_elems;
  return offset + (even - offset) / 8 * 8; /* 16 bytes of bf16, 32 of f32, into the tensor */
}

void polyak_shard_layout(const polyak_t *p, int rank, polyak_piece *pieces, int64_t *arena_elems)
{
  int64_t align_elems = POLYAK_SHADOW_ALIGN_BYTES / (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t begin = polyak_shard_begin(p, p->cfg.world_size, rank);
  int64_t end = polyak_shard_begin(p, p->cfg.world_size, rank + 1), arena = 0;
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    int64_t lo = begin > t->global_offset_elems ? begin : t->global_offset_elems;
    int64_t hi = t->global_offset_elems + t->flat_elems;
    hi = end < hi ? end : hi;
    pieces[i].first_elem = lo < hi ? lo - t->global_offset_elems : 0;
    pieces[i].num_elems = lo < hi ? hi - lo : 0;
    pieces[i].arena_offset_elems = arena;
    if (!t->owned) /* the caller's shadow takes no arena space */
      arena += (pieces[i].num_elems + align_elems - 1) / align_elems * align_elems;
  }
  *arena_elems = arena;
}

/* Copy-only tensors: their mirrors end to end (16-byte aligned) and the
 * pieces of at most POLYAK_COPY_CHUNK_BYTES the update copies. */
static polyak_status plan_copies(polyak_t *p)
{
  int64_t num_bytes = 0, count = 0;
  for (int i = 0; i < p->num_tensors; i++) {
    polyak_tensor *t = &p->tensors[i];
    if (!t->copy_only)
      continue;
    int64_t tensor_bytes = t->num_elems * (int64_t)polyak_dtype_num_bytes(t->dtype);
    t->mirror_offset_bytes = num_bytes;
    num_bytes += (tensor_bytes + 15) / 16 * 16;
    count += (tensor_bytes + POLYAK_COPY_CHUNK_BYTES - 1) / POLYAK_COPY_CHUNK_BYTES;
  }
  polyak_copy_chunk *chunks = malloc(((size_t)count + 1) * sizeof *chunks);
  if (!chunks)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory for the copy plan");
  int64_t c = 0;
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    int64_t tensor_bytes = t->copy_only ? t->num_elems * (int64_t)polyak_dtype_num_bytes(t->dtype) : 0;
    for (int64_t done = 0; done < tensor_bytes; done += POLYAK_COPY_CHUNK_BYTES, c++) {
      int64_t rest = tensor_bytes - done;
      chunks[c].param = (const char *)t->param + done;
      chunks[c].mirror_offset_bytes = t->mirror_offset_bytes + done;
      chunks[c].num_bytes = rest < POLYAK_COPY_CHUNK_BYTES ? rest : POLYAK_COPY_CHUNK_BYTES;
    }
  }
  p->copy_chunks = chunks;
  p->num_copy_chunks = count;
  p->copies_num_bytes = num_bytes;
  return POLYAK_OK;
}

polyak_status polyak_plan_build(polyak_t *p)
{
  polyak_piece *pieces = malloc(((size_t)p->num_tensors + 1) * sizeof *pieces);
  polyak_tensor_desc *descs = calloc((size_t)p->num_tensors + 1, sizeof *descs);
  if (!pieces || !descs) {
    free(pieces);
    free(descs);
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory for the plan");
  }
  int64_t arena_elems = 0, num_chunks = 0, store_offset = 0;
  polyak_shard_layout(p, p->cfg.rank, pieces, &arena_elems);
  for (int i = 0; i < p->num_tensors; i++)
    num_chunks += (pieces[i].num_elems + POLYAK_CHUNK_ELEMS - 1) / POLYAK_CHUNK_ELEMS;
  polyak_chunk *chunks = malloc(((size_t)num_chunks + 1) * sizeof *chunks);
  int64_t *tensor_chunks = malloc(((size_t)p->num_tensors + 1) * sizeof *tensor_chunks);
  if (!chunks || !tensor_chunks) {
    free(pieces);
    free(descs);
    free(chunks);
    free(tensor_chunks);
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory for a plan of %lld chunks",
                       (long long)num_chunks);
  }
  int64_t chunk = 0;
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    const polyak_piece *piece = &pieces[i];
    descs[i].param = t->param;
    descs[i].num_elems = t->num_elems;
    descs[i].global_offset_elems = t->global_offset_elems;
    descs[i].local_first_elem = piece->first_elem;
    descs[i].local_num_elems = piece->num_elems;
    descs[i].shadow_offset_elems = piece->arena_offset_elems - piece->first_elem;
    descs[i].store_offset_bytes = store_offset;
    descs[i].param_dtype = (int32_t)t->dtype;
    descs[i].owned = t->owned ? t->shadow : NULL;
    descs[i].owned_dtype = (int32_t)t->shadow_dtype;
    /* a caller's f32 shadow rounds as shadow 0 does; a 16-bit one by its flag */
    descs[i].owned_round_nearest =
        (t->shadow_flags & POLYAK_SHADOW_ROUND_NEAREST) != 0 ||
        (t->shadow_dtype == POLYAK_F32 && p->cfg.shadows[0].rounding != POLYAK_ROUND_STOCHASTIC);
    descs[i].copy_only = t->copy_only;
    tensor_chunks[i] = chunk;
    for (int64_t done = 0; done < piece->num_elems; done += POLYAK_CHUNK_ELEMS) {
      int64_t rest = piece->num_elems - done;
      chunks[chunk].first_elem = piece->first_elem + done;
      chunks[chunk].tensor = i;
      chunks[chunk].num_elems = (int32_t)(rest < POLYAK_CHUNK_ELEMS ? rest : POLYAK_CHUNK_ELEMS);
      chunk++;
    }
    store_offset += (t->num_elems * (int64_t)polyak_dtype_num_bytes(t->dtype) + 15) / 16 * 16;
  }
  tensor_chunks[p->num_tensors] = chunk;
  /* gathers need every rank's layout; every rank's arena is as large as the
   * largest, so an all-gather sends it whole */
  int64_t alloc_elems = arena_elems;
  polyak_piece *layouts = NULL;
  if (p->cfg.world_size > 1 || p->cfg.nccl_comm) {
    size_t n = (size_t)p->num_tensors;
    layouts = malloc(((size_t)p->cfg.world_size * n + 1) * sizeof *layouts);
    if (!layouts) {
      free(pieces);
      free(descs);
      free(chunks);
      free(tensor_chunks);
      return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory for the ranks' layouts");
    }
    for (int r = 0; r < p->cfg.world_size; r++) {
      int64_t rank_elems = 0;
      polyak_shard_layout(p, r, layouts + (size_t)r * n, &rank_elems);
      alloc_elems = rank_elems > alloc_elems ? rank_elems : alloc_elems;
    }
  }
  free(pieces);
  if (plan_copies(p) != POLYAK_OK) {
    free(layouts);
    free(descs);
    free(chunks);
    free(tensor_chunks);
    return POLYAK_ERR_NO_MEMORY;
  }
  p->layouts = layouts;
  p->descs = descs;
  p->chunks = chunks;
  p->num_chunks = num_chunks;
  p->tensor_chunks = tensor_chunks;
  p->arena_elems = arena_elems;
  p->arena_alloc_elems = alloc_elems;
  p->store_bytes = store_offset;
  return POLYAK_OK;
}

polyak_status polyak_full_chunks(polyak_t *p, polyak_chunk **chunks, int64_t *num_chunks)
{
  int64_t count = 0;
  for (int i = 0; i < p->num_tensors; i++)
    count += (p->tensors[i].flat_elems + POLYAK_CHUNK_ELEMS - 1) / POLYAK_CHUNK_ELEMS;
  *chunks = malloc(((size_t)count + 1) * sizeof **chunks);
  if (!*chunks)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "out of host memory for %lld chunks", (long long)count);
  int64_t chunk = 0;
  for (int i = 0; i < p->num_tensors; i++)
    for (int64_t first = 0; first < p->tensors[i].flat_elems; first += POLYAK_CHUNK_ELEMS) {
      int64_t rest = p->tensors[i].flat_elems - first;
      (*chunks)[chunk].first_elem = first;
      (*chunks)[chunk].tensor = i;
      (*chunks)[chunk].num_elems = (int32_t)(rest < POLYAK_CHUNK_ELEMS ? rest : POLYAK_CHUNK_ELEMS);
      chunk++;
    }
  *num_chunks = count;
  return POLYAK_OK;
}

void polyak_plan_free(polyak_t *p)
{
  free(p->copy_chunks);
  p->copy_chunks = NULL;
  p->num_copy_chunks = 0;
  p->copies_num_bytes = 0;
  free(p->descs);
  free(p->chunks);
  free(p->tensor_chunks);
  free(p->layouts);
  p->layouts = NULL;
  p->descs = NULL;
  p->chunks = NULL;
  p->tensor_chunks = NULL;
  p->num_chunks = 0;
  p->arena_elems = 0;
  p->arena_alloc_elems = 0;
  p->store_bytes = 0;
}
