// test_cuda_readout.cu: read-outs, evaluation, checkpoints and post-hoc synthesis on
// the device against the CPU backend.
// Every test skips with a message when no CUDA device is present.
#include "test_cuda_util.h"

using namespace polyak_test;

namespace {

TEST_F(Gpu, CheckpointsMoveBetweenBackendsExactly)
{
  polyak_config cfg = cpu_config(3);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_POWER;
  cfg.shadow_dtype = POLYAK_BF16;
  cfg.zero_init = 1;
  Both both(cfg, odd_twins());
  both.train(13, {1, 2, 6});
  TempDir dir;
  const std::string gpu_path = dir.file("gpu"), cpu_path = dir.file("cpu");
  const char *gpu_file = gpu_path.c_str(), *cpu_file = cpu_path.c_str();
  ASSERT_EQ(polyak_save(both.gpu.get(), gpu_file), POLYAK_OK) << polyak_last_error(both.gpu.get());
  ASSERT_EQ(polyak_save(both.cpu.get(), cpu_file), POLYAK_OK);
  EXPECT_TRUE(read_bytes(gpu_file) == read_bytes(cpu_file)) << "the same state gives the same bytes";
  // swap them: each backend continues from the other's file
  ASSERT_EQ(polyak_load(both.gpu.get(), cpu_file), POLYAK_OK) << polyak_last_error(both.gpu.get());
  ASSERT_EQ(polyak_load(both.cpu.get(), gpu_file), POLYAK_OK);
  for (int64_t step : {7, 9}) {
    both.randomize(30 + step);
    both.update(step);
  }
  both.expect_same();
}

TEST_F(Gpu, MemoryAndFdCheckpointsAreTheFileBytesAndLoadExactly)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadow_dtype = POLYAK_BF16;
  Both both(cfg, odd_twins());
  both.train(21, {1, 3, 4});
  TempDir dir;
  const std::string path = dir.file("gpu"), state = dir.file("state");
  ASSERT_EQ(polyak_save(both.gpu.get(), path.c_str()), POLYAK_OK) << polyak_last_error(both.gpu.get());
  const std::vector<char> file = read_bytes(path);
  size_t bound = 0, written = 0;
  ASSERT_EQ(polyak_save_size(both.gpu.get(), &bound), POLYAK_OK);
  std::vector<char> gpu_bytes(bound), cpu_bytes(bound);
  ASSERT_EQ(polyak_save_to_memory(both.gpu.get(), gpu_bytes.data(), bound, &written), POLYAK_OK)
      << polyak_last_error(both.gpu.get());
  gpu_bytes.resize(written);
  ASSERT_EQ(polyak_save_to_memory(both.cpu.get(), cpu_bytes.data(), bound, &written), POLYAK_OK);
  cpu_bytes.resize(written);
  EXPECT_TRUE(gpu_bytes == file);
  EXPECT_TRUE(cpu_bytes == file);
  int fd = open(state.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(write(fd, "head", 4), 4);
  ASSERT_EQ(polyak_save_fd(both.gpu.get(), fd), POLYAK_OK) << polyak_last_error(both.gpu.get());
  ASSERT_EQ(write(fd, "tail", 4), 4);
  for (int64_t step : {5, 6}) { // both drift away from the checkpoint
    both.randomize(30 + step);
    both.update(step);
  }
  std::vector<char> bad = gpu_bytes;
  bad[bad.size() - 2] ^= 1;
  EXPECT_EQ(polyak_load_from_memory(both.gpu.get(), bad.data(), bad.size()), POLYAK_ERR_FORMAT);
  both.expect_same(); // the failed load changed nothing on the device
  ASSERT_EQ(lseek(fd, 4, SEEK_SET), 4);
  ASSERT_EQ(polyak_load_fd(both.gpu.get(), fd), POLYAK_OK) << polyak_last_error(both.gpu.get());
  EXPECT_EQ(lseek(fd, 0, SEEK_CUR), (off_t)(4 + file.size()));
  close(fd);
  ASSERT_EQ(polyak_load_from_memory(both.cpu.get(), gpu_bytes.data(), gpu_bytes.size()), POLYAK_OK);
  for (int64_t step : {7, 9}) {
    both.randomize(40 + step);
    both.update(step);
  }
  both.expect_same();
}

TEST_F(Gpu, CopyToParamsStoreAndRestoreMatchTheCpuBackend)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.zero_init = 1;
  Both both(cfg, odd_twins());
  both.train(14, {1, 2, 3});
  auto device_params = [&](size_t i) {
    std::vector<char> bytes(both.twins[i].host.num_elems * dtype_bytes(both.twins[i].host.dtype));
    cudaMemcpy(bytes.data(), both.twins[i].device, bytes.size(), cudaMemcpyDeviceToHost);
    return bytes;
  };
  std::vector<std::vector<char>> trained;
  for (size_t i = 0; i < both.twins.size(); i++)
    trained.push_back(device_params(i));
  ASSERT_EQ(polyak_store(both.gpu.get(), nullptr), POLYAK_OK) << polyak_last_error(both.gpu.get());
  ASSERT_EQ(polyak_copy_to_params(both.gpu.get(), 1, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(both.cpu.get(), 1, nullptr), POLYAK_OK); // host twins now hold shadow 1
  for (size_t i = 0; i < both.twins.size(); i++) {
    const char *want = static_cast<const char *>(both.twins[i].host.data());
    auto got = device_params(i);
    ASSERT_EQ(0, std::memcmp(got.data(), want, got.size())) << both.twins[i].host.name;
  }
  ASSERT_EQ(polyak_restore(both.gpu.get(), nullptr), POLYAK_OK);
  for (size_t i = 0; i < both.twins.size(); i++)
    ASSERT_EQ(device_params(i), trained[i]) << both.twins[i].host.name;
}

TEST_F(Gpu, BlendsMatchTheCpuBackend)
{
  polyak_config cfg = cpu_config(3);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.zero_init = 1;
  Both both(cfg, odd_twins());
  both.train(17, {1, 2, 6});
  const double weights[3] = {0.6, -0.2, 0.6};
  for (size_t i = 0; i < both.twins.size(); i++) {
    int64_t n = both.twins[i].host.num_elems;
    std::vector<uint16_t> want(n + 1), got(n + 1);
    void *dst = nullptr;
    CUDA_OK(cudaMalloc(&dst, 2 * n + 2));
    ASSERT_EQ(
        polyak_get_blend(both.cpu.get(), weights, POLYAK_BLEND_ANY_WEIGHTS, (int)i, want.data(), POLYAK_F16, nullptr),
        POLYAK_OK);
    ASSERT_EQ(polyak_get_blend(both.gpu.get(), weights, POLYAK_BLEND_ANY_WEIGHTS, (int)i, dst, POLYAK_F16, nullptr),
              POLYAK_OK)
        << polyak_last_error(both.gpu.get());
    CUDA_OK(cudaMemcpy(got.data(), dst, 2 * n, cudaMemcpyDeviceToHost));
    cudaFree(dst);
    ASSERT_EQ(0, std::memcmp(got.data(), want.data(), 2 * n)) << both.twins[i].host.name;
  }
  ASSERT_EQ(polyak_blend_to_params(both.cpu.get(), weights, POLYAK_BLEND_ANY_WEIGHTS, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_blend_to_params(both.gpu.get(), weights, POLYAK_BLEND_ANY_WEIGHTS, nullptr), POLYAK_OK);
  both.expect_params_same();
}

TEST_F(Gpu, PosthocSnapshotsAndSynthesisMatchTheCpuBackend)
{
  polyak_config cfg = cpu_config(2);
  for (int k = 0; k < 2; k++) {
    cfg.shadows[k].schedule.kind = POLYAK_SCHEDULE_POWER;
    cfg.shadows[k].schedule.gamma = polyak_gamma_from_sigma_rel(k == 0 ? 0.05 : 0.10);
  }
  cfg.shadow_dtype = POLYAK_BF16;
  Both both(cfg, odd_twins());
  both.randomize(21);
  both.finalize();
  int64_t elems = 0, gpu_elems = 0;
  ASSERT_EQ(polyak_snapshot_elems(both.cpu.get(), &elems), POLYAK_OK);
  ASSERT_EQ(polyak_snapshot_elems(both.gpu.get(), &gpu_elems), POLYAK_OK);
  ASSERT_EQ(elems, gpu_elems);
  const int num_snapshots = 8;
  std::vector<float> host_stack(num_snapshots * elems), copied(num_snapshots * elems);
  float *device_stack = nullptr;
  CUDA_OK(cudaMalloc(&device_stack, host_stack.size() * sizeof(float)));
  std::vector<int64_t> steps;
  std::vector<double> sigmas;
  for (int64_t step = 1; step <= 200; step++) {
    both.randomize(140 + step);
    both.update(step);
    if (step % 50 == 0)
      for (int k = 0; k < 2; k++) {
        size_t at = steps.size() * elems;
        ASSERT_EQ(polyak_snapshot(both.cpu.get(), k, host_stack.data() + at, nullptr), POLYAK_OK);
        ASSERT_EQ(polyak_snapshot(both.gpu.get(), k, device_stack + at, nullptr), POLYAK_OK)
            << polyak_last_error(both.gpu.get());
        steps.push_back(step);
        sigmas.push_back(k == 0 ? 0.05 : 0.10);
      }
  }
  CUDA_OK(cudaMemcpy(copied.data(), device_stack, copied.size() * sizeof(float), cudaMemcpyDeviceToHost));
  ASSERT_EQ(0, std::memcmp(copied.data(), host_stack.data(), copied.size() * sizeof(float))) << "snapshots";
  std::vector<double> c(num_snapshots);
  ASSERT_EQ(polyak_posthoc_coefficients(num_snapshots, steps.data(), sigmas.data(), 200, 0.07, c.data()), POLYAK_OK);
  ASSERT_EQ(polyak_synthesize_to_params(both.cpu.get(), host_stack.data(), num_snapshots, c.data(), nullptr),
            POLYAK_OK);
  ASSERT_EQ(polyak_synthesize_to_params(both.gpu.get(), device_stack, num_snapshots, c.data(), nullptr), POLYAK_OK)
      << polyak_last_error(both.gpu.get());
  // cuBLAS sums in its own order: equal within a few float roundings of the
  // largest term, then within one unit of the param's dtype where that
  // lands on the far side of a rounding boundary
  double largest = 0, weight = 0;
  for (float x : host_stack)
    largest = std::max(largest, (double)std::fabs(x));
  for (double x : c)
    weight += std::fabs(x);
  for (auto &tw : both.twins) {
    Tensor got(tw.host.name, tw.host.dtype, tw.host.num_elems);
    CUDA_OK(cudaMemcpy(got.data(), tw.device, tw.host.num_elems * dtype_bytes(tw.host.dtype), cudaMemcpyDeviceToHost));
    double unit = tw.host.dtype == POLYAK_F32 ? 0x1p-23 : tw.host.dtype == POLYAK_BF16 ? 0x1p-7 : 0x1p-10;
    for (int64_t e = 0; e < tw.host.num_elems; e++)
      ASSERT_NEAR(got.get(e), tw.host.get(e), 1e-6 * weight * largest + unit * std::fabs(tw.host.get(e)))
          << tw.host.name << " " << e;
  }
  cudaFree(device_stack);
}

TEST_F(Gpu, ShardedStoreAndHardUpdateOnANonBlockingStream)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.world_size = 2;
  cfg.rank = 1;
  Both both(cfg, odd_twins());
  both.randomize(40);
  both.finalize();
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<std::vector<char>> before;
  for (auto &tw : both.twins)
    before.emplace_back((char *)tw.host.data(),
                        (char *)tw.host.data() + tw.host.num_elems * dtype_bytes(tw.host.dtype));
  ASSERT_EQ(polyak_store(both.gpu.get(), stream), POLYAK_OK) << polyak_last_error(both.gpu.get());
  for (auto &tw : both.twins)
    CUDA_OK(cudaMemsetAsync(tw.device, 0x7f, tw.host.num_elems * dtype_bytes(tw.host.dtype), stream));
  ASSERT_EQ(polyak_restore(both.gpu.get(), stream), POLYAK_OK);
  CUDA_OK(cudaStreamSynchronize(stream));
  both.expect_params_same(); // the host twins still hold the params stored
  both.randomize(41);
  both.update(3);
  both.randomize(42);
  ASSERT_EQ(polyak_hard_update(both.cpu.get(), 1, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_hard_update(both.gpu.get(), 1, stream), POLYAK_OK) << polyak_last_error(both.gpu.get());
  CUDA_OK(cudaStreamSynchronize(stream));
  for (int k = 0; k < 2; k++)
    for (size_t i = 0; i < both.twins.size(); i++) {
      int64_t first = -1, count = -1;
      ASSERT_EQ(polyak_local_range(both.gpu.get(), (int)i, &first, &count), POLYAK_OK);
      std::vector<float> want(count + 1), got(count + 1);
      float *dst = nullptr;
      CUDA_OK(cudaMalloc(&dst, (count + 1) * sizeof(float)));
      ASSERT_EQ(polyak_get_local_shadow(both.cpu.get(), k, (int)i, want.data(), POLYAK_F32, nullptr), POLYAK_OK);
      ASSERT_EQ(polyak_get_local_shadow(both.gpu.get(), k, (int)i, dst, POLYAK_F32, stream), POLYAK_OK);
      CUDA_OK(cudaStreamSynchronize(stream));
      CUDA_OK(cudaMemcpy(got.data(), dst, count * sizeof(float), cudaMemcpyDeviceToHost));
      cudaFree(dst);
      ASSERT_EQ(0, std::memcmp(want.data(), got.data(), count * sizeof(float))) << "shadow " << k << " tensor " << i;
    }
  cudaStreamDestroy(stream);
}

// A rank whose slice is empty still scans the whole params before a hard
// update, so every rank refuses a non-finite param alike, as on the CPU.
TEST_F(Gpu, AHardUpdateOnAnEmptySliceRefusesNonFiniteParams)
{
  polyak_config cfg = cpu_config(1, 0.9);
  cfg.skip_nonfinite = 1;
  cfg.world_size = 4;
  cfg.rank = 3;
  std::vector<Twin> twins;
  twins.emplace_back("three", POLYAK_F32, 3, 0);
  Both both(cfg, std::move(twins));
  both.randomize(50);
  both.finalize();
  int64_t first = -1, count = -1;
  ASSERT_EQ(polyak_local_range(both.gpu.get(), 0, &first, &count), POLYAK_OK);
  ASSERT_EQ(count, 0);
  both.twins[0].host.set(1, NAN);
  both.twins[0].upload();
  EXPECT_EQ(polyak_hard_update(both.cpu.get(), 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_hard_update(both.gpu.get(), 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_NE(std::string(polyak_last_error(both.gpu.get())).find("\"three\""), std::string::npos)
      << polyak_last_error(both.gpu.get());
}

// A C trainer's arena on the device: views registered all or nothing,
// sized read-outs refusing a short device buffer with nothing written, and
// a pending store holding updates back, as on the CPU backend.
TEST_F(Gpu, ArenaSizedReadOutsAndPendingStoreMatchTheCpuBackend)
{
  const int64_t rows = 37, cols = 19; // odd sizes: the views start at odd phases
  const int64_t shapes[3][2] = {{rows, cols}, {cols, 1}, {rows * 3 + 1, 1}};
  std::vector<polyak_view> views(3);
  const char *names[3] = {"w", "b", "tail"};
  int64_t num_elems = 0;
  for (int v = 0; v < 3; v++) {
    views[v].name = names[v];
    views[v].ndim = 2;
    views[v].shape[0] = shapes[v][0];
    views[v].shape[1] = shapes[v][1];
    num_elems += shapes[v][0] * shapes[v][1];
  }
  std::vector<Twin> arena;
  arena.emplace_back("arena", POLYAK_BF16, num_elems, 2);
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  Handle cpu = make_handle(cfg), gpu = make_handle(cuda_config(cfg));
  ASSERT_EQ(polyak_add_arena(cpu.get(), arena[0].host.data(), POLYAK_BF16, num_elems, views.data(), 3), POLYAK_OK);
  ASSERT_EQ(polyak_add_arena(gpu.get(), arena[0].device, POLYAK_BF16, num_elems, views.data(), 3), POLYAK_OK)
      << polyak_last_error(gpu.get());
  std::mt19937_64 rng(50);
  arena[0].host.randomize(rng);
  arena[0].upload();
  ASSERT_EQ(polyak_finalize(cpu.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(gpu.get(), nullptr), POLYAK_OK) << polyak_last_error(gpu.get());
  for (int64_t step = 1; step <= 3; step++) {
    arena[0].host.randomize(rng);
    arena[0].upload();
    ASSERT_EQ(polyak_update(cpu.get(), step, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_update(gpu.get(), step, nullptr), POLYAK_OK);
  }
  // a pending store refuses the update on both
  ASSERT_EQ(polyak_store(gpu.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(gpu.get(), 0, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_update(gpu.get(), 4, nullptr), POLYAK_ERR_STATE);
  ASSERT_EQ(polyak_restore(gpu.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // every view, shadow by shadow, through sized read-outs into device memory
  for (int k = 0; k < 2; k++)
    for (int v = 0; v < 3; v++) {
      int tensor = -1;
      ASSERT_EQ(polyak_find_tensor(gpu.get(), names[v], &tensor), POLYAK_OK);
      const size_t n = (size_t)(shapes[v][0] * shapes[v][1]), fit = n * sizeof(float), room = fit + 64;
      std::vector<unsigned char> want(room, 0xcd), got(room);
      unsigned char *dst = nullptr;
      CUDA_OK(cudaMalloc(&dst, room));
      CUDA_OK(cudaMemset(dst, 0xcd, room));
      EXPECT_EQ(polyak_get_shadow_n(gpu.get(), k, tensor, dst, POLYAK_F32, fit - 1, nullptr), POLYAK_ERR_INVALID_ARG);
      ASSERT_EQ(polyak_get_shadow_n(cpu.get(), k, tensor, want.data(), POLYAK_F32, fit, nullptr), POLYAK_OK);
      ASSERT_EQ(polyak_get_shadow_n(gpu.get(), k, tensor, dst, POLYAK_F32, fit, nullptr), POLYAK_OK)
          << polyak_last_error(gpu.get());
      CUDA_OK(cudaMemcpy(got.data(), dst, room, cudaMemcpyDeviceToHost));
      cudaFree(dst);
      EXPECT_EQ(want, got) << "shadow " << k << " view " << names[v] << " (canaries after it included)";
    }
  std::vector<char> params(num_elems * 2);
  CUDA_OK(cudaMemcpy(params.data(), arena[0].device, params.size(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(0, std::memcmp(params.data(), arena[0].host.data(), params.size())) << "restored bit for bit";
}

// Copy-only tensors on the device: mirrored in the update's own launch
// (a captured update stays one kernel node), replays included, read out,
// written back and restored, with the averages' bits those of the CPU.

} // namespace
