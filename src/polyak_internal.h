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
} polyak_tensor;

typedef struct polyak_backend_ops polyak_backend_ops;

struct polyak {
  polyak_config cfg;
  const polyak_backend_ops *ops;
  char last_error[POLYAK_ERROR_BYTES];

  /* registry: tensors[0..num_tensors) in registration order */
  polyak_tensor *tensors;
  int num_tensors;
  int tensors_capacity;
  void *name_tree;  /* tsearch tree of tensor names, for duplicates */
  void *range_tree; /* tsearch tree of param byte ranges, for overlaps */

  /* plan, built at finalize */
  int finalized;
  polyak_tensor_desc *descs; /* [num_tensors] */
  polyak_chunk *chunks;      /* [num_chunks] */
  int64_t num_chunks;
  int64_t arena_elems;       /* elements in each shadow arena, padding included */
  int64_t store_bytes;       /* bytes of polyak_store's copy of all params */
  int stored;                /* polyak_store has kept a copy */

  /* step state */
  int64_t last_step;                    /* 0 before the first update */
  double beta_prod[POLYAK_MAX_SHADOWS]; /* prod_{s=1..last_step} beta_k(s), for debias */

  /* graph mode: steps reserved for replays of a captured update */
  int graph_reserved;
  int64_t graph_first_step;
  int64_t graph_num_steps;
  float *graph_weights; /* [graph_num_steps][num_shadows]: 1 - B per step */

  void *backend; /* the backend's own state */
};

/* A backend: where shadows live and how the plan is walked. Each function
 * is called only after the front end (update.c) validated everything; a
 * failing one leaves the shadows as they were. */
struct polyak_backend_ops {
  /* allocate the shadows and initialize them from the params */
  polyak_status (*finalize)(polyak_t *p, void *stream);
  polyak_status (*update)(polyak_t *p, const polyak_update_args *args, void *stream);
  /* tensor's slice of one shadow, times debias_scale, into dst */
  polyak_status (*get_shadow)(polyak_t *p, int shadow, int tensor, void *dst,
                              polyak_dtype dst_dtype, double debias_scale, void *stream);
  polyak_status (*nonfinite_count)(polyak_t *p, int64_t *count);
  void (*release)(polyak_t *p); /* frees p->backend; NULL-safe on it */

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
  polyak_status (*shadow_to_host)(polyak_t *p, int shadow, int64_t first_elem, int64_t num_elems,
                                  void *host); /* done when it returns */
  polyak_status (*staging_begin)(polyak_t *p); /* zeroed fresh arenas */
  polyak_status (*staging_write)(polyak_t *p, int shadow, int64_t first_elem, int64_t num_elems,
                                 const void *host);
  polyak_status (*staging_commit)(polyak_t *p, int64_t nonfinite_count);
  void (*staging_abort)(polyak_t *p);

  /* evaluation: the debiased shadow into the params (in their dtypes), and
   * an exact copy of the params kept and written back */
  polyak_status (*copy_to_params)(polyak_t *p, int shadow, double debias_scale, void *stream);
  polyak_status (*store)(polyak_t *p, void *stream);
  polyak_status (*restore)(polyak_t *p, void *stream);
};

extern const polyak_backend_ops polyak_cpu_ops;
#ifdef POLYAK_HAVE_CUDA
extern const polyak_backend_ops polyak_cuda_ops;
#endif

/* Records "<message>" as p's last error and returns `status`. */
polyak_status polyak_fail(polyak_t *p, polyak_status status, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

/* Formats into msg[msg_num_bytes] if msg is not NULL; returns `status`. */
polyak_status polyak_message(char *msg, size_t msg_num_bytes, polyak_status status,
                             const char *format, ...) __attribute__((format(printf, 4, 5)));

/* Schedule checks as polyak_create makes them; the reason goes to msg. */
polyak_status polyak_schedule_check(const polyak_schedule *s, char *msg, size_t msg_num_bytes);

/* "CONSTANT", ... (NULL for an unknown kind), and back (-1 if unknown). */
const char *polyak_schedule_kind_name(polyak_schedule_kind kind);
int polyak_schedule_kind_from_name(const char *name);

/* 1 if a and b give the same beta at every step: same kind, same values
 * of the fields that kind uses, same start_step. */
int polyak_schedule_same(const polyak_schedule *a, const polyak_schedule *b);

size_t polyak_dtype_num_bytes(polyak_dtype dtype); /* 0 for an unknown dtype */
int polyak_dtype_valid(polyak_dtype dtype);
const char *polyak_dtype_name(polyak_dtype dtype);

/* Builds descs/chunks/arena_elems of a handle from its registry. */
polyak_status polyak_plan_build(polyak_t *p);
void polyak_plan_free(polyak_t *p);

/* The update arguments for `step` with per-shadow weights 1 - B. */
void polyak_update_args_init(const polyak_t *p, int64_t step, const float *weight,
                             polyak_update_args *args);

/* 1 if a tensor of that name is registered. */
int polyak_registry_has(const polyak_t *p, const char *name);

/* Frees the registry (names, trees, tensor table). */
void polyak_registry_free(polyak_t *p);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_INTERNAL_H */
