/* cpu_readout.h: what cpu_readout.c gives the rest of the CPU backend:
 * shadow memory, read-outs, evaluation, hard updates and transfers. */
#ifndef POLYAK_CPU_READOUT_H
#define POLYAK_CPU_READOUT_H

#include "cpu_state.h"

/* num_shadows arenas of the plan's size, 64-byte aligned; all or none
 * (-1). free_arenas frees and clears all POLYAK_MAX_SHADOWS. */
int polyak_cpu_alloc_arenas(const polyak_t *p, void **arenas);
void polyak_cpu_free_arenas(void **arenas);
/* Shadow k's arena <- 0, then the params (this rank's pieces) unless zero_init. */
void polyak_cpu_init_shadow(const polyak_t *p, void *arena, int k);
/* POLYAK_ERR_INVALID_ARG naming the first NaN or Inf param: among every
 * element (`whole`: a hard update, which every rank must refuse alike), else
 * this rank's (finalize). */
polyak_status polyak_cpu_find_nonfinite_param(polyak_t *p, int whole, const char *function);

/* the backend functions of polyak_backend_ops that cpu_readout.c holds */
void *polyak_cpu_arena(polyak_t *p, int shadow);
polyak_status polyak_cpu_read_out(polyak_t *p, const void *src, polyak_dtype src_dtype, int64_t num_elems,
                                  double debias_scale, void *dst, polyak_dtype dst_dtype, void *stream);
polyak_status polyak_cpu_check_read_out(polyak_t *p, const void *dst, size_t num_bytes, void *stream,
                                        const char *function);
polyak_status polyak_cpu_copy_to_params(polyak_t *p, int shadow, double debias_scale, void *stream);
polyak_status polyak_cpu_blend(polyak_t *p, const float *coefficient, int tensor, void *dst, polyak_dtype dst_dtype,
                               void *stream);
polyak_status polyak_cpu_synthesize(polyak_t *p, const float *snapshots, int num_snapshots, const float *weight,
                                    void *stream);
polyak_status polyak_cpu_hard_update(polyak_t *p, int shadow, void *stream);
polyak_status polyak_cpu_store(polyak_t *p, void *stream);
polyak_status polyak_cpu_restore(polyak_t *p, void *stream);
void *polyak_cpu_host_buffer(polyak_t *p, size_t num_bytes);
void polyak_cpu_free_host_buffer(polyak_t *p, void *buffer);
polyak_status polyak_cpu_copy_to_host(polyak_t *p, void *host, const void *src, size_t num_bytes);
polyak_status polyak_cpu_copy_from_host(polyak_t *p, void *dst, const void *host, size_t num_bytes);
polyak_status polyak_cpu_staging_begin(polyak_t *p);
polyak_status polyak_cpu_staging_write(polyak_t *p, int shadow, int64_t first_elem, int64_t num_elems,
                                       const void *host);
polyak_status polyak_cpu_staging_commit(polyak_t *p, int64_t nonfinite_count, const void *copies);
void polyak_cpu_staging_abort(polyak_t *p);
polyak_status polyak_cpu_set_nonfinite_count(polyak_t *p, int64_t nonfinite_count);
void *polyak_cpu_scratch_alloc(polyak_t *p, size_t num_bytes);
void polyak_cpu_scratch_free(polyak_t *p, void *scratch);
polyak_status polyak_cpu_copy_bytes(polyak_t *p, void *dst, const void *src, size_t num_bytes, void *stream);

#endif /* POLYAK_CPU_READOUT_H */
