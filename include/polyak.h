/*
 * polyak.h: averaged copies ("shadows") of a network's parameters, updated
 * in one pass per optimizer step.
 *
 * A tour of the core
 * ------------------
 *   polyak_config cfg;
 *   polyak_config_init(&cfg);                  // CPU, 1 shadow, EMA beta 0.999
 *   cfg.backend = POLYAK_BACKEND_CUDA;         // shadows live on the GPU
 *   cfg.schedules[0].kind = POLYAK_SCHEDULE_WARMUP;     // from scratch: warm up
 *   polyak_t *p;
 *   polyak_create(&p, &cfg);                   // create once, reuse for the whole run
 *   polyak_add(p, "wte", wte, POLYAK_BF16, 2, shape);   // every tensor, once
 *   polyak_finalize(p, stream);                // allocate shadows, build the plan
 *   for (step = 1; ...; step++) {
 *     optimizer_step(...);
 *     polyak_update(p, step, stream);          // one fused pass over every shadow
 *   }
 *   polyak_get_shadow_n(p, 0, 0, dst, POLYAK_F32, dst_num_bytes, stream); // shadow 0, tensor 0
 *   polyak_save(p, "ema.safetensors");
 *   polyak_destroy(p);
 *
 * The header in layers, each building on the ones before it:
 *   1. the core: errors, configuration, registration, the update, read-outs,
 *      checkpoints, schedules
 *   2. evaluating with an average and returning to the trained weights
 *   3. averaging modes beyond one EMA: stochastic rounding of f32 shadows,
 *      shadows in the caller's memory and hard updates, Lookahead, grad-norm
 *      and layer-wise (LAWA) decay, EDM2 post-hoc averages
 *   4. CUDA graphs
 *   5. shadows sharded across ranks
 *
 * Step semantics: `step` counts the trainer's optimizer steps, 1 for the
 * first. An update at `step` folds the current params into every shadow as
 * the average after `step` steps; steps skipped since the last update are
 * compensated exactly (the update applies the product of the skipped betas).
 * See README.md for the schedules and the full rules.
 *
 * Conventions
 * -----------
 * - Every function that can fail returns a polyak_status. A failing call
 *   changes nothing (no shadow, no step counter, no registration) and sets
 *   the handle's polyak_last_error() text; a successful one leaves that text
 *   as it was.
 * - `stream` is a cudaStream_t passed as void * (NULL: the default stream).
 *   Calls on the CUDA backend return once their work is enqueued on it; the
 *   CPU backend ignores it and returns when the work is done.
 * - Pointers handed to a handle are on the backend's side: host memory for
 *   POLYAK_BACKEND_CPU, device memory for POLYAK_BACKEND_CUDA.
 * - Element counts are int64: a tensor may exceed 2^31 elements.
 * - Read-outs take the shadow (which average) before the tensor (which
 *   parameter: numbered in registration order, see polyak_find_tensor).
 * - A handle is not thread-safe; distinct handles never interfere. A CPU
 *   handle may run its own worker threads (polyak_config.cpu_threads).
 *
 * Stability: the names in this file are a stable contract. New fields are
 * only ever appended to polyak_config, whose struct_size tells versions apart.
 */

#ifndef POLYAK_H
#define POLYAK_H

#include <stddef.h>
#include <stdint.h>

#include "polyak_version.h" /* POLYAK_VERSION_MAJOR, _MINOR, _PATCH, _STRING, _CODE */

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define POLYAK_API
#else
#define POLYAK_API __attribute__((visibility("default")))
#endif

#define POLYAK_MAX_SHADOWS     8   /* shadows per handle */
#define POLYAK_MAX_NDIM        8   /* dimensions per tensor */
#define POLYAK_MAX_CPU_THREADS 256 /* polyak_config.cpu_threads */

/* Status codes; the values are pinned. One list feeds the enum and
 * polyak_status_name(), so the two never drift. */
#define POLYAK_STATUS_LIST(X)  \
  X(POLYAK_OK, 0)              \
  X(POLYAK_ERR_INVALID_ARG, 1) \
  X(POLYAK_ERR_STATE, 2)       \
  X(POLYAK_ERR_NO_MEMORY, 3)   \
  X(POLYAK_ERR_UNSUPPORTED, 4) \
  X(POLYAK_ERR_CUDA, 5)        \
  X(POLYAK_ERR_NCCL, 6)        \
  X(POLYAK_ERR_IO, 7)          \
  X(POLYAK_ERR_FORMAT, 8)      \
  X(POLYAK_ERR_MISMATCH, 9)

#define POLYAK_STATUS_ENUM_ITEM(name, value) name = value,
typedef enum { POLYAK_STATUS_LIST(POLYAK_STATUS_ENUM_ITEM) } polyak_status;
#undef POLYAK_STATUS_ENUM_ITEM

typedef struct polyak polyak_t; /* opaque handle; create once, reuse */

/* Element types of params, shadows and read-outs. Averaged tensors are
 * F32, BF16 or F16; copy-only tensors (polyak_add_copy) any of them. */
typedef enum {
  POLYAK_F32 = 0,
  POLYAK_BF16 = 1,
  POLYAK_F16 = 2,
  POLYAK_F64 = 3, /* the rest: copy-only tensors */
  POLYAK_I64 = 4,
  POLYAK_I32 = 5,
  POLYAK_I16 = 6,
  POLYAK_I8 = 7,
  POLYAK_U8 = 8,
  POLYAK_BOOL = 9
} polyak_dtype;

/* Where shadows live and updates run. */
typedef enum { POLYAK_BACKEND_CPU = 0, POLYAK_BACKEND_CUDA = 1 } polyak_backend;

/* Decay schedules beta(t); see polyak_beta_at() for the formulas. */
typedef enum {
  POLYAK_SCHEDULE_CONSTANT = 0, /* beta                                        */
  POLYAK_SCHEDULE_TF = 1,       /* min(beta, (1+t)/(10+t)): TensorFlow's rule  */
  POLYAK_SCHEDULE_WARMUP = 2,   /* 1-(1+t/inv_gamma)^-power, clamped: timm     */
  POLYAK_SCHEDULE_LINEAR = 3,   /* beta_min -> beta over ramp_steps            */
  POLYAK_SCHEDULE_COSINE = 4,   /* beta_min -> beta over ramp_steps, cosine    */
  POLYAK_SCHEDULE_EQUAL = 5,    /* t/(t+1): the running mean (Polyak, SWA)     */
  POLYAK_SCHEDULE_POWER = 6     /* (t/(t+1))^(gamma+1): EDM2 power-function EMA */
} polyak_schedule_kind;

/* One shadow's decay schedule. Only the fields its kind uses are read and
 * validated:
 *   CONSTANT, TF   beta
 *   WARMUP         beta, beta_min, inv_gamma, power
 *   LINEAR, COSINE beta, beta_min, ramp_steps
 *   EQUAL          (none)
 *   POWER          gamma
 * and start_step for every kind. Ranges: all finite, 0 <= beta_min <= beta
 * <= 1, inv_gamma > 0, power > 0, gamma > -1, ramp_steps > 0,
 * start_step >= 0. */
typedef struct {
  polyak_schedule_kind kind;
  double beta;        /* the decay (the ceiling for TF, WARMUP, LINEAR, COSINE) */
  double beta_min;    /* the floor (WARMUP) or starting decay (LINEAR, COSINE) */
  double inv_gamma;   /* WARMUP: steps scale of the warm-up */
  double power;       /* WARMUP: exponent of the warm-up */
  double gamma;       /* POWER: EDM2 exponent; see polyak_gamma_from_sigma_rel() */
  int64_t ramp_steps; /* LINEAR, COSINE: steps to go from beta_min to beta */
  int64_t start_step; /* beta = 0 (the shadow copies the params) up to this step */
} polyak_schedule;

/* One shadow's settings (polyak_config.shadows[k]). */
typedef struct {
  polyak_schedule schedule; /* its decay beta(step) */
  int rounding;             /* f32 shadows: POLYAK_ROUND_NEAREST (default) or POLYAK_ROUND_STOCHASTIC */
  int count_updates;        /* 1: the schedule counts updates, not steps (no gap compensation); 0 (default) */
  double grad_norm_c;       /* c in (0, 1]: beta follows the gradient norm; 0 (default): the schedule */
  double layerwise_beta0;   /* beta0 in (0, 1]: beta per tensor from the gradients (LAWA); 0 (default): off */
} polyak_shadow_config;

/* Where the shadows of a CUDA handle live (polyak_config.shadow_location). */
#define POLYAK_SHADOWS_DEVICE 0 /* device memory (the default) */
#define POLYAK_SHADOWS_HOST   1 /* host memory, params on the device: not yet supported */

#define POLYAK_CONFIG_MAGIC 0x706f6c79u /* "poly": polyak_config_init sets it */

/* A handle's settings: fill with polyak_config_init, then change fields. */
typedef struct {
  size_t struct_size;     /* set by polyak_config_init; checked by create */
  uint32_t magic;         /* POLYAK_CONFIG_MAGIC, set by polyak_config_init; checked by create */
  polyak_backend backend; /* POLYAK_BACKEND_CPU (default) or POLYAK_BACKEND_CUDA */
  int device;             /* CUDA device ordinal; 0 (default) */
  int num_shadows;        /* 1..POLYAK_MAX_SHADOWS; 1 (default) */
  polyak_shadow_config shadows[POLYAK_MAX_SHADOWS]; /* [0, num_shadows) used */
  polyak_dtype shadow_dtype;                        /* POLYAK_F32 (default) or POLYAK_BF16 (stochastic rounding) */
  int zero_init;           /* 0 (default): shadows start as params; 1: at 0, debiased when read */
  int skip_nonfinite;      /* 1 (default): a NaN/Inf param element leaves its shadow as it was */
  uint64_t seed;           /* stochastic rounding's hash key; 0 (default) */
  int64_t lookahead_every; /* k > 0: the last shadow is Lookahead's slow weights; 0 (default): none */
  int world_size;          /* 1 (default): whole shadows; W: this handle holds 1/W of them */
  int rank;                /* 0..world_size-1: which slice this handle holds */
  void *nccl_comm;         /* ncclComm_t of those ranks, borrowed (CUDA backend), or NULL */
  int cpu_threads;         /* CPU backend: threads per update, the caller's included; 1 (default); 0: a core each */
  int shadow_location;     /* POLYAK_SHADOWS_DEVICE (default) or POLYAK_SHADOWS_HOST */
} polyak_config;

/* struct_size of the 1.0 polyak_config. Later versions only append fields,
 * so a caller built against 1.0 keeps working: create accepts its
 * struct_size and gives the fields it lacks their defaults. */
#define POLYAK_CONFIG_SIZE_1_0 (offsetof(polyak_config, shadow_location) + sizeof(int))

/* Threads of the CPU backend (cpu_threads, 0..POLYAK_MAX_CPU_THREADS; the
 * CUDA backend ignores it). With N > 1, polyak_finalize starts N - 1 worker
 * threads for the handle (0: one per core in the process's CPU affinity
 * mask, counting the caller), and every later call that walks the shadows
 * (updates and graph replays with their Lookahead write-backs and LAWA
 * norms, read-outs, blends, hard updates, copies to the params, the
 * post-hoc synthesis) splits the plan's chunks between the calling thread
 * and them; the call returns when all are done. No thread is started per
 * call; between calls the workers sleep (no CPU time), and polyak_destroy
 * joins them. Results are the same bits for every N, the non-finite count
 * included: each element is computed alone, and counts are integer sums.
 * With the caller's own threads: a handle is still not thread-safe (one
 * call at a time), but handles used on different threads each run their own
 * workers, so K handles updated at once with N threads each keep K * N
 * threads busy: keep that at most the cores, or oversubscribed threads wait
 * for each other (as they wait for a runtime's spinning threads: PyTorch's
 * OpenMP threads spin after each op unless OMP_WAIT_POLICY=PASSIVE). The
 * workers block every signal (handlers run on the caller's threads) and are
 * not inherited by fork(): a child process must not use a handle whose
 * cpu_threads exceeded 1. A handle with N = 1 (the default) starts no thread
 * and runs on the caller's alone. polyak_create refuses a negative or
 * larger value (POLYAK_ERR_INVALID_ARG); polyak_finalize returns
 * POLYAK_ERR_NO_MEMORY if a thread cannot be started. */

/* ======================================================================
 * 1. The core
 * ====================================================================== */

/* ---- Errors ------------------------------------------------------------ */

/* The enum name of `s` ("POLYAK_OK", ...); "POLYAK_UNKNOWN_STATUS" for a
 * value outside the enum. Never NULL. */
POLYAK_API const char *polyak_status_name(polyak_status s);

/* The detail of the most recent failing call on `p`, naming the call and
 * the argument at fault; "" if no call on `p` has failed. A successful call
 * does not clear it: read it after a failing status, not to learn whether
 * a call failed. A failed polyak_create leaves no handle: polyak_last_error
 * (NULL) is "", and polyak_check_config(cfg, msg, n) gives the reason.
 * Valid until the next call on `p`. */
POLYAK_API const char *polyak_last_error(const polyak_t *p);

/* ---- Configuration ----------------------------------------------------- */

/* "0.1.0": the version of the library that is loaded. */
POLYAK_API const char *polyak_version_string(void);

/* 1 if this build has backend `b` and it can run here (for CUDA: built with
 * CUDA and at least one device visible), else 0. */
POLYAK_API int polyak_backend_available(polyak_backend b);

/* Fills `cfg` with the defaults: struct_size = sizeof(polyak_config), CPU
 * backend, device 0, one shadow, every schedule CONSTANT with beta 0.999
 * (beta_min 0, inv_gamma 1, power 2/3, gamma 6.94 (sigma_rel 0.10),
 * ramp_steps 1000, start_step 0), F32 shadows, zero_init 0,
 * skip_nonfinite 1, seed 0, world_size 1, rank 0, no communicator, every
 * shadow rounded to nearest, cpu_threads 1. NULL is ignored. */
POLYAK_API void polyak_config_init(polyak_config *cfg);

/* Checks `cfg` as polyak_create() does, without creating anything: on
 * failure returns the status create would return and writes the reason to
 * `msg` (NUL-terminated, truncated to `msg_num_bytes`; `msg` may be NULL).
 * Use it to explain a failing create, which has no handle to carry text.
 * Returns POLYAK_ERR_INVALID_ARG for a bad field, POLYAK_ERR_UNSUPPORTED
 * for a backend this build or machine lacks, POLYAK_ERR_CUDA if the CUDA
 * runtime fails while checking the device. */
POLYAK_API polyak_status polyak_check_config(const polyak_config *cfg, char *msg, size_t msg_num_bytes);

/* ---- Registering and finalizing ----------------------------------------- */

/* Creates a handle from `cfg` (copied; `cfg` may be freed afterwards).
 * On success *out holds the handle; on failure *out is NULL and the status
 * is one of polyak_check_config()'s (call it for the reason) or
 * POLYAK_ERR_NO_MEMORY. POLYAK_ERR_INVALID_ARG also for NULL pointers. */
POLYAK_API polyak_status polyak_create(polyak_t **out, const polyak_config *cfg);

/* Registers one parameter tensor: `name` (unique, non-empty, UTF-8, copied;
 * "__metadata__" and names starting "polyak." are reserved for checkpoints),
 * `param` (its elements, contiguous, aligned to the element size, on the
 * backend's side; may be NULL only if the tensor has no elements), its
 * dtype and shape (ndim 0..8, `shape` may be NULL if ndim is 0, every dim
 * >= 0). Tensors are numbered 0, 1, ... in registration order. Zero-size
 * tensors are accepted and cost nothing in updates. Returns
 * POLYAK_ERR_INVALID_ARG for a bad argument, a duplicate name, or param
 * memory overlapping an earlier tensor's; POLYAK_ERR_STATE after
 * finalize; POLYAK_ERR_NO_MEMORY. */
POLYAK_API polyak_status polyak_add(polyak_t *p, const char *name, void *param, polyak_dtype dtype, int ndim,
                                    const int64_t *shape);

/* One named, shaped view of an arena (polyak_add_arena). */
typedef struct {
  const char *name; /* as polyak_add's */
  int ndim;         /* 0..POLYAK_MAX_NDIM */
  int64_t shape[POLYAK_MAX_NDIM];
} polyak_view;

/* Registers the tensors of one allocation, as C trainers keep them (llm.c's
 * params_memory): views[0..num_views) laid end to end from `base`, all of
 * `dtype`, which must cover exactly arena_num_elems elements. Each view is
 * then a tensor, as polyak_add would register it at its offset. Unless
 * they tile the arena, nothing is registered and the message says which
 * view runs past the end (a shape too large) or which elements no view
 * covers (one too small, or missing). All or nothing, also for the
 * per-view checks (names, duplicates, overlaps): POLYAK_ERR_INVALID_ARG,
 * POLYAK_ERR_STATE after finalize, POLYAK_ERR_NO_MEMORY. For example:
 *   polyak_view views[16];
 *   for (int i = 0; i < 16; i++)
 *     views[i] = (polyak_view){names[i], 1, {(int64_t)param_sizes[i]}};
 *   polyak_add_arena(p, params_memory, POLYAK_F32, num_parameters, views, 16); */
POLYAK_API polyak_status polyak_add_arena(polyak_t *p, void *base, polyak_dtype dtype, size_t arena_num_elems,
                                          const polyak_view *views, int num_views);

/* Registers a tensor that is not averaged but travels with the averages:
 * a buffer such as BatchNorm's running statistics or a step counter, of
 * any dtype (F64 and the integer types too). Every shadow of it is one
 * mirror of the param, set at finalize and at every update in the same
 * pass (the same launch on CUDA) as the averages, whatever the schedules
 * (timm's ModelEmaV3 and ema-pytorch copy buffers so by default). Read-outs
 * give the mirror, in the tensor's dtype (or, for F32/BF16/F16, any of
 * those three); polyak_copy_to_params and the blends write it back into the
 * param, polyak_store and polyak_restore keep and restore the param, a hard
 * update sets the mirror, and checkpoints hold it once, under the
 * tensor's name in its dtype, as PyTorch's state dicts do. On a sharded
 * handle every rank keeps the whole mirror. Arguments and errors as
 * polyak_add's, but any polyak_dtype. */
POLYAK_API polyak_status polyak_add_copy(polyak_t *p, const char *name, void *param, polyak_dtype dtype, int ndim,
                                         const int64_t *shape);

/* Ends registration: allocates the shadows, builds the plan, and sets the
 * shadows to a copy of the params (or to 0 with zero_init). With
 * skip_nonfinite, a non-finite param element is refused here
 * (POLYAK_ERR_INVALID_ARG naming the tensor and element), since the guard
 * would otherwise keep its shadow non-finite forever. Returns
 * POLYAK_ERR_STATE if already finalized, POLYAK_ERR_NO_MEMORY, or
 * POLYAK_ERR_CUDA. A handle without tensors is valid and does nothing. */
POLYAK_API polyak_status polyak_finalize(polyak_t *p, void *stream);

/* Frees the handle and its shadows (the params stay the caller's). On the
 * CUDA backend it first waits for the handle's enqueued work. NULL is a
 * no-op. */
POLYAK_API void polyak_destroy(polyak_t *p);

/* ---- The update ---------------------------------------------------------- */

/* Folds the current params into every shadow as the average after `step`
 * optimizer steps (see the step semantics above). `step` must be >= 1 and
 * greater than the last updated step, else POLYAK_ERR_INVALID_ARG and
 * nothing changes. POLYAK_ERR_STATE before finalize. The CUDA backend
 * returns once the work is enqueued on `stream`. */
POLYAK_API polyak_status polyak_update(polyak_t *p, int64_t step, void *stream);

/* The number of non-finite param elements that updates met so far, each
 * counted once per update whatever num_shadows, with or without
 * skip_nonfinite. The CUDA backend waits for the updates enqueued so far.
 * POLYAK_ERR_STATE before finalize. */
POLYAK_API polyak_status polyak_nonfinite_count(polyak_t *p, int64_t *count);

/* The step of the last update (0 before the first). */
POLYAK_API polyak_status polyak_get_step(const polyak_t *p, int64_t *step);

/* ---- Reading averages out ----------------------------------------------- */

/* The number of registered tensors. */
POLYAK_API polyak_status polyak_num_tensors(const polyak_t *p, int *num_tensors);

/* What a handle knows of one registered tensor (polyak_tensor_info). */
#define POLYAK_TENSOR_CALLERS_SHADOW 1 /* flags: shadow 0 is the caller's memory */
#define POLYAK_TENSOR_COPY           2 /* flags: copy-only (polyak_add_copy) */
typedef struct {
  const char *name;   /* as registered; valid until polyak_destroy */
  polyak_dtype dtype; /* the param's */
  int ndim;
  int64_t shape[POLYAK_MAX_NDIM]; /* [0, ndim) set, the rest 0 */
  int64_t num_elems;              /* the product of the shape (1 for ndim 0) */
  polyak_dtype shadow_dtype;      /* shadow 0's: the config's, the caller's shadow's, or a
                                     copy-only tensor's own */
  int flags;                      /* POLYAK_TENSOR_* bits */
  int64_t local_first_elem;       /* the elements this rank keeps shadows of: */
  int64_t local_num_elems;        /* [first, first + num); all of them unless sharded;
                                     -1 and -1 before polyak_finalize */
  int64_t reserved_[4];           /* 0: room for later fields */
} polyak_tensor_info_t;

/* Tensor number `tensor`'s name, dtype, shape, element count and slice
 * into *info, before or after finalize. POLYAK_ERR_INVALID_ARG for an
 * index outside 0..num_tensors - 1 or a NULL info. */
POLYAK_API polyak_status polyak_tensor_info(polyak_t *p, int tensor, polyak_tensor_info_t *info);

/* The number of the tensor registered as `name`, into *tensor: what the
 * read-outs take. POLYAK_ERR_INVALID_ARG if no tensor has that name. */
POLYAK_API polyak_status polyak_find_tensor(polyak_t *p, const char *name, int *tensor);

/* Copies shadow `shadow` of tensor `tensor` into `dst` (num_elems elements
 * of `dst_dtype`, on the backend's side), debiased with zero_init, rounded
 * to nearest even for BF16/F16. Ordered on `stream` for the CUDA backend.
 * Returns POLYAK_ERR_INVALID_ARG for an index out of range, a NULL dst or a
 * bad dtype; POLYAK_ERR_STATE before finalize, or with zero_init while the
 * average is undefined (no update yet, or every applied beta was 1). */
POLYAK_API polyak_status polyak_get_shadow(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                           void *stream);

/* polyak_get_shadow that knows dst's size: POLYAK_ERR_INVALID_ARG, and
 * nothing written, when dst_num_bytes cannot hold the tensor's elements
 * as dst_dtype. The _n read-outs (this, polyak_get_local_shadow_n,
 * polyak_get_blend_n) are the ones to use; the others trust dst. Note the
 * order: the shadow (which average), then the tensor (which parameter,
 * see polyak_find_tensor); errors name both. */
POLYAK_API polyak_status polyak_get_shadow_n(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                             size_t dst_num_bytes, void *stream);

/* ---- Checkpoints -----------------------------------------------------------
 * A checkpoint is a safetensors file: shadow 0 of each tensor under the
 * tensor's name and shape in the shadow dtype (F32 or BF16), so
 * safetensors.torch.load_file(path) gives a PyTorch model its averaged
 * weights; shadow k >= 1 under "polyak.shadow.<k>.<name>"; and the full
 * state (step, products of applied betas, schedules, seed, non-finite
 * count, an XXH3-64 checksum of the data) in "__metadata__". The same
 * bytes go to a path (polyak_save, crash-safe), into an open file at its
 * offset (polyak_save_fd, for a checkpoint inside the trainer's own state
 * file) or into memory (polyak_save_to_memory); every load checks them
 * the same way. */

/* Writes every shadow and the step state to `path`, crash-safely: a new
 * file in the same directory is fsynced and renamed over `path`, then the
 * directory is fsynced, so `path` always holds the old or the new file
 * whole. The CUDA backend first waits for all work on the device.
 * POLYAK_ERR_IO if the directory cannot be written; POLYAK_ERR_STATE
 * before finalize or while graph steps are reserved. */
POLYAK_API polyak_status polyak_save(polyak_t *p, const char *path);

/* Replaces every shadow and the step state with those saved in `path`.
 * The handle must be finalized with the same tensors (names and shapes),
 * the same number of shadows, shadow dtype, schedules, seed and zero_init,
 * the same modes (count_updates, lookahead_every, grad_norm_c,
 * layerwise_beta0, rounding; files without rounding were rounded to
 * nearest) and the same tensors with shadows of the caller's,
 * so that continuing gives the bits an uninterrupted run would (updates at
 * steps up to the saved one are refused afterwards). Everything is checked
 * before anything changes: POLYAK_ERR_IO (missing or unreadable file),
 * POLYAK_ERR_FORMAT (not a valid polyak safetensors file, or a checksum
 * mismatch), POLYAK_ERR_MISMATCH (a different handle), each with a message
 * naming the problem (the model is compared first: another model's file
 * names the first tensor missing and the first extra one, and counts the
 * rest; a shape mismatch shows both shapes; a file that is not safetensors
 * says so); then the handle is as it was and still works. The
 * CUDA backend stages through pinned host memory into new device arenas,
 * which need the shadows' memory once more while loading. */
POLYAK_API polyak_status polyak_load(polyak_t *p, const char *path);

/* A checkpoint inside the trainer's own state file: the same bytes as
 * polyak_save writes, at fd's current offset (pwrite from there), after
 * which the offset is moved just past them, so the trainer writes its own
 * state next. fd: open for writing, seekable (a regular file), not
 * O_APPEND. Not atomic and not fsynced: make the whole state file
 * crash-safe as polyak_save does (write a new file, fsync it, rename it
 * over the old one). On failure the offset stays where it was, and bytes
 * after it may have been written. POLYAK_ERR_IO for an fd it cannot use
 * (closed, read-only, O_APPEND, a pipe) or a failing write; otherwise as
 * polyak_save. Sharded: a collective like polyak_save; rank 0 writes, the
 * other ranks' fd is not used (-1 will do). */
POLYAK_API polyak_status polyak_save_fd(polyak_t *p, int fd);

/* Reads the checkpoint that starts at fd's current offset (its header says
 * where it ends; what follows is left alone) and moves the offset just
 * past it, so the trainer reads its own state next. Checks and effects as
 * polyak_load; on failure the offset stays where it was. POLYAK_ERR_IO for
 * an fd it cannot use (closed, write-only, a pipe) or one at the end of its
 * file. Sharded: each rank reads its slice from its own fd. */
POLYAK_API polyak_status polyak_load_fd(polyak_t *p, int fd);

/* *num_bytes = the size of a buffer that always holds this handle's
 * checkpoint: the header with the widest step, counts and products (they
 * are decimal text, so a save writes a few bytes less) plus the data. The
 * same for the handle's whole life, on every rank; no device work.
 * POLYAK_ERR_STATE before finalize. */
POLYAK_API polyak_status polyak_save_size(polyak_t *p, size_t *num_bytes);

/* The checkpoint polyak_save writes, byte for byte, into dst (host memory
 * of dst_num_bytes, whatever the backend); *num_bytes_written = its size,
 * which polyak_load_from_memory takes. POLYAK_ERR_INVALID_ARG, with
 * nothing written, for a NULL dst or one too short (polyak_save_size's
 * answer always suffices). Sharded: a collective like polyak_save; rank 0
 * writes, the other ranks' dst is not used (NULL will do) and they get 0. */
POLYAK_API polyak_status polyak_save_to_memory(polyak_t *p, void *dst, size_t dst_num_bytes, size_t *num_bytes_written);

/* polyak_load from src (host memory): exactly one checkpoint of
 * src_num_bytes, as polyak_save_to_memory wrote it. The same checks, the
 * same effects; a failing load changes nothing. Sharded: each rank reads
 * its slice from its own copy. */
POLYAK_API polyak_status polyak_load_from_memory(polyak_t *p, const void *src, size_t src_num_bytes);

/* ---- Schedules (pure host functions, double precision) ----------------- */

/* beta(step) of schedule `s`: 0 for step <= start_step; otherwise, with
 * t = step - start_step - 1 (0, 1, 2, ...):
 *   CONSTANT  beta
 *   TF        min(beta, (1+t)/(10+t))
 *   WARMUP    t == 0 ? 0 : clamp(1 - (1 + t/inv_gamma)^-power, beta_min, beta)
 *   LINEAR    min(beta, beta_min + (t/ramp_steps)(beta - beta_min))
 *   COSINE    beta - (beta - beta_min)(1 + cos(pi min(t, ramp_steps)/ramp_steps))/2
 *   EQUAL     t/(t+1)
 *   POWER     (t/(t+1))^(gamma+1)
 * Returns NaN if `s` is NULL or fails the checks polyak_create() makes. */
POLYAK_API double polyak_beta_at(const polyak_schedule *s, int64_t step);

/* The decay an update applies when it follows one at `last_step`:
 * prod_{s = last_step+1 .. step} beta(s), 1 for step == last_step.
 * Closed forms where they exist; WARMUP, LINEAR and COSINE multiply the
 * steps before their ceiling one by one. Returns NaN for a bad schedule or
 * for step < last_step or last_step < 0. */
POLYAK_API double polyak_beta_product(const polyak_schedule *s, int64_t last_step, int64_t step);

/* Half-life in steps of an EMA with decay beta: ln 2 / ln(1/beta), and back:
 * beta = 2^(-1/half_life). NaN outside (0, 1) and (0, inf). */
POLYAK_API double polyak_half_life_from_beta(double beta);
POLYAK_API double polyak_beta_from_half_life(double half_life_steps);

/* Effective averaging window in steps: 1/(1 - beta), and back:
 * beta = 1 - 1/window. NaN outside [0, 1) and [1, inf). */
POLYAK_API double polyak_window_from_beta(double beta);
POLYAK_API double polyak_beta_from_window(double window_steps);

/* The decay for averaging over a horizon of T steps by the heuristic
 * beta = 1 - 2/sqrt(T). NaN for T < 4 (beta would be negative). */
POLYAK_API double polyak_beta_from_horizon(double horizon_steps);

/* EDM2's relative standard deviation of the power-function EMA profile:
 * sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) for gamma > -1, and
 * back: gamma = the largest real root of
 * gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2).
 * sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94. sigma_rel peaks at
 * 0.30028 (gamma = -0.382); NaN outside gamma > -1 and 0 < sigma_rel <= peak. */
POLYAK_API double polyak_sigma_rel_from_gamma(double gamma);
POLYAK_API double polyak_gamma_from_sigma_rel(double sigma_rel);

/* ======================================================================
 * 2. Evaluating with an average
 * ====================================================================== */

/* ---- Evaluation -------------------------------------------------------------
 * Evaluate with an average, then return to the exact training weights:
 *   polyak_store(p, stream);               // keep the params
 *   polyak_copy_to_params(p, 0, stream);   // the params are now shadow 0
 *   evaluate(...);
 *   polyak_restore(p, stream);             // the params as they were, bit for bit */

/* Writes shadow `shadow` (debiased with zero_init) into every param, in the
 * param's dtype (round to nearest even). Ordered on `stream`. The params'
 * values are lost unless polyak_store kept them. POLYAK_ERR_INVALID_ARG for
 * a shadow out of range; POLYAK_ERR_STATE as polyak_get_shadow. */
POLYAK_API polyak_status polyak_copy_to_params(polyak_t *p, int shadow, void *stream);

/* Keeps an exact copy of every param (backend-side memory, allocated by the
 * first call and kept until destroy). Ordered on `stream`. The store is then
 * pending until polyak_restore or polyak_discard_store: meanwhile
 * polyak_update, polyak_hard_update and polyak_graph_reserve return
 * POLYAK_ERR_STATE, since the params likely hold an average and training
 * would silently go on from it, and a second polyak_store is refused too
 * (it would keep the average). POLYAK_ERR_STATE before finalize, while a
 * store is pending or while steps are reserved for graph replays;
 * POLYAK_ERR_NO_MEMORY. */
POLYAK_API polyak_status polyak_store(polyak_t *p, void *stream);

/* Writes the copy kept by polyak_store back into the params, bit for bit,
 * and ends the pending store; the copy stays, to restore again.
 * POLYAK_ERR_STATE without a copy. */
POLYAK_API polyak_status polyak_restore(polyak_t *p, void *stream);

/* Ends a pending store without writing the params back: training goes on
 * from the params as they are (say, an average copied in on purpose). The
 * copy is dropped (a later polyak_restore has nothing to write).
 * POLYAK_ERR_STATE without a copy. */
POLYAK_API polyak_status polyak_discard_store(polyak_t *p);

/* Blends: sum_k weights[k] * shadow_k (each debiased with zero_init), for
 * evaluating with a multi-scale average. weights has num_shadows finite
 * values summing to 1 within 1e-6, unless flags has
 * POLYAK_BLEND_ANY_WEIGHTS. The arithmetic, the same on every backend:
 * c_k = weights[k] * debias_k in double, rounded to float once; then per
 * element acc = fmaf(c_k, shadow_k, acc) for k = 0, 1, ... from acc = 0;
 * the result rounded to nearest even into the destination's dtype.
 * Shadows with weight 0 are not read. POLYAK_ERR_INVALID_ARG for bad
 * weights, POLYAK_ERR_STATE as polyak_get_shadow, POLYAK_ERR_UNSUPPORTED on
 * a sharded handle (world_size > 1). */
#define POLYAK_BLEND_ANY_WEIGHTS 1

/* The blend into every param, in their dtypes: one launch on CUDA, ordered
 * on `stream`. polyak_store first to come back with polyak_restore. */
POLYAK_API polyak_status polyak_blend_to_params(polyak_t *p, const double *weights, int flags, void *stream);

/* The blend of tensor `tensor` into dst (num_elems of dst_dtype, on the
 * backend's side), ordered on `stream`. */
POLYAK_API polyak_status polyak_get_blend(polyak_t *p, const double *weights, int flags, int tensor, void *dst,
                                          polyak_dtype dst_dtype, void *stream);
POLYAK_API polyak_status polyak_get_blend_n(polyak_t *p, const double *weights, int flags, int tensor, void *dst,
                                            polyak_dtype dst_dtype, size_t dst_num_bytes, void *stream);

/* ======================================================================
 * 3. Averaging modes beyond one EMA
 * ====================================================================== */

/* ---- Stochastic rounding of f32 shadows ---------------------------------- */

/* Rounding of f32 shadows (polyak_config.rounding). */
#define POLYAK_ROUND_NEAREST    0 /* fmaf(w, param - shadow, shadow): nearest even */
#define POLYAK_ROUND_STOCHASTIC 1 /* the same value computed in double, rounded up or down at random */

/* Stochastic rounding: rounded to nearest, an f32 shadow stops moving
 * where an update's increment w * (param - shadow) falls under half a unit
 * in its last place, 2^-25 to 2^-24 of |shadow|: w is 1 - beta for a
 * constant beta and about (gamma + 1) / t for POWER at step t, so long
 * horizons stall while the average they should hold moves on. With
 * POLYAK_ROUND_STOCHASTIC the update is computed in double and rounded to
 * one of its two f32 neighbours, up with probability (distance to the lower
 * one) / (the gap between them), so increments of any size count on
 * average (unbiased). The random bits are those bf16 shadows use, hashed
 * from (seed, step, shadow, global element index): the same bits on every
 * backend and shard count, and after a checkpoint resume. Turn it on where
 * w * d < 2^-20 |s|, with d how far the params sit from the average (their
 * movement over the averaging window) and |s| the shadow's magnitude:
 * horizons of beta >= 0.9999, POWER schedules past about 10^5 steps.
 * Shadows take the same memory and moved bytes; the CPU backend takes 1.2
 * to 3.1 times as long as rounding to nearest on one thread (the hash and
 * the double arithmetic, where nearest is bound by memory). It applies to
 * f32 shadows,
 * the library's and a caller's f32 shadow 0 (polyak_add_with_shadow; the
 * flag POLYAK_SHADOW_ROUND_NEAREST keeps that one nearest). 16-bit shadows
 * always round stochastically, whatever rounding[k] says (rounded to
 * nearest, a bf16 shadow stalls at beta 0.99 already); a caller's 16-bit
 * shadow asks for nearest with the flag. Checkpoints record the modes and
 * load only into a handle with the same ones. polyak_create refuses other
 * values (POLYAK_ERR_INVALID_ARG). */

/* ---- Shadows in the caller's memory; hard updates ----------------------- */

/* Registers a tensor as polyak_add does, whose shadow is the caller's own
 * memory `shadow`: its num_elems elements of shadow_dtype (F32, BF16 or
 * F16), aligned, on the params' side, overlapping no param or other shadow
 * (e.g. the weights of a teacher, target or G_ema model that runs forward
 * passes). polyak_finalize copies the param into it (rounded to nearest
 * even), and every update folds the param into it in place, in the same
 * launch as everything else, so the model is usable with no copy. 16-bit
 * shadows round stochastically (as bf16 shadows do: hashed from seed,
 * step, shadow and element), or to nearest even with flags
 * POLYAK_SHADOW_ROUND_NEAREST (which stalls where an update is below half
 * a unit in the last place, as at beta 0.999 in bf16). An f32 one rounds
 * as rounding[0] says, or to nearest with the flag. Such tensors need
 * num_shadows = 1, zero_init = 0, one rank and no Lookahead
 * (POLYAK_ERR_UNSUPPORTED otherwise; a communicator too). Checkpoints leave
 * their shadows out: they are the caller's model, saved with it; a
 * checkpoint saved with them loads only into a handle where the same
 * tensors have shadows of the caller's. */
#define POLYAK_SHADOW_ROUND_NEAREST 1
POLYAK_API polyak_status polyak_add_with_shadow(polyak_t *p, const char *name, void *param, polyak_dtype dtype,
                                                int ndim, const int64_t *shape, void *shadow, polyak_dtype shadow_dtype,
                                                int flags);

/* Hard update: shadow `shadow` of every tensor <- its param (rounded to
 * nearest even into a 16-bit shadow), e.g. a DQN target network every N
 * steps. Its beta product becomes 0 (zero_init's debias is then 1); the
 * step and the schedule's counts stay. Ordered on `stream`; not while
 * steps are reserved for graph replays, nor captured (POLYAK_ERR_STATE).
 * With skip_nonfinite a NaN/Inf param is refused (POLYAK_ERR_INVALID_ARG,
 * nothing written), since the shadow could never recover; the CUDA backend
 * scans first and so waits for the stream. */
POLYAK_API polyak_status polyak_hard_update(polyak_t *p, int shadow, void *stream);

/* ---- Lookahead ------------------------------------------------------------ */

/* Lookahead (Zhang et al. 2019): with lookahead_every = k, the last shadow
 * (num_shadows - 1) holds the slow weights. It is left alone except at
 * updates whose step is a multiple of k (the syncs), where in the same pass
 * as the other shadows slow <- slow + alpha (params - slow) and then params
 * <- slow, rounded to nearest even into each param's dtype. alpha = 1 - beta
 * of that shadow's schedule, whose t counts the syncs after its start_step
 * (CONSTANT with beta = 0.5 is the paper's alpha = 0.5). The other shadows
 * fold the params as they were before the sync. An update whose step skips
 * a multiple of k is refused. Needs zero_init = 0, one rank, and a schedule
 * whose beta is below 1 (alpha > 0). Params must be writable. */

/* ---- Grad-norm adaptive decay --------------------------------------------- */

/* Grad-norm adaptive decay: a shadow with grad_norm_c[k] = c > 0 takes, at
 * each update, beta = 1 - c / sqrt(1 + g^2) from the gradient norm g the
 * trainer computed (for clipping, say), read from the float registered with
 * polyak_set_grad_norm when the update runs on the device. Large gradients
 * (a fast-moving model) give beta near 1 (average longer); small ones
 * average faster. A gap of n steps applies beta^n (the norm at hand stands
 * for the steps skipped). B and 1 - B are computed in double the same way on
 * every backend: sqrt, division and the squarings of beta^n are correctly
 * rounded, so the CPU and CUDA backends agree bit for bit. A non-finite g
 * leaves such shadows as they were (beta = 1). The product of the applied
 * betas is kept next to the shadows, used for zero_init's debias, and read
 * with polyak_get_beta_product. The schedule's kind is not used; its
 * start_step must be 0 and count_updates[k] 0; not on Lookahead's shadow. */

/* The gradient norm that grad-norm shadows follow: one float, device memory
 * of the handle's device (CUDA backend) or host memory (CPU backend), read by
 * every later update (and graph replay) when it runs, so the trainer writes
 * it in place each step, ordered before polyak_update on the stream. The
 * pointer is borrowed. Graph replays read the pointer set when their steps
 * were reserved, so while steps are reserved this call (like
 * polyak_set_grads and polyak_set_layer_norms) returns POLYAK_ERR_STATE.
 * POLYAK_ERR_INVALID_ARG for a NULL, misaligned or wrong-side pointer,
 * POLYAK_ERR_STATE for a handle without grad-norm shadows. polyak_update
 * refuses (POLYAK_ERR_STATE) until it is set. */
POLYAK_API polyak_status polyak_set_grad_norm(polyak_t *p, const float *grad_norm);

/* The product of the betas applied to shadow k so far (1 before any
 * update), in double: what zero_init's debias divides by 1 - of. For a
 * grad-norm shadow it is kept on the backend's side and this call waits for
 * the device. */
POLYAK_API polyak_status polyak_get_beta_product(polyak_t *p, int shadow, double *beta_product);

/* ---- Layer-wise adaptive decay (LAWA) ------------------------------------- */

/* Layer-wise adaptive decay (LAWA): a shadow with layerwise_beta0[k] =
 * beta0 > 0 decays tensor l by beta_l = beta0 exp(-|g_l| / sum_j |g_j|),
 * from the L2 norms of the step's gradients: a layer that takes a large
 * share of the gradient averages over a shorter window. The norms come
 * from the gradients registered with polyak_set_grads (one extra launch
 * per update computes all of them, a fixed reduction order: the same
 * gradients give the same bits on every run and backend) or from a
 * per-tensor array given to polyak_set_layer_norms. beta and beta^gap for a
 * gap are computed in double the same way on every backend. A non-finite
 * gradient norm leaves these shadows as they were for the update. Such a
 * shadow's schedule is not used; it needs start_step 0, count_updates 0,
 * grad_norm_c 0, zero_init 0, one rank, and is not Lookahead's shadow. */

/* LAWA's gradients: grads[i] is tensor i's gradient (num_elems of the
 * param's dtype, contiguous, aligned, backend memory; NULL only for an
 * empty tensor), read by every later update when it runs. The table is
 * copied (uploaded once for CUDA); the memory is borrowed. After
 * polyak_finalize; replaces polyak_set_layer_norms. POLYAK_ERR_STATE on a
 * handle without LAWA shadows, before finalize or while steps are
 * reserved for graph replays; POLYAK_ERR_INVALID_ARG for a bad pointer. */
POLYAK_API polyak_status polyak_set_grads(polyak_t *p, void *const *grads);

/* ... or the norms themselves: num_tensors floats (backend memory), tensor
 * i's gradient norm at [i], read by every later update when it runs
 * (graph replays: the pointer set when their steps were reserved). */
POLYAK_API polyak_status polyak_set_layer_norms(polyak_t *p, const float *norms);

/* Shadow `shadow`'s beta for each tensor at the last update (num_tensors
 * doubles into host memory; beta 1 before any), for inspection; waits for
 * the device. POLYAK_ERR_INVALID_ARG unless the shadow is a LAWA one;
 * POLYAK_ERR_STATE before polyak_set_grads or polyak_set_layer_norms. */
POLYAK_API polyak_status polyak_get_layer_betas(polyak_t *p, int shadow, double *betas);

/* ---- EDM2 post-hoc averages ------------------------------------------------
 * Track POWER shadows at two sigma_rel (say 0.05 and 0.10), snapshot them
 * every N steps, and afterwards synthesize the average for any sigma_rel
 * (Karras et al. 2024, "Analyzing and improving the training dynamics of
 * diffusion models"). A POWER EMA read at step t weighs the params of step
 * tau by the profile (gamma + 1) tau^gamma / t^(gamma + 1); the synthesis
 * is the combination of snapshots whose profile is nearest the wanted one
 * in L2. */
#define POLYAK_MAX_SNAPSHOTS 1024

/* The combination: coefficients[i] for snapshot i (taken at step
 * snapshot_steps[i] of a POWER shadow with snapshot_sigma_rels[i]) whose
 * profile is nearest in L2 that of sigma_rel read at `step`: the normal
 * equations solved directly (Gaussian elimination with partial pivoting,
 * in double), then scaled to sum to 1. Pure host code; no handle.
 * POLYAK_ERR_INVALID_ARG for bad inputs (num_snapshots outside
 * 1..POLYAK_MAX_SNAPSHOTS, a step below 1, a sigma_rel outside (0, 0.30028],
 * the peak of sigma_rel(gamma))
 * or two snapshots with the same profile (a singular system). */
POLYAK_API polyak_status polyak_posthoc_coefficients(int num_snapshots, const int64_t *snapshot_steps,
                                                     const double *snapshot_sigma_rels, int64_t step, double sigma_rel,
                                                     double *coefficients);

/* Floats in one snapshot of this handle: its shadow arena, padding
 * included. Snapshots need a finalized handle of one rank with no shadows
 * in the caller's memory (POLYAK_ERR_UNSUPPORTED). */
POLYAK_API polyak_status polyak_snapshot_elems(polyak_t *p, int64_t *num_elems);

/* Shadow `shadow` (debiased with zero_init) as f32 into dst, one snapshot
 * (polyak_snapshot_elems floats, backend memory: device memory for CUDA),
 * in one pass, ordered on `stream`. Stack snapshots one after another to
 * synthesize from them. Keep them on the host by copying them there, or as
 * files: polyak_save, then polyak_load each into a second handle of the same
 * layout and snapshot from it. */
POLYAK_API polyak_status polyak_snapshot(polyak_t *p, int shadow, float *dst, void *stream);

/* Every param <- sum_i coefficients[i] * snapshot i (in the param's dtype,
 * rounded to nearest even), from num_snapshots snapshots stored one after
 * another at `snapshots` (backend memory). CPU: fmaf accumulation in
 * snapshot order with the coefficients rounded to float; CUDA: one cuBLAS
 * SGEMV over the snapshots as the columns of a matrix (its own summation
 * order: equal to the CPU's within float rounding), then one kernel into
 * the params; it allocates an arena of scratch and waits for the stream,
 * so it cannot be captured (POLYAK_ERR_STATE). polyak_store first to come
 * back with polyak_restore. */
POLYAK_API polyak_status polyak_synthesize_to_params(polyak_t *p, const float *snapshots, int num_snapshots,
                                                     const double *coefficients, void *stream);

/* ======================================================================
 * 4. CUDA graphs
 * ====================================================================== */

/* ---- CUDA graphs ---------------------------------------------------------
 * A captured kernel cannot take a new step number from the host at each
 * replay, so the host reserves the coming steps first; each replay of a
 * captured polyak_graph_update() then applies the next reserved step, with
 * the same weights and rounding bits as polyak_update() would:
 *
 *   polyak_graph_reserve(p, step, 1000, stream);  // steps step .. step+999
 *   cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
 *   ... forward, backward, optimizer step ...
 *   polyak_graph_update(p, stream);               // one kernel node
 *   cudaStreamEndCapture(stream, &graph);
 *   cudaGraphInstantiate(&exec, graph, 0);
 *   for (...) cudaGraphLaunch(exec, stream);       // one step per replay
 *   polyak_graph_release(p, &steps_done);          // waits; the host catches up
 *
 * Launch the replays on one stream at a time. While steps are reserved,
 * polyak_update() and, with zero_init, polyak_get_shadow() return
 * POLYAK_ERR_STATE. The CPU backend implements the same calls (each
 * polyak_graph_update() applies the next reserved step at once), so code
 * and tests run on both. polyak_update() itself refuses to be captured. */

/* Reserves steps first_step .. first_step + num_steps - 1, one per replay
 * (first_step > the last updated step; a gap before it is compensated as
 * usual). Computes their weights on the host and uploads them, then waits
 * for `stream`. POLYAK_ERR_STATE if steps are reserved already or before
 * finalize; POLYAK_ERR_INVALID_ARG for bad steps; POLYAK_ERR_NO_MEMORY. */
POLYAK_API polyak_status polyak_graph_reserve(polyak_t *p, int64_t first_step, int64_t num_steps, void *stream);

/* Enqueues one update whose step is the next reserved one, read on the
 * device: capture it into a CUDA graph (one kernel node) and replay. Past
 * the reservation a replay changes nothing and is counted as dropped.
 * POLYAK_ERR_STATE without a reservation. */
POLYAK_API polyak_status polyak_graph_update(polyak_t *p, void *stream);

/* Ends the reservation: waits for the device, then records the applied
 * steps in the host's step state and returns their number in
 * *num_steps_done (may be NULL). If replays were dropped it still records
 * the applied steps (the shadows hold them) and returns POLYAK_ERR_STATE
 * saying how many were dropped. */
POLYAK_API polyak_status polyak_graph_release(polyak_t *p, int64_t *num_steps_done);

/* ======================================================================
 * 5. Shadows sharded across ranks
 * ====================================================================== */

/* ---- Sharding -------------------------------------------------------------
 * With world_size W > 1, rank r keeps only its slice of every shadow: a
 * contiguous, element-balanced range of the flattened parameter space
 * (tensors in registration order; each boundary at a multiple of 8
 * elements of the tensor it falls in, so 16-byte aligned), and its update
 * touches only that slice (one launch). Every rank registers the full
 * params, as data-parallel training holds them. With nccl_comm set,
 * polyak_get_shadow, polyak_copy_to_params and polyak_save gather the
 * slices: one ncclAllGather of the shadow arenas (or of one tensor's pieces)
 * on nccl_comm and the caller's stream, then local read-outs. These calls
 * (and polyak_finalize) are collective: every rank makes them in the same
 * order with the same arguments (a path on every rank; rank 0 writes it),
 * from one process or thread per rank, on a blocking communicator (NCCL's
 * default), outside graph capture. The ranks agree before each gather, so a
 * rank that fails locally makes all of them return an error rather than
 * wait; finalize also checks that every rank registered the same tensors
 * and config. Gathers need device memory for the whole shadow once more
 * while they run. Without a communicator, reads of pieces held elsewhere,
 * polyak_copy_to_params and polyak_save return POLYAK_ERR_STATE. Loads need
 * no communicator: each rank reads its slice of the file.
 * polyak_nonfinite_count counts this rank's slice (after a load, rank 0
 * starts from the file's total, the others from 0; files hold the sum).
 * Params that are already sharded (FSDP, ZeRO-3): register the local shards
 * with world_size = 1; the shadows then shard the same way. */

/* The elements of tensor `tensor` whose shadows this handle keeps:
 * [*first_elem, *first_elem + *num_elems) of the tensor (all of it without
 * sharding; *num_elems may be 0). POLYAK_ERR_STATE before finalize. */
POLYAK_API polyak_status polyak_local_range(polyak_t *p, int tensor, int64_t *first_elem, int64_t *num_elems);

/* Like polyak_get_shadow for this rank's part of the tensor only (the
 * range above): no communication, dst gets *num_elems elements. */
POLYAK_API polyak_status polyak_get_local_shadow(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                                 void *stream);
POLYAK_API polyak_status polyak_get_local_shadow_n(polyak_t *p, int shadow, int tensor, void *dst,
                                                   polyak_dtype dst_dtype, size_t dst_num_bytes, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_H */
