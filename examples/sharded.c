/*
 * sharded.c: one EMA sharded across W GPUs, bootstrapped the way a
 * data-parallel C trainer does it.
 *
 *   polyak_sharded [W]      (default: every visible GPU, at most 8)
 *
 * The W processes are started here with fork(), before any CUDA call (a
 * real run starts them with mpirun or a job launcher instead). Rank 0 makes
 * the NCCL unique id and hands it to the others over pipes (with MPI:
 * MPI_Bcast); each rank builds its communicator with ncclCommInitRank and a
 * polyak handle with world_size W, its rank and the communicator. Every
 * step all ranks hold the same params (as after the gradient all-reduce)
 * and each updates only its slice of the shadows. At the end every rank
 * gathers the whole averages and checks them against an unsharded CPU
 * handle fed the same params, bit for bit; rank 0 saves a checkpoint,
 * every rank loads it back (each its own slice) and checks again.
 * Exit status 0 when every rank agrees.
 */
#define _GNU_SOURCE
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <polyak.h>

enum { NUM_TENSORS = 4, STEPS = 20 };
static const int64_t kSizes[NUM_TENSORS] = {7, 1000003, 3, 65537}; /* one spans every rank */

/* The same params on every rank at every step, as after an all-reduce. */
static float param_value(int tensor, int64_t e, int step)
{
  uint32_t h = (uint32_t)(e * 2654435761u) ^ (uint32_t)(tensor * 40503 + step * 9973);
  h ^= h >> 15;
  h *= 0x2C1B3C6Du;
  h ^= h >> 12;
  return (float)(h % 20001) * 1e-4f + 0.01f * (float)step;
}

static int fail(int rank, const char *what, polyak_t *p)
{
  fprintf(stderr, "rank %d: %s: %s\n", rank, what, p ? polyak_last_error(p) : "");
  return 1;
}

static polyak_config make_config(polyak_backend backend)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.backend = backend;
  cfg.num_shadows = 2;
  cfg.shadows[0].schedule.beta = 0.95;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadow_dtype = POLYAK_BF16; /* stochastic rounding: the bits depend on the global index */
  cfg.seed = 2026;
  return cfg;
}

/* Every tensor's whole shadow k through the gather, against the CPU twin.
 * Each polyak_get_shadow is a collective, so every rank makes all of them,
 * whatever it found before. */
static int check(int rank, polyak_t *sharded, polyak_t *reference, uint16_t *device_buffer)
{
  int64_t largest = 1000003;
  uint16_t *got = malloc(sizeof(uint16_t) * (size_t)largest), *want = malloc(sizeof(uint16_t) * (size_t)largest);
  int bad = 0;
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < NUM_TENSORS; i++) {
      if (polyak_get_shadow(sharded, k, i, device_buffer, POLYAK_BF16, NULL) != POLYAK_OK) {
        bad = fail(rank, "polyak_get_shadow (gather)", sharded);
        continue;
      }
      cudaMemcpy(got, device_buffer, sizeof(uint16_t) * (size_t)kSizes[i], cudaMemcpyDeviceToHost);
      polyak_get_shadow(reference, k, i, want, POLYAK_BF16, NULL);
      if (memcmp(got, want, sizeof(uint16_t) * (size_t)kSizes[i]) != 0) {
        fprintf(stderr, "rank %d: shadow %d of tensor %d differs from the unsharded average\n", rank, k, i);
        bad = 1;
      }
    }
  free(got);
  free(want);
  return bad;
}

/* 1 if every rank is ok (a 1-int all-reduce): a barrier with a verdict. */
static int all_ok(ncclComm_t comm, int *device_flag, int ok)
{
  if (cudaMemcpy(device_flag, &ok, sizeof ok, cudaMemcpyHostToDevice) != cudaSuccess ||
      ncclAllReduce(device_flag, device_flag, 1, ncclInt32, ncclMin, comm, NULL) != ncclSuccess ||
      cudaMemcpy(&ok, device_flag, sizeof ok, cudaMemcpyDeviceToHost) != cudaSuccess)
    return 0;
  return ok;
}

static int run_rank(int rank, int world, int id_read_fd, int *id_write_fds, const char *path)
{
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < world) {
    fprintf(stderr, "rank %d: needs %d GPUs, sees %d\n", rank, world, devices);
    return 1;
  }
  cudaSetDevice(rank);
  ncclUniqueId id;
  if (rank == 0) {
    if (ncclGetUniqueId(&id) != ncclSuccess)
      return fail(rank, "ncclGetUniqueId", NULL);
    for (int r = 1; r < world; r++)
      if (write(id_write_fds[r], &id, sizeof id) != (ssize_t)sizeof id)
        return fail(rank, "passing the NCCL id", NULL);
  } else if (read(id_read_fd, &id, sizeof id) != (ssize_t)sizeof id) {
    return fail(rank, "receiving the NCCL id", NULL);
  }
  ncclComm_t comm;
  if (ncclCommInitRank(&comm, world, id, rank) != ncclSuccess)
    return fail(rank, "ncclCommInitRank", NULL);

  /* the data-parallel params: full on every rank, on its GPU */
  float *host[NUM_TENSORS], *device[NUM_TENSORS];
  polyak_config cfg = make_config(POLYAK_BACKEND_CUDA);
  cfg.device = rank;
  cfg.world_size = world;
  cfg.rank = rank;
  cfg.nccl_comm = comm;
  polyak_config cpu_cfg = make_config(POLYAK_BACKEND_CPU);
  polyak_t *sharded = NULL, *reference = NULL;
  if (polyak_create(&sharded, &cfg) != POLYAK_OK || polyak_create(&reference, &cpu_cfg) != POLYAK_OK) {
    char why[512];
    polyak_check_config(&cfg, why, sizeof why);
    fprintf(stderr, "rank %d: polyak_create: %s\n", rank, why);
    return 1;
  }
  for (int i = 0; i < NUM_TENSORS; i++) {
    char name[32];
    snprintf(name, sizeof name, "layer%d.weight", i);
    host[i] = malloc(sizeof(float) * (size_t)kSizes[i]);
    cudaMalloc((void **)&device[i], sizeof(float) * (size_t)kSizes[i]);
    for (int64_t e = 0; e < kSizes[i]; e++)
      host[i][e] = param_value(i, e, 0);
    cudaMemcpy(device[i], host[i], sizeof(float) * (size_t)kSizes[i], cudaMemcpyHostToDevice);
    if (polyak_add(sharded, name, device[i], POLYAK_F32, 1, &kSizes[i]) != POLYAK_OK ||
        polyak_add(reference, name, host[i], POLYAK_F32, 1, &kSizes[i]) != POLYAK_OK)
      return fail(rank, "polyak_add", sharded);
  }
  if (polyak_finalize(sharded, NULL) != POLYAK_OK || polyak_finalize(reference, NULL) != POLYAK_OK)
    return fail(rank, "polyak_finalize", sharded);

  for (int step = 1; step <= STEPS; step++) {
    for (int i = 0; i < NUM_TENSORS; i++) {
      for (int64_t e = 0; e < kSizes[i]; e++)
        host[i][e] = param_value(i, e, step);
      cudaMemcpy(device[i], host[i], sizeof(float) * (size_t)kSizes[i], cudaMemcpyHostToDevice);
    }
    if (polyak_update(sharded, step, NULL) != POLYAK_OK || polyak_update(reference, step, NULL) != POLYAK_OK)
      return fail(rank, "polyak_update", sharded);
  }
  int64_t kept = 0;
  for (int i = 0; i < NUM_TENSORS; i++) {
    int64_t first, count;
    polyak_local_range(sharded, i, &first, &count);
    kept += count;
  }
  uint16_t *buffer;
  int *flag;
  cudaMalloc((void **)&buffer, sizeof(uint16_t) * 1000003);
  cudaMalloc((void **)&flag, sizeof(int));
  int bad = check(rank, sharded, reference, buffer);

  /* rank 0 writes the gathered shadows (every rank takes part); once the
   * ranks agree that the save worked, every rank reads back its slice */
  if (polyak_save(sharded, path) != POLYAK_OK)
    bad = fail(rank, "polyak_save", sharded);
  if (all_ok(comm, flag, !bad)) {
    if (polyak_load(sharded, path) != POLYAK_OK)
      bad = fail(rank, "polyak_load", sharded);
    bad |= check(rank, sharded, reference, buffer);
  } else {
    bad = 1;
  }
  if (!bad)
    printf("rank %d of %d: keeps %lld of %lld elements per shadow; gathered averages, saved and "
           "reloaded, equal the unsharded ones bit for bit\n",
           rank, world, (long long)kept, (long long)(7 + 1000003 + 3 + 65537));
  polyak_destroy(sharded);
  polyak_destroy(reference);
  for (int i = 0; i < NUM_TENSORS; i++) {
    free(host[i]);
    cudaFree(device[i]);
  }
  cudaFree(buffer);
  cudaFree(flag);
  ncclCommDestroy(comm); /* the trainer's communicator: polyak only borrowed it */
  return bad;
}

int main(int argc, char **argv)
{
  int world = argc > 1 ? atoi(argv[1]) : 0;
  if (world == 0) { /* every visible GPU: counted in a child, so that this process never touches CUDA */
    int count_pipe[2];
    if (pipe(count_pipe) != 0)
      return 1;
    if (fork() == 0) {
      int devices = 0;
      cudaGetDeviceCount(&devices);
      if (write(count_pipe[1], &devices, sizeof devices) != (ssize_t)sizeof devices)
        _exit(1);
      _exit(0);
    }
    if (read(count_pipe[0], &world, sizeof world) != (ssize_t)sizeof world)
      return 1;
    wait(NULL);
    world = world > 8 ? 8 : world;
  }
  if (world < 1 || world > 8) {
    fprintf(stderr, "usage: %s [W]  (1..8 processes, one GPU each; found %d)\n", argv[0], world);
    return 2;
  }
  int id_pipes[8][2];
  for (int r = 0; r < world; r++)
    if (pipe(id_pipes[r]) != 0)
      return 1;
  char path[64]; /* one file per run, removed at the end */
  snprintf(path, sizeof path, "/tmp/polyak-sharded-%ld.safetensors", (long)getpid());
  pid_t children[8];
  for (int r = 0; r < world; r++) {
    children[r] = fork();
    if (children[r] == 0) {
      int writers[8];
      for (int s = 0; s < world; s++) {
        writers[s] = id_pipes[s][1];
        if (s != r)
          close(id_pipes[s][0]);
      }
      int rc = run_rank(r, world, id_pipes[r][0], writers, path);
      fflush(stdout);
      _exit(rc);
    }
  }
  /* a rank that fails can leave the others waiting in NCCL: stop them all */
  int failed = 0;
  for (int done = 0; done < world; done++) {
    int status = 0;
    if (wait(&status) < 0)
      break;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      if (!failed)
        for (int r = 0; r < world; r++)
          kill(children[r], SIGKILL);
      failed = 1;
    }
  }
  unlink(path);
  printf("%s: %d ranks\n", failed ? "FAILED" : "all ranks agree", world);
  return failed;
}
