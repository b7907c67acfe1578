// test_cuda_update.cu: the CUDA backend's updates against the CPU backend, bit for bit,
// in every mode.
// Every test skips with a message when no CUDA device is present.
#include "test_cuda_util.h"

using namespace polyak_test;

namespace {

TEST_F(Gpu, MatchesTheCpuBackendForEveryShadowCount)
{
  for (int num_shadows = 1; num_shadows <= 8; num_shadows++) {
    polyak_config cfg = cpu_config(num_shadows);
    for (int k = 0; k < num_shadows; k++) {
      cfg.shadows[k].schedule.kind = (polyak_schedule_kind)(k % 7);
      cfg.shadows[k].schedule.beta = 0.9 + 0.01 * k;
    }
    cfg.shadow_dtype = num_shadows % 2 ? POLYAK_F32 : POLYAK_BF16;
    cfg.seed = 1000 + num_shadows;
    Both both(cfg, odd_twins());
    both.randomize(1);
    both.finalize();
    for (int64_t step : {1, 2, 5, 9, 40}) { // gaps included
      both.randomize(step);
      both.update(step);
    }
    both.expect_same();
    if (HasFailure())
      FAIL() << "num_shadows = " << num_shadows;
  }
}

TEST_F(Gpu, ZeroInitAndTheGuardMatchTheCpuBackend)
{
  for (int skip : {1, 0})
    for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16}) {
      polyak_config cfg = cpu_config(3);
      cfg.zero_init = 1;
      cfg.skip_nonfinite = skip;
      cfg.shadow_dtype = shadow_dtype;
      cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
      cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
      Both both(cfg, odd_twins());
      both.randomize(2);
      both.finalize();
      for (int64_t step : {1, 3, 4, 20}) {
        both.randomize(step, 1001);
        both.update(step);
      }
      both.expect_same();
    }
}

TEST_F(Gpu, FinalizeRefusesNonFiniteStartingParams)
{
  Both both(cpu_config(), odd_twins());
  both.randomize(3);
  both.twins[20].host.set(7, NAN);
  both.twins[20].upload();
  EXPECT_EQ(polyak_finalize(both.gpu.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  std::string why = polyak_last_error(both.gpu.get());
  EXPECT_NE(why.find("\"t20\""), std::string::npos) << why;
  EXPECT_NE(why.find("element 7"), std::string::npos) << why;
}

TEST_F(Gpu, HundredThousandTinyTensors)
{
  const int count = 100000;
  char *pool = nullptr, *next = nullptr;
  CUDA_OK(cudaMalloc(&pool, (size_t)count * 48));
  next = pool;
  std::vector<Twin> twins;
  twins.reserve(count);
  for (int i = 0; i < count; i++)
    twins.emplace_back("p" + std::to_string(i), i % 3 ? POLYAK_BF16 : POLYAK_F32, 1 + i % 5, i % 3 ? 2 : 0, &next);
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  {
    Both both(cfg, std::move(twins));
    both.randomize(4);
    both.finalize();
    for (int64_t step : {1, 2, 3}) {
      both.randomize(10 + step);
      both.update(step);
    }
    both.expect_same(101);
  }
  cudaFree(pool);
}

// ---- one bf16 tensor of more than 2^31 elements ------------------------------

__host__ __device__ float pattern(int64_t i, int step)
{
  uint32_t h = polyak_mix32((uint32_t)i ^ polyak_mix32((uint32_t)(i >> 32) + 977u * (uint32_t)step));
  return ((float)(h >> 8) * (1.0f / 16777216.0f) - 0.5f) * 4.0f;
}

__global__ void fill_pattern(uint16_t *param, int64_t n, int step)
{
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    param[i] = polyak_f32_to_bf16_rne(pattern(i, step));
}

TEST_F(Gpu, Bf16TensorBeyond2To31Elements)
{
  const int64_t n = (int64_t(1) << 31) + 4099;
  size_t free_bytes = 0, total = 0;
  cudaMemGetInfo(&free_bytes, &total);
  if (free_bytes < (size_t)n * 10 + (size_t(1) << 30)) // param, shadow, read-out
    GTEST_SKIP() << "needs " << n * 10 / (1 << 30) + 1 << " GiB of device memory";
  uint16_t *param = nullptr;
  CUDA_OK(cudaMalloc(&param, n * 2));
  fill_pattern<<<1024, 256>>>(param, n, 0);
  polyak_config cfg = cuda_config(cpu_config(1, 0.75));
  Handle h = make_handle(cfg);
  int64_t shape[1] = {n};
  ASSERT_EQ(polyak_add(h.get(), "embedding", param, POLYAK_BF16, 1, shape), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  fill_pattern<<<1024, 256>>>(param, n, 1);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK); // beta 0.75: w = 0.25
  // the read-out takes the whole tensor; check windows around 0, 2^31 and the end
  float *whole = nullptr;
  CUDA_OK(cudaMalloc(&whole, n * 4));
  ASSERT_EQ(polyak_get_shadow(h.get(), 0, 0, whole, POLYAK_F32, nullptr), POLYAK_OK);
  for (int64_t start : {int64_t(0), (int64_t(1) << 31) - 100, n - 1000}) {
    std::vector<float> got(1000);
    CUDA_OK(cudaMemcpy(got.data(), whole + start, 1000 * 4, cudaMemcpyDeviceToHost));
    for (int64_t e = 0; e < 1000; e++) {
      float init = polyak_bf16_to_f32(polyak_f32_to_bf16_rne(pattern(start + e, 0)));
      float now = polyak_bf16_to_f32(polyak_f32_to_bf16_rne(pattern(start + e, 1)));
      float want = polyak_lerp(init, now, 0.25f);
      ASSERT_EQ(polyak_f32_bits(got[e]), polyak_f32_bits(want)) << "element " << start + e;
    }
  }
  cudaFree(whole);
  cudaFree(param);
}

TEST_F(Gpu, StochasticF32ShadowsMatchTheCpuBackend)
{
  // stochastic f32 shadows beside a nearest one: gaps, the guard on and
  // off, zero_init, graph replays, and a checkpoint each backend resumes
  // from the other's
  for (int variant = 0; variant < 2; variant++) {
    polyak_config cfg = cpu_config(4);
    cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_POWER;
    cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_WARMUP;
    cfg.shadows[3].schedule.beta = 0.99999;
    cfg.shadows[0].rounding = cfg.shadows[1].rounding = cfg.shadows[3].rounding = POLYAK_ROUND_STOCHASTIC;
    cfg.zero_init = variant;
    cfg.skip_nonfinite = 1 - variant;
    cfg.seed = 4242;
    Both both(cfg, odd_twins());
    both.randomize(40);
    both.finalize();
    for (int64_t step : {1, 2, 5, 9, 40}) {
      both.randomize(40 + step, 1001);
      both.update(step);
    }
    both.expect_same();
    both.replay(41, 5, [&](int64_t step) { both.randomize(40 + step); });
    both.expect_same();
    TempDir dir;
    const std::string gpu_path = dir.file("gpu"), cpu_path = dir.file("cpu");
    ASSERT_EQ(polyak_save(both.gpu.get(), gpu_path.c_str()), POLYAK_OK) << polyak_last_error(both.gpu.get());
    ASSERT_EQ(polyak_save(both.cpu.get(), cpu_path.c_str()), POLYAK_OK);
    ASSERT_EQ(polyak_load(both.gpu.get(), cpu_path.c_str()), POLYAK_OK) << polyak_last_error(both.gpu.get());
    ASSERT_EQ(polyak_load(both.cpu.get(), gpu_path.c_str()), POLYAK_OK);
    for (int64_t step : {50, 52}) {
      both.randomize(40 + step);
      both.update(step);
    }
    both.expect_same();
    if (HasFailure())
      FAIL() << "variant " << variant;
  }
}

TEST_F(Gpu, CountedUpdatesMatchTheCpuBackend)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[1].count_updates = 1;
  cfg.shadow_dtype = POLYAK_BF16;
  Both both(cfg, odd_twins());
  both.train(16, {10, 20, 50});
  both.expect_same();
}

TEST_F(Gpu, LookaheadMatchesTheCpuBackend)
{
  for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16}) {
    polyak_config cfg = cpu_config(3);
    cfg.lookahead_every = 2;
    cfg.shadows[2].schedule.beta = 0.5;
    cfg.shadow_dtype = shadow_dtype;
    Both both(cfg, odd_twins());
    both.randomize(18);
    both.finalize();
    for (int64_t step : {1, 2, 3, 4, 6}) {
      both.randomize(90 + step, step == 4 ? 7.0f : 0.0f); // a poisoned sync: the params get the slow weights
      both.update(step);
      both.expect_params_same(); // written back at 2, 4, 6 only
    }
    both.expect_same();
    // replays resolve each reserved step's sync on the device
    ASSERT_EQ(polyak_graph_reserve(both.cpu.get(), 7, 4, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_graph_reserve(both.gpu.get(), 7, 4, nullptr), POLYAK_OK);
    for (int64_t step = 7; step <= 10; step++) {
      both.randomize(90 + step);
      ASSERT_EQ(polyak_graph_update(both.cpu.get(), nullptr), POLYAK_OK);
      ASSERT_EQ(polyak_graph_update(both.gpu.get(), nullptr), POLYAK_OK);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      both.expect_params_same();
    }
    ASSERT_EQ(polyak_graph_release(both.cpu.get(), nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_graph_release(both.gpu.get(), nullptr), POLYAK_OK);
    both.expect_same();
  }
}

TEST_F(Gpu, GradNormShadowsMatchTheCpuBackend)
{
  polyak_config cfg = cpu_config(3);
  cfg.shadows[0].grad_norm_c = 0.3;
  cfg.shadows[2].grad_norm_c = 1.0;
  cfg.zero_init = 1; // read-outs debias with the products kept on the device
  cfg.shadow_dtype = POLYAK_BF16;
  Both both(cfg, odd_twins());
  float host_norm = 0.0f, *device_norm = nullptr;
  CUDA_OK(cudaMalloc(&device_norm, sizeof(float)));
  float stray = 1.0f;
  EXPECT_EQ(polyak_set_grad_norm(both.gpu.get(), &stray), POLYAK_ERR_INVALID_ARG) << "host memory";
  EXPECT_EQ(polyak_set_grad_norm(both.cpu.get(), device_norm), POLYAK_ERR_INVALID_ARG) << "device memory";
  ASSERT_EQ(polyak_set_grad_norm(both.cpu.get(), &host_norm), POLYAK_OK);
  ASSERT_EQ(polyak_set_grad_norm(both.gpu.get(), device_norm), POLYAK_OK) << polyak_last_error(both.gpu.get());
  auto set_norm = [&](int64_t step) {
    host_norm = step % 3 == 0 ? NAN : 0.45f * (float)step;
    ASSERT_EQ(cudaMemcpy(device_norm, &host_norm, sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  };
  auto expect_products_same = [&]() {
    for (int k = 0; k < 3; k++) {
      double cpu = -1, gpu = -2;
      ASSERT_EQ(polyak_get_beta_product(both.cpu.get(), k, &cpu), POLYAK_OK);
      ASSERT_EQ(polyak_get_beta_product(both.gpu.get(), k, &gpu), POLYAK_OK) << polyak_last_error(both.gpu.get());
      EXPECT_EQ(cpu, gpu) << "shadow " << k;
    }
  };
  both.randomize(19);
  both.finalize();
  for (int64_t step : {1, 2, 3, 7}) {
    set_norm(step);
    both.randomize(110 + step);
    both.update(step);
  }
  both.expect_same();
  expect_products_same();
  both.replay(9, 3, [&](int64_t step) { // a gap of 2 first
    set_norm(step);
    both.randomize(110 + step);
  });
  both.expect_same();
  expect_products_same();
  cudaFree(device_norm);
}

TEST_F(Gpu, ShadowsInTheCallersMemoryMatchTheCpuBackend)
{
  polyak_config cfg = cpu_config(1, 0.95);
  cfg.seed = 31;
  for (int rounding : {POLYAK_ROUND_NEAREST, POLYAK_ROUND_STOCHASTIC}) { // the f32 shadows'
    cfg.shadows[0].rounding = rounding;
    std::vector<Twin> params = odd_twins(), shadows;
    const polyak_dtype dtypes[] = {POLYAK_F16, POLYAK_BF16, POLYAK_F32, POLYAK_F16};
    Handle cpu = make_handle(cfg), gpu = make_handle(cuda_config(cfg));
    for (size_t i = 0; i < params.size(); i++) {
      polyak_dtype d = dtypes[i % 4];
      shadows.emplace_back("s" + std::to_string(i), d, params[i].host.num_elems, dtype_bytes(d) * (i % 3));
      int64_t shape[1] = {params[i].host.num_elems};
      int flags = i % 5 == 0 ? POLYAK_SHADOW_ROUND_NEAREST : 0;
      const char *name = params[i].host.name.c_str();
      ASSERT_EQ(polyak_add_with_shadow(cpu.get(), name, params[i].host.data(), params[i].host.dtype, 1, shape,
                                       shadows[i].host.data(), d, flags),
                POLYAK_OK);
      ASSERT_EQ(polyak_add_with_shadow(gpu.get(), name, params[i].device, params[i].host.dtype, 1, shape,
                                       shadows[i].device, d, flags),
                POLYAK_OK);
    }
    auto randomize = [&](uint64_t seed) {
      std::mt19937_64 rng(seed);
      for (auto &tw : params) {
        tw.host.randomize(rng, 0.25f, 2.0f);
        tw.upload();
      }
    };
    auto expect_same = [&](const char *when) {
      for (auto &tw : shadows) {
        std::vector<char> got(tw.host.num_elems * dtype_bytes(tw.host.dtype));
        ASSERT_EQ(cudaMemcpy(got.data(), tw.device, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
        ASSERT_EQ(0, std::memcmp(got.data(), tw.host.data(), got.size())) << tw.host.name << " " << when;
      }
    };
    randomize(120);
    ASSERT_EQ(polyak_finalize(cpu.get(), nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_finalize(gpu.get(), nullptr), POLYAK_OK) << polyak_last_error(gpu.get());
    expect_same("after finalize");
    for (int64_t step : {1, 2, 5}) {
      randomize(120 + step);
      ASSERT_EQ(polyak_update(cpu.get(), step, nullptr), POLYAK_OK);
      ASSERT_EQ(polyak_update(gpu.get(), step, nullptr), POLYAK_OK);
    }
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_same("after updates");
    randomize(130);
    ASSERT_EQ(polyak_hard_update(cpu.get(), 0, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_hard_update(gpu.get(), 0, nullptr), POLYAK_OK) << polyak_last_error(gpu.get());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_same("after a hard update");
  }
  // a host shadow for the CUDA backend is refused at finalize
  Handle wrong = make_handle(cuda_config(cfg));
  Twin param("w", POLYAK_F32, 8, 0);
  param.upload(); // zeros: finite
  std::vector<float> host_shadow(8);
  int64_t shape[1] = {8};
  ASSERT_EQ(
      polyak_add_with_shadow(wrong.get(), "w", param.device, POLYAK_F32, 1, shape, host_shadow.data(), POLYAK_F32, 0),
      POLYAK_OK);
  EXPECT_EQ(polyak_finalize(wrong.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(wrong.get()), "shadow")) << polyak_last_error(wrong.get());
}

TEST_F(Gpu, LayerwiseShadowsMatchTheCpuBackend)
{
  // the norms are reduced in one fixed order on both: the same bits
  polyak_config cfg = cpu_config(3, 0.9);
  cfg.shadows[0].layerwise_beta0 = 0.99;
  cfg.shadows[2].layerwise_beta0 = 0.9;
  cfg.shadow_dtype = POLYAK_BF16;
  Both both(cfg, odd_twins());
  std::vector<Twin> grads = odd_twins();
  std::vector<void *> host_table, device_table;
  for (auto &g : grads) {
    host_table.push_back(g.host.data());
    device_table.push_back(g.device);
  }
  both.randomize(22);
  both.finalize();
  ASSERT_EQ(polyak_set_grads(both.cpu.get(), host_table.data()), POLYAK_OK);
  ASSERT_EQ(polyak_set_grads(both.gpu.get(), device_table.data()), POLYAK_OK) << polyak_last_error(both.gpu.get());
  auto new_grads = [&](uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (size_t i = 0; i < grads.size(); i++) {
      grads[i].host.randomize(rng, 0.0f, 0.05f * (float)(i % 4 + 1));
      grads[i].upload();
    }
  };
  auto expect_betas_same = [&]() {
    for (int k : {0, 2}) {
      std::vector<double> cpu(grads.size()), gpu(grads.size());
      ASSERT_EQ(polyak_get_layer_betas(both.cpu.get(), k, cpu.data()), POLYAK_OK);
      ASSERT_EQ(polyak_get_layer_betas(both.gpu.get(), k, gpu.data()), POLYAK_OK);
      ASSERT_EQ(0, std::memcmp(cpu.data(), gpu.data(), cpu.size() * sizeof(double))) << "shadow " << k;
    }
  };
  for (int64_t step : {1, 2, 5}) {
    both.randomize(160 + step);
    new_grads(170 + step);
    both.update(step);
  }
  both.expect_same();
  expect_betas_same();
  both.replay(7, 2, [&](int64_t step) {
    both.randomize(160 + step);
    new_grads(170 + step);
  });
  both.expect_same();
  expect_betas_same();
}

// One graph, captured once, replayed under two reservations: the second
// reads the grad norm and LAWA's gradients set after the capture (the
// first reservation's replays read given norms), as the CPU backend does.

TEST_F(Gpu, CopyOnlyTensorsMirrorInTheUpdatesLaunch)
{
  struct Raw {
    const char *name;
    polyak_dtype dtype;
    size_t elem_bytes;
    int64_t num_elems;
    size_t offset;
  };
  const Raw raws[] = {{"steps", POLYAK_I64, 8, 1, 0},
                      {"mean", POLYAK_F32, 4, 65537, 4},
                      {"counts", POLYAK_I32, 4, 300001, 0},
                      {"mask", POLYAK_BOOL, 1, 13, 3}};
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadow_dtype = POLYAK_BF16;
  Both both(cfg, odd_twins());
  std::vector<std::vector<unsigned char>> host;
  std::vector<char *> bases;
  std::vector<unsigned char *> device;
  for (const Raw &r : raws) {
    size_t bytes = r.num_elems * r.elem_bytes;
    host.emplace_back(bytes + r.offset + 16);
    char *base = nullptr;
    CUDA_OK(cudaMalloc(&base, bytes + r.offset + 16));
    bases.push_back(base);
    device.push_back(reinterpret_cast<unsigned char *>(base) + r.offset);
    int64_t shape[1] = {r.num_elems};
    ASSERT_EQ(polyak_add_copy(both.cpu.get(), r.name, host.back().data() + r.offset, r.dtype, 1, shape), POLYAK_OK);
    ASSERT_EQ(polyak_add_copy(both.gpu.get(), r.name, device.back(), r.dtype, 1, shape), POLYAK_OK)
        << polyak_last_error(both.gpu.get());
  }
  std::mt19937_64 rng(60);
  auto new_buffers = [&]() {
    for (size_t i = 0; i < host.size(); i++) {
      size_t bytes = raws[i].num_elems * raws[i].elem_bytes;
      for (size_t b = 0; b < bytes; b++)
        host[i][raws[i].offset + b] = (unsigned char)(raws[i].dtype == POLYAK_BOOL ? rng() & 1 : rng());
      ASSERT_EQ(cudaMemcpy(device[i], host[i].data() + raws[i].offset, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    }
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  };
  auto expect_mirrors = [&](const char *when) {
    for (size_t i = 0; i < host.size(); i++) {
      int tensor = -1;
      ASSERT_EQ(polyak_find_tensor(both.gpu.get(), raws[i].name, &tensor), POLYAK_OK);
      size_t bytes = raws[i].num_elems * raws[i].elem_bytes;
      for (int k = 0; k < 2; k++) {
        unsigned char *dst = nullptr;
        CUDA_OK(cudaMalloc(&dst, bytes));
        ASSERT_EQ(polyak_get_shadow_n(both.gpu.get(), k, tensor, dst, raws[i].dtype, bytes, nullptr), POLYAK_OK)
            << polyak_last_error(both.gpu.get());
        std::vector<unsigned char> got(bytes);
        CUDA_OK(cudaMemcpy(got.data(), dst, bytes, cudaMemcpyDeviceToHost));
        cudaFree(dst);
        ASSERT_EQ(0, std::memcmp(got.data(), host[i].data() + raws[i].offset, bytes))
            << raws[i].name << " shadow " << k << " " << when;
      }
    }
  };
  new_buffers();
  both.randomize(61);
  both.finalize();
  expect_mirrors("after finalize");
  for (int64_t step : {1, 2}) {
    new_buffers();
    both.randomize(61 + step);
    both.update(step);
    expect_mirrors("after an update");
  }
  // captured: one kernel node still, and each replay mirrors
  CapturedUpdate captured;
  captured.capture(both.gpu.get(), 3, 2);
  size_t num_nodes = 0;
  CUDA_OK(cudaGraphGetNodes(captured.graph, nullptr, &num_nodes));
  EXPECT_EQ(num_nodes, 1u);
  ASSERT_EQ(polyak_graph_reserve(both.cpu.get(), 3, 2, nullptr), POLYAK_OK);
  for (int replay = 0; replay < 2; replay++) {
    new_buffers();
    CUDA_OK(cudaGraphLaunch(captured.exec, captured.stream));
    CUDA_OK(cudaStreamSynchronize(captured.stream));
    ASSERT_EQ(polyak_graph_update(both.cpu.get(), nullptr), POLYAK_OK);
    expect_mirrors("after a replay");
  }
  ASSERT_EQ(polyak_graph_release(both.gpu.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_graph_release(both.cpu.get(), nullptr), POLYAK_OK);
  both.expect_same(); // the averages, bit for bit, with the copies beside them
  // evaluation: mirrors into the params, then the params back
  std::vector<std::vector<unsigned char>> mirrored = host;
  new_buffers();
  ASSERT_EQ(polyak_store(both.gpu.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(both.gpu.get(), 0, nullptr), POLYAK_OK);
  for (size_t i = 0; i < host.size(); i++) {
    size_t bytes = raws[i].num_elems * raws[i].elem_bytes;
    std::vector<unsigned char> got(bytes);
    CUDA_OK(cudaMemcpy(got.data(), device[i], bytes, cudaMemcpyDeviceToHost));
    EXPECT_EQ(0, std::memcmp(got.data(), mirrored[i].data() + raws[i].offset, bytes)) << raws[i].name;
  }
  ASSERT_EQ(polyak_restore(both.gpu.get(), nullptr), POLYAK_OK);
  for (size_t i = 0; i < host.size(); i++) {
    size_t bytes = raws[i].num_elems * raws[i].elem_bytes;
    std::vector<unsigned char> got(bytes);
    CUDA_OK(cudaMemcpy(got.data(), device[i], bytes, cudaMemcpyDeviceToHost));
    EXPECT_EQ(0, std::memcmp(got.data(), host[i].data() + raws[i].offset, bytes)) << raws[i].name << " restored";
  }
  // a checkpoint of the device's mirrors loads into the CPU handle
  TempDir dir;
  const std::string path = dir.file("gpu");
  ASSERT_EQ(polyak_save(both.gpu.get(), path.c_str()), POLYAK_OK) << polyak_last_error(both.gpu.get());
  ASSERT_EQ(polyak_load(both.cpu.get(), path.c_str()), POLYAK_OK) << polyak_last_error(both.cpu.get());
  for (size_t i = 0; i < host.size(); i++) {
    int tensor = -1;
    ASSERT_EQ(polyak_find_tensor(both.cpu.get(), raws[i].name, &tensor), POLYAK_OK);
    size_t bytes = raws[i].num_elems * raws[i].elem_bytes;
    std::vector<unsigned char> got(bytes);
    ASSERT_EQ(polyak_get_shadow_n(both.cpu.get(), 1, tensor, got.data(), raws[i].dtype, bytes, nullptr), POLYAK_OK);
    EXPECT_EQ(0, std::memcmp(got.data(), mirrored[i].data() + raws[i].offset, bytes)) << raws[i].name << " loaded";
  }
  both.expect_same();
  // and back into the device handle after an update moved its mirrors on:
  // in place when the load returns, for a read on a non-blocking stream
  new_buffers();
  both.randomize(70);
  both.update(5);
  ASSERT_EQ(polyak_load(both.gpu.get(), path.c_str()), POLYAK_OK) << polyak_last_error(both.gpu.get());
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (size_t i = 0; i < host.size(); i++) {
    int tensor = -1;
    ASSERT_EQ(polyak_find_tensor(both.gpu.get(), raws[i].name, &tensor), POLYAK_OK);
    size_t bytes = raws[i].num_elems * raws[i].elem_bytes;
    unsigned char *dst = nullptr;
    CUDA_OK(cudaMalloc(&dst, bytes));
    ASSERT_EQ(polyak_get_shadow_n(both.gpu.get(), 0, tensor, dst, raws[i].dtype, bytes, stream), POLYAK_OK);
    std::vector<unsigned char> got(bytes);
    CUDA_OK(cudaMemcpyAsync(got.data(), dst, bytes, cudaMemcpyDeviceToHost, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    cudaFree(dst);
    EXPECT_EQ(0, std::memcmp(got.data(), mirrored[i].data() + raws[i].offset, bytes)) << raws[i].name << " reloaded";
  }
  cudaStreamDestroy(stream);
  for (char *base : bases)
    cudaFree(base);
}

} // namespace
