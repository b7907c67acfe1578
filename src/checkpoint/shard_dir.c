/* shard_dir.c: shard files' names and the sets they form in a directory.
 * A name says everything the choice of a set needs, so every rank that
 * lists the same files chooses the same set without opening one: the
 * newest step among the complete sets (all W ranks' files there). */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shard.h"

#define NAME_SUFFIX ".safetensors"

/* Reads a canonical decimal (no sign, no leading zero) at *text, moving
 * past it; -1 if there is none or it overflows int64. */
static int read_decimal(const char **text, int64_t *value)
{
  size_t n = strspn(*text, "0123456789");
  if (n == 0 || n > 19 || ((*text)[0] == '0' && n > 1))
    return -1;
  char digits[20];
  memcpy(digits, *text, n);
  digits[n] = '\0';
  errno = 0;
  *value = strtoll(digits, NULL, 10);
  if (errno != 0)
    return -1;
  *text += n;
  return 0;
}

/* Moves past `literal` at *text; -1 if it is not there. */
static int read_literal(const char **text, const char *literal)
{
  size_t n = strlen(literal);
  if (strncmp(*text, literal, n) != 0)
    return -1;
  *text += n;
  return 0;
}

int polyak_shard_parse_name(const char *name, polyak_shard_name *out)
{
  const char *at = name;
  int64_t step, rank, world;
  if (read_literal(&at, "polyak-step") || read_decimal(&at, &step) || read_literal(&at, "-"))
    return -1;
  if (strspn(at, "0123456789abcdef") < 16 || at[16] != '-')
    return -1;
  char hex[17];
  memcpy(hex, at, 16);
  hex[16] = '\0';
  at += 17;
  if (read_literal(&at, "rank") || read_decimal(&at, &rank) || read_literal(&at, "-of") || read_decimal(&at, &world) ||
      read_literal(&at, NAME_SUFFIX) || *at != '\0')
    return -1;
  if (world < 1 || world > INT32_MAX || rank >= world)
    return -1;
  out->step = step;
  out->save_id = strtoull(hex, NULL, 16);
  out->rank = (int)rank;
  out->world_size = (int)world;
  return 0;
}

void polyak_shard_format_name(const polyak_shard_name *name, char out[POLYAK_SHARD_NAME_BYTES])
{
  snprintf(out, POLYAK_SHARD_NAME_BYTES, "polyak-step%" PRId64 "-%016" PRIx64 "-rank%d-of%d" NAME_SUFFIX, name->step,
           name->save_id, name->rank, name->world_size);
}

char *polyak_shard_path(const char *dir, const polyak_shard_set *set, int rank)
{
  polyak_shard_name name = {set->step, set->save_id, rank, set->world_size};
  char base[POLYAK_SHARD_NAME_BYTES];
  polyak_shard_format_name(&name, base);
  size_t n = strlen(dir) + 1 + strlen(base) + 1;
  char *path = malloc(n);
  if (path)
    snprintf(path, n, "%s/%s", dir, base);
  return path;
}

static int compare_names(const void *a, const void *b)
{
  const polyak_shard_name *x = a, *y = b;
  if (x->step != y->step)
    return x->step < y->step ? -1 : 1;
  if (x->save_id != y->save_id)
    return x->save_id < y->save_id ? -1 : 1;
  if (x->world_size != y->world_size)
    return x->world_size < y->world_size ? -1 : 1;
  return (x->rank > y->rank) - (x->rank < y->rank);
}

polyak_status polyak_shard_sets(polyak_t *p, const char *dir, polyak_shard_set **sets, int *num_sets,
                                const char *function)
{
  *sets = NULL;
  *num_sets = 0;
  DIR *listing = opendir(dir);
  if (!listing)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "cannot read the directory %s: %s", dir, strerror(errno));
  polyak_shard_name *names = NULL;
  size_t count = 0, capacity = 0;
  polyak_status status = POLYAK_OK;
  struct dirent *entry;
  /* errno before each readdir: only its own failure may be left there (a
   * name's number out of range leaves ERANGE from strtoll) */
  while (status == POLYAK_OK && (errno = 0, entry = readdir(listing)) != NULL) {
    polyak_shard_name name;
    if (polyak_shard_parse_name(entry->d_name, &name) != 0)
      continue;
    if (count == capacity) {
      capacity = capacity ? 2 * capacity : 64;
      polyak_shard_name *grown = realloc(names, capacity * sizeof *grown);
      if (!grown)
        status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory listing %s", dir);
      else
        names = grown;
    }
    if (status == POLYAK_OK)
      names[count++] = name;
  }
  if (status == POLYAK_OK && errno != 0)
    status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "cannot list the directory %s: %s", dir, strerror(errno));
  closedir(listing);
  /* one set per (step, save id, world size): its files are consecutive once sorted */
  polyak_shard_set *out = status == POLYAK_OK ? malloc((count + 1) * sizeof *out) : NULL;
  if (status == POLYAK_OK && !out)
    status = polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, function, "out of host memory listing %s", dir);
  if (status != POLYAK_OK) {
    free(names);
    return status;
  }
  if (count > 0)
    qsort(names, count, sizeof *names, compare_names);
  int n = 0;
  for (size_t first = 0, end; first < count; first = end) {
    polyak_shard_set *set = &out[n++];
    *set = (polyak_shard_set){names[first].step, names[first].save_id, names[first].world_size, 0, -1};
    for (end = first; end < count && names[end].step == set->step && names[end].save_id == set->save_id &&
                      names[end].world_size == set->world_size;
         end++) {
      if (set->first_missing < 0 && names[end].rank != set->num_present)
        set->first_missing = set->num_present; /* ranks are sorted and distinct */
      set->num_present++;
    }
    if (set->first_missing < 0 && set->num_present < set->world_size)
      set->first_missing = set->num_present;
  }
  free(names);
  *sets = out;
  *num_sets = n;
  return POLYAK_OK;
}

int polyak_shard_newest(const polyak_shard_set *sets, int num_sets, int world_size, int *rival)
{
  int best = -1;
  for (int s = 0; s < num_sets; s++) {
    const polyak_shard_set *set = &sets[s], *chosen = best >= 0 ? &sets[best] : NULL;
    if (set->first_missing >= 0)
      continue;
    int better = !chosen || set->step > chosen->step;
    if (chosen && set->step == chosen->step) {
      int mine = set->world_size == world_size, theirs = chosen->world_size == world_size;
      better = mine != theirs                    ? mine
               : set->save_id != chosen->save_id ? set->save_id < chosen->save_id
                                                 : set->world_size < chosen->world_size;
    }
    if (better)
      best = s;
  }
  if (rival) {
    *rival = -1;
    for (int s = 0; s < num_sets && best >= 0 && *rival < 0; s++)
      if (sets[s].first_missing < 0 && sets[s].step == sets[best].step && sets[s].save_id != sets[best].save_id)
        *rival = s;
  }
  return best;
}

polyak_status polyak_shard_choose(polyak_t *p, const char *dir, int world_size, polyak_shard_set *chosen,
                                  const char *function)
{
  polyak_shard_set *sets = NULL;
  int num_sets = 0, rival = -1;
  POLYAK_TRY(polyak_shard_sets(p, dir, &sets, &num_sets, function));
  int newest = polyak_shard_newest(sets, num_sets, world_size, &rival), latest = -1;
  for (int s = 0; s < num_sets; s++) /* the newest incomplete one, for the message */
    if (latest < 0 || sets[s].step > sets[latest].step ||
        (sets[s].step == sets[latest].step && sets[s].num_present > sets[latest].num_present))
      latest = s;
  polyak_status status = POLYAK_OK;
  if (newest >= 0 && rival >= 0) {
    char *one = polyak_shard_path(dir, &sets[newest], 0), *other = polyak_shard_path(dir, &sets[rival], 0);
    status = polyak_ckpt_fail(p, POLYAK_ERR_STATE, function,
                              "%s holds two complete sets of step %lld from different saves (%s, ... and %s, ...): "
                              "independent handles saved into one directory, and which set is whose no name says; "
                              "give each handle its own directory",
                              dir, (long long)sets[newest].step, one ? one : "", other ? other : "");
    free(one);
    free(other);
  } else if (newest >= 0)
    *chosen = sets[newest];
  else if (latest < 0)
    status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function,
                              "%s holds no shard files, so no complete set "
                              "(polyak-step<step>-<save id>-rank<r>-of<W>.safetensors)",
                              dir);
  else {
    char *path = polyak_shard_path(dir, &sets[latest], sets[latest].first_missing);
    status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function,
                              "%s holds no complete set of shard files: the newest, of step %lld (%d of its %d "
                              "files there), lacks %s (a save under way or killed, or ranks whose save ids "
                              "differed: their params were not the same)",
                              dir, (long long)sets[latest].step, sets[latest].num_present, sets[latest].world_size,
                              path ? path : "a file");
    free(path);
  }
  free(sets);
  return status;
}

int polyak_shard_remove_before(const char *dir, int64_t step)
{
  DIR *listing = opendir(dir);
  if (!listing)
    return 0;
  int removed = 0;
  struct dirent *entry;
  while ((errno = 0, entry = readdir(listing)) != NULL) {
    polyak_shard_name name;
    if (polyak_shard_parse_name(entry->d_name, &name) == 0 && name.step < step &&
        unlinkat(dirfd(listing), entry->d_name, 0) == 0)
      removed++;
  }
  closedir(listing);
  return removed;
}
