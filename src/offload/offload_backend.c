/* offload_backend.c: the offloaded handle's table of backend operations.
 * Its host side is the CPU backend's (shadows, workers, arithmetic, LAWA's
 * arrays, staging for loads), its descs point at the mirror, so most
 * operations are the CPU backend's around a transfer: a pull of the params
 * into the mirror before (hard updates), a push of the mirror into the
 * params after (copies to the params, blends into them, synthesis), or the
 * ring for read-outs into device memory. Every operation first waits for an
 * update in flight (polyak_offload_join), which also reports its error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_readout.h"
#include "offload.h"

static polyak_status locate(polyak_t *p, const void *ptr, size_t num_bytes, int *where, const char *function)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES];
  polyak_status status = s->ops->locate(s->ctx, ptr, num_bytes, where, why);
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, function, why);
}

/* Device memory of the handle's device, or refused. */
static polyak_status need_device(polyak_t *p, const void *ptr, size_t num_bytes, const char *what)
{
  int where = POLYAK_MEMORY_HOST;
  POLYAK_TRY(locate(p, ptr, num_bytes, &where, what));
  if (where != POLYAK_MEMORY_DEVICE)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s %p is host memory; an offloaded handle (shadows in host memory) reads device memory "
                       "on device %d",
                       what, ptr, p->cfg.device);
  return POLYAK_OK;
}

/* ---- opening, finalize, release ----------------------------------------------- */

static void offload_release(polyak_t *p)
{
  offload_state *s = offload_of(p);
  if (!s)
    return;
  polyak_offload_stop_thread(s);
  if (s->ctx) {
    char ignored[POLYAK_ERROR_BYTES];
    for (int event = 0; event < s->num_events; event++) /* every copy is followed by a record */
      s->ops->wait(s->ctx, event, ignored);
    if (s->mirror)
      s->ops->free_pinned(s->ctx, s->mirror);
    if (s->ring)
      s->ops->free_pinned(s->ctx, s->ring);
    s->ops->close(s->ctx);
  }
  polyak_cpu_state_free(&s->host);
  free(s->piece_offsets);
  free(s->copies);
  free(s->groups);
  pthread_mutex_destroy(&s->lock);
  pthread_cond_destroy(&s->wake);
  pthread_cond_destroy(&s->idle);
  free(s);
  p->backend = NULL;
}

/* The state, the plan of copies, the device side and the ring: what the
 * params' checks and the copy-only tensors' first copies (before
 * finalize's own part) need. */
static polyak_status open_state(polyak_t *p)
{
  offload_state *s = calloc(1, sizeof *s);
  if (!s)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory");
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->wake, NULL);
  pthread_cond_init(&s->idle, NULL);
  p->backend = s;
  s->ops = p->transfer;
  size_t staging = p->staging_num_bytes ? p->staging_num_bytes : OFFLOAD_DEFAULT_STAGING_BYTES;
  s->slot_num_bytes = staging / OFFLOAD_RING_SLOTS / 64 * 64;
  /* groups of their own size, not a slot's: enough of them to overlap the
   * link and the host, few enough that an event each costs nothing */
  int64_t param_bytes = 0;
  for (int64_t c = 0; c < p->num_chunks; c++)
    param_bytes += p->chunks[c].num_elems *
                   (int64_t)polyak_dtype_num_bytes((polyak_dtype)p->descs[p->chunks[c].tensor].param_dtype);
  size_t group = p->offload_group_bytes ? p->offload_group_bytes : polyak_offload_group_bytes(param_bytes);
  POLYAK_TRY(polyak_offload_plan(p, s, group));
  char why[POLYAK_ERROR_BYTES];
  polyak_status status = s->ops->open(p->transfer_arg, p, s->num_events, &s->ctx, &s->side, why);
  if (status != POLYAK_OK) {
    s->ctx = NULL;
    return polyak_fail(p, status, "polyak_finalize: opening the %s side of the offload: %s", s->ops->name, why);
  }
  s->ring = s->ops->alloc_pinned(s->ctx, s->slot_num_bytes * OFFLOAD_RING_SLOTS);
  if (!s->ring)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: cannot pin %zu bytes of host memory for staging",
                       s->slot_num_bytes * OFFLOAD_RING_SLOTS);
  return POLYAK_OK;
}

static polyak_status offload_check_params(polyak_t *p)
{
  POLYAK_TRY(open_state(p));
  char what[POLYAK_ERROR_BYTES];
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (t->num_elems == 0)
      continue;
    snprintf(what, sizeof what, "polyak_finalize: tensor %d (\"%s\") param", i, t->name);
    POLYAK_TRY(need_device(p, t->param, (size_t)t->num_elems * polyak_dtype_num_bytes(t->dtype), what));
  }
  return POLYAK_OK;
}

static int64_t count_nonfinite_visit(const polyak_t *p, const polyak_chunk *chunk, void *arg)
{
  (void)arg;
  const polyak_tensor_desc *d = &p->descs[chunk->tensor];
  int64_t count = 0;
  for (int64_t e = chunk->first_elem; e < chunk->first_elem + chunk->num_elems; e++)
    count += !polyak_is_finite(polyak_load_f32(d->param, e, d->param_dtype));
  return count;
}

static polyak_status nonfinite_at(polyak_t *p, int tensor, int64_t elem, float value, const char *function)
{
  return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                     "%s: tensor %d (\"%s\") holds %s at element %lld; with skip_nonfinite its shadow would stay so "
                     "forever (fix the params, or set skip_nonfinite = 0)",
                     function, tensor, p->tensors[tensor].name, value != value ? "NaN" : "Inf", (long long)elem);
}

/* The mirror's params (this rank's pieces): counted across the threads,
 * the first one named. */
static polyak_status refuse_nonfinite_mirror(polyak_t *p, const char *function)
{
  if (polyak_cpu_for_chunks(p, count_nonfinite_visit, NULL) == 0)
    return POLYAK_OK;
  for (int64_t c = 0; c < p->num_chunks; c++) {
    const polyak_chunk *chunk = &p->chunks[c];
    const polyak_tensor_desc *d = &p->descs[chunk->tensor];
    for (int64_t e = chunk->first_elem; e < chunk->first_elem + chunk->num_elems; e++) {
      float value = polyak_load_f32(d->param, e, d->param_dtype);
      if (!polyak_is_finite(value))
        return nonfinite_at(p, chunk->tensor, e, value, function);
    }
  }
  return POLYAK_OK;
}

/* With a communicator every rank learns whether all finalized, with the
 * same tensors and config (as the CUDA backend's handshake). */
static polyak_status handshake(polyak_t *p, offload_state *s, polyak_status status)
{
  char why[POLYAK_ERROR_BYTES];
  int all_ok = 0, same = 0, other = -1;
  polyak_status agreed =
      s->ops->finalize_agree(s->ctx, polyak_layout_hash(p), status == POLYAK_OK, &all_ok, &same, &other, why);
  if (status != POLYAK_OK)
    return status;
  if (agreed != POLYAK_OK)
    return polyak_offload_fail(p, agreed, "polyak_finalize", why);
  if (!all_ok)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_finalize: another rank failed to finalize");
  if (!same)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_finalize: rank %d registered other tensors or has another config than rank %d; "
                       "every rank must register the same tensors with the same config",
                       other, p->cfg.rank);
  return POLYAK_OK;
}

static polyak_status offload_finalize(polyak_t *p, void *stream, polyak_status prior)
{
  offload_state *s = offload_of(p);
  polyak_status status = prior;
  if (status == POLYAK_OK) {
    s->mirror = s->ops->alloc_pinned(s->ctx, s->mirror_num_bytes);
    if (!s->mirror)
      status = polyak_fail(p, POLYAK_ERR_NO_MEMORY,
                           "polyak_finalize: cannot pin %zu bytes of host memory for the copy of this rank's params "
                           "(docs/offload.md: pinned memory)",
                           s->mirror_num_bytes);
  }
  if (status == POLYAK_OK) {
    polyak_offload_point_descs(p, s);
    status = polyak_offload_pull(p, s, stream, "polyak_finalize: copying the params");
  }
  if (status == POLYAK_OK) /* workers, arenas, shadows from the mirror */
    status = polyak_cpu_state_init(p, &s->host);
  if (status == POLYAK_OK && p->cfg.skip_nonfinite && !p->cfg.zero_init)
    status = refuse_nonfinite_mirror(p, "polyak_finalize");
  if (status == POLYAK_OK)
    status = polyak_offload_start_thread(p, s);
  if (p->cfg.nccl_comm && s && s->ctx && s->ops->finalize_agree)
    status = handshake(p, s, status);
  if (status != POLYAK_OK)
    offload_release(p);
  return status;
}

/* ---- read-outs ------------------------------------------------------------------ */

typedef struct {
  const void *src;
  polyak_dtype src_dtype, dst_dtype;
  double debias_scale;
} read_out_job;

static polyak_status produce_read_out(polyak_t *p, void *arg, int64_t offset, int64_t num_bytes, void *slot)
{
  const read_out_job *job = arg;
  size_t dst_bytes = polyak_dtype_num_bytes(job->dst_dtype), src_bytes = polyak_dtype_num_bytes(job->src_dtype);
  const char *src = (const char *)job->src + offset / (int64_t)dst_bytes * (int64_t)src_bytes;
  return polyak_cpu_read_out(p, src, job->src_dtype, num_bytes / (int64_t)dst_bytes, job->debias_scale, slot,
                             job->dst_dtype, NULL);
}

static polyak_status offload_read_out(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                                      double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream)
{
  int where = POLYAK_MEMORY_HOST;
  size_t dst_bytes = polyak_dtype_num_bytes(dst_dtype);
  POLYAK_TRY(polyak_offload_join(p, "reading a shadow out"));
  if (num_elems == 0)
    return POLYAK_OK;
  POLYAK_TRY(locate(p, dst, (size_t)num_elems * dst_bytes, &where, "reading a shadow out"));
  if (where == POLYAK_MEMORY_HOST)
    return polyak_cpu_read_out(p, src, src_dtype, num_elems, debias_scale, dst, dst_dtype, stream);
  read_out_job job = {src, src_dtype, dst_dtype, debias_scale};
  return polyak_offload_ring_write(p, dst, num_elems * (int64_t)dst_bytes, dst_bytes, produce_read_out, &job, stream,
                                   "reading a shadow out");
}

/* Destinations (and the snapshots synthesis reads): device memory of the
 * handle's device or host memory, either. */
static polyak_status offload_check_read_out(polyak_t *p, const void *dst, size_t num_bytes, void *stream,
                                            const char *function)
{
  (void)stream;
  int where = POLYAK_MEMORY_HOST;
  POLYAK_TRY(polyak_offload_join(p, function));
  return locate(p, dst, num_bytes, &where, function);
}

typedef struct {
  const float *coefficient;
  const polyak_tensor_desc *t;
  polyak_dtype dst_dtype;
} blend_job;

/* Elements offset / dst size .. of the blend of one tensor, as blends do on
 * the CPU (polyak_blend_step in shadow order). */
static polyak_status produce_blend(polyak_t *p, void *arg, int64_t offset, int64_t num_bytes, void *slot)
{
  const blend_job *job = arg;
  const offload_state *s = offload_of(p);
  int64_t unit = (int64_t)polyak_dtype_num_bytes(job->dst_dtype), first = offset / unit;
  for (int64_t e = 0; e < num_bytes / unit; e++) {
    float acc = 0.0f;
    for (int k = 0; k < p->cfg.num_shadows; k++)
      if (job->coefficient[k] != 0.0f)
        acc = polyak_blend_step(acc, job->coefficient[k],
                                polyak_shadow_load(job->t, s->host.shadows[k], p->cfg.shadow_dtype, k, first + e));
    polyak_store_f32(slot, e, acc, job->dst_dtype);
  }
  return POLYAK_OK;
}

/* ---- writes into the params: computed into the mirror, then pushed ------------- */

/* Before the host writes the mirror: no copy reads it any more. */
static polyak_status take_mirror(polyak_t *p, void *stream, const char *function)
{
  POLYAK_TRY(polyak_offload_refuse_capture(p, stream, function)); /* before any host wait */
  POLYAK_TRY(polyak_offload_join(p, function));
  return polyak_offload_wait_writes(p, offload_of(p), function);
}

static polyak_status offload_copy_to_params(polyak_t *p, int shadow, double debias_scale, void *stream)
{
  POLYAK_TRY(take_mirror(p, stream, "polyak_copy_to_params"));
  polyak_cpu_copy_to_params(p, shadow, debias_scale, stream);
  return polyak_offload_push(p, offload_of(p), stream, "polyak_copy_to_params");
}

static polyak_status offload_blend(polyak_t *p, const float *coefficient, int tensor, void *dst, polyak_dtype dst_dtype,
                                   void *stream)
{
  if (tensor < 0) { /* into the params */
    POLYAK_TRY(take_mirror(p, stream, "polyak_blend_to_params"));
    polyak_cpu_blend(p, coefficient, -1, NULL, POLYAK_F32, stream);
    return polyak_offload_push(p, offload_of(p), stream, "polyak_blend_to_params");
  }
  int where = POLYAK_MEMORY_HOST;
  const polyak_tensor_desc *t = &p->descs[tensor];
  size_t unit = polyak_dtype_num_bytes(dst_dtype);
  POLYAK_TRY(polyak_offload_join(p, "polyak_get_blend"));
  if (t->num_elems == 0)
    return POLYAK_OK;
  POLYAK_TRY(locate(p, dst, (size_t)t->num_elems * unit, &where, "polyak_get_blend"));
  if (where == POLYAK_MEMORY_HOST)
    return polyak_cpu_blend(p, coefficient, tensor, dst, dst_dtype, stream);
  blend_job job = {coefficient, t, dst_dtype};
  return polyak_offload_ring_write(p, dst, t->num_elems * (int64_t)unit, unit, produce_blend, &job, stream,
                                   "polyak_get_blend");
}

static polyak_status offload_synthesize(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                                        void *stream)
{
  int where = POLYAK_MEMORY_HOST;
  POLYAK_TRY(take_mirror(p, stream, "polyak_synthesize_to_params"));
  POLYAK_TRY(locate(p, snapshots, (size_t)num_snapshots * (size_t)p->arena_elems * sizeof(float), &where,
                    "polyak_synthesize_to_params"));
  if (where == POLYAK_MEMORY_DEVICE && p->arena_elems > 0)
    return polyak_fail(p, POLYAK_ERR_UNSUPPORTED,
                       "polyak_synthesize_to_params: the snapshots are device memory; an offloaded handle "
                       "synthesizes on the host from snapshots in host memory (polyak_snapshot into host memory)");
  polyak_cpu_synthesize(p, snapshots, num_snapshots, weight, stream);
  return polyak_offload_push(p, offload_of(p), stream, "polyak_synthesize_to_params");
}

/* ---- hard updates, polyak_store's copy ------------------------------------------ */

typedef struct {
  int tensor;
  polyak_dtype dtype;
} scan_job;

/* A piece of a param read through the ring: its first non-finite element refused. */
static polyak_status scan_piece(polyak_t *p, void *arg, int64_t offset, int64_t num_bytes, const void *slot)
{
  const scan_job *job = arg;
  int64_t unit = (int64_t)polyak_dtype_num_bytes(job->dtype);
  for (int64_t e = 0; e < num_bytes / unit; e++) {
    float value = polyak_load_f32(slot, e, job->dtype);
    if (!polyak_is_finite(value))
      return nonfinite_at(p, job->tensor, offset / unit + e, value, "polyak_hard_update");
  }
  return POLYAK_OK;
}

static int64_t copy_params_visit(const polyak_t *p, const polyak_chunk *chunk, void *arg)
{
  int k = *(const int *)arg;
  const polyak_tensor_desc *d = &p->descs[chunk->tensor];
  void *arena = offload_of(p)->host.shadows[k];
  for (int64_t e = chunk->first_elem; e < chunk->first_elem + chunk->num_elems; e++)
    polyak_shadow_store(d, arena, p->cfg.shadow_dtype, k, e, polyak_load_f32(d->param, e, d->param_dtype));
  return 0;
}

static polyak_status offload_hard_update(polyak_t *p, int shadow, void *stream)
{
  offload_state *s = offload_of(p);
  POLYAK_TRY(polyak_offload_join(p, "polyak_hard_update"));
  /* every rank refuses alike: sharded, each scans the whole params */
  for (int i = 0; i < p->num_tensors && p->cfg.skip_nonfinite && p->cfg.world_size > 1; i++) {
    const polyak_tensor *t = &p->tensors[i];
    scan_job job = {i, t->dtype};
    if (!t->copy_only && t->num_elems > 0)
      POLYAK_TRY(polyak_offload_ring_read(p, t->param, t->num_elems * (int64_t)polyak_dtype_num_bytes(t->dtype),
                                          polyak_dtype_num_bytes(t->dtype), scan_piece, &job, stream,
                                          "polyak_hard_update"));
  }
  POLYAK_TRY(polyak_offload_pull(p, s, stream, "polyak_hard_update"));
  if (p->cfg.skip_nonfinite && p->cfg.world_size == 1)
    POLYAK_TRY(refuse_nonfinite_mirror(p, "polyak_hard_update"));
  polyak_cpu_for_chunks(p, copy_params_visit, &shadow);
  return POLYAK_OK;
}

static polyak_status offload_store(polyak_t *p, void *stream)
{
  offload_state *s = offload_of(p);
  POLYAK_TRY(polyak_offload_join(p, "polyak_store"));
  if (!s->host.store && !(s->host.store = malloc((size_t)p->store_bytes + 16)))
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_store: out of host memory for %lld bytes",
                       (long long)p->store_bytes);
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    POLYAK_TRY(polyak_offload_move(p, (char *)s->host.store + p->descs[i].store_offset_bytes, t->param,
                                   (size_t)t->num_elems * polyak_dtype_num_bytes(t->dtype), stream, "polyak_store"));
  }
  return POLYAK_OK;
}

static polyak_status offload_restore(polyak_t *p, void *stream)
{
  offload_state *s = offload_of(p);
  POLYAK_TRY(polyak_offload_join(p, "polyak_restore"));
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    POLYAK_TRY(polyak_offload_move(p, t->param, (const char *)s->host.store + p->descs[i].store_offset_bytes,
                                   (size_t)t->num_elems * polyak_dtype_num_bytes(t->dtype), stream, "polyak_restore"));
  }
  return POLYAK_OK;
}

/* ---- what updates read besides the params --------------------------------------- */

static polyak_status offload_set_layer_source(polyak_t *p, void *const *grads, const float *norms)
{
  offload_state *s = offload_of(p);
  POLYAK_TRY(polyak_offload_join(p, grads ? "polyak_set_grads" : "polyak_set_layer_norms"));
  if (grads)
    return polyak_fail(p, POLYAK_ERR_UNSUPPORTED,
                       "polyak_set_grads: an offloaded handle does not copy whole gradients to the host; compute "
                       "each tensor's gradient norm on the device and pass them by polyak_set_layer_norms");
  POLYAK_TRY(need_device(p, norms, sizeof(float) * (size_t)p->num_tensors, "polyak_set_layer_norms: norms"));
  /* the host side reads the copy each update brings */
  POLYAK_TRY(polyak_cpu_ops.set_layer_source(p, NULL, (const float *)(s->mirror + s->scalars_offset + sizeof(float))));
  s->layer_norms = norms;
  return POLYAK_OK;
}

static polyak_status offload_check_grad_norm(polyak_t *p, const float *grad_norm)
{
  POLYAK_TRY(polyak_offload_join(p, "polyak_set_grad_norm"));
  return need_device(p, grad_norm, sizeof *grad_norm, "polyak_set_grad_norm: grad_norm");
}

/* ---- the CPU backend's operations, after the update in flight ------------------- */

#define AFTER_JOIN(name, function, params, args)  \
  static polyak_status name params                \
  {                                               \
    POLYAK_TRY(polyak_offload_join(p, function)); \
    return args;                                  \
  }

AFTER_JOIN(offload_nonfinite_count, "polyak_nonfinite_count", (polyak_t * p, int64_t *count),
           polyak_cpu_ops.nonfinite_count(p, count))
AFTER_JOIN(offload_products_read, "reading the grad-norm beta products", (polyak_t * p, double *products),
           polyak_cpu_ops.products_read(p, products))
AFTER_JOIN(offload_products_write, "writing the grad-norm beta products", (polyak_t * p, const double *products),
           polyak_cpu_ops.products_write(p, products))
AFTER_JOIN(offload_layer_betas, "polyak_get_layer_betas", (polyak_t * p, double *betas),
           polyak_cpu_ops.layer_betas(p, betas))
AFTER_JOIN(offload_staging_begin, "polyak_load", (polyak_t * p), polyak_cpu_staging_begin(p))
AFTER_JOIN(offload_staging_write, "polyak_load",
           (polyak_t * p, int shadow, int64_t first_elem, int64_t num_elems, const void *host),
           polyak_cpu_staging_write(p, shadow, first_elem, num_elems, host))
AFTER_JOIN(offload_copy_to_host, "copying shadows to the host",
           (polyak_t * p, void *host, const void *src, size_t num_bytes),
           polyak_offload_move(p, host, src, num_bytes, NULL, "copying shadows to the host"))
AFTER_JOIN(offload_copy_from_host, "copying from the host",
           (polyak_t * p, void *dst, const void *host, size_t num_bytes),
           polyak_offload_move(p, dst, host, num_bytes, NULL, "copying from the host"))
AFTER_JOIN(offload_copy_bytes, "copying", (polyak_t * p, void *dst, const void *src, size_t num_bytes, void *stream),
           polyak_offload_move(p, dst, src, num_bytes, stream, "copying"))

/* A load replaces every shadow: what a failed update left is gone. */
static polyak_status offload_staging_commit(polyak_t *p, int64_t nonfinite_count, const void *copies)
{
  offload_state *s = offload_of(p);
  POLYAK_TRY(polyak_offload_join(p, "polyak_load"));
  POLYAK_TRY(polyak_cpu_staging_commit(p, nonfinite_count, copies));
  s->broken = 0;
  return POLYAK_OK;
}

static void offload_staging_abort(polyak_t *p)
{
  polyak_offload_idle(offload_of(p));
  polyak_cpu_staging_abort(p);
}

static void *offload_scratch_alloc(polyak_t *p, size_t num_bytes)
{
  return polyak_cpu_scratch_alloc(p, num_bytes);
}

static void offload_scratch_free(polyak_t *p, void *scratch)
{
  if (p->backend) /* an update in flight may still write the copy-only tensors' mirrors */
    polyak_offload_idle(offload_of(p));
  polyak_cpu_scratch_free(p, scratch);
}

/* ---- graphs: refused ---------------------------------------------------------------- */

static polyak_status refuse_graphs(polyak_t *p, const char *function)
{
  return polyak_fail(p, POLYAK_ERR_UNSUPPORTED,
                     "%s: an offloaded handle (shadows in host memory) folds on the host after its copies, which "
                     "a graph replay cannot repeat; use polyak_update outside graphs",
                     function);
}

static polyak_status offload_graph_reserve(polyak_t *p, void *stream)
{
  (void)stream;
  return refuse_graphs(p, "polyak_graph_reserve");
}

static polyak_status offload_graph_update(polyak_t *p, void *stream)
{
  (void)stream;
  return refuse_graphs(p, "polyak_graph_update");
}

static polyak_status offload_graph_release(polyak_t *p, int64_t *consumed, int64_t *dropped)
{
  *consumed = *dropped = 0;
  return refuse_graphs(p, "polyak_graph_release");
}

/* ---- ranks, captures --------------------------------------------------------------- */

static polyak_status offload_all_gather(polyak_t *p, const void *send, void *recv, int64_t count, void *stream)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES];
  POLYAK_TRY(polyak_offload_join(p, "gathering the shadows"));
  if (!s->ops->all_gather)
    return polyak_fail(p, POLYAK_ERR_UNSUPPORTED, "gathering the shadows: the %s side has no communicator",
                       s->ops->name);
  polyak_status status =
      s->ops->all_gather(s->ctx, send, recv, count, polyak_dtype_num_bytes(p->cfg.shadow_dtype), stream, why);
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, "gathering the shadows", why);
}

static polyak_status offload_agree(polyak_t *p, int local_ok, int *all_ok)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES];
  *all_ok = local_ok;
  if (!s || !s->ctx || !s->ops->agree)
    return POLYAK_OK;
  polyak_status status = s->ops->agree(s->ctx, local_ok, all_ok, why);
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, "agreeing", why);
}

static polyak_status capturing(polyak_t *p, void *stream, int any_visible, int *capturing)
{
  offload_state *s = offload_of(p);
  char why[POLYAK_ERROR_BYTES];
  *capturing = 0;
  if (!s || !s->ctx)
    return POLYAK_OK;
  polyak_status status = s->ops->capturing(s->ctx, stream, any_visible, capturing, why);
  return status == POLYAK_OK ? status : polyak_offload_fail(p, status, "cudaStreamIsCapturing", why);
}

static polyak_status offload_capturing(polyak_t *p, void *stream, int *capturing_now)
{
  return capturing(p, stream, 0, capturing_now);
}

static polyak_status offload_capture_under_way(polyak_t *p, int *under_way)
{
  return capturing(p, NULL, 1, under_way);
}

/* ---- the table and its set-up ------------------------------------------------------- */

const polyak_backend_ops polyak_offload_ops = {
    .available = NULL, /* the CUDA backend's: polyak_backend_ops_of never gives this table */
    .check_config = NULL,
    .owns_memory = NULL,
    .memory_name = "host memory",
    .check_params = offload_check_params,
    .finalize = offload_finalize,
    .update = polyak_offload_update,
    .arena = polyak_cpu_arena,
    .read_out = offload_read_out,
    .check_read_out = offload_check_read_out,
    .nonfinite_count = offload_nonfinite_count,
    .release = offload_release,
    .graph_reserve = offload_graph_reserve,
    .graph_update = offload_graph_update,
    .graph_release = offload_graph_release,
    .host_buffer = polyak_cpu_host_buffer,
    .free_host_buffer = polyak_cpu_free_host_buffer,
    .copy_to_host = offload_copy_to_host,
    .copy_from_host = offload_copy_from_host,
    .staging_begin = offload_staging_begin,
    .staging_write = offload_staging_write,
    .staging_commit = offload_staging_commit,
    .staging_abort = offload_staging_abort,
    .copy_to_params = offload_copy_to_params,
    .blend = offload_blend,
    .hard_update = offload_hard_update,
    .set_layer_source = offload_set_layer_source,
    .layer_betas = offload_layer_betas,
    .synthesize = offload_synthesize,
    .products_read = offload_products_read,
    .products_write = offload_products_write,
    .check_grad_norm = offload_check_grad_norm,
    .store = offload_store,
    .restore = offload_restore,
    .scratch_alloc = offload_scratch_alloc,
    .scratch_free = offload_scratch_free,
    .copy_bytes = offload_copy_bytes,
    .all_gather = offload_all_gather,
    .agree = offload_agree,
    .capturing = offload_capturing,
    .capture_under_way = offload_capture_under_way,
};

polyak_status polyak_offload_use(polyak_t *p, const polyak_transfer_ops *ops, void *arg)
{
  if (!p || !ops)
    return POLYAK_ERR_INVALID_ARG;
  if (p->num_tensors > 0 || p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_offload_use: the handle has tensors already");
  p->ops = &polyak_offload_ops;
  p->transfer = ops;
  p->transfer_arg = arg;
  return POLYAK_OK;
}

polyak_status polyak_set_offload_staging(polyak_t *p, size_t num_bytes)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "polyak_set_offload_staging: the handle is finalized already");
  if (!polyak_offloaded(p))
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_set_offload_staging: this handle's shadows are in its backend's memory; staging is "
                       "for shadows in host memory (shadow_location = POLYAK_SHADOWS_HOST)");
  if (num_bytes != 0 && num_bytes < OFFLOAD_MIN_STAGING_BYTES)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_set_offload_staging: num_bytes = %zu is below the least, %zu (0: the default, %zu)",
                       num_bytes, OFFLOAD_MIN_STAGING_BYTES, OFFLOAD_DEFAULT_STAGING_BYTES);
  p->staging_num_bytes = num_bytes;
  return POLYAK_OK;
}
