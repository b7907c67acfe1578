/* checkpoint_read.c: the validating reader. polyak_ckpt_read takes a byte
 * source (checkpoint_source.c makes them) and checks everything before
 * anything changes: the framing (the header length, the JSON header), the
 * metadata's form, the model (tensor names and shapes: another model's file
 * says which tensors differ), the config against the handle's, every tensor
 * entry (dtype, shape, offsets that tile the data), then the checksum over
 * the whole checkpoint; checkpoint_stage.c then replaces the shadows. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "checkpoint.h"

#define MAX_HEADER_BYTES 100000000ll /* safetensors' own limit */

#define FORMAT_ERROR(...) polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, function, __VA_ARGS__)
#define MISMATCH(...)     polyak_ckpt_fail(p, POLYAK_ERR_MISMATCH, function, __VA_ARGS__)

/* Where the checked checkpoint's parts are. */
typedef struct {
  polyak_ckpt_state state;
  int64_t data_start; /* 8 + the header's length */
  int64_t data_bytes;
  int64_t *data_begin; /* [k * num_tensors + i]: data offset of each slice */
} layout;

static int compare_ranges(const void *a, const void *b)
{
  const int64_t *x = a, *y = b;
  return x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : (x[1] > y[1]) - (x[1] < y[1]);
}

/* The tensor a saved name stands for: the key itself if registered, else
 * <name> of "polyak.shadow.<k>.<name>" with *k (else 0). */
static const char *tensor_of_key(const polyak_t *p, const char *key, long *k)
{
  size_t prefix = strlen(POLYAK_CKPT_SHADOW_PREFIX);
  *k = 0;
  if (!polyak_registry_has(p, key) && strncmp(key, POLYAK_CKPT_SHADOW_PREFIX, prefix) == 0) {
    char *rest;
    long shadow = strtol(key + prefix, &rest, 10);
    if (rest != key + prefix && *rest == '.') {
      *k = shadow;
      return rest + 1;
    }
  }
  return key;
}

/* "[768, 2304]": `ndim` sizes from a JSON list or from dims. */
static void shape_text(json_t *list, const int64_t *dims, size_t ndim, char *out, size_t out_num_bytes)
{
  size_t used = (size_t)snprintf(out, out_num_bytes, "[");
  for (size_t d = 0; d < ndim && used < out_num_bytes; d++)
    used += (size_t)snprintf(out + used, out_num_bytes - used, "%s%lld", d ? ", " : "",
                             (long long)(list ? json_integer_value(json_array_get(list, d)) : dims[d]));
  if (used < out_num_bytes)
    snprintf(out + used, out_num_bytes - used, "]");
}

/* The shape of entry `name` (a JSON list) is tensor i's. */
static polyak_status check_shape(polyak_t *p, const char *function, const char *name, json_t *shape, int i)
{
  const polyak_tensor *t = &p->tensors[i];
  size_t ndim = json_array_size(shape);
  int same = ndim == (size_t)t->ndim;
  for (size_t d = 0; d < ndim; d++) {
    json_t *dim = json_array_get(shape, d);
    if (!json_is_integer(dim) || json_integer_value(dim) < 0)
      return FORMAT_ERROR("tensor \"%s\" has a shape that is not a list of sizes", name);
    same = same && json_integer_value(dim) == t->shape[d];
  }
  if (same)
    return POLYAK_OK;
  char file[128], here[128];
  shape_text(shape, NULL, ndim, file, sizeof file);
  shape_text(NULL, t->shape, (size_t)t->ndim, here, sizeof here);
  return MISMATCH("tensor \"%s\" is %s in the file and %s here", name, file, here);
}

static int compare_names(const void *a, const void *b)
{
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Tensor i's first entry in the file (shadow 0, else the lowest k), or
 * NULL; *expected = 1 if this handle saves a shadow of it. */
static polyak_status find_entry(polyak_t *p, const char *function, json_t *root, int i, json_t **entry, int *expected)
{
  *entry = NULL;
  *expected = 0;
  for (int k = 0; k < POLYAK_MAX_SHADOWS && !*entry; k++) {
    char *name = polyak_ckpt_saved_name(p, k, i);
    if (!name)
      return polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
    *expected |= k < p->cfg.num_shadows && polyak_ckpt_is_saved(p, k, i);
    *entry = json_object_get(root, name);
    free(name);
  }
  return POLYAK_OK;
}

/* The model the checkpoint was saved from against this handle's, before
 * anything about the averaging: every tensor with saved shadows here is in
 * the file (as itself or as a shadow k >= 1) and every tensor in the file
 * is registered here, then their shapes agree. The message names the first
 * tensor missing (registration order) and the first extra one (by name),
 * and counts the others. */
static polyak_status check_model(polyak_t *p, const char *function, json_t *root)
{
  int num_missing = 0, expected;
  const char *missing = NULL;
  json_t *entry;
  for (int i = 0; i < p->num_tensors; i++) {
    polyak_status status = find_entry(p, function, root, i, &entry, &expected);
    if (status != POLYAK_OK)
      return status;
    if (!entry && expected && num_missing++ == 0)
      missing = p->tensors[i].name;
  }
  const char **extra = malloc(sizeof *extra * (json_object_size(root) + 1));
  if (!extra)
    return polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  size_t num_keys = 0;
  const char *key;
  json_t *value;
  json_object_foreach(root, key, value)
  {
    long k;
    const char *name = tensor_of_key(p, key, &k);
    if (strcmp(key, "__metadata__") != 0 && !polyak_registry_has(p, name))
      extra[num_keys++] = name;
  }
  qsort(extra, num_keys, sizeof *extra, compare_names);
  int num_extra = 0; /* tensors, not keys: a model's shadows share a name */
  for (size_t n = 0; n < num_keys; n++)
    num_extra += n == 0 || strcmp(extra[n], extra[n - 1]) != 0;
  char missing_text[320] = "", extra_text[320] = "", more[40] = "";
  if (num_missing > 1)
    snprintf(more, sizeof more, " (and %d more)", num_missing - 1);
  if (num_missing)
    snprintf(missing_text, sizeof missing_text, "tensor \"%.200s\" is missing from the file%s", missing, more);
  more[0] = '\0';
  if (num_extra > 1)
    snprintf(more, sizeof more, " (and %d more)", num_extra - 1);
  if (num_extra)
    snprintf(extra_text, sizeof extra_text, "the file has a tensor \"%.200s\" that this handle does not register%s",
             extra[0], more);
  free(extra);
  if (num_missing && num_extra)
    return MISMATCH("the checkpoint is of another model: %s; %s", missing_text, extra_text);
  if (num_missing || num_extra)
    return MISMATCH("%s", num_missing ? missing_text : extra_text);
  for (int i = 0; i < p->num_tensors; i++) {
    polyak_status status = find_entry(p, function, root, i, &entry, &expected);
    json_t *shape = json_object_get(entry, "shape"); /* not a list: check_tensors says so */
    if (status == POLYAK_OK && json_is_array(shape))
      status = check_shape(p, function, p->tensors[i].name, shape, i);
    if (status != POLYAK_OK)
      return status;
  }
  return POLYAK_OK;
}

/* One tensor entry: dtype, shape and offsets as this handle expects. */
static polyak_status check_entry(polyak_t *p, const char *function, const char *name, json_t *entry, int i,
                                 int64_t data_bytes, int64_t range[2])
{
  const polyak_tensor *t = &p->tensors[i];
  json_t *dtype = json_object_get(entry, "dtype"), *shape = json_object_get(entry, "shape");
  json_t *offsets = json_object_get(entry, "data_offsets");
  if (!json_is_object(entry) || !json_is_string(dtype) || !json_is_array(shape) || !json_is_array(offsets) ||
      json_array_size(offsets) != 2 || !json_is_integer(json_array_get(offsets, 0)) ||
      !json_is_integer(json_array_get(offsets, 1)))
    return FORMAT_ERROR("tensor \"%s\" lacks a dtype, a shape or two data_offsets", name);
  if (json_object_size(entry) != 3) /* safetensors' entries have no other keys */
    return FORMAT_ERROR("tensor \"%s\" has keys besides dtype, shape and data_offsets", name);
  const char *dtype_name = json_string_value(dtype);
  const char *known[] = {"F64", "F32",  "F16", "BF16", "I64", "I32",     "I16",    "I8",
                         "U8",  "BOOL", "U16", "U32",  "U64", "F8_E4M3", "F8_E5M2"};
  int is_known = 0;
  for (size_t n = 0; n < sizeof known / sizeof known[0]; n++)
    is_known |= strcmp(dtype_name, known[n]) == 0;
  if (!is_known)
    return FORMAT_ERROR("tensor \"%s\" has dtype \"%s\", which safetensors does not know", name, dtype_name);
  polyak_dtype want = polyak_ckpt_entry_dtype(p, i);
  if (strcmp(dtype_name, polyak_dtype_name(want)) != 0)
    return MISMATCH(t->copy_only ? "tensor \"%s\" is %s; this handle's copy of it is %s"
                                 : "tensor \"%s\" is %s; this handle's shadows are %s",
                    name, dtype_name, polyak_dtype_name(want));
  polyak_status status = check_shape(p, function, name, shape, i);
  if (status != POLYAK_OK)
    return status;
  range[0] = json_integer_value(json_array_get(offsets, 0));
  range[1] = json_integer_value(json_array_get(offsets, 1));
  if (range[0] < 0 || range[1] < range[0] || range[1] > data_bytes)
    return FORMAT_ERROR("tensor \"%s\" has data_offsets [%lld, %lld] outside the %lld data bytes", name,
                        (long long)range[0], (long long)range[1], (long long)data_bytes);
  if (range[1] - range[0] != polyak_ckpt_entry_bytes(p, i))
    return FORMAT_ERROR("tensor \"%s\": data_offsets span %lld bytes, its shape and dtype %lld", name,
                        (long long)(range[1] - range[0]), (long long)polyak_ckpt_entry_bytes(p, i));
  return POLYAK_OK;
}

static polyak_status check_tensors(polyak_t *p, polyak_ckpt_source *src, json_t *root, layout *h)
{
  const char *function = src->function;
  int64_t slots = (int64_t)p->cfg.num_shadows * p->num_tensors, expected = 0;
  for (int k = 0; k < p->cfg.num_shadows; k++)
    for (int i = 0; i < p->num_tensors; i++)
      expected += polyak_ckpt_is_saved(p, k, i);
  int64_t(*ranges)[2] = malloc(((size_t)expected + 1) * sizeof *ranges);
  h->data_begin = calloc((size_t)slots + 1, sizeof *h->data_begin);
  if (!ranges || !h->data_begin) {
    free(ranges);
    return polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  }
  polyak_status status = POLYAK_OK;
  int64_t m = 0; /* entries checked */
  for (int k = 0; k < p->cfg.num_shadows && status == POLYAK_OK; k++)
    for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++) {
      char *name = polyak_ckpt_saved_name(p, k, i);
      json_t *entry = name ? json_object_get(root, name) : NULL;
      if (!name)
        status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
      else if (!polyak_ckpt_is_saved(p, k, i))
        status = entry ? MISMATCH("the file has tensor \"%s\", whose shadow is the caller's here", name) : POLYAK_OK;
      else if (!entry)
        status = MISMATCH("tensor \"%s\" is missing from the file", name);
      else if ((status = check_entry(p, function, name, entry, i, h->data_bytes, ranges[m])) == POLYAK_OK)
        h->data_begin[(int64_t)k * p->num_tensors + i] = ranges[m++][0];
      free(name);
    }
  if (status == POLYAK_OK && (int64_t)json_object_size(root) - 1 != expected) {
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value)
    {
      if (strcmp(key, "__metadata__") == 0)
        continue;
      long k; /* every expected name was found, so an unknown key is extra */
      int i = polyak_registry_find(p, tensor_of_key(p, key, &k));
      if (!(k >= 0 && k < p->cfg.num_shadows && i >= 0 && polyak_ckpt_is_saved(p, (int)k, i))) {
        status = MISMATCH("the file has a tensor \"%s\" this handle does not register", key);
        break;
      }
    }
  }
  if (status == POLYAK_OK) { /* the slices tile the data buffer: no overlap, no hole */
    qsort(ranges, (size_t)expected, sizeof *ranges, compare_ranges);
    int64_t covered = 0;
    for (int64_t n = 0; n < expected && status == POLYAK_OK; n++) {
      if (ranges[n][0] < covered)
        status = FORMAT_ERROR("data_offsets overlap at byte %lld", (long long)ranges[n][0]);
      else if (ranges[n][0] > covered)
        status = FORMAT_ERROR("data bytes %lld..%lld belong to no tensor", (long long)covered, (long long)ranges[n][0]);
      covered = ranges[n][1];
    }
    if (status == POLYAK_OK && src->whole && covered != h->data_bytes)
      status = FORMAT_ERROR("data bytes %lld..%lld belong to no tensor", (long long)covered, (long long)h->data_bytes);
    h->data_bytes = covered; /* the end of a checkpoint inside a file */
  }
  free(ranges);
  return status;
}

/* Feeds the header to the hash with the checksum's digits as zeros, as the
 * writer hashed it before it knew them. */
static polyak_status hash_header(polyak_t *p, const char *function, XXH3_state_t *hash, const char *text,
                                 size_t num_bytes, uint64_t recorded)
{
  const char *field = polyak_ckpt_find_checksum(text, num_bytes);
  char digits[17];
  snprintf(digits, sizeof digits, "%016llx", (unsigned long long)recorded);
  if (!field || memcmp(field, digits, 16) != 0) /* its value is where the writer puts it */
    return FORMAT_ERROR("the checksum is not where format 2 puts it (\"checksum\":\"xxh3-64:, first in the header)");
  XXH3_64bits_update(hash, text, (size_t)(field - text));
  XXH3_64bits_update(hash, "0000000000000000", 16);
  XXH3_64bits_update(hash, field + 16, num_bytes - (size_t)(field + 16 - text));
  return POLYAK_OK;
}

/* The checksum: format 2's over the length prefix, the header (`text`) and
 * the data; format 1's over the data only. */
static polyak_status verify_checksum(polyak_t *p, polyak_ckpt_source *src, const layout *h, const char *text,
                                     void *buffer, size_t buffer_bytes)
{
  const char *function = src->function;
  XXH3_state_t *hash = XXH3_createState();
  if (!hash)
    return polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  XXH3_64bits_reset(hash);
  polyak_status status = POLYAK_OK;
  if (h->state.format_version >= 2) {
    uint8_t length[8];
    polyak_ckpt_length_prefix((uint64_t)(h->data_start - 8), length);
    XXH3_64bits_update(hash, length, 8);
    status = hash_header(p, function, hash, text, (size_t)(h->data_start - 8), h->state.checksum);
  }
  for (int64_t done = 0; done < h->data_bytes && status == POLYAK_OK;) {
    size_t n = h->data_bytes - done < (int64_t)buffer_bytes ? (size_t)(h->data_bytes - done) : buffer_bytes;
    status = src->read_at(src, p, buffer, n, h->data_start + done);
    XXH3_64bits_update(hash, buffer, n);
    done += (int64_t)n;
  }
  if (status == POLYAK_OK && XXH3_64bits_digest(hash) != h->state.checksum)
    status = FORMAT_ERROR(h->state.format_version >= 2
                              ? "the checksum is not the one recorded: the checkpoint is corrupt"
                              : "the data's checksum is not the one recorded: the checkpoint is corrupt");
  XXH3_freeState(hash);
  return status;
}

polyak_status polyak_ckpt_read(polyak_t *p, polyak_ckpt_source *src, int64_t *checkpoint_bytes)
{
  const char *function = src->function;
  int64_t limit = src->num_bytes < 0 ? INT64_MAX : src->num_bytes;
  if (limit < 10) /* a length and "{}" at the least */
    return FORMAT_ERROR("%s is too short to be safetensors", src->extent);
  uint8_t first[9]; /* the header length and the header's first byte */
  polyak_status status = src->read_at(src, p, first, sizeof first, 0);
  if (status != POLYAK_OK)
    return status;
  if (first[8] != '{') { /* what any other file is told apart by */
    char shown[4 * sizeof first + 1];
    size_t used = 0;
    for (size_t b = 0; b < sizeof first; b++) {
      int plain = first[b] >= 0x20 && first[b] < 0x7f && first[b] != '"' && first[b] != '\\';
      used += (size_t)snprintf(shown + used, sizeof shown - used, plain ? "%c" : "\\x%02x", first[b]);
    }
    return FORMAT_ERROR("%s is not safetensors: it begins \"%s\", where safetensors has an 8-byte header "
                        "length, then '{'",
                        src->extent, shown);
  }
  uint64_t header_bytes = 0;
  for (int b = 0; b < 8; b++)
    header_bytes |= (uint64_t)first[b] << (8 * b);
  if (header_bytes > (uint64_t)MAX_HEADER_BYTES)
    return FORMAT_ERROR("a header of %llu bytes is absurdly large (the limit is %lld)",
                        (unsigned long long)header_bytes, MAX_HEADER_BYTES);
  if (header_bytes > (uint64_t)(limit - 8))
    return FORMAT_ERROR("the header length %llu runs past the end of %s", (unsigned long long)header_bytes,
                        src->extent);
  char *text = malloc(header_bytes + 1);
  if (!text)
    return polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  status = src->read_at(src, p, text, header_bytes, 8);
  json_error_t error;
  json_t *root = status == POLYAK_OK ? json_loadb(text, header_bytes, JSON_REJECT_DUPLICATES, &error) : NULL;
  if (status != POLYAK_OK || !root) /* else an object: it begins with '{' */
    free(text);
  if (status != POLYAK_OK)
    return status;
  if (!root)
    return FORMAT_ERROR("the header is not JSON: %s (line %d, column %d)", error.text, error.line, error.column);
  layout h = {.data_start = 8 + (int64_t)header_bytes, .data_bytes = limit - 8 - (int64_t)header_bytes};
  json_t *metadata = json_object_get(root, "__metadata__");
  status = polyak_ckpt_check_format(p, metadata, &h.state.format_version, function);
  if (status == POLYAK_OK) /* the model first: another model's file says so */
    status = check_model(p, function, root);
  if (status == POLYAK_OK)
    status = polyak_ckpt_check_config(p, metadata, &h.state, function);
  if (status == POLYAK_OK)
    status = check_tensors(p, src, root, &h);
  json_decref(root);
  size_t buffer_bytes = polyak_ckpt_block_bytes(p, h.data_bytes);
  void *buffer = status == POLYAK_OK ? p->ops->host_buffer(p, buffer_bytes) : NULL;
  if (status == POLYAK_OK && !buffer)
    status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  if (status == POLYAK_OK)
    status = verify_checksum(p, src, &h, text, buffer, buffer_bytes);
  free(text);
  if (status == POLYAK_OK)
    status = polyak_ckpt_stage(p, src, h.data_start, h.data_begin, &h.state, buffer, buffer_bytes);
  if (buffer)
    p->ops->free_host_buffer(p, buffer);
  free(h.data_begin);
  *checkpoint_bytes = h.data_start + h.data_bytes;
  return status;
}
