/* checkpoint_write.c: the writer. One function, write_checkpoint, turns a
 * handle's shadows and state into checkpoint bytes for a sink: the header
 * (with a checksum placeholder), the data copied out of the arenas block by
 * block (or, sharded, gathered and written by rank 0), then the header
 * again with the checksum, which has the same length: the XXH3-64 of every
 * byte written before it, its own digits being zeros then. Its sinks: a
 * file replaced crash-safely (polyak_save, through safe_file.c), an open
 * file at its offset (polyak_save_fd) and a caller's buffer
 * (polyak_save_to_memory). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "checkpoint.h"
#include "safe_file.h"

/* Where a checkpoint's bytes go. Only the writing rank calls these: begin
 * with the checkpoint's size before any write; write_at with offsets from
 * the checkpoint's first byte; end once begun (ok: keep the bytes, else
 * abandon them). Each sets p's message when it fails. */
typedef struct sink sink;
struct sink {
  polyak_status (*begin)(sink *out, polyak_t *p, int64_t num_bytes);
  polyak_status (*write_at)(sink *out, polyak_t *p, const void *data, size_t num_bytes, int64_t offset);
  polyak_status (*end)(sink *out, polyak_t *p, int ok);
  const char *function; /* the public call, for messages */
};

/* The data on its way out: hashed, then written after the header. */
typedef struct {
  polyak_t *p;
  sink *out; /* NULL on a rank that does not write */
  int64_t position;
  XXH3_state_t *hash;
  void *buffer; /* host_buffer memory */
  size_t buffer_bytes;
} writer;

static polyak_status emit(writer *w, const void *data, size_t num_bytes)
{
  XXH3_64bits_update(w->hash, data, num_bytes);
  polyak_status status = w->out->write_at(w->out, w->p, data, num_bytes, w->position);
  w->position += (int64_t)num_bytes;
  return status;
}

/* The copy-only tensors' mirrors, after the shadows: whole on every rank,
 * so the writing rank's own, through the host buffer. */
static polyak_status write_copies(writer *w)
{
  polyak_t *p = w->p;
  polyak_status status = POLYAK_OK;
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++) {
    if (!p->tensors[i].copy_only)
      continue;
    const char *mirror = (const char *)p->copies + p->tensors[i].mirror_offset_bytes;
    size_t tensor_bytes = (size_t)polyak_ckpt_entry_bytes(p, i);
    for (size_t done = 0; done < tensor_bytes && status == POLYAK_OK;) {
      size_t n = tensor_bytes - done < w->buffer_bytes ? tensor_bytes - done : w->buffer_bytes;
      status = p->ops->copy_to_host(p, w->buffer, mirror + done, n);
      if (status == POLYAK_OK)
        status = emit(w, w->buffer, n);
      done += n;
    }
  }
  return status;
}

/* This rank's whole shadows, in file order, block by block. */
static polyak_status write_data(writer *w)
{
  polyak_t *p = w->p;
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t block_elems = (int64_t)(w->buffer_bytes / elem_bytes);
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    int i = 0;
    for (int64_t start = 0; start < p->arena_elems; start += block_elems) {
      int64_t count = p->arena_elems - start < block_elems ? p->arena_elems - start : block_elems;
      polyak_status status = p->ops->copy_to_host(
          p, w->buffer, (const char *)p->ops->arena(p, k) + start * (int64_t)elem_bytes, (size_t)count * elem_bytes);
      if (status != POLYAK_OK)
        return status;
      for (; i < p->num_tensors; i++) {
        int64_t lo, hi;
        if (!polyak_ckpt_is_saved(p, k, i)) /* no arena space either */
          continue;
        int goes_on = polyak_ckpt_slice_in_block(&p->descs[i], start, count, &lo, &hi);
        if (lo < hi) {
          status = emit(w, (const char *)w->buffer + (lo - start) * elem_bytes, (size_t)(hi - lo) * elem_bytes);
          if (status != POLYAK_OK)
            return status;
        }
        if (goes_on)
          break;
      }
    }
  }
  return write_copies(w);
}

/* Sharded: every rank gathers each shadow (one all-gather each) and rank 0
 * writes the tensors whole, in file order; w->out is NULL elsewhere. Every
 * rank makes every gather, whatever failed locally before: a rank that
 * left the sequence would leave the others waiting in NCCL. */
static polyak_status write_gathered(writer *w, polyak_status status)
{
  polyak_t *p = w->p;
  size_t elem_bytes = polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t largest = 1;
  for (int i = 0; i < p->num_tensors; i++)
    largest = p->tensors[i].num_elems > largest ? p->tensors[i].num_elems : largest;
  void *whole = w->out ? p->ops->scratch_alloc(p, (size_t)largest * elem_bytes) : NULL;
  if (status == POLYAK_OK && ((w->out && !whole) || !w->buffer))
    status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, w->out ? w->out->function : "saving",
                              "out of memory to gather the shadows");
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    void *gathered = NULL;
    polyak_status gathered_status = polyak_gather_arenas(p, k, &gathered, NULL);
    if (status == POLYAK_OK)
      status = gathered_status;
    for (int i = 0; i < p->num_tensors && w->out && status == POLYAK_OK; i++) {
      if (p->tensors[i].copy_only) /* after the shadows */
        continue;
      status = polyak_assemble(p, gathered, p->arena_alloc_elems, p->layouts + i, (size_t)p->num_tensors, 1.0, whole,
                               p->cfg.shadow_dtype, NULL);
      size_t tensor_bytes = (size_t)p->tensors[i].num_elems * elem_bytes;
      for (size_t done = 0; done < tensor_bytes && status == POLYAK_OK;) {
        size_t n = tensor_bytes - done < w->buffer_bytes ? tensor_bytes - done : w->buffer_bytes;
        status = p->ops->copy_to_host(p, w->buffer, (const char *)whole + done, n);
        if (status == POLYAK_OK)
          status = emit(w, w->buffer, n);
        done += n;
      }
    }
    if (gathered)
      p->ops->scratch_free(p, gathered);
  }
  if (whole)
    p->ops->scratch_free(p, whole);
  return status == POLYAK_OK && w->out ? write_copies(w) : status;
}

/* This rank's non-finite count summed over all ranks (through the same
 * all-gather: 8 bytes are 2 floats or 4 bf16 values to NCCL). `status` is
 * this rank's so far: the ranks agree before the all-gather. */
static polyak_status total_nonfinite(polyak_t *p, polyak_status status, int64_t local, int64_t *total,
                                     const char *function)
{
  int64_t count = 8 / (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int world = p->cfg.world_size;
  int64_t *all = malloc(sizeof *all * (size_t)world);
  void *send = p->ops->scratch_alloc(p, 8), *recv = p->ops->scratch_alloc(p, 8 * (size_t)world);
  if (status == POLYAK_OK && !(all && send && recv))
    status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of memory");
  polyak_status agreed = polyak_all_ready(p, status == POLYAK_OK, POLYAK_ERR_STATE, function);
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

/* The checkpoint of `p` into `out` (on the writing rank: every rank of an
 * unsharded handle, rank 0 of a gathering one); *num_bytes gets its size
 * there, 0 elsewhere. Collective when sharded. */
static polyak_status write_checkpoint(polyak_t *p, sink *out, int64_t *num_bytes)
{
  const char *function = out->function;
  int gathering = p->cfg.world_size > 1 || p->cfg.nccl_comm;
  if (gathering && (!p->cfg.nccl_comm || !p->ops->all_gather))
    return polyak_ckpt_fail(p, POLYAK_ERR_STATE, function,
                            "this rank holds a slice of the shadows (world_size %d); saving "
                            "gathers them over nccl_comm, which is not set",
                            p->cfg.world_size);
  int writing = !gathering || p->cfg.rank == 0;
  polyak_ckpt_state state = {.step = p->last_step};
  polyak_status status = polyak_refuse_open_shadows(p, function); /* a half-written state stays unsaved */
  if (status == POLYAK_OK)
    status = polyak_refresh_products(p); /* grad-norm shadows' products, from the device */
  if (status == POLYAK_OK)
    status = p->ops->nonfinite_count(p, &state.nonfinite); /* also waits for the device */
  if (gathering)                                           /* from here on every rank makes every collective */
    status = total_nonfinite(p, status, state.nonfinite, &state.nonfinite, function);
  if (status != POLYAK_OK && !gathering)
    return status;
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    state.beta_prod[k] = p->beta_prod[k];
    state.updates_counted[k] = p->updates_counted[k];
  }
  size_t header_bytes = 0;
  char *header = polyak_ckpt_header(p, &state, &header_bytes); /* checksum 0: filled in at the end */
  writer w = {p, NULL, 8 + (int64_t)header_bytes, XXH3_createState(), NULL, polyak_ckpt_block_bytes(p, 0)};
  if (header && w.hash)
    w.buffer = p->ops->host_buffer(p, w.buffer_bytes);
  if (!header || !w.hash || !w.buffer)
    status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  int64_t total = w.position + polyak_ckpt_data_bytes(p);
  int begun = 0;
  if (status == POLYAK_OK && writing) {
    status = out->begin(out, p, total);
    begun = status == POLYAK_OK;
  }
  uint8_t length[8];
  polyak_ckpt_length_prefix(header_bytes, length);
  if (begun && (status = out->write_at(out, p, length, 8, 0)) == POLYAK_OK)
    status = out->write_at(out, p, header, header_bytes, 8);
  if (w.hash) { /* the header as written, its checksum digits zeros */
    XXH3_64bits_reset(w.hash);
    XXH3_64bits_update(w.hash, length, 8);
    XXH3_64bits_update(w.hash, header ? header : "", header ? header_bytes : 0);
  }
  w.out = begun && status == POLYAK_OK ? out : NULL;
  if (gathering) /* the other ranks take part in the gathers only */
    status = write_gathered(&w, status);
  else if (status == POLYAK_OK)
    status = write_data(&w);
  if (status == POLYAK_OK && writing) { /* the same header with the real checksum: same length */
    state.checksum = XXH3_64bits_digest(w.hash);
    size_t final_bytes = 0;
    char *final_header = polyak_ckpt_header(p, &state, &final_bytes);
    if (!final_header || final_bytes != header_bytes)
      status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
    else
      status = out->write_at(out, p, final_header, final_bytes, 8);
    free(final_header);
  }
  if (begun) {
    polyak_status ended = out->end(out, p, status == POLYAK_OK);
    if (status == POLYAK_OK)
      status = ended;
  }
  if (gathering) { /* every rank returns the same verdict */
    char what[64];
    snprintf(what, sizeof what, "%s (rank 0 writes)", function);
    polyak_status agreed = polyak_all_ready(p, status == POLYAK_OK, POLYAK_ERR_IO, what);
    if (status == POLYAK_OK)
      status = agreed;
  }
  if (w.buffer)
    p->ops->free_host_buffer(p, w.buffer);
  XXH3_freeState(w.hash);
  free(header);
  if (status == POLYAK_OK && num_bytes)
    *num_bytes = writing ? total : 0;
  return status;
}

/* ---- polyak_save: a file replaced crash-safely ------------------------------ */

typedef struct {
  sink base;
  polyak_safe_file file;
  const char *path;
} file_sink;

static polyak_status file_begin(sink *out, polyak_t *p, int64_t num_bytes)
{
  file_sink *f = (file_sink *)out;
  (void)num_bytes;
  if (polyak_safe_file_open(&f->file, f->path) != 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, out->function, "%s", f->file.error);
  return POLYAK_OK;
}

static polyak_status file_write_at(sink *out, polyak_t *p, const void *data, size_t num_bytes, int64_t offset)
{
  file_sink *f = (file_sink *)out;
  if (polyak_safe_file_pwrite(&f->file, data, num_bytes, offset) != 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, out->function, "%s", f->file.error);
  return POLYAK_OK;
}

static polyak_status file_end(sink *out, polyak_t *p, int ok)
{
  file_sink *f = (file_sink *)out;
  if (ok && polyak_safe_file_commit(&f->file) == 0)
    return POLYAK_OK;
  polyak_status status = ok ? polyak_ckpt_fail(p, POLYAK_ERR_IO, out->function, "%s", f->file.error) : POLYAK_OK;
  polyak_safe_file_abort(&f->file);
  return status;
}

polyak_status polyak_save(polyak_t *p, const char *path)
{
  polyak_status status = polyak_ckpt_check_path(p, path, "polyak_save");
  if (status != POLYAK_OK)
    return status;
  file_sink *f = malloc(sizeof *f); /* polyak_safe_file holds paths: large */
  if (!f)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_save: out of host memory");
  f->base = (sink){file_begin, file_write_at, file_end, "polyak_save"};
  f->path = path;
  status = write_checkpoint(p, &f->base, NULL);
  free(f);
  return status;
}

/* ---- polyak_save_fd: an open file at its offset ------------------------------- */

typedef struct {
  sink base;
  int fd;
  int64_t offset, num_bytes; /* where the checkpoint starts, and its size */
} fd_sink;

static polyak_status fd_begin(sink *out, polyak_t *p, int64_t num_bytes)
{
  fd_sink *f = (fd_sink *)out;
  f->num_bytes = num_bytes;
  return polyak_ckpt_check_fd_for_writing(p, f->fd, &f->offset, out->function);
}

static polyak_status fd_write_at(sink *out, polyak_t *p, const void *data, size_t num_bytes, int64_t offset)
{
  const fd_sink *f = (const fd_sink *)out;
  const char *from = data;
  for (size_t done = 0; done < num_bytes;) {
    ssize_t written = pwrite(f->fd, from + done, num_bytes - done, (off_t)(f->offset + offset + (int64_t)done));
    if (written < 0 && errno == EINTR)
      continue;
    if (written <= 0)
      return polyak_ckpt_fail(p, POLYAK_ERR_IO, out->function, "cannot write to fd %d at offset %lld: %s", f->fd,
                              (long long)(f->offset + offset + (int64_t)done),
                              written < 0 ? strerror(errno) : "nothing written");
    done += (size_t)written;
  }
  return POLYAK_OK;
}

/* Written: the offset moves past the checkpoint. Not: it stays. */
static polyak_status fd_end(sink *out, polyak_t *p, int ok)
{
  const fd_sink *f = (const fd_sink *)out;
  if (ok && lseek(f->fd, (off_t)(f->offset + f->num_bytes), SEEK_SET) < 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, out->function, "cannot move the offset of fd %d: %s", f->fd,
                            strerror(errno));
  return POLYAK_OK;
}

polyak_status polyak_save_fd(polyak_t *p, int fd)
{
  polyak_status status = polyak_ckpt_check_handle(p, "polyak_save_fd");
  if (status != POLYAK_OK)
    return status;
  fd_sink f = {{fd_begin, fd_write_at, fd_end, "polyak_save_fd"}, fd, 0, 0};
  return write_checkpoint(p, &f.base, NULL);
}

/* ---- polyak_save_to_memory: a caller's buffer ---------------------------------- */

typedef struct {
  sink base;
  char *bytes;
  size_t capacity;
} memory_sink;

static polyak_status memory_begin(sink *out, polyak_t *p, int64_t num_bytes)
{
  const memory_sink *m = (const memory_sink *)out;
  if (!m->bytes)
    return polyak_ckpt_fail(p, POLYAK_ERR_INVALID_ARG, out->function, "dst is NULL");
  if ((uint64_t)num_bytes > (uint64_t)m->capacity)
    return polyak_ckpt_fail(p, POLYAK_ERR_INVALID_ARG, out->function,
                            "dst_num_bytes is %zu; this checkpoint takes %lld bytes (polyak_save_size says "
                            "how many always suffice)",
                            m->capacity, (long long)num_bytes);
  return POLYAK_OK;
}

static polyak_status memory_write_at(sink *out, polyak_t *p, const void *data, size_t num_bytes, int64_t offset)
{
  (void)p; /* begin checked the size */
  memcpy(((memory_sink *)out)->bytes + offset, data, num_bytes);
  return POLYAK_OK;
}

static polyak_status memory_end(sink *out, polyak_t *p, int ok)
{
  (void)out, (void)p, (void)ok;
  return POLYAK_OK;
}

polyak_status polyak_save_to_memory(polyak_t *p, void *dst, size_t dst_num_bytes, size_t *num_bytes_written)
{
  const char *function = "polyak_save_to_memory";
  polyak_status status = polyak_ckpt_check_handle(p, function);
  if (status != POLYAK_OK)
    return status;
  if (!num_bytes_written)
    return polyak_ckpt_fail(p, POLYAK_ERR_INVALID_ARG, function, "num_bytes_written is NULL");
  memory_sink m = {{memory_begin, memory_write_at, memory_end, function}, dst, dst_num_bytes};
  int64_t written = 0;
  status = write_checkpoint(p, &m.base, &written);
  if (status == POLYAK_OK)
    *num_bytes_written = (size_t)written;
  return status;
}

polyak_status polyak_save_size(polyak_t *p, size_t *num_bytes)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!num_bytes)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_save_size: num_bytes is NULL");
  POLYAK_TRY(polyak_require_finalized(p, "polyak_save_size"));
  polyak_ckpt_state widest;
  polyak_ckpt_widest_state(p, &widest);
  size_t header_bytes = 0;
  char *header = polyak_ckpt_header(p, &widest, &header_bytes);
  if (!header)
    return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "polyak_save_size: out of host memory");
  free(header);
  *num_bytes = 8 + header_bytes + (size_t)polyak_ckpt_data_bytes(p);
  return POLYAK_OK;
}

/* ---- polyak_checkpoint_reseal: a checksum for an edited header ---------------- */

polyak_status polyak_checkpoint_reseal(void *checkpoint, size_t num_bytes)
{
  char *bytes = checkpoint;
  uint64_t header_bytes = 0;
  if (!bytes)
    return POLYAK_ERR_INVALID_ARG;
  for (int b = 0; b < 8 && num_bytes >= 8; b++)
    header_bytes |= (uint64_t)(uint8_t)bytes[b] << (8 * b);
  if (num_bytes < 10 || header_bytes > num_bytes - 8)
    return POLYAK_ERR_FORMAT;
  json_t *root = json_loadb(bytes + 8, (size_t)header_bytes, JSON_REJECT_DUPLICATES, NULL);
  json_t *metadata = json_object_get(root, "__metadata__");
  const char *format = json_string_value(json_object_get(metadata, "format"));
  const char *version = json_string_value(json_object_get(metadata, "format_version"));
  int format_version = !format || strcmp(format, "polyak") != 0 ? 0
                       : version && strcmp(version, "1") == 0   ? 1
                       : version && strcmp(version, "2") == 0   ? 2
                                                                : 0;
  json_decref(root);
  char *digits = (char *)polyak_ckpt_find_checksum(bytes + 8, (size_t)header_bytes);
  if (format_version == 0 || !digits)
    return POLYAK_ERR_FORMAT;
  uint64_t checksum;
  if (format_version == 1) { /* the data's */
    checksum = XXH3_64bits(bytes + 8 + header_bytes, num_bytes - 8 - (size_t)header_bytes);
  } else { /* every byte, the digits read as zeros */
    memset(digits, '0', 16);
    checksum = XXH3_64bits(bytes, num_bytes);
  }
  char text[17];
  snprintf(text, sizeof text, "%016llx", (unsigned long long)checksum);
  memcpy(digits, text, 16);
  return POLYAK_OK;
}
