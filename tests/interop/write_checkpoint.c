/* write_checkpoint.c: writes checkpoints of a small model for
 * check_safetensors.py: DIR/f32.safetensors and DIR/bf16.safetensors (f32
 * and bf16 shadows, two shadows each), and for every saved tensor the
 * values polyak_get_shadow reads, as raw little-endian f32 in
 * DIR/<dtype>/<saved name>.f32; beside them two copy-only buffers, an I64
 * step counter and F32 statistics, whose bytes go to DIR/<dtype>/<name>.raw.
 * Usage: write_checkpoint DIR */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <polyak.h>

enum { NUM_TENSORS = 4 };
static const char *kNames[NUM_TENSORS] = {"layer.weight", "layer.bias", "embed.weight", "scale"};
static const int kNdims[NUM_TENSORS] = {2, 1, 2, 0};
static const int64_t kShapes[NUM_TENSORS][2] = {{3, 5}, {3, 0}, {1000, 67}, {0, 0}};
static const int64_t kNumElems[NUM_TENSORS] = {15, 3, 67000, 1};

/* The copy-only buffers: a BatchNorm-like module's. */
static int64_t num_batches_tracked;
static float running_var[3];

static int dump_raw(const char *dir, const char *dtype, const char *name, const void *data, size_t num_bytes)
{
  char path[4096];
  snprintf(path, sizeof path, "%s/%s/%s.raw", dir, dtype, name);
  FILE *out = fopen(path, "wb");
  int failed = !out || fwrite(data, 1, num_bytes, out) != num_bytes;
  if (out)
    fclose(out);
  return failed ? -1 : 0;
}

static int dump(polyak_t *p, const char *dir, const char *dtype)
{
  char path[4096];
  float *values = malloc(sizeof(float) * 67000);
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < NUM_TENSORS; i++) {
      if (polyak_get_shadow(p, k, i, values, POLYAK_F32, NULL) != POLYAK_OK)
        return -1;
      if (k == 0)
        snprintf(path, sizeof path, "%s/%s/%s.f32", dir, dtype, kNames[i]);
      else
        snprintf(path, sizeof path, "%s/%s/polyak.shadow.%d.%s.f32", dir, dtype, k, kNames[i]);
      FILE *out = fopen(path, "wb");
      if (!out || fwrite(values, sizeof(float), (size_t)kNumElems[i], out) != (size_t)kNumElems[i])
        return -1;
      fclose(out);
    }
  free(values);
  return dump_raw(dir, dtype, "bn.num_batches_tracked", &num_batches_tracked, sizeof num_batches_tracked) ||
                 dump_raw(dir, dtype, "bn.running_var", running_var, sizeof running_var)
             ? -1
             : 0;
}

static int write_one(const char *dir, polyak_dtype shadow_dtype, const char *dtype)
{
  static float params[15 + 3 + 67000 + 1];
  for (int e = 0; e < 15 + 3 + 67000 + 1; e++)
    params[e] = 0.001f * (float)((e * 7919) % 2001 - 1000);
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = 2;
  cfg.shadow_dtype = shadow_dtype;
  cfg.shadows[0].schedule.beta = 0.9;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.seed = 7;
  polyak_t *p = NULL;
  if (polyak_create(&p, &cfg) != POLYAK_OK)
    return -1;
  float *next = params;
  for (int i = 0; i < NUM_TENSORS; i++) {
    if (polyak_add(p, kNames[i], next, POLYAK_F32, kNdims[i], kShapes[i]) != POLYAK_OK)
      return -1;
    next += kNumElems[i];
  }
  const int64_t three[1] = {3};
  if (polyak_add_copy(p, "bn.num_batches_tracked", &num_batches_tracked, POLYAK_I64, 0, NULL) != POLYAK_OK ||
      polyak_add_copy(p, "bn.running_var", running_var, POLYAK_F32, 1, three) != POLYAK_OK ||
      polyak_finalize(p, NULL) != POLYAK_OK)
    return -1;
  for (int64_t step = 1; step <= 4; step++) {
    for (int e = 0; e < 15 + 3 + 67000 + 1; e++)
      params[e] += 0.01f * (float)step;
    num_batches_tracked = step;
    for (int e = 0; e < 3; e++)
      running_var[e] = 1.0f + 0.25f * (float)(step * (e + 1));
    if (polyak_update(p, step, NULL) != POLYAK_OK)
      return -1;
  }
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, dtype);
  mkdir(path, 0755);
  snprintf(path, sizeof path, "%s/%s.safetensors", dir, dtype);
  int failed = polyak_save(p, path) != POLYAK_OK || dump(p, dir, dtype) != 0;
  if (failed)
    fprintf(stderr, "write_checkpoint: %s\n", polyak_last_error(p));
  polyak_destroy(p);
  return failed ? -1 : 0;
}

int main(int argc, char **argv)
{
  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  if (write_one(argv[1], POLYAK_F32, "f32") != 0 || write_one(argv[1], POLYAK_BF16, "bf16") != 0)
    return 1;
  return 0;
}
