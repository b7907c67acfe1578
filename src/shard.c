/* shard.c: whole shadows from sharded handles. Every rank knows every
 * rank's layout (p->layouts, from polyak_shard_layout at finalize), so a
 * gather is one all-gather of raw shadow elements followed by local
 * read-outs of each rank's pieces:
 *   tensor     each rank's piece of one tensor, padded to the largest piece
 *   arenas     each rank's whole arena (all arenas have the same allocated
 *              size, so they are sent in place)
 * Gathers are collectives: every rank must make the same calls. Before each
 * all-gather the ranks agree that all of them are ready (polyak_all_ready), so a
 * rank that failed locally (out of memory, say) makes all of them fail
 * instead of leaving the others waiting in NCCL. The all-gather and the
 * agreement are the only NCCL calls; everything else also runs on the CPU,
 * where tests feed polyak_assemble arenas gathered by hand. */
#include <stdlib.h>

#include "polyak_internal.h"

int polyak_needs_gather(const polyak_t *p, int tensor)
{
  const polyak_tensor_desc *t = &p->descs[tensor];
  if (t->copy_only) /* every rank keeps the whole mirror */
    return 0;
  return p->cfg.nccl_comm != NULL || t->local_num_elems != t->num_elems;
}

polyak_status polyak_assemble(polyak_t *p, const void *gathered, int64_t stride_elems, const polyak_piece *pieces,
                              size_t piece_stride, double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream)
{
  size_t shadow_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  size_t dst_bytes = polyak_dtype_num_bytes(dst_dtype);
  int raw = dst_dtype == p->cfg.shadow_dtype && debias_scale == 1.0; /* bytes as they are */
  for (int r = 0; r < p->cfg.world_size; r++) {
    const polyak_piece *piece = &pieces[(size_t)r * piece_stride];
    if (piece->num_elems == 0)
      continue;
    const char *src = (const char *)gathered + (r * stride_elems + piece->arena_offset_elems) * (int64_t)shadow_bytes;
    char *to = (char *)dst + piece->first_elem * (int64_t)dst_bytes;
    polyak_status status =
        raw ? p->ops->copy_bytes(p, to, src, (size_t)piece->num_elems * shadow_bytes, stream)
            : p->ops->read_out(p, src, p->cfg.shadow_dtype, piece->num_elems, debias_scale, to, dst_dtype, stream);
    if (status != POLYAK_OK)
      return status;
  }
  return POLYAK_OK;
}

/* Whether a gather can run: a communicator, and a stream not being captured
 * (a gather allocates, synchronizes and frees). The same on every rank. */
static polyak_status check_gather(polyak_t *p, void *stream)
{
  if (!p->cfg.nccl_comm)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "this rank holds a slice of the shadows (world_size %d) and has no "
                       "nccl_comm to gather the rest: read its slice with polyak_get_local_shadow",
                       p->cfg.world_size);
  if (!p->ops->all_gather)
    return polyak_fail(p, POLYAK_ERR_UNSUPPORTED, "this backend cannot gather over NCCL");
  polyak_status status = polyak_refuse_capture(
      p, stream, "a gather cannot be captured into a graph: it allocates, synchronizes and gathers over NCCL");
  return status == POLYAK_OK ? polyak_refuse_during_capture(p, stream, 0, "gathering the shadows") : status;
}

polyak_status polyak_all_ready(polyak_t *p, int ready, polyak_status status_if_not, const char *what)
{
  int all = 0;
  polyak_status status = p->ops->agree(p, ready, &all);
  if (status != POLYAK_OK)
    return status;
  if (!all)
    return polyak_fail(p, status_if_not, "%s: %s", what,
                       ready ? "another rank could not take part" : "this rank could not take part (out of memory?)");
  return POLYAK_OK;
}

polyak_status polyak_gather_arenas(polyak_t *p, int shadow, void **gathered, void *stream)
{
  polyak_status status = check_gather(p, stream);
  if (status != POLYAK_OK)
    return status;
  size_t shadow_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  *gathered = p->ops->scratch_alloc(p, (size_t)p->cfg.world_size * (size_t)p->arena_alloc_elems * shadow_bytes);
  status = polyak_all_ready(p, *gathered != NULL, POLYAK_ERR_NO_MEMORY, "gathering the shadows");
  if (status == POLYAK_OK)
    status = p->ops->all_gather(p, p->ops->arena(p, shadow), *gathered, p->arena_alloc_elems, stream);
  if (status != POLYAK_OK && *gathered) {
    p->ops->scratch_free(p, *gathered);
    *gathered = NULL;
  }
  return status;
}

polyak_status polyak_gather_tensor(polyak_t *p, int shadow, int tensor, double debias_scale, void *dst,
                                   polyak_dtype dst_dtype, void *stream)
{
  polyak_status status = check_gather(p, stream);
  if (status != POLYAK_OK)
    return status;
  /* every rank's piece of the tensor at the start of a stride of the largest piece */
  size_t n = (size_t)p->num_tensors;
  int64_t stride = 1;
  polyak_piece *pieces = malloc(sizeof *pieces * (size_t)p->cfg.world_size);
  for (int r = 0; r < p->cfg.world_size && pieces; r++) {
    pieces[r] = p->layouts[(size_t)r * n + (size_t)tensor];
    pieces[r].arena_offset_elems = 0;
    stride = pieces[r].num_elems > stride ? pieces[r].num_elems : stride;
  }
  size_t shadow_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  const polyak_tensor_desc *t = &p->descs[tensor];
  char *send = p->ops->scratch_alloc(p, (size_t)stride * shadow_bytes);
  char *gathered = p->ops->scratch_alloc(p, (size_t)p->cfg.world_size * (size_t)stride * shadow_bytes);
  status = polyak_all_ready(p, pieces && send && gathered, POLYAK_ERR_NO_MEMORY, "gathering a tensor");
  if (status == POLYAK_OK)
    status = p->ops->copy_bytes(p, send, polyak_local_slice(p, shadow, tensor, NULL),
                                (size_t)t->local_num_elems * shadow_bytes, stream);
  if (status == POLYAK_OK)
    status = p->ops->all_gather(p, send, gathered, stride, stream);
  if (status == POLYAK_OK)
    status = polyak_assemble(p, gathered, stride, pieces, 1, debias_scale, dst, dst_dtype, stream);
  if (send)
    p->ops->scratch_free(p, send);
  if (gathered)
    p->ops->scratch_free(p, gathered);
  free(pieces);
  return status;
}

polyak_status polyak_gather_to_params(polyak_t *p, int shadow, double debias_scale, void *stream)
{
  void *gathered = NULL;
  polyak_status status = polyak_gather_arenas(p, shadow, &gathered, stream);
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++)
    status = polyak_assemble(p, gathered, p->arena_alloc_elems, p->layouts + i, (size_t)p->num_tensors, debias_scale,
                             p->tensors[i].param, p->tensors[i].dtype, stream);
  if (gathered)
    p->ops->scratch_free(p, gathered);
  return status;
}
