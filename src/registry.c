/* registry.c: polyak_add and the tensor table. Duplicate names and
 * overlapping param memory are found in O(log n) per tensor with two
 * tsearch trees, so registering 100,000 tensors stays fast. */
#include <jansson.h>
#include <search.h>
#include <stdlib.h>
#include <string.h>

#include "polyak_internal.h"
#define XXH_INLINE_ALL
#include <xxhash.h>

/* A tensor's param bytes [begin, end), keyed in range_tree. */
typedef struct {
  uintptr_t begin, end;
  int tensor;
} param_range;

/* A registered name and its tensor, keyed in name_tree by the name (a
 * lookup passes a pointer to a `const char *`, which reads the same). */
typedef struct {
  const char *name; /* the tensor's own copy */
  int tensor;
} name_entry;

static int compare_names(const void *a, const void *b)
{
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Two ranges compare equal when they overlap; disjoint ranges are ordered
 * by address, so a search finds an overlapping range if one exists. */
static int compare_ranges(const void *a, const void *b)
{
  const param_range *x = a, *y = b;
  if (x->end <= y->begin)
    return -1;
  if (y->end <= x->begin)
    return 1;
  return 0;
}

static polyak_status check_shape(polyak_t *p, const char *where, int ndim, const int64_t *shape, size_t elem_num_bytes,
                                 int64_t *num_elems)
{
  if (ndim < 0 || ndim > POLYAK_MAX_NDIM)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: ndim = %d is outside 0..%d", where, ndim, POLYAK_MAX_NDIM);
  if (ndim > 0 && !shape)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: shape is NULL with ndim = %d", where, ndim);
  /* the count and the byte size must both fit in int64 */
  int64_t limit = INT64_MAX / (int64_t)elem_num_bytes;
  int64_t count = 1;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] < 0)
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: shape[%d] = %lld is negative", where, d, (long long)shape[d]);
  }
  for (int d = 0; d < ndim; d++) {
    if (shape[d] == 0) {
      count = 0;
      break;
    }
    if (count > limit / shape[d])
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: the shape holds more than %lld elements", where,
                         (long long)limit);
    count *= shape[d];
  }
  *num_elems = count;
  return POLYAK_OK;
}

/* `what` (param or shadow) memory [begin, begin + num_bytes): present,
 * aligned, not wrapping, and overlapping no registered param or shadow
 * (nor `also`, the same tensor's param). */
static polyak_status check_memory(polyak_t *p, const char *where, const char *what, const void *memory,
                                  size_t elem_num_bytes, int64_t num_elems, const param_range *also)
{
  uintptr_t begin = (uintptr_t)memory, num_bytes = (uintptr_t)num_elems * elem_num_bytes;
  if (num_elems == 0)
    return POLYAK_OK;
  if (!memory)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: %s is NULL for %lld elements", where, what,
                       (long long)num_elems);
  if (begin % elem_num_bytes != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: %s %p is not aligned to its %zu-byte elements", where, what,
                       memory, elem_num_bytes);
  if (begin + num_bytes < begin)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: %s %p + %llu bytes wraps the address space", where, what, memory,
                       (unsigned long long)num_bytes);
  param_range query = {begin, begin + num_bytes, p->num_tensors};
  if (also && compare_ranges(&query, also) == 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: the shadow overlaps the tensor's own param", where);
  param_range **hit = tfind(&query, &p->range_tree, compare_ranges);
  if (hit)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: %s memory [%p, +%llu bytes) overlaps tensor %d (\"%s\")", where,
                       what, memory, (unsigned long long)num_bytes, (*hit)->tensor, p->tensors[(*hit)->tensor].name);
  return POLYAK_OK;
}

/* The checks a caller's shadow adds: its dtype and flags, and a handle it
 * can live in. */
static polyak_status check_owned(polyak_t *p, const char *where, polyak_dtype shadow_dtype, int flags)
{
  if (!polyak_dtype_copyable(shadow_dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: shadow_dtype = %d is not a polyak_dtype", where,
                       (int)shadow_dtype);
  if (!polyak_dtype_valid(shadow_dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: shadow_dtype %s is not a shadow dtype (F32, BF16 or F16)", where,
                       polyak_dtype_name(shadow_dtype));
  if (flags & ~POLYAK_SHADOW_ROUND_NEAREST)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: flags = %d has unknown bits", where, flags);
  const polyak_config *c = &p->cfg;
  const char *conflict = c->num_shadows != 1                 ? "num_shadows > 1 (the shadow is shadow 0, the only one)"
                         : c->zero_init                      ? "zero_init (the shadow must be usable as it is)"
                         : c->world_size > 1 || c->nccl_comm ? "sharding or a communicator (ranks would gather it)"
                         : c->lookahead_every > 0            ? "Lookahead"
                         : polyak_offloaded(p)
                             ? "shadows in host memory (POLYAK_SHADOWS_HOST: the update folds on the host)"
                             : NULL;
  if (conflict)
    return polyak_fail(p, POLYAK_ERR_UNSUPPORTED, "%s: shadows in the caller's memory do not go with %s", where,
                       conflict);
  return POLYAK_OK;
}

/* polyak_add, polyak_add_with_shadow (shadow non-NULL or num_elems 0
 * there: `owned`) and polyak_add_copy (`copy_only`). */
static polyak_status add_tensor(polyak_t *p, const char *function, const char *name, void *param, polyak_dtype dtype,
                                int ndim, const int64_t *shape, int owned, void *shadow, polyak_dtype shadow_dtype,
                                int flags, int copy_only)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE, "%s: the handle is finalized; register every tensor before polyak_finalize",
                       function);
  if (!name || !name[0])
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: name is %s", function, name ? "empty" : "NULL");
  char where[96];
  snprintf(where, sizeof where, "%s(\"%.48s\")", function, name);
  if (strcmp(name, "__metadata__") == 0 || strncmp(name, "polyak.", 7) == 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "%s: \"__metadata__\" and names starting \"polyak.\" are reserved for checkpoints", where);
  json_t *utf8 = json_string(name); /* NULL unless valid UTF-8, as safetensors needs */
  if (!utf8)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: the name is not valid UTF-8", function);
  json_decref(utf8);
  if (copy_only ? !polyak_dtype_copyable(dtype) : !polyak_dtype_valid(dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       copy_only || !polyak_dtype_copyable(dtype)
                           ? "%s: dtype = %d is not a polyak_dtype"
                           : "%s: dtype = %d is not F32, BF16 or F16; register other dtypes with polyak_add_copy",
                       where, (int)dtype);
  polyak_status status = owned ? check_owned(p, where, shadow_dtype, flags) : POLYAK_OK;
  size_t elem_num_bytes = polyak_dtype_num_bytes(dtype);
  int64_t num_elems = 0;
  if (status == POLYAK_OK)
    status = check_shape(p, where, ndim, shape, elem_num_bytes, &num_elems);
  if (status == POLYAK_OK)
    status = check_memory(p, where, "param", param, elem_num_bytes, num_elems, NULL);
  param_range param_bytes = {(uintptr_t)param, (uintptr_t)param + (uintptr_t)num_elems * elem_num_bytes,
                             p->num_tensors};
  if (status == POLYAK_OK && owned)
    status = check_memory(p, where, "shadow", shadow, polyak_dtype_num_bytes(shadow_dtype), num_elems,
                          num_elems > 0 ? &param_bytes : NULL);
  if (status != POLYAK_OK)
    return status;
  if (p->num_tensors == INT32_MAX)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: %d tensors is the limit", where, INT32_MAX);
  if (polyak_registry_has(p, name))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "%s: a tensor of that name is registered", where);

  /* every check passed: allocate, then publish; undo on any failure */
  if (p->num_tensors == p->tensors_capacity) {
    int capacity = p->tensors_capacity ? p->tensors_capacity : 16;
    capacity = capacity > INT32_MAX / 2 ? INT32_MAX : capacity * 2;
    polyak_tensor *grown = realloc(p->tensors, (size_t)capacity * sizeof *grown);
    if (!grown)
      return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "%s: out of host memory", where);
    p->tensors = grown;
    p->tensors_capacity = capacity;
  }
  char *name_copy = strdup(name);
  name_entry *entry = malloc(sizeof *entry);
  param_range *ranges[2] = {NULL, NULL}; /* the param's bytes, the shadow's */
  int num_ranges = num_elems == 0 ? 0 : owned ? 2 : 1, inserted = 0;
  for (int r = 0; r < num_ranges; r++)
    ranges[r] = malloc(sizeof *ranges[r]);
  if (!name_copy || !entry || (num_ranges > 0 && !ranges[0]) || (num_ranges > 1 && !ranges[1]))
    goto no_memory;
  *entry = (name_entry){name_copy, p->num_tensors};
  if (!tsearch(entry, &p->name_tree, compare_names))
    goto no_memory;
  if (num_ranges > 0)
    *ranges[0] = param_bytes;
  if (num_ranges > 1) {
    uintptr_t begin = (uintptr_t)shadow;
    *ranges[1] =
        (param_range){begin, begin + (uintptr_t)num_elems * polyak_dtype_num_bytes(shadow_dtype), p->num_tensors};
  }
  for (; inserted < num_ranges; inserted++)
    if (!tsearch(ranges[inserted], &p->range_tree, compare_ranges))
      break;
  if (inserted < num_ranges) {
    while (inserted-- > 0)
      tdelete(ranges[inserted], &p->range_tree, compare_ranges);
    tdelete(entry, &p->name_tree, compare_names);
    goto no_memory;
  }
  polyak_tensor *t = &p->tensors[p->num_tensors++];
  memset(t, 0, sizeof *t);
  t->name = name_copy;
  t->param = param;
  t->dtype = dtype;
  t->ndim = ndim;
  for (int d = 0; d < ndim; d++)
    t->shape[d] = shape[d];
  t->num_elems = num_elems;
  t->global_offset_elems = p->total_elems;
  t->owned = owned;
  t->shadow = owned ? shadow : NULL;
  t->shadow_dtype = owned ? shadow_dtype : copy_only ? dtype : p->cfg.shadow_dtype; /* a mirror's own */
  t->shadow_flags = owned ? flags : 0;
  t->copy_only = copy_only;
  t->flat_elems = copy_only ? 0 : num_elems;
  p->total_elems += t->flat_elems;
  return POLYAK_OK;

no_memory:
  free(name_copy);
  free(entry);
  free(ranges[0]);
  free(ranges[1]);
  return polyak_fail(p, POLYAK_ERR_NO_MEMORY, "%s: out of host memory", where);
}

polyak_status polyak_add(polyak_t *p, const char *name, void *param, polyak_dtype dtype, int ndim, const int64_t *shape)
{
  return add_tensor(p, "polyak_add", name, param, dtype, ndim, shape, 0, NULL, POLYAK_F32, 0, 0);
}

polyak_status polyak_add_copy(polyak_t *p, const char *name, void *param, polyak_dtype dtype, int ndim,
                              const int64_t *shape)
{
  return add_tensor(p, "polyak_add_copy", name, param, dtype, ndim, shape, 0, NULL, POLYAK_F32, 0, 1);
}

polyak_status polyak_add_with_shadow(polyak_t *p, const char *name, void *param, polyak_dtype dtype, int ndim,
                                     const int64_t *shape, void *shadow, polyak_dtype shadow_dtype, int flags)
{
  return add_tensor(p, "polyak_add_with_shadow", name, param, dtype, ndim, shape, 1, shadow, shadow_dtype, flags, 0);
}

/* Undoes the last successful add_tensor of a tensor without a shadow of
 * the caller's (polyak_add_arena's rollback). */
static void remove_last(polyak_t *p)
{
  polyak_tensor *t = &p->tensors[p->num_tensors - 1];
  const char *name = t->name;
  name_entry *const *entry = tfind(&name, &p->name_tree, compare_names);
  name_entry *found = *entry;
  tdelete(&name, &p->name_tree, compare_names);
  free(found);
  if (t->num_elems > 0) {
    uintptr_t begin = (uintptr_t)t->param;
    param_range query = {begin, begin + (uintptr_t)t->num_elems * polyak_dtype_num_bytes(t->dtype), 0};
    param_range *const *range = tfind(&query, &p->range_tree, compare_ranges);
    param_range *kept = *range;
    tdelete(&query, &p->range_tree, compare_ranges);
    free(kept);
  }
  p->total_elems -= t->flat_elems;
  free(t->name);
  p->num_tensors--;
}

polyak_status polyak_add_arena(polyak_t *p, void *base, polyak_dtype dtype, size_t arena_num_elems,
                               const polyak_view *views, int num_views)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (p->finalized)
    return polyak_fail(p, POLYAK_ERR_STATE,
                       "polyak_add_arena: the handle is finalized; register every tensor before polyak_finalize");
  if (num_views < 0 || (num_views > 0 && !views))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_add_arena: %d views at %p", num_views, (const void *)views);
  if (!polyak_dtype_copyable(dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_add_arena: dtype = %d is not a polyak_dtype", (int)dtype);
  if (!polyak_dtype_valid(dtype))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_add_arena: dtype %s is not F32, BF16 or F16, which arenas of averaged params hold",
                       polyak_dtype_name(dtype));
  size_t elem_num_bytes = polyak_dtype_num_bytes(dtype);
  if (arena_num_elems > (size_t)INT64_MAX / elem_num_bytes)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_add_arena: arena_num_elems = %zu is too large",
                       arena_num_elems);
  /* the tiling first: each view's elements end to end from base */
  int64_t arena = (int64_t)arena_num_elems, offset = 0;
  for (int v = 0; v < num_views; v++) {
    char where[96];
    snprintf(where, sizeof where, "polyak_add_arena: view %d (\"%.48s\")", v, views[v].name ? views[v].name : "");
    int64_t num_elems = 0;
    polyak_status status = check_shape(p, where, views[v].ndim, views[v].shape, elem_num_bytes, &num_elems);
    if (status != POLYAK_OK)
      return status;
    if (num_elems > arena - offset)
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                         "%s: its %lld elements at element %lld end at %lld, past the arena's %lld elements (is "
                         "its shape too large, or the arena's size too small?)",
                         where, (long long)num_elems, (long long)offset, (long long)(offset + num_elems),
                         (long long)arena);
    offset += num_elems;
  }
  if (offset < arena)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                       "polyak_add_arena: the %d views cover %lld of the arena's %lld elements; elements %lld.. "
                       "are in no view (a view too small, or one missing?)",
                       num_views, (long long)offset, (long long)arena, (long long)offset);
  /* then each view as polyak_add would take it; all or nothing */
  int added = 0;
  polyak_status status = POLYAK_OK;
  for (offset = 0; added < num_views; added++) {
    const polyak_view *view = &views[added];
    char *param = (char *)base + (size_t)offset * elem_num_bytes;
    status =
        add_tensor(p, "polyak_add_arena", view->name, param, dtype, view->ndim, view->shape, 0, NULL, POLYAK_F32, 0, 0);
    if (status != POLYAK_OK)
      break;
    offset += p->tensors[p->num_tensors - 1].num_elems;
  }
  if (status != POLYAK_OK)
    while (added-- > 0)
      remove_last(p);
  return status;
}

uint64_t polyak_layout_hash(const polyak_t *p)
{
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  for (int i = 0; i < p->num_tensors; i++) {
    const polyak_tensor *t = &p->tensors[i];
    XXH3_64bits_update(&state, t->name, strlen(t->name) + 1);
    XXH3_64bits_update(&state, &t->dtype, sizeof t->dtype);
    XXH3_64bits_update(&state, &t->owned, sizeof t->owned);
    XXH3_64bits_update(&state, &t->shadow_dtype, sizeof t->shadow_dtype);
    XXH3_64bits_update(&state, &t->shadow_flags, sizeof t->shadow_flags);
    XXH3_64bits_update(&state, &t->copy_only, sizeof t->copy_only);
    XXH3_64bits_update(&state, &t->ndim, sizeof t->ndim);
    XXH3_64bits_update(&state, t->shape, sizeof t->shape[0] * (size_t)t->ndim);
  }
  /* field by field: a config's padding bytes are unspecified */
  const polyak_config *c = &p->cfg;
#define HASH(field) XXH3_64bits_update(&state, &(field), sizeof(field))
  HASH(c->num_shadows);
  for (int k = 0; k < c->num_shadows; k++) {
    const polyak_shadow_config *s = &c->shadows[k];
    HASH(s->schedule.kind), HASH(s->schedule.beta), HASH(s->schedule.beta_min), HASH(s->schedule.inv_gamma);
    HASH(s->schedule.power), HASH(s->schedule.gamma), HASH(s->schedule.ramp_steps), HASH(s->schedule.start_step);
    HASH(s->rounding), HASH(s->count_updates), HASH(s->grad_norm_c), HASH(s->layerwise_beta0);
  }
  HASH(c->shadow_dtype), HASH(c->zero_init), HASH(c->skip_nonfinite), HASH(c->seed), HASH(c->world_size);
  HASH(c->lookahead_every), HASH(c->shadow_location);
#undef HASH
  return XXH3_64bits_digest(&state);
}

/* The entry of `name`, or NULL. */
static const name_entry *find_name(const polyak_t *p, const char *name)
{
  name_entry *const *hit = tfind(&name, &p->name_tree, compare_names);
  return hit ? *hit : NULL;
}

int polyak_registry_has(const polyak_t *p, const char *name)
{
  return find_name(p, name) != NULL;
}

int polyak_registry_find(const polyak_t *p, const char *name)
{
  const name_entry *entry = find_name(p, name);
  return entry ? entry->tensor : -1;
}

polyak_status polyak_find_tensor(polyak_t *p, const char *name, int *tensor)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!name || !tensor)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_find_tensor: %s is NULL", name ? "tensor" : "name");
  const name_entry *entry = find_name(p, name);
  if (!entry)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_find_tensor: no tensor is named \"%.200s\" (%d registered)",
                       name, p->num_tensors);
  *tensor = entry->tensor;
  return POLYAK_OK;
}

polyak_status polyak_tensor_info(polyak_t *p, int tensor, polyak_tensor_info_t *info)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (tensor < 0 || tensor >= p->num_tensors)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_tensor_info: tensor %d is outside 0..%d", tensor,
                       p->num_tensors - 1);
  if (!info)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_tensor_info: info is NULL");
  const polyak_tensor *t = &p->tensors[tensor];
  memset(info, 0, sizeof *info);
  info->name = t->name;
  info->dtype = t->dtype;
  info->ndim = t->ndim;
  for (int d = 0; d < t->ndim; d++)
    info->shape[d] = t->shape[d];
  info->num_elems = t->num_elems;
  info->shadow_dtype = t->shadow_dtype;
  info->flags = (t->owned ? POLYAK_TENSOR_CALLERS_SHADOW : 0) | (t->copy_only ? POLYAK_TENSOR_COPY : 0);
  info->local_first_elem = !p->finalized ? -1 : t->copy_only ? 0 : p->descs[tensor].local_first_elem;
  info->local_num_elems = !p->finalized ? -1 : t->copy_only ? t->num_elems : p->descs[tensor].local_num_elems;
  return POLYAK_OK;
}

void polyak_registry_free(polyak_t *p)
{
  tdestroy(p->name_tree, free);
  tdestroy(p->range_tree, free);
  for (int i = 0; i < p->num_tensors; i++)
    free(p->tensors[i].name);
  free(p->tensors);
  p->name_tree = p->range_tree = NULL;
  p->tensors = NULL;
  p->num_tensors = p->tensors_capacity = 0;
  p->total_elems = 0;
}
