/* safe_file.h: crash-safe replacement of a file (see safe_file.c). */
#ifndef POLYAK_SAFE_FILE_H
#define POLYAK_SAFE_FILE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int fd, dir_fd;
  int named;            /* the new file has a temporary name to remove on abort */
  int linked_as_target; /* there was no target: the new file was linked as it */
  char host_tag[17];    /* this boot and pid namespace, in temporary names; "" if unknown */
  char target_path[4096];
  char temp_path[2 * 4096 + 64]; /* dir + "/." + base + suffix */
  char dir[4096];
  char base[4096];
  char error[2 * 4096 + 320]; /* what failed, after a -1 */
} polyak_safe_file;

/* Each returns 0, or -1 with the reason in f->error. On -1 from pwrite,
 * link or commit, call polyak_safe_file_abort. */
int polyak_safe_file_open(polyak_safe_file *f, const char *path);
/* num_bytes at `offset` of the new file */
int polyak_safe_file_pwrite(polyak_safe_file *f, const void *data, size_t num_bytes, long long offset);
/* the new file fsynced and given a name: the target's if there is none, else
 * a temporary one (commit's first half) */
int polyak_safe_file_link(polyak_safe_file *f);
int polyak_safe_file_commit(polyak_safe_file *f); /* the target now holds the new data */
void polyak_safe_file_abort(polyak_safe_file *f); /* the target is untouched; frees all */

/* The 16 hex digits temporary names carry: this boot's id and this pid
 * namespace, hashed. 0, or -1 where they cannot be read. */
int polyak_safe_file_host_tag(char tag[17]);

/* Removes the temporaries in directory dir_fd of writers of host `tag`
 * whose pid is gone; returns how many. */
int polyak_safe_file_remove_dead(int dir_fd, const char *tag);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_SAFE_FILE_H */
