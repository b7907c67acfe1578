/* polyak_internal.h: the handle and the pieces of the library that share it. */
#ifndef POLYAK_INTERNAL_H
#define POLYAK_INTERNAL_H

#include <stdint.h>

#include "polyak.h"
#include "polyak_plan.h"

#ifdef __cplusplus
extern "C" {
#endif

#define POLYAK_ERROR_BYTES 512

/* One registered tensor. */
typedef struct {
  char *name;
  void *param;
  polyak_dtype dtype;
  int ndim;
  int64_t shape[POLYAK_MAX_NDIM];
  int64_t num_elems;
  int64_t global_offset_elems; /* in the flattened registration order */
  int owned;                   /* 1: shadow 0 is the caller's (polyak_add_with_shadow) */
  void *shadow;                /* that shadow (NULL if no elements) */
  polyak_dtype shadow_dtype;   /* its dtype, else the config's */
  int shadow_flags;
  int copy_only;               /* 1: polyak_add_copy's; its shadows are one mirror of the param */
  int64_t flat_elems;          /* its elements in the flattened parameter space (0 if copy_only) */
  int64_t mirror_offset_bytes; /* copy_only: where its mirror sits in p->copies */
} polyak_tensor;

/* The part of one tensor a rank keeps shadows of, and where in its arenas. */
typedef struct {
  int64_t first_elem, num_elems; /* of the tensor */
  int64_t arena_offset_elems;    /* of first_elem */
} polyak_piece;

typedef struct polyak_backend_ops polyak_backend_ops;
typedef struct polyak_transfer_ops polyak_transfer_ops; /* src/offload/offload.h */

struct polyak {
  polyak_config cfg;
  const polyak_backend_ops *ops;
  char last_error[POLYAK_ERROR_BYTES];

  /* registry: tensors[0..num_tensors) in registration order */
  polyak_tensor *tensors;
  int num_tensors;
  int tensors_capacity;
  int64_t total_elems; /* the flattened parameter space: all averaged tensors together */
  void *name_tree;     /* tsearch tree of tensor names, for duplicates */
  void *range_tree;    /* tsearch tree of param byte ranges, for overlaps */

  /* plan, built at finalize */
  int finalized;
  polyak_tensor_desc *descs; /* [num_tensors] */
  polyak_chunk *chunks;      /* [num_chunks] */
  int64_t num_chunks;
  int64_t *tensor_chunks;    /* [num_tensors + 1]: tensor i's chunks are [tensor_chunks[i], [i + 1]) */
  int64_t arena_elems;       /* elements in each shadow arena, padding included */
  int64_t arena_alloc_elems; /* the most any rank's arena holds: the all-gather's count */
  polyak_piece *layouts;     /* [world_size * num_tensors]: every rank's pieces, for gathers
                                (sharded or with a communicator; else NULL) */
  int64_t store_bytes;       /* bytes of polyak_store's copy of all params */
  /* copy-only tensors: their mirrors, one each, in one backend allocation
   * (whole on every rank), and the pieces the update copies */
  void *copies;        /* NULL if none */
  void *copies_stored; /* polyak_store's copy of their params, made at the first store */
  int64_t copies_num_bytes;
  polyak_copy_chunk *copy_chunks; /* [num_copy_chunks], host */
  int64_t num_copy_chunks;
  int shadows_open;  /* polyak_begin_shadow_write until polyak_set_step_state or a load */
  int stored;        /* polyak_store has kept a copy (until polyak_discard_store) */
  int store_pending; /* ... not yet ended by polyak_restore or polyak_discard_store */
  /* a polyak_load_shards failed after it began writing the shadows in
   * place (a file changed under it): they are partly loaded, and every
   * call but a load refuses until one succeeds */
  int torn;
  int64_t shard_block_bytes; /* polyak_save_shards' checksum blocks: 0, 4 MiB; tests set 4 KiB multiples */
  int shard_max_kept;        /* files a shard load keeps open between its passes: 0, 256; tests set fewer */

  /* step state */
  int64_t last_step;                           /* 0 before the first update */
  double beta_prod[POLYAK_MAX_SHADOWS];        /* prod_{s=1..last_step} beta_k(s), for debias (grad-norm
                                           shadows': the backend's, fetched when needed) */
  int64_t updates_counted[POLYAK_MAX_SHADOWS]; /* updates after start_step: t of count_updates */
  const float *grad_norm;                      /* polyak_set_grad_norm's scalar (backend memory) */
  int layer_source;                            /* LAWA's norms: 0 not set, 1 from gradients, 2 given */
  void **grads_set;                            /* [num_tensors]: polyak_set_grads's table (layer_source 1) */

  /* graph mode: steps reserved for replays of a captured update */
  int graph_reserved;
  int64_t graph_first_step;
  int64_t graph_num_steps;
  float *graph_weights; /* [graph_num_steps][num_shadows]: 1 - B per step */

  void *backend; /* the backend's own state */

  /* offloaded shadows (src/offload/): the transfers between the device
   * params and host shadows, set at create; NULL where the shadows live in
   * the backend's own memory */
  const polyak_transfer_ops *transfer;
  void *transfer_arg;
  size_t staging_num_bytes;   /* polyak_set_offload_staging (0: the default) */
  size_t offload_group_bytes; /* the offload's group size (0: polyak_offload_group_bytes; tests set it) */
  int overlap_reads;          /* polyak_overlap_param_reads */
};

/* 1 if p's shadows live in host memory for device params. */
static inline int polyak_offloaded(const polyak_t *p)
{
  return p->transfer != NULL;
}

/* A backend: where shadows live and how the plan is walked. Each function
 * is called only after the front end (update.c) validated everything; a
 * failing one leaves the shadows as they were. */
struct polyak_backend_ops {
  /* what the front end asks of a backend before any handle exists: 1 if it
   * can run here; its own checks of a config (the device, the
   * communicator), after the front end's; and, for memory only it can
   * read, 1 for such a pointer and the memory's name in messages
   * (owns_memory NULL: host memory, anyone's) */
  int (*available)(void);
  polyak_status (*check_config)(const polyak_config *cfg, char *msg, size_t msg_num_bytes);
  int (*owns_memory)(const void *ptr);
  const char *memory_name;

  /* refuses a param (copy-only ones included) or caller's shadow in memory
   * the backend cannot use; first at finalize, before anything reads them */
  polyak_status (*check_params)(polyak_t *p);
  /* allocate the shadows and initialize them from the params; given a
   * failure of the steps before it (`prior`), only take part in the ranks'
   * agreement where there is one, and return it */
  polyak_status (*finalize)(polyak_t *p, void *stream, polyak_status prior);
  polyak_status (*update)(polyak_t *p, const polyak_update_args *args, void *stream);
  /* the base of shadow `shadow`'s arena (backend memory) */
  void *(*arena)(polyak_t *p, int shadow);
  /* num_elems src_dtype elements from src (an arena, a gathered copy or a
   * caller's shadow: backend memory) times debias_scale into dst as dst_dtype */
  polyak_status (*read_out)(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                            double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream);
  /* refuses a read-out destination (or source: the snapshots), num_bytes
   * from dst, the backend cannot reach (host memory for CUDA, a span past
   * its allocation) */
  polyak_status (*check_read_out)(polyak_t *p, const void *dst, size_t num_bytes, void *stream, const char *function);
  polyak_status (*nonfinite_count)(polyak_t *p, int64_t *count);
  polyak_status (*set_nonfinite_count)(polyak_t *p, int64_t count); /* done when it returns */
  void (*release)(polyak_t *p);                                     /* frees p->backend; NULL-safe on it */

  /* graph mode: p->graph_* hold the reservation (weights computed by the
   * front end); each graph_update applies the next reserved step or, past
   * the end, counts a dropped replay; graph_release reports both counts. */
  polyak_status (*graph_reserve)(polyak_t *p, void *stream);
  polyak_status (*graph_update)(polyak_t *p, void *stream);
  polyak_status (*graph_release)(polyak_t *p, int64_t *consumed, int64_t *dropped);

  /* checkpoints: raw shadow elements (arena positions) to and from host
   * buffers from host_buffer (pinned for CUDA). A load fills fresh arenas
   * (staging) that replace the shadows only at staging_commit. */
  void *(*host_buffer)(polyak_t *p, size_t num_bytes); /* NULL: out of memory */
  void (*free_host_buffer)(polyak_t *p, void *buffer);
  /* num_bytes between backend memory and host memory; done when they return */
  polyak_status (*copy_to_host)(polyak_t *p, void *host, const void *src, size_t num_bytes);
  polyak_status (*copy_from_host)(polyak_t *p, void *dst, const void *host, size_t num_bytes);
  polyak_status (*staging_begin)(polyak_t *p); /* fresh arenas (stage_data fills them whole) */
  polyak_status (*staging_write)(polyak_t *p, int shadow, int64_t first_elem, int64_t num_elems, const void *host);
  /* the staged arenas into the live ones, and `copies` (host memory,
   * copies_num_bytes; NULL: none) into the copy-only tensors' mirrors; done
   * when it returns */
  polyak_status (*staging_commit)(polyak_t *p, int64_t nonfinite_count, const void *copies);
  void (*staging_abort)(polyak_t *p);

  /* blends (coefficient[k] = weight * debias as float, 0: not read) of
   * tensor `tensor` into dst, or with tensor -1 into every param */
  polyak_status (*blend)(polyak_t *p, const float *coefficient, int tensor, void *dst, polyak_dtype dst_dtype,
                         void *stream);

  /* every param <- sum_i weight[i] * snapshot i (snapshots stacked, each
   * arena_elems floats, backend memory) */
  polyak_status (*synthesize)(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                              void *stream);
  /* LAWA: the gradients (grads, num_tensors pointers) or the norms (norms)
   * every later update reads, checked and kept; and the betas of the last
   * update (num_tensors x POLYAK_MAX_SHADOWS, host memory; waits for the
   * device) */
  polyak_status (*set_layer_source)(polyak_t *p, void *const *grads, const float *norms);
  polyak_status (*layer_betas)(polyak_t *p, double *betas);
  /* shadow k <- the params (a hard update), rounded to nearest even */
  polyak_status (*hard_update)(polyak_t *p, int shadow, void *stream);
  /* grad-norm shadows' beta products, kept where their updates compute
   * them: all num_shadows values read (waiting for the device) or written */
  polyak_status (*products_read)(polyak_t *p, double *products);
  polyak_status (*products_write)(polyak_t *p, const double *products);
  /* refuses a grad-norm pointer the backend cannot read */
  polyak_status (*check_grad_norm)(polyak_t *p, const float *grad_norm);

  /* evaluation: the debiased shadow into the params (in their dtypes), and
   * an exact copy of the params kept and written back */
  polyak_status (*copy_to_params)(polyak_t *p, int shadow, double debias_scale, void *stream);
  polyak_status (*store)(polyak_t *p, void *stream);
  polyak_status (*restore)(polyak_t *p, void *stream);

  /* gathers (shard.c): scratch in backend memory, copies within it, and
   * one all-gather of `count` shadow-dtype elements per rank over
   * nccl_comm (NULL where the backend has no NCCL) */
  void *(*scratch_alloc)(polyak_t *p, size_t num_bytes); /* NULL: out of memory */
  void (*scratch_free)(polyak_t *p, void *scratch);
  polyak_status (*copy_bytes)(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream);
  polyak_status (*all_gather)(polyak_t *p, const void *send, void *recv, int64_t count, void *stream);
  /* *all_ok = every rank's local_ok (a collective: before each gather, so
   * that a rank that failed locally never leaves the others waiting) */
  polyak_status (*agree)(polyak_t *p, int local_ok, int *all_ok);
  /* *other = a rank whose `value` differs from this rank's, -1 if every
   * rank's is the same (a collective over nccl_comm, issued whatever
   * failed before it on this rank; without one always -1) */
  polyak_status (*compare)(polyak_t *p, uint64_t value, int *other);
  /* 1 if `stream` is being captured into a graph */
  polyak_status (*capturing)(polyak_t *p, void *stream, int *capturing);
  /* 1 if a capture is under way that a call waiting for the device or
   * allocating would break, whatever stream the call has: one the backend
   * can see (CUDA: on a blocking stream, or the one the handle's last
   * captured graph update joined); NULL: never */
  polyak_status (*capture_under_way)(polyak_t *p, int *under_way);
};

extern const polyak_backend_ops polyak_cpu_ops;
#ifdef POLYAK_HAVE_CUDA
extern const polyak_backend_ops polyak_cuda_ops;
#endif

/* Backend b's functions, or NULL if this build has no such backend. */
const polyak_backend_ops *polyak_backend_ops_of(polyak_backend b);

/* The name of the memory `ptr` points into if only another backend than
 * p's can read it ("CUDA device memory"), else NULL. */
const char *polyak_foreign_memory(const polyak_t *p, const void *ptr);

/* Records "<message>" as p's last error and returns `status`. */
polyak_status polyak_fail(polyak_t *p, polyak_status status, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

/* Returns from the calling function with the status of `call` unless it
 * is POLYAK_OK. */
#define POLYAK_TRY(call)                       \
  do {                                         \
    polyak_status polyak_try_status_ = (call); \
    if (polyak_try_status_ != POLYAK_OK)       \
      return polyak_try_status_;               \
  } while (0)

/* The entry check of every call that needs a finalized handle:
 * POLYAK_ERR_INVALID_ARG for a NULL p (no handle to hold a message), then
 * POLYAK_ERR_STATE "<function>: call polyak_finalize first". */
polyak_status polyak_require_finalized(polyak_t *p, const char *function);

/* The same without refusing shadows that a failed shard load left partly
 * written (p->torn): what a load asks, which may mend them. */
polyak_status polyak_require_loadable(polyak_t *p, const char *function);

/* Formats into msg[msg_num_bytes] if msg is not NULL; returns `status`. */
polyak_status polyak_message(char *msg, size_t msg_num_bytes, polyak_status status, const char *format, ...)
    __attribute__((format(printf, 4, 5)));

/* The shortest text that reads back as `value`: "%.*g" with the fewest
 * digits (1 to 17) that strtod returns to the same double, '.' as the
 * decimal point whatever the locale, ".0" added where it would read as an
 * integer: 0.99, not 0.98999999999999999; 1.0, not 1. For messages and
 * checkpoint metadata: polyak_format_double(beta).text. */
typedef struct {
  char text[32];
} polyak_double_text;
polyak_double_text polyak_format_double(double value);

/* `in` (any accepted struct_size, with the magic) as a current
 * polyak_config, later fields at their defaults. -1 for an unknown
 * struct_size or a missing magic. */
int polyak_config_normalize(const polyak_config *in, polyak_config *out);

/* Schedule checks as polyak_create makes them; the reason goes to msg. */
polyak_status polyak_schedule_check(const polyak_schedule *s, char *msg, size_t msg_num_bytes);

/* polyak_beta_product for a schedule already checked (the per-step path). */
double polyak_beta_product_checked(const polyak_schedule *s, int64_t last_step, int64_t step);

/* beta at t = 0, 1, ... of a checked schedule (start_step aside). */
double polyak_beta_of_t(const polyak_schedule *s, double t);

/* 1 if shadow k holds Lookahead's slow weights (the last shadow). */
static inline int polyak_is_lookahead(const polyak_config *c, int k)
{
  return c->lookahead_every > 0 && k == c->num_shadows - 1;
}

/* 1 if shadow k's beta follows the gradient norm. */
static inline int polyak_is_grad_norm(const polyak_config *c, int k)
{
  return c->shadows[k].grad_norm_c > 0.0;
}

/* 1 if any shadow is layer-wise (LAWA). */
static inline int polyak_has_layerwise(const polyak_config *c)
{
  for (int k = 0; k < c->num_shadows; k++)
    if (c->shadows[k].layerwise_beta0 > 0.0)
      return 1;
  return 0;
}

/* Bit k set where shadow k rounds stochastically if it is f32
 * (polyak_update_args.stochastic_f32). */
static inline uint32_t polyak_stochastic_f32_mask(const polyak_config *c)
{
  uint32_t mask = 0;
  for (int k = 0; k < c->num_shadows && k < POLYAK_MAX_SHADOWS; k++) /* the bound for the compiler */
    mask |= (uint32_t)(c->shadows[k].rounding == POLYAK_ROUND_STOCHASTIC) << k;
  return mask;
}

/* The shadows' grad_norm_c and layerwise_beta0 as arrays [POLYAK_MAX_SHADOWS]
 * (0 past num_shadows): what the kernels' shared math takes. */
static inline void polyak_adaptive_arrays(const polyak_config *c, double *grad_norm_c, double *layerwise_beta0)
{
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++) {
    grad_norm_c[k] = k < c->num_shadows ? c->shadows[k].grad_norm_c : 0.0;
    layerwise_beta0[k] = k < c->num_shadows ? c->shadows[k].layerwise_beta0 : 0.0;
  }
}

/* 1 if any shadow follows the gradient norm. */
static inline int polyak_has_grad_norm(const polyak_config *c)
{
  for (int k = 0; k < c->num_shadows; k++)
    if (polyak_is_grad_norm(c, k))
      return 1;
  return 0;
}

/* The factor a read-out of `shadow` multiplies by (1, or zero_init's
 * debias), refusing what a captured read-out could not repeat. */
polyak_status polyak_debias_scale(polyak_t *p, int shadow, void *stream, const char *function, double *scale);

/* 1 if the host keeps shadow k's beta product: not a grad-norm shadow's
 * (the backend multiplies it) nor a layer-wise one's (one per tensor: none
 * kept; it stays 1). */
static inline int polyak_host_product(const polyak_config *c, int k)
{
  return !polyak_is_grad_norm(c, k) && !(c->shadows[k].layerwise_beta0 > 0.0);
}

/* p->beta_prod with the grad-norm shadows' fetched from the backend. */
polyak_status polyak_refresh_products(polyak_t *p);

/* 1 if shadow k's t counts its updates (count_updates, or Lookahead's
 * syncs) rather than steps. */
static inline int polyak_counts_updates(const polyak_config *c, int k)
{
  return c->shadows[k].count_updates || polyak_is_lookahead(c, k);
}

/* The decay shadow k's update at `step` applies after one at `last_step`:
 * the product of the gap's betas, or where it counts updates beta at t =
 * the updates counted so far (0 up to start_step: a copy). 1 where
 * Lookahead's slow weights have no sync at `step`. */
double polyak_update_decay(const polyak_t *p, int k, int64_t last_step, int64_t step, int64_t counted);

/* The updates shadow k counts among steps after..upto, with an update at
 * each of them: those past its start_step (for Lookahead, only syncs). */
int64_t polyak_updates_counted_in(const polyak_t *p, int k, int64_t after, int64_t upto);

/* The first Lookahead sync after `step` (INT64_MAX without Lookahead or
 * beyond int64). */
int64_t polyak_next_sync(const polyak_config *c, int64_t step);

/* "CONSTANT", ... (NULL for an unknown kind), and back (-1 if unknown). */
const char *polyak_schedule_kind_name(polyak_schedule_kind kind);
int polyak_schedule_kind_from_name(const char *name);

/* 1 if a and b give the same beta at every step: same kind, same values
 * of the fields that kind uses, same start_step. */
int polyak_schedule_same(const polyak_schedule *a, const polyak_schedule *b);

size_t polyak_dtype_num_bytes(polyak_dtype dtype); /* 0 for an unknown dtype */
int polyak_dtype_valid(polyak_dtype dtype);        /* F32, BF16, F16: what averages read and write */
int polyak_dtype_copyable(polyak_dtype dtype);     /* any dtype: what copy-only tensors hold */
const char *polyak_dtype_name(polyak_dtype dtype);

/* Rank `rank`'s pieces of every tensor (pieces[num_tensors]) and its arena
 * size in elements: its slice of the flattened parameter space, element-
 * balanced across world_size ranks, each boundary at a multiple of 8
 * elements of the tensor it falls in; pieces 16-byte aligned in the arena.
 * Any rank can compute any rank's layout. */
void polyak_shard_layout(const polyak_t *p, int rank, polyak_piece *pieces, int64_t *arena_elems);

/* Where rank `rank` of world_size ranks begins in the flattened parameter
 * space (total_elems for rank world_size): the boundaries of
 * polyak_shard_layout at any world size, for checkpoint shards. */
int64_t polyak_shard_begin(const polyak_t *p, int world_size, int rank);

/* This rank's piece of tensor `tensor` in shadow `shadow`: the caller's
 * memory for a shadow of theirs, else in the arena; *dtype (unless NULL)
 * gets its dtype. */
static inline void *polyak_local_slice(polyak_t *p, int shadow, int tensor, polyak_dtype *dtype)
{
  const polyak_tensor *owner = &p->tensors[tensor];
  const polyak_tensor_desc *t = &p->descs[tensor];
  if (dtype)
    *dtype = shadow == 0 ? owner->shadow_dtype : p->cfg.shadow_dtype;
  if (owner->owned && shadow == 0)
    return owner->shadow;
  return (char *)p->ops->arena(p, shadow) +
         (t->shadow_offset_elems + t->local_first_elem) * (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
}

/* ---- gathers across ranks (shard.c) ---- */

/* 1 if reading tensor `tensor` whole needs the other ranks' pieces: it is
 * not all here, or the handle has a communicator (which is then always
 * used, so one rank exercises the same path). */
int polyak_needs_gather(const polyak_t *p, int tensor);

/* From `gathered` (rank r's data at r * stride_elems), one tensor's whole
 * shadow times debias_scale into dst as dst_dtype (backend memory). Rank
 * r's piece is pieces[r * piece_stride] (p->layouts + tensor with stride
 * num_tensors, or one piece per rank with stride 1). */
polyak_status polyak_assemble(polyak_t *p, const void *gathered, int64_t stride_elems, const polyak_piece *pieces,
                              size_t piece_stride, double debias_scale, void *dst, polyak_dtype dst_dtype,
                              void *stream);

/* The ranks agree that every one is ready (a collective); if one is not,
 * every rank fails with `status_if_not` and a message about `what`. */
polyak_status polyak_all_ready(polyak_t *p, int ready, polyak_status status_if_not, const char *what);

/* Shadow `shadow` of every rank into *gathered (backend scratch of
 * world_size * arena_alloc_elems, scratch_free it): one all-gather. */
polyak_status polyak_gather_arenas(polyak_t *p, int shadow, void **gathered, void *stream);

/* polyak_get_shadow and polyak_copy_to_params where polyak_needs_gather. */
polyak_status polyak_gather_tensor(polyak_t *p, int shadow, int tensor, double debias_scale, void *dst,
                                   polyak_dtype dst_dtype, void *stream);
polyak_status polyak_gather_to_params(polyak_t *p, int shadow, double debias_scale, void *stream);

/* The tensor holding global element `elem` (0 <= elem < total_elems). */
int polyak_tensor_of_element(const polyak_t *p, int64_t elem);

/* ---- copy-only tensors (copies.c) ---- */

/* At finalize, after the plan: the mirrors' allocation (none without
 * copy-only tensors), then (after the backend's finalize) their values. */
polyak_status polyak_copies_allocate(polyak_t *p);
/* every mirror <- its param: at finalize and for a hard update */
polyak_status polyak_copies_refresh(polyak_t *p, void *stream);
void polyak_copies_release(polyak_t *p);
/* the CPU backend's part of an update: every mirror <- its param */
void polyak_copies_update(const polyak_t *p);
/* every param <- its mirror: the copy-only part of writing an average into
 * the params (polyak_copy_to_params, blends, synthesis) */
polyak_status polyak_copies_to_params(polyak_t *p, void *stream);
/* polyak_store (to_store 1) and polyak_restore (0) of their params */
polyak_status polyak_copies_store(polyak_t *p, int to_store, void *stream);
/* 1 if a copy-only tensor of tensor_dtype reads out as dst_dtype: itself,
 * or between F32, BF16 and F16 (rounded to nearest even) */
int polyak_copy_readable_as(polyak_dtype tensor_dtype, polyak_dtype dst_dtype);
/* tensor's mirror into dst as dst_dtype (readable as checked) */
polyak_status polyak_copy_read(polyak_t *p, int tensor, void *dst, polyak_dtype dst_dtype, void *stream);

/* Builds descs/chunks/arena_elems of a handle from its registry. */
polyak_status polyak_plan_build(polyak_t *p);
void polyak_plan_free(polyak_t *p);

/* Chunks over every element of every tensor (what the plan holds without
 * sharding), for work on whole params; free() them. */
polyak_status polyak_full_chunks(polyak_t *p, polyak_chunk **chunks, int64_t *num_chunks);

/* The checks of the step a next update applies (`what` names it in the
 * message): from 1, after the last update, skipping no Lookahead sync. */
polyak_status polyak_check_next_step(polyak_t *p, int64_t step, const char *what);

/* What an update reads besides the params is set: the grad norm, LAWA's
 * gradients or norms. */
polyak_status polyak_check_update_sources(polyak_t *p, const char *function);

/* POLYAK_ERR_STATE while a polyak_store is pending: for the calls that
 * fold the params into the shadows (evaluation.c). */
polyak_status polyak_refuse_pending_store(polyak_t *p, const char *function);

/* POLYAK_ERR_STATE while the shadows are open for writing through their
 * addresses (polyak_begin_shadow_write, views.c): for updates and saves. */
polyak_status polyak_refuse_open_shadows(polyak_t *p, const char *function);

/* POLYAK_ERR_INVALID_ARG for a shadow index outside 0..num_shadows - 1. */
polyak_status polyak_check_shadow(polyak_t *p, int shadow, const char *function);

/* POLYAK_ERR_STATE "<function>: ..." while a capture is under way that
 * the call would break or that replays would not repeat: `stream` being
 * captured (has_stream: the call takes one), or any capture the backend
 * can see (capture_under_way). For the calls that wait for the device,
 * allocate, or change host state; first, before they change anything. */
polyak_status polyak_refuse_during_capture(polyak_t *p, void *stream, int has_stream, const char *function);

/* POLYAK_ERR_STATE, with the formatted reason, if `stream` is being
 * captured into a graph (the call could not be replayed as it ran). */
polyak_status polyak_refuse_capture(polyak_t *p, void *stream, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

/* The update arguments for `step` with per-shadow weights 1 - B. */
void polyak_update_args_init(const polyak_t *p, int64_t step, int64_t gap, const float *weight,
                             polyak_update_args *args);

/* A hash of what must be the same on every rank of a sharded handle: the
 * tensors (names, dtypes, shapes) and the config, rank aside. */
uint64_t polyak_layout_hash(const polyak_t *p);

/* 1 if a tensor of that name is registered. */
int polyak_registry_has(const polyak_t *p, const char *name);

/* The number of the tensor named `name`, or -1. */
int polyak_registry_find(const polyak_t *p, const char *name);

/* Frees the registry (names, trees, tensor table). */
void polyak_registry_free(polyak_t *p);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_INTERNAL_H */
