/* safe_file.c: replacing a file so that a crash at any moment leaves either
 * the old file or the new one. The data goes to an unnamed file in the
 * target's directory (O_TMPFILE; a hidden named one where the filesystem
 * lacks it), is fsynced, gets a temporary name, is renamed over the target,
 * and the directory is fsynced. A writer killed before the link leaves
 * nothing behind. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safe_file.h"

static void set_error(polyak_safe_file *f, const char *what, const char *path)
{
  snprintf(f->error, sizeof f->error, "%s %s: %s", what, path, strerror(errno));
}

/* "<dir>/.<base>.polyak-<pid>-<n>" */
static void temp_name(polyak_safe_file *f, int attempt)
{
  snprintf(f->temp_path, sizeof f->temp_path, "%s/.%s.polyak-%ld-%d", f->dir, f->base, (long)getpid(), attempt);
}

int polyak_safe_file_open(polyak_safe_file *f, const char *path)
{
  memset(f, 0, sizeof *f);
  f->fd = -1;
  f->dir_fd = -1;
  if (strlen(path) + 64 >= sizeof f->target_path) {
    snprintf(f->error, sizeof f->error, "path too long: %s", path);
    return -1;
  }
  strcpy(f->target_path, path);
  char copy[sizeof f->target_path];
  strcpy(copy, path);
  strcpy(f->dir, dirname(copy));
  strcpy(copy, path);
  strcpy(f->base, basename(copy));
  f->dir_fd = open(f->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (f->dir_fd < 0) {
    set_error(f, "cannot open the directory", f->dir);
    return -1;
  }
  f->fd = open(f->dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
  if (f->fd >= 0)
    return 0;
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL && errno != ENOENT) {
    set_error(f, "cannot create a file in", f->dir);
    close(f->dir_fd);
    f->dir_fd = -1;
    return -1;
  }
  for (int attempt = 0; attempt < 100; attempt++) { /* no O_TMPFILE here: a named one */
    temp_name(f, attempt);
    f->fd = open(f->temp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (f->fd >= 0) {
      f->named = 1;
      return 0;
    }
    if (errno != EEXIST)
      break;
  }
  set_error(f, "cannot create a file in", f->dir);
  close(f->dir_fd);
  f->dir_fd = -1;
  return -1;
}

int polyak_safe_file_pwrite(polyak_safe_file *f, const void *data, size_t num_bytes, long long offset)
{
  const char *p = data;
  while (num_bytes > 0) {
    ssize_t written = pwrite(f->fd, p, num_bytes, (off_t)offset);
    if (written < 0 && errno == EINTR)
      continue;
    if (written <= 0) {
      set_error(f, "cannot write", f->target_path);
      return -1;
    }
    p += written;
    offset += written;
    num_bytes -= (size_t)written;
  }
  return 0;
}

int polyak_safe_file_commit(polyak_safe_file *f)
{
  if (fsync(f->fd) != 0) {
    set_error(f, "cannot fsync", f->target_path);
    return -1;
  }
  if (!f->named) { /* give the unnamed file a temporary name first */
    char proc_path[64];
    snprintf(proc_path, sizeof proc_path, "/proc/self/fd/%d", f->fd);
    int attempt = 0;
    for (; attempt < 100; attempt++) {
      temp_name(f, attempt);
      if (linkat(AT_FDCWD, proc_path, AT_FDCWD, f->temp_path, AT_SYMLINK_FOLLOW) == 0)
        break;
      if (errno != EEXIST) {
        set_error(f, "cannot link the new file into", f->dir);
        return -1;
      }
    }
    if (attempt == 100) {
      set_error(f, "cannot link the new file into", f->dir);
      return -1;
    }
    f->named = 1;
  }
  if (close(f->fd) != 0) {
    f->fd = -1;
    set_error(f, "cannot close", f->target_path);
    return -1;
  }
  f->fd = -1;
  if (rename(f->temp_path, f->target_path) != 0) {
    set_error(f, "cannot rename the new file to", f->target_path);
    return -1;
  }
  f->named = 0; /* the temporary name is gone */
  if (fsync(f->dir_fd) != 0) {
    set_error(f, "cannot fsync the directory", f->dir);
    return -1;
  }
  close(f->dir_fd);
  f->dir_fd = -1;
  return 0;
}

void polyak_safe_file_abort(polyak_safe_file *f)
{
  if (f->fd >= 0)
    close(f->fd);
  if (f->named)
    unlink(f->temp_path);
  if (f->dir_fd >= 0)
    close(f->dir_fd);
  f->fd = f->dir_fd = -1;
  f->named = 0;
}
