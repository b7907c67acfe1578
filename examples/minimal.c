/*
 * minimal.c: polyak's core in one screen, using only Part 1 of polyak.h.
 * A "model" of two tensors is trained by noisy steps toward a target; an
 * EMA of its weights lands nearer the target than the weights themselves.
 * The EMA is saved and loaded back into a second handle, which must read the
 * same bits.
 *
 *   polyak_minimal [path]     (default: minimal.safetensors in the current directory)
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <polyak.h>

#define ROWS 3
#define COLS 5
#define BIAS 5

static float noise(uint64_t *state) /* a small xorshift, uniform in [-1, 1) */
{
  *state ^= *state << 13, *state ^= *state >> 7, *state ^= *state << 17;
  return (float)((*state >> 40) * (2.0 / 16777216.0) - 1.0);
}

static int check(polyak_t *p, polyak_status status, const char *what)
{
  if (status != POLYAK_OK)
    fprintf(stderr, "minimal: %s: %s: %s\n", what, polyak_status_name(status), polyak_last_error(p));
  return status != POLYAK_OK;
}

/* Registers the two tensors with a fresh handle and finalizes it. */
static polyak_t *make_ema(float *weight, float *bias)
{
  polyak_config cfg;
  polyak_config_init(&cfg); /* CPU backend, one shadow */
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_CONSTANT;
  cfg.shadows[0].schedule.beta = 0.99;
  polyak_t *p = NULL;
  const int64_t weight_shape[2] = {ROWS, COLS}, bias_shape[1] = {BIAS};
  if (check(NULL, polyak_create(&p, &cfg), "polyak_create") ||
      check(p, polyak_add(p, "weight", weight, POLYAK_F32, 2, weight_shape), "polyak_add") ||
      check(p, polyak_add(p, "bias", bias, POLYAK_F32, 1, bias_shape), "polyak_add") ||
      check(p, polyak_finalize(p, NULL), "polyak_finalize")) {
    polyak_destroy(p);
    return NULL;
  }
  return p;
}

int main(int argc, char **argv)
{
  const char *path = argc > 1 ? argv[1] : "minimal.safetensors";
  float weight[ROWS * COLS] = {0}, bias[BIAS] = {0}, target = 1.0f;
  polyak_t *ema = make_ema(weight, bias);
  if (!ema)
    return 1;
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  for (int64_t step = 1; step <= 2000; step++) { /* a step of "SGD": halfway to the target, plus noise */
    for (int i = 0; i < ROWS * COLS; i++)
      weight[i] += 0.1f * (target - weight[i]) + 0.05f * noise(&rng);
    for (int i = 0; i < BIAS; i++)
      bias[i] += 0.1f * (target - bias[i]) + 0.05f * noise(&rng);
    if (check(ema, polyak_update(ema, step, NULL), "polyak_update"))
      return 1;
  }
  int tensor = -1;
  float average[ROWS * COLS], reloaded[ROWS * COLS];
  if (check(ema, polyak_find_tensor(ema, "weight", &tensor), "polyak_find_tensor") ||
      check(ema, polyak_get_shadow_n(ema, 0, tensor, average, POLYAK_F32, sizeof average, NULL), "read") ||
      check(ema, polyak_save(ema, path), "polyak_save"))
    return 1;
  double raw_error = 0.0, ema_error = 0.0;
  for (int i = 0; i < ROWS * COLS; i++) {
    raw_error += fabs(weight[i] - target) / (ROWS * COLS);
    ema_error += fabs(average[i] - target) / (ROWS * COLS);
  }
  printf("mean |w - target|: weights %.5f, EMA %.5f\n", raw_error, ema_error);

  polyak_t *resumed = make_ema(weight, bias); /* a new run of the same model */
  int64_t step = 0;
  if (!resumed || check(resumed, polyak_load(resumed, path), "polyak_load") ||
      check(resumed, polyak_get_step(resumed, &step), "polyak_get_step") ||
      check(resumed, polyak_get_shadow_n(resumed, 0, tensor, reloaded, POLYAK_F32, sizeof reloaded, NULL), "read"))
    return 1;
  int same = 1;
  for (int i = 0; i < ROWS * COLS; i++)
    same &= average[i] == reloaded[i];
  printf("loaded %s at step %lld: %s\n", path, (long long)step, same ? "the same bits" : "DIFFERENT BITS");
  polyak_destroy(resumed);
  polyak_destroy(ema);
  return same && ema_error < raw_error ? 0 : 1;
}
