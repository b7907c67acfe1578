/* shard_read.c: one shard file, read and checked. Opening it checks its
 * header whole (the framing, the header checksum first, so that damage is
 * told as damage, then every key, the name's step, save id and ranks, the
 * entries and the file's length); checking it against a handle compares
 * the model and the settings; reads go block by block, each block whole
 * and verified against its checksum before any of it is used. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "shard.h"

#define MAX_HEADER_BYTES 100000000ll /* safetensors' own limit */

#define FAIL(status, ...) polyak_ckpt_fail(p, status, f->where, __VA_ARGS__)

static const char *text_of(json_t *metadata, const char *key)
{
  return json_string_value(json_object_get(metadata, key));
}

static polyak_status read_all(polyak_t *p, polyak_shard_file *f, void *dst, int64_t num_bytes, int64_t offset)
{
  char *to = dst;
  for (int64_t done = 0; done < num_bytes;) {
    ssize_t got = pread(f->fd, to + done, (size_t)(num_bytes - done), (off_t)(offset + done));
    if (got < 0 && errno == EINTR)
      continue;
    if (got <= 0)
      return FAIL(POLYAK_ERR_IO, "cannot read bytes %lld..%lld: %s", (long long)offset, (long long)(offset + num_bytes),
                  got < 0 ? strerror(errno) : "the file ends before them");
    done += got;
  }
  return POLYAK_OK;
}

/* The file opened for reading: a regular file, looked at before and after
 * the open, opened without blocking (a FIFO in its place would wait). */
static polyak_status open_regular(polyak_t *p, polyak_shard_file *f, int64_t *file_bytes)
{
  struct stat st;
  if (stat(f->path, &st) != 0)
    return FAIL(POLYAK_ERR_IO, "cannot open it: %s", strerror(errno));
  if (!S_ISREG(st.st_mode))
    return FAIL(POLYAK_ERR_IO, "is not a regular file");
  f->fd = open(f->path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (f->fd < 0)
    return FAIL(POLYAK_ERR_IO, "cannot open it: %s", strerror(errno));
  if (fstat(f->fd, &st) != 0 || !S_ISREG(st.st_mode))
    return FAIL(POLYAK_ERR_IO, "is not a regular file");
  *file_bytes = (int64_t)st.st_size;
  return POLYAK_OK;
}

/* The header checksum: the XXH3-64 of the length prefix and the header,
 * its own 16 digits (at `digits`, the first "checksum":"xxh3-64: of the
 * text) read as zeros. */
static uint64_t header_hash(const uint8_t length[8], const char *text, size_t num_bytes, const char *digits)
{
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, length, 8);
  XXH3_64bits_update(&state, text, (size_t)(digits - text));
  XXH3_64bits_update(&state, "0000000000000000", 16);
  XXH3_64bits_update(&state, digits + 16, num_bytes - (size_t)(digits + 16 - text));
  return XXH3_64bits_digest(&state);
}

/* On the raw text, before it is parsed: a header whose checksum field is
 * there but does not match is damage, whatever a parse would say of it. */
static polyak_status check_raw_checksum(polyak_t *p, polyak_shard_file *f, const uint8_t length[8], const char *text,
                                        size_t num_bytes)
{
  const char *digits = polyak_ckpt_find_checksum(text, num_bytes);
  if (!digits) /* no field: the parse and the keys say what the file is */
    return POLYAK_OK;
  char hex[17];
  memcpy(hex, digits, 16);
  hex[16] = '\0';
  if (strspn(hex, "0123456789abcdef") != 16 || header_hash(length, text, num_bytes, digits) != strtoull(hex, NULL, 16))
    return FAIL(POLYAK_ERR_FORMAT, "the header does not match its checksum: the file is corrupt");
  return POLYAK_OK;
}

/* The parsed metadata's "checksum" is the field checked on the raw text. */
static polyak_status check_header_checksum(polyak_t *p, polyak_shard_file *f, const uint8_t length[8], const char *text,
                                           size_t num_bytes)
{
  const char *recorded = text_of(f->metadata, "checksum");
  const char *digits = polyak_ckpt_find_checksum(text, num_bytes);
  if (!recorded || strncmp(recorded, "xxh3-64:", 8) != 0 || strlen(recorded) != 24 ||
      strspn(recorded + 8, "0123456789abcdef") != 16 || !digits || memcmp(digits, recorded + 8, 16) != 0)
    return FAIL(POLYAK_ERR_FORMAT, "metadata \"checksum\" is not xxh3-64:<16 lowercase hex digits>, first in the "
                                   "header");
  f->header_checksum = strtoull(recorded + 8, NULL, 16);
  if (header_hash(length, text, num_bytes, digits) != f->header_checksum)
    return FAIL(POLYAK_ERR_FORMAT, "the header does not match its checksum: the file is corrupt");
  return POLYAK_OK;
}

/* "[0,10,20]": a list of int64 in the writer's text (malloc'd). */
static char *list_text(const int64_t *values, int64_t count)
{
  size_t capacity = 2 + (size_t)count * 21, used = 0;
  char *text = malloc(capacity);
  for (int64_t n = 0; text && n < count; n++)
    used += (size_t)snprintf(text + used, capacity - used, "%s%" PRId64, n ? "," : "[", values[n]);
  if (text)
    snprintf(text + used, capacity - used, "%s]", count ? "" : "[");
  return text;
}

/* "boundaries": world_size + 1 element indices from 0, never decreasing. */
static polyak_status parse_boundaries(polyak_t *p, polyak_shard_file *f)
{
  int64_t count = (int64_t)f->name.world_size + 1;
  json_error_t error;
  json_t *list = json_loads(text_of(f->metadata, "boundaries"), 0, &error);
  f->boundaries = malloc((size_t)count * sizeof *f->boundaries);
  int bad = !json_is_array(list) || (int64_t)json_array_size(list) != count;
  for (int64_t r = 0; r < count && !bad && f->boundaries; r++) {
    json_t *value = json_array_get(list, (size_t)r);
    f->boundaries[r] = json_integer_value(value);
    bad = !json_is_integer(value) || f->boundaries[r] < (r ? f->boundaries[r - 1] : 0) || (r == 0 && f->boundaries[0]);
  }
  json_decref(list);
  if (!f->boundaries)
    return FAIL(POLYAK_ERR_NO_MEMORY, "out of host memory");
  char *canonical = bad ? NULL : list_text(f->boundaries, count);
  bad = bad || !canonical || strcmp(canonical, text_of(f->metadata, "boundaries")) != 0;
  free(canonical);
  if (bad)
    return FAIL(POLYAK_ERR_FORMAT, "metadata \"boundaries\" is not a list of %lld element indices from 0 up",
                (long long)count);
  return POLYAK_OK;
}

/* The keys that say which file this is, against its name. */
static polyak_status check_identity(polyak_t *p, polyak_shard_file *f)
{
  static const char *const keys[] = {"tensors",    "save_id",     "world_size",     "rank",
                                     "boundaries", "block_bytes", "block_checksums"};
  for (size_t n = 0; n < sizeof keys / sizeof keys[0]; n++)
    if (!text_of(f->metadata, keys[n]))
      return FAIL(POLYAK_ERR_FORMAT, "metadata \"%s\" is missing", keys[n]);
  POLYAK_TRY(polyak_ckpt_check_keys(p, f->metadata, 2, f->where));
  int64_t step, world, rank;
  const char *id = text_of(f->metadata, "save_id");
  if (polyak_ckpt_parse_int64(text_of(f->metadata, "step"), &step) != 0 ||
      polyak_ckpt_parse_int64(text_of(f->metadata, "world_size"), &world) != 0 ||
      polyak_ckpt_parse_int64(text_of(f->metadata, "rank"), &rank) != 0 || strlen(id) != 16 ||
      strspn(id, "0123456789abcdef") != 16)
    return FAIL(POLYAK_ERR_FORMAT, "metadata \"step\", \"world_size\", \"rank\" or \"save_id\" is not a number");
  uint64_t save_id = strtoull(id, NULL, 16);
  if (step != f->name.step || save_id != f->name.save_id || world != f->name.world_size || rank != f->name.rank)
    return FAIL(POLYAK_ERR_FORMAT,
                "is from another save than its name says: its header has step %lld, save id %s, rank %lld of %lld "
                "(a file renamed, or copied from elsewhere?)",
                (long long)step, id, (long long)rank, (long long)world);
  int64_t block_bytes;
  if (polyak_ckpt_parse_int64(text_of(f->metadata, "block_bytes"), &block_bytes) != 0 ||
      block_bytes < POLYAK_SHARD_MIN_BLOCK_BYTES || block_bytes > POLYAK_SHARD_MAX_BLOCK_BYTES ||
      block_bytes % POLYAK_SHARD_MIN_BLOCK_BYTES != 0)
    return FAIL(POLYAK_ERR_FORMAT, "metadata \"block_bytes\" is not a multiple of 4 KiB from 4 KiB to 64 MiB");
  f->block_bytes = block_bytes;
  return parse_boundaries(p, f);
}

static int compare_ranges(const void *a, const void *b)
{
  const int64_t *x = a, *y = b;
  return (x[0] > y[0]) - (x[0] < y[0]);
}

/* The entries: shadow k's slice as "polyak.shard.<k>" at section k, then
 * (rank 0) other entries tiling the rest; the data's length; the file's. */
static polyak_status check_entries(polyak_t *p, polyak_shard_file *f, int64_t file_bytes)
{
  int64_t num_shadows;
  const char *dtype = text_of(f->metadata, "shadow_dtype");
  int64_t elem_bytes = strcmp(dtype, "F32") == 0 ? 4 : strcmp(dtype, "BF16") == 0 ? 2 : 0;
  if (polyak_ckpt_parse_int64(text_of(f->metadata, "num_shadows"), &num_shadows) != 0 || num_shadows < 1 ||
      num_shadows > POLYAK_MAX_SHADOWS || elem_bytes == 0)
    return FAIL(POLYAK_ERR_FORMAT, "metadata \"num_shadows\" or \"shadow_dtype\" is not one a handle has");
  f->slice_elems = f->boundaries[f->name.rank + 1] - f->boundaries[f->name.rank];
  int64_t section = f->slice_elems * elem_bytes;
  size_t num_entries = json_object_size(f->root) - 1;
  int64_t(*ranges)[2] = malloc((num_entries + 1) * sizeof *ranges);
  if (!ranges)
    return FAIL(POLYAK_ERR_NO_MEMORY, "out of host memory");
  polyak_status status = POLYAK_OK;
  size_t n = 0;
  for (int64_t k = 0; k < num_shadows && status == POLYAK_OK; k++) {
    char name[48];
    snprintf(name, sizeof name, POLYAK_SHARD_DATA_PREFIX "%d", (int)k);
    json_t *entry = json_object_get(f->root, name),
           *want = json_pack("{s:s, s:[I], s:[I,I]}", "dtype", dtype, "shape", (json_int_t)f->slice_elems,
                             "data_offsets", (json_int_t)(k * section), (json_int_t)((k + 1) * section));
    if (!json_equal(entry, want))
      status = FAIL(POLYAK_ERR_FORMAT, "tensor \"%s\" is not shadow %lld's slice of %lld %s elements at data byte %lld",
                    name, (long long)k, (long long)f->slice_elems, dtype, (long long)(k * section));
    json_decref(want);
  }
  const char *key;
  json_t *entry;
  json_object_foreach(f->root, key, entry)
  {
    json_t *offsets = json_object_get(entry, "data_offsets");
    if (status != POLYAK_OK || strcmp(key, "__metadata__") == 0)
      continue;
    ranges[n][0] = json_integer_value(json_array_get(offsets, 0));
    ranges[n][1] = json_integer_value(json_array_get(offsets, 1));
    if (!json_is_object(entry) || json_object_size(entry) != 3 || !json_is_string(json_object_get(entry, "dtype")) ||
        !json_is_array(json_object_get(entry, "shape")) || json_array_size(offsets) != 2 ||
        !json_is_integer(json_array_get(offsets, 0)) || !json_is_integer(json_array_get(offsets, 1)) ||
        ranges[n][0] < 0 || ranges[n][1] < ranges[n][0])
      status = FAIL(POLYAK_ERR_FORMAT, "tensor \"%s\" is not a safetensors entry", key);
    else if (f->name.rank != 0 && strncmp(key, POLYAK_SHARD_DATA_PREFIX, strlen(POLYAK_SHARD_DATA_PREFIX)) != 0)
      status =
          FAIL(POLYAK_ERR_FORMAT, "has a tensor \"%s\" besides its slices (only rank 0's file holds the copies)", key);
    n++;
  }
  if (status == POLYAK_OK && n > 0) /* no overlap, no hole */
    qsort(ranges, n, sizeof *ranges, compare_ranges);
  f->data_bytes = 0;
  for (size_t r = 0; r < n && status == POLYAK_OK; r++) {
    if (ranges[r][0] != f->data_bytes)
      status = FAIL(POLYAK_ERR_FORMAT, "data bytes %lld..%lld %s", (long long)f->data_bytes, (long long)ranges[r][0],
                    ranges[r][0] > f->data_bytes ? "belong to no tensor" : "overlap");
    f->data_bytes = ranges[r][1];
  }
  free(ranges);
  if (status != POLYAK_OK)
    return status;
  if (file_bytes != f->data_start + f->data_bytes)
    return FAIL(POLYAK_ERR_FORMAT, "%s: the file has %lld bytes, its header says %lld",
                file_bytes < f->data_start + f->data_bytes ? "it is truncated" : "bytes follow its data",
                (long long)file_bytes, (long long)(f->data_start + f->data_bytes));
  const char *checksums = text_of(f->metadata, "block_checksums");
  int64_t num_blocks = (f->data_bytes + f->block_bytes - 1) / f->block_bytes;
  if (strncmp(checksums, "xxh3-64:", 8) != 0 || (int64_t)strlen(checksums + 8) != 16 * num_blocks ||
      (int64_t)strspn(checksums + 8, "0123456789abcdef") != 16 * num_blocks)
    return FAIL(POLYAK_ERR_FORMAT,
                "metadata \"block_checksums\" is not xxh3-64: and 16 hex digits for each of its "
                "%lld blocks",
                (long long)num_blocks);
  f->block_checksums = checksums + 8;
  return POLYAK_OK;
}

/* "<function>: <path>", with the middle of a long directory cut to "..."
 * so that the file's own name stays whole: it says the rank at fault. */
static void format_where(char *where, size_t size, const char *function, const char *path)
{
  const char *base = strrchr(path, '/');
  base = base ? base : path;
  size_t fixed = strlen(function) + 2 + 3 + strlen(base); /* ": ", "...", "/<name>" */
  if (strlen(function) + 2 + strlen(path) < size || fixed >= size)
    snprintf(where, size, "%s: %s", function, path);
  else { /* the parts measured above fit: size - 1 bytes and the NUL */
    size_t used = (size_t)snprintf(where, size, "%s: ", function), head = size - 1 - fixed;
    memcpy(where + used, path, head);
    memcpy(where + used + head, "...", 3);
    memcpy(where + used + head + 3, base, strlen(base) + 1);
  }
}

polyak_status polyak_shard_open(polyak_t *p, const char *path, const polyak_shard_name *name, polyak_shard_file *f,
                                const char *function)
{
  memset(f, 0, sizeof *f);
  f->fd = -1;
  f->name = *name;
  format_where(f->where, sizeof f->where, function, path);
  f->path = strdup(path);
  if (!f->path)
    return FAIL(POLYAK_ERR_NO_MEMORY, "out of host memory");
  int64_t file_bytes = 0;
  POLYAK_TRY(open_regular(p, f, &file_bytes));
  uint8_t length[8];
  if (file_bytes < 10)
    return FAIL(POLYAK_ERR_FORMAT, "the %lld-byte file is too short to be safetensors", (long long)file_bytes);
  POLYAK_TRY(read_all(p, f, length, 8, 0));
  uint64_t header_bytes = 0;
  for (int b = 0; b < 8; b++)
    header_bytes |= (uint64_t)length[b] << (8 * b);
  if (header_bytes > (uint64_t)MAX_HEADER_BYTES || header_bytes > (uint64_t)(file_bytes - 8))
    return FAIL(POLYAK_ERR_FORMAT,
                "the header length %llu runs past the end of the %lld-byte file (truncated or "
                "damaged)",
                (unsigned long long)header_bytes, (long long)file_bytes);
  f->data_start = 8 + (int64_t)header_bytes;
  char *text = malloc(header_bytes + 1);
  if (!text)
    return FAIL(POLYAK_ERR_NO_MEMORY, "out of host memory for its %llu-byte header", (unsigned long long)header_bytes);
  polyak_status status = read_all(p, f, text, (int64_t)header_bytes, 8);
  if (status == POLYAK_OK)
    status = check_raw_checksum(p, f, length, text, header_bytes);
  json_error_t error;
  if (status == POLYAK_OK && !(f->root = json_loadb(text, header_bytes, JSON_REJECT_DUPLICATES, &error)))
    status = FAIL(POLYAK_ERR_FORMAT, "the header is not JSON: %s (line %d, column %d)", error.text, error.line,
                  error.column);
  f->metadata = json_object_get(f->root, "__metadata__");
  if (status == POLYAK_OK && !json_is_object(f->root))
    status = FAIL(POLYAK_ERR_FORMAT, "the header is not a JSON object");
  if (status == POLYAK_OK)
    status = polyak_ckpt_check_strings(p, f->metadata, f->where);
  const char *format = status == POLYAK_OK ? text_of(f->metadata, "format") : NULL;
  const char *version = status == POLYAK_OK ? text_of(f->metadata, "format_version") : NULL;
  const char *library = status == POLYAK_OK ? text_of(f->metadata, "library_version") : NULL;
  if (status == POLYAK_OK && (!format || strcmp(format, POLYAK_SHARD_FORMAT) != 0))
    status = FAIL(POLYAK_ERR_FORMAT, "metadata \"format\" is not \"" POLYAK_SHARD_FORMAT "\": not a shard file");
  else if (status == POLYAK_OK && (!version || strcmp(version, "1") != 0))
    status = FAIL(POLYAK_ERR_FORMAT, "shard format version \"%.40s\" is not one this library (%s) reads (1)%s%.40s",
                  version ? version : "(missing)", polyak_version_string(),
                  library ? "; the file was written by polyak " : "", library ? library : "");
  if (status == POLYAK_OK)
    status = check_header_checksum(p, f, length, text, header_bytes);
  free(text);
  if (status == POLYAK_OK)
    status = check_identity(p, f);
  return status == POLYAK_OK ? check_entries(p, f, file_bytes) : status;
}

void polyak_shard_close(polyak_shard_file *f)
{
  if (f->fd >= 0)
    close(f->fd);
  json_decref(f->root);
  free(f->path);
  free(f->boundaries);
  memset(f, 0, sizeof *f);
  f->fd = -1;
}

/* ---- against a handle ------------------------------------------------------ */

/* The file's tensor table against this handle's, with a message that
 * says what differs: names missing or extra, the order, a shape. */
static polyak_status check_tensor_table(polyak_t *p, polyak_shard_file *f)
{
  char *mine = polyak_shard_tensor_table(p);
  if (!mine)
    return FAIL(POLYAK_ERR_NO_MEMORY, "out of host memory");
  const char *theirs = text_of(f->metadata, "tensors");
  int same = strcmp(mine, theirs) == 0;
  free(mine);
  if (same)
    return POLYAK_OK;
  json_error_t error;
  json_t *list = json_loads(theirs, JSON_REJECT_DUPLICATES, &error), *entry;
  size_t n, num_missing = 0, num_extra = 0;
  const char *missing = NULL, *extra = NULL;
  json_array_foreach(list, n, entry)
  {
    const char *name = json_string_value(json_object_get(entry, "name"));
    if (name && !polyak_registry_has(p, name) && num_extra++ == 0)
      extra = name;
  }
  for (int i = 0; i < p->num_tensors; i++) {
    int found = 0;
    json_array_foreach(list, n, entry)
    {
      const char *name = json_string_value(json_object_get(entry, "name"));
      found |= name && strcmp(name, p->tensors[i].name) == 0;
    }
    if (!found && num_missing++ == 0)
      missing = p->tensors[i].name;
  }
  char missing_text[320] = "", extra_text[320] = "";
  if (missing)
    snprintf(missing_text, sizeof missing_text, "tensor \"%.200s\" is missing from the file%s", missing,
             num_missing > 1 ? " (and more)" : "");
  if (extra)
    snprintf(extra_text, sizeof extra_text, "the file has a tensor \"%.200s\" this handle does not register%s", extra,
             num_extra > 1 ? " (and more)" : "");
  polyak_status status = FAIL(POLYAK_ERR_FORMAT, "metadata \"tensors\" is not the table the writer writes");
  if (!json_is_array(list))
    status = FAIL(POLYAK_ERR_FORMAT, "metadata \"tensors\" is not a list of tensors");
  else if (missing || extra)
    status = FAIL(POLYAK_ERR_MISMATCH, "the set is of another model: %s%s%s", missing_text,
                  missing && extra ? "; " : "", extra_text);
  else if ((int)json_array_size(list) != p->num_tensors)
    status = FAIL(POLYAK_ERR_FORMAT, "metadata \"tensors\" names a tensor twice");
  else
    for (int i = 0; i < p->num_tensors; i++) {
      json_t *file_entry = json_array_get(list, (size_t)i);
      const char *name = json_string_value(json_object_get(file_entry, "name"));
      json_t *shape = json_object_get(file_entry, "shape");
      const polyak_tensor *t = &p->tensors[i];
      int same_shape = json_is_array(shape) && (int)json_array_size(shape) == t->ndim;
      for (int d = 0; same_shape && d < t->ndim; d++)
        same_shape = json_integer_value(json_array_get(shape, (size_t)d)) == t->shape[d];
      if (strcmp(name, t->name) != 0) {
        status = FAIL(POLYAK_ERR_MISMATCH,
                      "the file registers its tensors in another order: tensor %d is \"%.200s\" there and \"%.200s\" "
                      "here (the flattened layout follows the order)",
                      i, name, t->name);
        break;
      }
      if (!same_shape) {
        json_t *here = json_array();
        for (int d = 0; d < t->ndim && here; d++)
          json_array_append_new(here, json_integer(t->shape[d]));
        char *there_text = json_dumps(shape, JSON_COMPACT | JSON_ENCODE_ANY),
             *here_text = json_dumps(here, JSON_COMPACT);
        status = FAIL(POLYAK_ERR_MISMATCH, "tensor \"%.200s\" is %.60s in the file and %.60s here", t->name,
                      there_text ? there_text : "?", here_text ? here_text : "?");
        free(there_text);
        free(here_text);
        json_decref(here);
        break;
      }
    }
  json_decref(list);
  return status;
}

polyak_status polyak_shard_check_model(polyak_t *p, polyak_shard_file *f)
{
  POLYAK_TRY(check_tensor_table(p, f));
  if (f->boundaries[f->name.world_size] != p->total_elems)
    return FAIL(POLYAK_ERR_FORMAT, "metadata \"boundaries\" ends at element %lld, the model has %lld",
                (long long)f->boundaries[f->name.world_size], (long long)p->total_elems);
  f->state.format_version = 2; /* numbers in the writer's text, as format 2's */
  POLYAK_TRY(polyak_ckpt_check_config(p, f->metadata, &f->state, f->where));
  /* rank 0's copies after the slices, in registration order, as polyak_save writes them */
  int expected = p->cfg.num_shadows;
  for (int i = 0; i < p->num_tensors && f->name.rank == 0; i++) {
    const polyak_tensor *t = &p->tensors[i];
    if (!t->copy_only)
      continue;
    expected++;
    json_t *shape = json_array();
    for (int d = 0; d < t->ndim && shape; d++)
      json_array_append_new(shape, json_integer(t->shape[d]));
    int64_t begin = polyak_shard_copy_offset(p, f, i);
    json_t *want = json_pack("{s:s, s:o, s:[I,I]}", "dtype", polyak_dtype_name(t->dtype), "shape", shape,
                             "data_offsets", (json_int_t)begin, (json_int_t)(begin + polyak_ckpt_entry_bytes(p, i)));
    int same = json_equal(json_object_get(f->root, t->name), want);
    json_decref(want);
    if (!same)
      return FAIL(POLYAK_ERR_FORMAT,
                  "the copy-only tensor \"%.200s\" is not there as %s of its shape at data byte %lld", t->name,
                  polyak_dtype_name(t->dtype), (long long)begin);
  }
  if ((int)json_object_size(f->root) - 1 != expected)
    return FAIL(POLYAK_ERR_FORMAT, "has %d tensors; a %s file of this model has %d", (int)json_object_size(f->root) - 1,
                f->name.rank == 0 ? "rank 0" : "rank's", expected);
  return POLYAK_OK;
}

polyak_status polyak_shard_check_same_set(polyak_t *p, const polyak_shard_file *first, const polyak_shard_file *other)
{
  const polyak_shard_file *f = other;
  for (int r = 0; r <= f->name.world_size; r++)
    if (first->boundaries[r] != other->boundaries[r])
      return FAIL(POLYAK_ERR_FORMAT, "its metadata \"boundaries\" differ from rank 0's file's (at rank %d)", r);
  for (int k = 0; k < p->cfg.num_shadows; k++)
    if (memcmp(&first->state.beta_prod[k], &other->state.beta_prod[k], sizeof(double)) != 0 ||
        first->state.updates_counted[k] != other->state.updates_counted[k])
      return FAIL(POLYAK_ERR_FORMAT,
                  "its step state (shadow %d's beta product or update count) differs from rank 0's "
                  "file's",
                  k);
  return POLYAK_OK;
}

/* ---- reads ---------------------------------------------------------------- */

int64_t polyak_shard_section(const polyak_t *p, const polyak_shard_file *f, int k)
{
  return (int64_t)k * f->slice_elems * (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
}

int64_t polyak_shard_copy_offset(const polyak_t *p, const polyak_shard_file *f, int i)
{
  if (!p->tensors[i].copy_only)
    return -1;
  int64_t offset = polyak_shard_section(p, f, p->cfg.num_shadows);
  for (int j = 0; j < i; j++)
    if (p->tensors[j].copy_only)
      offset += polyak_ckpt_entry_bytes(p, j);
  return offset;
}

polyak_status polyak_shard_read(polyak_t *p, polyak_shard_file *f, int64_t begin, int64_t end, void *buffer,
                                polyak_shard_visit visit, void *arg)
{
  for (int64_t block = begin / f->block_bytes; block * f->block_bytes < end; block++) {
    int64_t start = block * f->block_bytes;
    int64_t num_bytes = f->data_bytes - start < f->block_bytes ? f->data_bytes - start : f->block_bytes;
    POLYAK_TRY(read_all(p, f, buffer, num_bytes, f->data_start + start));
    char hex[17];
    memcpy(hex, f->block_checksums + 16 * block, 16);
    hex[16] = '\0';
    if (XXH3_64bits(buffer, (size_t)num_bytes) != strtoull(hex, NULL, 16))
      return FAIL(POLYAK_ERR_FORMAT,
                  "block %lld (data bytes %lld..%lld) does not match its checksum: the file is "
                  "corrupt",
                  (long long)block, (long long)start, (long long)(start + num_bytes));
    int64_t lo = begin > start ? begin : start, hi = end < start + num_bytes ? end : start + num_bytes;
    if (visit && lo < hi)
      POLYAK_TRY(visit(arg, (const char *)buffer + (lo - start), lo, hi - lo));
  }
  return POLYAK_OK;
}
