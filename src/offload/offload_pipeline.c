/* offload_pipeline.c: an offloaded update. polyak_update enqueues copies of
 * the params into the mirror on the offload's side stream, after the
 * caller's stream (EV_START) and after the handle's own writes (EV_WRITES),
 * one event per group of chunks, and hands the fold to the handle's thread,
 * which waits for each group's event and folds it into the shadows with the
 * CPU backend's arithmetic across the worker threads while the next group
 * crosses the link. The caller's stream waits for the reads (EV_READS), or,
 * with polyak_overlap_param_reads, only where the trainer calls
 * polyak_wait_param_reads before it next writes the params. Errors the
 * thread meets are reported by the next call; the handle then refuses
 * updates until a load. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "offload.h"

polyak_status polyak_offload_fail(polyak_t *p, polyak_status status, const char *function, const char *why)
{
  return polyak_fail(p, status, "%s: %s", function, why);
}

polyak_status polyak_offload_refuse_capture(polyak_t *p, void *stream, const char *function)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES];
  int capturing = 0;
  polyak_status status = s->ops->capturing(s->ctx, stream, 0, &capturing, why);
  if (status == POLYAK_OK && !capturing)
    status = s->ops->capturing(s->ctx, stream, 1, &capturing, why);
  if (status != POLYAK_OK)
    return polyak_offload_fail(p, status, function, why);
  if (!capturing)
    return POLYAK_OK;
  return polyak_fail(p, POLYAK_ERR_STATE,
                     "%s: a CUDA graph is being captured (on its stream or another), and an offloaded handle's "
                     "transfers wait on the host for their copies, which would break the capture or not be "
                     "replayed (graphs and shadows in host memory do not mix); call it before the capture begins "
                     "or after it ends",
                     function);
}

/* ---- the mirror and its copies --------------------------------------------- */

static size_t align_up(size_t n, size_t to)
{
  return (n + to - 1) / to * to;
}

static size_t elem_bytes(const polyak_tensor_desc *d)
{
  return polyak_dtype_num_bytes((polyak_dtype)d->param_dtype);
}

/* Each averaged tensor's piece in the mirror: right after the previous one
 * where the device has them adjacent (one copy brings both), else at the
 * next 64 bytes plus the device address's offset in its 64, so that the
 * mirror's alignments are the device's. -1 where there is no piece. */
static size_t lay_out_pieces(const polyak_t *p, int64_t *piece_offset)
{
  size_t end = 0;
  uintptr_t device_end = 0;
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor_desc *d = &p->descs[i];
    piece_offset[i] = -1;
    if (d->copy_only || d->local_num_elems == 0)
      continue;
    uintptr_t device = (uintptr_t)p->tensors[i].param + (uintptr_t)d->local_first_elem * elem_bytes(d);
    size_t offset = device == device_end && end > 0 ? end : align_up(end, 64) + device % 64;
    piece_offset[i] = (int64_t)offset;
    end = offset + (size_t)d->local_num_elems * elem_bytes(d);
    device_end = device + (size_t)d->local_num_elems * elem_bytes(d);
  }
  return end;
}

size_t polyak_offload_group_bytes(int64_t param_num_bytes)
{
  size_t spread = ((size_t)param_num_bytes + OFFLOAD_MAX_GROUPS - 1) / OFFLOAD_MAX_GROUPS;
  return spread > OFFLOAD_MIN_GROUP_BYTES ? spread : OFFLOAD_MIN_GROUP_BYTES;
}

polyak_status polyak_offload_plan(polyak_t *p, offload_state *s, size_t group_num_bytes)
{
  s->piece_offsets = malloc(((size_t)p->num_tensors + 1) * sizeof *s->piece_offsets);
  s->copies = malloc(((size_t)p->num_chunks + 1) * sizeof *s->copies);
  s->groups = malloc(((size_t)p->num_chunks + 1) * sizeof *s->groups); /* at most one per chunk */
  if (!s->piece_offsets || !s->copies || !s->groups)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory for the offload's copies");
  size_t end = lay_out_pieces(p, s->piece_offsets);
  s->copies_offset = align_up(end, 64);
  s->scalars_offset = align_up(s->copies_offset + (size_t)p->copies_num_bytes, 64);
  s->mirror_num_bytes = s->scalars_offset + sizeof(float) * ((size_t)p->num_tensors + 1);
  /* groups of about group_num_bytes of params; a copy per run of chunks
   * adjacent both on the device and in the mirror */
  int64_t num_copies = 0, group_bytes = 0;
  int num_groups = 0;
  for (int64_t c = 0; c < p->num_chunks; c++) {
    const polyak_chunk *chunk = &p->chunks[c];
    const polyak_tensor_desc *d = &p->descs[chunk->tensor];
    offload_group *group = &s->groups[num_groups];
    if (group_bytes == 0) {
      group->first_chunk = c;
      group->first_copy = num_copies;
    }
    int64_t unit = (int64_t)elem_bytes(d), num_bytes = chunk->num_elems * unit;
    char *device = (char *)p->tensors[chunk->tensor].param + chunk->first_elem * unit;
    int64_t mirror = s->piece_offsets[chunk->tensor] + (chunk->first_elem - d->local_first_elem) * unit;
    offload_copy *last = num_copies > group->first_copy ? &s->copies[num_copies - 1] : NULL;
    if (last && last->device + last->num_bytes == device && last->mirror_offset_bytes + last->num_bytes == mirror) {
      last->num_bytes += num_bytes;
    } else {
      s->copies[num_copies].mirror_offset_bytes = mirror;
      s->copies[num_copies].device = device;
      s->copies[num_copies].num_bytes = num_bytes;
      num_copies++;
    }
    group_bytes += num_bytes;
    if (group_bytes >= (int64_t)group_num_bytes || c == p->num_chunks - 1) {
      group->end_chunk = c + 1;
      group->end_copy = num_copies;
      num_groups++;
      group_bytes = 0;
    }
  }
  s->num_copies = num_copies;
  s->num_groups = num_groups;
  s->num_events = EV_GROUP0 + num_groups;
  return POLYAK_OK;
}

void polyak_offload_point_descs(polyak_t *p, offload_state *s)
{
  for (int i = 0; i < p->num_tensors; i++) {
    polyak_tensor_desc *d = &p->descs[i];
    /* element e of the param at param + e: the piece starts at local_first_elem */
    d->param =
        s->piece_offsets[i] < 0
            ? NULL
            : (void *)((uintptr_t)(s->mirror + s->piece_offsets[i]) - (uintptr_t)d->local_first_elem * elem_bytes(d));
  }
}

/* ---- reads and writes of the params ----------------------------------------- */

polyak_status polyak_offload_note_writes(polyak_t *p, offload_state *s, void *stream, const char *function)
{
  char why[POLYAK_ERROR_BYTES];
  polyak_status status = POLYAK_OK;
  /* EV_WRITES stands for one stream's work: chained, it covers every earlier write too */
  if (s->writes_recorded && s->writes_stream != stream)
    status = s->ops->stream_wait(s->ctx, stream, EV_WRITES, why);
  if (status == POLYAK_OK)
    status = s->ops->record(s->ctx, EV_WRITES, stream, why);
  if (status != POLYAK_OK)
    return polyak_offload_fail(p, status, function, why);
  s->writes_recorded = 1;
  s->writes_stream = stream;
  return POLYAK_OK;
}

polyak_status polyak_offload_wait_writes(polyak_t *p, offload_state *s, const char *function)
{
  char why[POLYAK_ERROR_BYTES];
  polyak_status status = s->writes_recorded ? s->ops->wait(s->ctx, EV_WRITES, why) : POLYAK_OK;
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, function, why);
}

/* The reads of an update, enqueued on the side stream after `stream`'s work
 * and the handle's writes: the small ones first, the scalars (EV_SCALARS,
 * *scalars = 1 if any) and the copy-only tensors (EV_COPIES), which the
 * trainer writes before its optimizer step (the forward's BatchNorm
 * statistics and counters, clip_grad_norm_'s norm), so that even with
 * overlapped reads the caller's stream waits for them (*small: the event
 * to wait on, -1 none); then each group (its event), then EV_READS. A
 * failure part way leaves copies in flight into the mirror: waited for
 * here, so that nothing else finds the mirror still being written. */
static polyak_status enqueue_reads(polyak_t *p, offload_state *s, void *stream, int *scalars, int *small, char *why)
{
  const polyak_transfer_ops *o = s->ops;
  void *ctx = s->ctx, *side = s->side;
  int last = -1; /* the last event recorded after a copy */
  *small = -1;
  polyak_status status = o->record(ctx, EV_START, stream, why);
  if (status == POLYAK_OK)
    status = o->stream_wait(ctx, side, EV_START, why);
  if (status == POLYAK_OK && s->writes_recorded) /* the mirror's last pushes read it still */
    status = o->stream_wait(ctx, side, EV_WRITES, why);
  *scalars = p->grad_norm != NULL || s->layer_norms != NULL;
  char *scalar = s->mirror + s->scalars_offset;
  if (status == POLYAK_OK && p->grad_norm)
    status = o->copy(ctx, scalar, p->grad_norm, sizeof(float), POLYAK_TO_HOST, side, why);
  if (status == POLYAK_OK && s->layer_norms)
    status = o->copy(ctx, scalar + sizeof(float), s->layer_norms, sizeof(float) * (size_t)p->num_tensors,
                     POLYAK_TO_HOST, side, why);
  if (status == POLYAK_OK && *scalars && (status = o->record(ctx, EV_SCALARS, side, why)) == POLYAK_OK)
    last = *small = EV_SCALARS;
  for (int64_t c = 0; c < p->num_copy_chunks && status == POLYAK_OK; c++) {
    const polyak_copy_chunk *chunk = &p->copy_chunks[c];
    status = o->copy(ctx, s->mirror + s->copies_offset + chunk->mirror_offset_bytes, chunk->param,
                     (size_t)chunk->num_bytes, POLYAK_TO_HOST, side, why);
  }
  if (status == POLYAK_OK && p->num_copy_chunks > 0 && (status = o->record(ctx, EV_COPIES, side, why)) == POLYAK_OK)
    last = *small = EV_COPIES;
  for (int g = 0; g < s->num_groups && status == POLYAK_OK; g++) {
    for (int64_t c = s->groups[g].first_copy; c < s->groups[g].end_copy && status == POLYAK_OK; c++)
      status = o->copy(ctx, s->mirror + s->copies[c].mirror_offset_bytes, s->copies[c].device,
                       (size_t)s->copies[c].num_bytes, POLYAK_TO_HOST, side, why);
    if (status == POLYAK_OK && (status = o->record(ctx, EV_GROUP0 + g, side, why)) == POLYAK_OK)
      last = EV_GROUP0 + g;
  }
  char ignored[POLYAK_ERROR_BYTES];
  polyak_status ended = o->record(ctx, EV_READS, side, status == POLYAK_OK ? why : ignored);
  if (status == POLYAK_OK)
    status = ended;
  if (ended == POLYAK_OK)
    s->reads_recorded = 1;
  if (status != POLYAK_OK && ended == POLYAK_OK)
    o->wait(ctx, EV_READS, ignored);
  else if (status != POLYAK_OK && last >= 0) /* EV_READS not recorded: the last event that was */
    o->wait(ctx, last, ignored);
  return status;
}

polyak_status polyak_offload_pull(polyak_t *p, offload_state *s, void *stream, const char *function)
{
  char why[POLYAK_ERROR_BYTES];
  int scalars = 0, small = -1;
  polyak_status status = enqueue_reads(p, s, stream, &scalars, &small, why);
  if (status == POLYAK_OK)
    status = s->ops->wait(s->ctx, EV_READS, why);
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, function, why);
}

polyak_status polyak_offload_push(polyak_t *p, offload_state *s, void *stream, const char *function)
{
  char why[POLYAK_ERROR_BYTES];
  POLYAK_TRY(polyak_offload_refuse_capture(p, stream, function));
  polyak_status status = POLYAK_OK;
  for (int64_t c = 0; c < s->num_copies && status == POLYAK_OK; c++)
    status = s->ops->copy(s->ctx, s->copies[c].device, s->mirror + s->copies[c].mirror_offset_bytes,
                          (size_t)s->copies[c].num_bytes, POLYAK_TO_DEVICE, stream, why);
  if (status != POLYAK_OK) /* what was enqueued is still a write to cover */
    polyak_offload_note_writes(p, s, stream, function);
  if (status != POLYAK_OK)
    return polyak_offload_fail(p, status, function, why);
  return polyak_offload_note_writes(p, s, stream, function);
}

/* ---- the fold --------------------------------------------------------------------- */

/* An update's arithmetic, group by group as each one's params arrive: on
 * the handle's thread, or at a Lookahead sync on the caller's. */
static polyak_status fold(polyak_t *p, offload_state *s, const offload_job *job, char *why)
{
  const polyak_transfer_ops *o = s->ops;
  const float *grad_norm = NULL;
  polyak_status status = POLYAK_OK;
  if (job->scalars) { /* every chunk's weights need them */
    status = o->wait(s->ctx, EV_SCALARS, why);
    if (status != POLYAK_OK)
      return status;
    if (polyak_has_grad_norm(&p->cfg))
      grad_norm = (const float *)(s->mirror + s->scalars_offset);
  }
  polyak_update_args resolved;
  polyak_cpu_resolve_update(p, &s->host, &job->args, grad_norm, &resolved);
  int64_t nonfinite = 0;
  for (int g = 0; g < s->num_groups && status == POLYAK_OK; g++) {
    status = o->wait(s->ctx, EV_GROUP0 + g, why);
    if (status == POLYAK_OK)
      nonfinite += polyak_cpu_update_chunks(p, &s->host, &resolved, s->groups[g].first_chunk, s->groups[g].end_chunk);
  }
  if (status == POLYAK_OK && p->num_copy_chunks > 0)
    status = o->wait(s->ctx, EV_COPIES, why);
  if (status == POLYAK_OK && p->num_copy_chunks > 0)
    memcpy(p->copies, s->mirror + s->copies_offset, (size_t)p->copies_num_bytes);
  s->host.nonfinite_count += nonfinite;
  return status;
}

/* A fold that failed part way: the shadows may be half updated. */
static void mark_broken(offload_state *s, int64_t step, const char *why)
{
  s->broken = 1;
  snprintf(s->broken_why, sizeof s->broken_why, "the update of step %lld failed part way (%.400s)", (long long)step,
           why);
}

static void *thread_main(void *arg)
{
  polyak_t *p = arg;
  offload_state *s = offload_of(p);
  if (s->ops->thread_start)
    s->ops->thread_start(s->ctx);
  pthread_mutex_lock(&s->lock);
  for (;;) {
    while (!s->busy && !s->stop)
      pthread_cond_wait(&s->wake, &s->lock);
    if (!s->busy)
      break;
    offload_job job = s->job;
    int64_t step = s->job_step;
    pthread_mutex_unlock(&s->lock);
    char why[POLYAK_ERROR_BYTES] = "";
    polyak_status status = fold(p, s, &job, why);
    pthread_mutex_lock(&s->lock);
    if (status != POLYAK_OK) {
      s->failed = status;
      snprintf(s->failed_why, sizeof s->failed_why,
               "the update of step %lld failed after polyak_update returned: %.400s", (long long)step, why);
      mark_broken(s, step, why);
    }
    s->busy = 0;
    pthread_cond_broadcast(&s->idle);
  }
  pthread_mutex_unlock(&s->lock);
  return NULL;
}

polyak_status polyak_offload_start_thread(polyak_t *p, offload_state *s)
{
  if (pthread_create(&s->thread, NULL, thread_main, p) != 0)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: cannot start the offload's thread");
  s->thread_started = 1;
  return POLYAK_OK;
}

void polyak_offload_stop_thread(offload_state *s)
{
  if (!s->thread_started)
    return;
  pthread_mutex_lock(&s->lock);
  s->stop = 1;
  pthread_cond_broadcast(&s->wake);
  pthread_mutex_unlock(&s->lock);
  pthread_join(s->thread, NULL); /* it finishes the update in flight first */
  s->thread_started = 0;
}

void polyak_offload_idle(offload_state *s)
{
  pthread_mutex_lock(&s->lock);
  while (s->busy)
    pthread_cond_wait(&s->idle, &s->lock);
  pthread_mutex_unlock(&s->lock);
}

/* The error of queued work not reported yet (POLYAK_OK if none), taken. */
static polyak_status take_failure(offload_state *s, char *why)
{
  pthread_mutex_lock(&s->lock);
  polyak_status status = s->failed;
  memcpy(why, s->failed_why, POLYAK_ERROR_BYTES);
  s->failed = POLYAK_OK;
  pthread_mutex_unlock(&s->lock);
  return status;
}

polyak_status polyak_offload_join(polyak_t *p, const char *function)
{
  offload_state *s = offload_of(p);
  if (!s)
    return POLYAK_OK;
  polyak_offload_idle(s);
  char why[POLYAK_ERROR_BYTES];
  polyak_status status = take_failure(s, why);
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, function, why);
}

/* ---- the update ------------------------------------------------------------------- */

polyak_status polyak_offload_update(polyak_t *p, const polyak_update_args *args, void *stream)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES];
  /* before the host waits for an update in flight: a capture is refused at once */
  int capturing = 0;
  polyak_status status = s->ops->capturing(s->ctx, stream, 0, &capturing, why);
  if (status != POLYAK_OK)
    return polyak_offload_fail(p, status, "polyak_update", why);
  if (!capturing && args->write_back) /* Lookahead's sync waits on the host and writes the params */
    POLYAK_TRY(polyak_offload_refuse_capture(p, stream, "polyak_update"));
  if (capturing)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_update: the stream is being captured into a CUDA graph, and an offloaded update "
                       "folds on the host after its copies, which a replay cannot repeat; update outside the "
                       "capture (graphs and shadows in host memory do not mix)");
  POLYAK_TRY(polyak_offload_join(p, "polyak_update")); /* an update in flight: the host waits for it */
  if (s->broken)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_update: %s, so the shadows may be partly updated; updates are refused until a "
                       "checkpoint is loaded",
                       s->broken_why);
  offload_job job;
  job.args = *args;
  int small = -1;
  status = enqueue_reads(p, s, stream, &job.scalars, &small, why);
  /* Lookahead's sync writes the params: after the reads, before the caller goes on */
  int sync = args->write_back;
  if (status == POLYAK_OK && (!p->overlap_reads || sync))
    status = s->ops->stream_wait(s->ctx, stream, EV_READS, why);
  else if (status == POLYAK_OK && small >= 0) /* overlapped: still after the small reads */
    status = s->ops->stream_wait(s->ctx, stream, small, why);
  if (status != POLYAK_OK) /* nothing folded: the shadows are as they were */
    return polyak_offload_fail(p, status, "polyak_update", why);
  if (sync) {
    status = fold(p, s, &job, why);
    if (status == POLYAK_OK)
      status = polyak_offload_push(p, s, stream, "polyak_update: Lookahead's write-back");
    else
      polyak_offload_fail(p, status, "polyak_update", why);
    if (status != POLYAK_OK) {
      pthread_mutex_lock(&s->lock);
      mark_broken(s, args->step, p->last_error);
      pthread_mutex_unlock(&s->lock);
    }
    return status;
  }
  pthread_mutex_lock(&s->lock);
  s->job = job;
  s->job_step = args->step;
  s->busy = 1;
  pthread_cond_signal(&s->wake);
  pthread_mutex_unlock(&s->lock);
  return POLYAK_OK;
}

/* ---- overlapping the reads -------------------------------------------------------- */

polyak_status polyak_overlap_param_reads(polyak_t *p, int overlap)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (overlap != 0 && overlap != 1)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_overlap_param_reads: overlap = %d is not 0 or 1", overlap);
  p->overlap_reads = overlap;
  return POLYAK_OK;
}

polyak_status polyak_wait_param_reads(polyak_t *p, void *stream)
{
  POLYAK_TRY(polyak_require_finalized(p, "polyak_wait_param_reads"));
  if (!polyak_offloaded(p)) /* the update read the params on its stream (or on the host) */
    return POLYAK_OK;
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES];
  POLYAK_TRY(polyak_offload_refuse_capture(p, stream, "polyak_wait_param_reads"));
  polyak_status status = take_failure(s, why); /* known by now: no wait for the host */
  if (status != POLYAK_OK)
    return polyak_offload_fail(p, status, "polyak_wait_param_reads", why);
  status = s->reads_recorded ? s->ops->stream_wait(s->ctx, stream, EV_READS, why) : POLYAK_OK;
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, "polyak_wait_param_reads", why);
}
