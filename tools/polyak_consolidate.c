/* polyak-consolidate: one file from a set of checkpoint shards
 * (polyak_save_shards), streaming through one block buffer.
 *
 *   polyak-consolidate DIR OUT
 *       the newest complete set in DIR as one checkpoint, the bytes
 *       polyak_save of an unsharded handle in that state writes (it loads
 *       with polyak_load)
 *   polyak-consolidate --shadow K [--dtype f32|bf16|f16] DIR OUT
 *       shadow K of every tensor as polyak_get_shadow reads it (debiased,
 *       rounded to nearest even), buffers in their own dtype, under the
 *       model's names: safetensors.torch.load_file(OUT) is a state_dict
 *
 * Every header and every block read is verified; OUT is written crash-safely.
 * Every file of the set stays open while OUT is written (one descriptor a
 * rank: the soft limit on open files is raised to the hard one first).
 * Exit status 0, 1 (the reason on stderr) or 2 (usage). */
#include <sys/resource.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint/shard.h"

static int usage(const char *why)
{
  fprintf(stderr,
          "polyak-consolidate: %s\n"
          "usage: polyak-consolidate [--shadow K [--dtype f32|bf16|f16]] DIR OUT\n"
          "  DIR    a directory of polyak_save_shards files; its newest complete set is read\n"
          "  OUT    the file written: without --shadow, the checkpoint polyak_save writes (polyak_load\n"
          "         loads it); with --shadow K, shadow K under the model's names (a PyTorch state_dict)\n",
          why);
  return 2;
}

int main(int argc, char **argv)
{
  int shadow = -1, num_paths = 0;
  polyak_dtype dtype = POLYAK_F32;
  const char *paths[2] = {NULL, NULL}, *dtype_name = NULL;
  for (int a = 1; a < argc; a++) {
    if (strcmp(argv[a], "--help") == 0 || strcmp(argv[a], "-h") == 0) {
      usage("help");
      return 0;
    }
    if (strcmp(argv[a], "--shadow") == 0 && a + 1 < argc) {
      char *end;
      long k = strtol(argv[++a], &end, 10);
      if (*argv[a] == '\0' || *end != '\0' || k < 0 || k >= POLYAK_MAX_SHADOWS)
        return usage("--shadow takes a shadow index, 0 to 7");
      shadow = (int)k;
    } else if (strcmp(argv[a], "--dtype") == 0 && a + 1 < argc) {
      dtype_name = argv[++a];
      if (strcmp(dtype_name, "f32") == 0)
        dtype = POLYAK_F32;
      else if (strcmp(dtype_name, "bf16") == 0)
        dtype = POLYAK_BF16;
      else if (strcmp(dtype_name, "f16") == 0)
        dtype = POLYAK_F16;
      else
        return usage("--dtype is f32, bf16 or f16");
    } else if (argv[a][0] == '-' && argv[a][1] != '\0') {
      return usage("unknown option");
    } else if (num_paths < 2) {
      paths[num_paths++] = argv[a];
    } else {
      return usage("one directory and one output file");
    }
  }
  if (num_paths != 2)
    return usage("one directory and one output file");
  if (dtype_name && shadow < 0)
    return usage("--dtype goes with --shadow (a checkpoint keeps the shadows' own dtype)");
  struct rlimit files;
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max; /* a set of W files needs W descriptors */
    setrlimit(RLIMIT_NOFILE, &files);
  }
  char msg[1024] = "";
  if (polyak_shards_consolidate(paths[0], paths[1], shadow, dtype, msg, sizeof msg) != POLYAK_OK) {
    fprintf(stderr, "%s\n", msg);
    return 1;
  }
  return 0;
}
