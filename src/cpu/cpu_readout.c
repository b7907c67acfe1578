/* cpu_readout.c: the CPU backend's shadow memory and everything that reads
 * or writes it besides the update: arenas and their initial values, hard
 * updates, read-outs, blends, the post-hoc synthesis, polyak_store's copy,
 * checkpoint staging and the raw copies of gathers. Element-wise loops over
 * the plan's chunks or over ranges, across the handle's threads; each
 * element's result is computed alone, so the thread count never shows. */
#include <stdlib.h>
#include <string.h>

#include "cpu_readout.h"

/* ---- shadow memory ------------------------------------------------------------- */

void polyak_cpu_free_arenas(void **arenas)
{
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
    free(arenas[k]);
    arenas[k] = NULL;
  }
}

int polyak_cpu_alloc_arenas(const polyak_t *p, void **arenas)
{
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  size_t alloc_num_bytes = (arena_num_bytes + 63) / 64 * 64;
  for (int k = 0; k < p->cfg.num_shadows && alloc_num_bytes > 0; k++) {
    arenas[k] = aligned_alloc(64, alloc_num_bytes);
    if (!arenas[k]) {
      polyak_cpu_free_arenas(arenas);
      return -1;
    }
  }
  return 0;
}

void *polyak_cpu_arena(polyak_t *p, int shadow)
{
  return ((cpu_state *)p->backend)->shadows[shadow];
}

polyak_status polyak_cpu_find_nonfinite_param(polyak_t *p, int whole, const char *function)
{
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    const polyak_tensor_desc *d = &p->descs[i];
    int64_t first = whole ? 0 : d->local_first_elem, end = whole ? t->flat_elems : first + d->local_num_elems;
    for (int64_t e = first; e < end; e++) {
      float value = polyak_load_f32(t->param, e, t->dtype);
      if (!polyak_is_finite(value))
        return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                           "%s: tensor %d (\"%s\") holds %s at element %lld; with skip_nonfinite its "
                           "shadow would stay so forever (fix the params, or set skip_nonfinite = 0)",
                           function, i, t->name, value != value ? "NaN" : "Inf", (long long)e);
    }
  }
  return POLYAK_OK;
}

typedef struct {
  void *arena;
  int shadow;
} copy_params_job;

/* Shadow k (the arena, or the caller's memory) <- the chunk's params,
 * rounded to nearest even. */
static int64_t copy_params_visit(const polyak_t *p, const polyak_chunk *chunk, void *arg)
{
  const copy_params_job *job = arg;
  const polyak_tensor_desc *t = &p->descs[chunk->tensor];
  for (int64_t e = chunk->first_elem; e < chunk->first_elem + chunk->num_elems; e++)
    polyak_shadow_store(t, job->arena, p->cfg.shadow_dtype, job->shadow, e,
                        polyak_load_f32(t->param, e, t->param_dtype));
  return 0;
}

void polyak_cpu_init_shadow(const polyak_t *p, void *arena, int k)
{
  if (arena) /* NULL where every shadow is the caller's */
    memset(arena, 0, (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype));
  copy_params_job job = {arena, k};
  if (!p->cfg.zero_init)
    polyak_cpu_for_chunks(p, copy_params_visit, &job);
}

polyak_status polyak_cpu_hard_update(polyak_t *p, int shadow, void *stream)
{
  (void)stream;
  polyak_status status =
      p->cfg.skip_nonfinite ? polyak_cpu_find_nonfinite_param(p, 1, "polyak_hard_update") : POLYAK_OK;
  copy_params_job job = {((cpu_state *)p->backend)->shadows[shadow], shadow};
  if (status == POLYAK_OK)
    polyak_cpu_for_chunks(p, copy_params_visit, &job);
  return status;
}

/* ---- read-outs ------------------------------------------------------------------ */

typedef struct {
  const void *src;
  polyak_dtype src_dtype, dst_dtype;
  double debias_scale;
  void *dst;
} read_out_job;

static void read_out_range(void *arg, int64_t first, int64_t num_elems)
{
  const read_out_job *job = arg;
  for (int64_t e = first; e < first + num_elems; e++)
    polyak_store_f32(job->dst, e, polyak_debias(polyak_load_f32(job->src, e, job->src_dtype), job->debias_scale),
                     job->dst_dtype);
}

polyak_status polyak_cpu_read_out(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                                  double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream)
{
  (void)stream;
  read_out_job job = {src, src_dtype, dst_dtype, debias_scale, dst};
  polyak_cpu_for_range(p, num_elems, read_out_range, &job);
  return POLYAK_OK;
}

polyak_status polyak_cpu_check_read_out(polyak_t *p, const void *dst, size_t num_bytes, void *stream,
                                        const char *function)
{
  (void)p, (void)dst, (void)num_bytes, (void)stream, (void)function;
  return POLYAK_OK;
}

typedef struct {
  int shadow;
  double debias_scale;
} copy_to_params_job;

/* The chunk's piece of shadow `shadow` into its params. */
static int64_t copy_to_params_visit(const polyak_t *p, const polyak_chunk *chunk, void *arg)
{
  const copy_to_params_job *job = arg;
  const polyak_tensor_desc *t = &p->descs[chunk->tensor];
  const void *arena = ((const cpu_state *)p->backend)->shadows[job->shadow];
  for (int64_t e = chunk->first_elem; e < chunk->first_elem + chunk->num_elems; e++) {
    float value = polyak_shadow_load(t, arena, p->cfg.shadow_dtype, job->shadow, e);
    polyak_store_f32(t->param, e, polyak_debias(value, job->debias_scale), t->param_dtype);
  }
  return 0;
}

polyak_status polyak_cpu_copy_to_params(polyak_t *p, int shadow, double debias_scale, void *stream)
{
  (void)stream;
  copy_to_params_job job = {shadow, debias_scale};
  polyak_cpu_for_chunks(p, copy_to_params_visit, &job);
  return POLYAK_OK;
}

/* ---- blends and the post-hoc synthesis ------------------------------------------------ */

typedef struct {
  const polyak_t *p;
  const float *coefficient;
  const polyak_tensor_desc *t;
  void *dst;
  polyak_dtype dst_dtype;
} blend_job;

/* Elements first .. first + num_elems - 1 of the job's tensor. */
static void blend_range(void *arg, int64_t first, int64_t num_elems)
{
  const blend_job *job = arg;
  const polyak_t *p = job->p;
  const cpu_state *state = p->backend;
  for (int64_t e = first; e < first + num_elems; e++) {
    float acc = 0.0f;
    for (int k = 0; k < p->cfg.num_shadows; k++)
      if (job->coefficient[k] != 0.0f)
        acc = polyak_blend_step(acc, job->coefficient[k],
                                polyak_shadow_load(job->t, state->shadows[k], p->cfg.shadow_dtype, k, e));
    polyak_store_f32(job->dst, e, acc, job->dst_dtype);
  }
}

/* A chunk of the blend into the params (whole tensors: blends refuse
 * sharded handles). */
static int64_t blend_visit(const polyak_t *p, const polyak_chunk *chunk, void *arg)
{
  blend_job job = *(const blend_job *)arg;
  job.t = &p->descs[chunk->tensor];
  job.dst = job.t->param;
  job.dst_dtype = (polyak_dtype)job.t->param_dtype;
  blend_range(&job, chunk->first_elem, chunk->num_elems);
  return 0;
}

polyak_status polyak_cpu_blend(polyak_t *p, const float *coefficient, int tensor, void *dst, polyak_dtype dst_dtype,
                               void *stream)
{
  (void)stream;
  blend_job job = {p, coefficient, tensor < 0 ? NULL : &p->descs[tensor], dst, dst_dtype};
  if (tensor < 0)
    polyak_cpu_for_chunks(p, blend_visit, &job);
  else
    polyak_cpu_for_range(p, p->descs[tensor].num_elems, blend_range, &job);
  return POLYAK_OK;
}

typedef struct {
  const float *snapshots;
  int num_snapshots;
  const float *weight;
} synthesize_job;

/* Each element of the chunk's params: fmaf in snapshot order. */
static int64_t synthesize_visit(const polyak_t *p, const polyak_chunk *chunk, void *arg)
{
  const synthesize_job *job = arg;
  const polyak_tensor_desc *t = &p->descs[chunk->tensor];
  for (int64_t e = chunk->first_elem; e < chunk->first_elem + chunk->num_elems; e++) {
    const float *column = job->snapshots + t->shadow_offset_elems + e;
    float acc = 0.0f;
    for (int s = 0; s < job->num_snapshots; s++)
      acc = polyak_blend_step(acc, job->weight[s], column[(int64_t)s * p->arena_elems]);
    polyak_store_f32(t->param, e, acc, t->param_dtype);
  }
  return 0;
}

polyak_status polyak_cpu_synthesize(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                                    void *stream)
{
  (void)stream;
  synthesize_job job = {snapshots, num_snapshots, weight};
  polyak_cpu_for_chunks(p, synthesize_visit, &job);
  return POLYAK_OK;
}

/* ---- polyak_store's copy of the params -------------------------------------------------- */

polyak_status polyak_cpu_store(polyak_t *p, void *stream)
{
  (void)stream;
  cpu_state *state = p->backend;
  if (!state->store && !(state->store = malloc((size_t)p->store_bytes + 16)))
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_store: out of host memory for %lld bytes",
                       (long long)p->store_bytes);
  for (int i = 0; i < p->num_tensors; i++)
    memcpy((char *)state->store + p->descs[i].store_offset_bytes, p->tensors[i].param,
           (size_t)p->tensors[i].num_elems * polyak_dtype_num_bytes(p->tensors[i].dtype));
  return POLYAK_OK;
}

polyak_status polyak_cpu_restore(polyak_t *p, void *stream)
{
  (void)stream;
  const cpu_state *state = p->backend;
  for (int i = 0; i < p->num_tensors; i++)
    memcpy(p->tensors[i].param, (const char *)state->store + p->descs[i].store_offset_bytes,
           (size_t)p->tensors[i].num_elems * polyak_dtype_num_bytes(p->tensors[i].dtype));
  return POLYAK_OK;
}

/* ---- checkpoints: raw shadow bytes; gathers: scratch and copies --------------------------- */

void *polyak_cpu_host_buffer(polyak_t *p, size_t num_bytes)
{
  (void)p;
  return malloc(num_bytes);
}

void polyak_cpu_free_host_buffer(polyak_t *p, void *buffer)
{
  (void)p;
  free(buffer);
}

polyak_status polyak_cpu_copy_to_host(polyak_t *p, void *host, const void *src, size_t num_bytes)
{
  (void)p;
  memcpy(host, src, num_bytes);
  return POLYAK_OK;
}

polyak_status polyak_cpu_copy_from_host(polyak_t *p, void *dst, const void *host, size_t num_bytes)
{
  (void)p;
  memcpy(dst, host, num_bytes);
  return POLYAK_OK;
}

polyak_status polyak_cpu_staging_begin(polyak_t *p)
{
  cpu_state *state = p->backend;
  if (polyak_cpu_alloc_arenas(p, state->staging) != 0)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_load: out of host memory for a second set of shadows");
  return POLYAK_OK;
}

polyak_status polyak_cpu_staging_write(polyak_t *p, int shadow, int64_t first_elem, int64_t num_elems, const void *host)
{
  cpu_state *state = p->backend;
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  memcpy((char *)state->staging[shadow] + first_elem * elem_bytes, host, (size_t)num_elems * elem_bytes);
  return POLYAK_OK;
}

/* Copied into the live arenas (as on the GPU, where graphs hold their
 * addresses), so shadow memory never moves during a handle's life. */
polyak_status polyak_cpu_staging_commit(polyak_t *p, int64_t nonfinite_count, const void *copies)
{
  cpu_state *state = p->backend;
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  for (int k = 0; k < p->cfg.num_shadows && arena_num_bytes > 0; k++)
    memcpy(state->shadows[k], state->staging[k], arena_num_bytes);
  if (copies)
    memcpy(p->copies, copies, (size_t)p->copies_num_bytes);
  polyak_cpu_free_arenas(state->staging);
  state->nonfinite_count = nonfinite_count;
  return POLYAK_OK;
}

void polyak_cpu_staging_abort(polyak_t *p)
{
  polyak_cpu_free_arenas(((cpu_state *)p->backend)->staging);
}

polyak_status polyak_cpu_set_nonfinite_count(polyak_t *p, int64_t nonfinite_count)
{
  ((cpu_state *)p->backend)->nonfinite_count = nonfinite_count;
  return POLYAK_OK;
}

void *polyak_cpu_scratch_alloc(polyak_t *p, size_t num_bytes)
{
  (void)p;
  return malloc(num_bytes ? num_bytes : 1);
}

void polyak_cpu_scratch_free(polyak_t *p, void *scratch)
{
  (void)p;
  free(scratch);
}

polyak_status polyak_cpu_copy_bytes(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream)
{
  (void)p, (void)stream;
  memcpy(dst, src, num_bytes);
  return POLYAK_OK;
}
