/* shard_io.c: polyak_bench_shards, checkpoint shards measured per rank.
 *
 *   polyak_bench_shards [--mib N] [--ranks 1,2,4] [--dir DIR] [--out FILE]
 *
 * For each world size W, W processes (one per rank, CPU backend, no
 * communicator) hold a model of N MiB of f32 shadow (one shadow, 64 tensors,
 * bf16 params) and save it with polyak_save_shards at once into DIR, then,
 * after the files are dropped from the page cache (posix_fadvise DONTNEED,
 * after the saves' fsync), load it back with polyak_load_shards into new
 * handles of the same W. Each rank reports its bytes, seconds (GB/s) and
 * its peak extra memory: the high-water mark of its resident memory
 * (/proc/self/status VmHWM, reset through /proc/self/clear_refs) above its
 * size before the call. One line per rank and call to stdout and, as JSON,
 * to FILE. */
#include <dirent.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <polyak.h>

#define NUM_TENSORS 64

static double now(void)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static long long status_bytes(const char *key)
{
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long long kib = -1;
  size_t n = strlen(key);
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, key, n) == 0 && line[n] == ':')
      kib = atoll(line + n + 1);
  if (f)
    fclose(f);
  return kib * 1024;
}

static void reset_peak(void)
{
  FILE *f = fopen("/proc/self/clear_refs", "w");
  if (f) {
    fputs("5", f);
    fclose(f);
  }
}

typedef struct {
  int world, rank;
  int64_t elems_per_tensor;
  uint16_t *params; /* bf16 */
  const char *dir;
} rank_job;

static polyak_t *make(const rank_job *job)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.shadows[0].schedule.beta = 0.999;
  cfg.world_size = job->world;
  cfg.rank = job->rank;
  polyak_t *p = NULL;
  if (polyak_create(&p, &cfg) != POLYAK_OK)
    return NULL;
  for (int i = 0; i < NUM_TENSORS; i++) {
    char name[32];
    snprintf(name, sizeof name, "layers.%d.weight", i);
    int64_t shape[1] = {job->elems_per_tensor};
    polyak_add(p, name, job->params + (size_t)i * (size_t)job->elems_per_tensor, POLYAK_BF16, 1, shape);
  }
  if (polyak_finalize(p, NULL) != POLYAK_OK) {
    polyak_destroy(p);
    return NULL;
  }
  return p;
}

/* Waits for the parent's go (one byte on fd). */
static int wait_go(int fd)
{
  char go;
  return read(fd, &go, 1) == 1 ? 0 : -1;
}

/* One rank: save at the first go, load at the second; results on `out`. */
static int run_rank(const rank_job *job, int go_save, int go_load, int out)
{
  mallopt(M_MMAP_THRESHOLD, 128 << 10); /* its buffers mapped and unmapped each time, as at its first call */
  polyak_t *p = make(job);
  if (!p || polyak_update(p, 1, NULL) != POLYAK_OK)
    return 1;
  int64_t first = 0, num = 0, slice = 0;
  for (int i = 0; i < NUM_TENSORS; i++)
    if (polyak_local_range(p, i, &first, &num) == POLYAK_OK)
      slice += num;
  char line[512];
  if (write(out, "r", 1) != 1 || wait_go(go_save) != 0)
    return 1;
  reset_peak();
  long long before = status_bytes("VmRSS");
  double t0 = now();
  polyak_status saved = polyak_save_shards(p, job->dir);
  double seconds = now() - t0;
  long long extra = status_bytes("VmHWM") - before;
  polyak_destroy(p);
  int n = snprintf(line, sizeof line, "save %d %d %lld %.6f %lld %d\n", job->world, job->rank, (long long)slice * 4,
                   seconds, extra, (int)saved);
  if (write(out, line, (size_t)n) != n || wait_go(go_load) != 0)
    return 1;
  p = make(job);
  if (!p)
    return 1;
  reset_peak();
  before = status_bytes("VmRSS");
  t0 = now();
  polyak_status loaded = polyak_load_shards(p, job->dir);
  seconds = now() - t0;
  extra = status_bytes("VmHWM") - before;
  if (loaded != POLYAK_OK)
    fprintf(stderr, "rank %d: %s\n", job->rank, polyak_last_error(p));
  polyak_destroy(p);
  n = snprintf(line, sizeof line, "load %d %d %lld %.6f %lld %d\n", job->world, job->rank, (long long)slice * 4,
               seconds, extra, (int)loaded);
  return write(out, line, (size_t)n) == n ? 0 : 1;
}

/* The files in dir dropped from the page cache (clean after the saves' fsync). */
static void drop_cache(const char *dir)
{
  DIR *listing = opendir(dir);
  struct dirent *entry;
  while (listing && (entry = readdir(listing)) != NULL) {
    int fd = openat(dirfd(listing), entry->d_name, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      fdatasync(fd);
      posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
      close(fd);
    }
  }
  if (listing)
    closedir(listing);
}

/* The file system under dir, by name where it is a common one. */
static const char *fs_name(const char *dir, char *buffer, size_t num_bytes)
{
  struct statfs st;
  if (statfs(dir, &st) != 0)
    return "unknown";
  switch ((unsigned long)st.f_type) {
  case 0x01021994ul:
    return "tmpfs";
  case 0xEF53ul:
    return "ext4";
  case 0x58465342ul:
    return "xfs";
  case 0x6969ul:
    return "nfs";
  default:
    snprintf(buffer, num_bytes, "0x%lx", (unsigned long)st.f_type);
    return buffer;
  }
}

/* "AMD EPYC, 2 cores" */
static void machine(char *out, size_t num_bytes)
{
  FILE *f = fopen("/proc/cpuinfo", "r");
  char line[256], model[128] = "unknown CPU";
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "model name", 10) == 0 && strchr(line, ':')) {
      snprintf(model, sizeof model, "%s", strchr(line, ':') + 2);
      model[strcspn(model, "\n")] = '\0';
      break;
    }
  if (f)
    fclose(f);
  snprintf(out, num_bytes, "%s, %ld cores", model, sysconf(_SC_NPROCESSORS_ONLN));
}

static void go(int fd, int count)
{
  for (int i = 0; i < count; i++)
    if (write(fd, "g", 1) != 1)
      perror("go");
}

int main(int argc, char **argv)
{
  long mib = 1024;
  const char *ranks = "1,2,4", *root = "/tmp", *out_path = NULL;
  for (int a = 1; a + 1 < argc; a += 2) {
    if (strcmp(argv[a], "--mib") == 0)
      mib = atol(argv[a + 1]);
    else if (strcmp(argv[a], "--ranks") == 0)
      ranks = argv[a + 1];
    else if (strcmp(argv[a], "--dir") == 0)
      root = argv[a + 1];
    else if (strcmp(argv[a], "--out") == 0)
      out_path = argv[a + 1];
  }
  int64_t elems_per_tensor = ((int64_t)mib << 20) / 4 / NUM_TENSORS;
  uint16_t *params = malloc((size_t)elems_per_tensor * NUM_TENSORS * 2);
  if (!params || mib < 1)
    return 1;
  for (int64_t e = 0; e < elems_per_tensor * NUM_TENSORS; e++)
    params[e] = (uint16_t)(0x3f00 + (e * 7919) % 0x100); /* bf16 values near 0.5..1 */
  FILE *json = out_path ? fopen(out_path, "a") : NULL;
  time_t t = time(NULL);
  char date[32];
  strftime(date, sizeof date, "%Y-%m-%d", gmtime(&t));
  char cpu[200], fs_buffer[32];
  machine(cpu, sizeof cpu);
  const char *fs = fs_name(root, fs_buffer, sizeof fs_buffer);
  printf("polyak_bench_shards: %ld MiB of f32 shadow, %d tensors, CPU ranks in processes, files in %s (%s); %s; "
         "polyak %s, %s\n",
         mib, NUM_TENSORS, root, fs, cpu, polyak_version_string(), date);
  printf("%-5s %3s %4s %12s %9s %8s %14s\n", "call", "W", "rank", "bytes", "seconds", "GB/s", "extra MiB");
  for (const char *at = ranks; *at;) {
    int world = atoi(at);
    at += strcspn(at, ",");
    at += *at == ',';
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/polyak-bench-shards-%d-%d", root, (int)getpid(), world);
    mkdir(dir, 0755);
    int ready[2], save_go[2], load_go[2];
    if (pipe(ready) || pipe(save_go) || pipe(load_go))
      return 1;
    pid_t *pids = calloc((size_t)world, sizeof *pids);
    for (int r = 0; r < world; r++) {
      pids[r] = fork();
      if (pids[r] == 0) {
        close(ready[0]);
        rank_job job = {world, r, elems_per_tensor, params, dir};
        _exit(run_rank(&job, save_go[0], load_go[0], ready[1]));
      }
    }
    close(ready[1]);
    char buffer[65536];
    size_t used = 0;
    for (int r = 0; r < world; r++) /* every rank built and updated */
      if (read(ready[0], buffer, 1) != 1)
        return 1;
    go(save_go[1], world);
    /* the save lines, then the load lines after the cache is dropped */
    int lines = 0;
    while (lines < world) {
      ssize_t got = read(ready[0], buffer + used, sizeof buffer - 1 - used);
      if (got <= 0)
        return 1;
      for (ssize_t i = 0; i < got; i++)
        lines += buffer[used + i] == '\n';
      used += (size_t)got;
    }
    drop_cache(dir);
    go(load_go[1], world);
    ssize_t got;
    while ((got = read(ready[0], buffer + used, sizeof buffer - 1 - used)) > 0)
      used += (size_t)got;
    buffer[used] = '\0';
    for (int r = 0; r < world; r++)
      waitpid(pids[r], NULL, 0);
    for (char *line = strtok(buffer, "\n"); line; line = strtok(NULL, "\n")) {
      char call[8];
      int w, rank, ok;
      long long bytes, extra;
      double seconds;
      if (sscanf(line, "%7s %d %d %lld %lf %lld %d", call, &w, &rank, &bytes, &seconds, &extra, &ok) != 7)
        continue;
      printf("%-5s %3d %4d %12lld %9.3f %8.3f %14.2f%s\n", call, w, rank, bytes, seconds, bytes / seconds / 1e9,
             extra / 1048576.0, ok == 0 ? "" : "  FAILED");
      if (json)
        fprintf(json,
                "{\"bench\":\"shards\",\"date\":\"%s\",\"version\":\"%s\",\"machine\":\"%s\",\"fs\":\"%s\","
                "\"call\":\"%s\",\"world_size\":%d,\"rank\":%d,\"model_mib\":%ld,\"slice_bytes\":%lld,"
                "\"seconds\":%.6f,\"gb_per_s\":%.4f,\"peak_extra_bytes\":%lld,\"ok\":%s}\n",
                date, polyak_version_string(), cpu, fs, call, w, rank, mib, bytes, seconds, bytes / seconds / 1e9,
                extra, ok == 0 ? "true" : "false");
    }
    char command[4200];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    if (system(command) != 0)
      fprintf(stderr, "cannot remove %s\n", dir);
    free(pids);
    close(ready[0]);
    close(save_go[0]), close(save_go[1]), close(load_go[0]), close(load_go[1]);
  }
  if (json)
    fclose(json);
  free(params);
  return 0;
}
