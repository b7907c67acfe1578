/*
 * polyak.h: averaged copies ("shadows") of a network's parameters (EMA,
 * Polyak/SWA means, EDM2 power EMAs, Lookahead), every shadow of every
 * tensor updated in one pass per optimizer step.
 *
 *   polyak_config cfg;
 *   polyak_config_init(&cfg);                  // CPU, 1 shadow, EMA beta 0.999
 *   cfg.backend = POLYAK_BACKEND_CUDA;
 *   polyak_t *p;
 *   polyak_create(&p, &cfg);                   // once for the whole run
 *   polyak_add(p, "wte", wte, POLYAK_BF16, 2, shape);   // every tensor, once
 *   polyak_finalize(p, stream);                // allocate, plan, copy params
 *   for (step = 1; ...; step++) { optimizer_step(); polyak_update(p, step, stream); }
 *   polyak_save(p, "ema.safetensors");         // PyTorch loads it
 *   polyak_destroy(p);
 *
 * Part 1, the core, ends at line ~240; part 2 adds layer by layer: more
 * ways to register, checkpoints in files and memory, schedule arithmetic,
 * evaluation, other modes, CUDA graphs, sharding, shadows in place (docs/).
 * Conventions: `step` counts optimizer steps from 1; skipped steps are
 * compensated exactly. A call that fails returns a status, changes nothing
 * and sets polyak_last_error(). `stream` is a cudaStream_t (NULL: default);
 * CUDA calls return once enqueued. Pointers are on the backend's side.
 * Counts are int64. One thread at a time per handle. Stable from 1.0 on;
 * polyak_config grows only by appended fields.
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

/* ==== Part 1. The core ================================================= */

#define POLYAK_MAX_SHADOWS     8   /* shadows per handle */
#define POLYAK_MAX_NDIM        8   /* dimensions per tensor */
#define POLYAK_MAX_CPU_THREADS 256 /* polyak_config.cpu_threads */

/* Status codes, values pinned; one list feeds the enum and its names. */
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

typedef struct polyak polyak_t; /* opaque handle */

/* Element types: averaged tensors F32, BF16 or F16; copy-only ones any. */
// clang-format off
typedef enum { POLYAK_F32 = 0, POLYAK_BF16 = 1, POLYAK_F16 = 2, POLYAK_F64 = 3, POLYAK_I64 = 4, POLYAK_I32 = 5,
               POLYAK_I16 = 6, POLYAK_I8 = 7, POLYAK_U8 = 8, POLYAK_BOOL = 9 } polyak_dtype;
// clang-format on

typedef enum { POLYAK_BACKEND_CPU = 0, POLYAK_BACKEND_CUDA = 1 } polyak_backend;

/* Decay schedules beta(t), formulas at polyak_beta_at(): constant, TensorFlow's
 * (1+t)/(10+t), timm's warm-up, linear and cosine ramps, the running mean
 * (Polyak, SWA), EDM2's power EMA. */
// clang-format off
typedef enum { POLYAK_SCHEDULE_CONSTANT = 0, POLYAK_SCHEDULE_TF = 1, POLYAK_SCHEDULE_WARMUP = 2,
               POLYAK_SCHEDULE_LINEAR = 3, POLYAK_SCHEDULE_COSINE = 4, POLYAK_SCHEDULE_EQUAL = 5,
               POLYAK_SCHEDULE_POWER = 6 } polyak_schedule_kind;
// clang-format on

/* A shadow's decay. Only the fields its kind uses are read: CONSTANT, TF:
 * beta; WARMUP: beta, beta_min, inv_gamma, power; LINEAR, COSINE: beta,
 * beta_min, ramp_steps; POWER: gamma; every kind: start_step. */
typedef struct {
  polyak_schedule_kind kind;
  double beta;        /* the decay, or the ceiling; 0 <= beta_min <= beta <= 1 */
  double beta_min;    /* the floor (WARMUP) or starting decay (LINEAR, COSINE) */
  double inv_gamma;   /* WARMUP: steps scale of the warm-up, > 0 */
  double power;       /* WARMUP: exponent of the warm-up, > 0 */
  double gamma;       /* POWER: EDM2's exponent, > -1 */
  int64_t ramp_steps; /* LINEAR, COSINE: steps from beta_min to beta, > 0 */
  int64_t start_step; /* beta = 0 (the shadow copies the params) up to this step */
} polyak_schedule;

#define POLYAK_ROUND_NEAREST    0 /* f32 shadows: fmaf, nearest even (default) */
#define POLYAK_ROUND_STOCHASTIC 1 /* f32 shadows: in double, rounded at random (no stall) */

/* One shadow's settings. */
typedef struct {
  polyak_schedule schedule; /* its decay */
  int rounding;             /* POLYAK_ROUND_*; 16-bit shadows always round stochastically */
  int count_updates;        /* 1: the schedule counts updates, not steps (no gap compensation) */
  double grad_norm_c;       /* c in (0, 1]: beta from the gradient norm; 0 (default): the schedule */
  double layerwise_beta0;   /* beta0 in (0, 1]: a beta per tensor from the gradients (LAWA); 0: off */
} polyak_shadow_config;

#define POLYAK_SHADOWS_DEVICE 0           /* shadows in the backend's memory (default) */
#define POLYAK_SHADOWS_HOST   1           /* host memory for CUDA params (offloaded, section 2.8) */
#define POLYAK_CONFIG_MAGIC   0x706f6c79u /* "poly", set by polyak_config_init */

/* A handle's settings: polyak_config_init, then change fields. */
typedef struct {
  size_t struct_size;                               /* set by polyak_config_init; checked by create */
  uint32_t magic;                                   /* POLYAK_CONFIG_MAGIC, set by polyak_config_init */
  polyak_backend backend;                           /* POLYAK_BACKEND_CPU (default) or POLYAK_BACKEND_CUDA */
  int device;                                       /* CUDA device ordinal (0) */
  int num_shadows;                                  /* 1..POLYAK_MAX_SHADOWS (1) */
  polyak_shadow_config shadows[POLYAK_MAX_SHADOWS]; /* [0, num_shadows) read */
  polyak_dtype shadow_dtype;                        /* POLYAK_F32 (default) or POLYAK_BF16 */
  int zero_init;           /* 1: shadows start at 0, debiased when read; 0 (default): as params */
  int skip_nonfinite;      /* 1 (default): a NaN/Inf param leaves its shadow element alone */
  uint64_t seed;           /* stochastic rounding's key (0) */
  int64_t lookahead_every; /* k > 0: the last shadow is Lookahead's slow weights; 0 (default) */
  int world_size;          /* W > 1: this handle keeps 1/W of every shadow (1) */
  int rank;                /* 0..world_size-1: which slice */
  void *nccl_comm;         /* those ranks' ncclComm_t, borrowed (CUDA backend), or NULL */
  int cpu_threads;         /* CPU backend: threads per call, the caller's included (1); 0: a core each */
  int shadow_location;     /* POLYAK_SHADOWS_DEVICE (default) or POLYAK_SHADOWS_HOST (offloaded) */
} polyak_config;

/* The 1.0 struct_size: later versions append fields, defaulted for it. */
#define POLYAK_CONFIG_SIZE_1_0 (offsetof(polyak_config, shadow_location) + sizeof(int))

/* Fills `cfg` with the defaults noted beside each field (every schedule
 * CONSTANT 0.999, beta_min 0, inv_gamma 1, power 2/3, gamma 6.94, ramp_steps
 * 1000, start_step 0). NULL is ignored. */
POLYAK_API void polyak_config_init(polyak_config *cfg);

/* Creates a handle from `cfg` (copied) into *out. Returns POLYAK_OK, a
 * status of polyak_check_config (call it for the reason: *out is NULL and
 * holds no message), or POLYAK_ERR_NO_MEMORY. */
POLYAK_API polyak_status polyak_create(polyak_t **out, const polyak_config *cfg);

/* Checks `cfg` as polyak_create does, creating nothing; the reason goes to
 * msg (msg_num_bytes, may be NULL). Returns POLYAK_OK, or what create would:
 * POLYAK_ERR_INVALID_ARG (a bad field), POLYAK_ERR_UNSUPPORTED (a backend
 * this build or machine lacks), POLYAK_ERR_CUDA, POLYAK_ERR_NCCL. */
POLYAK_API polyak_status polyak_check_config(const polyak_config *cfg, char *msg, size_t msg_num_bytes);

/* Returns the enum name of `s` ("POLYAK_OK"; "POLYAK_UNKNOWN_STATUS" for
 * other values), never NULL. */
POLYAK_API const char *polyak_status_name(polyak_status s);

/* Returns the last failing call's detail on `p` ("" if none; NULL p: ""),
 * valid until the next call. Success does not clear it. */
POLYAK_API const char *polyak_last_error(const polyak_t *p);

/* Returns the loaded library's version, POLYAK_VERSION_STRING of its build. */
POLYAK_API const char *polyak_version_string(void);

/* Returns 1 if this build has backend `b` and it can run here (CUDA: a
 * driver and a device), else 0. */
POLYAK_API int polyak_backend_available(polyak_backend b);

/* *isa = the instruction set of a finalized CPU handle's update kernels:
 * "avx512", "avx2" or "portable" (plain C, the reference); all give the
 * same bits. Finalize picks the widest this CPU runs, at most the one the
 * environment variable POLYAK_CPU_ISA names (avx512, avx2 or portable: for
 * measuring the narrower ones; another value fails finalize). Returns
 * POLYAK_ERR_INVALID_ARG for a NULL argument, POLYAK_ERR_UNSUPPORTED on
 * the CUDA backend (but for shadows in host memory, which the CPU's
 * kernels update), POLYAK_ERR_STATE before finalize. */
POLYAK_API polyak_status polyak_cpu_isa(const polyak_t *p, const char **isa);

/* Registers one parameter tensor, numbered in registration order from 0:
 * `name` (unique, UTF-8; "__metadata__" and "polyak." names reserved),
 * `param` (contiguous, aligned, on the backend's side; NULL only if
 * empty), its dtype (F32, BF16, F16) and shape (ndim 0..POLYAK_MAX_NDIM).
 * Returns POLYAK_ERR_INVALID_ARG (bad argument, duplicate name, memory
 * overlapping another tensor's), POLYAK_ERR_STATE after finalize, or
 * POLYAK_ERR_NO_MEMORY. */
POLYAK_API polyak_status polyak_add(polyak_t *p, const char *name, void *param, polyak_dtype dtype, int ndim,
                                    const int64_t *shape);

/* Ends registration: allocates the shadows, builds the plan and sets the
 * shadows to the params (0 with zero_init). Returns POLYAK_ERR_INVALID_ARG
 * for a non-finite param with skip_nonfinite (named), POLYAK_ERR_STATE if
 * finalized already, POLYAK_ERR_NO_MEMORY, POLYAK_ERR_CUDA. */
POLYAK_API polyak_status polyak_finalize(polyak_t *p, void *stream);

/* Folds the params into every shadow as the average after `step` steps,
 * applying the product of the betas of the steps since the last update.
 * Returns POLYAK_ERR_INVALID_ARG unless step > the last updated step,
 * POLYAK_ERR_STATE before finalize, while a polyak_store is pending or while
 * steps are reserved for graph replays. */
POLYAK_API polyak_status polyak_update(polyak_t *p, int64_t step, void *stream);

/* *step = the step of the last update (0 before the first). Returns
 * POLYAK_ERR_INVALID_ARG for a NULL argument. */
POLYAK_API polyak_status polyak_get_step(const polyak_t *p, int64_t *step);

/* *count = the non-finite param elements the updates met (once per update,
 * whatever num_shadows); waits for the device. POLYAK_ERR_STATE before
 * finalize. */
POLYAK_API polyak_status polyak_nonfinite_count(polyak_t *p, int64_t *count);

/* *num_tensors = the registered tensors. */
POLYAK_API polyak_status polyak_num_tensors(const polyak_t *p, int *num_tensors);

/* *tensor = the number of the tensor registered as `name`; read-outs take
 * it. POLYAK_ERR_INVALID_ARG if there is none. */
POLYAK_API polyak_status polyak_find_tensor(polyak_t *p, const char *name, int *tensor);

/* Copies shadow `shadow` of tensor `tensor` (the average, then the
 * parameter) into dst: num_elems of dst_dtype on the backend's side,
 * dst_num_bytes at most, debiased with zero_init, rounded to nearest even
 * for 16-bit types. Returns POLYAK_ERR_INVALID_ARG (an index out of range,
 * dst NULL or too small, a bad dtype: nothing written) or POLYAK_ERR_STATE
 * (before finalize; with zero_init, before the average exists). */
POLYAK_API polyak_status polyak_get_shadow_n(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                             size_t dst_num_bytes, void *stream);

/* polyak_get_shadow_n trusting dst to hold the tensor. */
POLYAK_API polyak_status polyak_get_shadow(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                           void *stream);

/* Writes every shadow and the step state to `path` as safetensors (shadow 0
 * under the tensors' names, so safetensors.torch.load_file gives a model its
 * averaged weights), crash-safely: `path` holds the old file or the new one,
 * whole. Waits for the device. Returns POLYAK_ERR_IO, POLYAK_ERR_STATE
 * (before finalize, while graph steps are reserved). docs/checkpoints.md. */
POLYAK_API polyak_status polyak_save(polyak_t *p, const char *path);

/* Replaces every shadow and the step state with those saved in `path`, for
 * a handle finalized with the same tensors, param dtypes and settings;
 * everything is checked before anything changes, every byte against the
 * checksum. Returns POLYAK_ERR_IO (unreadable, or not a regular file: a
 * FIFO is refused, not waited on), POLYAK_ERR_FORMAT (not a valid polyak
 * checkpoint, a checksum mismatch), POLYAK_ERR_MISMATCH (another model or
 * settings), each named. */
POLYAK_API polyak_status polyak_load(polyak_t *p, const char *path);

/* Frees the handle and its shadows (the params stay the caller's), after
 * its enqueued work. NULL is a no-op. */
POLYAK_API void polyak_destroy(polyak_t *p);

/* ==== Part 2. Beyond the core ========================================== */

/* ---- 2.1 Registering tensors ------------------------------------------- */

/* One named, shaped view of an arena (polyak_add_arena). */
typedef struct {
  const char *name; /* as polyak_add's */
  int ndim;         /* 0..POLYAK_MAX_NDIM */
  int64_t shape[POLYAK_MAX_NDIM];
} polyak_view;

/* Registers views[0..num_views) of one allocation of `dtype`, laid end to
 * end from `base` (llm.c's params_memory); they must tile exactly
 * arena_num_elems elements. All or nothing; errors as polyak_add's, naming
 * the view that runs past the end or the elements none covers. */
POLYAK_API polyak_status polyak_add_arena(polyak_t *p, void *base, polyak_dtype dtype, size_t arena_num_elems,
                                          const polyak_view *views, int num_views);

/* Registers a tensor that travels with the averages without being averaged
 * (BatchNorm statistics, counters), of any dtype: each update copies it
 * into one mirror, read out, written back and saved like a shadow 0.
 * Arguments and errors as polyak_add's. docs/copy-only.md. */
POLYAK_API polyak_status polyak_add_copy(polyak_t *p, const char *name, void *param, polyak_dtype dtype, int ndim,
                                         const int64_t *shape);

/* polyak_add_with_shadow flags: a 16-bit (or f32) caller's shadow rounds to
 * nearest even instead of stochastically. */
#define POLYAK_SHADOW_ROUND_NEAREST 1

/* Registers a tensor whose shadow 0 is the caller's memory `shadow`
 * (num_elems of shadow_dtype F32, BF16 or F16, aligned, on the params'
 * side): a teacher or target model updated in place, usable with no copy.
 * Needs num_shadows 1, zero_init 0, one rank, no Lookahead
 * (POLYAK_ERR_UNSUPPORTED). Checkpoints leave such shadows out.
 * docs/callers-shadows.md. */
POLYAK_API polyak_status polyak_add_with_shadow(polyak_t *p, const char *name, void *param, polyak_dtype dtype,
                                                int ndim, const int64_t *shape, void *shadow, polyak_dtype shadow_dtype,
                                                int flags);

#define POLYAK_TENSOR_CALLERS_SHADOW 1 /* polyak_tensor_info_t.flags: shadow 0 is the caller's */
#define POLYAK_TENSOR_COPY           2 /* polyak_tensor_info_t.flags: copy-only */

/* What a handle knows of one registered tensor. */
typedef struct {
  const char *name;   /* as registered; valid until polyak_destroy */
  polyak_dtype dtype; /* the param's */
  int ndim;
  int64_t shape[POLYAK_MAX_NDIM]; /* [0, ndim) set, the rest 0 */
  int64_t num_elems;              /* the product of the shape (1 for ndim 0) */
  polyak_dtype shadow_dtype;      /* shadow 0's */
  int flags;                      /* POLYAK_TENSOR_* bits */
  int64_t local_first_elem;       /* this rank's elements: [first, first + num), */
  int64_t local_num_elems;        /* all unless sharded; -1 before finalize */
  int64_t reserved_[4];           /* 0 */
} polyak_tensor_info_t;

/* *info = tensor `tensor`'s name, dtype, shape and slice, before or after
 * finalize. POLYAK_ERR_INVALID_ARG for an index out of range or NULL info. */
POLYAK_API polyak_status polyak_tensor_info(polyak_t *p, int tensor, polyak_tensor_info_t *info);

/* ---- 2.2 Checkpoints in files and memory ---------------------------------
 * The same bytes as polyak_save, checked the same way on every load. */

/* Writes the checkpoint at fd's offset and moves the offset past it, for a
 * checkpoint inside the trainer's own state file (a seekable, writable fd,
 * not O_APPEND). Not atomic, not fsynced. POLYAK_ERR_IO for an fd it cannot
 * use; otherwise as polyak_save. */
POLYAK_API polyak_status polyak_save_fd(polyak_t *p, int fd);

/* Reads the checkpoint starting at fd's offset and moves the offset past
 * it; on failure the offset stays. From a pipe or socket it reads exactly
 * the checkpoint's bytes, in order (waiting for them); on failure those
 * read are gone. Checks and errors as polyak_load's. */
POLYAK_API polyak_status polyak_load_fd(polyak_t *p, int fd);

/* *num_bytes = a size that always holds this handle's checkpoint, the same
 * for its whole life. POLYAK_ERR_STATE before finalize. */
POLYAK_API polyak_status polyak_save_size(polyak_t *p, size_t *num_bytes);

/* Writes the checkpoint into dst (host memory of dst_num_bytes);
 * *num_bytes_written = its size. POLYAK_ERR_INVALID_ARG, nothing written,
 * for a NULL or short dst. */
POLYAK_API polyak_status polyak_save_to_memory(polyak_t *p, void *dst, size_t dst_num_bytes, size_t *num_bytes_written);

/* polyak_load from exactly one checkpoint of src_num_bytes in host memory. */
POLYAK_API polyak_status polyak_load_from_memory(polyak_t *p, const void *src, size_t src_num_bytes);

/* Recomputes the checksum of the checkpoint filling `checkpoint` (host
 * memory, num_bytes), as its format version defines it, for a tool that
 * edited its header (the Python package assembles sharded states so); the
 * checksum detects damage and authenticates nothing. No handle, no message:
 * POLYAK_ERR_INVALID_ARG for NULL, POLYAK_ERR_FORMAT for what is not a
 * polyak checkpoint of format 1 or 2 with its checksum field. */
POLYAK_API polyak_status polyak_checkpoint_reseal(void *checkpoint, size_t num_bytes);

/* ---- 2.3 Schedule arithmetic (pure host functions, double) --------------- */

/* Returns beta(step) of `s`: 0 for step <= start_step, else with t = step -
 * start_step - 1:
 *   CONSTANT  beta
 *   TF        min(beta, (1+t)/(10+t))
 *   WARMUP    t == 0 ? 0 : clamp(1 - (1 + t/inv_gamma)^-power, beta_min, beta)
 *   LINEAR    min(beta, beta_min + (t/ramp_steps)(beta - beta_min))
 *   COSINE    beta - (beta - beta_min)(1 + cos(pi min(t, ramp_steps)/ramp_steps))/2
 *   EQUAL     t/(t+1)
 *   POWER     (t/(t+1))^(gamma+1)
 * NaN for NULL or a schedule polyak_create would refuse. */
POLYAK_API double polyak_beta_at(const polyak_schedule *s, int64_t step);

/* Returns prod_{s = last_step+1 .. step} beta(s), the decay of an update
 * after one at last_step (1 for step == last_step); NaN for a bad schedule,
 * step < last_step or last_step < 0. */
POLYAK_API double polyak_beta_product(const polyak_schedule *s, int64_t last_step, int64_t step);

/* Half-life in steps, ln 2 / ln(1/beta), and back; NaN outside (0, 1) and
 * (0, inf). */
POLYAK_API double polyak_half_life_from_beta(double beta);
POLYAK_API double polyak_beta_from_half_life(double half_life_steps);

/* Averaging window in steps, 1/(1 - beta), and back; NaN outside [0, 1)
 * and [1, inf). */
POLYAK_API double polyak_window_from_beta(double beta);
POLYAK_API double polyak_beta_from_window(double window_steps);

/* Returns 1 - 2/sqrt(T), a decay for a horizon of T steps; NaN for T < 4. */
POLYAK_API double polyak_beta_from_horizon(double horizon_steps);

/* EDM2's sigma_rel of a power EMA, sqrt((gamma+1) / ((gamma+2)^2
 * (gamma+3))), and back (0.05 <-> 16.97, 0.10 <-> 6.94); NaN outside
 * gamma > -1 and 0 < sigma_rel <= 0.30028 (the peak). */
POLYAK_API double polyak_sigma_rel_from_gamma(double gamma);
POLYAK_API double polyak_gamma_from_sigma_rel(double sigma_rel);

/* ---- 2.4 Evaluating with an average --------------------------------------
 *   polyak_store(p, stream);              // keep the params
 *   polyak_copy_to_params(p, 0, stream);  // the params are now shadow 0
 *   evaluate(...);
 *   polyak_restore(p, stream);            // back, bit for bit
 * docs/evaluation.md. */

/* Writes shadow `shadow` (debiased) into every param in its dtype (nearest
 * even). POLYAK_ERR_INVALID_ARG for a bad shadow; POLYAK_ERR_STATE as
 * polyak_get_shadow_n. */
POLYAK_API polyak_status polyak_copy_to_params(polyak_t *p, int shadow, void *stream);

/* Keeps an exact copy of every param (allocated once). Until polyak_restore
 * or polyak_discard_store the store is pending, and updates, hard updates,
 * graph reservations and a second store return POLYAK_ERR_STATE.
 * POLYAK_ERR_STATE also before finalize; POLYAK_ERR_NO_MEMORY. */
POLYAK_API polyak_status polyak_store(polyak_t *p, void *stream);

/* Writes the stored copy back into the params and ends the pending store
 * (the copy stays). POLYAK_ERR_STATE without a copy. */
POLYAK_API polyak_status polyak_restore(polyak_t *p, void *stream);

/* Ends a pending store without writing the params back and drops the copy.
 * POLYAK_ERR_STATE without a copy. */
POLYAK_API polyak_status polyak_discard_store(polyak_t *p);

/* Blends: sum_k weights[k] * shadow_k (each debiased), with c_k = weights[k]
 * * debias_k rounded to float once and acc = fmaf(c_k, shadow_k, acc) for k
 * = 0, 1, ... on every backend. weights: num_shadows finite values summing
 * to 1 within 1e-6 unless flags has POLYAK_BLEND_ANY_WEIGHTS. Errors:
 * POLYAK_ERR_INVALID_ARG (weights), POLYAK_ERR_STATE (as a read-out),
 * POLYAK_ERR_UNSUPPORTED (sharded). */
#define POLYAK_BLEND_ANY_WEIGHTS 1

/* The blend into every param, in its dtype, in one pass. */
POLYAK_API polyak_status polyak_blend_to_params(polyak_t *p, const double *weights, int flags, void *stream);

/* The blend of tensor `tensor` into dst (num_elems of dst_dtype), with and
 * without dst's size. */
POLYAK_API polyak_status polyak_get_blend_n(polyak_t *p, const double *weights, int flags, int tensor, void *dst,
                                            polyak_dtype dst_dtype, size_t dst_num_bytes, void *stream);
POLYAK_API polyak_status polyak_get_blend(polyak_t *p, const double *weights, int flags, int tensor, void *dst,
                                          polyak_dtype dst_dtype, void *stream);

/* ---- 2.5 Averaging modes beyond one EMA ----------------------------------
 * Stochastic rounding (shadows[k].rounding): docs/stochastic-rounding.md.
 * Counting updates (shadows[k].count_updates, SWA): docs/counting-updates.md.
 * Lookahead (lookahead_every): the last shadow holds the slow weights; at
 * steps that are multiples of k they fold the params and are written back
 * into them (alpha = 1 - beta of that shadow's schedule): docs/lookahead.md. */

/* Hard update: shadow `shadow` of every tensor <- its param (a DQN target
 * network); its beta product becomes 0. POLYAK_ERR_INVALID_ARG for a
 * non-finite param with skip_nonfinite (nothing written), POLYAK_ERR_STATE
 * while steps are reserved, a store is pending or the stream is captured. */
POLYAK_API polyak_status polyak_hard_update(polyak_t *p, int shadow, void *stream);

/* Grad-norm decay (shadows[k].grad_norm_c = c): beta = 1 - c / sqrt(1 +
 * g^2) from the gradient norm g read from `grad_norm` (one float of the
 * backend's memory, borrowed, written by the trainer each step before the
 * update). Updates refuse (POLYAK_ERR_STATE) until it is set; refused
 * while steps are reserved. docs/grad-norm.md. */
POLYAK_API polyak_status polyak_set_grad_norm(polyak_t *p, const float *grad_norm);

/* *beta_product = the product of the betas applied to shadow `shadow` (1
 * before any update); waits for the device for a grad-norm shadow. */
POLYAK_API polyak_status polyak_get_beta_product(polyak_t *p, int shadow, double *beta_product);

/* LAWA (shadows[k].layerwise_beta0 = beta0): tensor l decays by beta0
 * exp(-|g_l| / sum_j |g_j|) from its gradient's L2 norm, from grads[i]
 * (tensor i's gradient, backend memory, borrowed; the table is copied) or
 * from the norms themselves (num_tensors floats). After finalize; refused
 * while steps are reserved. docs/lawa.md. */
POLYAK_API polyak_status polyak_set_grads(polyak_t *p, void *const *grads);
POLYAK_API polyak_status polyak_set_layer_norms(polyak_t *p, const float *norms);

/* betas[0..num_tensors) = shadow `shadow`'s beta per tensor at the last
 * update (1 before any); waits for the device. POLYAK_ERR_INVALID_ARG unless
 * it is a LAWA shadow; POLYAK_ERR_STATE before a source is set. */
POLYAK_API polyak_status polyak_get_layer_betas(polyak_t *p, int shadow, double *betas);

/* EDM2 post-hoc averages: snapshot POWER shadows every N steps, then
 * synthesize the average of any sigma_rel from them. docs/edm2-posthoc.md. */
#define POLYAK_MAX_SNAPSHOTS 1024

/* coefficients[i] for snapshot i (of a POWER shadow with
 * snapshot_sigma_rels[i], taken at snapshot_steps[i]) whose sum best fits,
 * in L2, the profile of sigma_rel read at `step`; sums to 1. No handle.
 * POLYAK_ERR_INVALID_ARG for bad inputs or a singular system. */
POLYAK_API polyak_status polyak_posthoc_coefficients(int num_snapshots, const int64_t *snapshot_steps,
                                                     const double *snapshot_sigma_rels, int64_t step, double sigma_rel,
                                                     double *coefficients);

/* *num_elems = floats in one snapshot (the shadow arena, padding included).
 * POLYAK_ERR_UNSUPPORTED when sharded or with caller's shadows. */
POLYAK_API polyak_status polyak_snapshot_elems(polyak_t *p, int64_t *num_elems);

/* Shadow `shadow` (debiased) as f32 into dst, one snapshot of backend
 * memory. */
POLYAK_API polyak_status polyak_snapshot(polyak_t *p, int shadow, float *dst, void *stream);

/* Every param <- sum_i coefficients[i] * snapshot i, from num_snapshots
 * snapshots stacked at `snapshots` (backend memory), in the params'
 * dtypes. CUDA: cuBLAS SGEMV (equal to the CPU's within float rounding);
 * waits for the stream, so not captured (POLYAK_ERR_STATE). */
POLYAK_API polyak_status polyak_synthesize_to_params(polyak_t *p, const float *snapshots, int num_snapshots,
                                                     const double *coefficients, void *stream);

/* ---- 2.6 CUDA graphs ------------------------------------------------------
 * A captured update cannot take a step from the host, so the host reserves
 * the coming steps and each replay of a captured polyak_graph_update applies
 * the next one (same bits as polyak_update). Launches of one handle must not
 * overlap: replays on one stream at a time. Calls that wait for the device,
 * allocate or change host state (store, restore, discard_store, reserve,
 * release, set_grad_norm, set_grads with a new table, set_layer_norms,
 * hard_update, nonfinite_count, get_layer_betas, grad-norm products) return
 * POLYAK_ERR_STATE while a capture they can see is under way, and the
 * capture survives. The CPU backend implements the same calls.
 * docs/cuda-graphs.md. */

/* The most steps one reservation holds: its table of weights (4 bytes a
 * step and shadow) stays within 16 MiB per shadow. Reserve again after a
 * release for more. */
#define POLYAK_MAX_GRAPH_STEPS ((int64_t)1 << 22)

/* Reserves steps first_step .. first_step + num_steps - 1 (num_steps at most
 * POLYAK_MAX_GRAPH_STEPS) and waits for `stream`. POLYAK_ERR_STATE if
 * reserved already or before finalize, POLYAK_ERR_INVALID_ARG for bad
 * steps, POLYAK_ERR_NO_MEMORY. */
POLYAK_API polyak_status polyak_graph_reserve(polyak_t *p, int64_t first_step, int64_t num_steps, void *stream);

/* Enqueues one update of the next reserved step, read on the device: the
 * call to capture. Past the reservation a replay is dropped (counted).
 * POLYAK_ERR_STATE without a reservation. */
POLYAK_API polyak_status polyak_graph_update(polyak_t *p, void *stream);

/* Ends the reservation: waits, records the applied steps and returns their
 * number in *num_steps_done (may be NULL). POLYAK_ERR_STATE, after
 * recording them, if replays were dropped. */
POLYAK_API polyak_status polyak_graph_release(polyak_t *p, int64_t *num_steps_done);

/* ---- 2.7 Shadows sharded across ranks ------------------------------------
 * With world_size W > 1 rank r keeps one contiguous, element-balanced slice
 * of the flattened parameter space; every rank registers the whole params.
 * With nccl_comm, whole read-outs, copies to params and saves gather the
 * slices (collectives: every rank calls them alike). docs/sharding.md. */

/* [*first_elem, *first_elem + *num_elems) = the elements of tensor `tensor`
 * this rank keeps shadows of. POLYAK_ERR_STATE before finalize. */
POLYAK_API polyak_status polyak_local_range(polyak_t *p, int tensor, int64_t *first_elem, int64_t *num_elems);

/* polyak_get_shadow_n of this rank's part only (the range above), with no
 * communication; and the form that trusts dst. */
POLYAK_API polyak_status polyak_get_local_shadow_n(polyak_t *p, int shadow, int tensor, void *dst,
                                                   polyak_dtype dst_dtype, size_t dst_num_bytes, void *stream);
POLYAK_API polyak_status polyak_get_local_shadow(polyak_t *p, int shadow, int tensor, void *dst, polyak_dtype dst_dtype,
                                                 void *stream);

/* Checkpoint shards (docs/scale.md): each rank writes only its own slice,
 * with no gather, to its own file in directory `dir`,
 * polyak-step<step>-<save id>-rank<r>-of<W>.safetensors, crash-safely; the
 * W files of one save form a set, told apart from other saves' by the save
 * id, which every rank computes alike with no exchange. A rank's extra
 * memory is one host buffer of 4 MiB and the header. Then it removes the
 * sets older than the newest complete one. Any rank may call it at any
 * time; with nccl_comm it is a collective that ends in one verdict. Waits
 * for the device. Returns POLYAK_ERR_IO (dir unusable, a write failed),
 * POLYAK_ERR_STATE (as polyak_save; or dir holds a complete set of a later
 * step, or of this step from another save: another run's, another
 * handle's; one directory per independent handle), POLYAK_ERR_MISMATCH
 * (with nccl_comm: a rank's save id differs, its params are not the
 * others'; without one such files never form a set, and only a later load
 * tells), POLYAK_ERR_UNSUPPORTED (shadows in the caller's memory). */
POLYAK_API polyak_status polyak_save_shards(polyak_t *p, const char *dir);

/* Loads the newest complete set in `dir`, written at any world size, into
 * this rank's slice (any world size, 1 included): it reads, with pread,
 * only the blocks of the files that hold its slice, and verifies every
 * block it reads and every header it opens before anything changes (rank 0
 * opens every file's header). Returns POLYAK_ERR_IO (no complete set: the
 * file missing is named), POLYAK_ERR_FORMAT (a file damaged, truncated or
 * from another save), POLYAK_ERR_MISMATCH (another model or settings), each
 * naming the file, POLYAK_ERR_STATE (two complete sets of the newest step
 * from different saves, both named; with nccl_comm, ranks that chose
 * different sets); the handle is then as it was. A newer incomplete set (a
 * save under way or killed) is passed over for the newest complete one,
 * silently: polyak_get_step says which step was loaded. Should a file
 * change between the checking and the copying pass, the shadows are partly
 * written and every call but a load returns POLYAK_ERR_STATE until a load
 * succeeds. */
POLYAK_API polyak_status polyak_load_shards(polyak_t *p, const char *dir);

/* ---- 2.8 Shadows in place ------------------------------------------------
 * A handle's shadows stay at the addresses finalize gave them until
 * polyak_destroy: loads copy into them, nothing moves them. A caller may
 * read them there (a DLPack view, torch.distributed.checkpoint writing each
 * rank's part straight from them) and write them (a checkpoint loaded in
 * place): polyak_begin_shadow_write first, then the values, then
 * polyak_set_step_state, which checks the step state and ends the write.
 * Until then updates, hard updates, graph reservations and saves return
 * POLYAK_ERR_STATE (a write that failed half-way leaves the handle so until
 * a good step state or a load). docs/shadow-views.md. */

/* *data = this rank's piece of shadow `shadow` of tensor `tensor` (for a
 * copy-only tensor, shadow 0: its mirror) in the backend's memory, holding
 * *num_elems elements of *dtype, contiguous, in the tensor's flattened
 * order from element local_first_elem (polyak_local_range), as updates keep
 * it: with zero_init not debiased; a caller's shadow is their memory. NULL
 * with *num_elems 0 for an empty piece. dtype and num_elems may be NULL.
 * POLYAK_ERR_STATE before finalize; POLYAK_ERR_INVALID_ARG for an index out
 * of range (a copy-only tensor has shadow 0 only) or NULL data. */
POLYAK_API polyak_status polyak_shadow_data(polyak_t *p, int shadow, int tensor, void **data, polyak_dtype *dtype,
                                            int64_t *num_elems);

/* A handle's step state: what a checkpoint carries besides the shadows. */
typedef struct {
  size_t struct_size;                        /* sizeof(polyak_step_state), set by the caller */
  int num_shadows;                           /* the handle's */
  int shadows_open;                          /* get: 1 inside polyak_begin_shadow_write; set: ignored */
  int64_t step;                              /* the last updated step, 0 before any */
  int64_t nonfinite_count;                   /* this rank's count (polyak_nonfinite_count) */
  double beta_products[POLYAK_MAX_SHADOWS];  /* polyak_get_beta_product of each shadow */
  int64_t update_counts[POLYAK_MAX_SHADOWS]; /* updates each shadow counted (count_updates, Lookahead) */
} polyak_step_state;

/* *state = the handle's step state (struct_size and the rest written);
 * waits for the device. POLYAK_ERR_STATE before finalize. */
POLYAK_API polyak_status polyak_get_step_state(polyak_t *p, polyak_step_state *state);

/* Declares that the caller is about to write shadows through their
 * addresses (polyak_shadow_data): until polyak_set_step_state or a load
 * succeeds, updates, hard updates, graph reservations and saves return
 * POLYAK_ERR_STATE. Waits for the device (no update still in flight).
 * POLYAK_ERR_STATE before finalize, while steps are reserved, a store is
 * pending or a capture is under way. */
POLYAK_API polyak_status polyak_begin_shadow_write(polyak_t *p);

/* Replaces the step state with *state, checked as a checkpoint's is:
 * struct_size and num_shadows the handle's, step and counts >= 0, each
 * update count <= step, each beta product in [0, 1]; then ends a
 * polyak_begin_shadow_write. POLYAK_ERR_INVALID_ARG (named) or
 * POLYAK_ERR_STATE (as polyak_begin_shadow_write) change nothing. */
POLYAK_API polyak_status polyak_set_step_state(polyak_t *p, const polyak_step_state *state);

/* ---- 2.8 Shadows in host memory for device params --------------------------
 * cfg.backend = POLYAK_BACKEND_CUDA with cfg.shadow_location =
 * POLYAK_SHADOWS_HOST: the params stay on the device, the shadows (and the
 * copy-only tensors' mirrors) live in host memory, and the CPU's workers
 * (cpu_threads) do the arithmetic, with the bits of a device-resident
 * handle. An update enqueues copies of the params into pinned host memory
 * on a stream of the handle's own and returns without waiting; the
 * caller's stream waits for those reads (no more) unless the trainer
 * overlaps them with its next forward and backward passes. Device memory:
 * none beyond events and a stream (with nccl_comm: the staging size for
 * gathers); pinned host memory: the staging size plus a copy of this
 * rank's params. The host blocks at a call while an update is in flight
 * (polyak_update included), and at Lookahead's syncs. Errors of work queued
 * after polyak_update returned are reported by the next call; updates are
 * then refused (POLYAK_ERR_STATE) until a load. Refused there: graph mode,
 * polyak_add_with_shadow, polyak_set_grads (pass norms by
 * polyak_set_layer_norms), synthesis from device snapshots. Read-out
 * destinations may be host or device memory. The CPU backend ignores
 * POLYAK_SHADOWS_HOST (its shadows are host memory). docs/offload.md. */

/* Before finalize: num_bytes of pinned host memory for transfers besides
 * the params' copy (and, with nccl_comm, of device memory for gathers);
 * 0: the default, 256 MiB; at least 16 KiB. POLYAK_ERR_STATE after finalize
 * or for a handle that is not offloaded. */
POLYAK_API polyak_status polyak_set_offload_staging(polyak_t *p, size_t num_bytes);

/* overlap 1: later updates leave the reads of the averaged params in flight
 * without making their stream wait, and the trainer calls
 * polyak_wait_param_reads before anything next writes the averaged params:
 * the optimizer step, hooks that step in backward, SAM's perturbation,
 * loading a state dict, and a forward that writes averaged float buffers in
 * place (BatchNorm's running statistics added with polyak_add: wait before
 * the forward, or keep 0). The update's stream still waits for its small
 * reads, which the next forward and backward write: the copy-only tensors
 * (BatchNorm's statistics and counters), the grad norm (clip_grad_norm_)
 * and the layer norms. The library orders its own writes (copies, blends,
 * synthesis into the params, restore, Lookahead) after its reads. 0 (the
 * default): the update's stream waits for every read. Any handle (only
 * offloaded ones read asynchronously). POLYAK_ERR_INVALID_ARG unless 0 or
 * 1. docs/offload.md lists every writer. */
POLYAK_API polyak_status polyak_overlap_param_reads(polyak_t *p, int overlap);

/* Makes `stream` wait, on the device (the host does not), until the last
 * update's reads of the params are done; returns an error that work queued
 * by an update met, if known by now. POLYAK_OK at once for a handle that is
 * not offloaded. POLYAK_ERR_STATE before finalize, and for an offloaded
 * handle while `stream` is being captured into a graph or a capture is
 * under way. */
POLYAK_API polyak_status polyak_wait_param_reads(polyak_t *p, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_H */
