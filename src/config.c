/* config.c: configuration defaults and the checks polyak_create makes. */
#include <math.h>
#include <string.h>

#include "polyak_internal.h"

#ifdef POLYAK_HAVE_CUDA
#include "cuda/cuda_check.h"
#endif
#ifdef POLYAK_HAVE_NCCL
#include "cuda/nccl_comm.h"
#endif

void polyak_config_init(polyak_config *cfg)
{
  if (!cfg)
    return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->backend = POLYAK_BACKEND_CPU;
  cfg->device = 0;
  cfg->num_shadows = 1;
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
    polyak_schedule *s = &cfg->schedules[k];
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
    cfg->rounding[k] = POLYAK_ROUND_NEAREST;
  cfg->cpu_threads = 1;
}

int polyak_config_normalize(const polyak_config *in, polyak_config *out)
{
  if (!in || (in->struct_size != sizeof(polyak_config) && in->struct_size != POLYAK_CONFIG_SIZE_V5 &&
              in->struct_size != POLYAK_CONFIG_SIZE_V4 && in->struct_size != POLYAK_CONFIG_SIZE_V3 &&
              in->struct_size != POLYAK_CONFIG_SIZE_V2 && in->struct_size != POLYAK_CONFIG_SIZE_V1))
    return -1;
  polyak_config_init(out);
  memcpy(out, in, in->struct_size); /* fields of later versions keep their defaults */
  out->struct_size = sizeof(polyak_config);
  return 0;
}

int polyak_backend_available(polyak_backend b)
{
  switch (b) {
  case POLYAK_BACKEND_CPU:
    return 1;
  case POLYAK_BACKEND_CUDA:
#ifdef POLYAK_HAVE_CUDA
    return polyak_cuda_device_count(NULL, 0) > 0;
#else
    return 0;
#endif
  }
  return 0;
}

static polyak_status check_backend(const polyak_config *cfg, char *msg, size_t msg_num_bytes)
{
  switch (cfg->backend) {
  case POLYAK_BACKEND_CPU:
    return POLYAK_OK;
  case POLYAK_BACKEND_CUDA:
#ifdef POLYAK_HAVE_CUDA
    return polyak_cuda_check_device(cfg->device, msg, msg_num_bytes);
#else
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                          "the CUDA backend is not in this build of polyak (configured "
                          "with POLYAK_WITH_CUDA=OFF or without a CUDA compiler)");
#endif
  }
  return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "backend = %d is not a polyak_backend",
                        (int)cfg->backend);
}

static polyak_status check_sharding(const polyak_config *cfg, char *msg, size_t msg_num_bytes)
{
  if (cfg->world_size < 1)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "world_size = %d; it counts ranks, at least 1",
                          cfg->world_size);
  if (cfg->rank < 0 || cfg->rank >= cfg->world_size)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "rank = %d is outside 0..%d (world_size %d)",
                          cfg->rank, cfg->world_size - 1, cfg->world_size);
  if (!cfg->nccl_comm)
    return POLYAK_OK;
  if (cfg->backend != POLYAK_BACKEND_CUDA)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "nccl_comm is set but NCCL moves device memory: it needs the CUDA "
                          "backend");
#ifdef POLYAK_HAVE_NCCL
  return polyak_nccl_check_comm(cfg->nccl_comm, cfg->world_size, cfg->rank, cfg->device, msg, msg_num_bytes);
#else
  return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                        "nccl_comm is set but this build of polyak has no NCCL (configured with "
                        "POLYAK_WITH_NCCL=OFF or without NCCL found)");
#endif
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
  const polyak_schedule *s = &cfg->schedules[slow];
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
                          "schedules[%d] is Lookahead's: alpha = 1 - beta must be above 0, "
                          "and beta = %g",
                          slow, s->beta);
  return POLYAK_OK;
}

/* Shadows whose beta comes from gradients, grad_norm_c (one beta from the
 * gradient norm) and layerwise_beta0 (one per tensor, LAWA): the value a
 * fraction in [0, 1], and none of the options that shape a schedule's one
 * beta per step; LAWA also keeps no beta product to debias with. */
static polyak_status check_adaptive(const polyak_config *cfg, const char *field, const double *value, int layerwise,
                                    char *msg, size_t msg_num_bytes)
{
  for (int k = 0; k < cfg->num_shadows; k++) {
    if (!(value[k] >= 0.0 && value[k] <= 1.0))
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "%s[%d] = %g is outside [0, 1]", field, k,
                            value[k]);
    if (value[k] == 0.0)
      continue;
    const char *conflict = cfg->schedules[k].start_step != 0                       ? "a start_step"
                           : cfg->count_updates[k]                                 ? "count_updates"
                           : cfg->lookahead_every > 0 && k == cfg->num_shadows - 1 ? "Lookahead"
                           : layerwise && cfg->grad_norm_c[k] != 0.0               ? "grad_norm_c"
                           : layerwise && cfg->zero_init                           ? "zero_init"
                                                                                   : NULL;
    if (conflict)
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                            "shadow %d takes its beta from gradients (%s[%d] = %g) and cannot also have %s", k, field,
                            k, value[k], conflict);
    if (layerwise && cfg->world_size > 1)
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_UNSUPPORTED,
                            "layer-wise shadows need every gradient on one rank (world_size %d)", cfg->world_size);
  }
  return POLYAK_OK;
}

polyak_status polyak_check_config(const polyak_config *given, char *msg, size_t msg_num_bytes)
{
  char reason[POLYAK_ERROR_BYTES];
  polyak_message(msg, msg_num_bytes, POLYAK_OK, "%s", "");
  if (!given)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "cfg is NULL");
  polyak_config normalized;
  if (polyak_config_normalize(given, &normalized) != 0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                          "cfg->struct_size = %zu, this library's polyak_config has %zu bytes "
                          "(earlier versions %zu, %zu, %zu, %zu, %zu): call polyak_config_init() first",
                          given->struct_size, sizeof(polyak_config), (size_t)POLYAK_CONFIG_SIZE_V5,
                          (size_t)POLYAK_CONFIG_SIZE_V4, (size_t)POLYAK_CONFIG_SIZE_V3, (size_t)POLYAK_CONFIG_SIZE_V2,
                          (size_t)POLYAK_CONFIG_SIZE_V1);
  const polyak_config *cfg = &normalized;
  if (cfg->num_shadows < 1 || cfg->num_shadows > POLYAK_MAX_SHADOWS)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "num_shadows = %d is outside 1..%d",
                          cfg->num_shadows, POLYAK_MAX_SHADOWS);
  for (int k = 0; k < cfg->num_shadows; k++) {
    polyak_status status = polyak_schedule_check(&cfg->schedules[k], reason, sizeof reason);
    if (status != POLYAK_OK)
      return polyak_message(msg, msg_num_bytes, status, "schedules[%d]: %s", k, reason);
    if (cfg->count_updates[k] != 0 && cfg->count_updates[k] != 1)
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "count_updates[%d] = %d is not 0 or 1", k,
                            cfg->count_updates[k]);
    if (cfg->rounding[k] != POLYAK_ROUND_NEAREST && cfg->rounding[k] != POLYAK_ROUND_STOCHASTIC)
      return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG,
                            "rounding[%d] = %d is not POLYAK_ROUND_NEAREST (0) or POLYAK_ROUND_STOCHASTIC (1)", k,
                            cfg->rounding[k]);
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
    status = check_sharding(cfg, msg, msg_num_bytes);
  if (status == POLYAK_OK)
    status = check_lookahead(cfg, msg, msg_num_bytes);
  if (status == POLYAK_OK)
    status = check_adaptive(cfg, "grad_norm_c", cfg->grad_norm_c, 0, msg, msg_num_bytes);
  return status == POLYAK_OK ? check_adaptive(cfg, "layerwise_beta0", cfg->layerwise_beta0, 1, msg, msg_num_bytes)
                             : status;
}
