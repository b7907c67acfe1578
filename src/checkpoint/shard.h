/* shard.h: checkpoint shards, what polyak_save_shards, polyak_load_shards
 * and polyak-consolidate share (docs/scale.md).
 *
 * A save writes one file per rank into a directory, each holding only that
 * rank's slice of the flattened parameter space (every shadow's), named
 *
 *   polyak-step<step>-<save id>-rank<r>-of<W>.safetensors
 *
 * The W files of one save form a set: the same step, save id and W. The
 * save id (16 hex digits) is the same on every rank without any exchange:
 * an XXH3-64 of the step, the model and a sample of the params, which every
 * rank of a sharded handle holds alike. A load takes the newest complete
 * set (shard_dir.c); a save removes only sets older than the newest complete
 * one. No locks, no process ids: each rank writes its own name.
 *
 * Each file is safetensors: "polyak.shard.<k>", shadow k's slice as one
 * flat tensor of the shadow dtype, for k = 0 .. num_shadows - 1, then in
 * rank 0's file the copy-only tensors under their names (as polyak_save
 * writes them). "__metadata__" holds what a polyak_save checkpoint holds
 * (format "polyak-shard" instead, the rank's own non-finite count), the
 * tensor table ("tensors": names and shapes in registration order), every
 * rank's range ("boundaries": W + 1 flat element indices), the save id,
 * and the checksums: one XXH3-64 per block of block_bytes of the data
 * ("block_checksums"), and "checksum", the XXH3-64 of the length prefix
 * and the header with its own 16 digits read as zeros. A reader checks
 * the header whole and every block it reads, before the handle changes.
 *
 *   shard_dir.c          names, the sets in a directory, the set a load takes
 *   shard_read.c         opening and checking a file; reads checked block by block
 *   shard_write.c        the header text; polyak_save_shards
 *   shard_load.c         polyak_load_shards
 *   shard_consolidate.c  one file from a set (polyak-consolidate) */
#ifndef POLYAK_SHARD_H
#define POLYAK_SHARD_H

#include "checkpoint.h"

#ifdef __cplusplus
extern "C" { /* the tests call the names' functions */
#endif

#define POLYAK_SHARD_FORMAT_VERSION  1
#define POLYAK_SHARD_BLOCK_BYTES     ((int64_t)4 << 20)  /* what saves write */
#define POLYAK_SHARD_MIN_BLOCK_BYTES ((int64_t)4 << 10)  /* what loads take: 4 KiB .. 64 MiB, */
#define POLYAK_SHARD_MAX_BLOCK_BYTES ((int64_t)64 << 20) /* a multiple of 4 KiB */
#define POLYAK_SHARD_DATA_PREFIX     "polyak.shard."
#define POLYAK_SHARD_PARAM_SAMPLE    64 /* bytes of each averaged tensor in the save id */
#define POLYAK_SHARD_NAME_BYTES      128
#define POLYAK_SHARD_MAX_KEPT        256 /* files a load keeps open between its passes (shard_load.c) */

/* ---- names and sets (shard_dir.c) ---- */

typedef struct {
  int64_t step;
  uint64_t save_id;
  int rank, world_size;
} polyak_shard_name;

/* 0 if `name` is a shard file's name, in the one text the writer gives it
 * (no leading zeros, lowercase hex), with rank < world_size; else -1. */
int polyak_shard_parse_name(const char *name, polyak_shard_name *out);
void polyak_shard_format_name(const polyak_shard_name *name, char out[POLYAK_SHARD_NAME_BYTES]);

/* One save's files found in a directory. */
typedef struct {
  int64_t step;
  uint64_t save_id;
  int world_size;
  int num_present;   /* ranks whose file is there */
  int first_missing; /* the lowest rank without its file; -1: complete */
} polyak_shard_set;

/* Every set in `dir` (*sets malloc'd, sorted by step, save id, world size;
 * free() it). POLYAK_ERR_IO if dir cannot be read. */
polyak_status polyak_shard_sets(polyak_t *p, const char *dir, polyak_shard_set **sets, int *num_sets,
                                const char *function);

/* The set a load takes: of the complete sets, those of the highest step;
 * among them one of `world_size` (the loader's) if any, then the lowest
 * save id, then the fewest ranks; the same on every rank that lists the same files. -1 if no set is
 * complete. *rival (if not NULL): a complete set of the same step with
 * another save id (-1: none), which makes the choice ambiguous: two
 * independent handles (each FSDP rank's own, say) saved into one
 * directory, and which is whose no name can tell. */
int polyak_shard_newest(const polyak_shard_set *sets, int num_sets, int world_size, int *rival);

/* The set a load of world size `world_size` takes from `dir` (0: any),
 * or the reason there is none: no shard files, no complete set (naming the
 * newest incomplete set's first missing file), or two complete sets of the
 * newest step from different saves (POLYAK_ERR_STATE, naming both). */
polyak_status polyak_shard_choose(polyak_t *p, const char *dir, int world_size, polyak_shard_set *chosen,
                                  const char *function);

/* "<dir>/<file name of rank `rank` of `set`>" (malloc'd; NULL: no memory). */
char *polyak_shard_path(const char *dir, const polyak_shard_set *set, int rank);

/* Removes every shard file in `dir` of a step before `step`; returns how
 * many (a file another rank removed first is not counted). */
int polyak_shard_remove_before(const char *dir, int64_t step);

/* ---- one file, checked (shard_read.c) ---- */

typedef struct {
  char *path;
  polyak_shard_name name;
  int fd;
  char where[POLYAK_ERROR_BYTES / 2]; /* "<function>: <path>", every message's start */
  json_t *root;                       /* the header, parsed */
  json_t *metadata;
  polyak_ckpt_state state; /* its step state; nonfinite: this rank's count */
  uint64_t header_checksum;
  int64_t data_start;  /* 8 + the header's length */
  int64_t data_bytes;  /* the data: num_shadows sections of slice_elems, then (rank 0) the copies */
  int64_t slice_elems; /* this file's rank's elements in each shadow */
  int64_t *boundaries; /* [world_size + 1]: rank r holds flat elements [b[r], b[r + 1]) */
  int64_t block_bytes;
  const char *block_checksums; /* 16 hex digits per block, inside metadata */
} polyak_shard_file;

/* Opens `path` (a regular file, without blocking), reads its header and
 * checks it alone: safetensors, a shard file of a format this library
 * reads, the header checksum, the keys, the name's step, save id, rank and
 * world size, the boundaries, the data's entries and the file's length.
 * Messages begin with "<function>: <path>". polyak_shard_close it, also on
 * failure. */
polyak_status polyak_shard_open(polyak_t *p, const char *path, const polyak_shard_name *name, polyak_shard_file *f,
                                const char *function);

/* The opened file against the handle: its model (tensor names, shapes,
 * order), config and param dtypes (POLYAK_ERR_MISMATCH, naming what
 * differs), and the copy-only tensors' entries in rank 0's file. */
polyak_status polyak_shard_check_model(polyak_t *p, polyak_shard_file *f);

/* `other`, of the same set, against `first`: the same boundaries and step
 * state (POLYAK_ERR_FORMAT, naming `other`). */
polyak_status polyak_shard_check_same_set(polyak_t *p, const polyak_shard_file *first, const polyak_shard_file *other);

void polyak_shard_close(polyak_shard_file *f);

/* Reads the data bytes [begin, end) of the file through `buffer`
 * (block_bytes of host memory), block by block: each block whole, its
 * checksum verified, then visit(arg, bytes, offset, num_bytes) with the
 * part of [begin, end) in it (visit NULL: verify only). A block that does
 * not match its checksum fails with POLYAK_ERR_FORMAT naming the file. */
typedef polyak_status (*polyak_shard_visit)(void *arg, const void *bytes, int64_t offset, int64_t num_bytes);
polyak_status polyak_shard_read(polyak_t *p, polyak_shard_file *f, int64_t begin, int64_t end, void *buffer,
                                polyak_shard_visit visit, void *arg);

/* Data offsets in a file: shadow k's section; copy-only tensor i's entry
 * in rank 0's (-1 for a tensor that is not copy-only). */
int64_t polyak_shard_section(const polyak_t *p, const polyak_shard_file *f, int k);
int64_t polyak_shard_copy_offset(const polyak_t *p, const polyak_shard_file *f, int i);

/* ---- the calls (shard_write.c) ---- */

/* The blocks a save of p writes: POLYAK_SHARD_BLOCK_BYTES, unless a test
 * set p->shard_block_bytes. */
static inline int64_t polyak_shard_block_bytes(const polyak_t *p)
{
  return p->shard_block_bytes > 0 ? p->shard_block_bytes : POLYAK_SHARD_BLOCK_BYTES;
}

/* What polyak_save_shards (load 0) and polyak_load_shards (1) ask first:
 * a handle a save or a load can use, no capture under way (then
 * *may_agree = 1: the call's failures are agreed on), a directory, no
 * caller's shadows. */
polyak_status polyak_shard_check_call(polyak_t *p, const char *dir, const char *function, int load, int *may_agree);

/* `status`, or with a communicator POLYAK_OK only if every rank's is:
 * status_if_not where another rank failed (a collective; without a
 * communicator each rank decides alone). */
polyak_status polyak_shard_agree(polyak_t *p, polyak_status status, polyak_status status_if_not, const char *what);

/* With a communicator, a rank whose `value` differs from this rank's
 * (*other; -1: none), from a collective issued whatever `status` (a rank
 * that failed before sends 0); returns `status`, or the comparison's
 * failure. Without one *other = -1: each rank decides alone. */
polyak_status polyak_shard_compare(polyak_t *p, polyak_status status, uint64_t value, int *other);

/* ---- the header (shard_write.c) ---- */

/* The header text of rank `rank`'s file (padded with spaces to 8 bytes;
 * malloc'd, NULL: no memory): `checksums` is the text of
 * "block_checksums", state->checksum the header's. */
char *polyak_shard_header(const polyak_t *p, const polyak_ckpt_state *state, uint64_t save_id, int rank, int world_size,
                          const int64_t *boundaries, int64_t block_bytes, const char *checksums, size_t *num_bytes);

/* "[{"name":...,"shape":[...]},...]": the tensor table (malloc'd). */
char *polyak_shard_tensor_table(const polyak_t *p);

/* ---- one file from a set (shard_consolidate.c) ---- */

/* The newest complete set in `dir` as one file `out`, written crash-safely
 * with bounded memory: with shadow < 0 the checkpoint polyak_save writes of
 * an unsharded handle in that state; else shadow `shadow` of every tensor
 * read out as polyak_get_shadow gives it (debiased, as `dtype`, rounded to
 * nearest even), copy-only tensors in their own dtype, under the model's
 * names, for safetensors.torch.load_file. The reason of a failure goes to
 * msg. */
polyak_status polyak_shards_consolidate(const char *dir, const char *out, int shadow, polyak_dtype dtype, char *msg,
                                        size_t msg_num_bytes);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_SHARD_H */
