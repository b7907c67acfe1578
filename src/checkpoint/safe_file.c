/* safe_file.c: replacing a file so that a crash at any moment leaves either
 * the old file or the new one, and no litter that lasts. The data goes to
 * an unnamed file in the target's directory (O_TMPFILE; a hidden named one
 * where the filesystem lacks it) and is fsynced; where the target does not
 * exist yet it is linked under the target's name, atomically; else it gets
 * a temporary name, is renamed over the target, and the directory is
 * fsynced. A writer killed before the link leaves nothing behind.
 *
 * One killed between the link and the rename leaves its temporary; every
 * later save in that directory removes those that are provably dead. A
 * temporary is named ".<base>.polyak-<host>-<pid>-<n>", where <host> is 16
 * hex digits of the XXH3-64 of this boot's id (random per boot of a host)
 * and the pid namespace: a save removes one only if <host> is its own and
 * that pid is gone, never by age, never another host's or container's (a
 * shared filesystem), never one whose writer lives. Names without <host>
 * (older versions', or where the boot id cannot be read) are never removed. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "safe_file.h"

#define TEMP_MARK ".polyak-"

static void set_error(polyak_safe_file *f, const char *what, const char *path)
{
  snprintf(f->error, sizeof f->error, "%s %s: %s", what, path, strerror(errno));
}

int polyak_safe_file_host_tag(char tag[17])
{
  char text[160] = {0};
  int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
  ssize_t got = fd >= 0 ? read(fd, text, 64) : -1;
  if (fd >= 0)
    close(fd);
  if (got < 32) /* a UUID */
    return -1;
  ssize_t ns = readlink("/proc/self/ns/pid", text + got, sizeof text - 1 - (size_t)got);
  if (ns <= 0)
    return -1;
  snprintf(tag, 17, "%016llx", (unsigned long long)XXH3_64bits(text, (size_t)(got + ns)));
  return 0;
}

/* "<dir>/.<base>.polyak-<host>-<pid>-<n>" (or without <host>) */
static void temp_name(polyak_safe_file *f, int attempt)
{
  if (f->host_tag[0])
    snprintf(f->temp_path, sizeof f->temp_path, "%s/.%s" TEMP_MARK "%s-%ld-%d", f->dir, f->base, f->host_tag,
             (long)getpid(), attempt);
  else
    snprintf(f->temp_path, sizeof f->temp_path, "%s/.%s" TEMP_MARK "%ld-%d", f->dir, f->base, (long)getpid(), attempt);
}

/* The pid of a temporary named by a writer of host `tag`, else 0. */
static long temp_owner(const char *name, const char *tag)
{
  const char *mark = strstr(name, TEMP_MARK);
  while (mark && strstr(mark + 1, TEMP_MARK)) /* the last: the base may hold one too */
    mark = strstr(mark + 1, TEMP_MARK);
  if (name[0] != '.' || !mark || strncmp(mark + strlen(TEMP_MARK), tag, 16) != 0)
    return 0;
  const char *rest = mark + strlen(TEMP_MARK) + 16;
  size_t pid_digits = rest[0] == '-' ? strspn(rest + 1, "0123456789") : 0;
  const char *attempt = rest + 1 + pid_digits;
  if (pid_digits == 0 || pid_digits > 9 || attempt[0] != '-' || attempt[1] == '\0' ||
      strspn(attempt + 1, "0123456789") != strlen(attempt + 1))
    return 0;
  return strtol(rest + 1, NULL, 10);
}

int polyak_safe_file_remove_dead(int dir_fd, const char *tag)
{
  int removed = 0, fd = dup(dir_fd);
  DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
  if (!dir) {
    if (fd >= 0)
      close(fd);
    return 0;
  }
  struct dirent *entry;
  while ((entry = readdir(dir)) != NULL) {
    long pid = temp_owner(entry->d_name, tag);
    struct stat st;
    if (pid <= 0 || pid == (long)getpid() || fstatat(dir_fd, entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(st.st_mode))
      continue;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH && unlinkat(dir_fd, entry->d_name, 0) == 0)
      removed++; /* EPERM: alive, another user's */
  }
  closedir(dir);
  return removed;
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
  if (polyak_safe_file_host_tag(f->host_tag) != 0)
    f->host_tag[0] = '\0';
  else /* before the new file: the space of dead ones first */
    polyak_safe_file_remove_dead(f->dir_fd, f->host_tag);
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

int polyak_safe_file_link(polyak_safe_file *f)
{
  if (fsync(f->fd) != 0) {
    set_error(f, "cannot fsync", f->target_path);
    return -1;
  }
  if (f->named)
    return 0;
  char proc_path[64];
  snprintf(proc_path, sizeof proc_path, "/proc/self/fd/%d", f->fd);
  if (linkat(AT_FDCWD, proc_path, f->dir_fd, f->base, AT_SYMLINK_FOLLOW) == 0) {
    f->linked_as_target = 1; /* no target yet: the new file is it, at once */
    return 0;
  }
  if (errno != EEXIST) {
    set_error(f, "cannot link the new file into", f->dir);
    return -1;
  }
  for (int attempt = 0; attempt < 100; attempt++) { /* a temporary name, renamed over the target */
    temp_name(f, attempt);
    if (linkat(AT_FDCWD, proc_path, AT_FDCWD, f->temp_path, AT_SYMLINK_FOLLOW) == 0) {
      f->named = 1;
      return 0;
    }
    if (errno != EEXIST)
      break;
  }
  set_error(f, "cannot link the new file into", f->dir);
  return -1;
}

int polyak_safe_file_commit(polyak_safe_file *f)
{
  if (polyak_safe_file_link(f) != 0)
    return -1;
  if (close(f->fd) != 0) {
    f->fd = -1;
    set_error(f, "cannot close", f->target_path);
    return -1;
  }
  f->fd = -1;
  if (!f->linked_as_target && rename(f->temp_path, f->target_path) != 0) {
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
