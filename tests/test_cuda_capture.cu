// test_cuda_capture.cu: calls that a CUDA graph capture cannot hold refuse
// with POLYAK_ERR_STATE while one is under way, and the caller's capture
// survives (cudaStreamEndCapture succeeds): on the call's stream, on a
// blocking stream, and where the handle's graph update was captured.
// Every test skips with a message when no CUDA device is present.
#include "test_cuda_util.h"

using namespace polyak_test;

namespace {

// Ends the capture on `stream`; it must not have been invalidated.
void expect_capture_survived(cudaStream_t stream)
{
  cudaGraph_t graph = nullptr;
  EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess) << "the capture was invalidated";
  if (graph)
    cudaGraphDestroy(graph);
  cudaGetLastError();
}

TEST_F(Gpu, CallsOnACapturedStreamThatWouldBreakItRefuse)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].grad_norm_c = 0.3;
  Both both(cfg, odd_twins());
  both.randomize(51);
  both.finalize();
  polyak_t *gpu = both.gpu.get();
  float norm = 1.5f, *device_norm = nullptr;
  CUDA_OK(cudaMalloc(&device_norm, sizeof norm));
  CUDA_OK(cudaMemcpy(device_norm, &norm, sizeof norm, cudaMemcpyHostToDevice));
  ASSERT_EQ(polyak_set_grad_norm(gpu, device_norm), POLYAK_OK) << polyak_last_error(gpu);
  ASSERT_EQ(polyak_update(gpu, 1, nullptr), POLYAK_OK) << polyak_last_error(gpu);
  CUDA_OK(cudaDeviceSynchronize());
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  EXPECT_EQ(polyak_store(gpu, stream), POLYAK_ERR_STATE) << "its first use allocates";
  EXPECT_EQ(polyak_graph_reserve(gpu, 2, 3, stream), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_hard_update(gpu, 0, stream), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_update(gpu, 2, stream), POLYAK_ERR_STATE);
  expect_capture_survived(stream);
  // outside the capture they work
  EXPECT_EQ(polyak_store(gpu, stream), POLYAK_OK) << polyak_last_error(gpu);
  EXPECT_EQ(polyak_restore(gpu, stream), POLYAK_OK) << polyak_last_error(gpu);
  CUDA_OK(cudaStreamSynchronize(stream));
  cudaStreamDestroy(stream);
  cudaFree(device_norm);
}

// While a captured graph update's capture goes on, calls that take no
// stream but wait for the device refuse: the handle noted that capture.
TEST_F(Gpu, CallsWithoutAStreamRefuseWhileTheirGraphUpdateIsCaptured)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].layerwise_beta0 = 0.9;
  Both both(cfg, odd_twins());
  both.randomize(52);
  both.finalize();
  polyak_t *gpu = both.gpu.get();
  const size_t num_tensors = both.twins.size();
  std::vector<float> norms(num_tensors, 0.25f);
  float *device_norms = nullptr;
  CUDA_OK(cudaMalloc(&device_norms, num_tensors * sizeof(float)));
  CUDA_OK(cudaMemcpy(device_norms, norms.data(), num_tensors * sizeof(float), cudaMemcpyHostToDevice));
  ASSERT_EQ(polyak_set_layer_norms(gpu, device_norms), POLYAK_OK) << polyak_last_error(gpu);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ASSERT_EQ(polyak_graph_reserve(gpu, 1, 4, stream), POLYAK_OK) << polyak_last_error(gpu);
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  ASSERT_EQ(polyak_graph_update(gpu, stream), POLYAK_OK) << polyak_last_error(gpu);
  int64_t count = -1, done = -1;
  std::vector<double> betas(num_tensors);
  EXPECT_EQ(polyak_nonfinite_count(gpu, &count), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_get_layer_betas(gpu, 1, betas.data()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_graph_release(gpu, &done), POLYAK_ERR_STATE);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess) << "the capture was invalidated";
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 4; i++)
    CUDA_OK(cudaGraphLaunch(exec, stream));
  // the capture is over: the calls work, and the handle forgets the stream
  EXPECT_EQ(polyak_nonfinite_count(gpu, &count), POLYAK_OK) << polyak_last_error(gpu);
  ASSERT_EQ(polyak_graph_release(gpu, &done), POLYAK_OK) << polyak_last_error(gpu);
  EXPECT_EQ(done, 4);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  cudaFree(device_norms);
}

// A capture on a blocking stream: the legacy default stream's query says
// so, and calls without a stream, or on the default stream, refuse.
TEST_F(Gpu, CallsRefuseWhileABlockingStreamIsCaptured)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].grad_norm_c = 0.3;
  Both both(cfg, odd_twins());
  both.randomize(53);
  both.finalize();
  polyak_t *gpu = both.gpu.get();
  float norm = 1.5f, *device_norm = nullptr;
  CUDA_OK(cudaMalloc(&device_norm, sizeof norm));
  CUDA_OK(cudaMemcpy(device_norm, &norm, sizeof norm, cudaMemcpyHostToDevice));
  ASSERT_EQ(polyak_set_grad_norm(gpu, device_norm), POLYAK_OK) << polyak_last_error(gpu);
  CUDA_OK(cudaDeviceSynchronize());
  cudaStream_t blocking;
  CUDA_OK(cudaStreamCreate(&blocking));
  CUDA_OK(cudaStreamBeginCapture(blocking, cudaStreamCaptureModeGlobal));
  int64_t count = -1;
  EXPECT_EQ(polyak_set_grad_norm(gpu, device_norm), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_nonfinite_count(gpu, &count), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_update(gpu, 1, nullptr), POLYAK_ERR_STATE) << "the legacy stream waits for the captured one";
  expect_capture_survived(blocking);
  EXPECT_EQ(polyak_update(gpu, 1, nullptr), POLYAK_OK) << polyak_last_error(gpu);
  EXPECT_EQ(polyak_nonfinite_count(gpu, &count), POLYAK_OK) << polyak_last_error(gpu);
  CUDA_OK(cudaDeviceSynchronize());
  cudaStreamDestroy(blocking);
  cudaFree(device_norm);
}

} // namespace
