/* offload.h: shadows in host memory for device params (shadow_location
 * POLYAK_SHADOWS_HOST with the CUDA backend), docs/offload.md.
 *
 * The host side of an offloaded handle is a CPU handle: its shadows, worker
 * threads and arithmetic are the CPU backend's (cpu_state, the first member
 * of offload_state, so the CPU backend's functions find theirs), and its
 * plan's descs point at a pinned host copy of this rank's params, "the
 * mirror". An update copies the params into the mirror on a stream of the
 * offload's own, in groups of chunks with an event each, and returns; a
 * thread of the handle folds each group into the shadows as its event
 * completes. Everything that moves data between the device and the host
 * goes through polyak_transfer_ops: copies, events and streams, which CUDA
 * implements (src/cuda/cuda_offload.c) and the tests implement with a thread
 * that completes copies late (tests/offload_standin.h), so one piece of C
 * drives both.
 *
 *   offload_backend.c   the backend's table: finalize, release, read-outs,
 *                       writes to the params, checkpoints, gathers
 *   offload_pipeline.c  the update: the mirror's copies, the thread, the
 *                       deferred errors, the overlap of the reads
 *   offload_ring.c      the pinned staging ring: other transfers in pieces */
#ifndef POLYAK_OFFLOAD_H
#define POLYAK_OFFLOAD_H

#include <pthread.h>

#include "cpu/cpu_state.h"
#include "polyak_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- the device side ------------------------------------------------------ */

enum { POLYAK_TO_HOST = 0, POLYAK_TO_DEVICE = 1 };         /* a copy's direction */
enum { POLYAK_MEMORY_HOST = 0, POLYAK_MEMORY_DEVICE = 1 }; /* where a pointer points */

/* What the offload asks of the device. Calls that can fail return a status
 * and write the reason into why[POLYAK_ERROR_BYTES]. Events are numbered
 * 0..num_events-1; recording one again replaces what it stands for, and a
 * wait on an event never recorded returns at once. `stream` is the caller's
 * (a cudaStreamT, NULL the default one) or the side stream open gave. Any
 * thread may call; calls on one event are never concurrent with its record. */
struct polyak_transfer_ops {
  const char *name; /* "CUDA" */
  /* the device side of handle p (its device, its communicator): num_events
   * events and a stream of its own (*side) */
  polyak_status (*open)(void *arg, const polyak_t *p, int num_events, void **ctx, void **side, char *why);
  /* frees everything open made; every event waited for first */
  void (*close)(void *ctx);
  /* host memory that copies read and write asynchronously (pinned); NULL
   * when it cannot be had */
  void *(*alloc_pinned)(void *ctx, size_t num_bytes);
  void (*free_pinned)(void *ctx, void *host);
  /* num_bytes between host memory and device memory, enqueued on `stream` */
  polyak_status (*copy)(void *ctx, void *dst, const void *src, size_t num_bytes, int direction, void *stream,
                        char *why);
  polyak_status (*record)(void *ctx, int event, void *stream, char *why);
  /* `stream` goes on once the event's last record completed (no host wait) */
  polyak_status (*stream_wait)(void *ctx, void *stream, int event, char *why);
  /* the host waits for the event's last record */
  polyak_status (*wait)(void *ctx, int event, char *why);
  /* *where = POLYAK_MEMORY_DEVICE for memory of the handle's device mapped
   * throughout num_bytes, POLYAK_MEMORY_HOST for host memory; an error for
   * anything else (another device's memory, a span past its allocation) */
  polyak_status (*locate)(void *ctx, const void *ptr, size_t num_bytes, int *where, char *why);
  /* *capturing = 1 if `stream` is being captured into a graph, or (stream
   * ignored, any_visible) if a capture is under way that a waiting call
   * would break */
  polyak_status (*capturing)(void *ctx, void *stream, int any_visible, int *capturing, char *why);
  /* ranks (NULL without a communicator): every rank's local_ok, and an
   * all-gather of `count` elements of elem_num_bytes from host memory to
   * host memory; finalize's handshake (the layout hash agreed) */
  polyak_status (*agree)(void *ctx, int local_ok, int *all_ok, char *why);
  polyak_status (*all_gather)(void *ctx, const void *send, void *recv, int64_t count, size_t elem_num_bytes,
                              void *stream, char *why);
  polyak_status (*finalize_agree)(void *ctx, uint64_t layout_hash, int local_ok, int *all_ok, int *same, int *other,
                                  char *why);
  /* called first on the handle's own thread (NULL: nothing to do): CUDA
   * makes the thread's capture mode relaxed, so that its host waits for
   * the copies never invalidate a global-mode capture on another thread */
  void (*thread_start)(void *ctx);
};

#ifdef POLYAK_HAVE_CUDA
extern const polyak_transfer_ops polyak_cuda_transfer_ops; /* src/cuda/cuda_offload.c */
#endif

/* The offloaded backend. */
extern const polyak_backend_ops polyak_offload_ops;

/* Makes p (created, nothing added yet) an offloaded handle whose transfers
 * go through `ops` (arg passed to its open): what polyak_create does for the
 * CUDA backend with POLYAK_SHADOWS_HOST, and what the tests do with their
 * stand-in. POLYAK_ERR_STATE once tensors are added. */
polyak_status polyak_offload_use(polyak_t *p, const polyak_transfer_ops *ops, void *arg);

/* ---- the state (p->backend) ------------------------------------------------ */

/* The pinned staging ring's slots (offload_ring.c). */
#define OFFLOAD_RING_SLOTS 4
/* The staging size when none is set, and the least one may set. */
#define OFFLOAD_DEFAULT_STAGING_BYTES ((size_t)256 << 20)
#define OFFLOAD_MIN_STAGING_BYTES     ((size_t)16 << 10)

/* The offload's groups: at least OFFLOAD_MIN_GROUP_BYTES of params each, and
 * about OFFLOAD_MAX_GROUPS at most, whatever the staging size. */
#define OFFLOAD_MIN_GROUP_BYTES ((size_t)4 << 20)
#define OFFLOAD_MAX_GROUPS      256
/* The group size for param_num_bytes of params. */
size_t polyak_offload_group_bytes(int64_t param_num_bytes);

/* Events by number. */
enum {
  EV_START,   /* the caller's stream at an update: the reads go after it */
  EV_READS,   /* every read of an update done */
  EV_WRITES,  /* every write into device memory the handle made so far */
  EV_SCALARS, /* the grad norm and LAWA's norms in the mirror */
  EV_COPIES,  /* the copy-only tensors in the mirror */
  EV_SLOT0,   /* the ring's slots, then the groups' */
  EV_GROUP0 = EV_SLOT0 + OFFLOAD_RING_SLOTS
};

/* One copy between a device range and the mirror. */
typedef struct {
  int64_t mirror_offset_bytes;
  char *device;
  int64_t num_bytes;
} offload_copy;

/* Consecutive chunks of the plan whose params one event brings. */
typedef struct {
  int64_t first_chunk, end_chunk;
  int64_t first_copy, end_copy; /* into offload_state.copies */
} offload_group;

/* The update a pipeline folds. */
typedef struct {
  polyak_update_args args;
  int scalars; /* EV_SCALARS was recorded: the grad norm and LAWA's norms come first */
} offload_job;

typedef struct {
  cpu_state host; /* first: shadows, workers, kernels, LAWA's arrays, products, the store */
  const polyak_transfer_ops *ops;
  void *ctx, *side;
  int num_events;
  /* the mirror, pinned: each averaged tensor's local piece (where
   * p->descs[i].param points, less local_first_elem), then the copy-only
   * tensors laid out as p->copies, then the grad norm and LAWA's norms */
  char *mirror;
  size_t mirror_num_bytes, copies_offset, scalars_offset;
  int64_t *piece_offsets; /* [num_tensors]: each piece's offset in the mirror (-1: none) */
  offload_copy *copies;   /* the averaged tensors' pieces, group by group */
  int64_t num_copies;
  offload_group *groups;
  int num_groups;
  const float *layer_norms; /* LAWA's norms on the device, or NULL */
  /* the ring */
  char *ring;
  size_t slot_num_bytes;
  int next_slot, slot_used[OFFLOAD_RING_SLOTS];
  /* the device memory written so far is covered by EV_WRITES on writes_stream */
  int writes_recorded;
  void *writes_stream;
  int reads_recorded; /* EV_READS stands for an update's reads */
  /* the pipeline thread and what it shares, under lock */
  pthread_t thread;
  int thread_started;
  pthread_mutex_t lock;
  pthread_cond_t wake, idle;
  int busy, stop;
  offload_job job;
  int64_t job_step;
  polyak_status failed; /* an error of queued work not reported yet */
  char failed_why[POLYAK_ERROR_BYTES];
  int broken; /* shadows may be half updated: updates refused until a load */
  char broken_why[POLYAK_ERROR_BYTES];
  char thread_why[POLYAK_ERROR_BYTES]; /* the thread's own message buffer */
} offload_state;

static inline offload_state *offload_of(const polyak_t *p)
{
  return (offload_state *)p->backend;
}

/* ---- offload_pipeline.c ---- */

/* Lays out the mirror and builds the groups (about group_num_bytes of
 * params each) and their copies. */
polyak_status polyak_offload_plan(polyak_t *p, offload_state *s, size_t group_num_bytes);
/* Points the plan's descs at the mirror (allocated). */
void polyak_offload_point_descs(polyak_t *p, offload_state *s);
/* Every param into the mirror, after the work on `stream`; waits. */
polyak_status polyak_offload_pull(polyak_t *p, offload_state *s, void *stream, const char *function);
/* The mirror's params into the device params, on `stream` (no wait). */
polyak_status polyak_offload_push(polyak_t *p, offload_state *s, void *stream, const char *function);
polyak_status polyak_offload_start_thread(polyak_t *p, offload_state *s);
void polyak_offload_stop_thread(offload_state *s);
/* Waits until no update is in flight; an error it met is reported here,
 * once, for `function` (and the handle stays refusing updates). */
polyak_status polyak_offload_join(polyak_t *p, const char *function);
/* Waits until no update is in flight, reporting nothing. */
void polyak_offload_idle(offload_state *s);
polyak_status polyak_offload_update(polyak_t *p, const polyak_update_args *args, void *stream);
/* Marks the device memory written on `stream` so far in EV_WRITES, which
 * the next reads and any host write into the mirror wait for. */
polyak_status polyak_offload_note_writes(polyak_t *p, offload_state *s, void *stream, const char *function);
/* The host waits for EV_WRITES: the mirror and the ring are no copy's source any more. */
polyak_status polyak_offload_wait_writes(polyak_t *p, offload_state *s, const char *function);
/* POLYAK_ERR_STATE for `function` while `stream` is being captured into a
 * graph or a capture is under way that a host wait would break: what
 * transfers, host waits and stream waits check first. */
polyak_status polyak_offload_refuse_capture(polyak_t *p, void *stream, const char *function);
/* A transfer failure as p's error: POLYAK_ERR_CUDA "<function>: <why>". */
polyak_status polyak_offload_fail(polyak_t *p, polyak_status status, const char *function, const char *why);

/* ---- offload_ring.c ---- */

/* Fills `slot` (num_bytes of it) with bytes offset.. of what is written. */
typedef polyak_status (*offload_producer)(polyak_t *p, void *arg, int64_t offset, int64_t num_bytes, void *slot);
/* Takes num_bytes from `slot`, bytes offset.. of what is read. */
typedef polyak_status (*offload_consumer)(polyak_t *p, void *arg, int64_t offset, int64_t num_bytes, const void *slot);

/* num_bytes into device memory dst, made by `produce` a slot at a time
 * (pieces a multiple of unit_num_bytes), copied on `stream`; no wait for
 * the last copies. */
/* (EV_WRITES covers it only where dst is a param's memory: read-outs into
 * the caller's buffers chain no streams.) */
polyak_status polyak_offload_ring_write(polyak_t *p, void *dst, int64_t num_bytes, size_t unit_num_bytes,
                                        offload_producer produce, void *arg, void *stream, const char *function);
/* num_bytes of device memory src, after the work on `stream`, handed to
 * `consume` a slot at a time in order (up to OFFLOAD_RING_SLOTS copies in
 * flight); returns once all are consumed. */
polyak_status polyak_offload_ring_read(polyak_t *p, const void *src, int64_t num_bytes, size_t unit_num_bytes,
                                       offload_consumer consume, void *arg, void *stream, const char *function);
/* Bytes between any two of host and device memory, ordered on `stream`:
 * host to host at once, device to host before it returns, to the device
 * enqueued. */
polyak_status polyak_offload_move(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream,
                                  const char *function);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_OFFLOAD_H */
