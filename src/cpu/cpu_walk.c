/* cpu_walk.c: the CPU backend's parallel walks: the plan's chunks, grouped
 * into work items, handed out across the handle's threads (cpu_pool.c). */
#include <stdlib.h>

#include "cpu_state.h"

typedef struct {
  const polyak_t *p;
  cpu_chunk_visit visit;
  void *arg;
} chunks_job;

static int64_t visit_item(void *arg, int64_t item)
{
  const chunks_job *job = arg;
  const cpu_state *state = job->p->backend;
  int64_t sum = 0;
  for (int64_t c = state->item_chunks[item]; c < state->item_chunks[item + 1]; c++)
    sum += job->visit(job->p, &job->p->chunks[c], job->arg);
  return sum;
}

int64_t polyak_cpu_for_chunks(const polyak_t *p, cpu_chunk_visit visit, void *arg)
{
  const cpu_state *state = p->backend;
  chunks_job job = {p, visit, arg};
  return cpu_pool_run(state->pool, state->num_items, visit_item, &job);
}

typedef struct {
  const polyak_t *p;
  cpu_chunk_visit visit;
  void *arg;
  int64_t first_chunk;
} chunk_range_job;

static int64_t visit_chunk(void *arg, int64_t item)
{
  const chunk_range_job *job = arg;
  return job->visit(job->p, &job->p->chunks[job->first_chunk + item], job->arg);
}

int64_t polyak_cpu_for_chunk_range(const polyak_t *p, int64_t first_chunk, int64_t end_chunk, cpu_chunk_visit visit,
                                   void *arg)
{
  chunk_range_job job = {p, visit, arg, first_chunk};
  return cpu_pool_run(((const cpu_state *)p->backend)->pool, end_chunk - first_chunk, visit_chunk, &job);
}

typedef struct {
  cpu_range_visit visit;
  void *arg;
  int64_t num_elems;
} range_job;

static int64_t visit_range(void *arg, int64_t item)
{
  const range_job *job = arg;
  int64_t first = item * CPU_ITEM_ELEMS, rest = job->num_elems - first;
  job->visit(job->arg, first, rest < CPU_ITEM_ELEMS ? rest : CPU_ITEM_ELEMS);
  return 0;
}

void polyak_cpu_for_range(const polyak_t *p, int64_t num_elems, cpu_range_visit visit, void *arg)
{
  range_job job = {visit, arg, num_elems};
  cpu_pool_run(((const cpu_state *)p->backend)->pool, (num_elems + CPU_ITEM_ELEMS - 1) / CPU_ITEM_ELEMS, visit_range,
               &job);
}

/* Work items: runs of consecutive chunks of at least CPU_ITEM_ELEMS
 * elements (the last may have fewer), so that lists of many small tensors
 * cost few hand-outs. */
int polyak_cpu_build_items(const polyak_t *p, cpu_state *state)
{
  state->item_chunks = malloc(((size_t)p->num_chunks + 2) * sizeof *state->item_chunks);
  if (!state->item_chunks)
    return -1;
  int64_t items = 0, elems = 0;
  state->item_chunks[0] = 0;
  for (int64_t c = 0; c < p->num_chunks; c++) {
    elems += p->chunks[c].num_elems;
    if (elems >= CPU_ITEM_ELEMS || c == p->num_chunks - 1) {
      state->item_chunks[++items] = c + 1;
      elems = 0;
    }
  }
  state->num_items = items;
  return 0;
}
