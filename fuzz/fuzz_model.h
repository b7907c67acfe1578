/* fuzz_model.h: the handle the loader is fuzzed against, and the one the
 * seed corpus is written from: the same names, shapes and config. */
#ifndef POLYAK_FUZZ_MODEL_H
#define POLYAK_FUZZ_MODEL_H

#include <stdint.h>
#include <stdlib.h>

#include "polyak.h"

typedef struct {
  float weight[3 * 5];
  uint16_t bias[7];
  float scalar[1];
} fuzz_params;

/* Two shadows over three tensors (one bf16); NULL on failure. */
static polyak_t *fuzz_model_create(fuzz_params *params, polyak_dtype shadow_dtype)
{
  for (int i = 0; i < 15; i++)
    params->weight[i] = 0.25f * (float)(i - 7);
  for (int i = 0; i < 7; i++)
    params->bias[i] = (uint16_t)(0x3F80 + 3 * i); /* bf16 values near 1 */
  params->scalar[0] = 2.5f;
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = 2;
  cfg.shadow_dtype = shadow_dtype;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  polyak_t *p = NULL;
  int64_t weight_shape[2] = {3, 5}, bias_shape[1] = {7};
  if (polyak_create(&p, &cfg) != POLYAK_OK ||
      polyak_add(p, "layer.weight", params->weight, POLYAK_F32, 2, weight_shape) != POLYAK_OK ||
      polyak_add(p, "layer.bias", params->bias, POLYAK_BF16, 1, bias_shape) != POLYAK_OK ||
      polyak_add(p, "scale", params->scalar, POLYAK_F32, 0, NULL) != POLYAK_OK ||
      polyak_finalize(p, NULL) != POLYAK_OK) {
    polyak_destroy(p);
    return NULL;
  }
  return p;
}

#endif /* POLYAK_FUZZ_MODEL_H */
