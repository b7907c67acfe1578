/* cpu_backend.c: the CPU reference path: its state from finalize to
 * release, the update (the plan's chunks across the handle's threads, each
 * through cpu_update.c), LAWA's norms, graph mode, and the backend's table.
 * It walks the same plan as the CUDA kernel with the same per-element
 * functions (polyak_math.h), so its results are the bits the GPU must
 * reproduce, whatever the number of threads: chunks are independent and the
 * non-finite count is a sum of integers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_readout.h"
#include "layerwise.h"

/* ---- the update ---------------------------------------------------------------- */

typedef struct {
  const cpu_state *state;
  polyak_dtype shadow_dtype;
  const polyak_update_args *args;
  const double *layer_beta; /* LAWA's betas (tensor-major), or NULL */
  double layerwise_beta0[POLYAK_MAX_SHADOWS];
} update_job;

static int64_t update_visit(const polyak_t *p, const polyak_chunk *chunk, void *arg)
{
  const update_job *job = arg;
  polyak_update_args layer;
  const polyak_update_args *args = job->args;
  if (job->layer_beta) { /* each chunk resolves its tensor's weights, as the kernel does */
    layer = *job->args;
    const double *beta = job->layer_beta + (int64_t)chunk->tensor * POLYAK_MAX_SHADOWS;
    polyak_resolve_layerwise(&layer, job->layerwise_beta0, beta);
    args = &layer;
  }
  return polyak_cpu_update_chunk(job->state->kernels, &p->descs[chunk->tensor], chunk, job->state->shadows,
                                 job->shadow_dtype, args);
}

typedef struct {
  const cpu_state *state;
  void *const *grads;
  float *chunk_sumsq;
} sumsq_job;

static int64_t sumsq_visit(const polyak_t *p, const polyak_chunk *chunk, void *arg)
{
  const sumsq_job *job = arg;
  job->chunk_sumsq[chunk - p->chunks] = polyak_cpu_chunk_sumsq(job->state->kernels, job->grads[chunk->tensor],
                                                               p->descs[chunk->tensor].param_dtype, chunk);
  return 0;
}

/* LAWA's betas from this step's gradients or norms, in the order
 * layerwise.h fixes (the kernel's: POLYAK_LAYER_THREADS threads); the
 * chunks' sums of squares across the handle's threads. */
static void cpu_layer_betas(const polyak_t *p, cpu_state *s)
{
  if (s->layer_grads) {
    sumsq_job job = {s, s->layer_grads, s->chunk_sumsq};
    polyak_cpu_for_chunks(p, sumsq_visit, &job);
  }
  double total_part[POLYAK_LAYER_THREADS] = {0};
  for (int l = 0; l < p->num_tensors; l++) {
    int64_t first = p->tensor_chunks[l], end = p->tensor_chunks[l + 1];
    s->layer_norm[l] = polyak_layer_norm(&p->descs[l], s->layer_norms, l, s->chunk_sumsq, first, end);
    total_part[l % POLYAK_LAYER_THREADS] += polyak_norm_term(s->layer_norm[l]);
  }
  double total = polyak_sum_parts_f64(total_part);
  double grad_norm_c[POLYAK_MAX_SHADOWS], beta0[POLYAK_MAX_SHADOWS];
  polyak_adaptive_arrays(&p->cfg, grad_norm_c, beta0);
  for (int l = 0; l < p->num_tensors; l++)
    polyak_layer_betas(s->layer_norm[l], total, beta0, p->cfg.num_shadows,
                       s->layer_beta + (int64_t)l * POLYAK_MAX_SHADOWS);
}

void polyak_cpu_resolve_update(const polyak_t *p, cpu_state *state, const polyak_update_args *args,
                               const float *grad_norm, polyak_update_args *resolved)
{
  *resolved = *args;
  double grad_norm_c[POLYAK_MAX_SHADOWS], beta0[POLYAK_MAX_SHADOWS];
  polyak_adaptive_arrays(&p->cfg, grad_norm_c, beta0);
  if (grad_norm)
    polyak_apply_grad_norm(resolved, grad_norm_c, *grad_norm, state->products);
  if (p->layer_source)
    cpu_layer_betas(p, state);
}

int64_t polyak_cpu_update_chunks(const polyak_t *p, const cpu_state *state, const polyak_update_args *resolved,
                                 int64_t first_chunk, int64_t end_chunk)
{
  update_job job = {state, p->cfg.shadow_dtype, resolved, p->layer_source ? state->layer_beta : NULL, {0}};
  double grad_norm_c[POLYAK_MAX_SHADOWS];
  polyak_adaptive_arrays(&p->cfg, grad_norm_c, job.layerwise_beta0);
  if (first_chunk == 0 && end_chunk == p->num_chunks) /* the whole plan: in work items */
    return polyak_cpu_for_chunks(p, update_visit, &job);
  return polyak_cpu_for_chunk_range(p, first_chunk, end_chunk, update_visit, &job);
}

static polyak_status cpu_update(polyak_t *p, const polyak_update_args *args, void *stream)
{
  (void)stream;
  cpu_state *state = p->backend;
  polyak_update_args resolved;
  polyak_cpu_resolve_update(p, state, args, p->grad_norm, &resolved);
  state->nonfinite_count += polyak_cpu_update_chunks(p, state, &resolved, 0, p->num_chunks);
  polyak_copies_update(p); /* copy-only tensors' mirrors */
  return POLYAK_OK;
}

static polyak_status cpu_products_read(polyak_t *p, double *products)
{
  const cpu_state *state = p->backend;
  memcpy(products, state->products, sizeof state->products);
  return POLYAK_OK;
}

static polyak_status cpu_products_write(polyak_t *p, const double *products)
{
  cpu_state *state = p->backend;
  memcpy(state->products, products, sizeof state->products);
  return POLYAK_OK;
}

static polyak_status cpu_nonfinite_count(polyak_t *p, int64_t *count)
{
  *count = ((const cpu_state *)p->backend)->nonfinite_count;
  return POLYAK_OK;
}

static polyak_status cpu_set_nonfinite_count(polyak_t *p, int64_t count)
{
  ((cpu_state *)p->backend)->nonfinite_count = count;
  return POLYAK_OK;
}

/* ---- graph mode -------------------------------------------------------------------- */

static polyak_status cpu_graph_reserve(polyak_t *p, void *stream)
{
  (void)stream;
  cpu_state *state = p->backend;
  state->graph_consumed = state->graph_dropped = 0;
  return POLYAK_OK;
}

/* A "replay" on the CPU: the next reserved step, applied at once. */
static polyak_status cpu_graph_update(polyak_t *p, void *stream)
{
  cpu_state *state = p->backend;
  int64_t row = state->graph_consumed;
  if (row >= p->graph_num_steps) {
    state->graph_dropped++;
    return POLYAK_OK;
  }
  polyak_update_args args;
  polyak_update_args_init(p, p->graph_first_step + row, row == 0 ? p->graph_first_step - p->last_step : 1,
                          p->graph_weights + row * p->cfg.num_shadows, &args);
  polyak_status status = cpu_update(p, &args, stream);
  if (status == POLYAK_OK)
    state->graph_consumed++;
  return status;
}

static polyak_status cpu_graph_release(polyak_t *p, int64_t *consumed, int64_t *dropped)
{
  const cpu_state *state = p->backend;
  *consumed = state->graph_consumed;
  *dropped = state->graph_dropped;
  return POLYAK_OK;
}

/* ---- what updates read besides the params -------------------------------------------- */

/* Host memory, or the reads would crash. */
static polyak_status refuse_device_memory(polyak_t *p, const void *memory, const char *what)
{
  const char *foreign = polyak_foreign_memory(p, memory);
  if (foreign)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s %p is %s; the CPU backend reads host memory", what, memory,
                       foreign);
  return POLYAK_OK;
}

static polyak_status cpu_set_layer_source(polyak_t *p, void *const *grads, const float *norms)
{
  cpu_state *s = p->backend;
  char what[64];
  polyak_status status = refuse_device_memory(p, norms, "polyak_set_layer_norms: norms");
  for (int i = 0; i < p->num_tensors && grads && status == POLYAK_OK; i++) {
    snprintf(what, sizeof what, "polyak_set_grads: grads[%d]", i);
    status = p->tensors[i].num_elems > 0 ? refuse_device_memory(p, grads[i], what) : POLYAK_OK;
  }
  if (status != POLYAK_OK)
    return status;
  size_t n = (size_t)p->num_tensors, k = POLYAK_MAX_SHADOWS;
  int first = !s->layer_beta; /* the per-update arrays: all at the first call, or none */
  void **table = grads ? malloc((n + 1) * sizeof *table) : NULL;
  float *chunk_sumsq = first ? malloc(((size_t)p->num_chunks + 1) * sizeof *chunk_sumsq) : s->chunk_sumsq;
  double *layer_norm = first ? malloc((n + 1) * sizeof *layer_norm) : s->layer_norm;
  double *layer_beta = first ? malloc((n * k + 1) * sizeof *layer_beta) : s->layer_beta;
  if ((grads && !table) || !chunk_sumsq || !layer_norm || !layer_beta) {
    free(table);
    if (first) {
      free(chunk_sumsq);
      free(layer_norm);
      free(layer_beta);
    }
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "%s: out of host memory",
                       grads ? "polyak_set_grads" : "polyak_set_layer_norms");
  }
  for (size_t j = 0; first && j < n * k; j++)
    layer_beta[j] = 1.0;
  s->chunk_sumsq = chunk_sumsq, s->layer_norm = layer_norm, s->layer_beta = layer_beta;
  if (grads)
    memcpy(table, grads, n * sizeof *table);
  free(s->layer_grads);
  s->layer_grads = table;
  s->layer_norms = norms;
  return POLYAK_OK;
}

static polyak_status cpu_layer_betas_read(polyak_t *p, double *betas)
{
  const cpu_state *s = p->backend;
  memcpy(betas, s->layer_beta, (size_t)p->num_tensors * POLYAK_MAX_SHADOWS * sizeof *betas);
  return POLYAK_OK;
}

static polyak_status cpu_check_grad_norm(polyak_t *p, const float *grad_norm)
{
  return refuse_device_memory(p, grad_norm, "polyak_set_grad_norm:");
}

/* ---- finalize and release -------------------------------------------------------------- */

/* Device memory handed to the CPU backend would crash the first read. */
static polyak_status cpu_check_params(polyak_t *p)
{
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (t->num_elems == 0)
      continue;
    const void *memory = t->param;
    const char *foreign = polyak_foreign_memory(p, memory);
    if (!foreign && t->owned)
      foreign = polyak_foreign_memory(p, memory = t->shadow);
    if (foreign)
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                         "polyak_finalize: tensor %d (\"%s\") %s %p is %s; "
                         "the CPU backend needs host memory (or use POLYAK_BACKEND_CUDA)",
                         i, t->name, memory == t->param ? "param" : "shadow", memory, foreign);
  }
  return POLYAK_OK;
}

/* ---- what the front end asks before a handle exists ------------------------------------ */

static int cpu_available(void)
{
  return 1;
}

static polyak_status cpu_check_config(const polyak_config *cfg, char *msg, size_t msg_num_bytes)
{
  if (cfg->nccl_comm)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "nccl_comm is set but NCCL moves device memory: it needs the CUDA backend");
  return POLYAK_OK;
}

void polyak_cpu_state_free(cpu_state *state)
{
  cpu_pool_destroy(state->pool);
  polyak_cpu_free_arenas(state->shadows);
  polyak_cpu_free_arenas(state->staging);
  free(state->store);
  free(state->layer_grads);
  free(state->chunk_sumsq);
  free(state->layer_norm);
  free(state->layer_beta);
  free(state->item_chunks);
  memset(state, 0, sizeof *state);
}

static void cpu_release(polyak_t *p)
{
  cpu_state *state = p->backend;
  if (!state)
    return;
  polyak_cpu_state_free(state);
  free(state);
  p->backend = NULL;
}

polyak_status polyak_cpu_state_init(polyak_t *p, cpu_state *state)
{
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++)
    state->products[k] = 1.0;
  state->kernels = polyak_cpu_pick_kernels();
  if (!state->kernels)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_finalize: POLYAK_CPU_ISA is \"%s\": expected avx512, avx2 or portable",
                       getenv("POLYAK_CPU_ISA"));
  char why[POLYAK_ERROR_BYTES] = "out of host memory";
  int threads = cpu_pool_resolve_threads(p->cfg.cpu_threads);
  polyak_status status = polyak_cpu_build_items(p, state) != 0
                             ? POLYAK_ERR_NO_MEMORY
                             : cpu_pool_create(&state->pool, threads, why, sizeof why);
  if (status != POLYAK_OK) {
    polyak_cpu_state_free(state);
    return polyak_fail(p, status, "polyak_finalize: %s", why);
  }
  if (polyak_cpu_alloc_arenas(p, state->shadows) != 0) {
    polyak_cpu_state_free(state);
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory for %d shadows of %lld elements",
                       p->cfg.num_shadows, (long long)p->arena_elems);
  }
  for (int k = 0; k < p->cfg.num_shadows; k++)
    polyak_cpu_init_shadow(p, state->shadows[k], k);
  return POLYAK_OK;
}

static polyak_status cpu_finalize(polyak_t *p, void *stream, polyak_status prior)
{
  (void)stream;
  if (prior != POLYAK_OK) /* no communicator on the CPU */
    return prior;
  if (p->cfg.skip_nonfinite && !p->cfg.zero_init) {
    polyak_status status = polyak_cpu_find_nonfinite_param(p, 0, "polyak_finalize");
    if (status != POLYAK_OK)
      return status;
  }
  cpu_state *state = calloc(1, sizeof *state);
  if (!state)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory");
  p->backend = state;
  polyak_status status = polyak_cpu_state_init(p, state);
  if (status != POLYAK_OK) {
    free(state);
    p->backend = NULL;
  }
  return status;
}

/* One rank per process without NCCL: nothing to compare with. */
static polyak_status cpu_compare(polyak_t *p, uint64_t value, int *other)
{
  (void)p;
  (void)value;
  *other = -1;
  return POLYAK_OK;
}

/* One rank per process without NCCL: agreeing is knowing. */
static polyak_status cpu_agree(polyak_t *p, int local_ok, int *all_ok)
{
  (void)p;
  *all_ok = local_ok;
  return POLYAK_OK;
}

static polyak_status cpu_capturing(polyak_t *p, void *stream, int *capturing)
{
  (void)p, (void)stream;
  *capturing = 0;
  return POLYAK_OK;
}

polyak_status polyak_cpu_isa(const polyak_t *p, const char **isa)
{
  if (!p || !isa)
    return POLYAK_ERR_INVALID_ARG;
  if (p->cfg.backend != POLYAK_BACKEND_CPU && !polyak_offloaded(p))
    return POLYAK_ERR_UNSUPPORTED;
  if (!p->finalized || !p->backend)
    return POLYAK_ERR_STATE;
  /* an offloaded handle's state starts with its host side's (src/offload/offload.h) */
  *isa = ((const cpu_state *)p->backend)->kernels->isa;
  return POLYAK_OK;
}

const polyak_backend_ops polyak_cpu_ops = {
    .available = cpu_available,
    .check_config = cpu_check_config,
    .owns_memory = NULL, /* host memory: anyone's */
    .memory_name = "host memory",
    .check_params = cpu_check_params,
    .finalize = cpu_finalize,
    .update = cpu_update,
    .arena = polyak_cpu_arena,
    .read_out = polyak_cpu_read_out,
    .check_read_out = polyak_cpu_check_read_out,
    .nonfinite_count = cpu_nonfinite_count,
    .set_nonfinite_count = cpu_set_nonfinite_count,
    .release = cpu_release,
    .graph_reserve = cpu_graph_reserve,
    .graph_update = cpu_graph_update,
    .graph_release = cpu_graph_release,
    .host_buffer = polyak_cpu_host_buffer,
    .free_host_buffer = polyak_cpu_free_host_buffer,
    .copy_to_host = polyak_cpu_copy_to_host,
    .copy_from_host = polyak_cpu_copy_from_host,
    .staging_begin = polyak_cpu_staging_begin,
    .staging_write = polyak_cpu_staging_write,
    .staging_commit = polyak_cpu_staging_commit,
    .staging_abort = polyak_cpu_staging_abort,
    .copy_to_params = polyak_cpu_copy_to_params,
    .blend = polyak_cpu_blend,
    .hard_update = polyak_cpu_hard_update,
    .set_layer_source = cpu_set_layer_source,
    .layer_betas = cpu_layer_betas_read,
    .synthesize = polyak_cpu_synthesize,
    .products_read = cpu_products_read,
    .products_write = cpu_products_write,
    .check_grad_norm = cpu_check_grad_norm,
    .store = polyak_cpu_store,
    .restore = polyak_cpu_restore,
    .scratch_alloc = polyak_cpu_scratch_alloc,
    .scratch_free = polyak_cpu_scratch_free,
    .copy_bytes = polyak_cpu_copy_bytes,
    .all_gather = NULL, /* NCCL needs device memory */
    .agree = cpu_agree,
    .compare = cpu_compare,
    .capturing = cpu_capturing,
};
