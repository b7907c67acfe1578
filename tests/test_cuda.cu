// test_cuda.cu: the CUDA backend against the CPU backend, bit for bit.
// Every test skips with a message when no CUDA device is present.
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

using namespace polyak_test;

namespace {

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

polyak_config cuda_config(polyak_config cfg)
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

std::vector<Twin> odd_twins()
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

// ---- CUDA graphs ---------------------------------------------------------------

// Moves every param to base + 0.01 * replay (bf16 rounded), then counts the replay.
__global__ void perturb(uint16_t *param, const float *base, int64_t n, const int *replay)
{
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    param[i] = polyak_f32_to_bf16_rne(base[i] + 0.01f * (float)*replay);
}

__global__ void next_replay(int *replay)
{
  *replay += 1;
}

TEST_F(Gpu, CapturedUpdateIsOneNodeAndReplaysMatchTheCpuBackend)
{
  polyak_config cfg = cpu_config(3);
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadow_dtype = POLYAK_BF16;
  std::vector<Twin> twins;
  twins.emplace_back("w", POLYAK_BF16, 65537, 2);
  Both both(cfg, std::move(twins));
  both.randomize(5);
  both.finalize();
  Twin &w = both.twins[0];
  const int64_t n = w.host.num_elems;
  std::vector<float> base(n);
  for (int64_t e = 0; e < n; e++)
    base[e] = w.host.get(e);
  float *base_d = nullptr;
  int *replay_d = nullptr;
  CUDA_OK(cudaMalloc(&base_d, n * 4));
  CUDA_OK(cudaMalloc(&replay_d, sizeof(int)));
  CUDA_OK(cudaMemcpy(base_d, base.data(), n * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(replay_d, 0, sizeof(int)));
  CUDA_OK(cudaDeviceSynchronize()); // the replays run on a non-blocking stream
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ASSERT_EQ(polyak_graph_reserve(both.gpu.get(), 1, 100, stream), POLYAK_OK) << polyak_last_error(both.gpu.get());

  // the update alone is one kernel node
  cudaGraph_t alone;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  ASSERT_EQ(polyak_graph_update(both.gpu.get(), stream), POLYAK_OK);
  CUDA_OK(cudaStreamEndCapture(stream, &alone));
  size_t num_nodes = 0;
  CUDA_OK(cudaGraphGetNodes(alone, nullptr, &num_nodes));
  EXPECT_EQ(num_nodes, 1u);
  cudaGraphDestroy(alone);

  // a training step: params move, then the update
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  perturb<<<64, 256, 0, stream>>>(static_cast<uint16_t *>(w.device), base_d, n, replay_d);
  ASSERT_EQ(polyak_graph_update(both.gpu.get(), stream), POLYAK_OK);
  next_replay<<<1, 1, 0, stream>>>(replay_d);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 100; replay++)
    CUDA_OK(cudaGraphLaunch(exec, stream));
  int64_t done = -1;
  ASSERT_EQ(polyak_graph_release(both.gpu.get(), &done), POLYAK_OK) << polyak_last_error(both.gpu.get());
  EXPECT_EQ(done, 100);

  for (int replay = 0; replay < 100; replay++) {
    for (int64_t e = 0; e < n; e++)
      w.host.set(e, base[e] + 0.01f * (float)replay);
    ASSERT_EQ(polyak_update(both.cpu.get(), replay + 1, nullptr), POLYAK_OK);
  }
  both.expect_same();
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  cudaFree(base_d);
  cudaFree(replay_d);
}

TEST_F(Gpu, OneCapturedGraphServesLaterReservationsAndLoads)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadow_dtype = POLYAK_BF16;
  Both both(cfg, odd_twins());
  both.randomize(11);
  both.finalize();
  both.randomize(12); // the params stay here; the steps' weights differ
  CapturedUpdate captured;
  captured.capture(both.gpu.get(), 1, 5);
  cudaStream_t stream = captured.stream;
  cudaGraphExec_t exec = captured.exec;
  auto replay = [&](int times) {
    for (int i = 0; i < times; i++)
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  };
  int64_t done = -1;
  replay(5);
  ASSERT_EQ(polyak_graph_release(both.gpu.get(), &done), POLYAK_OK);
  EXPECT_EQ(done, 5);
  replay(2); // nothing reserved: changes nothing
  TempDir dir;
  const std::string file = dir.file("ema");
  const char *path = file.c_str();
  ASSERT_EQ(polyak_save(both.gpu.get(), path), POLYAK_OK) << polyak_last_error(both.gpu.get());
  ASSERT_EQ(polyak_graph_reserve(both.gpu.get(), 6, 3, stream), POLYAK_OK);
  replay(4);
  EXPECT_EQ(polyak_graph_release(both.gpu.get(), &done), POLYAK_ERR_STATE) << "one replay too many";
  EXPECT_EQ(done, 3);
  ASSERT_EQ(polyak_load(both.gpu.get(), path), POLYAK_OK) << polyak_last_error(both.gpu.get()); // back to step 5
  ASSERT_EQ(polyak_graph_reserve(both.gpu.get(), 6, 2, stream), POLYAK_OK);
  replay(2);
  ASSERT_EQ(polyak_graph_release(both.gpu.get(), &done), POLYAK_OK);
  EXPECT_EQ(done, 2);
  for (int64_t step = 1; step <= 7; step++)
    ASSERT_EQ(polyak_update(both.cpu.get(), step, nullptr), POLYAK_OK);
  both.expect_same();
}

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
TEST_F(Gpu, ReplaysReadTheSourcesSetAtTheirReservation)
{
  polyak_config cfg = cpu_config(3, 0.9);
  cfg.shadows[0].grad_norm_c = 0.3;
  cfg.shadows[1].layerwise_beta0 = 0.95;
  Both both(cfg, odd_twins());
  std::vector<Twin> grads = odd_twins();
  std::vector<void *> host_table, device_table;
  std::mt19937_64 rng(23);
  for (auto &g : grads) {
    g.host.randomize(rng, 0.0f, 0.1f);
    g.upload();
    host_table.push_back(g.host.data());
    device_table.push_back(g.device);
  }
  const size_t num_tensors = both.twins.size();
  std::vector<float> host_norms(num_tensors);
  for (size_t i = 0; i < num_tensors; i++)
    host_norms[i] = 0.1f + 0.05f * (float)(i % 7);
  float host_norm[2] = {0.7f, 4.0f}, *device_norm = nullptr, *device_norms = nullptr;
  CUDA_OK(cudaMalloc(&device_norm, 2 * sizeof(float)));
  CUDA_OK(cudaMalloc(&device_norms, num_tensors * sizeof(float)));
  CUDA_OK(cudaMemcpy(device_norm, host_norm, 2 * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(device_norms, host_norms.data(), num_tensors * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaDeviceSynchronize());
  both.randomize(24);
  both.finalize();
  ASSERT_EQ(polyak_set_grad_norm(both.cpu.get(), &host_norm[0]), POLYAK_OK);
  ASSERT_EQ(polyak_set_grad_norm(both.gpu.get(), &device_norm[0]), POLYAK_OK);
  ASSERT_EQ(polyak_set_layer_norms(both.cpu.get(), host_norms.data()), POLYAK_OK);
  ASSERT_EQ(polyak_set_layer_norms(both.gpu.get(), device_norms), POLYAK_OK) << polyak_last_error(both.gpu.get());

  CapturedUpdate captured;
  captured.capture(both.gpu.get(), 1, 2);
  auto replay = [&](int64_t first, int times) {
    ASSERT_EQ(polyak_graph_reserve(both.cpu.get(), first, times, nullptr), POLYAK_OK);
    for (int i = 0; i < times; i++) {
      ASSERT_EQ(cudaGraphLaunch(captured.exec, captured.stream), cudaSuccess);
      ASSERT_EQ(polyak_graph_update(both.cpu.get(), nullptr), POLYAK_OK);
    }
    int64_t done = -1;
    ASSERT_EQ(polyak_graph_release(both.gpu.get(), &done), POLYAK_OK) << polyak_last_error(both.gpu.get());
    EXPECT_EQ(done, times);
    ASSERT_EQ(polyak_graph_release(both.cpu.get(), nullptr), POLYAK_OK);
  };
  replay(1, 2);
  both.expect_same();

  // after the capture: another norm, and gradients instead of given norms
  ASSERT_EQ(polyak_set_grad_norm(both.cpu.get(), &host_norm[1]), POLYAK_OK);
  ASSERT_EQ(polyak_set_grad_norm(both.gpu.get(), &device_norm[1]), POLYAK_OK);
  ASSERT_EQ(polyak_set_grads(both.cpu.get(), host_table.data()), POLYAK_OK);
  ASSERT_EQ(polyak_set_grads(both.gpu.get(), device_table.data()), POLYAK_OK) << polyak_last_error(both.gpu.get());
  ASSERT_EQ(polyak_graph_reserve(both.gpu.get(), 4, 3, captured.stream), POLYAK_OK);
  EXPECT_EQ(polyak_set_grad_norm(both.gpu.get(), &device_norm[0]), POLYAK_ERR_STATE) << "while reserved";
  replay(4, 3);
  both.expect_same();
  for (int k : {0, 1}) {
    double cpu = -1, gpu = -2;
    ASSERT_EQ(polyak_get_beta_product(both.cpu.get(), k, &cpu), POLYAK_OK);
    ASSERT_EQ(polyak_get_beta_product(both.gpu.get(), k, &gpu), POLYAK_OK);
    EXPECT_EQ(cpu, gpu) << "shadow " << k;
  }
  std::vector<double> cpu_betas(num_tensors), gpu_betas(num_tensors);
  ASSERT_EQ(polyak_get_layer_betas(both.cpu.get(), 1, cpu_betas.data()), POLYAK_OK);
  ASSERT_EQ(polyak_get_layer_betas(both.gpu.get(), 1, gpu_betas.data()), POLYAK_OK);
  EXPECT_EQ(cpu_betas, gpu_betas);
  cudaFree(device_norm);
  cudaFree(device_norms);
}

// A sharded handle works on whole params for store, restore and a hard
// update's scan: their chunk table is in place from finalize on, for
// kernels on any stream (a non-blocking one here, right after finalize).
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

TEST_F(Gpu, PolyakUpdateRefusesToBeCaptured)
{
  Both both(cpu_config(), odd_twins());
  both.randomize(6);
  both.finalize();
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  EXPECT_EQ(polyak_update(both.gpu.get(), 1, stream), POLYAK_ERR_STATE);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  int64_t step = -1;
  polyak_get_step(both.gpu.get(), &step);
  EXPECT_EQ(step, 0);
}

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
