/* checkpoint_source.c: where a load reads from, for polyak_ckpt_read: a
 * file read by position (polyak_load: a regular file, whole; polyak_load_fd:
 * from the fd's offset to where the checkpoint's header says it ends), a
 * pipe or socket read in order (polyak_load_fd on an fd without an offset)
 * and a caller's buffer (polyak_load_from_memory).
 *
 * polyak_load opens nothing but regular files: opening a FIFO for reading
 * waits for a writer, and a device may act on being opened. It looks before
 * opening, opens without blocking, and looks again at what it opened. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"

/* What a non-regular file is, in words ("a FIFO (named pipe)"). */
static const char *file_kind(mode_t mode)
{
  return S_ISDIR(mode)    ? "a directory"
         : S_ISFIFO(mode) ? "a FIFO (named pipe)"
         : S_ISSOCK(mode) ? "a socket"
         : S_ISCHR(mode)  ? "a character device"
         : S_ISBLK(mode)  ? "a block device"
                          : "not a regular file";
}

/* ---- a file read by position ------------------------------------------------- */

typedef struct {
  polyak_ckpt_source base;
  int fd;
  int64_t offset; /* of the checkpoint's first byte */
} fd_source;

static polyak_status fd_read_at(polyak_ckpt_source *src, polyak_t *p, void *dst, size_t num_bytes, int64_t offset)
{
  const fd_source *s = (const fd_source *)src;
  char *to = dst;
  for (size_t done = 0; done < num_bytes;) {
    ssize_t got = pread(s->fd, to + done, num_bytes - done, (off_t)(s->offset + offset + (int64_t)done));
    if (got < 0 && errno == EINTR)
      continue;
    if (got <= 0)
      return polyak_ckpt_fail(p, POLYAK_ERR_IO, src->function, "cannot read bytes %lld..%lld of %s: %s",
                              (long long)offset, (long long)(offset + (int64_t)num_bytes), src->extent,
                              got < 0 ? strerror(errno) : "unexpected end of file");
    done += (size_t)got;
  }
  return POLYAK_OK;
}

/* The checkpoint in a file of `st`: the whole file for polyak_load; else
 * what follows `offset`, up to where the checkpoint's header says it ends,
 * after which the offset is moved. */
static polyak_status load_positioned(polyak_t *p, int fd, const struct stat *st, int whole, int64_t offset,
                                     const char *function)
{
  fd_source src = {{fd_read_at, -1, whole, function, ""}, fd, offset};
  if (S_ISREG(st->st_mode))
    src.base.num_bytes = st->st_size > offset ? (int64_t)st->st_size - offset : 0;
  else /* a block device, say: the checkpoint ends where its header says; reads find the end */
    src.base.whole = 0;
  if (src.base.num_bytes < 0)
    snprintf(src.base.extent, sizeof src.base.extent, "the file");
  else if (whole && src.base.num_bytes == 0) /* /proc's files say 0 whatever they hold */
    snprintf(src.base.extent, sizeof src.base.extent, "the 0-byte file (empty, or of a size the system does not say)");
  else if (whole)
    snprintf(src.base.extent, sizeof src.base.extent, "the %lld-byte file", (long long)src.base.num_bytes);
  else
    snprintf(src.base.extent, sizeof src.base.extent, "the file after offset %lld of fd %d", (long long)offset, fd);
  if (!whole && src.base.num_bytes == 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function,
                            "fd %d is at the end of its file (offset %lld): no checkpoint follows", fd,
                            (long long)offset);
  int64_t checkpoint_bytes = 0;
  polyak_status status = polyak_ckpt_read(p, &src.base, &checkpoint_bytes);
  if (status == POLYAK_OK && !whole && lseek(fd, (off_t)(offset + checkpoint_bytes), SEEK_SET) < 0)
    status =
        polyak_ckpt_fail(p, POLYAK_ERR_IO, function,
                         "loaded, but cannot move the offset of fd %d past the checkpoint: %s", fd, strerror(errno));
  return status;
}

polyak_status polyak_load(polyak_t *p, const char *path)
{
  const char *function = "polyak_load";
  if (p && (!path || !path[0]))
    return polyak_ckpt_fail(p, POLYAK_ERR_INVALID_ARG, function, "path is %s", path ? "empty" : "NULL");
  POLYAK_TRY(polyak_ckpt_check_loadable(p, function));
  struct stat before, st;
  if (stat(path, &before) != 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "cannot open %s: %s", path, strerror(errno));
  if (!S_ISREG(before.st_mode))
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "%s is %s, not a regular file%s", path,
                            file_kind(before.st_mode),
                            S_ISFIFO(before.st_mode) || S_ISSOCK(before.st_mode)
                                ? " (to read a checkpoint from a pipe, pass its fd to polyak_load_fd)"
                                : "");
  /* O_NONBLOCK: should a FIFO take the file's place after the stat, the
   * open returns at once and fstat finds it */
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "cannot open %s: %s", path, strerror(errno));
  polyak_status status = POLYAK_OK;
  if (fstat(fd, &st) != 0)
    status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "cannot stat %s: %s", path, strerror(errno));
  else if (!S_ISREG(st.st_mode))
    status = polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "%s is %s, not a regular file", path, file_kind(st.st_mode));
  else
    status = load_positioned(p, fd, &st, 1, 0, function);
  close(fd);
  return status;
}

/* ---- a pipe or a socket, read in order ---------------------------------------- */

/* The checkpoint's bytes are kept as they arrive (a pipe cannot be read
 * twice): reads never go past what the reader asks for, which never goes
 * past the checkpoint's end, so whatever follows stays in the pipe. */
typedef struct {
  polyak_ckpt_source base;
  int fd;
  char *bytes; /* [0, num_read): the checkpoint's first bytes */
  size_t num_read, capacity;
} stream_source;

/* Reads until bytes [0, end) have arrived; EAGAIN waits for more. */
static polyak_status stream_fill(stream_source *s, polyak_t *p, size_t end)
{
  if (end > s->capacity) {
    size_t capacity = s->capacity ? s->capacity : 65536;
    while (capacity < end)
      capacity *= 2;
    char *bytes = realloc(s->bytes, capacity);
    if (!bytes)
      return polyak_ckpt_fail(p, POLYAK_ERR_NO_MEMORY, s->base.function, "out of host memory for %zu bytes of %s", end,
                              s->base.extent);
    s->bytes = bytes;
    s->capacity = capacity;
  }
  while (s->num_read < end) {
    ssize_t got = read(s->fd, s->bytes + s->num_read, end - s->num_read);
    if (got < 0 && errno == EAGAIN) { /* the caller's non-blocking fd: wait as a blocking one would */
      struct pollfd ready = {s->fd, POLLIN, 0};
      poll(&ready, 1, -1);
      continue;
    }
    if (got < 0 && errno == EINTR)
      continue;
    if (got <= 0)
      return polyak_ckpt_fail(p, POLYAK_ERR_IO, s->base.function, "cannot read byte %zu of %s: %s", s->num_read,
                              s->base.extent, got < 0 ? strerror(errno) : "it ended");
    s->num_read += (size_t)got;
  }
  return POLYAK_OK;
}

static polyak_status stream_read_at(polyak_ckpt_source *src, polyak_t *p, void *dst, size_t num_bytes, int64_t offset)
{
  stream_source *s = (stream_source *)src;
  polyak_status status = stream_fill(s, p, (size_t)offset + num_bytes);
  if (status == POLYAK_OK)
    memcpy(dst, s->bytes + offset, num_bytes);
  return status;
}

static polyak_status load_stream(polyak_t *p, int fd, const struct stat *st, const char *function)
{
  stream_source src = {{stream_read_at, -1, 0, function, ""}, fd, NULL, 0, 0};
  snprintf(src.base.extent, sizeof src.base.extent, "%s on fd %d",
           S_ISFIFO(st->st_mode)   ? "the pipe"
           : S_ISSOCK(st->st_mode) ? "the socket"
                                   : "the stream",
           fd);
  int64_t checkpoint_bytes = 0;
  polyak_status status = polyak_ckpt_read(p, &src.base, &checkpoint_bytes);
  free(src.bytes);
  return status;
}

polyak_status polyak_load_fd(polyak_t *p, int fd)
{
  const char *function = "polyak_load_fd";
  POLYAK_TRY(polyak_ckpt_check_loadable(p, function));
  int flags = fcntl(fd, F_GETFL);
  struct stat st;
  if (flags < 0 || fstat(fd, &st) != 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "fd %d: %s", fd, strerror(errno));
  if ((flags & O_ACCMODE) == O_WRONLY)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "fd %d is not open for reading", fd);
  if (S_ISDIR(st.st_mode))
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "fd %d is a directory", fd);
  off_t offset = lseek(fd, 0, SEEK_CUR);
  if (offset < 0 && errno == ESPIPE) /* a pipe, a FIFO, a socket: read in order */
    return load_stream(p, fd, &st, function);
  if (offset < 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_IO, function, "fd %d has no offset: %s", fd, strerror(errno));
  return load_positioned(p, fd, &st, 0, (int64_t)offset, function);
}

/* ---- a caller's buffer ----------------------------------------------------------- */

typedef struct {
  polyak_ckpt_source base;
  const char *bytes;
} memory_source;

static polyak_status memory_read_at(polyak_ckpt_source *src, polyak_t *p, void *dst, size_t num_bytes, int64_t offset)
{
  if (offset + (int64_t)num_bytes > src->num_bytes) /* the reader checks first: never */
    return polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, src->function, "%s ends before byte %lld", src->extent,
                            (long long)(offset + (int64_t)num_bytes));
  memcpy(dst, ((const memory_source *)src)->bytes + offset, num_bytes);
  return POLYAK_OK;
}

polyak_status polyak_load_from_memory(polyak_t *p, const void *src, size_t src_num_bytes)
{
  const char *function = "polyak_load_from_memory";
  POLYAK_TRY(polyak_ckpt_check_loadable(p, function));
  if (!src && src_num_bytes > 0)
    return polyak_ckpt_fail(p, POLYAK_ERR_INVALID_ARG, function, "src is NULL and src_num_bytes %zu", src_num_bytes);
  memory_source source = {{memory_read_at, (int64_t)src_num_bytes, 1, function, ""}, src};
  snprintf(source.base.extent, sizeof source.base.extent, "the %zu-byte buffer", src_num_bytes);
  int64_t checkpoint_bytes = 0;
  return polyak_ckpt_read(p, &source.base, &checkpoint_bytes);
}
