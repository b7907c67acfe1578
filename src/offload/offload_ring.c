/* offload_ring.c: the transfers of an offloaded handle other than an
 * update's reads go through a ring of OFFLOAD_RING_SLOTS pinned slots (the
 * staging size split in equal parts): read-outs into device memory, writes
 * of the params from host memory (polyak_restore, the copy-only tensors),
 * reads of whole params (polyak_store, a sharded hard update's scan). A slot
 * is taken again once its last copy's event completed, so a transfer of any
 * size needs no more pinned memory than the staging size, and up to
 * OFFLOAD_RING_SLOTS copies are in flight while the host fills or empties
 * the next slot. */
#include <string.h>

#include "offload.h"

/* The next slot, once its last copy is done (the host waits for it). */
static polyak_status take_slot(offload_state *s, int *slot, char *why)
{
  *slot = s->next_slot;
  s->next_slot = (s->next_slot + 1) % OFFLOAD_RING_SLOTS;
  return s->slot_used[*slot] ? s->ops->wait(s->ctx, EV_SLOT0 + *slot, why) : POLYAK_OK;
}

static char *slot_memory(const offload_state *s, int slot)
{
  return s->ring + (size_t)slot * s->slot_num_bytes;
}

/* Whether [dst, dst + num_bytes) overlaps a param's memory. */
static int writes_params(const polyak_t *p, const void *dst, int64_t num_bytes)
{
  uintptr_t begin = (uintptr_t)dst, end = begin + (uintptr_t)num_bytes;
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    uintptr_t a = (uintptr_t)t->param, b = a + (uintptr_t)t->num_elems * polyak_dtype_num_bytes(t->dtype);
    if (begin < b && a < end)
      return 1;
  }
  return 0;
}

/* Bytes per slot, whole units. */
static int64_t piece_bytes(const offload_state *s, size_t unit_num_bytes)
{
  return (int64_t)(s->slot_num_bytes / unit_num_bytes * unit_num_bytes);
}

polyak_status polyak_offload_ring_write(polyak_t *p, void *dst, int64_t num_bytes, size_t unit_num_bytes,
                                        offload_producer produce, void *arg, void *stream, const char *function)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES] = "";
  POLYAK_TRY(polyak_offload_refuse_capture(p, stream, function));
  polyak_status status = POLYAK_OK, made = POLYAK_OK;
  int enqueued = 0;
  for (int64_t offset = 0, n; offset < num_bytes && status == POLYAK_OK && made == POLYAK_OK; offset += n) {
    n = num_bytes - offset < piece_bytes(s, unit_num_bytes) ? num_bytes - offset : piece_bytes(s, unit_num_bytes);
    int slot = 0;
    status = take_slot(s, &slot, why);
    if (status == POLYAK_OK)
      made = produce(p, arg, offset, n, slot_memory(s, slot));
    if (status == POLYAK_OK && made == POLYAK_OK)
      status =
          s->ops->copy(s->ctx, (char *)dst + offset, slot_memory(s, slot), (size_t)n, POLYAK_TO_DEVICE, stream, why);
    if (status == POLYAK_OK && made == POLYAK_OK) {
      enqueued = 1;
      s->slot_used[slot] = 1; /* its copy is in flight, whether the record below is had or not */
      status = s->ops->record(s->ctx, EV_SLOT0 + slot, stream, why);
    }
  }
  /* writes into the params: the next reads come after them */
  polyak_status noted =
      enqueued && writes_params(p, dst, num_bytes) ? polyak_offload_note_writes(p, s, stream, function) : POLYAK_OK;
  if (made != POLYAK_OK)
    return made;
  if (status != POLYAK_OK)
    return polyak_offload_fail(p, status, function, why);
  return noted;
}

polyak_status polyak_offload_ring_read(polyak_t *p, const void *src, int64_t num_bytes, size_t unit_num_bytes,
                                       offload_consumer consume, void *arg, void *stream, const char *function)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES] = "";
  POLYAK_TRY(polyak_offload_refuse_capture(p, stream, function));
  polyak_status status = POLYAK_OK, used = POLYAK_OK;
  /* after the handle's own writes, whatever stream made them */
  if (s->writes_recorded && s->writes_stream != stream)
    status = s->ops->stream_wait(s->ctx, stream, EV_WRITES, why);
  int queue[OFFLOAD_RING_SLOTS], head = 0, count = 0;
  int64_t queued_offset[OFFLOAD_RING_SLOTS], queued_bytes[OFFLOAD_RING_SLOTS];
  int64_t issued = 0, consumed = 0, piece = piece_bytes(s, unit_num_bytes);
  while (consumed < num_bytes && status == POLYAK_OK && used == POLYAK_OK) {
    /* fill the ring ahead of the host */
    while (issued < num_bytes && count < OFFLOAD_RING_SLOTS && status == POLYAK_OK) {
      int64_t n = num_bytes - issued < piece ? num_bytes - issued : piece;
      int slot = 0;
      status = take_slot(s, &slot, why);
      if (status == POLYAK_OK)
        status = s->ops->copy(s->ctx, slot_memory(s, slot), (const char *)src + issued, (size_t)n, POLYAK_TO_HOST,
                              stream, why);
      if (status == POLYAK_OK) {
        s->slot_used[slot] = 1; /* its copy is in flight, whether the record below is had or not */
        status = s->ops->record(s->ctx, EV_SLOT0 + slot, stream, why);
      }
      if (status == POLYAK_OK) {
        int at = (head + count) % OFFLOAD_RING_SLOTS;
        queue[at] = slot, queued_offset[at] = issued, queued_bytes[at] = n;
        count++;
        issued += n;
      }
    }
    if (status != POLYAK_OK || count == 0)
      break;
    /* the oldest piece, once it is here */
    int slot = queue[head];
    status = s->ops->wait(s->ctx, EV_SLOT0 + slot, why);
    if (status == POLYAK_OK)
      used = consume(p, arg, queued_offset[head], queued_bytes[head], slot_memory(s, slot));
    consumed += queued_bytes[head];
    head = (head + 1) % OFFLOAD_RING_SLOTS;
    count--;
  }
  if (used != POLYAK_OK)
    return used;
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, function, why);
}

/* ---- bytes between any two places ------------------------------------------ */

static polyak_status copy_from(polyak_t *p, void *arg, int64_t offset, int64_t num_bytes, void *slot)
{
  (void)p;
  memcpy(slot, (const char *)arg + offset, (size_t)num_bytes);
  return POLYAK_OK;
}

static polyak_status copy_into(polyak_t *p, void *arg, int64_t offset, int64_t num_bytes, const void *slot)
{
  (void)p;
  memcpy((char *)arg + offset, slot, (size_t)num_bytes);
  return POLYAK_OK;
}

polyak_status polyak_offload_move(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream,
                                  const char *function)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES];
  int dst_where = POLYAK_MEMORY_HOST, src_where = POLYAK_MEMORY_HOST;
  if (num_bytes == 0)
    return POLYAK_OK;
  polyak_status status = s->ops->locate(s->ctx, dst, num_bytes, &dst_where, why);
  if (status == POLYAK_OK)
    status = s->ops->locate(s->ctx, src, num_bytes, &src_where, why);
  if (status != POLYAK_OK)
    return polyak_offload_fail(p, status, function, why);
  if (dst_where == POLYAK_MEMORY_HOST && src_where == POLYAK_MEMORY_HOST) {
    memcpy(dst, src, num_bytes);
    return POLYAK_OK;
  }
  if (dst_where == POLYAK_MEMORY_HOST)
    return polyak_offload_ring_read(p, src, (int64_t)num_bytes, 1, copy_into, dst, stream, function);
  if (src_where == POLYAK_MEMORY_HOST)
    return polyak_offload_ring_write(p, dst, (int64_t)num_bytes, 1, copy_from, (void *)src, stream, function);
  return polyak_fail(p, POLYAK_ERR_UNSUPPORTED, "%s: device-to-device copies are not an offloaded handle's", function);
}
