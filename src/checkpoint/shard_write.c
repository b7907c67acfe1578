/* shard_write.c: polyak_save_shards. Each rank writes its own file of the
 * set, crash-safely (safe_file.c: the file appears whole under its name or
 * not at all), through one host buffer of a block: its slice of each
 * shadow, piece by piece out of the arenas, each block hashed as it goes
 * out, then the header again with the blocks' checksums and its own. Then
 * it removes the sets older than the newest complete one. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "safe_file.h"
#include "shard.h"

/* ---- the header --------------------------------------------------------------- */

char *polyak_shard_tensor_table(const polyak_t *p)
{
  json_t *list = json_array();
  for (int i = 0; i < p->num_tensors && list; i++) {
    const polyak_tensor *t = &p->tensors[i];
    json_t *shape = json_array();
    for (int d = 0; d < t->ndim && shape; d++)
      json_array_append_new(shape, json_integer(t->shape[d]));
    if (json_array_append_new(list, json_pack("{s:s, s:o}", "name", t->name, "shape", shape)) != 0)
      json_decref(list), list = NULL;
  }
  char *text = list ? json_dumps(list, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
  json_decref(list);
  return text;
}

static int set_number(json_t *metadata, const char *key, int64_t value)
{
  char text[32];
  snprintf(text, sizeof text, "%" PRId64, value);
  return json_object_set_new(metadata, key, json_string(text));
}

/* A JSON string value from malloc'd text (freed). */
static int set_owned(json_t *metadata, const char *key, char *text)
{
  int failed = !text || json_object_set_new(metadata, key, json_string(text));
  free(text);
  return failed;
}

static char *boundaries_text(const int64_t *boundaries, int world_size)
{
  size_t capacity = 3 + (size_t)(world_size + 1) * 21, used = 0;
  char *text = malloc(capacity);
  for (int r = 0; text && r <= world_size; r++)
    used += (size_t)snprintf(text + used, capacity - used, "%s%" PRId64, r ? "," : "[", boundaries[r]);
  if (text)
    snprintf(text + used, capacity - used, "]");
  return text;
}

char *polyak_shard_header(const polyak_t *p, const polyak_ckpt_state *state, uint64_t save_id, int rank, int world_size,
                          const int64_t *boundaries, int64_t block_bytes, const char *checksums, size_t *num_bytes)
{
  json_t *root = json_object(), *metadata = polyak_ckpt_metadata(p, state);
  char id[17];
  snprintf(id, sizeof id, "%016" PRIx64, save_id);
  int failed = !root || !metadata || json_object_set_new(root, "__metadata__", metadata) ||
               json_object_set_new(metadata, "format", json_string(POLYAK_SHARD_FORMAT)) ||
               set_number(metadata, "format_version", POLYAK_SHARD_FORMAT_VERSION) ||
               set_owned(metadata, "tensors", polyak_shard_tensor_table(p)) ||
               json_object_set_new(metadata, "save_id", json_string(id)) ||
               set_number(metadata, "world_size", world_size) || set_number(metadata, "rank", rank) ||
               set_owned(metadata, "boundaries", boundaries_text(boundaries, world_size)) ||
               set_number(metadata, "block_bytes", block_bytes) ||
               json_object_set_new(metadata, "block_checksums", json_string(checksums));
  int64_t elem_bytes = (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t section = (boundaries[rank + 1] - boundaries[rank]) * elem_bytes, offset = 0;
  for (int k = 0; k < p->cfg.num_shadows && !failed; k++, offset += section) {
    char name[32];
    snprintf(name, sizeof name, POLYAK_SHARD_DATA_PREFIX "%d", k);
    failed = json_object_set_new(root, name,
                                 json_pack("{s:s, s:[I], s:[I,I]}", "dtype", polyak_dtype_name(p->cfg.shadow_dtype),
                                           "shape", (json_int_t)(section / elem_bytes), "data_offsets",
                                           (json_int_t)offset, (json_int_t)(offset + section)));
  }
  for (int i = 0; i < p->num_tensors && rank == 0 && !failed; i++) { /* the copies, as polyak_save writes them */
    const polyak_tensor *t = &p->tensors[i];
    if (!t->copy_only)
      continue;
    int64_t end = offset + polyak_ckpt_entry_bytes(p, i);
    failed = json_object_set_new(root, t->name, polyak_ckpt_entry_json(t, t->dtype, offset, end));
    offset = end;
  }
  return polyak_ckpt_padded_text(root, failed, num_bytes);
}

/* ---- the data, block by block ---------------------------------------------- */

typedef struct {
  polyak_t *p;
  polyak_safe_file *file;
  const char *function;
  char *buffer; /* host_buffer memory of block_bytes */
  int64_t block_bytes, fill, data_start, block;
  char *checksums;                         /* 16 hex digits per block, after "xxh3-64:" */
  int64_t num_blocks, data_bytes, written; /* what the header says; what went out */
} block_writer;

static polyak_status flush_block(block_writer *w)
{
  if (w->fill == 0)
    return POLYAK_OK;
  if (w->block >= w->num_blocks) /* the checksums' room is the header's blocks */
    return polyak_ckpt_fail(w->p, POLYAK_ERR_STATE, w->function,
                            "the data runs past the %lld bytes the header says (a bug: the file is not written)",
                            (long long)w->data_bytes);
  char hex[17];
  snprintf(hex, sizeof hex, "%016llx", (unsigned long long)XXH3_64bits(w->buffer, (size_t)w->fill));
  memcpy(w->checksums + 16 * w->block, hex, 16);
  if (polyak_safe_file_pwrite(w->file, w->buffer, (size_t)w->fill, w->data_start + w->block * w->block_bytes) != 0)
    return polyak_ckpt_fail(w->p, POLYAK_ERR_IO, w->function, "%s", w->file->error);
  w->block++;
  w->written += w->fill;
  w->fill = 0;
  return POLYAK_OK;
}

/* num_bytes of backend memory at src, next in the data. */
static polyak_status put(block_writer *w, const char *src, int64_t num_bytes)
{
  while (num_bytes > 0) {
    int64_t n = w->block_bytes - w->fill < num_bytes ? w->block_bytes - w->fill : num_bytes;
    POLYAK_TRY(w->p->ops->copy_to_host(w->p, w->buffer + w->fill, src, (size_t)n));
    w->fill += n;
    src += n;
    num_bytes -= n;
    if (w->fill == w->block_bytes)
      POLYAK_TRY(flush_block(w));
  }
  return POLYAK_OK;
}

/* This rank's slice of every shadow (its pieces in registration order are
 * its range of the flattened space), then rank 0's copies. */
static polyak_status write_data(block_writer *w)
{
  polyak_t *p = w->p;
  int64_t elem_bytes = (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  for (int k = 0; k < p->cfg.num_shadows; k++)
    for (int i = 0; i < p->num_tensors; i++)
      if (!p->tensors[i].copy_only && p->descs[i].local_num_elems > 0)
        POLYAK_TRY(put(w, polyak_local_slice(p, k, i, NULL), p->descs[i].local_num_elems * elem_bytes));
  for (int i = 0; i < p->num_tensors && p->cfg.rank == 0; i++)
    if (p->tensors[i].copy_only)
      POLYAK_TRY(put(w, (const char *)p->copies + p->tensors[i].mirror_offset_bytes, polyak_ckpt_entry_bytes(p, i)));
  POLYAK_TRY(flush_block(w));
  if (w->written != w->data_bytes)
    return polyak_ckpt_fail(p, POLYAK_ERR_STATE, w->function,
                            "%lld data bytes went out, the header says %lld (a bug: the file is not written)",
                            (long long)w->written, (long long)w->data_bytes);
  return POLYAK_OK;
}

/* ---- the save id ------------------------------------------------------------- */

/* What every rank computes alike and another save would not: the step,
 * the model, the settings, and the first bytes of every averaged param
 * (the ranks of a sharded handle hold the same params), read through the
 * host buffer. */
static polyak_status save_id_of(polyak_t *p, int64_t step, void *buffer, uint64_t *save_id)
{
  char *table = polyak_shard_tensor_table(p);
  if (!table)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_save_shards: out of host memory");
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, "polyak shard save", 17);
  XXH3_64bits_update(&state, &step, sizeof step);
  XXH3_64bits_update(&state, table, strlen(table));
  free(table);
  const polyak_config *c = &p->cfg;
  XXH3_64bits_update(&state, &c->num_shadows, sizeof c->num_shadows);
  XXH3_64bits_update(&state, &c->shadow_dtype, sizeof c->shadow_dtype);
  XXH3_64bits_update(&state, &c->seed, sizeof c->seed);
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    XXH3_64bits_update(&state, &t->dtype, sizeof t->dtype);
    XXH3_64bits_update(&state, &t->copy_only, sizeof t->copy_only);
    int64_t sample = t->num_elems * (int64_t)polyak_dtype_num_bytes(t->dtype);
    sample = sample < POLYAK_SHARD_PARAM_SAMPLE ? sample : POLYAK_SHARD_PARAM_SAMPLE;
    if (t->copy_only || sample == 0) /* buffers may differ across ranks (BatchNorm statistics) */
      continue;
    POLYAK_TRY(p->ops->copy_to_host(p, buffer, t->param, (size_t)sample));
    XXH3_64bits_update(&state, buffer, (size_t)sample);
  }
  *save_id = XXH3_64bits_digest(&state);
  return POLYAK_OK;
}

/* ---- polyak_save_shards ------------------------------------------------------------ */

polyak_status polyak_shard_agree(polyak_t *p, polyak_status status, polyak_status status_if_not, const char *what)
{
  if (!p->cfg.nccl_comm)
    return status;
  int all = 0;
  polyak_status agreed = p->ops->agree(p, status == POLYAK_OK, &all);
  if (status != POLYAK_OK || agreed != POLYAK_OK)
    return status != POLYAK_OK ? status : agreed;
  return all ? POLYAK_OK : polyak_fail(p, status_if_not, "%s: another rank failed (its own error says why)", what);
}

polyak_status polyak_shard_compare(polyak_t *p, polyak_status status, uint64_t value, int *other)
{
  *other = -1;
  if (!p->cfg.nccl_comm)
    return status;
  polyak_status compared = p->ops->compare(p, status == POLYAK_OK ? value : 0, other);
  return status != POLYAK_OK ? status : compared;
}

polyak_status polyak_shard_check_call(polyak_t *p, const char *dir, const char *function, int load, int *may_agree)
{
  *may_agree = 0;
  polyak_status status = load ? polyak_ckpt_check_loadable(p, function) : polyak_ckpt_check_handle(p, function);
  if (!p || !p->finalized)
    return status;
  POLYAK_TRY(polyak_refuse_during_capture(p, NULL, 0, function)); /* it waits for the device */
  *may_agree = 1;
  POLYAK_TRY(status);
  if (!dir || !dir[0])
    return polyak_ckpt_fail(p, POLYAK_ERR_INVALID_ARG, function, "dir is %s", dir ? "empty" : "NULL");
  for (int i = 0; i < p->num_tensors; i++)
    if (p->tensors[i].owned)
      return polyak_ckpt_fail(p, POLYAK_ERR_UNSUPPORTED, function,
                              "tensor \"%.200s\" has its shadow in the caller's memory, which shard files leave no "
                              "room for; save with polyak_save",
                              p->tensors[i].name);
  struct stat st;
  if (stat(dir, &st) != 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "cannot open the directory %s: %s", dir, strerror(errno));
  if (!S_ISDIR(st.st_mode))
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "%s is not a directory", dir);
  return POLYAK_OK;
}

/* A complete set newer than this save (another run's, or one this handle
 * did not load) would stay the one loads take: refused. So is a complete
 * set of this step from another save (another save id): two independent
 * handles saving into one directory (each FSDP rank's own world_size 1
 * handle, say), whose sets no load could tell apart. */
static polyak_status check_no_other_set(polyak_t *p, const char *dir, int64_t step, uint64_t save_id,
                                        const char *function)
{
  polyak_shard_set *sets = NULL;
  int num_sets = 0;
  POLYAK_TRY(polyak_shard_sets(p, dir, &sets, &num_sets, function));
  int newest = polyak_shard_newest(sets, num_sets, p->cfg.world_size, NULL), same_step = -1;
  for (int s = 0; s < num_sets && same_step < 0; s++)
    if (sets[s].first_missing < 0 && sets[s].step == step && sets[s].save_id != save_id)
      same_step = s;
  polyak_status status = POLYAK_OK;
  if (newest >= 0 && sets[newest].step > step) {
    char *path = polyak_shard_path(dir, &sets[newest], 0);
    status = polyak_ckpt_fail(p, POLYAK_ERR_STATE, function,
                              "%s holds a complete set of step %lld (%s, ...), after this handle's step %lld: "
                              "another run's, or one this handle did not load (polyak_load_shards it, or save "
                              "into another directory)",
                              dir, (long long)sets[newest].step, path ? path : "", (long long)step);
    free(path);
  } else if (same_step >= 0) {
    polyak_shard_set mine = {step, save_id, p->cfg.world_size, 0, -1};
    char *theirs = polyak_shard_path(dir, &sets[same_step], 0), *ours = polyak_shard_path(dir, &mine, p->cfg.rank);
    status = polyak_ckpt_fail(p, POLYAK_ERR_STATE, function,
                              "%s holds a complete set of step %lld from another save (%s, ...) than this one (%s): "
                              "two handles saving into one directory, whose sets no load could tell apart; give "
                              "each independent handle (each FSDP rank's own, say) its own directory",
                              dir, (long long)step, theirs ? theirs : "", ours ? ours : "");
    free(theirs);
    free(ours);
  }
  free(sets);
  return status;
}

/* Writes this rank's file; *path gets its name. */
static polyak_status write_file(polyak_t *p, const char *dir, polyak_ckpt_state *state, uint64_t save_id,
                                const int64_t *boundaries, void *buffer, const char *function)
{
  int rank = p->cfg.rank, world = p->cfg.world_size;
  int64_t elem_bytes = (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t data_bytes = p->cfg.num_shadows * (boundaries[rank + 1] - boundaries[rank]) * elem_bytes;
  for (int i = 0; i < p->num_tensors && rank == 0; i++)
    data_bytes += p->tensors[i].copy_only ? polyak_ckpt_entry_bytes(p, i) : 0;
  int64_t block_bytes = polyak_shard_block_bytes(p);
  int64_t num_blocks = (data_bytes + block_bytes - 1) / block_bytes;
  polyak_shard_set set = {state->step, save_id, world, 0, 0};
  char *path = polyak_shard_path(dir, &set, rank), *checksums = malloc(9 + 16 * (size_t)num_blocks);
  polyak_safe_file *file = malloc(sizeof *file); /* it holds paths: large */
  size_t header_bytes = 0;
  char *header = NULL;
  if (checksums) {
    memcpy(checksums, "xxh3-64:", 8);
    memset(checksums + 8, '0', 16 * (size_t)num_blocks);
    checksums[8 + 16 * num_blocks] = '\0';
    header = polyak_shard_header(p, state, save_id, rank, world, boundaries, block_bytes, checksums, &header_bytes);
  }
  polyak_status status = POLYAK_OK;
  if (!path || !file || !header)
    status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  else if (polyak_safe_file_open(file, path) != 0)
    status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "%s", file->error);
  int opened = status == POLYAK_OK;
  uint8_t length[8];
  polyak_ckpt_length_prefix(header_bytes, length);
  if (status == POLYAK_OK &&
      (polyak_safe_file_pwrite(file, length, 8, 0) != 0 || polyak_safe_file_pwrite(file, header, header_bytes, 8) != 0))
    status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "%s", file->error);
  block_writer w = {
      p,          file,       function, buffer, block_bytes, 0, 8 + (int64_t)header_bytes, 0, checksums + 8,
      num_blocks, data_bytes, 0};
  if (status == POLYAK_OK)
    status = write_data(&w);
  char *final = NULL;
  size_t final_bytes = 0;
  if (status == POLYAK_OK) { /* the same length: only digits change */
    final = polyak_shard_header(p, state, save_id, rank, world, boundaries, block_bytes, checksums, &final_bytes);
    char *digits = final && final_bytes == header_bytes ? (char *)polyak_ckpt_find_checksum(final, final_bytes) : NULL;
    if (!digits)
      status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
    else {
      XXH3_state_t hash;
      XXH3_INITSTATE(&hash);
      XXH3_64bits_reset(&hash);
      XXH3_64bits_update(&hash, length, 8);
      XXH3_64bits_update(&hash, final, final_bytes); /* its digits are zeros now */
      char hex[17];
      snprintf(hex, sizeof hex, "%016llx", (unsigned long long)XXH3_64bits_digest(&hash));
      memcpy(digits, hex, 16);
      if (polyak_safe_file_pwrite(file, final, final_bytes, 8) != 0)
        status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "%s", file->error);
    }
  }
  if (status == POLYAK_OK && polyak_safe_file_commit(file) != 0)
    status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "%s", file->error);
  if (opened)
    polyak_safe_file_abort(file); /* closes what commit left open; a committed file stays */
  free(final);
  free(header);
  free(checksums);
  free(file);
  free(path);
  return status;
}

polyak_status polyak_save_shards(polyak_t *p, const char *dir)
{
  const char *function = "polyak_save_shards";
  int may_agree;
  polyak_status status = polyak_shard_check_call(p, dir, function, 0, &may_agree);
  if (!may_agree) /* no state to agree with (a NULL handle, a capture under way) */
    return status;
  polyak_ckpt_state state = {.step = p->last_step};
  if (status == POLYAK_OK) /* a half-written state stays unsaved */
    status = polyak_refuse_open_shadows(p, function);
  if (status == POLYAK_OK)
    status = polyak_refresh_products(p); /* grad-norm shadows' products, from the device */
  if (status == POLYAK_OK)
    status = p->ops->nonfinite_count(p, &state.nonfinite); /* also waits for the device */
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    state.beta_prod[k] = p->beta_prod[k];
    state.updates_counted[k] = p->updates_counted[k];
  }
  int world = p->cfg.world_size;
  int64_t *boundaries = malloc(((size_t)world + 1) * sizeof *boundaries);
  void *buffer = status == POLYAK_OK ? p->ops->host_buffer(p, (size_t)polyak_shard_block_bytes(p)) : NULL;
  if (status == POLYAK_OK && (!boundaries || !buffer))
    status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  for (int r = 0; r <= world && status == POLYAK_OK; r++)
    boundaries[r] = polyak_shard_begin(p, world, r);
  uint64_t save_id = 0;
  if (status == POLYAK_OK)
    status = save_id_of(p, state.step, buffer, &save_id);
  int other = -1; /* with a communicator: a rank whose save id differs, whose file would never join this set */
  status = polyak_shard_compare(p, status, save_id, &other);
  if (status == POLYAK_OK && other >= 0)
    status = polyak_ckpt_fail(p, POLYAK_ERR_MISMATCH, function,
                              "rank %d's save id is not this rank's (%016llx): the ranks hold different params (or "
                              "rank %d failed), and their files would never form one set; every rank of a sharded "
                              "handle registers the same params",
                              other, (unsigned long long)save_id, other);
  if (status == POLYAK_OK)
    status = check_no_other_set(p, dir, state.step, save_id, function);
  if (status == POLYAK_OK)
    status = write_file(p, dir, &state, save_id, boundaries, buffer, function);
  if (status == POLYAK_OK) { /* older sets go once a newer one is complete (perhaps by this file) */
    polyak_shard_set *sets = NULL;
    int num_sets = 0;
    if (polyak_shard_sets(p, dir, &sets, &num_sets, function) == POLYAK_OK) {
      int newest = polyak_shard_newest(sets, num_sets, world, NULL);
      if (newest >= 0)
        polyak_shard_remove_before(dir, sets[newest].step);
    }
    free(sets);
  }
  if (buffer)
    p->ops->free_host_buffer(p, buffer);
  free(boundaries);
  return polyak_shard_agree(p, status, POLYAK_ERR_IO, function);
}
