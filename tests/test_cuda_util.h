// test_cuda_util.h: what the CUDA backend's tests share: the fixture that
// skips without a device, host tensors with device twins, and a CPU and a
// CUDA handle over the same tensors compared bit for bit.
#ifndef POLYAK_TEST_CUDA_UTIL_H
#define POLYAK_TEST_CUDA_UTIL_H

#include "test_util.h"

#include <functional>

#include <cuda_runtime.h>

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <fstream>

#include "polyak_math.h"

#ifdef POLYAK_TEST_NCCL
#include <nccl.h>
#endif

namespace polyak_test {

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call << ": " << cudaGetErrorString(cudaGetLastError())

class Gpu : public ::testing::Test {
protected:
  void SetUp() override
  {
    // the reason as the library sees it (no device, or a driver too old
    // for this runtime, ...); bench/gpu_check.sh looks for "GPU not used"
    polyak_config cfg;
    polyak_config_init(&cfg);
    cfg.backend = POLYAK_BACKEND_CUDA;
    char reason[512] = "";
    if (polyak_check_config(&cfg, reason, sizeof reason) != POLYAK_OK)
      GTEST_SKIP() << "GPU not used: " << reason;
  }
};

inline polyak_config cuda_config(polyak_config cfg)
{
  cfg.backend = POLYAK_BACKEND_CUDA;
  cfg.device = 0;
  return cfg;
}

// A host tensor and its device twin at the same 16-byte phase: in its own
// allocation, or (pool != nullptr) at the next free 16 bytes of a pool.
struct Twin {
  Tensor host;
  char *device_base = nullptr; // owned, unless in a pool
  void *device = nullptr;
  Twin(std::string name, polyak_dtype d, int64_t n, size_t offset, char **pool = nullptr)
      : host(std::move(name), d, n, offset)
  {
    size_t bytes = n * dtype_bytes(d) + offset + 16;
    if (pool) {
      device = *pool + offset;
      *pool += (bytes + 15) / 16 * 16;
    } else {
      EXPECT_EQ(cudaMalloc(&device_base, bytes), cudaSuccess);
      device = device_base + offset;
    }
  }
  Twin(Twin &&o) noexcept : host(std::move(o.host)), device_base(o.device_base), device(o.device)
  {
    o.device_base = nullptr;
  }
  ~Twin()
  {
    cudaFree(device_base);
  }
  // A pageable cudaMemcpy may return before the data lands, and updates on
  // non-blocking streams do not wait for it: synchronize.
  void upload()
  {
    cudaMemcpy(device, host.data(), host.num_elems * dtype_bytes(host.dtype), cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
  }
};

// One CPU handle and one CUDA handle over the same tensors.
struct Both {
  std::vector<Twin> twins;
  std::vector<Tensor> views; // host views for the snapshot helpers
  Handle cpu, gpu;
  polyak_config cfg;

  Both(const polyak_config &c, std::vector<Twin> &&t, void *gpu_comm = nullptr) : twins(std::move(t)), cfg(c)
  {
    cpu = make_handle(cfg);
    polyak_config on_gpu = cuda_config(cfg);
    on_gpu.nccl_comm = gpu_comm;
    gpu = make_handle(on_gpu);
    for (auto &tw : twins) {
      int64_t shape[1] = {tw.host.num_elems};
      EXPECT_EQ(polyak_add(cpu.get(), tw.host.name.c_str(), tw.host.data(), tw.host.dtype, 1, shape), POLYAK_OK);
      EXPECT_EQ(polyak_add(gpu.get(), tw.host.name.c_str(), tw.device, tw.host.dtype, 1, shape), POLYAK_OK)
          << polyak_last_error(gpu.get());
    }
  }
  void randomize(uint64_t seed, float poison_every = 0)
  {
    std::mt19937_64 rng(seed);
    for (auto &tw : twins) {
      tw.host.randomize(rng, 0.25f, 2.0f);
      if (poison_every > 0 && tw.host.num_elems > 0) {
        tw.host.set(0, NAN);
        tw.host.set(tw.host.num_elems - 1, -INFINITY);
        for (int64_t e = 1; e < tw.host.num_elems; e += (int64_t)poison_every)
          tw.host.set(e, INFINITY);
      }
      tw.upload();
    }
  }
  void finalize()
  {
    ASSERT_EQ(polyak_finalize(cpu.get(), nullptr), POLYAK_OK) << polyak_last_error(cpu.get());
    ASSERT_EQ(polyak_finalize(gpu.get(), nullptr), POLYAK_OK) << polyak_last_error(gpu.get());
  }
  void update(int64_t step)
  {
    ASSERT_EQ(polyak_update(cpu.get(), step, nullptr), POLYAK_OK) << polyak_last_error(cpu.get());
    ASSERT_EQ(polyak_update(gpu.get(), step, nullptr), POLYAK_OK) << polyak_last_error(gpu.get());
  }
  // Each device param has the bits of its host twin.
  void expect_params_same()
  {
    for (auto &tw : twins) {
      std::vector<char> got(tw.host.num_elems * dtype_bytes(tw.host.dtype));
      ASSERT_EQ(cudaMemcpy(got.data(), tw.device, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(0, std::memcmp(got.data(), tw.host.data(), got.size())) << tw.host.name;
    }
  }
  // Reserves steps first.. first + n - 1 on both, replays each after
  // prepare(step), and releases.
  void replay(int64_t first, int64_t n, const std::function<void(int64_t)> &prepare)
  {
    ASSERT_EQ(polyak_graph_reserve(cpu.get(), first, n, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_graph_reserve(gpu.get(), first, n, nullptr), POLYAK_OK) << polyak_last_error(gpu.get());
    for (int64_t step = first; step < first + n; step++) {
      prepare(step);
      ASSERT_EQ(polyak_graph_update(cpu.get(), nullptr), POLYAK_OK);
      ASSERT_EQ(polyak_graph_update(gpu.get(), nullptr), POLYAK_OK);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
    ASSERT_EQ(polyak_graph_release(cpu.get(), nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_graph_release(gpu.get(), nullptr), POLYAK_OK);
  }
  // Finalize on random params, then update at `steps`, params redrawn before each.
  void train(uint64_t seed, std::initializer_list<int64_t> steps)
  {
    randomize(seed);
    finalize();
    for (int64_t step : steps) {
      randomize(seed * 100 + (uint64_t)step);
      update(step);
    }
  }
  // Every shadow of every `stride`-th tensor (and the last), read out in the
  // shadow dtype: same bits (any NaN equals any NaN: GPU arithmetic makes
  // canonical NaNs). The non-finite counts agree too.
  void expect_same(size_t stride = 1)
  {
    polyak_dtype d = cfg.shadow_dtype;
    size_t bytes = dtype_bytes(d);
    std::vector<size_t> checked;
    for (size_t i = 0; i < twins.size(); i += stride)
      checked.push_back(i);
    if (!twins.empty() && checked.back() != twins.size() - 1)
      checked.push_back(twins.size() - 1);
    for (int k = 0; k < cfg.num_shadows; k++)
      for (size_t i : checked) {
        int64_t n = twins[i].host.num_elems;
        std::vector<char> want(n * bytes + 1), got(n * bytes + 1);
        void *dst = nullptr;
        ASSERT_EQ(cudaMalloc(&dst, n * bytes + 1), cudaSuccess);
        ASSERT_EQ(polyak_get_shadow(cpu.get(), k, (int)i, want.data(), d, nullptr), POLYAK_OK);
        ASSERT_EQ(polyak_get_shadow(gpu.get(), k, (int)i, dst, d, nullptr), POLYAK_OK) << polyak_last_error(gpu.get());
        ASSERT_EQ(cudaMemcpy(got.data(), dst, n * bytes, cudaMemcpyDeviceToHost), cudaSuccess);
        cudaFree(dst);
        for (int64_t e = 0; e < n; e++) {
          float a = load_as(d, want.data(), e), b = load_as(d, got.data(), e);
          if (std::memcmp(want.data() + e * bytes, got.data() + e * bytes, bytes) != 0 &&
              !(std::isnan(a) && std::isnan(b))) {
            ADD_FAILURE() << "shadow " << k << " tensor " << twins[i].host.name << " elem " << e << ": cpu " << a
                          << " gpu " << b;
            return;
          }
        }
      }
    int64_t cpu_count = -1, gpu_count = -2;
    ASSERT_EQ(polyak_nonfinite_count(cpu.get(), &cpu_count), POLYAK_OK);
    ASSERT_EQ(polyak_nonfinite_count(gpu.get(), &gpu_count), POLYAK_OK);
    EXPECT_EQ(cpu_count, gpu_count);
  }
};

// polyak_graph_update alone, captured on a non-blocking stream of its own
// after reserving steps first..first + n - 1, and instantiated.
struct CapturedUpdate {
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  void capture(polyak_t *p, int64_t first, int64_t n)
  {
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    ASSERT_EQ(polyak_graph_reserve(p, first, n, stream), POLYAK_OK) << polyak_last_error(p);
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    ASSERT_EQ(polyak_graph_update(p, stream), POLYAK_OK);
    CUDA_OK(cudaStreamEndCapture(stream, &graph));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  }
  ~CapturedUpdate()
  {
    if (exec)
      cudaGraphExecDestroy(exec);
    if (graph)
      cudaGraphDestroy(graph);
    if (stream)
      cudaStreamDestroy(stream);
  }
};

inline std::vector<Twin> odd_twins()
{
  const int64_t sizes[] = {0, 1, 3, 4, 5, 65535, 65536, 65537, 130001};
  const polyak_dtype dtypes[] = {POLYAK_BF16, POLYAK_F32, POLYAK_F16};
  std::vector<Twin> twins;
  int i = 0;
  for (int64_t n : sizes)
    for (polyak_dtype d : dtypes) {
      // f32 at every 4-byte phase; 16-bit at 0 and 8 (vector path) and 2, 6 (scalar)
      const size_t phases16[] = {0, 2, 6, 8};
      size_t offset = d == POLYAK_F32 ? 4 * (i % 4) : phases16[i % 4];
      twins.emplace_back("t" + std::to_string(i++), d, n, offset);
    }
  return twins;
}

} // namespace polyak_test

#endif // POLYAK_TEST_CUDA_UTIL_H
