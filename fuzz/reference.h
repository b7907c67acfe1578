/* reference.h: the fuzzer's oracle for a load that succeeds. An independent
 * reading of a checkpoint of the fuzzed model (fuzz_model.h), written from
 * docs/checkpoints.md and not from src/checkpoint/: the checksum by its
 * rule, the step state by the one text each number has, and each shadow's
 * bytes where the header says they are. A successful load must restore
 * exactly this; whatever this reading refuses, the library must refuse. */
#ifndef POLYAK_FUZZ_REFERENCE_H
#define POLYAK_FUZZ_REFERENCE_H

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

/* What a checkpoint of the fuzzed model says: f32 shadows 0 and 1 of its
 * three tensors (15, 7 and 1 elements, end to end), the step state. */
typedef struct {
  int64_t step, nonfinite;
  double products[2];
  float shadows[2][15 + 7 + 1];
} reference_state;

static const char *const kReferenceNames[3] = {"layer.weight", "layer.bias", "scale"};
static const int kReferenceElems[3] = {15, 7, 1};

/* "0" or '-'? [1-9][0-9]*, within int64. */
static int reference_integer(const char *text, int64_t *out)
{
  if (!text)
    return 0;
  const char *digits = text[0] == '-' ? text + 1 : text;
  size_t n = strspn(digits, "0123456789");
  if (n == 0 || n > 19 || digits[n] != '\0' || (digits[0] == '0' && (n > 1 || digits != text)))
    return 0;
  uint64_t value = 0;
  for (size_t i = 0; i < n; i++) {
    uint64_t next = value * 10 + (uint64_t)(digits[i] - '0');
    if (next / 10 != value || next > (uint64_t)INT64_MAX + (digits != text))
      return 0;
    value = next;
  }
  *out = digits != text ? (int64_t)(0 - value) : (int64_t)value;
  return 1;
}

static const char *reference_meta(json_t *metadata, const char *key)
{
  return json_string_value(json_object_get(metadata, key));
}

/* The checksum by its rule: format 2, XXH3-64 of every byte of the
 * checkpoint (its first `num_bytes`) with the 16 digits after the first
 * "checksum":"xxh3-64: of the header as '0's; format 1, of the data only. */
static int reference_checksum_ok(const uint8_t *bytes, size_t num_bytes, size_t header_end, int version,
                                 const char *recorded)
{
  if (strncmp(recorded, "xxh3-64:", 8) != 0 || strlen(recorded) != 24 || strspn(recorded + 8, "0123456789abcdef") != 16)
    return 0;
  uint64_t want = strtoull(recorded + 8, NULL, 16), got;
  if (version == 1) {
    got = XXH3_64bits(bytes + header_end, num_bytes - header_end);
  } else {
    const char *field = "\"checksum\":\"xxh3-64:";
    size_t at = 8, length = strlen(field);
    while (at + length + 16 <= header_end && memcmp(bytes + at, field, length) != 0)
      at++;
    if (at + length + 16 > header_end || memcmp(bytes + at + length, recorded + 8, 16) != 0)
      return 0;
    uint8_t *copy = malloc(num_bytes);
    if (!copy)
      abort();
    memcpy(copy, bytes, num_bytes);
    memset(copy + at + length, '0', 16);
    got = XXH3_64bits(copy, num_bytes);
    free(copy);
  }
  return got == want;
}

/* The bytes of entry `name` as `count` f32 values, if it is an F32 entry of
 * that size inside the data. */
static int reference_entry(json_t *root, const char *name, const uint8_t *data, size_t data_bytes, int count,
                           float *out)
{
  json_t *entry = json_object_get(root, name), *offsets = json_object_get(entry, "data_offsets");
  const char *dtype = json_string_value(json_object_get(entry, "dtype"));
  json_int_t begin = json_integer_value(json_array_get(offsets, 0)),
             end = json_integer_value(json_array_get(offsets, 1));
  if (!dtype || strcmp(dtype, "F32") != 0 || json_array_size(offsets) != 2 || begin < 0 || end - begin != 4 * count ||
      (size_t)end > data_bytes)
    return 0;
  memcpy(out, data + begin, 4 * (size_t)count);
  return 1;
}

/* 1 and *state if `bytes` (num_bytes, the whole checkpoint) is a valid
 * checkpoint of the fuzzed model with f32 shadows, by the reading above. */
static int reference_read(const uint8_t *bytes, size_t num_bytes, reference_state *state)
{
  if (num_bytes < 10)
    return 0;
  uint64_t header_bytes = 0;
  for (int b = 0; b < 8; b++)
    header_bytes |= (uint64_t)bytes[b] << (8 * b);
  if (header_bytes > num_bytes - 8)
    return 0;
  size_t header_end = 8 + (size_t)header_bytes;
  json_t *root = json_loadb((const char *)bytes + 8, header_bytes, JSON_REJECT_DUPLICATES, NULL);
  json_t *metadata = json_object_get(root, "__metadata__");
  const char *version = reference_meta(metadata, "format_version");
  int v = version && strcmp(version, "1") == 0 ? 1 : version && strcmp(version, "2") == 0 ? 2 : 0;
  const char *format = reference_meta(metadata, "format"), *checksum = reference_meta(metadata, "checksum");
  json_t *products =
      json_loads(reference_meta(metadata, "beta_products") ? reference_meta(metadata, "beta_products") : "", 0, NULL);
  int ok = v && format && strcmp(format, "polyak") == 0 && checksum &&
           reference_checksum_ok(bytes, num_bytes, header_end, v, checksum) &&
           reference_integer(reference_meta(metadata, "step"), &state->step) && state->step >= 0 &&
           reference_integer(reference_meta(metadata, "nonfinite_count"), &state->nonfinite) && state->nonfinite >= 0 &&
           json_array_size(products) == 2;
  for (int k = 0; k < 2 && ok; k++) {
    json_t *value = json_array_get(products, (size_t)k);
    state->products[k] = json_number_value(value);
    ok = json_is_number(value) && state->products[k] >= 0.0 && state->products[k] <= 1.0;
  }
  for (int k = 0, at = 0; k < 2 && ok; k++, at = 0)
    for (int i = 0; i < 3 && ok; at += kReferenceElems[i], i++) {
      char name[64];
      snprintf(name, sizeof name, k ? "polyak.shadow.1.%s" : "%s", kReferenceNames[i]);
      ok = reference_entry(root, name, bytes + header_end, num_bytes - header_end, kReferenceElems[i],
                           state->shadows[k] + at);
    }
  json_decref(products);
  json_decref(root);
  return ok;
}

#endif /* POLYAK_FUZZ_REFERENCE_H */
