// test_cuda_shards.cu: checkpoint shards on the CUDA backend. CUDA ranks
// (world_size 2 and 3, no communicator) save sets that CPU ranks of another
// world size load, and load sets that CPU handles saved, each to the bits of
// an unsharded CPU run; the slices stream through pinned host memory and are
// written into the device arenas in place.
#include "test_cuda_util.h"

#include "shard_util.h"

using namespace polyak_test;

namespace {

struct CudaShards {
  std::vector<Twin> twins;
  polyak_config cfg;
  CudaShards()
  {
    const int64_t sizes[] = {0, 3, 65537, 130001, 7};
    const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_BF16, POLYAK_F16, POLYAK_F32};
    for (int i = 0; i < 5; i++)
      twins.emplace_back("t" + std::to_string(i), dtypes[i], sizes[i], 4);
    cfg = cpu_config(2, 0.9);
    cfg.shadow_dtype = POLYAK_BF16; // stochastic rounding keyed by the global element
    cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
    cfg.seed = 9;
  }
  void params(int64_t step)
  {
    std::mt19937_64 rng(500 + (uint64_t)step);
    for (auto &tw : twins) {
      tw.host.randomize(rng, 0.25f, 2.0f);
      tw.upload();
    }
  }
  // A finalized handle: CPU over the host params, CUDA over the device twins.
  Handle make(int world_size, int rank, bool cuda)
  {
    polyak_config c = cuda ? cuda_config(cfg) : cfg;
    c.world_size = world_size;
    c.rank = rank;
    Handle h = make_handle(c);
    for (auto &tw : twins) {
      int64_t shape[1] = {tw.host.num_elems};
      EXPECT_EQ(polyak_add(h.get(), tw.host.name.c_str(), cuda ? tw.device : tw.host.data(), tw.host.dtype, 1, shape),
                POLYAK_OK);
    }
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
    return h;
  }
  std::vector<Handle> ranks(int world_size, bool cuda)
  {
    std::vector<Handle> out;
    for (int r = 0; r < world_size; r++)
      out.push_back(make(world_size, r, cuda));
    return out;
  }
  void update(int64_t step, const std::vector<polyak_t *> &handles)
  {
    params(step);
    for (polyak_t *h : handles)
      ASSERT_EQ(polyak_update(h, step, nullptr), POLYAK_OK) << polyak_last_error(h);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
};

void save(const std::vector<Handle> &ranks, const std::string &dir)
{
  for (auto &h : ranks)
    ASSERT_EQ(polyak_save_shards(h.get(), dir.c_str()), POLYAK_OK) << polyak_last_error(h.get());
}

void load(const std::vector<Handle> &ranks, const std::string &dir)
{
  for (auto &h : ranks)
    ASSERT_EQ(polyak_load_shards(h.get(), dir.c_str()), POLYAK_OK) << polyak_last_error(h.get());
}

} // namespace

TEST_F(Gpu, ShardSetsMoveBetweenCudaAndCpuRanksAtAnyWorldSizeExactly)
{
  CudaShards run;
  run.params(0);
  Handle whole = run.make(1, 0, false); // the unsharded CPU run: the oracle
  std::vector<Handle> gpu2 = run.ranks(2, true);
  std::vector<polyak_t *> all = pointers(gpu2);
  all.push_back(whole.get());
  for (int64_t step : {1, 2, 5})
    run.update(step, all);
  TempDir from_gpu, from_cpu, again;
  save(gpu2, from_gpu.path); // CUDA ranks save, CPU ranks of another size load
  std::vector<Handle> cpu3 = run.ranks(3, false);
  load(cpu3, from_gpu.path);
  expect_same_as(whole.get(), pointers(cpu3), "CUDA W = 2 -> CPU W = 3");
  // a set CPU handles saved, loaded by CUDA ranks, run on and saved again
  ASSERT_EQ(polyak_save_shards(whole.get(), from_cpu.path.c_str()), POLYAK_OK);
  std::vector<Handle> gpu3 = run.ranks(3, true);
  size_t free_before = 0, free_after = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_before, &total), cudaSuccess);
  load(gpu3, from_cpu.path);
  ASSERT_EQ(cudaMemGetInfo(&free_after, &total), cudaSuccess);
  EXPECT_GE(free_after + (2 << 20), free_before) << "a load leaves no device memory behind";
  all = pointers(gpu3);
  all.push_back(whole.get());
  run.update(6, all);
  save(gpu3, again.path);
  std::vector<Handle> cpu2 = run.ranks(2, false);
  load(cpu2, again.path);
  expect_same_as(whole.get(), pointers(cpu2), "CPU W = 1 -> CUDA W = 3 -> step 6 -> CPU W = 2");
  // polyak-consolidate's file of the CUDA set is polyak_save's of the oracle
  TempDir out;
  ASSERT_EQ(polyak_save(whole.get(), out.file("whole").c_str()), POLYAK_OK);
  std::string command = std::string(POLYAK_CONSOLIDATE) + " " + again.path + " " + out.file("joined");
  ASSERT_EQ(std::system(command.c_str()), 0);
  EXPECT_EQ(read_bytes(out.file("joined")), read_bytes(out.file("whole")));
}

TEST_F(Gpu, ATornCudaHandleRefusesAllButALoadAndALoadMendsIt)
{
  CudaShards run;
  run.params(0);
  Handle whole = run.make(1, 0, false);
  run.update(1, {whole.get()});
  TempDir dir;
  ASSERT_EQ(polyak_save_shards(whole.get(), dir.path.c_str()), POLYAK_OK);
  Handle gpu = run.make(1, 0, true);
  gpu->torn = 1; // as a load that failed between its passes leaves it
  EXPECT_EQ(polyak_update(gpu.get(), 2, nullptr), POLYAK_ERR_STATE);
  ASSERT_EQ(polyak_load_shards(gpu.get(), dir.path.c_str()), POLYAK_OK) << polyak_last_error(gpu.get());
  run.update(2, {whole.get(), gpu.get()});
  TempDir back;
  ASSERT_EQ(polyak_save_shards(gpu.get(), back.path.c_str()), POLYAK_OK);
  Handle cpu = run.make(1, 0, false);
  ASSERT_EQ(polyak_load_shards(cpu.get(), back.path.c_str()), POLYAK_OK);
  expect_same_as(whole.get(), {cpu.get()}, "mended, updated on the GPU");
}
