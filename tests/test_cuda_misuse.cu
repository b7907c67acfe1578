// test_cuda_misuse.cu: misuse refused, handles isolated, and NCCL communicators.
// Every test skips with a message when no CUDA device is present.
#include "test_cuda_util.h"

#include "polyak_internal.h"

using namespace polyak_test;

namespace {

// ---- misuse and isolation --------------------------------------------------------

TEST_F(Gpu, HostPointersAreRefused)
{
  std::vector<float> host(100, 1.0f);
  Handle h = make_handle(cuda_config(cpu_config()));
  int64_t shape[1] = {100};
  ASSERT_EQ(polyak_add(h.get(), "host", host.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_NE(std::string(polyak_last_error(h.get())).find("host memory"), std::string::npos)
      << polyak_last_error(h.get());

  // and the CPU backend refuses device memory
  float *device = nullptr;
  CUDA_OK(cudaMalloc(&device, 400));
  Handle cpu = make_handle(cpu_config());
  ASSERT_EQ(polyak_add(cpu.get(), "device", device, POLYAK_F32, 1, shape), POLYAK_OK);
  EXPECT_EQ(polyak_finalize(cpu.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_NE(std::string(polyak_last_error(cpu.get())).find("device memory"), std::string::npos)
      << polyak_last_error(cpu.get());

  // copy-only tensors alike, refused before their mirrors are filled from them
  Handle gpu_copy = make_handle(cuda_config(cpu_config()));
  ASSERT_EQ(polyak_add(gpu_copy.get(), "averaged", device, POLYAK_F32, 1, shape), POLYAK_OK);
  ASSERT_EQ(polyak_add_copy(gpu_copy.get(), "host_buffer", host.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  EXPECT_EQ(polyak_finalize(gpu_copy.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_NE(std::string(polyak_last_error(gpu_copy.get())).find("\"host_buffer\") param"), std::string::npos)
      << polyak_last_error(gpu_copy.get());
  Handle cpu_copy = make_handle(cpu_config());
  ASSERT_EQ(polyak_add(cpu_copy.get(), "averaged", host.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  ASSERT_EQ(polyak_add_copy(cpu_copy.get(), "device_buffer", device, POLYAK_F32, 1, shape), POLYAK_OK);
  EXPECT_EQ(polyak_finalize(cpu_copy.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_NE(std::string(polyak_last_error(cpu_copy.get())).find("device memory"), std::string::npos)
      << polyak_last_error(cpu_copy.get());
  cudaFree(device);

  Both both(cpu_config(), odd_twins());
  both.randomize(7);
  both.finalize();
  std::vector<float> dst(65537);
  EXPECT_EQ(polyak_get_shadow(both.gpu.get(), 0, 21, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
}

TEST_F(Gpu, DeviceOutOfRangeIsRefused)
{
  polyak_config cfg = cuda_config(cpu_config());
  cfg.device = 4096;
  polyak_t *p = nullptr;
  EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(p, nullptr);
}

TEST_F(Gpu, TwoHandlesOnTwoStreamsDoNotInterfere)
{
  cudaStream_t streams[2];
  for (auto &s : streams)
    CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  polyak_config a_cfg = cpu_config(2), b_cfg = cpu_config(1, 0.5);
  b_cfg.shadow_dtype = POLYAK_BF16;
  Both a(a_cfg, odd_twins()), b(b_cfg, odd_twins());
  a.randomize(8);
  b.randomize(9);
  a.finalize();
  b.finalize();
  for (int64_t step = 1; step <= 10; step++) {
    a.randomize(100 + step);
    b.randomize(200 + step);
    ASSERT_EQ(polyak_update(a.gpu.get(), step, streams[0]), POLYAK_OK);
    ASSERT_EQ(polyak_update(b.gpu.get(), 2 * step, streams[1]), POLYAK_OK);
    ASSERT_EQ(polyak_update(a.cpu.get(), step, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_update(b.cpu.get(), 2 * step, nullptr), POLYAK_OK);
    cudaStreamSynchronize(streams[0]); // the next randomize rewrites the params
    cudaStreamSynchronize(streams[1]);
  }
  a.expect_same();
  b.expect_same();
  for (auto &s : streams)
    cudaStreamDestroy(s);
}

#ifdef POLYAK_TEST_NCCL
// ---- NCCL --------------------------------------------------------------------------

// With a communicator every whole-shadow read goes through the gather, so
// one GPU and a 1-rank communicator run the NCCL path end to end.
TEST_F(Gpu, OneRankCommunicatorGathersSavesAndLoads)
{
  ncclComm_t comm;
  int device = 0;
  ASSERT_EQ(ncclCommInitAll(&comm, 1, &device), ncclSuccess);
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadow_dtype = POLYAK_BF16;
  cfg.zero_init = 1;
  {
    Both both(cfg, odd_twins(), comm);
    both.randomize(15);
    both.finalize();
    for (int64_t step : {1, 2, 7}) {
      both.randomize(50 + step);
      both.update(step);
    }
    both.expect_same(); // polyak_get_shadow: all-gather, then read-outs
    TempDir dir;
    const std::string gpu_path = dir.file("gpu"), cpu_path = dir.file("cpu");
    const char *gpu_file = gpu_path.c_str(), *cpu_file = cpu_path.c_str();
    ASSERT_EQ(polyak_save(both.gpu.get(), gpu_file), POLYAK_OK) << polyak_last_error(both.gpu.get());
    ASSERT_EQ(polyak_save(both.cpu.get(), cpu_file), POLYAK_OK);
    EXPECT_TRUE(read_bytes(gpu_file) == read_bytes(cpu_file)) << "the gathered file is the unsharded one";
    for (int64_t step : {8, 9}) {
      both.randomize(60 + step);
      both.update(step);
    }
    ASSERT_EQ(polyak_load(both.gpu.get(), gpu_file), POLYAK_OK) << polyak_last_error(both.gpu.get());
    ASSERT_EQ(polyak_load(both.cpu.get(), cpu_file), POLYAK_OK);
    both.expect_same();
    ASSERT_EQ(polyak_copy_to_params(both.gpu.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(both.gpu.get());
    ASSERT_EQ(polyak_copy_to_params(both.cpu.get(), 1, nullptr), POLYAK_OK);
    for (auto &tw : both.twins) {
      std::vector<char> got(tw.host.num_elems * dtype_bytes(tw.host.dtype));
      cudaMemcpy(got.data(), tw.device, got.size(), cudaMemcpyDeviceToHost);
      ASSERT_EQ(0, std::memcmp(got.data(), tw.host.data(), got.size())) << tw.host.name;
    }
  }
  ncclCommDestroy(comm);
}

// The agreements through NCCL carry a rank's failure in what it sends, and
// an earlier agreement's yes is not taken for this one's (1 rank here: the
// collective and the flag's path, src/agreement.c, end to end). A finalize
// that fails on the rank still takes part in the handshake and reports its
// own failure.
TEST_F(Gpu, OneRankCommunicatorAgreementsCarryALocalFailure)
{
  ncclComm_t comm;
  int device = 0;
  ASSERT_EQ(ncclCommInitAll(&comm, 1, &device), ncclSuccess);
  {
    Both both(cpu_config(), odd_twins(), comm);
    both.randomize(61);
    both.finalize();
    polyak_t *gpu = both.gpu.get();
    for (int local_ok : {1, 0, 0, 1, 1, 0}) {
      int all_ok = -1;
      ASSERT_EQ(gpu->ops->agree(gpu, local_ok, &all_ok), POLYAK_OK) << polyak_last_error(gpu);
      EXPECT_EQ(all_ok, local_ok);
    }
    Both poisoned(cpu_config(), odd_twins(), comm);
    poisoned.randomize(62, 1000); // NaN and Inf params: finalize refuses them
    EXPECT_EQ(polyak_finalize(poisoned.gpu.get(), nullptr), POLYAK_ERR_INVALID_ARG);
    EXPECT_NE(std::string(polyak_last_error(poisoned.gpu.get())).find("NaN"), std::string::npos)
        << polyak_last_error(poisoned.gpu.get());
  }
  ncclCommDestroy(comm);
}

TEST_F(Gpu, ACommunicatorThatDisagreesWithTheConfigIsRefused)
{
  ncclComm_t comm;
  int device = 0;
  ASSERT_EQ(ncclCommInitAll(&comm, 1, &device), ncclSuccess);
  polyak_config cfg = cuda_config(cpu_config());
  cfg.world_size = 2;
  cfg.nccl_comm = comm;
  polyak_t *p = reinterpret_cast<polyak_t *>(0x1);
  EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(p, nullptr);
  char why[512];
  polyak_check_config(&cfg, why, sizeof why);
  EXPECT_NE(std::string(why).find("1 ranks"), std::string::npos) << why;
  ncclCommDestroy(comm);
}

#ifdef POLYAK_SHARDED_EXAMPLE
TEST_F(Gpu, ShardedAcrossGpusMatchesTheUnshardedAverage)
{
  int devices = 0;
  cudaGetDeviceCount(&devices);
  if (devices < 2)
    GTEST_SKIP() << "needs at least 2 GPUs, this machine has " << devices;
  std::string command = std::string(POLYAK_SHARDED_EXAMPLE) + " " + std::to_string(devices < 8 ? devices : 8);
  EXPECT_EQ(std::system(command.c_str()), 0) << command; // one process per GPU
}
#endif
#endif

} // namespace
