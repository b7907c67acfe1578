/* cpu_pool.h: the CPU backend's worker threads, one small pool per handle.
 *
 * A pool of N runs every job on N threads: the calling thread and N - 1
 * workers started once (polyak_finalize) and joined at polyak_destroy.
 * Between jobs the workers sleep on a condition variable: an idle handle
 * costs no CPU time. Jobs hand out work items through an atomic counter,
 * so a thread that the OS slows down simply takes fewer items; every item
 * writes only its own elements and per-thread sums are integers, so the
 * results never depend on which thread ran what. */
#ifndef POLYAK_CPU_POOL_H
#define POLYAK_CPU_POOL_H

#include <stdint.h>

#include "polyak.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cpu_pool cpu_pool;

/* Work item `item` of a job; returns what the job sums (non-finite counts). */
typedef int64_t (*cpu_pool_item)(void *arg, int64_t item);

/* The threads that cpu_threads asks for: itself if positive, else one per
 * core this process may run on; at most POLYAK_MAX_CPU_THREADS. */
int cpu_pool_resolve_threads(int cpu_threads);

/* A pool of num_threads threads in all (the caller among them); *out is
 * NULL for one thread, which needs no pool. POLYAK_ERR_NO_MEMORY if a
 * thread cannot be started (those started are joined again); `why` gets
 * the reason. */
polyak_status cpu_pool_create(cpu_pool **out, int num_threads, char *why, size_t why_num_bytes);

/* Joins the workers and frees the pool; NULL is a no-op. */
void cpu_pool_destroy(cpu_pool *pool);

/* Threads of `pool`, the caller included (1 for NULL). */
int cpu_pool_threads(const cpu_pool *pool);

/* Runs item(arg, i) for each i in [0, num_items) exactly once across the
 * pool (on the caller alone for a NULL pool or a single item) and returns
 * the sum of what they returned, once all are done. */
int64_t cpu_pool_run(cpu_pool *pool, int64_t num_items, cpu_pool_item item, void *arg);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_CPU_POOL_H */
