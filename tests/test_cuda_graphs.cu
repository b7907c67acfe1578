// test_cuda_graphs.cu: captured updates and their replays against direct updates.
// Every test skips with a message when no CUDA device is present.
#include "test_cuda_util.h"

#include <cstdio>

#include "cuda/cuda_state.h"
#include "polyak_internal.h"

using namespace polyak_test;

namespace {

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

// Replays of one captured update on two streams at once, LAWA's betas
// included: what a handle's launches must not do (which steps they apply is
// undefined), but each still counts once, consumed or dropped, and the
// last-block counters are whole afterwards, so later replays on one stream
// apply one step each.
TEST_F(Gpu, OverlappingReplaysCountEveryLaunchAndLeaveTheCountersWhole)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[1].layerwise_beta0 = 0.95;
  Both both(cfg, odd_twins());
  both.randomize(31);
  both.finalize();
  polyak_t *gpu = both.gpu.get();
  const size_t num_tensors = both.twins.size();
  std::vector<float> norms(num_tensors, 0.5f);
  float *device_norms = nullptr;
  CUDA_OK(cudaMalloc(&device_norms, num_tensors * sizeof(float)));
  CUDA_OK(cudaMemcpy(device_norms, norms.data(), num_tensors * sizeof(float), cudaMemcpyHostToDevice));
  ASSERT_EQ(polyak_set_layer_norms(gpu, device_norms), POLYAK_OK) << polyak_last_error(gpu);
  CapturedUpdate captured;
  captured.capture(gpu, 1, 40);
  cudaStream_t other;
  CUDA_OK(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  const int launches = 60;
  for (int i = 0; i < launches; i++)
    CUDA_OK(cudaGraphLaunch(captured.exec, i % 2 ? other : captured.stream));
  int64_t consumed = -1;
  long long dropped = 0;
  EXPECT_EQ(polyak_graph_release(gpu, &consumed), POLYAK_ERR_STATE) << "more launches than reserved steps";
  ASSERT_EQ(std::sscanf(polyak_last_error(gpu), "polyak_graph_release: %lld replays", &dropped), 1)
      << polyak_last_error(gpu);
  EXPECT_EQ(consumed + dropped, launches);

  const cuda_state *state = static_cast<const cuda_state *>(gpu->backend);
  polyak_graph_state graph;
  unsigned int layer_blocks_done = 1;
  CUDA_OK(cudaMemcpy(&graph, state->graph, sizeof graph, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(&layer_blocks_done, state->layer_blocks_done, sizeof layer_blocks_done, cudaMemcpyDeviceToHost));
  EXPECT_EQ(graph.blocks_done, 0u);
  EXPECT_EQ(layer_blocks_done, 0u);

  ASSERT_EQ(polyak_graph_reserve(gpu, consumed + 1, 5, captured.stream), POLYAK_OK) << polyak_last_error(gpu);
  for (int i = 0; i < 5; i++)
    CUDA_OK(cudaGraphLaunch(captured.exec, captured.stream));
  int64_t done = -1;
  ASSERT_EQ(polyak_graph_release(gpu, &done), POLYAK_OK) << polyak_last_error(gpu);
  EXPECT_EQ(done, 5);
  cudaStreamDestroy(other);
  cudaFree(device_norms);
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

} // namespace
