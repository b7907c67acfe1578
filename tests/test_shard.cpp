// test_shard.cpp: sharded shadows on the CPU backend. W handles in one
// process (world_size W, rank r, no communicator) must together equal an
// unsharded handle bit for bit; the assembly step of the NCCL gather must
// rebuild whole shadows from arenas gathered by hand; files reshard on load.
#include "test_util.h"

#include <fcntl.h>
#include <unistd.h>

#include "polyak_internal.h"

using namespace polyak_test;

namespace {

polyak_config shard_config(int world_size, int rank, bool stochastic_f32 = false)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadow_dtype = POLYAK_BF16; // stochastic rounding keyed by global element index
  if (stochastic_f32) {           // keyed the same way
    cfg.shadow_dtype = POLYAK_F32;
    cfg.shadows[0].rounding = cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
  }
  cfg.seed = 17;
  cfg.world_size = world_size;
  cfg.rank = rank;
  return cfg;
}

// An unsharded handle and W rank handles over the same tensors.
struct World {
  std::vector<Tensor> tensors;
  Handle whole;
  std::vector<Handle> ranks;
  int world_size;

  World(int w, const std::vector<int64_t> &sizes, bool stochastic_f32 = false) : world_size(w)
  {
    const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16};
    for (size_t i = 0; i < sizes.size(); i++)
      tensors.emplace_back("t" + std::to_string(i), dtypes[i % 3], sizes[i], dtypes[i % 3] == POLYAK_F32 ? 4 : 6);
    std::mt19937_64 rng(70);
    for (auto &t : tensors)
      t.randomize(rng);
    whole = make_handle(shard_config(1, 0, stochastic_f32));
    add_all(whole.get(), tensors);
    EXPECT_EQ(polyak_finalize(whole.get(), nullptr), POLYAK_OK);
    for (int r = 0; r < w; r++) {
      ranks.push_back(make_handle(shard_config(w, r, stochastic_f32)));
      add_all(ranks.back().get(), tensors);
      EXPECT_EQ(polyak_finalize(ranks.back().get(), nullptr), POLYAK_OK) << polyak_last_error(ranks.back().get());
    }
  }
  void update(int64_t step, bool poison = false)
  {
    std::mt19937_64 rng(100 + step);
    for (auto &t : tensors) {
      t.randomize(rng);
      if (poison && t.num_elems > 2)
        t.set(t.num_elems / 2, NAN);
    }
    ASSERT_EQ(polyak_update(whole.get(), step, nullptr), POLYAK_OK);
    for (auto &h : ranks)
      ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
  }
  // The test-only gather: every rank's local piece into one buffer, as f32
  // bits (exact for bf16 shadows too).
  std::vector<uint32_t> gathered(int k, int i)
  {
    std::vector<uint32_t> full(tensors[i].num_elems + 1, 0xFFFFFFFFu);
    std::vector<int> owners(tensors[i].num_elems, 0);
    for (auto &h : ranks) {
      int64_t first = -1, count = -1;
      EXPECT_EQ(polyak_local_range(h.get(), i, &first, &count), POLYAK_OK);
      EXPECT_EQ(polyak_get_local_shadow(h.get(), k, i, full.data() + first, POLYAK_F32, nullptr), POLYAK_OK);
      for (int64_t e = first; e < first + count; e++)
        owners[e]++;
    }
    for (int64_t e = 0; e < tensors[i].num_elems; e++)
      EXPECT_EQ(owners[e], 1) << "element " << e << " of tensor " << i << " is kept by " << owners[e] << " ranks";
    full.resize(tensors[i].num_elems);
    return full;
  }
  std::vector<uint32_t> reference(int k, int i)
  {
    std::vector<uint32_t> out(tensors[i].num_elems + 1);
    EXPECT_EQ(polyak_get_shadow(whole.get(), k, i, out.data(), POLYAK_F32, nullptr), POLYAK_OK);
    out.resize(tensors[i].num_elems);
    return out;
  }
  void expect_equal()
  {
    for (int k = 0; k < 2; k++)
      for (size_t i = 0; i < tensors.size(); i++)
        ASSERT_EQ(gathered(k, (int)i), reference(k, (int)i))
            << "W = " << world_size << " shadow " << k << " tensor " << i;
    int64_t sum = 0, count = 0;
    for (auto &h : ranks) {
      ASSERT_EQ(polyak_nonfinite_count(h.get(), &count), POLYAK_OK);
      sum += count;
    }
    ASSERT_EQ(polyak_nonfinite_count(whole.get(), &count), POLYAK_OK);
    EXPECT_EQ(sum, count);
  }
};

const std::vector<std::vector<int64_t>> kLists = {
    {0, 1, 3, 65537, 130001, 5, 0, 7}, // odd sizes and zero-size tensors
    {3},                               // fewer elements than ranks
    {10, 1000003, 10},                 // one tensor over several ranks
    {0, 0},                            // nothing at all
};

TEST(Shard, RanksTogetherEqualAnUnshardedHandleBitForBit)
{
  for (const auto &sizes : kLists)
    for (int w = 1; w <= 8; w++) {
      World world(w, sizes);
      for (int64_t step : {1, 2, 5, 6})
        world.update(step, step == 5);
      world.expect_equal();
      if (HasFailure())
        return;
    }
}

TEST(Shard, StochasticF32ShadowsOfRanksEqualAnUnshardedHandle)
{
  for (int w : {2, 3, 8}) {
    World world(w, kLists[0], true);
    for (int64_t step : {1, 2, 5, 6})
      world.update(step, step == 5);
    world.expect_equal();
  }
}

TEST(Shard, SlicesAreBalancedAndStartOnEightElementBoundaries)
{
  World world(3, {10, 1000003, 10});
  const int64_t total = 1000023;
  std::vector<int64_t> kept;
  for (auto &h : world.ranks) {
    int64_t mine = 0;
    for (int i = 0; i < 3; i++) {
      int64_t first, count;
      ASSERT_EQ(polyak_local_range(h.get(), i, &first, &count), POLYAK_OK);
      if (count > 0 && first > 0) {
        EXPECT_EQ(first % 8, 0) << "a slice starts inside tensor " << i << " at " << first;
      }
      mine += count;
    }
    kept.push_back(mine);
  }
  for (int64_t mine : kept)
    EXPECT_NEAR((double)mine, total / 3.0, 16.0);
  // the big tensor is spread over all three ranks
  for (auto &h : world.ranks) {
    int64_t first, count;
    ASSERT_EQ(polyak_local_range(h.get(), 1, &first, &count), POLYAK_OK);
    EXPECT_GT(count, 0);
  }
}

TEST(Shard, AssemblyFromGatheredArenasRebuildsWholeShadows)
{
  // the NCCL path without NCCL: each rank's raw arena at its stride, as
  // ncclAllGather leaves them, then polyak_assemble on one rank
  for (int w : {2, 3, 5}) {
    World world(w, {0, 1, 3, 65537, 130001, 5, 7});
    for (int64_t step : {1, 2, 3})
      world.update(step);
    polyak_t *first = world.ranks[0].get();
    int64_t stride = first->arena_alloc_elems;
    std::vector<uint16_t> gathered((size_t)(w * stride) + 1);
    for (int r = 0; r < w; r++) {
      polyak_t *h = world.ranks[r].get();
      ASSERT_EQ(h->arena_alloc_elems, stride) << "every rank allocates the same arena";
      ASSERT_EQ(h->ops->copy_to_host(h, gathered.data() + r * stride, h->ops->arena(h, 1), (size_t)stride * 2),
                POLYAK_OK);
    }
    const polyak_piece *layouts = first->layouts; // every rank's, kept by a sharded handle
    ASSERT_NE(layouts, nullptr);
    for (size_t i = 0; i < world.tensors.size(); i++) {
      int64_t n = world.tensors[i].num_elems;
      std::vector<uint16_t> got(n + 1), want(n + 1);
      ASSERT_EQ(polyak_assemble(first, gathered.data(), stride, layouts + i, world.tensors.size(), 1.0, got.data(),
                                POLYAK_F16, nullptr),
                POLYAK_OK);
      ASSERT_EQ(polyak_get_shadow(world.whole.get(), 1, (int)i, want.data(), POLYAK_F16, nullptr), POLYAK_OK);
      EXPECT_EQ(0, std::memcmp(got.data(), want.data(), n * 2)) << "W = " << w << " tensor " << i;
    }
  }
}

TEST(Shard, WithoutACommunicatorGathersAreRefusedAndLocalReadsWork)
{
  World world(4, {10, 1000003, 10});
  world.update(1);
  polyak_t *rank0 = world.ranks[0].get();
  Snapshot before = snapshot(rank0, 2, world.tensors);
  std::vector<float> dst(1000003);
  EXPECT_EQ(polyak_get_shadow(rank0, 0, 1, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_STATE)
      << "tensor 1 spans the ranks";
  EXPECT_NE(std::string(polyak_last_error(rank0)).find("polyak_get_local_shadow"), std::string::npos)
      << polyak_last_error(rank0);
  EXPECT_EQ(polyak_get_shadow(rank0, 0, 0, dst.data(), POLYAK_F32, nullptr), POLYAK_OK) << "tensor 0 is all here";
  EXPECT_EQ(polyak_copy_to_params(rank0, 0, nullptr), POLYAK_ERR_STATE);
  TempDir dir;
  EXPECT_EQ(polyak_save(rank0, dir.file("ema").c_str()), POLYAK_ERR_STATE);
  EXPECT_TRUE(dir.entries().empty());
  std::vector<char> buffer(1 << 20, 'x');
  size_t written = 0;
  EXPECT_EQ(polyak_save_to_memory(rank0, buffer.data(), buffer.size(), &written), POLYAK_ERR_STATE);
  EXPECT_NE(std::string(polyak_last_error(rank0)).find("nccl_comm"), std::string::npos) << polyak_last_error(rank0);
  EXPECT_EQ(buffer, std::vector<char>(1 << 20, 'x'));
  int fd = open(dir.file("state").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  EXPECT_EQ(polyak_save_fd(rank0, fd), POLYAK_ERR_STATE);
  EXPECT_EQ(lseek(fd, 0, SEEK_END), 0);
  close(fd);
  EXPECT_TRUE(snapshot(rank0, 2, world.tensors) == before);
  world.update(2); // the slices keep updating
  world.expect_equal();
}

TEST(Shard, FilesWrittenUnshardedLoadAtAnyWorldSize)
{
  TempDir dir;
  const std::string file = dir.file("ema");
  const char *path = file.c_str();
  for (int w : {1, 2, 3, 8}) {
    World world(w, {0, 1, 3, 65537, 130001, 5, 7});
    for (int64_t step : {1, 2, 4})
      world.update(step, step == 2);
    ASSERT_EQ(polyak_save(world.whole.get(), path), POLYAK_OK);
    for (int64_t step : {5, 6})
      world.update(step); // the ranks drift away from the file ...
    for (auto &h : world.ranks)
      ASSERT_EQ(polyak_load(h.get(), path), POLYAK_OK) << polyak_last_error(h.get());
    ASSERT_EQ(polyak_load(world.whole.get(), path), POLYAK_OK); // ... and all come back to step 4
    for (int64_t step : {5, 9})
      world.update(step);
    world.expect_equal(); // the non-finite count too: rank 0 carries the file's
  }
}

TEST(Shard, MemoryAndFdCheckpointsLoadAtAnyWorldSize)
{
  TempDir dir;
  for (int w : {2, 3}) {
    World world(w, {0, 1, 3, 65537, 130001, 5, 7});
    for (int64_t step : {1, 2, 4})
      world.update(step, step == 2);
    size_t bound = 0, rank_bound = 0, written = 0;
    ASSERT_EQ(polyak_save_size(world.whole.get(), &bound), POLYAK_OK);
    ASSERT_EQ(polyak_save_size(world.ranks[w - 1].get(), &rank_bound), POLYAK_OK);
    EXPECT_EQ(rank_bound, bound) << "every rank can size the buffer";
    std::vector<char> bytes(bound);
    ASSERT_EQ(polyak_save_to_memory(world.whole.get(), bytes.data(), bytes.size(), &written), POLYAK_OK);
    bytes.resize(written);
    const std::string path = dir.file("state" + std::to_string(w));
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    ASSERT_EQ(write(fd, "head", 4), 4);
    ASSERT_EQ(polyak_save_fd(world.whole.get(), fd), POLYAK_OK) << polyak_last_error(world.whole.get());
    ASSERT_EQ(write(fd, "tail", 4), 4);
    close(fd);
    for (int64_t step : {5, 6})
      world.update(step);       // the ranks drift away from the checkpoints ...
    for (auto &h : world.ranks) // ... each reads its slice of the buffer ...
      ASSERT_EQ(polyak_load_from_memory(h.get(), bytes.data(), bytes.size()), POLYAK_OK) << polyak_last_error(h.get());
    ASSERT_EQ(polyak_load_from_memory(world.whole.get(), bytes.data(), bytes.size()), POLYAK_OK);
    for (int64_t step : {5, 9})
      world.update(step);
    world.expect_equal();
    for (auto &h : world.ranks) { // ... or of the file, from its own fd
      fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
      ASSERT_EQ(lseek(fd, 4, SEEK_SET), 4);
      ASSERT_EQ(polyak_load_fd(h.get(), fd), POLYAK_OK) << polyak_last_error(h.get());
      char tail[5] = "";
      EXPECT_EQ(read(fd, tail, 4), 4);
      EXPECT_STREQ(tail, "tail");
      close(fd);
    }
    ASSERT_EQ(polyak_load_from_memory(world.whole.get(), bytes.data(), bytes.size()), POLYAK_OK);
    world.update(7);
    world.expect_equal();
  }
}

TEST(Shard, BadShardingConfigsAreRefused)
{
  struct Bad {
    int world_size, rank;
    void *comm;
    polyak_backend backend;
    polyak_status status;
    const char *part;
  } bad[] = {
      {0, 0, nullptr, POLYAK_BACKEND_CPU, POLYAK_ERR_INVALID_ARG, "world_size"},
      {-2, 0, nullptr, POLYAK_BACKEND_CPU, POLYAK_ERR_INVALID_ARG, "world_size"},
      {4, 4, nullptr, POLYAK_BACKEND_CPU, POLYAK_ERR_INVALID_ARG, "rank = 4"},
      {4, -1, nullptr, POLYAK_BACKEND_CPU, POLYAK_ERR_INVALID_ARG, "rank = -1"},
      {2, 0, reinterpret_cast<void *>(0x10), POLYAK_BACKEND_CPU, POLYAK_ERR_INVALID_ARG, "CUDA backend"},
  };
  for (const Bad &b : bad) {
    polyak_config cfg = cpu_config();
    cfg.world_size = b.world_size;
    cfg.rank = b.rank;
    cfg.nccl_comm = b.comm;
    cfg.backend = b.backend;
    polyak_t *p = reinterpret_cast<polyak_t *>(0x1);
    EXPECT_EQ(polyak_create(&p, &cfg), b.status) << b.part;
    EXPECT_EQ(p, nullptr);
    char why[512];
    polyak_check_config(&cfg, why, sizeof why);
    EXPECT_NE(std::string(why).find(b.part), std::string::npos) << why;
  }
}

TEST(Shard, LocalRangeAndLocalReadsValidateTheirArguments)
{
  World world(2, {10, 20});
  polyak_t *h = world.ranks[1].get();
  int64_t first, count;
  EXPECT_EQ(polyak_local_range(h, 2, &first, &count), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_local_range(h, 0, nullptr, &count), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_local_range(nullptr, 0, &first, &count), POLYAK_ERR_INVALID_ARG);
  float dst[32];
  EXPECT_EQ(polyak_get_local_shadow(h, 2, 0, dst, POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_local_shadow(h, 0, 0, dst, (polyak_dtype)9, nullptr), POLYAK_ERR_INVALID_ARG);
  Handle fresh = make_handle(shard_config(2, 1));
  EXPECT_EQ(polyak_local_range(fresh.get(), 0, &first, &count), POLYAK_ERR_STATE);
}

} // namespace

TEST(Shard, AHardUpdateIsRefusedOnEveryRankAlike)
{
  // a NaN in one rank's slice: every rank refuses (the params are whole on
  // each), so the ranks' shadows never disagree
  World world(3, {1000, 7, 3000});
  world.update(1);
  std::vector<Snapshot> before;
  for (auto &h : world.ranks)
    before.push_back(snapshot(h.get(), 1, world.tensors));
  world.tensors[2].set(2999, NAN); // the last rank's slice
  for (size_t r = 0; r < world.ranks.size(); r++) {
    EXPECT_EQ(polyak_hard_update(world.ranks[r].get(), 0, nullptr), POLYAK_ERR_INVALID_ARG) << "rank " << r;
    EXPECT_TRUE(snapshot(world.ranks[r].get(), 1, world.tensors) == before[r]) << "rank " << r;
  }
}
