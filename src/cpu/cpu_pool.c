/* cpu_pool.c: the CPU backend's worker threads (see cpu_pool.h): started
 * once, woken per job by a condition variable, joined at destroy. */
#include "cpu_pool.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "polyak_internal.h"

typedef struct {
  pthread_t thread;
  cpu_pool *pool;
  int64_t sum; /* its share of the last job's sum (written once per job) */
} cpu_worker;

struct cpu_pool {
  pthread_mutex_t lock;
  pthread_cond_t wake; /* a job started, or stop */
  pthread_cond_t done; /* the last worker finished the job */
  uint64_t generation; /* jobs started so far */
  int busy;            /* workers still on the current job */
  int stop;
  /* the current job, written under the lock before the wake */
  cpu_pool_item item;
  void *arg;
  int64_t num_items;
  _Atomic int64_t next_item;
  int num_workers; /* num_threads - 1 */
  cpu_worker *workers;
};

int cpu_pool_resolve_threads(int cpu_threads)
{
  int count = cpu_threads;
  if (count <= 0) {
    cpu_set_t set;
    count = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : (int)sysconf(_SC_NPROCESSORS_ONLN);
  }
  return count < 1 ? 1 : count > POLYAK_MAX_CPU_THREADS ? POLYAK_MAX_CPU_THREADS : count;
}

/* Items until none is left; the counter makes each one taken once. */
static int64_t take_items(cpu_pool *pool)
{
  int64_t sum = 0;
  for (;;) {
    int64_t i = atomic_fetch_add_explicit(&pool->next_item, 1, memory_order_relaxed);
    if (i >= pool->num_items)
      return sum;
    sum += pool->item(pool->arg, i);
  }
}

static void *worker_main(void *arg)
{
  cpu_worker *self = arg;
  cpu_pool *pool = self->pool;
  uint64_t seen = 0;
  pthread_mutex_lock(&pool->lock);
  for (;;) {
    while (pool->generation == seen && !pool->stop)
      pthread_cond_wait(&pool->wake, &pool->lock);
    if (pool->stop)
      break;
    seen = pool->generation;
    pthread_mutex_unlock(&pool->lock);
    self->sum = take_items(pool);
    pthread_mutex_lock(&pool->lock);
    if (--pool->busy == 0)
      pthread_cond_signal(&pool->done);
  }
  pthread_mutex_unlock(&pool->lock);
  return NULL;
}

/* Stops and joins the first `started` workers, then frees the pool. */
static void pool_free(cpu_pool *pool, int started)
{
  pthread_mutex_lock(&pool->lock);
  pool->stop = 1;
  pthread_cond_broadcast(&pool->wake);
  pthread_mutex_unlock(&pool->lock);
  for (int w = 0; w < started; w++)
    pthread_join(pool->workers[w].thread, NULL);
  pthread_cond_destroy(&pool->done);
  pthread_cond_destroy(&pool->wake);
  pthread_mutex_destroy(&pool->lock);
  free(pool->workers);
  free(pool);
}

polyak_status cpu_pool_create(cpu_pool **out, int num_threads, char *why, size_t why_num_bytes)
{
  *out = NULL;
  if (num_threads <= 1)
    return POLYAK_OK;
  cpu_pool *pool = calloc(1, sizeof *pool);
  cpu_worker *workers = pool ? calloc((size_t)num_threads - 1, sizeof *workers) : NULL;
  if (!workers) {
    free(pool);
    return polyak_message(why, why_num_bytes, POLYAK_ERR_NO_MEMORY, "out of host memory for %d threads", num_threads);
  }
  pthread_mutex_init(&pool->lock, NULL);
  pthread_cond_init(&pool->wake, NULL);
  pthread_cond_init(&pool->done, NULL);
  pool->workers = workers;
  pool->num_workers = num_threads - 1;
  /* the workers start with every signal blocked, so that the caller's
   * signal handlers keep running on the caller's own threads */
  sigset_t all, kept;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &kept);
  int started = 0, error = 0;
  for (; started < pool->num_workers; started++) {
    workers[started].pool = pool;
    error = pthread_create(&workers[started].thread, NULL, worker_main, &workers[started]);
    if (error)
      break;
    pthread_setname_np(workers[started].thread, "polyak-cpu");
  }
  pthread_sigmask(SIG_SETMASK, &kept, NULL);
  if (error) {
    pool_free(pool, started);
    return polyak_message(why, why_num_bytes, POLYAK_ERR_NO_MEMORY, "could not start thread %d of %d: %s", started + 2,
                          num_threads, strerror(error));
  }
  *out = pool;
  return POLYAK_OK;
}

void cpu_pool_destroy(cpu_pool *pool)
{
  if (pool)
    pool_free(pool, pool->num_workers);
}

int cpu_pool_threads(const cpu_pool *pool)
{
  return pool ? pool->num_workers + 1 : 1;
}

int64_t cpu_pool_run(cpu_pool *pool, int64_t num_items, cpu_pool_item item, void *arg)
{
  int64_t sum = 0;
  if (!pool || num_items <= 1) {
    for (int64_t i = 0; i < num_items; i++)
      sum += item(arg, i);
    return sum;
  }
  pthread_mutex_lock(&pool->lock);
  pool->item = item;
  pool->arg = arg;
  pool->num_items = num_items;
  atomic_store_explicit(&pool->next_item, 0, memory_order_relaxed);
  pool->busy = pool->num_workers;
  pool->generation++;
  pthread_cond_broadcast(&pool->wake);
  pthread_mutex_unlock(&pool->lock);
  sum = take_items(pool);
  pthread_mutex_lock(&pool->lock);
  while (pool->busy > 0)
    pthread_cond_wait(&pool->done, &pool->lock);
  pthread_mutex_unlock(&pool->lock);
  for (int w = 0; w < pool->num_workers; w++)
    sum += pool->workers[w].sum;
  return sum;
}
