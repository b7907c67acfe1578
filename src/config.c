/* config.c: configuration defaults and the checks polyak_create makes. */
#include <math.h>
#include <string.h>

#include "polyak_internal.h"

void polyak_config_init(polyak_config *cfg)
{
  if (!cfg)
    return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->magic = POLYAK_CONFIG_MAGIC;
  cfg->backend = POLYAK_BACKEND_CPU;
  cfg->device = 0;
  cfg->num_shadows = 1;
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
    polyak_schedule *s = &cfg->shadows[k].schedule;
    s->kind = POLYAK_SCHEDULE_CONSTANT;
    s->beta = 0.999;
    s->beta_min = 0.0;
    s->inv_gamma = 1.0;
    s->power = 2.0 / 3.0;
    s->gamma = 6.94; /* sigma_rel 0.10 */
    s->ramp_steps = 1000;
    s->start_step = 0;
  }
  cfg->shadow_dtype = POLYAK_F32;
  cfg->zero_init = 0;
  cfg->skip_nonfinite = 1;
  cfg->seed = 0;
  cfg->world_size = 1;
  cfg->rank = 0;
  cfg->nccl_comm = NULL;
  cfg->lookahead_every = 0;
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++)
    cfg->shadows[k].rounding = POLYAK_ROUND_NEAREST;
  cfg->cpu_threads = 1;
}

int polyak_config_normalize(const polyak_config *in, polyak_config *out)
{
  if (!in || in->struct_size != POLYAK_CONFIG_SIZE_1_0 || in->magic != POLYAK_CONFIG_MAGIC)
    return -1;
  polyak_config_init(out);
  memcpy(out, in, in->struct_size); /* fields of later versions keep their defaults */
  out->struct_size = sizeof(polyak_config);
  return 0;
}

const polyak_backend_ops *polyak_backend_ops_of(polyak_backend b)
{
  switch (b) {
  case POLYAK_BACKEND_CPU:
    return &polyak_cpu_ops;
  case POLYAK_BACKEND_CUDA:
#ifdef POLYAK_HAVE_CUDA
    return &polyak_cuda_ops;
#else
    return NULL;
#endif
  }
  return NULL;
}

const char *polyak_foreign_memory(const polyak_t *p, const void *ptr)
{
  for (int b = 0; ptr && b <= POLYAK_BACKEND_CUDA; b++) {
    const polyak_backend_ops *ops = polyak_backend_ops_of((polyak_backend)b);
    if (ops && ops != p->ops && ops->owns_memory && ops->owns_memory(ptr))
      return ops->memory_name;
  }
  return NULL;
}

int polyak_backend_available(polyak_backend b)
{
  const polyak_backend_ops *ops = polyak_backend_ops_of(b);
  return ops && ops->available();
}

static polyak_status check_backend(const polyak_config *cfg, char *msg, size_t msg_num_bytes)
{
  if (cfg->backend != POLYAK_BACKEND_CPU && cfg->backend != POLYAK_BACKEND_CUDA)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "backend = %d is not a polyak_backend",
                          (int)cfg->backend);
  if (!polyak_backend_ops_of(cfg->backend))
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                          "the CUDA backend is not in this build of polyak (configured "
                          "with POLYAK_WITH_CUDA=OFF or without a CUDA compiler)");
  if (cfg->shadow_location != POLYAK_SHADOWS_DEVICE && cfg->shadow_location != POLYAK_SHADOWS_HOST)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "shadow_location = %d is not POLYAK_SHADOWS_DEVICE (0) or POLYAK_SHADOWS_HOST (1)",
                          cfg->shadow_location);
  /* POLYAK_SHADOWS_HOST: with the CUDA backend the shadows are offloaded
   * (src/offload/); the CPU backend's shadows are in host memory anyway */
  if (cfg->world_size < 1)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "world_size = %d; it counts ranks, at least 1",
                          cfg->world_size);
  if (cfg->rank < 0 || cfg->rank >= cfg->world_size)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "rank = %d is outside 0..%d (world_size %d)",
                          cfg->rank, cfg->world_size - 1, cfg->world_size);
  /* the device and the communicator: the backend's own checks */
  return polyak_backend_ops_of(cfg->backend)->check_config(cfg, msg, msg_num_bytes);
}

/* The slow weights start as the params and write them back, so they need
 * a plain start, whole shadows, and alpha = 1 - beta > 0. */
static polyak_status check_lookahead(const polyak_config *cfg, char *msg, size_t msg_num_bytes)
{
  if (cfg->lookahead_every < 0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "lookahead_every = %lld; it is k, the steps between syncs (0: no Lookahead)",
                          (long long)cfg->lookahead_every);
  if (cfg->lookahead_every == 0)
    return POLYAK_OK;
  const int slow = cfg->num_shadows - 1;
  const polyak_schedule *s = &cfg->shadows[slow].schedule;
  if (cfg->zero_init)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "Lookahead's slow weights start as the params: zero_init must be 0");
  if (cfg->world_size > 1)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                          "Lookahead writes whole params back; sharded handles (world_size %d) "
                          "cannot yet",
                          cfg->world_size);
  if (s->kind != POLYAK_SCHEDULE_EQUAL && s->kind != POLYAK_SCHEDULE_POWER && !(s->beta < 1.0))
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "shadows[%d].schedule is Lookahead's: alpha = 1 - beta must be above 0, "
                          "and beta = %g",
                          slow, s->beta);
  return POLYAK_OK;
}

/* Shadows whose beta comes from gradients, grad_norm_c (one beta from the
 * gradient norm) and layerwise_beta0 (one per tensor, LAWA): the value a
 * fraction in [0, 1], and none of the options that shape a schedule's one
 * beta per step; LAWA also keeps no beta product to debias with. */
static polyak_status check_adaptive(const polyak_config *cfg, int k, char *msg, size_t msg_num_bytes)
{
  const polyak_shadow_config *c = &cfg->shadows[k];
  for (int layerwise = 0; layerwise <= 1; layerwise++) {
    const char *field = layerwise ? "layerwise_beta0" : "grad_norm_c";
    const double value = layerwise ? c->layerwise_beta0 : c->grad_norm_c;
    if (!(value >= 0.0 && value <= 1.0))
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "shadows[%d].%s = %g is outside [0, 1]", k,
                            field, value);
    if (value == 0.0)
      continue;
    const char *conflict = c->schedule.start_step != 0                             ? "a start_step"
                           : c->count_updates                                      ? "count_updates"
                           : cfg->lookahead_every > 0 && k == cfg->num_shadows - 1 ? "Lookahead"
                           : layerwise && c->grad_norm_c != 0.0                    ? "grad_norm_c"
                           : layerwise && cfg->zero_init                           ? "zero_init"
                                                                                   : NULL;
    if (conflict)
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                            "shadow %d takes its beta from gradients (shadows[%d].%s = %g) and cannot also have %s", k,
                            k, field, value, conflict);
    if (layerwise && cfg->world_size > 1)
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                            "layer-wise shadows need every gradient on one rank (world_size %d)", cfg->world_size);
  }
  return POLYAK_OK;
}

/* One shadow's settings, those that stand alone. */
static polyak_status check_shadow(const polyak_config *cfg, int k, char *msg, size_t msg_num_bytes)
{
  char reason[POLYAK_ERROR_BYTES];
  const polyak_shadow_config *c = &cfg->shadows[k];
  polyak_status status = polyak_schedule_check(&c->schedule, reason, sizeof reason);
  if (status != POLYAK_OK)
    return polyak_message(msg, msg_num_bytes, status, "shadows[%d].schedule: %s", k, reason);
  if (c->count_updates != 0 && c->count_updates != 1)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "shadows[%d].count_updates = %d is not 0 or 1", k,
                          c->count_updates);
  if (c->rounding != POLYAK_ROUND_NEAREST && c->rounding != POLYAK_ROUND_STOCHASTIC)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "shadows[%d].rounding = %d is not POLYAK_ROUND_NEAREST (0) or POLYAK_ROUND_STOCHASTIC (1)", k,
                          c->rounding);
  return POLYAK_OK;
}

polyak_status polyak_check_config(const polyak_config *given, char *msg, size_t msg_num_bytes)
{
  polyak_message(msg, msg_num_bytes, POLYAK_OK, "%s", "");
  if (!given)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "cfg is NULL");
  polyak_config normalized;
  if (polyak_config_normalize(given, &normalized) != 0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "cfg->struct_size = %zu and cfg->magic = 0x%08x, where this library's polyak_config (1.0) "
                          "has %zu bytes and magic 0x%08x: call polyak_config_init() first",
                          given->struct_size, (unsigned)given->magic, (size_t)POLYAK_CONFIG_SIZE_1_0,
                          (unsigned)POLYAK_CONFIG_MAGIC);
  const polyak_config *cfg = &normalized;
  if (cfg->num_shadows < 1 || cfg->num_shadows > POLYAK_MAX_SHADOWS)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "num_shadows = %d is outside 1..%d",
                          cfg->num_shadows, POLYAK_MAX_SHADOWS);
  for (int k = 0; k < cfg->num_shadows; k++) {
    polyak_status status = check_shadow(cfg, k, msg, msg_num_bytes);
    if (status != POLYAK_OK)
      return status;
  }
  if (cfg->shadow_dtype != POLYAK_F32 && cfg->shadow_dtype != POLYAK_BF16)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "shadow_dtype = %d: shadows are POLYAK_F32 or POLYAK_BF16", (int)cfg->shadow_dtype);
  if (cfg->zero_init != 0 && cfg->zero_init != 1)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "zero_init = %d is not 0 or 1", cfg->zero_init);
  if (cfg->skip_nonfinite != 0 && cfg->skip_nonfinite != 1)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "skip_nonfinite = %d is not 0 or 1",
                          cfg->skip_nonfinite);
  if (cfg->cpu_threads < 0 || cfg->cpu_threads > POLYAK_MAX_CPU_THREADS)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "cpu_threads = %d is outside 0..%d (0: one per core)", cfg->cpu_threads,
                          POLYAK_MAX_CPU_THREADS);
  polyak_status status = check_backend(cfg, msg, msg_num_bytes);
  if (status == POLYAK_OK)
    status = check_lookahead(cfg, msg, msg_num_bytes);
  for (int k = 0; k < cfg->num_shadows && status == POLYAK_OK; k++)
    status = check_adaptive(cfg, k, msg, msg_num_bytes);
  return status;
}
