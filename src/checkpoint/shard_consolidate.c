/* shard_consolidate.c: one file from a set of shard files, for
 * polyak-consolidate (tools/). The model and settings come from rank 0's
 * file: they make a handle that is never finalized (it holds no shadows;
 * its params are addresses nothing backs, never read), against which every
 * file is checked as a load checks it, and whose header is the one
 * polyak_save of that model writes. The data streams through one block
 * buffer, every block verified: the shadows' sections of the files in rank
 * order are the tensors in registration order. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "polyak_math.h"
#include "safe_file.h"
#include "shard.h"

#define CONVERT_ELEMS 65536 /* a read-out's elements converted at a time */

static const char *text_of(json_t *metadata, const char *key)
{
  const char *text = json_string_value(json_object_get(metadata, key));
  return text ? text : "";
}

/* The settings a handle of the set had, from its metadata (checked again,
 * value by value, when each file is checked against the handle). */
static polyak_status config_of(polyak_t *p, const polyak_shard_file *f, polyak_config *cfg)
{
  json_t *m = f->metadata;
  int64_t num_shadows, zero_init, skip_nonfinite, lookahead_every;
  const char *dtype = text_of(m, "shadow_dtype");
  polyak_config_init(cfg);
  if (polyak_ckpt_parse_int64(text_of(m, "num_shadows"), &num_shadows) != 0 || num_shadows < 1 ||
      num_shadows > POLYAK_MAX_SHADOWS || polyak_ckpt_parse_uint64(text_of(m, "seed"), &cfg->seed) != 0 ||
      polyak_ckpt_parse_int64(text_of(m, "zero_init"), &zero_init) != 0 ||
      polyak_ckpt_parse_int64(text_of(m, "skip_nonfinite"), &skip_nonfinite) != 0 ||
      polyak_ckpt_parse_int64(text_of(m, "lookahead_every"), &lookahead_every) != 0 ||
      (strcmp(dtype, "F32") != 0 && strcmp(dtype, "BF16") != 0))
    return polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, f->where, "its settings are not a handle's");
  cfg->num_shadows = (int)num_shadows;
  cfg->shadow_dtype = strcmp(dtype, "F32") == 0 ? POLYAK_F32 : POLYAK_BF16;
  cfg->zero_init = (int)zero_init;
  cfg->skip_nonfinite = (int)skip_nonfinite;
  cfg->lookahead_every = lookahead_every;
  json_error_t error;
  json_t *list = json_loads(text_of(m, "schedules"), 0, &error);
  polyak_status status = json_is_array(list) && (int)json_array_size(list) == cfg->num_shadows
                             ? POLYAK_OK
                             : polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, f->where, "its schedules are not a list");
  for (int k = 0; k < cfg->num_shadows && status == POLYAK_OK; k++) {
    polyak_shadow_config *c = &cfg->shadows[k];
    polyak_schedule *s = &c->schedule;
    const char *kind = NULL, *rounding = "nearest";
    json_int_t ramp = 0, start = 0;
    if (json_unpack(json_array_get(list, (size_t)k), "{s:s, s:F, s:F, s:F, s:F, s:F, s:I, s:I, s?b, s?F, s?F, s?s}",
                    "kind", &kind, "beta", &s->beta, "beta_min", &s->beta_min, "inv_gamma", &s->inv_gamma, "power",
                    &s->power, "gamma", &s->gamma, "ramp_steps", &ramp, "start_step", &start, "count_updates",
                    &c->count_updates, "grad_norm_c", &c->grad_norm_c, "layerwise_beta0", &c->layerwise_beta0,
                    "rounding", &rounding) != 0 ||
        polyak_schedule_kind_from_name(kind) < 0)
      status = polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, f->where, "its schedule %d is not a schedule", k);
    s->kind = (polyak_schedule_kind)polyak_schedule_kind_from_name(kind ? kind : "");
    s->ramp_steps = ramp;
    s->start_step = start;
    c->rounding = strcmp(rounding, "stochastic") == 0 ? POLYAK_ROUND_STOCHASTIC : POLYAK_ROUND_NEAREST;
  }
  json_decref(list);
  return status;
}

/* A handle describing the set's model: its settings, and its tensors
 * registered in order with their param dtypes at addresses no memory
 * backs (the registry only checks that they do not overlap). */
static polyak_status describe(polyak_t *boot, const polyak_shard_file *f, polyak_t **out)
{
  polyak_config cfg;
  POLYAK_TRY(config_of(boot, f, &cfg));
  char why[POLYAK_ERROR_BYTES / 2];
  if (polyak_check_config(&cfg, why, sizeof why) != POLYAK_OK || polyak_create(out, &cfg) != POLYAK_OK)
    return polyak_ckpt_fail(boot, POLYAK_ERR_FORMAT, f->where, "its settings are not a handle's: %s", why);
  json_error_t error;
  json_t *tensors = json_loads(text_of(f->metadata, "tensors"), 0, &error), *entry;
  json_t *dtypes = json_loads(text_of(f->metadata, "param_dtypes"), 0, &error);
  json_t *copies = json_loads(
      f->metadata && json_object_get(f->metadata, "copies") ? text_of(f->metadata, "copies") : "[]", 0, &error);
  polyak_status status = json_is_array(tensors) && json_is_object(dtypes) && json_is_array(copies)
                             ? POLYAK_OK
                             : polyak_ckpt_fail(boot, POLYAK_ERR_FORMAT, f->where, "its tensor table is not one");
  uintptr_t address = 4096; /* the first page, never mapped */
  size_t n;
  json_array_foreach(tensors, n, entry)
  {
    const char *name = json_string_value(json_object_get(entry, "name"));
    json_t *shape = json_object_get(entry, "shape"), *copy;
    int64_t dims[POLYAK_MAX_NDIM] = {0}, num_elems = 1;
    int ndim = (int)json_array_size(shape), copy_only = 0, dtype = -1;
    for (int d = POLYAK_F32; d <= POLYAK_BOOL && name; d++)
      if (strcmp(text_of(dtypes, name), polyak_dtype_name((polyak_dtype)d)) == 0)
        dtype = d;
    size_t c;
    json_array_foreach(copies, c, copy) copy_only |=
        name && json_string_value(copy) && strcmp(json_string_value(copy), name) == 0;
    if (status != POLYAK_OK)
      break;
    if (!name || !json_is_array(shape) || ndim > POLYAK_MAX_NDIM || dtype < 0) {
      status = polyak_ckpt_fail(boot, POLYAK_ERR_FORMAT, f->where, "its tensor table is not one");
      break;
    }
    for (int d = 0; d < ndim; d++)
      num_elems *= dims[d] = json_integer_value(json_array_get(shape, (size_t)d));
    void *param = (void *)address;
    address += ((uintptr_t)num_elems * polyak_dtype_num_bytes((polyak_dtype)dtype) + 63) / 64 * 64;
    status = copy_only ? polyak_add_copy(*out, name, param, (polyak_dtype)dtype, ndim, dims)
                       : polyak_add(*out, name, param, (polyak_dtype)dtype, ndim, dims);
    if (status != POLYAK_OK)
      status = polyak_ckpt_fail(boot, status, f->where, "its tensor \"%.200s\": %s", name, polyak_last_error(*out));
  }
  json_decref(tensors);
  json_decref(dtypes);
  json_decref(copies);
  return status;
}

/* ---- the output ------------------------------------------------------------ */

typedef struct {
  polyak_t *p;
  polyak_safe_file *file;
  const char *function;
  XXH3_state_t *hash; /* NULL: not hashed */
  int64_t position;
  /* a read-out: shadow elements to dtype, times scale */
  int convert;
  polyak_dtype from, to;
  double scale;
  char *converted; /* CONVERT_ELEMS of `to` */
} output;

static polyak_status emit(output *o, const void *bytes, int64_t num_bytes)
{
  if (o->hash)
    XXH3_64bits_update(o->hash, bytes, (size_t)num_bytes);
  if (polyak_safe_file_pwrite(o->file, bytes, (size_t)num_bytes, o->position) != 0)
    return polyak_ckpt_fail(o->p, POLYAK_ERR_IO, o->function, "%s", o->file->error);
  o->position += num_bytes;
  return POLYAK_OK;
}

static polyak_status visit_output(void *arg, const void *bytes, int64_t offset, int64_t num_bytes)
{
  output *o = arg;
  (void)offset;
  if (!o->convert)
    return emit(o, bytes, num_bytes);
  int64_t num_elems = num_bytes / (int64_t)polyak_dtype_num_bytes(o->from);
  for (int64_t first = 0; first < num_elems; first += CONVERT_ELEMS) {
    int64_t n = num_elems - first < CONVERT_ELEMS ? num_elems - first : CONVERT_ELEMS;
    for (int64_t e = 0; e < n; e++) /* polyak_get_shadow's read-out, element by element */
      polyak_store_f32(o->converted, e, polyak_debias(polyak_load_f32(bytes, first + e, o->from), o->scale), o->to);
    POLYAK_TRY(emit(o, o->converted, n * (int64_t)polyak_dtype_num_bytes(o->to)));
  }
  return POLYAK_OK;
}

/* The header of the read-out of shadow `shadow`: the averaged tensors in
 * registration order as `dtype`, then the copy-only ones in their own. */
static char *readout_header(polyak_t *p, int shadow, polyak_dtype dtype, int64_t step, size_t *num_bytes)
{
  char text[32];
  json_t *root = json_object(), *metadata = json_object();
  int failed = !root || !metadata || json_object_set_new(root, "__metadata__", metadata) ||
               json_object_set_new(metadata, "format", json_string("pt"));
  snprintf(text, sizeof text, "%lld", (long long)step);
  failed = failed || json_object_set_new(metadata, "polyak_step", json_string(text));
  snprintf(text, sizeof text, "%d", shadow);
  failed = failed || json_object_set_new(metadata, "polyak_shadow", json_string(text));
  int64_t offset = 0;
  for (int pass = 0; pass < 2 && !failed; pass++)
    for (int i = 0; i < p->num_tensors && !failed; i++) {
      const polyak_tensor *t = &p->tensors[i];
      if (t->copy_only != pass)
        continue;
      polyak_dtype as = t->copy_only ? t->dtype : dtype;
      int64_t end = offset + t->num_elems * (int64_t)polyak_dtype_num_bytes(as);
      failed = json_object_set_new(root, t->name, polyak_ckpt_entry_json(t, as, offset, end));
      offset = end;
    }
  return polyak_ckpt_padded_text(root, failed, num_bytes);
}

/* Opens and checks rank r's file of the set against the model. */
static polyak_status open_checked(polyak_t *p, const char *dir, const polyak_shard_set *set, int r,
                                  const polyak_shard_file *first, polyak_shard_file *f, const char *function)
{
  polyak_shard_name name = {set->step, set->save_id, r, set->world_size};
  char *path = polyak_shard_path(dir, set, r);
  polyak_status status = path ? polyak_shard_open(p, path, &name, f, function)
                              : polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  free(path);
  if (status == POLYAK_OK)
    status = polyak_shard_check_model(p, f);
  if (status == POLYAK_OK && first)
    status = polyak_shard_check_same_set(p, first, f);
  if (status == POLYAK_OK && first && f->block_bytes != first->block_bytes)
    status = polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, f->where, "its blocks are of another size than rank 0's");
  return status;
}

/* Every file's shadow `k` section in rank order, then (copies) rank 0's copies. */
static polyak_status write_sections(polyak_t *p, const polyak_shard_set *set, polyak_shard_file *const *files, int k,
                                    int copies, void *buffer, output *o)
{
  polyak_status status = POLYAK_OK;
  for (int r = 0; r < (k >= 0 ? set->world_size : 1) && status == POLYAK_OK; r++) {
    polyak_shard_file *f = files[r];
    if (k >= 0)
      status = polyak_shard_read(p, f, polyak_shard_section(p, f, k), polyak_shard_section(p, f, k + 1), buffer,
                                 visit_output, o);
    if (status == POLYAK_OK && copies && r == 0)
      status = polyak_shard_read(p, f, polyak_shard_section(p, f, p->cfg.num_shadows), f->data_bytes, buffer,
                                 visit_output, o);
  }
  return status;
}

/* files: every rank's, open and checked (each opened once, and read
 * through its descriptor to the end: a save that removes the set meanwhile
 * takes nothing from the output). */
static polyak_status consolidate(polyak_t *p, const char *out, int shadow, polyak_dtype dtype,
                                 const polyak_shard_set *set, polyak_shard_file *const *files, const char *function)
{
  polyak_ckpt_state state = files[0]->state;
  state.nonfinite = 0;
  state.checksum = 0; /* the header is hashed with its digits as zeros */
  for (int r = 0; r < set->world_size; r++)
    state.nonfinite += files[r]->state.nonfinite;
  if (shadow >= p->cfg.num_shadows)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: the set has %d shadows; there is no shadow %d", function,
                       p->cfg.num_shadows, shadow);
  output o = {p, NULL, function, NULL, 0, shadow >= 0, p->cfg.shadow_dtype, dtype, 1.0, NULL};
  if (shadow >= 0 && p->cfg.zero_init) { /* polyak_get_shadow's debias */
    double mass = 1.0 - state.beta_prod[shadow];
    if (!(mass > 0.0))
      return polyak_fail(p, POLYAK_ERR_STATE, "%s: with zero_init, shadow %d has no average yet", function, shadow);
    o.scale = 1.0 / mass;
  }
  size_t header_bytes = 0;
  char *header = shadow >= 0 ? readout_header(p, shadow, dtype, state.step, &header_bytes)
                             : polyak_ckpt_header(p, &state, &header_bytes);
  void *buffer = malloc((size_t)files[0]->block_bytes);
  o.converted = malloc(CONVERT_ELEMS * sizeof(float));
  o.file = malloc(sizeof *o.file);
  o.hash = shadow < 0 ? XXH3_createState() : NULL;
  polyak_status status = POLYAK_OK;
  if (!header || !buffer || !o.converted || !o.file || (shadow < 0 && !o.hash))
    status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "%s: out of host memory", function);
  else if (polyak_safe_file_open(o.file, out) != 0) {
    status = polyak_fail(p, POLYAK_ERR_IO, "%s: %s", function, o.file->error);
    free(o.file);
    o.file = NULL;
  }
  uint8_t length[8];
  polyak_ckpt_length_prefix(header_bytes, length);
  if (o.hash)
    XXH3_64bits_reset(o.hash);
  if (status == POLYAK_OK)
    status = emit(&o, length, 8);
  if (status == POLYAK_OK)
    status = emit(&o, header, (int64_t)header_bytes); /* its checksum digits zeros */
  for (int k = shadow >= 0 ? shadow : 0; k < (shadow >= 0 ? shadow + 1 : p->cfg.num_shadows) && status == POLYAK_OK;
       k++)
    status = write_sections(p, set, files, k, 0, buffer, &o);
  int has_copies = 0;
  for (int i = 0; i < p->num_tensors; i++)
    has_copies |= p->tensors[i].copy_only;
  o.convert = 0; /* copies in their own dtype */
  if (status == POLYAK_OK && has_copies)
    status = write_sections(p, set, files, -1, 1, buffer, &o);
  if (status == POLYAK_OK && o.hash) { /* the same header with the checksum */
    state.checksum = XXH3_64bits_digest(o.hash);
    size_t final_bytes = 0;
    char *final = polyak_ckpt_header(p, &state, &final_bytes);
    if (!final || final_bytes != header_bytes)
      status = polyak_fail(p, POLYAK_ERR_NO_MEMORY, "%s: out of host memory", function);
    else if (polyak_safe_file_pwrite(o.file, final, final_bytes, 8) != 0)
      status = polyak_fail(p, POLYAK_ERR_IO, "%s: %s", function, o.file->error);
    free(final);
  }
  if (status == POLYAK_OK && polyak_safe_file_commit(o.file) != 0)
    status = polyak_fail(p, POLYAK_ERR_IO, "%s: %s", function, o.file->error);
  if (o.file)
    polyak_safe_file_abort(o.file);
  XXH3_freeState(o.hash);
  free(o.file);
  free(o.converted);
  free(buffer);
  free(header);
  return status;
}

polyak_status polyak_shards_consolidate(const char *dir, const char *out, int shadow, polyak_dtype dtype, char *msg,
                                        size_t msg_num_bytes)
{
  const char *function = "polyak-consolidate";
  polyak_config cfg;
  polyak_config_init(&cfg);
  polyak_t *boot = NULL, *model = NULL, *failed;
  if (polyak_create(&boot, &cfg) != POLYAK_OK)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_NO_MEMORY, "%s: out of host memory", function);
  failed = boot;
  polyak_shard_set set;
  polyak_shard_file first;
  memset(&first, 0, sizeof first);
  first.fd = -1;
  polyak_status status = polyak_shard_choose(boot, dir, 0, &set, function);
  if (status == POLYAK_OK) {
    char *path = polyak_shard_path(dir, &set, 0);
    polyak_shard_name name = {set.step, set.save_id, 0, set.world_size};
    status = path ? polyak_shard_open(boot, path, &name, &first, function)
                  : polyak_fail(boot, POLYAK_ERR_NO_MEMORY, "%s: out of host memory", function);
    free(path);
  }
  if (status == POLYAK_OK)
    status = describe(boot, &first, &model);
  if (status == POLYAK_OK) {
    failed = model;
    status = polyak_shard_check_model(model, &first);
  }
  if (status == POLYAK_OK && shadow >= 0 && !polyak_dtype_valid(dtype))
    status = polyak_fail(model, POLYAK_ERR_INVALID_ARG, "%s: a read-out is F32, BF16 or F16", function);
  /* every file opened once, rank 0's already */
  polyak_shard_file *opened = status == POLYAK_OK ? calloc((size_t)set.world_size, sizeof *opened) : NULL;
  polyak_shard_file **files = status == POLYAK_OK ? calloc((size_t)set.world_size, sizeof *files) : NULL;
  if (status == POLYAK_OK && (!opened || !files))
    status = polyak_fail(model, POLYAK_ERR_NO_MEMORY, "%s: out of host memory", function);
  for (int r = 0; opened && r < set.world_size; r++)
    opened[r].fd = -1;
  if (files)
    files[0] = &first;
  for (int r = 1; r < set.world_size && status == POLYAK_OK; r++) {
    files[r] = &opened[r];
    status = open_checked(model, dir, &set, r, &first, files[r], function);
  }
  if (status == POLYAK_OK)
    status = consolidate(model, out, shadow, dtype, &set, files, function);
  for (int r = 1; opened && r < set.world_size; r++)
    polyak_shard_close(&opened[r]);
  free(opened);
  free(files);
  if (status != POLYAK_OK)
    polyak_message(msg, msg_num_bytes, status, "%s", polyak_last_error(failed));
  polyak_shard_close(&first);
  polyak_destroy(model);
  polyak_destroy(boot);
  return status;
}
