/* cuda_state.h: what the CUDA backend's files share: the handle's device
 * state and the functions one file defines for another (the operations
 * table is in cuda_backend.c). CUDA builds only. */
#ifndef POLYAK_CUDA_STATE_H
#define POLYAK_CUDA_STATE_H

#include <cublas_v2.h>
#include <cuda.h> /* the driver's types; its functions come through the runtime (cuda_device.c) */
#include <cuda_runtime.h>

#include "agreement.h"
#include "launch.h"
#include "polyak_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { COUNT_UPDATES, COUNT_INIT, FIRST_NONFINITE, NUM_COUNTERS };

/* The driver functions the backend calls (polyak_cuda_driver_load). */
typedef struct {
  CUresult (*device_get)(CUdevice *, int);
  CUresult (*primary_ctx_retain)(CUcontext *, CUdevice);
  CUresult (*primary_ctx_release)(CUdevice);
  CUresult (*primary_ctx_get_state)(CUdevice, unsigned int *, int *);
  CUresult (*ctx_push)(CUcontext);
  CUresult (*ctx_pop)(CUcontext *);
  CUresult (*ctx_get_current)(CUcontext *);
  CUresult (*mem_get_address_range)(CUdeviceptr *, size_t *, CUdeviceptr);
  CUresult (*pointer_get_attributes)(unsigned int, CUpointer_attribute *, void **, CUdeviceptr);
} polyak_cuda_driver;

/* What polyak_cuda_enter did, for polyak_cuda_leave to undo. */
typedef struct {
  polyak_cuda_driver driver;
  int pushed;      /* the handle's context is pushed on the caller's stack */
  int retained;    /* ... and referenced for this call only (before finalize) */
  CUdevice device; /* whose primary context that is */
} polyak_cuda_scope;

typedef struct {
  polyak_cuda_driver driver;
  CUcontext context; /* the handle device's primary context, referenced for the handle's life */
  CUdevice device;
  int update_grid; /* blocks that fit on the device at once */
  int io_grid;     /* blocks for the init and read-out kernels */
  void *shadows[POLYAK_MAX_SHADOWS];
  polyak_tensor_desc *descs;
  polyak_chunk *chunks;
  unsigned long long *counters; /* [NUM_COUNTERS] */
  polyak_graph_state *graph;
  float *graph_weights;
  void *staging[POLYAK_MAX_SHADOWS]; /* a load's fresh arenas */
  void *store;                       /* polyak_store's copy of the params */
  polyak_chunk *store_chunks;        /* whole params, where the plan holds a slice */
  int64_t num_store_chunks;
  polyak_copy_chunk *copy_chunks; /* the copy-only tensors' pieces (p->copy_chunks uploaded) */
  uint64_t *agreement;            /* with nccl_comm: POLYAK_AGREEMENT_SLOTS (agreement.h), zeroed */
  uint64_t agreements;            /* agreements so far: the next one's sequence number - 1 */
  /* the capture the last captured polyak_graph_update joined, until it is
   * seen to end (cuda_capture.c) */
  void *capture_stream;
  unsigned long long capture_id;
  int capture_noted;
  double *products;    /* [POLYAK_MAX_SHADOWS]: grad-norm shadows' beta products */
  cublasHandle_t blas; /* post-hoc synthesis; made at its first use */
  /* LAWA, allocated at the first polyak_set_grads or _set_layer_norms */
  void **layer_grads;       /* [num_tensors] device table, or unused with: */
  const float *layer_norms; /* the caller's [num_tensors], or NULL */
  int64_t *tensor_chunks;   /* [num_tensors + 1] */
  float *chunk_sumsq;       /* [num_chunks] */
  double *layer_norm;       /* [num_tensors] */
  double *layer_beta;       /* [num_tensors][POLYAK_MAX_SHADOWS] */
  unsigned int *layer_blocks_done;
} cuda_state;

/* ---- cuda_device.c: errors, the driver, devices, pointers */

polyak_status polyak_cuda_fail(polyak_t *p, cudaError_t err, const char *what);

/* The driver functions, found through the runtime. */
cudaError_t polyak_cuda_driver_load(polyak_cuda_driver *driver);

/* Makes the primary context of the handle's device current on this
 * thread, pushed onto the caller's context stack; polyak_cuda_leave pops
 * it, leaving the caller's CUDA state as it was, no context current
 * included. *scope is always initialized: leave it even after a failure
 * (a no-op then). Pointer checks need it (the driver's functions). */
cudaError_t polyak_cuda_enter(const polyak_t *p, polyak_cuda_scope *scope);
void polyak_cuda_leave(polyak_cuda_scope *scope);

/* The handle's reference to its device's primary context, taken at
 * finalize and dropped at release. */
cudaError_t polyak_cuda_hold_context(polyak_t *p, cuda_state *state);
void polyak_cuda_drop_context(cuda_state *state);

int polyak_cuda_available(void);
int polyak_cuda_owns_memory(const void *ptr);
polyak_status polyak_cuda_check_config(const polyak_config *cfg, char *msg, size_t msg_num_bytes);

/* POLYAK_OK if [ptr, ptr + num_bytes) may be read by kernels on the
 * handle's device: device memory of that device, or managed memory, mapped
 * throughout one allocation (cuda_span.h). Inside `scope`. */
polyak_status polyak_cuda_check_pointer(polyak_t *p, const polyak_cuda_scope *scope, const void *ptr, size_t num_bytes,
                                        const char *what);

/* ---- cuda_backend.c: finalize, release */

/* LAWA's arrays (cudaFree of NULL is a no-op), left NULL. */
void polyak_cuda_free_layerwise(cuda_state *s);

/* With skip_nonfinite, a non-finite param would keep its shadow so forever:
 * refused before any shadow is written (the caller's own ones included).
 * `chunks`: this rank's (finalize), or the whole params (a hard update,
 * which every rank must refuse alike). */
polyak_status polyak_cuda_refuse_nonfinite(polyak_t *p, cuda_state *state, const polyak_chunk *chunks,
                                           int64_t num_chunks, cudaStream_t stream, const char *function);

/* ---- cuda_capture.c */

/* 1 if `stream` is being captured into a graph (inside the handle's
 * device): the legacy stream (NULL) also while a blocking stream is. */
cudaError_t polyak_cuda_is_capturing(void *stream, int *capturing);

polyak_status polyak_cuda_capturing(polyak_t *p, void *stream, int *capturing);

/* A polyak_graph_update is being captured on `stream` if it is: noted,
 * with the capture's id, for polyak_cuda_capture_under_way. */
void polyak_cuda_note_capture(polyak_t *p, void *stream);

/* 1 while a blocking stream is captured, or the capture noted is still
 * under way (forgotten once it is seen to end). */
polyak_status polyak_cuda_capture_under_way(polyak_t *p, int *under_way);

/* ---- cuda_update.c */

polyak_status polyak_cuda_update(polyak_t *p, const polyak_update_args *step, void *stream);

polyak_status polyak_cuda_products_read(polyak_t *p, double *products);

polyak_status polyak_cuda_products_write(polyak_t *p, const double *products);

polyak_status polyak_cuda_set_layer_source(polyak_t *p, void *const *grads, const float *norms);

polyak_status polyak_cuda_layer_betas_read(polyak_t *p, double *betas);

polyak_status polyak_cuda_check_grad_norm(polyak_t *p, const float *grad_norm);

polyak_status polyak_cuda_nonfinite_count(polyak_t *p, int64_t *count);
polyak_status polyak_cuda_set_nonfinite_count(polyak_t *p, int64_t count);

polyak_status polyak_cuda_graph_reserve(polyak_t *p, void *stream);

polyak_status polyak_cuda_graph_update(polyak_t *p, void *stream);

polyak_status polyak_cuda_graph_release(polyak_t *p, int64_t *consumed, int64_t *dropped);

polyak_status polyak_cuda_hard_update(polyak_t *p, int shadow, void *stream);

/* ---- cuda_readout.c */

void *polyak_cuda_arena(polyak_t *p, int shadow);

polyak_status polyak_cuda_check_read_out(polyak_t *p, const void *dst, size_t num_bytes, void *stream,
                                         const char *function);

polyak_status polyak_cuda_read_out(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                                   double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream);

int polyak_cuda_io_grid(const polyak_t *p, const cuda_state *state);

polyak_status polyak_cuda_copy_to_params(polyak_t *p, int shadow, double debias_scale, void *stream);

/* The snapshots as the columns of an arena_elems x num_snapshots matrix:
 * one SGEMV into a scratch arena, then one kernel into the params. */
polyak_status polyak_cuda_synthesize(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                                     void *stream);

polyak_status polyak_cuda_blend(polyak_t *p, const float *coefficient, int tensor, void *dst, polyak_dtype dst_dtype,
                                void *stream);

polyak_status polyak_cuda_store(polyak_t *p, void *stream);

polyak_status polyak_cuda_restore(polyak_t *p, void *stream);

/* ---- cuda_transfer.c */

void *polyak_cuda_host_buffer(polyak_t *p, size_t num_bytes);

void polyak_cuda_free_host_buffer(polyak_t *p, void *buffer);

polyak_status polyak_cuda_copy_to_host(polyak_t *p, void *host, const void *src, size_t num_bytes);

polyak_status polyak_cuda_copy_from_host(polyak_t *p, void *dst, const void *host, size_t num_bytes);

polyak_status polyak_cuda_staging_begin(polyak_t *p);

polyak_status polyak_cuda_staging_write(polyak_t *p, int shadow, int64_t first_elem, int64_t num_elems,
                                        const void *host);

polyak_status polyak_cuda_staging_commit(polyak_t *p, int64_t nonfinite_count, const void *copies);

void polyak_cuda_staging_abort(polyak_t *p);

void *polyak_cuda_scratch_alloc(polyak_t *p, size_t num_bytes);

void polyak_cuda_scratch_free(polyak_t *p, void *scratch);

polyak_status polyak_cuda_copy_bytes(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream);

polyak_status polyak_cuda_agree(polyak_t *p, int local_ok, int *all_ok);
polyak_status polyak_cuda_compare(polyak_t *p, uint64_t value, int *other);

polyak_status polyak_cuda_all_gather(polyak_t *p, const void *send, void *recv, int64_t count, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_CUDA_STATE_H */
