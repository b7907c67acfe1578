/* copies.c: copy-only tensors (polyak_add_copy). Each has one mirror,
 * whatever num_shadows, that every update sets to the param (the CUDA
 * update kernel copies the copy plan's pieces in the same launch; the CPU
 * backend calls polyak_copies_update). The mirrors live in one backend
 * allocation, whole on every rank; the calls here move them through the
 * backend's copy_bytes and read_out. */
#include <string.h>

#include "polyak_internal.h"

/* The mirror of tensor i (backend memory). */
static void *mirror(const polyak_t *p, int i)
{
  return (char *)p->copies + p->tensors[i].mirror_offset_bytes;
}

static size_t tensor_num_bytes(const polyak_tensor *t)
{
  return (size_t)t->num_elems * polyak_dtype_num_bytes(t->dtype);
}

/* Copies num_bytes of every copy-only tensor: to_mirror, param -> mirror,
 * else mirror -> param; `stored` (not NULL): to or from there instead of the
 * mirrors. */
static polyak_status move_all(polyak_t *p, int to_mirror, void *stored, void *stream)
{
  polyak_status status = POLYAK_OK;
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (!t->copy_only || t->num_elems == 0)
      continue;
    void *other = stored ? (char *)stored + t->mirror_offset_bytes : mirror(p, i);
    status = to_mirror ? p->ops->copy_bytes(p, other, t->param, tensor_num_bytes(t), stream)
                       : p->ops->copy_bytes(p, t->param, other, tensor_num_bytes(t), stream);
  }
  return status;
}

polyak_status polyak_copies_allocate(polyak_t *p)
{
  if (p->copies_num_bytes == 0)
    return POLYAK_OK;
  p->copies = p->ops->scratch_alloc(p, (size_t)p->copies_num_bytes);
  if (!p->copies)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of memory for %lld bytes of copy-only tensors",
                       (long long)p->copies_num_bytes);
  return POLYAK_OK;
}

polyak_status polyak_copies_refresh(polyak_t *p, void *stream)
{
  return move_all(p, 1, NULL, stream);
}

void polyak_copies_release(polyak_t *p)
{
  if (p->copies)
    p->ops->scratch_free(p, p->copies);
  if (p->copies_stored)
    p->ops->scratch_free(p, p->copies_stored);
  p->copies = p->copies_stored = NULL;
}

void polyak_copies_update(const polyak_t *p)
{
  for (int64_t c = 0; c < p->num_copy_chunks; c++) {
    const polyak_copy_chunk *chunk = &p->copy_chunks[c];
    memcpy((char *)p->copies + chunk->mirror_offset_bytes, chunk->param, (size_t)chunk->num_bytes);
  }
}

polyak_status polyak_copies_to_params(polyak_t *p, void *stream)
{
  return move_all(p, 0, NULL, stream);
}

polyak_status polyak_copies_store(polyak_t *p, int to_store, void *stream)
{
  if (p->copies_num_bytes == 0)
    return POLYAK_OK;
  if (!p->copies_stored && to_store) {
    p->copies_stored = p->ops->scratch_alloc(p, (size_t)p->copies_num_bytes);
    if (!p->copies_stored)
      return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_store: out of memory for the copy-only tensors");
  }
  return move_all(p, to_store, p->copies_stored, stream);
}

int polyak_copy_readable_as(polyak_dtype tensor_dtype, polyak_dtype dst_dtype)
{
  return dst_dtype == tensor_dtype || (polyak_dtype_valid(tensor_dtype) && polyak_dtype_valid(dst_dtype));
}

polyak_status polyak_copy_read(polyak_t *p, int tensor, void *dst, polyak_dtype dst_dtype, void *stream)
{
  const polyak_tensor *t = &p->tensors[tensor];
  if (t->num_elems == 0)
    return POLYAK_OK;
  if (dst_dtype == t->dtype)
    return p->ops->copy_bytes(p, dst, mirror(p, tensor), tensor_num_bytes(t), stream);
  return p->ops->read_out(p, mirror(p, tensor), t->dtype, t->num_elems, 1.0, dst, dst_dtype, stream);
}
