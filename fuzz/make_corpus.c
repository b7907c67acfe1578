/* make_corpus.c: the fuzzer's seed corpus: valid checkpoints of the fuzzed
 * model at a few steps (f32 and bf16 shadows), and broken copies of them
 * (truncated, a flipped byte, a bad length). Usage: make_corpus DIR */
#include <stdio.h>
#include <string.h>

#include "fuzz_model.h"

static int save_variants(const char *dir, const char *stem, polyak_t *p)
{
  char path[4096];
  snprintf(path, sizeof path, "%s/%s.safetensors", dir, stem);
  if (polyak_save(p, path) != POLYAK_OK)
    return -1;
  FILE *in = fopen(path, "rb");
  static unsigned char bytes[1 << 16];
  size_t n = in ? fread(bytes, 1, sizeof bytes, in) : 0;
  if (in)
    fclose(in);
  struct {
    const char *suffix;
    size_t length;
    long flip; /* byte to flip, or -1 */
  } broken[] = {{"truncated-header", 40, -1}, {"truncated-data", n - 5, -1},
                {"flipped-length", n, 2},     {"flipped-header", n, 30},
                {"flipped-data", n, (long)n - 2}};
  for (size_t b = 0; b < sizeof broken / sizeof broken[0]; b++) {
    snprintf(path, sizeof path, "%s/%s-%s", dir, stem, broken[b].suffix);
    FILE *out = fopen(path, "wb");
    if (!out)
      return -1;
    if (broken[b].flip >= 0)
      bytes[broken[b].flip] ^= 0x40;
    fwrite(bytes, 1, broken[b].length, out);
    if (broken[b].flip >= 0)
      bytes[broken[b].flip] ^= 0x40;
    fclose(out);
  }
  return 0;
}

int main(int argc, char **argv)
{
  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  fuzz_params params;
  polyak_t *f32 = fuzz_model_create(&params, POLYAK_F32);
  polyak_t *bf16 = fuzz_model_create(&params, POLYAK_BF16);
  if (!f32 || !bf16)
    return 1;
  int failed = save_variants(argv[1], "f32-step0", f32);
  for (int64_t step = 1; step <= 3; step++) {
    params.weight[step] += 1.0f;
    failed |= polyak_update(f32, step * 4, NULL) != POLYAK_OK;
    failed |= polyak_update(bf16, step, NULL) != POLYAK_OK;
  }
  failed |= save_variants(argv[1], "f32-step12", f32);
  failed |= save_variants(argv[1], "bf16-step3", bf16);
  polyak_destroy(f32);
  polyak_destroy(bf16);
  return failed ? 1 : 0;
}
