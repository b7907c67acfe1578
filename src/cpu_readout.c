/* cpu_backend.c: the CPU reference path. It walks the same plan as the CUDA
 * kernel and calls the same per-element functions (polyak_math.h), in plain
 * loops, so its results are the bits the GPU must reproduce.
 *
 * fmaf() is one instruction only where the compiler may use FMA, and the
 * software fallback is ~10x slower (same bits), so the plan walk is built
 * twice, for AVX2 with FMA and for the baseline ISA, and picked at run
 * time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layerwise.h"
#include "polyak_internal.h"
#include "polyak_math.h"

typedef struct {
  void *shadows[POLYAK_MAX_SHADOWS]; /* arena_elems elements of the shadow dtype each */
  int64_t nonfinite_count;
  int64_t graph_consumed, graph_dropped; /* graph mode counters */
  void *staging[POLYAK_MAX_SHADOWS];     /* a load's fresh arenas */
  void *store;                           /* polyak_store's copy of the params */
  double products[POLYAK_MAX_SHADOWS];   /* grad-norm shadows' beta products */
  /* LAWA: where the norms come from, and what each update computes */
  void **layer_grads;                    /* [num_tensors], or NULL with layer_norms */
  const float *layer_norms;              /* [num_tensors] given, or NULL */
  float *chunk_sumsq;                    /* [num_chunks] */
  double *layer_norm;                    /* [num_tensors] */
  double *layer_beta;                    /* [num_tensors][POLYAK_MAX_SHADOWS] */
  int64_t (*walk)(const polyak_t *, void *const *, const polyak_update_args *, const double *, float *);
  float scratch[POLYAK_CHUNK_ELEMS];     /* one chunk's params as f32 */
} cpu_state;

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* One chunk: its params are read once, converted to f32 into `scratch`
 * (at most POLYAK_CHUNK_ELEMS floats, so they stay in cache), then folded
 * into each shadow by a plain loop the compiler vectorizes. Always inlined
 * with constant dtypes, so each dtype pair gets its own loops, with no
 * per-element switch. Returns the non-finite params met. */
ALWAYS_INLINE int64_t update_chunk(const polyak_tensor_desc *t, const polyak_chunk *chunk,
                                   void *const *shadows, const polyak_update_args *args,
                                   polyak_dtype param_dtype, polyak_dtype shadow_dtype,
                                   float *restrict scratch)
{
  int64_t n = chunk->num_elems, first = chunk->first_elem, nonfinite = 0;
  for (int64_t i = 0; i < n; i++)
    scratch[i] = polyak_load_f32(t->param, first + i, param_dtype);
  for (int64_t i = 0; i < n; i++)
    nonfinite += !polyak_is_finite(scratch[i]);
  int guard = args->skip_nonfinite && nonfinite > 0; /* the guard costs only where needed */
  int64_t slot = t->shadow_offset_elems + first;
  for (int k = 0; k < args->num_shadows; k++) {
    float weight = args->weight[k];
    if (shadow_dtype == POLYAK_F32 && ((args->stochastic_f32 >> k) & 1u)) {
      float *restrict s = (float *)shadows[k] + slot;
      uint64_t key = args->sr_key[k];
      int64_t elem = t->global_offset_elems + first;
      for (int64_t i = 0; i < n; i++) /* a float select here would stop the vectorizer */
        s[i] = polyak_pick_f32(guard & !polyak_is_finite(scratch[i]), s[i],
                               polyak_next_f32_sr(s[i], scratch[i], weight, key, elem + i));
    } else if (shadow_dtype == POLYAK_F32) {
      float *restrict s = (float *)shadows[k] + slot;
      if (!guard)
        for (int64_t i = 0; i < n; i++)
          s[i] = polyak_lerp(s[i], scratch[i], weight);
      else
        for (int64_t i = 0; i < n; i++)
          s[i] = polyak_is_finite(scratch[i]) ? polyak_lerp(s[i], scratch[i], weight) : s[i];
    } else {
      uint16_t *restrict s = (uint16_t *)shadows[k] + slot;
      uint64_t key = args->sr_key[k];
      int64_t elem = t->global_offset_elems + first;
      for (int64_t i = 0; i < n; i++) {
        uint16_t next = polyak_next_bf16(s[i], scratch[i], weight, key, elem + i);
        s[i] = (guard & !polyak_is_finite(scratch[i])) ? s[i] : next;
      }
    }
  }
  if (args->write_back) /* Lookahead: params <- the slow weights just updated */
    for (int64_t i = 0; i < n; i++)
      polyak_store_f32((void *)t->param, first + i,
                       polyak_load_f32(shadows[args->num_shadows - 1], slot + i, shadow_dtype), param_dtype);
  return nonfinite;
}

/* A chunk of a tensor whose shadow is the caller's: the kernel's own code
 * (its only shadow, in its own dtype). */
ALWAYS_INLINE int64_t update_owned_chunk(const polyak_tensor_desc *t, const polyak_chunk *chunk,
                                         const polyak_update_args *args)
{
  int64_t nonfinite = 0;
  for (int64_t i = chunk->first_elem; i < chunk->first_elem + chunk->num_elems; i++) {
    float param = polyak_load_f32(t->param, i, t->param_dtype);
    int finite = polyak_is_finite(param);
    nonfinite += !finite;
    if ((finite || !args->skip_nonfinite) && args->num_shadows > 0)
      polyak_next_owned(t->owned, i, t->owned_dtype, t->owned_round_nearest, param, args->weight[0],
                        args->sr_key[0], t->global_offset_elems + i);
  }
  return nonfinite;
}

#define UPDATE_CASE(param_dtype, shadow_dtype)                                              \
  case (param_dtype)*4 + (shadow_dtype):                                                    \
    nonfinite += update_chunk(t, chunk, shadows, args, param_dtype, shadow_dtype, scratch); \
    break;

/* layer_beta: LAWA's betas (tensor-major), whose weights each chunk of a
 * tensor resolves as the kernel does, or NULL. */
#define DEFINE_WALK_PLAN(name, attributes)                                                    \
  attributes static int64_t name(const polyak_t *p, void *const *shadows,                    \
                                 const polyak_update_args *all_chunks, const double *layer_beta, \
                                 float *scratch)                                              \
  {                                                                                           \
    int64_t nonfinite = 0;                                                                    \
    polyak_update_args layer = *all_chunks;                                                   \
    const polyak_update_args *args = layer_beta ? &layer : all_chunks;                        \
    for (int64_t c = 0; c < p->num_chunks; c++) {                                             \
      const polyak_chunk *chunk = &p->chunks[c];                                              \
      const polyak_tensor_desc *t = &p->descs[chunk->tensor];                                 \
      if (layer_beta)                                                                         \
        polyak_resolve_layerwise(&layer, p->cfg.layerwise_beta0,                              \
                                 layer_beta + (int64_t)chunk->tensor * POLYAK_MAX_SHADOWS);   \
      if (t->owned) {                                                                         \
        nonfinite += update_owned_chunk(t, chunk, args);                                      \
        continue;                                                                             \
      }                                                                                       \
      switch (t->param_dtype * 4 + (int)p->cfg.shadow_dtype) {                                \
        UPDATE_CASE(POLYAK_F32, POLYAK_F32)                                                   \
        UPDATE_CASE(POLYAK_BF16, POLYAK_F32)                                                  \
        UPDATE_CASE(POLYAK_F16, POLYAK_F32)                                                   \
        UPDATE_CASE(POLYAK_F32, POLYAK_BF16)                                                  \
        UPDATE_CASE(POLYAK_BF16, POLYAK_BF16)                                                 \
        UPDATE_CASE(POLYAK_F16, POLYAK_BF16)                                                  \
      }                                                                                       \
    }                                                                                         \
    return nonfinite;                                                                         \
  }

DEFINE_WALK_PLAN(walk_plan, )
#if defined(__x86_64__) || defined(__i386__)
DEFINE_WALK_PLAN(walk_plan_avx2, __attribute__((target("avx2,fma"))))
#endif

/* LAWA's betas from this step's gradients or norms, in the order
 * layerwise.h fixes (the kernel's: POLYAK_LAYER_THREADS threads). */
static void cpu_layer_betas(const polyak_t *p, cpu_state *s)
{
  float part[POLYAK_LAYER_THREADS];
  for (int64_t c = 0; c < p->num_chunks && s->layer_grads; c++) {
    const polyak_chunk *chunk = &p->chunks[c];
    for (int t = 0; t < POLYAK_LAYER_THREADS; t++)
      part[t] = polyak_chunk_sumsq_part(s->layer_grads[chunk->tensor], p->descs[chunk->tensor].param_dtype, chunk, t);
    s->chunk_sumsq[c] = polyak_sum_parts_f32(part);
  }
  double total_part[POLYAK_LAYER_THREADS] = {0};
  for (int l = 0; l < p->num_tensors; l++) {
    s->layer_norm[l] = s->layer_norms ? (double)s->layer_norms[l]
                                      : polyak_tensor_norm(s->chunk_sumsq, p->tensor_chunks[l], p->tensor_chunks[l + 1]);
    total_part[l % POLYAK_LAYER_THREADS] += polyak_norm_term(s->layer_norm[l]);
  }
  double total = polyak_sum_parts_f64(total_part);
  for (int l = 0; l < p->num_tensors; l++)
    polyak_layer_betas(s->layer_norm[l], total, p->cfg.layerwise_beta0, p->cfg.num_shadows,
                       s->layer_beta + (int64_t)l * POLYAK_MAX_SHADOWS);
}

static polyak_status cpu_update(polyak_t *p, const polyak_update_args *args, void *stream)
{
  (void)stream;
  cpu_state *state = p->backend;
  polyak_update_args resolved = *args;
  if (p->grad_norm)
    polyak_apply_grad_norm(&resolved, p->cfg.grad_norm_c, *p->grad_norm, state->products);
  if (p->layer_source)
    cpu_layer_betas(p, state);
  state->nonfinite_count +=
      state->walk(p, state->shadows, &resolved, p->layer_source ? state->layer_beta : NULL, state->scratch);
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

#ifdef POLYAK_HAVE_CUDA
#include "cuda_check.h"

/* Device memory handed to the CPU backend would crash the first read. */
static polyak_status refuse_device_params(polyak_t *p)
{
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    const void *on_device = t->num_elems == 0                          ? NULL
                            : polyak_cuda_is_device_memory(t->param)      ? t->param
                            : t->owned && polyak_cuda_is_device_memory(t->shadow) ? t->shadow
                                                                                  : NULL;
    if (on_device)
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                         "polyak_finalize: tensor %d (\"%s\") %s %p is CUDA device memory; "
                         "the CPU backend needs host memory (or use POLYAK_BACKEND_CUDA)",
                         i, t->name, on_device == t->param ? "param" : "shadow", on_device);
  }
  return POLYAK_OK;
}
#endif

/* Host memory, or the reads would crash. */
static polyak_status refuse_device_memory(polyak_t *p, const void *memory, const char *what)
{
  (void)p, (void)memory, (void)what;
#ifdef POLYAK_HAVE_CUDA
  if (memory && polyak_cuda_is_device_memory(memory))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s %p is CUDA device memory; the CPU backend reads host memory",
                       what, memory);
#endif
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
  (void)p, (void)grad_norm;
#ifdef POLYAK_HAVE_CUDA
  if (polyak_cuda_is_device_memory(grad_norm))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_set_grad_norm: %p is CUDA device memory; the CPU backend reads host "
                       "memory",
                       (const void *)grad_norm);
#endif
  return POLYAK_OK;
}

/* A non-finite param among the kept elements (this rank's slice). */
/* `whole`: every element (a hard update, which every rank must refuse
 * alike), else this rank's (finalize). */
static polyak_status find_nonfinite_param(polyak_t *p, int whole, const char *function)
{
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    const polyak_tensor_desc *d = &p->descs[i];
    int64_t first = whole ? 0 : d->local_first_elem, end = whole ? t->num_elems : first + d->local_num_elems;
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

/* Each kept element's shadow starts as its param (or 0); padding is 0. */
/* Shadow k (`arena`, or the caller's memory) <- the params, this rank's
 * pieces, rounded to nearest even. */
static void copy_params_into(const polyak_t *p, void *arena, int k)
{
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor_desc *t = &p->descs[i];
    for (int64_t e = t->local_first_elem; e < t->local_first_elem + t->local_num_elems; e++)
      polyak_shadow_store(t, arena, p->cfg.shadow_dtype, k, e, polyak_load_f32(t->param, e, t->param_dtype));
  }
}

static void init_shadow(const polyak_t *p, void *arena, int k)
{
  if (arena) /* NULL where every shadow is the caller's */
    memset(arena, 0, (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype));
  if (!p->cfg.zero_init)
    copy_params_into(p, arena, k);
}

static void free_arenas(void **arenas)
{
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
    free(arenas[k]);
    arenas[k] = NULL;
  }
}

/* num_shadows arenas of the plan's size; all or none. */
static int alloc_arenas(const polyak_t *p, void **arenas)
{
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  size_t alloc_num_bytes = (arena_num_bytes + 63) / 64 * 64;
  for (int k = 0; k < p->cfg.num_shadows && alloc_num_bytes > 0; k++) {
    arenas[k] = aligned_alloc(64, alloc_num_bytes);
    if (!arenas[k]) {
      free_arenas(arenas);
      return -1;
    }
  }
  return 0;
}

static void cpu_release(polyak_t *p)
{
  cpu_state *state = p->backend;
  if (!state)
    return;
  free_arenas(state->shadows);
  free_arenas(state->staging);
  free(state->store);
  free(state->layer_grads);
  free(state->chunk_sumsq);
  free(state->layer_norm);
  free(state->layer_beta);
  free(state);
  p->backend = NULL;
}

static polyak_status cpu_finalize(polyak_t *p, void *stream)
{
  (void)stream;
#ifdef POLYAK_HAVE_CUDA
  polyak_status refused = refuse_device_params(p);
  if (refused != POLYAK_OK)
    return refused;
#endif
  if (p->cfg.skip_nonfinite && !p->cfg.zero_init) {
    polyak_status status = find_nonfinite_param(p, 0, "polyak_finalize");
    if (status != POLYAK_OK)
      return status;
  }
  cpu_state *state = calloc(1, sizeof *state);
  if (!state)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_finalize: out of host memory");
  p->backend = state;
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++)
    state->products[k] = 1.0;
  state->walk = walk_plan;
#if defined(__x86_64__) || defined(__i386__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    state->walk = walk_plan_avx2;
#endif
  if (alloc_arenas(p, state->shadows) != 0) {
    cpu_release(p);
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY,
                       "polyak_finalize: out of host memory for %d shadows of %lld elements",
                       p->cfg.num_shadows, (long long)p->arena_elems);
  }
  for (int k = 0; k < p->cfg.num_shadows; k++)
    init_shadow(p, state->shadows[k], k);
  return POLYAK_OK;
}

static void *cpu_arena(polyak_t *p, int shadow)
{
  return ((cpu_state *)p->backend)->shadows[shadow];
}

static polyak_status cpu_read_out(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                                  double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream)
{
  (void)p, (void)stream;
  for (int64_t e = 0; e < num_elems; e++)
    polyak_store_f32(dst, e, polyak_debias(polyak_load_f32(src, e, src_dtype), debias_scale), dst_dtype);
  return POLYAK_OK;
}

/* Element by element of each param: fmaf in snapshot order. */
static polyak_status cpu_synthesize(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                                    void *stream)
{
  (void)stream;
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor_desc *t = &p->descs[i];
    for (int64_t e = t->local_first_elem; e < t->local_first_elem + t->local_num_elems; e++) {
      const float *column = snapshots + t->shadow_offset_elems + e;
      float acc = 0.0f;
      for (int s = 0; s < num_snapshots; s++)
        acc = polyak_blend_step(acc, weight[s], column[(int64_t)s * p->arena_elems]);
      polyak_store_f32((void *)t->param, e, acc, t->param_dtype);
    }
  }
  return POLYAK_OK;
}

static polyak_status cpu_hard_update(polyak_t *p, int shadow, void *stream)
{
  (void)stream;
  polyak_status status = p->cfg.skip_nonfinite ? find_nonfinite_param(p, 1, "polyak_hard_update") : POLYAK_OK;
  if (status == POLYAK_OK)
    copy_params_into(p, ((cpu_state *)p->backend)->shadows[shadow], shadow);
  return status;
}

static polyak_status cpu_check_read_out(polyak_t *p, const void *dst, void *stream, const char *function)
{
  (void)p, (void)dst, (void)stream, (void)function;
  return POLYAK_OK;
}

/* This rank's piece of every tensor's shadow into the params. */
static polyak_status cpu_copy_to_params(polyak_t *p, int shadow, double debias_scale, void *stream)
{
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor_desc *t = &p->descs[i];
    char *dst = (char *)p->tensors[i].param +
                t->local_first_elem * (int64_t)polyak_dtype_num_bytes(p->tensors[i].dtype);
    polyak_dtype src_dtype;
    const void *src = polyak_local_slice(p, shadow, i, &src_dtype);
    cpu_read_out(p, src, src_dtype, t->local_num_elems, debias_scale, dst, p->tensors[i].dtype, stream);
  }
  return POLYAK_OK;
}

static polyak_status cpu_blend(polyak_t *p, const float *coefficient, int tensor, void *dst,
                               polyak_dtype dst_dtype, void *stream)
{
  (void)stream;
  int first = tensor < 0 ? 0 : tensor, last = tensor < 0 ? p->num_tensors : tensor + 1;
  for (int i = first; i < last; i++) {
    const polyak_tensor_desc *t = &p->descs[i];
    void *to = tensor < 0 ? p->tensors[i].param : dst;
    polyak_dtype to_dtype = tensor < 0 ? p->tensors[i].dtype : dst_dtype;
    for (int64_t e = 0; e < t->num_elems; e++) {
      float acc = 0.0f;
      for (int k = 0; k < p->cfg.num_shadows; k++)
        if (coefficient[k] != 0.0f)
          acc = polyak_blend_step(acc, coefficient[k], polyak_shadow_load(t, cpu_arena(p, k), p->cfg.shadow_dtype, k, e));
      polyak_store_f32(to, e, acc, to_dtype);
    }
  }
  return POLYAK_OK;
}

static polyak_status cpu_store(polyak_t *p, void *stream)
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

static polyak_status cpu_restore(polyak_t *p, void *stream)
{
  (void)stream;
  const cpu_state *state = p->backend;
  for (int i = 0; i < p->num_tensors; i++)
    memcpy(p->tensors[i].param, (const char *)state->store + p->descs[i].store_offset_bytes,
           (size_t)p->tensors[i].num_elems * polyak_dtype_num_bytes(p->tensors[i].dtype));
  return POLYAK_OK;
}

static polyak_status cpu_nonfinite_count(polyak_t *p, int64_t *count)
{
  *count = ((const cpu_state *)p->backend)->nonfinite_count;
  return POLYAK_OK;
}

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

/* ---- checkpoints: raw shadow bytes ------------------------------------------ */

static void *cpu_host_buffer(polyak_t *p, size_t num_bytes)
{
  (void)p;
  return malloc(num_bytes);
}

static void cpu_free_host_buffer(polyak_t *p, void *buffer)
{
  (void)p;
  free(buffer);
}

static polyak_status cpu_copy_to_host(polyak_t *p, void *host, const void *src, size_t num_bytes)
{
  (void)p;
  memcpy(host, src, num_bytes);
  return POLYAK_OK;
}

static polyak_status cpu_copy_from_host(polyak_t *p, void *dst, const void *host, size_t num_bytes)
{
  (void)p;
  memcpy(dst, host, num_bytes);
  return POLYAK_OK;
}

static polyak_status cpu_staging_begin(polyak_t *p)
{
  cpu_state *state = p->backend;
  if (alloc_arenas(p, state->staging) != 0)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY,
                       "polyak_load: out of host memory for a second set of shadows");
  return POLYAK_OK;
}

static polyak_status cpu_staging_write(polyak_t *p, int shadow, int64_t first_elem,
                                       int64_t num_elems, const void *host)
{
  cpu_state *state = p->backend;
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  memcpy((char *)state->staging[shadow] + first_elem * elem_bytes, host,
         (size_t)num_elems * elem_bytes);
  return POLYAK_OK;
}

/* Copied into the live arenas (as on the GPU, where graphs hold their
 * addresses), so shadow memory never moves during a handle's life. */
static polyak_status cpu_staging_commit(polyak_t *p, int64_t nonfinite_count)
{
  cpu_state *state = p->backend;
  size_t arena_num_bytes = (size_t)p->arena_alloc_elems * polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  for (int k = 0; k < p->cfg.num_shadows && arena_num_bytes > 0; k++)
    memcpy(state->shadows[k], state->staging[k], arena_num_bytes);
  free_arenas(state->staging);
  state->nonfinite_count = nonfinite_count;
  return POLYAK_OK;
}

static void cpu_staging_abort(polyak_t *p)
{
  free_arenas(((cpu_state *)p->backend)->staging);
}

static void *cpu_scratch_alloc(polyak_t *p, size_t num_bytes)
{
  (void)p;
  return malloc(num_bytes ? num_bytes : 1);
}

static void cpu_scratch_free(polyak_t *p, void *scratch)
{
  (void)p;
  free(scratch);
}

static polyak_status cpu_copy_bytes(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream)
{
  (void)p, (void)stream;
  memcpy(dst, src, num_bytes);
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

const polyak_backend_ops polyak_cpu_ops = {
    .finalize = cpu_finalize,
    .update = cpu_update,
    .arena = cpu_arena,
    .read_out = cpu_read_out,
    .check_read_out = cpu_check_read_out,
    .nonfinite_count = cpu_nonfinite_count,
    .release = cpu_release,
    .graph_reserve = cpu_graph_reserve,
    .graph_update = cpu_graph_update,
    .graph_release = cpu_graph_release,
    .host_buffer = cpu_host_buffer,
    .free_host_buffer = cpu_free_host_buffer,
    .copy_to_host = cpu_copy_to_host,
    .copy_from_host = cpu_copy_from_host,
    .staging_begin = cpu_staging_begin,
    .staging_write = cpu_staging_write,
    .staging_commit = cpu_staging_commit,
    .staging_abort = cpu_staging_abort,
    .copy_to_params = cpu_copy_to_params,
    .blend = cpu_blend,
    .hard_update = cpu_hard_update,
    .set_layer_source = cpu_set_layer_source,
    .layer_betas = cpu_layer_betas_read,
    .synthesize = cpu_synthesize,
    .products_read = cpu_products_read,
    .products_write = cpu_products_write,
    .check_grad_norm = cpu_check_grad_norm,
    .store = cpu_store,
    .restore = cpu_restore,
    .scratch_alloc = cpu_scratch_alloc,
    .scratch_free = cpu_scratch_free,
    .copy_bytes = cpu_copy_bytes,
    .all_gather = NULL, /* NCCL needs device memory */
    .agree = cpu_agree,
    .capturing = cpu_capturing,
};
