/* checkpoint.h: what the checkpoint code shares.
 *
 * A checkpoint is safetensors: an 8-byte little-endian header length, a
 * JSON header (padded with spaces to a multiple of 8 bytes), then one data
 * buffer with no holes. Shadow 0 of each tensor is stored under the
 * tensor's own name and shape in the shadow dtype, so PyTorch loads it
 * straight into a model; shadow k >= 1 as "polyak.shadow.<k>.<name>".
 * A copy-only tensor's one mirror is saved once, under its name in its own
 * dtype, after every shadow's data.
 * "__metadata__" (string values only, as safetensors requires) holds the
 * step state, the config to continue with, and a checksum: the XXH3-64 of
 * the checkpoint's bytes, its length prefix, header and padding included,
 * with the checksum's own 16 digits read as zeros (format 2; format 1, of
 * files written before, covered the data only).
 *
 *   checkpoint_meta.c   the layout: saved names, dtypes, data order, the header
 *                       text; the checks every save and load starts with
 *   checkpoint_keys.c   the metadata: every key written and checked
 *   checkpoint_write.c  the writer: shadows (gathered when sharded) to a sink
 *   checkpoint_read.c   the validating reader of a byte source
 *   checkpoint_source.c where a load reads: files (regular ones only, opened
 *                       without blocking), fds at an offset, pipes, memory
 *   checkpoint_stage.c  staging the checked data into fresh arenas; the commit */
#ifndef POLYAK_CHECKPOINT_H
#define POLYAK_CHECKPOINT_H

#include <jansson.h>
#include <stdint.h>

#include "polyak_internal.h"

#define POLYAK_CKPT_SHADOW_PREFIX "polyak.shadow."
#define POLYAK_CKPT_FORMAT        2              /* the format written; 1 and 2 are read */
#define POLYAK_SHARD_FORMAT       "polyak-shard" /* metadata "format" of one rank's shard file (shard.h) */

/* The checksum's place in a header: the 16 hex digits after the first
 * occurrence of this text (the writer puts "checksum" in "__metadata__",
 * and no other string can hold the text unescaped). */
#define POLYAK_CKPT_CHECKSUM_FIELD "\"checksum\":\"xxh3-64:"

/* The state a checkpoint carries besides the shadows. */
typedef struct {
  int64_t step, nonfinite;
  double beta_prod[POLYAK_MAX_SHADOWS];
  int64_t updates_counted[POLYAK_MAX_SHADOWS];
  uint64_t checksum;  /* format 2: of the whole checkpoint; format 1: of its data */
  int format_version; /* of a file read */
} polyak_ckpt_state;

/* Records "<function>: <message>" as p's last error; returns `status`. */
polyak_status polyak_ckpt_fail(polyak_t *p, polyak_status status, const char *function, const char *format, ...)
    __attribute__((format(printf, 4, 5)));

/* What every save and load asks of the handle: finalized, no graph steps
 * reserved (POLYAK_ERR_INVALID_ARG for NULL); and, but for a load, shadows
 * that no failed shard load left partly written (p->torn). */
polyak_status polyak_ckpt_check_handle(polyak_t *p, const char *function);
polyak_status polyak_ckpt_check_loadable(polyak_t *p, const char *function);

/* The same, and a path that is not NULL or empty. */
polyak_status polyak_ckpt_check_path(polyak_t *p, const char *path, const char *function);

/* *offset = fd's offset if the checkpoint can be written there at
 * positions: fd open for writing, seekable, and not O_APPEND (where Linux's
 * pwrite ignores the position). POLYAK_ERR_IO, saying why, otherwise.
 * (Loads check their fds in checkpoint_source.c: pipes are read in order.) */
polyak_status polyak_ckpt_check_fd_for_writing(polyak_t *p, int fd, int64_t *offset, const char *function);

/* ---- the header (checkpoint_meta.c) ---- */

/* 1 if shadow k of tensor i is saved: all but the caller's own shadows,
 * which are their model's weights, saved with it, and but a copy-only
 * tensor's shadows k >= 1 (its one mirror is saved as shadow 0). */
int polyak_ckpt_is_saved(const polyak_t *p, int k, int i);

/* The data buffer's order: each shadow's section (k = 0 .. num_shadows-1:
 * its saved slices of the averaged tensors), then the copy-only tensors'
 * mirrors (k = num_shadows), each in registration order. 1 if tensor i
 * has data in section k. */
int polyak_ckpt_in_data_order(const polyak_t *p, int k, int i);

/* One saved entry of tensor i: its dtype (the shadows', or a copy-only
 * tensor's own) and its bytes. */
polyak_dtype polyak_ckpt_entry_dtype(const polyak_t *p, int i);
int64_t polyak_ckpt_entry_bytes(const polyak_t *p, int i);

/* The name shadow k of tensor i is saved under (malloc'd; NULL: no memory). */
char *polyak_ckpt_saved_name(const polyak_t *p, int k, int i);

/* Bytes of the data buffer. */
int64_t polyak_ckpt_data_bytes(const polyak_t *p);

/* A state whose header is the longest any state's can be: the step and
 * counts as the longest int64 text, the products as the longest double. */
void polyak_ckpt_widest_state(const polyak_t *p, polyak_ckpt_state *state);

/* A safetensors header entry for tensor t: its dtype as `dtype`, its shape,
 * data_offsets [offset, end) (NULL: no memory). */
json_t *polyak_ckpt_entry_json(const polyak_tensor *t, polyak_dtype dtype, int64_t offset, int64_t end);

/* root as compact JSON in its insertion order, padded with spaces to a
 * multiple of 8 bytes (malloc'd; NULL where `failed` or out of memory);
 * root is released either way. */
char *polyak_ckpt_padded_text(json_t *root, int failed, size_t *num_bytes);

/* The header text for `state`, padded with spaces to a multiple of 8
 * bytes (malloc'd; NULL: no memory). Data: shadow by shadow, each in
 * registration order. */
char *polyak_ckpt_header(const polyak_t *p, const polyak_ckpt_state *state, size_t *num_bytes);

/* The 8-byte little-endian header length a checkpoint begins with. */
void polyak_ckpt_length_prefix(uint64_t header_bytes, uint8_t length[8]);

/* The first of the checksum's 16 digits in a header's text (num_bytes, not
 * NUL-terminated): after the first POLYAK_CKPT_CHECKSUM_FIELD; NULL if the
 * field is not there whole. */
const char *polyak_ckpt_find_checksum(const char *text, size_t num_bytes);

/* ---- the metadata (checkpoint_keys.c) ---- */

/* The metadata object of a checkpoint of p in `state` (NULL: no memory). */
json_t *polyak_ckpt_metadata(const polyak_t *p, const polyak_ckpt_state *state);

/* The metadata's form: an object of strings, a polyak file of a version
 * this library reads (*format_version), every required key there
 * (POLYAK_ERR_FORMAT). Its parts, for shard files: an object of strings;
 * the keys a checkpoint of format_version has. */
polyak_status polyak_ckpt_check_format(polyak_t *p, json_t *metadata, int *format_version, const char *function);
polyak_status polyak_ckpt_check_strings(polyak_t *p, json_t *metadata, const char *function);
polyak_status polyak_ckpt_check_keys(polyak_t *p, json_t *metadata, int format_version, const char *function);

/* A decimal integer in the one text the writer gives it ("0", "-12", never
 * "+12", "012", " 12"; no sign for the unsigned one): 0, else -1. */
int polyak_ckpt_parse_int64(const char *text, int64_t *out);
int polyak_ckpt_parse_uint64(const char *text, uint64_t *out);

/* The metadata's values: the state parsed into *state (its format_version
 * set: numbers are read from the one text the writer gives them), the config
 * and param dtypes against this handle's (POLYAK_ERR_MISMATCH). */
polyak_status polyak_ckpt_check_config(polyak_t *p, json_t *metadata, polyak_ckpt_state *state, const char *function);

/* ---- where a load reads from (checkpoint_read.c makes them) ---- */

typedef struct polyak_ckpt_source polyak_ckpt_source;
struct polyak_ckpt_source {
  /* num_bytes at `offset` from the checkpoint's first byte into dst */
  polyak_status (*read_at)(polyak_ckpt_source *src, polyak_t *p, void *dst, size_t num_bytes, int64_t offset);
  int64_t num_bytes;    /* from the checkpoint's first byte to the end of the file or buffer; -1: unknown */
  int whole;            /* 1: the checkpoint fills them exactly; 0: it ends where its header says */
  const char *function; /* the public call, for messages */
  char extent[96];      /* those bytes in words: "the 4096-byte file" */
};

/* Checks the checkpoint in `src` against the handle, then stages it (all
 * or nothing); *checkpoint_bytes gets its size (checkpoint_read.c). */
polyak_status polyak_ckpt_read(polyak_t *p, polyak_ckpt_source *src, int64_t *checkpoint_bytes);

/* ---- moving shadow bytes (checkpoint_stage.c) ---- */

/* Bytes of the host buffer that moves `num_bytes` of data: a block, or
 * less for a small model. */
size_t polyak_ckpt_block_bytes(const polyak_t *p, int64_t num_bytes);

/* Shadows move between the arenas and a host buffer in blocks of arena
 * elements; each block holds pieces of the tensors' slices (and padding,
 * which checkpoints skip). The part [*lo, *hi) of tensor t's kept slice
 * (arena positions) inside the block [start, start + count) (empty if
 * *lo >= *hi). Returns 1 if the slice goes on past the block, so the next
 * block starts with it. */
static inline int polyak_ckpt_slice_in_block(const polyak_tensor_desc *t, int64_t start, int64_t count, int64_t *lo,
                                             int64_t *hi)
{
  int64_t begin = t->shadow_offset_elems + t->local_first_elem, end = begin + t->local_num_elems;
  *lo = begin > start ? begin : start;
  *hi = end < start + count ? end : start + count;
  return end > start + count;
}

/* Replaces the shadows and step state with the checkpoint's, all or
 * nothing: each slice of shadow k of tensor i read from data offset
 * data_begin[k * num_tensors + i] (after data_start) into fresh arenas,
 * through `buffer` (host_buffer memory of buffer_bytes). */
polyak_status polyak_ckpt_stage(polyak_t *p, polyak_ckpt_source *src, int64_t data_start, const int64_t *data_begin,
                                const polyak_ckpt_state *state, void *buffer, size_t buffer_bytes);

#endif /* POLYAK_CHECKPOINT_H */
