/* checkpoint_stage.c: the last step of a load, after the reader checked
 * the whole checkpoint: its data goes block by block into fresh arenas
 * (the backend's staging), and only then do they replace the shadows,
 * together with the beta products and the step state. Nothing changes if
 * any part fails. */
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"

#define BLOCK_BYTES ((size_t)32 << 20)

size_t polyak_ckpt_block_bytes(const polyak_t *p, int64_t num_bytes)
{
  int64_t arena_bytes = p->arena_elems * (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t need = num_bytes > arena_bytes ? num_bytes : arena_bytes;
  if (need < 4096)
    need = 4096;
  return need < (int64_t)BLOCK_BYTES ? (size_t)need : BLOCK_BYTES;
}

/* Fills the staging arenas block by block in arena order, each tensor's
 * slice read from its data offset; padding stays zero. */
static polyak_status stage_data(polyak_t *p, polyak_ckpt_source *src, int64_t data_start, const int64_t *data_begin,
                                void *buffer, size_t buffer_bytes)
{
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t block_elems = (int64_t)(buffer_bytes / elem_bytes);
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    int i = 0;
    for (int64_t start = 0; start < p->arena_alloc_elems; start += block_elems) {
      int64_t count = p->arena_alloc_elems - start < block_elems ? p->arena_alloc_elems - start : block_elems;
      memset(buffer, 0, (size_t)count * elem_bytes);
      for (; i < p->num_tensors; i++) {
        int64_t lo, hi;
        if (!polyak_ckpt_is_saved(p, k, i))
          continue;
        int goes_on = polyak_ckpt_slice_in_block(&p->descs[i], start, count, &lo, &hi);
        if (lo < hi) {
          int64_t offset = data_start + data_begin[(int64_t)k * p->num_tensors + i] +
                           (lo - p->descs[i].shadow_offset_elems) * (int64_t)elem_bytes;
          polyak_status status =
              src->read_at(src, p, (char *)buffer + (lo - start) * elem_bytes, (size_t)(hi - lo) * elem_bytes, offset);
          if (status != POLYAK_OK)
            return status;
        }
        if (goes_on)
          break;
      }
      polyak_status status = p->ops->staging_write(p, k, start, count, buffer);
      if (status != POLYAK_OK)
        return status;
    }
  }
  return POLYAK_OK;
}

/* The copy-only tensors' mirrors, read whole into host memory (*copies,
 * copies_num_bytes; NULL without copies) before anything changes. */
static polyak_status stage_copies(polyak_t *p, polyak_ckpt_source *src, int64_t data_start, const int64_t *data_begin,
                                  void **copies)
{
  *copies = NULL;
  if (p->copies_num_bytes == 0)
    return POLYAK_OK;
  *copies = calloc(1, (size_t)p->copies_num_bytes); /* padding included */
  if (!*copies)
    return polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, src->function, "out of host memory for the copy-only tensors");
  polyak_status status = POLYAK_OK;
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++)
    if (p->tensors[i].copy_only)
      status = src->read_at(src, p, (char *)*copies + p->tensors[i].mirror_offset_bytes,
                            (size_t)polyak_ckpt_entry_bytes(p, i), data_start + data_begin[i]);
  return status;
}

polyak_status polyak_ckpt_stage(polyak_t *p, polyak_ckpt_source *src, int64_t data_start, const int64_t *data_begin,
                                const polyak_ckpt_state *state, void *buffer, size_t buffer_bytes)
{
  void *copies = NULL;
  polyak_status status = stage_copies(p, src, data_start, data_begin, &copies);
  if (status == POLYAK_OK)
    status = p->ops->staging_begin(p);
  if (status != POLYAK_OK) {
    free(copies);
    return status;
  }
  status = stage_data(p, src, data_start, data_begin, buffer, buffer_bytes);
  double products_before[POLYAK_MAX_SHADOWS];
  int products_written = 0;
  if (status == POLYAK_OK && polyak_has_grad_norm(&p->cfg)) { /* the backend keeps these */
    status = p->ops->products_read(p, products_before);
    if (status == POLYAK_OK)
      status = p->ops->products_write(p, state->beta_prod);
    products_written = status == POLYAK_OK;
  }
  if (status == POLYAK_OK) /* sums over ranks keep the file's count */
    status = p->ops->staging_commit(p, p->cfg.rank == 0 ? state->nonfinite : 0, copies);
  else
    p->ops->staging_abort(p);
  if (status != POLYAK_OK && products_written)
    p->ops->products_write(p, products_before);
  free(copies);
  if (status != POLYAK_OK)
    return status;
  p->last_step = state->step;
  p->torn = 0;         /* every shadow byte is the checkpoint's now */
  p->shadows_open = 0; /* a load replaces whatever a write through the addresses left */
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    p->beta_prod[k] = state->beta_prod[k];
    p->updates_counted[k] = state->updates_counted[k];
  }
  return POLYAK_OK;
}
