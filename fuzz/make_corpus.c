/* make_corpus.c: the fuzzer's seed corpus: valid checkpoints of the fuzzed
 * model at a few steps (f32 and bf16 shadows), and broken copies of them
 * (truncated, a flipped byte, a bad length, each rule's header edit, as
 * edited and with a valid checksum again). Usage: make_corpus DIR */
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "fuzz_model.h"

/* A copy of a valid file with its header edited: one per rule the loader
 * checks, so that fuzzing starts next to each of its error paths. */
typedef void (*header_edit)(json_t *header);

static void set_meta(json_t *h, const char *key, const char *value)
{
  json_object_set_new(json_object_get(h, "__metadata__"), key, json_string(value));
}

static void set_tensor(json_t *h, const char *name, const char *key, json_t *value)
{
  json_object_set_new(json_object_get(h, name), key, value);
}

static void no_metadata(json_t *h)
{
  json_object_del(h, "__metadata__");
}
static void version_3(json_t *h)
{
  set_meta(h, "format_version", "3");
}
static void version_1(json_t *h)
{
  set_meta(h, "format_version", "1");
}
static void step_spaced(json_t *h)
{
  set_meta(h, "step", " 12");
}
static void step_plus(json_t *h)
{
  set_meta(h, "step", "+12");
}
static void step_other(json_t *h)
{
  set_meta(h, "step", "99");
}
static void products_spaced(json_t *h)
{
  set_meta(h, "beta_products", "[0.5, 0.25]");
}
static void products_other(json_t *h)
{
  set_meta(h, "beta_products", "[0.5,0.25]");
}
static void checksum_upper(json_t *h)
{
  set_meta(h, "checksum", "xxh3-64:0123456789ABCDEF");
}
static void param_dtype_other(json_t *h)
{
  set_meta(h, "param_dtypes", "{\"layer.weight\":\"F32\",\"layer.bias\":\"F16\",\"scale\":\"F32\"}");
}
static void keeps_nonfinite(json_t *h)
{
  set_meta(h, "skip_nonfinite", "0");
}
static void library_version_bad(json_t *h)
{
  set_meta(h, "library_version", "v1");
}
static void entry_extra_key(json_t *h)
{
  set_tensor(h, "scale", "checksum", json_string("xxh3-64:0000000000000000"));
}
static void step_text(json_t *h)
{
  set_meta(h, "step", "7x");
}
static void products_big(json_t *h)
{
  set_meta(h, "beta_products", "[2.0, 0.5]");
}
static void schedules_broken(json_t *h)
{
  set_meta(h, "schedules", "[{\"kind\":\"SQUARE\"}]");
}
static void checksum_short(json_t *h)
{
  set_meta(h, "checksum", "xxh3-64:12");
}
static void three_shadows(json_t *h)
{
  set_meta(h, "num_shadows", "3");
}
static void other_dtype_meta(json_t *h)
{
  set_meta(h, "shadow_dtype", "BF16");
}
static void other_seed(json_t *h)
{
  set_meta(h, "seed", "5");
}
static void zero_init(json_t *h)
{
  set_meta(h, "zero_init", "1");
}
static void metadata_number(json_t *h)
{
  json_object_set_new(json_object_get(h, "__metadata__"), "step", json_integer(1));
}
static void span_short(json_t *h)
{
  set_tensor(h, "layer.weight", "data_offsets", json_pack("[I,I]", 0ll, 4ll));
}
static void overlap(json_t *h)
{
  set_tensor(h, "scale", "data_offsets", json_pack("[I,I]", 0ll, 4ll));
}
static void dtype_f16(json_t *h)
{
  set_tensor(h, "layer.bias", "dtype", json_string("F16"));
}
static void dtype_unknown(json_t *h)
{
  set_tensor(h, "layer.bias", "dtype", json_string("Q4"));
}
static void shape_other(json_t *h)
{
  set_tensor(h, "layer.bias", "shape", json_pack("[I]", 99ll));
}
static void tensor_missing(json_t *h)
{
  json_object_del(h, "polyak.shadow.1.layer.bias");
}
static void tensor_extra(json_t *h)
{
  json_object_set_new(h, "polyak.shadow.7.layer.bias",
                      json_pack("{s:s,s:[],s:[I,I]}", "dtype", "F32", "shape", "data_offsets", 0ll, 0ll));
}

static int write_edited(const char *dir, const char *stem, const unsigned char *bytes, size_t n)
{
  static const struct {
    const char *name;
    header_edit edit;
  } edits[] = {{"no-metadata", no_metadata},
               {"version-3", version_3},
               {"version-1", version_1},
               {"step-spaced", step_spaced},
               {"step-plus", step_plus},
               {"step-other", step_other},
               {"products-spaced", products_spaced},
               {"products-other", products_other},
               {"checksum-upper", checksum_upper},
               {"param-dtype", param_dtype_other},
               {"skip-nonfinite", keeps_nonfinite},
               {"library-version", library_version_bad},
               {"entry-extra-key", entry_extra_key},
               {"step-text", step_text},
               {"products-big", products_big},
               {"schedules", schedules_broken},
               {"checksum-short", checksum_short},
               {"three-shadows", three_shadows},
               {"dtype-meta", other_dtype_meta},
               {"seed", other_seed},
               {"zero-init", zero_init},
               {"metadata-number", metadata_number},
               {"span-short", span_short},
               {"overlap", overlap},
               {"dtype-f16", dtype_f16},
               {"dtype-unknown", dtype_unknown},
               {"shape", shape_other},
               {"missing", tensor_missing},
               {"extra", tensor_extra}};
  uint64_t header_bytes = 0;
  for (int b = 0; b < 8; b++)
    header_bytes |= (uint64_t)bytes[b] << (8 * b);
  for (size_t e = 0; e < sizeof edits / sizeof edits[0]; e++) {
    json_error_t error;
    json_t *header = json_loadb((const char *)bytes + 8, header_bytes, 0, &error);
    if (!header)
      return -1;
    edits[e].edit(header);
    char *text = json_dumps(header, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(header);
    if (!text)
      return -1;
    uint64_t length = strlen(text);
    size_t edited_bytes = 8 + length + (n - 8 - header_bytes);
    unsigned char *edited = malloc(edited_bytes);
    if (!edited)
      return -1;
    for (int b = 0; b < 8; b++)
      edited[b] = (unsigned char)(length >> (8 * b));
    memcpy(edited + 8, text, length);
    memcpy(edited + 8 + length, bytes + 8 + header_bytes, n - 8 - header_bytes);
    free(text);
    for (int sealed = 0; sealed < 2; sealed++) { /* as edited, then with a valid checksum again */
      char path[4096];
      snprintf(path, sizeof path, "%s/%s-edit-%s%s", dir, stem, edits[e].name, sealed ? "-sealed" : "");
      if (sealed) /* what is no polyak checkpoint any more stays as edited */
        polyak_checkpoint_reseal(edited, edited_bytes);
      FILE *out = fopen(path, "wb");
      if (!out) {
        free(edited);
        return -1;
      }
      fwrite(edited, 1, edited_bytes, out);
      fclose(out);
    }
    free(edited);
  }
  return 0;
}

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
  } broken[] = {{"truncated-header", 40, -1},
                {"truncated-data", n - 5, -1},
                {"flipped-length", n, 2},
                {"flipped-header", n, 30},
                {"flipped-data", n, (long)n - 2}};
  if (write_edited(dir, stem, bytes, n) != 0)
    return -1;
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
