/* checkpoint.c: polyak_save and polyak_load in the safetensors format.
 *
 * File: an 8-byte little-endian header length, a JSON header (padded with
 * spaces to a multiple of 8 bytes), then one data buffer with no holes.
 * Shadow 0 of each tensor is stored under the tensor's own name and shape
 * in the shadow dtype, so PyTorch loads it straight into a model; shadow
 * k >= 1 is stored as "polyak.shadow.<k>.<name>". "__metadata__" (string
 * values only, as safetensors requires) holds the whole state: format
 * version, step, the product of applied betas per shadow, the schedules,
 * dtype, seed, non-finite count, and the XXH3-64 of the data buffer.
 *
 * A load checks everything (header, names, shapes, offsets, metadata,
 * checksum) and fills fresh shadow arenas; only then do they replace the
 * handle's shadows and step state, so a failing load changes nothing. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "checkpoint.h"
#include "polyak_internal.h"
#include "safe_file.h"

#define FORMAT_VERSION 1
#define SHADOW_PREFIX "polyak.shadow."
#define MAX_HEADER_BYTES 100000000ll /* safetensors' own limit */
#define IO_BLOCK_BYTES ((size_t)32 << 20)
#define CHECKSUM_PREFIX "xxh3-64:"

/* ---- names and small conversions ----------------------------------------- */

/* 1 if shadow k of tensor i is in checkpoints: all but the caller's own
 * shadows, which are their model's weights, saved with it. */
static int is_saved(const polyak_t *p, int k, int i)
{
  return !(k == 0 && p->tensors[i].owned);
}

/* The name shadow k of tensor i is saved under (malloc'd). */
static char *saved_name(const polyak_t *p, int k, int i)
{
  const char *name = p->tensors[i].name;
  if (k == 0)
    return strdup(name);
  size_t n = strlen(SHADOW_PREFIX) + 16 + strlen(name);
  char *out = malloc(n);
  if (out)
    snprintf(out, n, SHADOW_PREFIX "%d.%s", k, name);
  return out;
}

static int parse_int64(const char *text, int64_t *out)
{
  char *end;
  errno = 0;
  long long value = strtoll(text, &end, 10);
  if (errno || end == text || *end)
    return -1;
  *out = value;
  return 0;
}

static int parse_uint64(const char *text, uint64_t *out)
{
  char *end;
  errno = 0;
  if (text[0] == '-')
    return -1;
  unsigned long long value = strtoull(text, &end, 10);
  if (errno || end == text || *end)
    return -1;
  *out = value;
  return 0;
}

/* ---- the header ------------------------------------------------------------ */

/* The names of polyak_config.rounding's values in checkpoints. */
static const char *const rounding_names[] = {"nearest", "stochastic"};

static json_t *schedules_json(const polyak_config *cfg)
{
  json_t *list = json_array();
  for (int k = 0; k < cfg->num_shadows; k++) {
    const polyak_schedule *s = &cfg->schedules[k];
    json_array_append_new(
        list, json_pack("{s:s, s:f, s:f, s:f, s:f, s:f, s:I, s:I, s:b, s:f, s:f, s:s}", "kind",
                        polyak_schedule_kind_name(s->kind), "beta", s->beta, "beta_min",
                        s->beta_min, "inv_gamma", s->inv_gamma, "power", s->power, "gamma",
                        s->gamma, "ramp_steps", (json_int_t)s->ramp_steps, "start_step",
                        (json_int_t)s->start_step, "count_updates", cfg->count_updates[k],
                        "grad_norm_c", cfg->grad_norm_c[k], "layerwise_beta0", cfg->layerwise_beta0[k],
                        "rounding", rounding_names[cfg->rounding[k]]));
  }
  return list;
}

/* Adds key = the compact JSON text of `value` (stolen) to `metadata`. */
static int set_json_text(json_t *metadata, const char *key, json_t *value)
{
  char *text = json_dumps(value, JSON_COMPACT | JSON_PRESERVE_ORDER);
  json_decref(value);
  if (!text)
    return -1;
  int rc = json_object_set_new(metadata, key, json_string(text));
  free(text);
  return rc;
}

static int set_text(json_t *metadata, const char *key, const char *format, ...)
    __attribute__((format(printf, 3, 4)));
static int set_text(json_t *metadata, const char *key, const char *format, ...)
{
  char text[64];
  va_list args;
  va_start(args, format);
  vsnprintf(text, sizeof text, format, args);
  va_end(args);
  return json_object_set_new(metadata, key, json_string(text));
}

static json_t *build_metadata(const polyak_t *p, int64_t nonfinite, uint64_t checksum)
{
  json_t *metadata = json_object(), *products = json_array(), *counts = json_array();
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    json_array_append_new(products, json_real(p->beta_prod[k]));
    json_array_append_new(counts, json_integer(p->updates_counted[k]));
  }
  char checksum_text[32];
  snprintf(checksum_text, sizeof checksum_text, CHECKSUM_PREFIX "%016" PRIx64, checksum);
  int failed = json_object_set_new(metadata, "format", json_string("polyak")) ||
               set_text(metadata, "format_version", "%d", FORMAT_VERSION) ||
               json_object_set_new(metadata, "library_version", json_string(polyak_version_string())) ||
               set_text(metadata, "step", "%" PRId64, p->last_step) ||
               set_text(metadata, "num_shadows", "%d", p->cfg.num_shadows) ||
               json_object_set_new(metadata, "shadow_dtype",
                                   json_string(polyak_dtype_name(p->cfg.shadow_dtype))) ||
               set_text(metadata, "seed", "%" PRIu64, p->cfg.seed) ||
               set_text(metadata, "zero_init", "%d", p->cfg.zero_init) ||
               set_text(metadata, "skip_nonfinite", "%d", p->cfg.skip_nonfinite) ||
               set_text(metadata, "lookahead_every", "%" PRId64, p->cfg.lookahead_every) ||
               set_text(metadata, "nonfinite_count", "%" PRId64, nonfinite) ||
               set_json_text(metadata, "beta_products", products) ||
               set_json_text(metadata, "update_counts", counts) ||
               set_json_text(metadata, "schedules", schedules_json(&p->cfg)) ||
               json_object_set_new(metadata, "checksum", json_string(checksum_text));
  if (failed) {
    json_decref(metadata);
    return NULL;
  }
  return metadata;
}

/* The header text, padded with spaces to a multiple of 8 bytes; data is
 * laid out shadow by shadow, each in registration order. */
static char *build_header(const polyak_t *p, int64_t nonfinite, uint64_t checksum,
                          size_t *num_bytes)
{
  json_t *root = json_object();
  json_t *metadata = build_metadata(p, nonfinite, checksum);
  int failed = !root || !metadata || json_object_set_new(root, "__metadata__", metadata);
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t offset = 0;
  for (int k = 0; k < p->cfg.num_shadows && !failed; k++)
    for (int i = 0; i < p->num_tensors && !failed; i++) {
      const polyak_tensor *t = &p->tensors[i];
      if (!is_saved(p, k, i))
        continue;
      json_t *shape = json_array();
      for (int d = 0; d < t->ndim; d++)
        json_array_append_new(shape, json_integer(t->shape[d]));
      int64_t end = offset + t->num_elems * (int64_t)elem_bytes;
      json_t *entry = json_pack("{s:s, s:o, s:[I,I]}", "dtype", polyak_dtype_name(p->cfg.shadow_dtype),
                                "shape", shape, "data_offsets", (json_int_t)offset, (json_int_t)end);
      char *name = saved_name(p, k, i);
      failed = !entry || !name || json_object_set_new(root, name, entry);
      free(name);
      offset = end;
    }
  char *text = failed ? NULL : json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
  json_decref(root);
  if (!text)
    return NULL;
  size_t length = strlen(text), padded = (length + 7) / 8 * 8;
  char *out = realloc(text, padded + 1);
  if (!out) {
    free(text);
    return NULL;
  }
  memset(out + length, ' ', padded - length);
  out[padded] = '\0';
  *num_bytes = padded;
  return out;
}

/* ---- moving shadow bytes ------------------------------------------------------- */

/* Bytes of the host buffer for moving `num_bytes` of data: a block, or
 * less for a small model. */
static size_t io_buffer_bytes(const polyak_t *p, int64_t num_bytes)
{
  int64_t arena_bytes = p->arena_elems * (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t need = num_bytes > arena_bytes ? num_bytes : arena_bytes;
  if (need < 4096)
    need = 4096;
  return need < (int64_t)IO_BLOCK_BYTES ? (size_t)need : IO_BLOCK_BYTES;
}

/* Shadows move between the arenas and a host buffer in blocks of arena
 * elements; each block holds pieces of the tensors' slices (and padding,
 * which checkpoints skip). */
typedef struct {
  polyak_t *p;
  void *buffer;
  size_t buffer_bytes;
} block_io;

/* The part [*lo, *hi) of tensor t's kept slice (arena positions) inside
 * the arena block [start, start + count) (empty if *lo >= *hi). Returns 1
 * if the slice goes on past the block, so the next block starts with it. */
static int slice_in_block(const polyak_tensor_desc *t, int64_t start, int64_t count, int64_t *lo,
                          int64_t *hi)
{
  int64_t begin = t->shadow_offset_elems + t->local_first_elem, end = begin + t->local_num_elems;
  *lo = begin > start ? begin : start;
  *hi = end < start + count ? end : start + count;
  return end > start + count;
}

static polyak_status write_data(block_io *io, polyak_safe_file *file, XXH3_state_t *hash)
{
  polyak_t *p = io->p;
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t block_elems = (int64_t)(io->buffer_bytes / elem_bytes);
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    int i = 0;
    for (int64_t start = 0; start < p->arena_elems; start += block_elems) {
      int64_t count = p->arena_elems - start < block_elems ? p->arena_elems - start : block_elems;
      polyak_status status = p->ops->copy_to_host(
          p, io->buffer, (const char *)p->ops->arena(p, k) + start * (int64_t)elem_bytes,
          (size_t)count * elem_bytes);
      if (status != POLYAK_OK)
        return status;
      for (; i < p->num_tensors; i++) {
        int64_t lo, hi;
        if (!is_saved(p, k, i)) /* no arena space either */
          continue;
        int goes_on = slice_in_block(&p->descs[i], start, count, &lo, &hi);
        if (lo < hi) {
          const char *piece = (const char *)io->buffer + (lo - start) * elem_bytes;
          size_t piece_bytes = (size_t)(hi - lo) * elem_bytes;
          XXH3_64bits_update(hash, piece, piece_bytes);
          if (polyak_safe_file_write(file, piece, piece_bytes) != 0)
            return polyak_fail(p, POLYAK_ERR_IO, "polyak_save: %s", file->error);
        }
        if (goes_on)
          break;
      }
    }
  }
  return POLYAK_OK;
}

/* What polyak_save and polyak_load ask of their arguments and handle. */
static polyak_status check_call(polyak_t *p, const char *path, const char *function)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!path || !path[0])
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: path is %s", function, path ? "empty" : "NULL");
  if (!p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: call polyak_finalize first", function);
  if (p->graph_reserved)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "%s: steps are reserved for graph replays; call polyak_graph_release first",
                       function);
  return POLYAK_OK;
}

/* Sharded: every rank gathers each shadow (one all-gather each) and rank 0
 * writes the tensors whole, in file order; `file` is NULL elsewhere. Every
 * rank makes every gather, whatever failed locally before: a rank that
 * left the sequence would leave the others waiting in NCCL. */
static polyak_status write_gathered(block_io *io, polyak_safe_file *file, XXH3_state_t *hash,
                                    polyak_status status)
{
  polyak_t *p = io->p;
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t largest = 1;
  for (int i = 0; i < p->num_tensors; i++)
    largest = p->tensors[i].num_elems > largest ? p->tensors[i].num_elems : largest;
  void *whole = file ? p->ops->scratch_alloc(p, (size_t)largest * elem_bytes) : NULL;
  if (status == POLYAK_OK && ((file && !whole) || !io->buffer))
    status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_save: out of memory to gather the shadows");
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    void *gathered = NULL;
    polyak_status gathered_status = polyak_gather_arenas(p, k, &gathered, NULL);
    if (status == POLYAK_OK)
      status = gathered_status;
    for (int i = 0; i < p->num_tensors && file && status == POLYAK_OK; i++) {
      status = polyak_assemble(p, gathered, p->arena_alloc_elems, p->layouts + i, (size_t)p->num_tensors, 1.0,
                               whole, p->cfg.shadow_dtype, NULL);
      size_t tensor_bytes = (size_t)p->tensors[i].num_elems * elem_bytes;
      for (size_t done = 0; done < tensor_bytes && status == POLYAK_OK;) {
        size_t n = tensor_bytes - done < io->buffer_bytes ? tensor_bytes - done : io->buffer_bytes;
        status = p->ops->copy_to_host(p, io->buffer, (const char *)whole + done, n);
        XXH3_64bits_update(hash, io->buffer, n);
        if (status == POLYAK_OK && polyak_safe_file_write(file, io->buffer, n) != 0)
          status = polyak_fail(p, POLYAK_ERR_IO, "polyak_save: %s", file->error);
        done += n;
      }
    }
    if (gathered)
      p->ops->scratch_free(p, gathered);
  }
  if (whole)
    p->ops->scratch_free(p, whole);
  return status;
}

/* This rank's non-finite count summed over all ranks (through the same
 * all-gather: 8 bytes are 2 floats or 4 bf16 values to NCCL). `status` is
 * this rank's so far: the ranks agree before the all-gather. */
static polyak_status total_nonfinite(polyak_t *p, polyak_status status, int64_t local, int64_t *total)
{
  int64_t count = 8 / (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int world = p->cfg.world_size;
  int64_t *all = malloc(sizeof *all * (size_t)world);
  void *send = p->ops->scratch_alloc(p, 8), *recv = p->ops->scratch_alloc(p, 8 * (size_t)world);
  if (status == POLYAK_OK && !(all && send && recv))
    status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_save: out of memory");
  polyak_status agreed = polyak_all_ready(p, status == POLYAK_OK, POLYAK_ERR_STATE, "polyak_save");
  if (status == POLYAK_OK)
    status = agreed;
  if (status == POLYAK_OK)
    status = p->ops->copy_from_host(p, send, &local, 8);
  if (status == POLYAK_OK)
    status = p->ops->all_gather(p, send, recv, count, NULL);
  if (status == POLYAK_OK)
    status = p->ops->copy_to_host(p, all, recv, 8 * (size_t)world);
  *total = 0;
  for (int r = 0; r < world && status == POLYAK_OK; r++)
    *total += all[r];
  if (send)
    p->ops->scratch_free(p, send);
  if (recv)
    p->ops->scratch_free(p, recv);
  free(all);
  return status;
}

polyak_status polyak_save(polyak_t *p, const char *path)
{
  polyak_status status = check_call(p, path, "polyak_save");
  if (status != POLYAK_OK)
    return status;
  int gathering = p->cfg.world_size > 1 || p->cfg.nccl_comm;
  if (gathering && (!p->cfg.nccl_comm || !p->ops->all_gather))
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_save: this rank holds a slice of the shadows (world_size %d); saving "
                       "gathers them over nccl_comm, which is not set",
                       p->cfg.world_size);
  int writer = !gathering || p->cfg.rank == 0;
  int64_t nonfinite = 0;
  status = polyak_refresh_products(p); /* grad-norm shadows' products, from the device */
  if (status == POLYAK_OK)
    status = p->ops->nonfinite_count(p, &nonfinite); /* also waits for the device */
  if (gathering) /* from here on every rank makes every collective */
    status = total_nonfinite(p, status, nonfinite, &nonfinite);
  if (status != POLYAK_OK && !gathering)
    return status;
  size_t header_bytes = 0;
  char *header = build_header(p, nonfinite, 0, &header_bytes); /* checksum filled in below */
  polyak_safe_file *file = malloc(sizeof *file);
  XXH3_state_t *hash = XXH3_createState();
  block_io io = {p, NULL, io_buffer_bytes(p, 0)};
  if (header && file && hash)
    io.buffer = p->ops->host_buffer(p, io.buffer_bytes);
  int opened = 0;
  if (!header || !file || !hash || !io.buffer)
    status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_save: out of host memory");
  if (status == POLYAK_OK && writer) {
    uint8_t length[8];
    for (int b = 0; b < 8; b++)
      length[b] = (uint8_t)((uint64_t)header_bytes >> (8 * b));
    opened = polyak_safe_file_open(file, path) == 0;
    if (!opened || polyak_safe_file_write(file, length, 8) != 0 ||
        polyak_safe_file_write(file, header, header_bytes) != 0)
      status = polyak_fail(p, POLYAK_ERR_IO, "polyak_save: %s", file->error);
  }
  if (hash)
    XXH3_64bits_reset(hash);
  if (gathering) /* the other ranks take part in the gathers only */
    status = write_gathered(&io, writer && status == POLYAK_OK ? file : NULL, hash, status);
  else if (status == POLYAK_OK)
    status = write_data(&io, file, hash);
  if (!writer)
    goto agree;
  if (status == POLYAK_OK) { /* the same header with the real checksum: same length */
    size_t final_bytes = 0;
    char *final_header = build_header(p, nonfinite, XXH3_64bits_digest(hash), &final_bytes);
    if (!final_header || final_bytes != header_bytes)
      status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_save: out of host memory");
    else if (polyak_safe_file_pwrite(file, final_header, final_bytes, 8) != 0 ||
             polyak_safe_file_commit(file) != 0)
      status = polyak_fail(p, POLYAK_ERR_IO, "polyak_save: %s", file->error);
    free(final_header);
  }
  if (status != POLYAK_OK && opened)
    polyak_safe_file_abort(file);
agree:
  if (gathering) { /* every rank returns the same verdict */
    polyak_status agreed = polyak_all_ready(p, status == POLYAK_OK, POLYAK_ERR_IO, "polyak_save (rank 0 writes)");
    if (status == POLYAK_OK)
      status = agreed;
  }
  if (io.buffer)
    p->ops->free_host_buffer(p, io.buffer);
  XXH3_freeState(hash);
  free(file);
  free(header);
  return status;
}

/* ---- load: checking the header ------------------------------------------------ */

typedef struct {
  int64_t step, nonfinite;
  double beta_prod[POLYAK_MAX_SHADOWS];
  int64_t updates_counted[POLYAK_MAX_SHADOWS];
  uint64_t checksum;
  int64_t data_bytes;
  int64_t *data_begin; /* [k * num_tensors + i]: file data offset of each slice */
} checkpoint_header;

#define FORMAT_ERROR(...) polyak_fail(p, POLYAK_ERR_FORMAT, "polyak_load: " __VA_ARGS__)
#define MISMATCH(...) polyak_fail(p, POLYAK_ERR_MISMATCH, "polyak_load: " __VA_ARGS__)

static const char *metadata_text(json_t *metadata, const char *key)
{
  return json_string_value(json_object_get(metadata, key));
}

static polyak_status check_schedules(polyak_t *p, const char *text)
{
  json_error_t error;
  json_t *list = json_loads(text, JSON_REJECT_DUPLICATES, &error);
  polyak_status status = POLYAK_OK;
  if (!json_is_array(list) || (int)json_array_size(list) != p->cfg.num_shadows)
    status = FORMAT_ERROR("metadata \"schedules\" is not a list of %d schedules", p->cfg.num_shadows);
  for (int k = 0; k < p->cfg.num_shadows && status == POLYAK_OK; k++) {
    polyak_schedule s;
    const char *kind = NULL;
    json_int_t ramp = 0, start = 0;
    /* the modes beyond a schedule: absent from files older than them, and 0 (nearest) there */
    int count_updates = 0, rounding = -1;
    double grad_norm_c = 0.0, layerwise_beta0 = 0.0;
    const char *rounding_name = rounding_names[POLYAK_ROUND_NEAREST];
    if (json_unpack(json_array_get(list, k), "{s:s, s:F, s:F, s:F, s:F, s:F, s:I, s:I, s?b, s?F, s?F, s?s}", "kind",
                    &kind, "beta", &s.beta, "beta_min", &s.beta_min, "inv_gamma", &s.inv_gamma, "power",
                    &s.power, "gamma", &s.gamma, "ramp_steps", &ramp, "start_step", &start, "count_updates",
                    &count_updates, "grad_norm_c", &grad_norm_c, "layerwise_beta0", &layerwise_beta0, "rounding",
                    &rounding_name) != 0 ||
        polyak_schedule_kind_from_name(kind) < 0) {
      status = FORMAT_ERROR("metadata \"schedules\"[%d] is not a schedule", k);
      break;
    }
    for (int r = 0; r < 2; r++)
      rounding = strcmp(rounding_name, rounding_names[r]) == 0 ? r : rounding;
    if (rounding < 0) {
      status = FORMAT_ERROR("metadata \"schedules\"[%d] has rounding \"%s\", not \"nearest\" or \"stochastic\"", k,
                            rounding_name);
      break;
    }
    if (rounding != p->cfg.rounding[k]) {
      status = MISMATCH("shadow %d was averaged with %s rounding, this handle has %s rounding (the bits would "
                        "not continue the same way)",
                        k, rounding_names[rounding], rounding_names[p->cfg.rounding[k]]);
      break;
    }
    s.kind = (polyak_schedule_kind)polyak_schedule_kind_from_name(kind);
    s.ramp_steps = ramp;
    s.start_step = start;
    if (count_updates != p->cfg.count_updates[k]) {
      status = MISMATCH("shadow %d was averaged with count_updates = %d, this handle has %d", k,
                        count_updates, p->cfg.count_updates[k]);
      break;
    }
    if (grad_norm_c != p->cfg.grad_norm_c[k] || layerwise_beta0 != p->cfg.layerwise_beta0[k]) {
      status = MISMATCH("shadow %d was averaged with grad_norm_c = %.17g, layerwise_beta0 = %.17g; this handle "
                        "has %.17g, %.17g",
                        k, grad_norm_c, layerwise_beta0, p->cfg.grad_norm_c[k], p->cfg.layerwise_beta0[k]);
      break;
    }
    if (!polyak_schedule_same(&s, &p->cfg.schedules[k]))
      status = MISMATCH("shadow %d was averaged with another schedule (the file's: %s, beta %.17g, "
                        "start_step %lld; this handle's: %s, beta %.17g, start_step %lld)",
                        k, kind, s.beta, (long long)s.start_step,
                        polyak_schedule_kind_name(p->cfg.schedules[k].kind), p->cfg.schedules[k].beta,
                        (long long)p->cfg.schedules[k].start_step);
  }
  json_decref(list);
  return status;
}

static polyak_status check_metadata(polyak_t *p, json_t *metadata, checkpoint_header *h)
{
  if (!json_is_object(metadata))
    return FORMAT_ERROR("no \"__metadata__\" object: not a polyak checkpoint");
  const char *key;
  json_t *value;
  json_object_foreach(metadata, key, value)
  {
    if (!json_is_string(value))
      return FORMAT_ERROR("metadata \"%s\" is not a string", key);
  }
  const char *format = metadata_text(metadata, "format");
  const char *version = metadata_text(metadata, "format_version");
  if (!format || strcmp(format, "polyak") != 0)
    return FORMAT_ERROR("metadata \"format\" is not \"polyak\": not a polyak checkpoint");
  if (!version || strcmp(version, "1") != 0)
    return FORMAT_ERROR("format version \"%s\" is not one this library reads (1)",
                        version ? version : "(missing)");
  /* required; "lookahead_every" and "update_counts" are newer: absent, 0 */
  const char *names[] = {"step",          "num_shadows", "shadow_dtype", "seed",    "zero_init",
                         "nonfinite_count", "beta_products", "schedules", "checksum"};
  for (size_t n = 0; n < sizeof names / sizeof names[0]; n++)
    if (!metadata_text(metadata, names[n]))
      return FORMAT_ERROR("metadata \"%s\" is missing", names[n]);
  int64_t num_shadows, zero_init, lookahead_every;
  uint64_t seed;
  if (parse_int64(metadata_text(metadata, "step"), &h->step) != 0 || h->step < 0)
    return FORMAT_ERROR("metadata \"step\" is not a step");
  if (parse_int64(metadata_text(metadata, "nonfinite_count"), &h->nonfinite) != 0 || h->nonfinite < 0)
    return FORMAT_ERROR("metadata \"nonfinite_count\" is not a count");
  if (parse_int64(metadata_text(metadata, "num_shadows"), &num_shadows) != 0)
    return FORMAT_ERROR("metadata \"num_shadows\" is not a number");
  if (num_shadows != p->cfg.num_shadows)
    return MISMATCH("the file has %lld shadows, this handle %d", (long long)num_shadows,
                    p->cfg.num_shadows);
  const char *dtype = metadata_text(metadata, "shadow_dtype");
  if (strcmp(dtype, polyak_dtype_name(p->cfg.shadow_dtype)) != 0)
    return MISMATCH("the file's shadows are %s, this handle's %s", dtype,
                    polyak_dtype_name(p->cfg.shadow_dtype));
  if (parse_uint64(metadata_text(metadata, "seed"), &seed) != 0)
    return FORMAT_ERROR("metadata \"seed\" is not a number");
  if (seed != p->cfg.seed)
    return MISMATCH("the file's seed is %" PRIu64 ", this handle's %" PRIu64
                    " (stochastic rounding would not continue the same way)",
                    seed, p->cfg.seed);
  if (parse_int64(metadata_text(metadata, "zero_init"), &zero_init) != 0 || zero_init < 0 || zero_init > 1)
    return FORMAT_ERROR("metadata \"zero_init\" is not 0 or 1");
  if (zero_init != p->cfg.zero_init)
    return MISMATCH("the file has zero_init = %lld, this handle %d", (long long)zero_init,
                    p->cfg.zero_init);
  const char *lookahead_text = metadata_text(metadata, "lookahead_every");
  lookahead_every = 0;
  if (lookahead_text && (parse_int64(lookahead_text, &lookahead_every) != 0 || lookahead_every < 0))
    return FORMAT_ERROR("metadata \"lookahead_every\" is not a count of steps");
  if (lookahead_every != p->cfg.lookahead_every)
    return MISMATCH("the file has lookahead_every = %lld, this handle %lld", (long long)lookahead_every,
                    (long long)p->cfg.lookahead_every);
  json_error_t error;
  json_t *products = json_loads(metadata_text(metadata, "beta_products"), 0, &error);
  int bad = !json_is_array(products) || (int)json_array_size(products) != p->cfg.num_shadows;
  for (int k = 0; k < p->cfg.num_shadows && !bad; k++) {
    json_t *v = json_array_get(products, k);
    h->beta_prod[k] = json_number_value(v);
    bad = !json_is_number(v) || !(h->beta_prod[k] >= 0.0 && h->beta_prod[k] <= 1.0);
  }
  json_decref(products);
  if (bad)
    return FORMAT_ERROR("metadata \"beta_products\" is not a list of %d numbers in [0, 1]",
                        p->cfg.num_shadows);
  const char *counts_text = metadata_text(metadata, "update_counts");
  json_t *counts = counts_text ? json_loads(counts_text, 0, &error) : NULL;
  bad = counts_text && (!json_is_array(counts) || (int)json_array_size(counts) != p->cfg.num_shadows);
  for (int k = 0; k < p->cfg.num_shadows && !bad; k++) {
    json_t *v = json_array_get(counts, k); /* NULL without the list: 0 */
    h->updates_counted[k] = v ? json_integer_value(v) : 0;
    bad = (v && !json_is_integer(v)) || h->updates_counted[k] < 0;
  }
  json_decref(counts);
  if (bad)
    return FORMAT_ERROR("metadata \"update_counts\" is not a list of %d counts", p->cfg.num_shadows);
  const char *checksum = metadata_text(metadata, "checksum");
  char *end = NULL;
  if (strncmp(checksum, CHECKSUM_PREFIX, strlen(CHECKSUM_PREFIX)) != 0 ||
      strlen(checksum) != strlen(CHECKSUM_PREFIX) + 16)
    return FORMAT_ERROR("metadata \"checksum\" is not " CHECKSUM_PREFIX "<16 hex digits>");
  h->checksum = strtoull(checksum + strlen(CHECKSUM_PREFIX), &end, 16);
  if (*end)
    return FORMAT_ERROR("metadata \"checksum\" is not " CHECKSUM_PREFIX "<16 hex digits>");
  return check_schedules(p, metadata_text(metadata, "schedules"));
}

static int compare_ranges(const void *a, const void *b)
{
  const int64_t *x = a, *y = b;
  return x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : (x[1] > y[1]) - (x[1] < y[1]);
}

/* One tensor entry: dtype, shape and offsets as this handle expects. */
static polyak_status check_entry(polyak_t *p, const char *name, json_t *entry, int i, int64_t data_bytes,
                                 int64_t range[2])
{
  const polyak_tensor *t = &p->tensors[i];
  json_t *dtype = json_object_get(entry, "dtype"), *shape = json_object_get(entry, "shape");
  json_t *offsets = json_object_get(entry, "data_offsets");
  if (!json_is_object(entry) || !json_is_string(dtype) || !json_is_array(shape) || !json_is_array(offsets) ||
      json_array_size(offsets) != 2 || !json_is_integer(json_array_get(offsets, 0)) ||
      !json_is_integer(json_array_get(offsets, 1)))
    return FORMAT_ERROR("tensor \"%s\" lacks a dtype, a shape or two data_offsets", name);
  const char *dtype_name = json_string_value(dtype);
  const char *known[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                         "U16", "U32", "U64", "F8_E4M3", "F8_E5M2"};
  int is_known = 0;
  for (size_t n = 0; n < sizeof known / sizeof known[0]; n++)
    is_known |= strcmp(dtype_name, known[n]) == 0;
  if (!is_known)
    return FORMAT_ERROR("tensor \"%s\" has dtype \"%s\", which safetensors does not know", name, dtype_name);
  if (strcmp(dtype_name, polyak_dtype_name(p->cfg.shadow_dtype)) != 0)
    return MISMATCH("tensor \"%s\" is %s; this handle's shadows are %s", name, dtype_name,
                    polyak_dtype_name(p->cfg.shadow_dtype));
  int shape_ok = (int)json_array_size(shape) == t->ndim;
  for (int d = 0; d < t->ndim && shape_ok; d++) {
    json_t *dim = json_array_get(shape, d);
    if (!json_is_integer(dim) || json_integer_value(dim) < 0)
      return FORMAT_ERROR("tensor \"%s\" has a shape that is not a list of sizes", name);
    shape_ok = json_integer_value(dim) == t->shape[d];
  }
  if (!shape_ok)
    return MISMATCH("tensor \"%s\" has another shape in the file than the %d-dimensional one "
                    "registered",
                    name, t->ndim);
  range[0] = json_integer_value(json_array_get(offsets, 0));
  range[1] = json_integer_value(json_array_get(offsets, 1));
  if (range[0] < 0 || range[1] < range[0] || range[1] > data_bytes)
    return FORMAT_ERROR("tensor \"%s\" has data_offsets [%lld, %lld] outside the %lld data bytes", name,
                        (long long)range[0], (long long)range[1], (long long)data_bytes);
  if (range[1] - range[0] != t->num_elems * (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype))
    return FORMAT_ERROR("tensor \"%s\": data_offsets span %lld bytes, its shape and dtype %lld", name,
                        (long long)(range[1] - range[0]),
                        (long long)(t->num_elems * (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype)));
  return POLYAK_OK;
}

static polyak_status check_tensors(polyak_t *p, json_t *root, checkpoint_header *h)
{
  int64_t slots = (int64_t)p->cfg.num_shadows * p->num_tensors, expected = 0;
  for (int k = 0; k < p->cfg.num_shadows; k++)
    for (int i = 0; i < p->num_tensors; i++)
      expected += is_saved(p, k, i);
  int64_t(*ranges)[2] = malloc(((size_t)expected + 1) * sizeof *ranges);
  h->data_begin = calloc((size_t)slots + 1, sizeof *h->data_begin);
  if (!ranges || !h->data_begin) {
    free(ranges);
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_load: out of host memory");
  }
  polyak_status status = POLYAK_OK;
  int64_t m = 0; /* entries checked */
  for (int k = 0; k < p->cfg.num_shadows && status == POLYAK_OK; k++)
    for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++) {
      char *name = saved_name(p, k, i);
      json_t *entry = name ? json_object_get(root, name) : NULL;
      if (!name)
        status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_load: out of host memory");
      else if (!is_saved(p, k, i))
        status = entry ? MISMATCH("the file has tensor \"%s\", whose shadow is the caller's here", name)
                       : POLYAK_OK;
      else if (!entry)
        status = MISMATCH("tensor \"%s\" is missing from the file", name);
      else if ((status = check_entry(p, name, entry, i, h->data_bytes, ranges[m])) == POLYAK_OK)
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
      int known = 0; /* every expected name was found, so an unknown key is extra */
      const char *name = key;
      long k = 0;
      if (strncmp(key, SHADOW_PREFIX, strlen(SHADOW_PREFIX)) == 0) {
        char *rest;
        k = strtol(key + strlen(SHADOW_PREFIX), &rest, 10);
        name = *rest == '.' ? rest + 1 : key;
      }
      known = k >= 0 && k < p->cfg.num_shadows && polyak_registry_has(p, name);
      if (!known) {
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
        status = FORMAT_ERROR("data bytes %lld..%lld belong to no tensor", (long long)covered,
                              (long long)ranges[n][0]);
      covered = ranges[n][1];
    }
    if (status == POLYAK_OK && covered != h->data_bytes)
      status = FORMAT_ERROR("data bytes %lld..%lld belong to no tensor", (long long)covered,
                            (long long)h->data_bytes);
  }
  free(ranges);
  return status;
}

/* ---- load: reading ---------------------------------------------------------- */

static int read_at(int fd, void *buffer, size_t num_bytes, int64_t offset)
{
  char *p = buffer;
  while (num_bytes > 0) {
    ssize_t got = pread(fd, p, num_bytes, (off_t)offset);
    if (got < 0 && errno == EINTR)
      continue;
    if (got <= 0)
      return -1;
    p += got;
    offset += got;
    num_bytes -= (size_t)got;
  }
  return 0;
}

static polyak_status verify_checksum(polyak_t *p, int fd, int64_t data_start, checkpoint_header *h,
                                     block_io *io)
{
  XXH3_state_t *hash = XXH3_createState();
  if (!hash)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_load: out of host memory");
  XXH3_64bits_reset(hash);
  polyak_status status = POLYAK_OK;
  for (int64_t done = 0; done < h->data_bytes;) {
    size_t n = h->data_bytes - done < (int64_t)io->buffer_bytes ? (size_t)(h->data_bytes - done)
                                                                : io->buffer_bytes;
    if (read_at(fd, io->buffer, n, data_start + done) != 0) {
      status = polyak_fail(p, POLYAK_ERR_IO, "polyak_load: cannot read data byte %lld: %s",
                           (long long)done, errno ? strerror(errno) : "unexpected end of file");
      break;
    }
    XXH3_64bits_update(hash, io->buffer, n);
    done += (int64_t)n;
  }
  if (status == POLYAK_OK && XXH3_64bits_digest(hash) != h->checksum)
    status = FORMAT_ERROR("the data's checksum is not the one recorded: the file is corrupt");
  XXH3_freeState(hash);
  return status;
}

/* Fills the staging arenas block by block in arena order, each tensor's
 * slice read from its data offset; padding stays zero. */
static polyak_status stage_data(polyak_t *p, int fd, int64_t data_start, const checkpoint_header *h,
                                block_io *io)
{
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t block_elems = (int64_t)(io->buffer_bytes / elem_bytes);
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    int i = 0;
    for (int64_t start = 0; start < p->arena_alloc_elems; start += block_elems) {
      int64_t count = p->arena_alloc_elems - start < block_elems ? p->arena_alloc_elems - start : block_elems;
      memset(io->buffer, 0, (size_t)count * elem_bytes);
      for (; i < p->num_tensors; i++) {
        int64_t lo, hi;
        if (!is_saved(p, k, i))
          continue;
        int goes_on = slice_in_block(&p->descs[i], start, count, &lo, &hi);
        if (lo < hi) {
          int64_t file_offset = data_start + h->data_begin[(int64_t)k * p->num_tensors + i] +
                                (lo - p->descs[i].shadow_offset_elems) * (int64_t)elem_bytes;
          if (read_at(fd, (char *)io->buffer + (lo - start) * elem_bytes, (size_t)(hi - lo) * elem_bytes,
                      file_offset) != 0)
            return polyak_fail(p, POLYAK_ERR_IO, "polyak_load: cannot read tensor \"%s\"",
                               p->tensors[i].name);
        }
        if (goes_on)
          break;
      }
      polyak_status status = p->ops->staging_write(p, k, start, count, io->buffer);
      if (status != POLYAK_OK)
        return status;
    }
  }
  return POLYAK_OK;
}

polyak_status polyak_load_fd(polyak_t *p, int fd)
{
  struct stat st;
  if (fstat(fd, &st) != 0)
    return polyak_fail(p, POLYAK_ERR_IO, "polyak_load: cannot stat the file: %s", strerror(errno));
  int64_t size = (int64_t)st.st_size;
  if (size < 8)
    return FORMAT_ERROR("a file of %lld bytes is too short to be safetensors", (long long)size);
  uint8_t length[8];
  if (read_at(fd, length, 8, 0) != 0)
    return polyak_fail(p, POLYAK_ERR_IO, "polyak_load: cannot read the header length");
  uint64_t header_bytes = 0;
  for (int b = 0; b < 8; b++)
    header_bytes |= (uint64_t)length[b] << (8 * b);
  if (header_bytes > (uint64_t)MAX_HEADER_BYTES)
    return FORMAT_ERROR("a header of %llu bytes is absurdly large (the limit is %lld)",
                        (unsigned long long)header_bytes, MAX_HEADER_BYTES);
  if (header_bytes > (uint64_t)(size - 8))
    return FORMAT_ERROR("the header length %llu runs past the end of the %lld-byte file",
                        (unsigned long long)header_bytes, (long long)size);
  char *text = malloc(header_bytes + 1);
  if (!text)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_load: out of host memory");
  if (read_at(fd, text, header_bytes, 8) != 0) {
    free(text);
    return polyak_fail(p, POLYAK_ERR_IO, "polyak_load: cannot read the header");
  }
  json_error_t error;
  json_t *root = json_loadb(text, header_bytes, JSON_REJECT_DUPLICATES, &error);
  free(text);
  if (!json_is_object(root)) {
    json_decref(root);
    return root ? FORMAT_ERROR("the header is not a JSON object")
                : FORMAT_ERROR("the header is not JSON: %s (line %d, column %d)", error.text,
                               error.line, error.column);
  }
  checkpoint_header h = {0};
  h.data_bytes = size - 8 - (int64_t)header_bytes;
  polyak_status status = check_metadata(p, json_object_get(root, "__metadata__"), &h);
  if (status == POLYAK_OK)
    status = check_tensors(p, root, &h);
  json_decref(root);

  block_io io = {p, NULL, io_buffer_bytes(p, h.data_bytes)};
  int staging = 0;
  if (status == POLYAK_OK) {
    io.buffer = p->ops->host_buffer(p, io.buffer_bytes);
    if (!io.buffer)
      status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_load: out of host memory");
  }
  if (status == POLYAK_OK)
    status = verify_checksum(p, fd, 8 + (int64_t)header_bytes, &h, &io);
  if (status == POLYAK_OK) {
    status = p->ops->staging_begin(p);
    staging = status == POLYAK_OK;
  }
  if (status == POLYAK_OK)
    status = stage_data(p, fd, 8 + (int64_t)header_bytes, &h, &io);
  double products_before[POLYAK_MAX_SHADOWS];
  int products_written = 0;
  if (status == POLYAK_OK && polyak_has_grad_norm(&p->cfg)) { /* the backend keeps these */
    status = p->ops->products_read(p, products_before);
    if (status == POLYAK_OK)
      status = p->ops->products_write(p, h.beta_prod);
    products_written = status == POLYAK_OK;
  }
  if (status == POLYAK_OK) /* sums over ranks keep the file's count */
    status = p->ops->staging_commit(p, p->cfg.rank == 0 ? h.nonfinite : 0);
  else if (staging)
    p->ops->staging_abort(p);
  if (status != POLYAK_OK && products_written)
    p->ops->products_write(p, products_before);
  if (status == POLYAK_OK) {
    p->last_step = h.step;
    for (int k = 0; k < p->cfg.num_shadows; k++) {
      p->beta_prod[k] = h.beta_prod[k];
      p->updates_counted[k] = h.updates_counted[k];
    }
  }
  if (io.buffer)
    p->ops->free_host_buffer(p, io.buffer);
  free(h.data_begin);
  return status;
}

polyak_status polyak_load(polyak_t *p, const char *path)
{
  polyak_status status = check_call(p, path, "polyak_load");
  if (status != POLYAK_OK)
    return status;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return polyak_fail(p, POLYAK_ERR_IO, "polyak_load: cannot open %s: %s", path, strerror(errno));
  status = polyak_load_fd(p, fd);
  close(fd);
  return status;
}
