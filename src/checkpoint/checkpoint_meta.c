/* checkpoint_meta.c: the checkpoint's layout, both ways: the names and
 * dtypes shadows are saved under, the data's order, the header text (its
 * metadata from checkpoint_keys.c); and the checks of the handle, path or
 * fd that every save and load starts with. */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"

#define FORMAT_ERROR(...) polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, function, __VA_ARGS__)
#define MISMATCH(...)     polyak_ckpt_fail(p, POLYAK_ERR_MISMATCH, function, __VA_ARGS__)

polyak_status polyak_ckpt_fail(polyak_t *p, polyak_status status, const char *function, const char *format, ...)
{
  char text[POLYAK_ERROR_BYTES];
  va_list args;
  va_start(args, format);
  vsnprintf(text, sizeof text, format, args);
  va_end(args);
  return polyak_fail(p, status, "%s: %s", function, text);
}

polyak_status polyak_ckpt_check_loadable(polyak_t *p, const char *function)
{
  POLYAK_TRY(polyak_require_loadable(p, function));
  if (p->graph_reserved)
    return polyak_ckpt_fail(p, POLYAK_ERR_STATE, function,
                            "steps are reserved for graph replays; call polyak_graph_release first");
  return POLYAK_OK;
}

polyak_status polyak_ckpt_check_handle(polyak_t *p, const char *function)
{
  POLYAK_TRY(polyak_ckpt_check_loadable(p, function));
  return polyak_require_finalized(p, function); /* and no torn shadows */
}

polyak_status polyak_ckpt_check_path(polyak_t *p, const char *path, const char *function)
{
  if (p && (!path || !path[0]))
    return polyak_ckpt_fail(p, POLYAK_ERR_INVALID_ARG, function, "path is %s", path ? "empty" : "NULL");
  return polyak_ckpt_check_handle(p, function);
}

polyak_status polyak_ckpt_check_fd_for_writing(polyak_t *p, int fd, int64_t *offset, const char *function)
{
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "fd %d: %s", fd, strerror(errno));
  if ((flags & O_ACCMODE) == O_RDONLY)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "fd %d is not open for writing", fd);
  if (flags & O_APPEND)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function,
                            "fd %d is open with O_APPEND, which writes only at the end: the header "
                            "cannot be completed after the data",
                            fd);
  off_t at = lseek(fd, 0, SEEK_CUR);
  if (at < 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function,
                            "fd %d has no offset (a pipe or a socket?): %s; a save completes its header after "
                            "its data, at positions",
                            fd, strerror(errno));
  *offset = (int64_t)at;
  return POLYAK_OK;
}

/* ---- names and small conversions ----------------------------------------- */

int polyak_ckpt_is_saved(const polyak_t *p, int k, int i)
{
  const polyak_tensor *t = &p->tensors[i];
  return t->copy_only ? k == 0 : !(k == 0 && t->owned);
}

int polyak_ckpt_in_data_order(const polyak_t *p, int k, int i)
{
  const polyak_tensor *t = &p->tensors[i];
  return k == p->cfg.num_shadows ? t->copy_only : !t->copy_only && polyak_ckpt_is_saved(p, k, i);
}

polyak_dtype polyak_ckpt_entry_dtype(const polyak_t *p, int i)
{
  return p->tensors[i].copy_only ? p->tensors[i].dtype : p->cfg.shadow_dtype;
}

int64_t polyak_ckpt_entry_bytes(const polyak_t *p, int i)
{
  return p->tensors[i].num_elems * (int64_t)polyak_dtype_num_bytes(polyak_ckpt_entry_dtype(p, i));
}

char *polyak_ckpt_saved_name(const polyak_t *p, int k, int i)
{
  const char *name = p->tensors[i].name;
  if (k == 0)
    return strdup(name);
  size_t n = strlen(POLYAK_CKPT_SHADOW_PREFIX) + 16 + strlen(name);
  char *out = malloc(n);
  if (out)
    snprintf(out, n, POLYAK_CKPT_SHADOW_PREFIX "%d.%s", k, name);
  return out;
}

int64_t polyak_ckpt_data_bytes(const polyak_t *p)
{
  int64_t num_bytes = 0;
  for (int k = 0; k < p->cfg.num_shadows; k++)
    for (int i = 0; i < p->num_tensors; i++)
      if (polyak_ckpt_is_saved(p, k, i))
        num_bytes += polyak_ckpt_entry_bytes(p, i);
  return num_bytes;
}

/* ---- the header: metadata and tensor entries ------------------------------------- */

void polyak_ckpt_length_prefix(uint64_t header_bytes, uint8_t length[8])
{
  for (int b = 0; b < 8; b++)
    length[b] = (uint8_t)(header_bytes >> (8 * b));
}

const char *polyak_ckpt_find_checksum(const char *text, size_t num_bytes)
{
  size_t field = strlen(POLYAK_CKPT_CHECKSUM_FIELD);
  for (size_t at = 0; at + field + 16 <= num_bytes; at++)
    if (memcmp(text + at, POLYAK_CKPT_CHECKSUM_FIELD, field) == 0)
      return text + at + field;
  return NULL;
}

void polyak_ckpt_widest_state(const polyak_t *p, polyak_ckpt_state *state)
{
  state->step = state->nonfinite = INT64_MIN;
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    state->beta_prod[k] = -DBL_MIN; /* "-2.2250738585072014e-308": no double's text is longer */
    state->updates_counted[k] = INT64_MIN;
  }
  state->checksum = 0; /* always 16 hex digits */
}

json_t *polyak_ckpt_entry_json(const polyak_tensor *t, polyak_dtype dtype, int64_t offset, int64_t end)
{
  json_t *shape = json_array();
  for (int d = 0; d < t->ndim && shape; d++)
    json_array_append_new(shape, json_integer(t->shape[d]));
  return json_pack("{s:s, s:o, s:[I,I]}", "dtype", polyak_dtype_name(dtype), "shape", shape, "data_offsets",
                   (json_int_t)offset, (json_int_t)end);
}

char *polyak_ckpt_padded_text(json_t *root, int failed, size_t *num_bytes)
{
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

char *polyak_ckpt_header(const polyak_t *p, const polyak_ckpt_state *state, size_t *num_bytes)
{
  json_t *root = json_object();
  json_t *metadata = polyak_ckpt_metadata(p, state);
  int failed = !root || !metadata || json_object_set_new(root, "__metadata__", metadata);
  int64_t offset = 0;
  for (int k = 0; k <= p->cfg.num_shadows && !failed; k++) /* in data order */
    for (int i = 0; i < p->num_tensors && !failed; i++) {
      const polyak_tensor *t = &p->tensors[i];
      if (!polyak_ckpt_in_data_order(p, k, i))
        continue;
      int64_t end = offset + polyak_ckpt_entry_bytes(p, i);
      json_t *entry = polyak_ckpt_entry_json(t, polyak_ckpt_entry_dtype(p, i), offset, end);
      char *name = polyak_ckpt_saved_name(p, k == p->cfg.num_shadows ? 0 : k, i);
      failed = !entry || !name || json_object_set_new(root, name, entry);
      free(name);
      offset = end;
    }
  return polyak_ckpt_padded_text(root, failed, num_bytes);
}
