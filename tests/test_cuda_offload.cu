// test_cuda_offload.cu: shadows in host memory for device params
// (POLYAK_SHADOWS_HOST) on a real device: the bits of a device-resident
// handle in every mode, an update that returns with work still queued
// ahead of it, the device memory an offloaded handle takes, graphs refused,
// a global-mode capture on another thread left valid by the fold.
// Every test skips with a message when no CUDA device is present.
#include <thread>

#include "test_cuda_util.h"

using namespace polyak_test;

namespace {

__global__ void spin_kernel(long long cycles)
{
  long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

// Two sets of device params with the same values: one for a device-resident
// handle, one for an offloaded one (Lookahead writes its params back).
struct DeviceAndHost {
  std::vector<Twin> dev_twins, off_twins;
  Handle dev, off;
  polyak_config cfg;
  float *norms = nullptr; // on the device: the grad norm, then one per tensor

  DeviceAndHost(const polyak_config &c, size_t staging = 64 << 10)
      : dev_twins(odd_twins()), off_twins(odd_twins()), cfg(cuda_config(c))
  {
    dev = make_handle(cfg);
    polyak_config host_cfg = cfg;
    host_cfg.shadow_location = POLYAK_SHADOWS_HOST;
    off = make_handle(host_cfg);
    EXPECT_EQ(polyak_set_offload_staging(off.get(), staging), POLYAK_OK) << polyak_last_error(off.get());
    for (size_t i = 0; i < dev_twins.size(); i++) {
      const Tensor &t = dev_twins[i].host;
      int64_t shape[1] = {t.num_elems};
      EXPECT_EQ(polyak_add(dev.get(), t.name.c_str(), dev_twins[i].device, t.dtype, 1, shape), POLYAK_OK);
      EXPECT_EQ(polyak_add(off.get(), t.name.c_str(), off_twins[i].device, t.dtype, 1, shape), POLYAK_OK)
          << polyak_last_error(off.get());
    }
    EXPECT_EQ(cudaMalloc(&norms, sizeof(float) * (dev_twins.size() + 1)), cudaSuccess);
  }
  ~DeviceAndHost()
  {
    dev.reset();
    off.reset();
    cudaFree(norms);
  }
  void randomize(uint64_t seed)
  {
    std::mt19937_64 rng(seed);
    for (size_t i = 0; i < dev_twins.size(); i++) {
      dev_twins[i].host.randomize(rng, 0.25f, 2.0f);
      dev_twins[i].upload();
      off_twins[i].host = dev_twins[i].host;
      off_twins[i].upload();
    }
    std::vector<float> values(dev_twins.size() + 1);
    for (float &v : values)
      v = 0.5f + (float)(rng() % 1000) / 250.0f;
    cudaMemcpy(norms, values.data(), sizeof(float) * values.size(), cudaMemcpyHostToDevice);
  }
  void finalize()
  {
    ASSERT_EQ(polyak_finalize(dev.get(), nullptr), POLYAK_OK) << polyak_last_error(dev.get());
    ASSERT_EQ(polyak_finalize(off.get(), nullptr), POLYAK_OK) << polyak_last_error(off.get());
    bool grad_norm = false, layerwise = false;
    for (int k = 0; k < cfg.num_shadows; k++) {
      grad_norm = grad_norm || cfg.shadows[k].grad_norm_c > 0;
      layerwise = layerwise || cfg.shadows[k].layerwise_beta0 > 0;
    }
    if (grad_norm) {
      ASSERT_EQ(polyak_set_grad_norm(dev.get(), norms), POLYAK_OK);
      ASSERT_EQ(polyak_set_grad_norm(off.get(), norms), POLYAK_OK) << polyak_last_error(off.get());
    }
    if (layerwise) {
      ASSERT_EQ(polyak_set_layer_norms(dev.get(), norms + 1), POLYAK_OK) << polyak_last_error(dev.get());
      ASSERT_EQ(polyak_set_layer_norms(off.get(), norms + 1), POLYAK_OK) << polyak_last_error(off.get());
    }
  }
  void train(uint64_t seed, std::initializer_list<int64_t> steps)
  {
    randomize(seed);
    finalize();
    for (int64_t step : steps) {
      randomize(seed * 100 + (uint64_t)step);
      ASSERT_EQ(polyak_update(dev.get(), step, nullptr), POLYAK_OK) << polyak_last_error(dev.get());
      ASSERT_EQ(polyak_update(off.get(), step, nullptr), POLYAK_OK) << polyak_last_error(off.get());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); // the next randomize rewrites the params
    }
  }
  // Every shadow of every tensor: the offloaded one read into host memory,
  // the device one into device memory; same bits (NaN equals NaN). The
  // params too (Lookahead writes them), and the non-finite counts.
  void expect_same()
  {
    polyak_dtype d = cfg.shadow_dtype;
    size_t bytes = dtype_bytes(d);
    for (int k = 0; k < cfg.num_shadows; k++)
      for (size_t i = 0; i < dev_twins.size(); i++) {
        int64_t n = dev_twins[i].host.num_elems;
        std::vector<char> want(n * bytes + 1), got(n * bytes + 1);
        void *dst = nullptr;
        ASSERT_EQ(cudaMalloc(&dst, n * bytes + 1), cudaSuccess);
        ASSERT_EQ(polyak_get_shadow(dev.get(), k, (int)i, dst, d, nullptr), POLYAK_OK);
        ASSERT_EQ(cudaMemcpy(want.data(), dst, n * bytes, cudaMemcpyDeviceToHost), cudaSuccess);
        cudaFree(dst);
        ASSERT_EQ(polyak_get_shadow(off.get(), k, (int)i, got.data(), d, nullptr), POLYAK_OK)
            << polyak_last_error(off.get());
        for (int64_t e = 0; e < n; e++) {
          float a = load_as(d, want.data(), e), b = load_as(d, got.data(), e);
          if (std::memcmp(want.data() + e * bytes, got.data() + e * bytes, bytes) != 0 &&
              !(std::isnan(a) && std::isnan(b))) {
            ADD_FAILURE() << "shadow " << k << " tensor " << i << " elem " << e << ": device " << a << " host " << b;
            return;
          }
        }
      }
    for (size_t i = 0; i < dev_twins.size(); i++) {
      size_t n = dev_twins[i].host.num_elems * dtype_bytes(dev_twins[i].host.dtype);
      std::vector<char> a(n + 1), b(n + 1);
      ASSERT_EQ(cudaMemcpy(a.data(), dev_twins[i].device, n, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(b.data(), off_twins[i].device, n, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(0, std::memcmp(a.data(), b.data(), n)) << "params of tensor " << i;
    }
    int64_t a = -1, b = -2;
    ASSERT_EQ(polyak_nonfinite_count(dev.get(), &a), POLYAK_OK);
    ASSERT_EQ(polyak_nonfinite_count(off.get(), &b), POLYAK_OK);
    EXPECT_EQ(a, b);
  }
};

polyak_config base_config(int num_shadows)
{
  polyak_config cfg = cpu_config(num_shadows, 0.9);
  cfg.cpu_threads = 4;
  return cfg;
}

} // namespace

TEST_F(Gpu, OffloadedShadowsHaveTheDeviceShadowsBitsInEveryMode)
{
  std::vector<std::pair<std::string, polyak_config>> modes;
  polyak_config cfg = base_config(3); // schedules, gaps
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_POWER;
  modes.emplace_back("schedules", cfg);
  cfg = base_config(2);
  cfg.shadow_dtype = POLYAK_BF16;
  cfg.seed = 7;
  modes.emplace_back("bf16 stochastic rounding", cfg);
  cfg = base_config(2);
  cfg.zero_init = 1;
  cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_COSINE;
  cfg.shadows[1].schedule.ramp_steps = 5;
  modes.emplace_back("f32 stochastic rounding, zero_init", cfg);
  cfg = base_config(2);
  cfg.shadows[0].count_updates = 1;
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_TF;
  cfg.shadows[1].schedule.start_step = 3;
  modes.emplace_back("counted updates, start_step", cfg);
  cfg = base_config(2);
  cfg.shadows[1].grad_norm_c = 0.5;
  modes.emplace_back("grad norm", cfg);
  cfg = base_config(2);
  cfg.shadows[0].layerwise_beta0 = 0.99;
  modes.emplace_back("layer-wise", cfg);
  cfg = base_config(2);
  cfg.lookahead_every = 3;
  cfg.shadows[1].schedule.beta = 0.5;
  modes.emplace_back("Lookahead", cfg);
  cfg = base_config(1);
  cfg.skip_nonfinite = 0;
  modes.emplace_back("no guard", cfg);
  for (const auto &[name, mode] : modes) {
    DeviceAndHost both(mode);
    both.train(11, {1, 2, 3, 5, 6, 9, 10});
    both.expect_same();
    if (HasFailure())
      FAIL() << name;
  }
}

TEST_F(Gpu, OffloadedReadOutsBlendsAndRestoreMatchTheDeviceHandle)
{
  DeviceAndHost both(base_config(2));
  both.train(12, {1, 2, 4});
  for (polyak_t *p : {both.dev.get(), both.off.get()}) {
    ASSERT_EQ(polyak_store(p, nullptr), POLYAK_OK) << polyak_last_error(p);
    ASSERT_EQ(polyak_copy_to_params(p, 1, nullptr), POLYAK_OK) << polyak_last_error(p);
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  both.expect_same();
  for (polyak_t *p : {both.dev.get(), both.off.get()})
    ASSERT_EQ(polyak_restore(p, nullptr), POLYAK_OK) << polyak_last_error(p);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  both.expect_same();
  // a read-out into device memory goes through the staging ring
  int64_t n = both.dev_twins.back().host.num_elems;
  std::vector<float> a(n), b(n);
  float *dst = nullptr;
  CUDA_OK(cudaMalloc(&dst, n * sizeof(float)));
  ASSERT_EQ(polyak_get_shadow(both.off.get(), 0, (int)both.dev_twins.size() - 1, dst, POLYAK_F32, nullptr), POLYAK_OK);
  CUDA_OK(cudaMemcpy(b.data(), dst, n * sizeof(float), cudaMemcpyDeviceToHost));
  ASSERT_EQ(polyak_get_shadow(both.dev.get(), 0, (int)both.dev_twins.size() - 1, dst, POLYAK_F32, nullptr), POLYAK_OK);
  CUDA_OK(cudaMemcpy(a.data(), dst, n * sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(dst);
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), n * sizeof(float)));
}

// Work queued ahead of the update on its stream: polyak_update returns
// before that work ends (no host sync), and the shadows are right after.
TEST_F(Gpu, AnOffloadedUpdateReturnsWithoutWaitingForTheDevice)
{
  for (int overlap : {0, 1}) {
    DeviceAndHost both(base_config(1));
    both.randomize(13);
    both.finalize();
    ASSERT_EQ(polyak_overlap_param_reads(both.off.get(), overlap), POLYAK_OK);
    cudaStream_t stream = nullptr;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    int rate_khz = 0;
    CUDA_OK(cudaDeviceGetAttribute(&rate_khz, cudaDevAttrClockRate, 0));
    spin_kernel<<<1, 1, 0, stream>>>((long long)rate_khz * 300); // about 300 ms
    auto start = std::chrono::steady_clock::now();
    ASSERT_EQ(polyak_update(both.off.get(), 1, stream), POLYAK_OK) << polyak_last_error(both.off.get());
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(ms, 100.0) << "polyak_update waited for the work queued ahead of it (overlap " << overlap << ")";
    EXPECT_EQ(cudaStreamQuery(stream), cudaErrorNotReady) << "the spin ended before the update returned";
    ASSERT_EQ(polyak_wait_param_reads(both.off.get(), stream), POLYAK_OK);
    CUDA_OK(cudaStreamSynchronize(stream));
    ASSERT_EQ(polyak_update(both.dev.get(), 1, nullptr), POLYAK_OK);
    CUDA_OK(cudaDeviceSynchronize());
    both.expect_same();
    cudaStreamDestroy(stream);
  }
}

// cudaMemGetInfo around create, finalize and the first update: an offloaded
// handle takes no more device memory than its staging size, its plan and 1 MiB.
TEST_F(Gpu, AnOffloadedHandleTakesAtMostItsStagingAndPlanInDeviceMemory)
{
  const int64_t num_elems = 64 << 20; // 128 MiB of bf16 params: 256 MiB of f32 shadows elsewhere
  void *param = nullptr;
  CUDA_OK(cudaMalloc(&param, num_elems * 2));
  CUDA_OK(cudaMemset(param, 0, num_elems * 2));
  CUDA_OK(cudaDeviceSynchronize());
  size_t free_before = 0, free_after = 0, total = 0;
  CUDA_OK(cudaMemGetInfo(&free_before, &total));
  polyak_config cfg = cuda_config(base_config(2));
  cfg.shadow_location = POLYAK_SHADOWS_HOST;
  const size_t staging = 16 << 20;
  {
    Handle h = make_handle(cfg);
    ASSERT_EQ(polyak_set_offload_staging(h.get(), staging), POLYAK_OK);
    int64_t shape[1] = {num_elems};
    ASSERT_EQ(polyak_add(h.get(), "w", param, POLYAK_BF16, 1, shape), POLYAK_OK);
    ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
    ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(h.get());
    int64_t count = 0;
    ASSERT_EQ(polyak_nonfinite_count(h.get(), &count), POLYAK_OK); // waits for the update in flight
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaMemGetInfo(&free_after, &total));
    int64_t num_chunks = num_elems / 4096 + 1; // at least the plan a device handle would upload
    size_t plan = (size_t)num_chunks * 32 + 4096;
    long long used = (long long)free_before - (long long)free_after;
    printf("offloaded handle: %lld bytes of device memory (staging %zu, plan %zu)\n", used, staging, plan);
    EXPECT_LE(used, (long long)(staging + plan + (1 << 20)));
  }
  cudaFree(param);
}

TEST_F(Gpu, AnOffloadedUpdateIsRefusedInsideACapture)
{
  DeviceAndHost both(base_config(1));
  both.randomize(14);
  both.finalize();
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  EXPECT_EQ(polyak_update(both.off.get(), 1, stream), POLYAK_ERR_STATE);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  EXPECT_NE(std::string(polyak_last_error(both.off.get())).find("graph"), std::string::npos);
  EXPECT_EQ(polyak_graph_reserve(both.off.get(), 1, 4, nullptr), POLYAK_ERR_UNSUPPORTED);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  // nothing changed: the next update is the first
  ASSERT_EQ(polyak_update(both.off.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(both.off.get());
  ASSERT_EQ(polyak_update(both.dev.get(), 1, nullptr), POLYAK_OK);
  CUDA_OK(cudaDeviceSynchronize());
  both.expect_same();
}

// The fold thread waits on the host (cudaEventSynchronize) for each group's
// copies; with its capture mode relaxed that never invalidates a
// global-mode capture begun on another thread meanwhile.
TEST_F(Gpu, AFoldInFlightLeavesAGlobalModeCaptureOnAnotherThreadValid)
{
  DeviceAndHost both(base_config(1), 16 << 10); // many groups: many host waits
  both.randomize(15);
  both.finalize();
  cudaStream_t work = nullptr, captured = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&work, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamCreateWithFlags(&captured, cudaStreamNonBlocking));
  int rate_khz = 0;
  CUDA_OK(cudaDeviceGetAttribute(&rate_khz, cudaDevAttrClockRate, 0));
  spin_kernel<<<1, 1, 0, work>>>((long long)rate_khz * 200); // about 200 ms: the fold waits meanwhile
  ASSERT_EQ(polyak_update(both.off.get(), 1, work), POLYAK_OK) << polyak_last_error(both.off.get());
  cudaGraph_t graph = nullptr;
  CUDA_OK(cudaStreamBeginCapture(captured, cudaStreamCaptureModeGlobal));
  spin_kernel<<<1, 1, 0, captured>>>(1);
  std::this_thread::sleep_for(std::chrono::milliseconds(400)); // the fold's waits end inside the capture
  spin_kernel<<<1, 1, 0, captured>>>(1);
  EXPECT_EQ(cudaStreamEndCapture(captured, &graph), cudaSuccess);
  EXPECT_NE(graph, nullptr);
  if (graph) {
    cudaGraphExec_t exec = nullptr;
    EXPECT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    if (exec)
      cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  cudaGetLastError();
  int64_t count = 0;
  ASSERT_EQ(polyak_nonfinite_count(both.off.get(), &count), POLYAK_OK) << polyak_last_error(both.off.get());
  ASSERT_EQ(polyak_update(both.dev.get(), 1, nullptr), POLYAK_OK);
  CUDA_OK(cudaDeviceSynchronize());
  both.expect_same();
  cudaStreamDestroy(work);
  cudaStreamDestroy(captured);
}
