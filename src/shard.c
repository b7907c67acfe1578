/* shard.c: whole shadows from sharded handles. Every rank computes every
 * rank's layout (polyak_shard_layout), so a gather is one all-gather of raw
 * shadow elements followed by local read-outs of each rank's pieces:
 *   tensor     each rank's piece of one tensor, padded to the largest piece
 *   arenas     each rank's whole arena (all arenas have the same allocated
 *              size, so they are sent in place)
 * The all-gather is the only NCCL call; everything else here also runs on
 * the CPU, where tests feed polyak_assemble arenas gathered by hand. */
#include <stdlib.h>

#include "polyak_internal.h"

int polyak_needs_gather(const polyak_t *p, int tensor)
{
  const polyak_tensor_desc *t = &p->descs[tensor];
  return p->cfg.nccl_comm != NULL || t->local_num_elems != t->num_elems;
}

polyak_piece *polyak_all_layouts(const polyak_t *p)
{
  size_t n = (size_t)p->num_tensors;
  polyak_piece *layouts = malloc(((size_t)p->cfg.world_size * n + 1) * sizeof *layouts);
  for (int r = 0; layouts && r < p->cfg.world_size; r++) {
    int64_t arena_elems;
    polyak_shard_layout(p, r, layouts + (size_t)r * n, &arena_elems);
  }
  return layouts;
}

polyak_status polyak_assemble(polyak_t *p, const void *gathered, int64_t stride_elems,
                              const polyak_piece *layouts, int tensor, double debias_scale, void *dst,
                              polyak_dtype dst_dtype, void *stream)
{
  size_t shadow_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  size_t dst_bytes = polyak_dtype_num_bytes(dst_dtype);
  for (int r = 0; r < p->cfg.world_size; r++) {
    const polyak_piece *piece = &layouts[(size_t)r * (size_t)p->num_tensors + (size_t)tensor];
    if (piece->num_elems == 0)
      continue;
    const char *src = (const char *)gathered + (r * stride_elems + piece->arena_offset_elems) * (int64_t)shadow_bytes;
    char *to = (char *)dst + piece->first_elem * (int64_t)dst_bytes;
    polyak_status status = p->ops->read_out(p, src, piece->num_elems, debias_scale, to, dst_dtype, stream);
    if (status != POLYAK_OK)
      return status;
  }
  return POLYAK_OK;
}

static polyak_status no_gather(polyak_t *p)
{
  if (!p->cfg.nccl_comm)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "this rank holds a slice of the shadows (world_size %d) and has no "
                       "nccl_comm to gather the rest: read its slice with polyak_get_local_shadow",
                       p->cfg.world_size);
  return polyak_fail(p, POLYAK_ERR_UNSUPPORTED, "this backend cannot gather over NCCL");
}

polyak_status polyak_gather_arenas(polyak_t *p, int shadow, void **gathered, void *stream)
{
  if (!p->cfg.nccl_comm || !p->ops->all_gather)
    return no_gather(p);
  size_t shadow_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  *gathered = p->ops->scratch_alloc(p, (size_t)p->cfg.world_size * (size_t)p->arena_alloc_elems * shadow_bytes);
  if (!*gathered)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "out of memory for the %d ranks' shadows",
                       p->cfg.world_size);
  polyak_status status =
      p->ops->all_gather(p, p->ops->arena(p, shadow), *gathered, p->arena_alloc_elems, stream);
  if (status != POLYAK_OK) {
    p->ops->scratch_free(p, *gathered);
    *gathered = NULL;
  }
  return status;
}

polyak_status polyak_gather_tensor(polyak_t *p, int shadow, int tensor, double debias_scale, void *dst,
                                   polyak_dtype dst_dtype, void *stream)
{
  if (!p->cfg.nccl_comm || !p->ops->all_gather)
    return no_gather(p);
  polyak_piece *layouts = polyak_all_layouts(p);
  if (!layouts)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "out of host memory for the ranks' layouts");
  /* every rank's piece of the tensor at the start of a stride of the largest piece */
  int64_t stride = 1;
  for (int r = 0; r < p->cfg.world_size; r++) {
    polyak_piece *piece = &layouts[(size_t)r * (size_t)p->num_tensors + (size_t)tensor];
    stride = piece->num_elems > stride ? piece->num_elems : stride;
    piece->arena_offset_elems = 0;
  }
  size_t shadow_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  const polyak_tensor_desc *t = &p->descs[tensor];
  char *send = p->ops->scratch_alloc(p, (size_t)stride * shadow_bytes);
  char *gathered = p->ops->scratch_alloc(p, (size_t)p->cfg.world_size * (size_t)stride * shadow_bytes);
  polyak_status status = POLYAK_OK;
  if (!send || !gathered)
    status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "out of memory to gather a tensor");
  if (status == POLYAK_OK)
    status = p->ops->copy_bytes(p, send,
                                (const char *)p->ops->arena(p, shadow) +
                                    (t->shadow_offset_elems + t->local_first_elem) * (int64_t)shadow_bytes,
                                (size_t)t->local_num_elems * shadow_bytes, stream);
  if (status == POLYAK_OK)
    status = p->ops->all_gather(p, send, gathered, stride, stream);
  if (status == POLYAK_OK)
    status = polyak_assemble(p, gathered, stride, layouts, tensor, debias_scale, dst, dst_dtype, stream);
  if (send)
    p->ops->scratch_free(p, send);
  if (gathered)
    p->ops->scratch_free(p, gathered);
  free(layouts);
  return status;
}

polyak_status polyak_gather_to_params(polyak_t *p, int shadow, double debias_scale, void *stream)
{
  polyak_piece *layouts = polyak_all_layouts(p);
  if (!layouts)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "out of host memory for the ranks' layouts");
  void *gathered = NULL;
  polyak_status status = polyak_gather_arenas(p, shadow, &gathered, stream);
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++)
    status = polyak_assemble(p, gathered, p->arena_alloc_elems, layouts, i, debias_scale,
                             p->tensors[i].param, p->tensors[i].dtype, stream);
  if (gathered)
    p->ops->scratch_free(p, gathered);
  free(layouts);
  return status;
}
