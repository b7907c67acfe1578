/* safe_file.h: crash-safe replacement of a file (see safe_file.c). */
#ifndef POLYAK_SAFE_FILE_H
#define POLYAK_SAFE_FILE_H

#include <stddef.h>

typedef struct {
  int fd, dir_fd;
  int named; /* the new file has a temporary name to remove on abort */
  char target_path[4096];
  char temp_path[2 * 4096 + 64]; /* dir + "/." + base + suffix */
  char dir[4096];
  char base[4096];
  char error[2 * 4096 + 320]; /* what failed, after a -1 */
} polyak_safe_file;

/* Each returns 0, or -1 with the reason in f->error. On -1 from pwrite or
 * commit, call polyak_safe_file_abort. */
int polyak_safe_file_open(polyak_safe_file *f, const char *path);
/* num_bytes at `offset` of the new file */
int polyak_safe_file_pwrite(polyak_safe_file *f, const void *data, size_t num_bytes, long long offset);
int polyak_safe_file_commit(polyak_safe_file *f); /* the target now holds the new data */
void polyak_safe_file_abort(polyak_safe_file *f); /* the target is untouched; frees all */

#endif /* POLYAK_SAFE_FILE_H */
