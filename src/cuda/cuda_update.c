/* cuda_update.c: the CUDA backend's updates: the fused update's launch,
 * graph mode's reservations, LAWA's per-tensor betas, the grad-norm
 * shadows' beta products kept on the device, the non-finite count, and
 * hard updates. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_state.h"

/* ---- update ------------------------------------------------------------------ */

static void fill_kernel_args(const polyak_t *p, const cuda_state *state, polyak_update_kernel_args *args)
{
  memset(args, 0, sizeof *args);
  args->descs = state->descs;
  args->chunks = state->chunks;
  args->num_chunks = p->num_chunks;
  for (int k = 0; k < p->cfg.num_shadows; k++)
    args->shadows[k] = state->shadows[k];
  args->shadow_dtype = p->cfg.shadow_dtype;
  args->seed = p->cfg.seed;
  args->lookahead_every = p->cfg.lookahead_every;
  args->grad_norm = p->grad_norm;
  args->products = state->products;
  args->layer_beta = p->layer_source ? state->layer_beta : NULL;
  polyak_adaptive_arrays(&p->cfg, args->grad_norm_c, args->layer_beta0);
  args->nonfinite_count = &state->counters[COUNT_UPDATES];
  args->copy_chunks = state->copy_chunks;
  args->num_copy_chunks = p->num_copy_chunks;
  args->copies = p->copies;
}

/* LAWA: this update's betas, one launch ahead of it on the stream. */
static cudaError_t launch_layer_betas(const polyak_t *p, const cuda_state *state, const polyak_graph_state *graph,
                                      cudaStream_t stream)
{
  if (!p->layer_source)
    return cudaSuccess;
  polyak_layer_args args;
  memset(&args, 0, sizeof args);
  args.descs = state->descs;
  args.chunks = state->chunks;
  args.num_chunks = p->num_chunks;
  args.tensor_chunks = state->tensor_chunks;
  args.num_tensors = p->num_tensors;
  args.grads = state->layer_grads;
  args.norms = state->layer_norms;
  args.chunk_sumsq = state->chunk_sumsq;
  args.layer_norm = state->layer_norm;
  args.layer_beta = state->layer_beta;
  args.blocks_done = state->layer_blocks_done;
  args.graph = graph;
  args.num_shadows = p->cfg.num_shadows;
  double grad_norm_c[POLYAK_MAX_SHADOWS];
  polyak_adaptive_arrays(&p->cfg, grad_norm_c, args.beta0);
  int grid = p->num_chunks < state->io_grid ? (p->num_chunks > 0 ? (int)p->num_chunks : 1) : state->io_grid;
  return polyak_launch_layer_betas(&args, grid, stream);
}

static int update_grid(const polyak_t *p, const cuda_state *state)
{
  int64_t work = p->num_chunks > p->num_copy_chunks ? p->num_chunks : p->num_copy_chunks;
  return work < state->update_grid ? (work > 0 ? (int)work : 1) : state->update_grid;
}

polyak_status polyak_cuda_update(polyak_t *p, const polyak_update_args *step, void *stream)
{
  cuda_state *state = p->backend;
  polyak_cuda_scope scope;
  int capturing = 0;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = polyak_cuda_is_capturing(stream, &capturing);
  polyak_status status = POLYAK_OK;
  if (err != cudaSuccess) {
    status = polyak_cuda_fail(p, err, "polyak_update");
  } else if (capturing) {
    status = polyak_fail(p, POLYAK_ERR_STATE,
                         "polyak_update: the stream is being captured, and a captured update "
                         "would apply step %lld at every replay; capture polyak_graph_update instead",
                         (long long)step->step);
  } else if (p->num_chunks > 0 || p->num_copy_chunks > 0 || p->grad_norm ||
             p->layer_source) { /* products and betas move regardless */
    polyak_update_kernel_args args;
    fill_kernel_args(p, state, &args);
    args.step = *step;
    err = launch_layer_betas(p, state, NULL, (cudaStream_t)stream);
    if (err == cudaSuccess)
      err = polyak_launch_update(&args, update_grid(p, state), (cudaStream_t)stream);
    if (err != cudaSuccess)
      status = polyak_cuda_fail(p, err, "polyak_update: kernel launch");
  }
  polyak_cuda_leave(&scope);
  return status;
}

/* ---- grad-norm shadows' beta products ------------------------------------- */

polyak_status polyak_cuda_products_read(polyak_t *p, double *products)
{
  const cuda_state *state = p->backend;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* the updates may run on any stream */
  if (err == cudaSuccess)
    err = cudaMemcpy(products, state->products, POLYAK_MAX_SHADOWS * sizeof *products, cudaMemcpyDeviceToHost);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "reading the grad-norm beta products");
}

polyak_status polyak_cuda_products_write(polyak_t *p, const double *products)
{
  const cuda_state *state = p->backend;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize();
  if (err == cudaSuccess)
    err = cudaMemcpy(state->products, products, POLYAK_MAX_SHADOWS * sizeof *products, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) /* a pageable copy may land after it returns: before any stream's next update */
    err = cudaDeviceSynchronize();
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "writing the grad-norm beta products");
}

/* The first time: the per-update arrays, the chunk ranges uploaded, the
 * betas at 1. All or nothing. */
static cudaError_t allocate_layerwise(const polyak_t *p, cuda_state *s)
{
  if (s->layer_beta)
    return cudaSuccess;
  size_t n = (size_t)p->num_tensors;
  double *ones = malloc((n * POLYAK_MAX_SHADOWS + 1) * sizeof *ones);
  cudaError_t err = ones ? cudaSuccess : cudaErrorMemoryAllocation;
  for (size_t j = 0; ones && j < n * POLYAK_MAX_SHADOWS; j++)
    ones[j] = 1.0;
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->layer_grads, (n + 1) * sizeof *s->layer_grads);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->tensor_chunks, (n + 1) * sizeof *s->tensor_chunks);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->chunk_sumsq, ((size_t)p->num_chunks + 1) * sizeof *s->chunk_sumsq);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->layer_norm, (n + 1) * sizeof *s->layer_norm);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->layer_blocks_done, sizeof *s->layer_blocks_done);
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&s->layer_beta, (n * POLYAK_MAX_SHADOWS + 1) * sizeof *s->layer_beta);
  if (err == cudaSuccess)
    err = cudaMemcpy(s->tensor_chunks, p->tensor_chunks, (n + 1) * sizeof *s->tensor_chunks, cudaMemcpyHostToDevice);
  if (err == cudaSuccess)
    err = cudaMemset(s->layer_blocks_done, 0, sizeof *s->layer_blocks_done);
  if (err == cudaSuccess)
    err = cudaMemcpy(s->layer_beta, ones, n * POLYAK_MAX_SHADOWS * sizeof *ones, cudaMemcpyHostToDevice);
  free(ones);
  if (err != cudaSuccess)
    polyak_cuda_free_layerwise(s);
  return err;
}

/* LAWA's sources, checked inside the handle's device (a check outside it
 * could make a context on device 0): the norms, num_tensors floats, or each
 * averaged tensor's gradient, its param's size. */
static polyak_status check_layer_source(polyak_t *p, const polyak_cuda_scope *scope, void *const *grads,
                                        const float *norms)
{
  char what[64];
  if (norms)
    return polyak_cuda_check_pointer(p, scope, norms, (size_t)p->num_tensors * sizeof *norms,
                                     "polyak_set_layer_norms: norms");
  polyak_status status = POLYAK_OK;
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (t->num_elems == 0 || t->copy_only)
      continue;
    snprintf(what, sizeof what, "polyak_set_grads: grads[%d]", i);
    status =
        polyak_cuda_check_pointer(p, scope, grads[i], (size_t)t->num_elems * polyak_dtype_num_bytes(t->dtype), what);
  }
  return status;
}

polyak_status polyak_cuda_set_layer_source(polyak_t *p, void *const *grads, const float *norms)
{
  cuda_state *s = p->backend;
  const char *function = grads ? "polyak_set_grads" : "polyak_set_layer_norms";
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  polyak_status status = err == cudaSuccess ? check_layer_source(p, &scope, grads, norms) : POLYAK_OK;
  if (err == cudaSuccess && status == POLYAK_OK)
    err = allocate_layerwise(p, s);
  if (err == cudaSuccess && status == POLYAK_OK)
    err = cudaDeviceSynchronize();                        /* no update still reads the old table */
  if (err == cudaSuccess && status == POLYAK_OK && grads) /* in place: captured graphs read the new one */
    err = cudaMemcpy(s->layer_grads, grads, (size_t)p->num_tensors * sizeof *grads, cudaMemcpyHostToDevice);
  if (err == cudaSuccess && status == POLYAK_OK)
    err = cudaDeviceSynchronize();
  polyak_cuda_leave(&scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, function);
  if (status == POLYAK_OK)
    s->layer_norms = norms;
  return status;
}

polyak_status polyak_cuda_layer_betas_read(polyak_t *p, double *betas)
{
  const cuda_state *s = p->backend;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize();
  if (err == cudaSuccess)
    err = cudaMemcpy(betas, s->layer_beta, (size_t)p->num_tensors * POLYAK_MAX_SHADOWS * sizeof *betas,
                     cudaMemcpyDeviceToHost);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_get_layer_betas");
}

polyak_status polyak_cuda_check_grad_norm(polyak_t *p, const float *grad_norm)
{
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  polyak_status status = err == cudaSuccess ? polyak_cuda_check_pointer(p, &scope, grad_norm, sizeof *grad_norm,
                                                                        "polyak_set_grad_norm: grad_norm")
                                            : polyak_cuda_fail(p, err, "polyak_set_grad_norm");
  polyak_cuda_leave(&scope);
  return status;
}

polyak_status polyak_cuda_nonfinite_count(polyak_t *p, int64_t *count)
{
  const cuda_state *state = p->backend;
  polyak_cuda_scope scope;
  unsigned long long value = 0;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* the updates may run on any stream */
  if (err == cudaSuccess)
    err = cudaMemcpy(&value, &state->counters[COUNT_UPDATES], sizeof value, cudaMemcpyDeviceToHost);
  polyak_cuda_leave(&scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_nonfinite_count");
  *count = (int64_t)value;
  return POLYAK_OK;
}

polyak_status polyak_cuda_set_nonfinite_count(polyak_t *p, int64_t count)
{
  cuda_state *state = p->backend;
  polyak_cuda_scope scope;
  unsigned long long value = (unsigned long long)count;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize(); /* no update in flight adds to the old count */
  if (err == cudaSuccess)
    err = cudaMemcpy(&state->counters[COUNT_UPDATES], &value, sizeof value, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) /* a pageable copy may land after it returns */
    err = cudaDeviceSynchronize();
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_set_step_state");
}

/* ---- graph mode ------------------------------------------------------------ */

polyak_status polyak_cuda_graph_reserve(polyak_t *p, void *stream)
{
  cuda_state *state = p->backend;
  size_t num_bytes = (size_t)p->graph_num_steps * p->cfg.num_shadows * sizeof(float);
  polyak_graph_state graph = {0};
  graph.first_step = p->graph_first_step;
  graph.num_steps = p->graph_num_steps;
  graph.first_gap = p->graph_first_step - p->last_step;
  graph.grad_norm = p->grad_norm;
  graph.layer_norms = state->layer_norms;
  polyak_cuda_scope scope;
  float *weights = NULL;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess) /* a dropped replay may still run on another stream */
    err = cudaDeviceSynchronize();
  if (err == cudaSuccess)
    err = cudaMalloc((void **)&weights, num_bytes);
  graph.weights = weights;
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(weights, p->graph_weights, num_bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream);
  if (err == cudaSuccess) /* arms every graph that captured this handle's update */
    err = cudaMemcpyAsync(state->graph, &graph, sizeof graph, cudaMemcpyHostToDevice, (cudaStream_t)stream);
  if (err == cudaSuccess)
    err = cudaStreamSynchronize((cudaStream_t)stream);
  if (err == cudaSuccess)
    state->graph_weights = weights;
  else
    cudaFree(weights);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_graph_reserve");
}

polyak_status polyak_cuda_graph_update(polyak_t *p, void *stream)
{
  cuda_state *state = p->backend;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_graph_update: entering the handle's device");
  polyak_update_kernel_args args;
  fill_kernel_args(p, state, &args);
  args.step.num_shadows = p->cfg.num_shadows; /* step, weights and keys: from the device */
  args.step.skip_nonfinite = p->cfg.skip_nonfinite;
  args.step.stochastic_f32 = polyak_stochastic_f32_mask(&p->cfg);
  args.graph = state->graph;
  err = launch_layer_betas(p, state, state->graph, (cudaStream_t)stream);
  if (err == cudaSuccess)
    err = polyak_launch_update(&args, update_grid(p, state), (cudaStream_t)stream);
  if (err == cudaSuccess)
    polyak_cuda_note_capture(p, stream);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_graph_update: kernel launch");
}

polyak_status polyak_cuda_graph_release(polyak_t *p, int64_t *consumed, int64_t *dropped)
{
  cuda_state *state = p->backend;
  polyak_graph_state graph, disarmed = {0};
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = cudaDeviceSynchronize();
  if (err == cudaSuccess)
    err = cudaMemcpy(&graph, state->graph, sizeof graph, cudaMemcpyDeviceToHost);
  if (err == cudaSuccess) /* later replays find nothing reserved and change nothing */
    err = cudaMemcpy(state->graph, &disarmed, sizeof disarmed, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) {
    cudaFree(state->graph_weights);
    state->graph_weights = NULL;
  }
  polyak_cuda_leave(&scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_graph_release");
  *consumed = graph.consumed;
  *dropped = graph.dropped;
  return POLYAK_OK;
}

polyak_status polyak_cuda_hard_update(polyak_t *p, int shadow, void *stream)
{
  cuda_state *state = p->backend;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err != cudaSuccess)
    return polyak_cuda_fail(p, err, "polyak_hard_update");
  polyak_status status = POLYAK_OK;
  int whole = state->store_chunks != NULL; /* every rank scans the whole params and refuses alike */
  if (p->cfg.skip_nonfinite)
    status = polyak_cuda_refuse_nonfinite(p, state, whole ? state->store_chunks : state->chunks,
                                          whole ? state->num_store_chunks : p->num_chunks, (cudaStream_t)stream,
                                          "polyak_hard_update");
  if (status == POLYAK_OK && p->num_chunks > 0) /* a rank's slice may be empty */
    err = polyak_launch_init(state->descs, state->chunks, p->num_chunks, state->shadows, shadow, 1, p->cfg.shadow_dtype,
                             NULL, NULL, polyak_cuda_io_grid(p, state), (cudaStream_t)stream);
  polyak_cuda_leave(&scope);
  return status != POLYAK_OK ? status : err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "polyak_hard_update");
}
