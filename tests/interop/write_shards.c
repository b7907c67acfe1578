/* write_shards.c: a set of checkpoint shards and polyak-consolidate's files
 * of it, for check_consolidated.py. Three ranks (world_size 3, no
 * communicator) and an unsharded handle run the same steps of a small model
 * (a Linear(5, 3), an Embedding(1000, 67) in bf16, a scalar, and a
 * BatchNorm's running_var and num_batches_tracked as copy-only buffers) with
 * zero_init, so read-outs are debiased. The ranks save into DIR/set; then
 *   DIR/shadow0-f32.safetensors   polyak-consolidate --shadow 0 DIR/set ...
 *   DIR/shadow1-bf16.safetensors  polyak-consolidate --shadow 1 --dtype bf16 DIR/set ...
 *   DIR/full.safetensors          polyak-consolidate DIR/set ...
 * and what the unsharded handle's polyak_get_shadow reads, as raw bytes, in
 * DIR/expected/<name>.<shadow0-f32|shadow1-bf16>.
 * Usage: write_shards CONSOLIDATE DIR */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <polyak.h>

enum { NUM_TENSORS = 6, NUM_RANKS = 3 };
static const char *kNames[NUM_TENSORS] = {"layer.weight",           "layer.bias",    "embed.weight", "scale",
                                          "bn.num_batches_tracked", "bn.running_var"};
static const polyak_dtype kDtypes[NUM_TENSORS] = {POLYAK_F32, POLYAK_F32, POLYAK_BF16,
                                                  POLYAK_F32, POLYAK_I64, POLYAK_F32};
static const int kNdims[NUM_TENSORS] = {2, 1, 2, 0, 0, 1};
static const int64_t kShapes[NUM_TENSORS][2] = {{3, 5}, {3, 0}, {1000, 67}, {0, 0}, {0, 0}, {3, 0}};
static const int64_t kNumElems[NUM_TENSORS] = {15, 3, 67000, 1, 1, 3};

static float weight[15], bias[3], scale[1], running_var[3];
static uint16_t embed[67000];
static int64_t num_batches_tracked;
static void *const kParams[NUM_TENSORS] = {weight, bias, embed, scale, &num_batches_tracked, running_var};

static polyak_t *make(int world_size, int rank)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = 2;
  cfg.zero_init = 1;
  cfg.shadows[0].schedule.beta = 0.9;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.world_size = world_size;
  cfg.rank = rank;
  polyak_t *p = NULL;
  if (polyak_create(&p, &cfg) != POLYAK_OK)
    return NULL;
  for (int i = 0; i < NUM_TENSORS; i++) {
    polyak_status status = i >= 4 ? polyak_add_copy(p, kNames[i], kParams[i], kDtypes[i], kNdims[i], kShapes[i])
                                  : polyak_add(p, kNames[i], kParams[i], kDtypes[i], kNdims[i], kShapes[i]);
    if (status != POLYAK_OK) {
      fprintf(stderr, "write_shards: %s\n", polyak_last_error(p));
      polyak_destroy(p);
      return NULL;
    }
  }
  if (polyak_finalize(p, NULL) != POLYAK_OK) {
    polyak_destroy(p);
    return NULL;
  }
  return p;
}

/* bf16 of a float, rounded to nearest even (finite values) */
static uint16_t to_bf16(float x)
{
  uint32_t bits;
  memcpy(&bits, &x, 4);
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static void set_params(int64_t step)
{
  for (int e = 0; e < 15; e++)
    weight[e] = 0.01f * (float)((e * 7919 + step * 31) % 201 - 100);
  for (int e = 0; e < 3; e++) {
    bias[e] = 0.5f - 0.1f * (float)(e + step);
    running_var[e] = 1.0f + 0.25f * (float)(step * (e + 1));
  }
  for (int e = 0; e < 67000; e++)
    embed[e] = to_bf16(0.001f * (float)(((int64_t)e * 104729 + step * 17) % 2001 - 1000));
  scale[0] = 1.0f + 0.125f * (float)step;
  num_batches_tracked = step;
}

/* What polyak_get_shadow gives of shadow k as `dtype` (buffers in their own). */
static int dump(polyak_t *p, const char *dir, int k, polyak_dtype dtype, const char *label)
{
  static char bytes[67000 * 4 + 8];
  for (int i = 0; i < NUM_TENSORS; i++) {
    polyak_dtype as = i >= 4 ? kDtypes[i] : dtype;
    size_t num_bytes = (size_t)kNumElems[i] * (as == POLYAK_BF16 ? 2 : as == POLYAK_I64 ? 8 : 4);
    if (polyak_get_shadow(p, k, i, bytes, as, NULL) != POLYAK_OK)
      return -1;
    char path[4096];
    snprintf(path, sizeof path, "%s/expected/%s.%s", dir, kNames[i], label);
    FILE *out = fopen(path, "wb");
    int failed = !out || fwrite(bytes, 1, num_bytes, out) != num_bytes;
    if (out)
      fclose(out);
    if (failed)
      return -1;
  }
  return 0;
}

int main(int argc, char **argv)
{
  if (argc != 3) {
    fprintf(stderr, "usage: %s CONSOLIDATE DIR\n", argv[0]);
    return 2;
  }
  const char *consolidate = argv[1], *dir = argv[2];
  char path[4096], command[3 * 4096];
  set_params(0);
  polyak_t *whole = make(1, 0), *ranks[NUM_RANKS];
  for (int r = 0; r < NUM_RANKS; r++)
    ranks[r] = make(NUM_RANKS, r);
  int failed = !whole;
  for (int r = 0; r < NUM_RANKS; r++)
    failed |= !ranks[r];
  for (int64_t step = 1; step <= 4 && !failed; step++) {
    set_params(step);
    failed |= polyak_update(whole, step, NULL) != POLYAK_OK;
    for (int r = 0; r < NUM_RANKS; r++)
      failed |= polyak_update(ranks[r], step, NULL) != POLYAK_OK;
  }
  snprintf(path, sizeof path, "%s/set", dir);
  mkdir(path, 0755);
  for (int r = 0; r < NUM_RANKS && !failed; r++)
    if (polyak_save_shards(ranks[r], path) != POLYAK_OK) {
      fprintf(stderr, "write_shards: %s\n", polyak_last_error(ranks[r]));
      failed = 1;
    }
  snprintf(path, sizeof path, "%s/expected", dir);
  mkdir(path, 0755);
  failed = failed || dump(whole, dir, 0, POLYAK_F32, "shadow0-f32") != 0 ||
           dump(whole, dir, 1, POLYAK_BF16, "shadow1-bf16") != 0;
  const char *runs[3][2] = {{"--shadow 0", "shadow0-f32"}, {"--shadow 1 --dtype bf16", "shadow1-bf16"}, {"", "full"}};
  for (int n = 0; n < 3 && !failed; n++) {
    snprintf(command, sizeof command, "'%s' %s '%s/set' '%s/%s.safetensors'", consolidate, runs[n][0], dir, dir,
             runs[n][1]);
    if (system(command) != 0) {
      fprintf(stderr, "write_shards: %s failed\n", command);
      failed = 1;
    }
  }
  polyak_destroy(whole);
  for (int r = 0; r < NUM_RANKS; r++)
    polyak_destroy(ranks[r]);
  return failed ? 1 : 0;
}
