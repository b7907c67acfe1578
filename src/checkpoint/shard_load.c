/* shard_load.c: polyak_load_shards. A rank of any world size takes the
 * newest complete set and reads, from the files whose ranges overlap its
 * own slice, only the blocks that hold it (rank 0's file also for the
 * copy-only tensors), through one host buffer of a block:
 *
 *   pass 1  every header it needs checked (rank 0: every file's, for the
 *           non-finite counts it sums), every block it needs verified;
 *           nothing changes, so a refusal leaves the handle as it was
 *   pass 2  the same blocks read and verified again, each written into the
 *           arenas in place (no second copy of the slice anywhere)
 *
 * then the step state. The files pass 1 opens for data stay open into pass
 * 2 (up to POLYAK_SHARD_MAX_KEPT of them, besides rank 0's; those past it
 * are opened again and their headers compared), so that a save that
 * removes the set meanwhile (a newer set complete) takes nothing from this
 * load: an unlinked file stays readable through its descriptor. Should a
 * file change between the passes (or a read fail), the shadows are partly
 * written: the handle is marked torn and refuses everything but a load
 * (docs/scale.md). With a communicator the ranks agree after each pass, so
 * that all of them load or none does. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "shard.h"

typedef struct {
  polyak_t *p;
  const char *dir;
  polyak_shard_set set;
  polyak_shard_file first; /* rank 0's file, open throughout: the boundaries, the state */
  int64_t lo, hi;          /* this rank's flat elements */
  uint64_t *checksums;     /* [world_size]: each file's header checksum in pass 1 */
  polyak_shard_file *kept; /* [max_kept]: files of ranks 1.. pass 1 read data from, open, in rank order */
  int num_kept, max_kept, next_kept;
  void *buffer;      /* host_buffer memory of first.block_bytes */
  int64_t nonfinite; /* rank 0: the files' counts summed */
  int has_copies;
} load;

/* pass 2: a part of shadow k's section of a file, flat elements from
 * first_elem at data offset section_begin, into the arena's pieces */
typedef struct {
  polyak_t *p;
  void *arena;
  int64_t section_begin, first_elem;
} scatter_job;

static polyak_status scatter(void *arg, const void *bytes, int64_t offset, int64_t num_bytes)
{
  const scatter_job *job = arg;
  polyak_t *p = job->p;
  int64_t elem_bytes = (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t elem = job->first_elem + (offset - job->section_begin) / elem_bytes, end = elem + num_bytes / elem_bytes;
  const char *from = bytes;
  for (int i = polyak_tensor_of_element(p, elem); elem < end && i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    int64_t tensor_end = t->global_offset_elems + t->flat_elems;
    if (tensor_end <= elem) /* empty, or copy-only */
      continue;
    int64_t n = (end < tensor_end ? end : tensor_end) - elem;
    char *to = (char *)job->arena + (p->descs[i].shadow_offset_elems + elem - t->global_offset_elems) * elem_bytes;
    POLYAK_TRY(p->ops->copy_from_host(p, to, from, (size_t)(n * elem_bytes)));
    from += n * elem_bytes;
    elem += n;
  }
  return POLYAK_OK;
}

/* pass 2: a part of rank 0's copies (from data offset `begin`) into the
 * copy-only tensors' mirrors */
typedef struct {
  polyak_t *p;
  const polyak_shard_file *f;
} copies_job;

static polyak_status scatter_copies(void *arg, const void *bytes, int64_t offset, int64_t num_bytes)
{
  const copies_job *job = arg;
  polyak_t *p = job->p;
  for (int i = 0; i < p->num_tensors && num_bytes > 0; i++) {
    int64_t begin = polyak_shard_copy_offset(p, job->f, i), end = begin + polyak_ckpt_entry_bytes(p, i);
    if (begin < 0 || end <= offset)
      continue;
    int64_t n = end - offset < num_bytes ? end - offset : num_bytes;
    char *to = (char *)p->copies + p->tensors[i].mirror_offset_bytes + (offset - begin);
    POLYAK_TRY(p->ops->copy_from_host(p, to, bytes, (size_t)n));
    bytes = (const char *)bytes + n;
    offset += n;
    num_bytes -= n;
  }
  return POLYAK_OK;
}

/* What this rank reads of file f (rank r): its part of every shadow's
 * section, and in rank 0's the copies; verified only, or (copy) into the
 * handle too. */
static polyak_status read_file(load *l, polyak_shard_file *f, int copy)
{
  polyak_t *p = l->p;
  int r = f->name.rank;
  int64_t elem_bytes = (int64_t)polyak_dtype_num_bytes(p->cfg.shadow_dtype);
  int64_t lo = l->lo > f->boundaries[r] ? l->lo : f->boundaries[r];
  int64_t hi = l->hi < f->boundaries[r + 1] ? l->hi : f->boundaries[r + 1];
  for (int k = 0; k < p->cfg.num_shadows && lo < hi; k++) {
    int64_t section = polyak_shard_section(p, f, k);
    scatter_job job = {p, p->ops->arena(p, k), section, f->boundaries[r]};
    POLYAK_TRY(polyak_shard_read(p, f, section + (lo - f->boundaries[r]) * elem_bytes,
                                 section + (hi - f->boundaries[r]) * elem_bytes, l->buffer, copy ? scatter : NULL,
                                 &job));
  }
  if (r != 0 || !l->has_copies)
    return POLYAK_OK;
  copies_job job = {p, f};
  return polyak_shard_read(p, f, polyak_shard_section(p, f, p->cfg.num_shadows), f->data_bytes, l->buffer,
                           copy ? scatter_copies : NULL, &job);
}

/* 1 if this rank opens rank r's file in a pass: for data it reads, for
 * the copies, or (rank 0, pass 1) to check every file and sum the counts. */
static int needed(const load *l, int r, int copy)
{
  const int64_t *b = l->first.boundaries;
  int overlaps = l->lo < l->hi && b[r] < l->hi && b[r + 1] > l->lo;
  return overlaps || (r == 0 && l->has_copies) || (!copy && l->p->cfg.rank == 0);
}

/* One pass over the files of the set this rank needs. Pass 1 keeps open
 * the files it reads data from (up to max_kept); pass 2 reads those
 * through the same descriptors and opens the others again. */
static polyak_status run_pass(load *l, int copy, const char *function)
{
  polyak_t *p = l->p;
  polyak_status status = POLYAK_OK;
  for (int r = 0; r < l->set.world_size && status == POLYAK_OK; r++) {
    if (!needed(l, r, copy))
      continue;
    polyak_shard_file other, *f = &other;
    memset(&other, 0, sizeof other);
    other.fd = -1;
    int kept = 0, keep = 0;
    if (r == 0)
      f = &l->first;
    else if (copy && l->next_kept < l->num_kept && l->kept[l->next_kept].name.rank == r)
      f = &l->kept[l->next_kept++], kept = 1;
    else if (!copy && needed(l, r, 1) && l->num_kept < l->max_kept)
      f = &l->kept[l->num_kept], keep = 1;
    char *path = r == 0 || kept ? NULL : polyak_shard_path(l->dir, &l->set, r);
    if (r != 0 && !kept) {
      polyak_shard_name name = {l->set.step, l->set.save_id, r, l->set.world_size};
      status = path ? polyak_shard_open(p, path, &name, f, function)
                    : polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
      if (status == POLYAK_OK)
        status = polyak_shard_check_model(p, f);
      if (status == POLYAK_OK)
        status = polyak_shard_check_same_set(p, &l->first, f);
      if (status == POLYAK_OK && f->block_bytes != l->first.block_bytes)
        status = polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, f->where, "its blocks are of another size than rank 0's");
    }
    if (status == POLYAK_OK && copy && f->header_checksum != l->checksums[r])
      status = polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, f->where,
                                "changed since it was checked (its header checksum is another): the shadows are "
                                "partly loaded");
    l->checksums[r] = f->header_checksum;
    if (status == POLYAK_OK && (copy || needed(l, r, 1)))
      status = read_file(l, f, copy);
    if (!copy && p->cfg.rank == 0)
      l->nonfinite += f->state.nonfinite;
    if (keep && status == POLYAK_OK)
      l->num_kept++; /* open until the load ends */
    else if (r != 0 && !kept)
      polyak_shard_close(f);
    free(path);
  }
  return status;
}

/* The step state, after the shadows: the backend's products and count,
 * then the host's. */
static polyak_status commit(load *l)
{
  polyak_t *p = l->p;
  const polyak_ckpt_state *state = &l->first.state;
  polyak_status status = POLYAK_OK;
  if (polyak_has_grad_norm(&p->cfg)) /* the backend keeps these */
    status = p->ops->products_write(p, state->beta_prod);
  if (status == POLYAK_OK) /* sums over ranks keep the files' total */
    status = p->ops->set_nonfinite_count(p, p->cfg.rank == 0 ? l->nonfinite : 0);
  if (status != POLYAK_OK)
    return status;
  p->last_step = state->step;
  p->shadows_open = 0; /* a load replaces whatever a write through the addresses left */
  for (int k = 0; k < p->cfg.num_shadows; k++) {
    p->beta_prod[k] = state->beta_prod[k];
    p->updates_counted[k] = state->updates_counted[k];
  }
  return POLYAK_OK;
}

polyak_status polyak_load_shards(polyak_t *p, const char *dir)
{
  const char *function = "polyak_load_shards";
  int may_agree;
  polyak_status status = polyak_shard_check_call(p, dir, function, 1, &may_agree);
  if (!may_agree) /* no state to agree with (a NULL handle, a capture under way) */
    return status;
  load l;
  memset(&l, 0, sizeof l);
  l.p = p;
  l.dir = dir;
  l.first.fd = -1;
  if (status == POLYAK_OK)
    status = polyak_shard_choose(p, dir, p->cfg.world_size, &l.set, function);
  char *path = status == POLYAK_OK ? polyak_shard_path(dir, &l.set, 0) : NULL;
  polyak_shard_name name = {l.set.step, l.set.save_id, 0, l.set.world_size};
  if (status == POLYAK_OK)
    status = path ? polyak_shard_open(p, path, &name, &l.first, function)
                  : polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  free(path);
  if (status == POLYAK_OK)
    status = polyak_shard_check_model(p, &l.first);
  /* with a communicator every rank takes the same set, or none does: their listings of dir may differ */
  uint64_t choice[3] = {(uint64_t)l.set.step, l.set.save_id, (uint64_t)l.set.world_size};
  int other = -1;
  status = polyak_shard_compare(p, status, XXH3_64bits(choice, sizeof choice), &other);
  if (status == POLYAK_OK && other >= 0) {
    char *chosen = polyak_shard_path(dir, &l.set, 0);
    status = polyak_ckpt_fail(p, POLYAK_ERR_STATE, function,
                              "the ranks chose different sets: this rank %s, ..., rank %d another (or it failed): "
                              "their listings of %s differ (a save still under way, a stale listing on a network "
                              "file system); wait for the save to finish",
                              chosen ? chosen : "", other, dir);
    free(chosen);
  }
  l.lo = polyak_shard_begin(p, p->cfg.world_size, p->cfg.rank);
  l.hi = polyak_shard_begin(p, p->cfg.world_size, p->cfg.rank + 1);
  for (int i = 0; i < p->num_tensors; i++)
    l.has_copies |= p->tensors[i].copy_only;
  if (status == POLYAK_OK) {
    l.checksums = calloc((size_t)l.set.world_size, sizeof *l.checksums);
    l.max_kept = p->shard_max_kept > 0 ? p->shard_max_kept : POLYAK_SHARD_MAX_KEPT;
    l.max_kept = l.max_kept < l.set.world_size ? l.max_kept : l.set.world_size;
    l.kept = calloc((size_t)l.max_kept, sizeof *l.kept);
    for (int n = 0; l.kept && n < l.max_kept; n++)
      l.kept[n].fd = -1; /* closing a slot never opened closes nothing */
    l.buffer = p->ops->host_buffer(p, (size_t)l.first.block_bytes);
    if (!l.checksums || !l.kept || !l.buffer)
      status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory");
  }
  if (status == POLYAK_OK)
    status = run_pass(&l, 0, function);
  /* with a communicator every rank makes both agreements or none: the first's verdict is the same on all */
  status = polyak_shard_agree(p, status, POLYAK_ERR_FORMAT, function);
  int agreed = status == POLYAK_OK;
  int64_t ignored;
  if (status == POLYAK_OK) /* no update may still use the shadows */
    status = p->ops->nonfinite_count(p, &ignored);
  int writing = status == POLYAK_OK;
  if (writing)
    status = run_pass(&l, 1, function);
  if (agreed)
    status = polyak_shard_agree(p, status, POLYAK_ERR_IO, function);
  if (status == POLYAK_OK)
    status = commit(&l);
  if (writing) /* every shadow is the set's now, or some are */
    p->torn = status != POLYAK_OK;
  if (l.buffer)
    p->ops->free_host_buffer(p, l.buffer);
  free(l.checksums);
  for (int n = 0; n < l.num_kept; n++)
    polyak_shard_close(&l.kept[n]);
  free(l.kept);
  polyak_shard_close(&l.first);
  return status;
}
