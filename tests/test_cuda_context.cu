// test_cuda_context.cu: the caller's CUDA state around polyak's calls (the
// current context, even none, comes back as it was), and the checks of the
// caller's pointers: a span past its allocation is refused, one across the
// mapped pieces of a VMM reservation (PyTorch's expandable segments) is not.
// Every test skips with a message when no CUDA device is present.
#include "test_cuda_util.h"

#include <cuda.h>

#include <cstring>
#include <thread>

#include "cuda/cuda_state.h"
#include "polyak_internal.h"

using namespace polyak_test;

namespace {

// A driver function through the runtime, as the library finds them (the
// tests must start on machines without a driver too).
template <typename F> F driver(const char *symbol)
{
  void *function = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(symbol, &function, 12000, cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<F>(function);
}

CUcontext current_context()
{
  CUcontext context = reinterpret_cast<CUcontext>(0x1);
  auto get_current = driver<CUresult (*)(CUcontext *)>("cuCtxGetCurrent");
  if (!get_current || get_current(&context) != CUDA_SUCCESS)
    ADD_FAILURE() << "cuCtxGetCurrent";
  return context;
}

// Records a failing call, and a call that left a context current on a
// thread that had none.
struct ContextlessCalls {
  polyak_t *p;
  std::vector<std::string> failures;
  void check(const char *what, polyak_status status)
  {
    if (status != POLYAK_OK)
      failures.push_back(std::string(what) + ": " + polyak_status_name(status) + ": " + polyak_last_error(p));
    if (current_context() != nullptr)
      failures.push_back(std::string(what) + " left a context current");
  }
  std::string report() const
  {
    std::string all;
    for (const std::string &failure : failures)
      all += failure + "\n";
    return all;
  }
};

// Where the backend cannot run, the reason names the driver's CUDA version
// (or none) and the runtime's, the usual cause being a driver older than
// the runtime polyak was built with. Runs where there is no usable device.
TEST(CudaUnavailable, TheReasonNamesTheDriverAndTheRuntimeVersions)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.backend = POLYAK_BACKEND_CUDA;
  char reason[512] = "";
  if (polyak_check_config(&cfg, reason, sizeof reason) == POLYAK_OK)
    GTEST_SKIP() << "this machine has a usable CUDA device";
  int runtime = 0;
  ASSERT_EQ(cudaRuntimeGetVersion(&runtime), cudaSuccess);
  const std::string why = reason,
                    runtime_text = "CUDA " + std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  EXPECT_NE(why.find("cudaDriverGetVersion: "), std::string::npos) << why;
  EXPECT_NE(why.find("cudaRuntimeGetVersion: " + runtime_text), std::string::npos) << why;
  EXPECT_EQ(polyak_backend_available(POLYAK_BACKEND_CUDA), 0);
}

// Entering a device that cannot be entered (no driver, no device here)
// fails with the scope initialized, pushing and holding nothing, so that
// leaving it is a no-op. Runs where there is no usable device.
TEST(CudaUnavailable, EnteringFailsWithTheScopeInitialized)
{
  if (polyak_backend_available(POLYAK_BACKEND_CUDA))
    GTEST_SKIP() << "this machine has a usable CUDA device";
  polyak_t handle;
  std::memset(&handle, 0, sizeof handle);
  polyak_config_init(&handle.cfg);
  polyak_cuda_scope scope;
  std::memset(&scope, 0xA5, sizeof scope);
  EXPECT_NE(polyak_cuda_enter(&handle, &scope), cudaSuccess);
  EXPECT_EQ(scope.pushed, 0);
  EXPECT_EQ(scope.retained, 0);
  polyak_cuda_leave(&scope);
  cudaGetLastError();
}

// A thread that never touched CUDA has no current context, and polyak's
// calls leave it so: a runtime call outside the handle's context would make
// device 0's context current there (and then the caller's next allocation
// lands on device 0). Finalize included, whose checks run before the
// handle holds its context.
TEST_F(Gpu, CallsLeaveAThreadWithoutAContextWithoutOne)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].grad_norm_c = 0.3;
  cfg.zero_init = 1;
  std::vector<Twin> twins = odd_twins();
  std::mt19937_64 rng(41);
  for (auto &tw : twins) {
    tw.host.randomize(rng, 0.25f, 2.0f);
    tw.upload();
  }
  float norm = 0.5f, *device_norm = nullptr, *dst = nullptr;
  CUDA_OK(cudaMalloc(&device_norm, sizeof norm));
  CUDA_OK(cudaMalloc(&dst, 130001 * sizeof(float)));
  CUDA_OK(cudaMemcpy(device_norm, &norm, sizeof norm, cudaMemcpyHostToDevice));
  Handle h = make_handle(cuda_config(cfg));
  for (auto &tw : twins) {
    int64_t shape[1] = {tw.host.num_elems};
    ASSERT_EQ(polyak_add(h.get(), tw.host.name.c_str(), tw.device, tw.host.dtype, 1, shape), POLYAK_OK);
  }
  ContextlessCalls calls{h.get()};
  std::thread worker([&] {
    if (current_context() != nullptr) {
      calls.failures.push_back("a new thread has a current context");
      return;
    }
    polyak_t *p = h.get();
    int64_t count = -1;
    double product = -1;
    calls.check("polyak_finalize", polyak_finalize(p, nullptr));
    calls.check("polyak_set_grad_norm", polyak_set_grad_norm(p, device_norm));
    calls.check("polyak_update", polyak_update(p, 1, nullptr));
    calls.check("polyak_get_shadow", polyak_get_shadow(p, 1, 26, dst, POLYAK_F32, nullptr));
    calls.check("polyak_get_beta_product", polyak_get_beta_product(p, 1, &product));
    calls.check("polyak_nonfinite_count", polyak_nonfinite_count(p, &count));
    calls.check("polyak_store", polyak_store(p, nullptr));
    calls.check("polyak_restore", polyak_restore(p, nullptr));
  });
  worker.join();
  EXPECT_TRUE(calls.failures.empty()) << calls.report();
  cudaFree(device_norm);
  cudaFree(dst);
}

// A caller working on another device keeps it, and its context, current.
TEST_F(Gpu, TheCallersDeviceAndContextStayCurrent)
{
  int devices = 0;
  CUDA_OK(cudaGetDeviceCount(&devices));
  if (devices < 2)
    GTEST_SKIP() << "needs 2 GPUs, this machine has " << devices;
  Both both(cpu_config(), odd_twins()); // on device 0
  both.randomize(42);
  both.finalize();
  CUDA_OK(cudaSetDevice(1));
  CUDA_OK(cudaFree(nullptr)); // device 1's context made current
  CUcontext mine = current_context();
  ASSERT_EQ(polyak_update(both.gpu.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(both.gpu.get());
  int64_t count = -1;
  ASSERT_EQ(polyak_nonfinite_count(both.gpu.get(), &count), POLYAK_OK);
  int device = -1;
  CUDA_OK(cudaGetDevice(&device));
  EXPECT_EQ(device, 1);
  EXPECT_EQ(current_context(), mine);
  CUDA_OK(cudaSetDevice(0));
}

// A shape larger than the memory behind it: refused at finalize, before a
// kernel could fault on it (a sticky error that would end the caller's
// context too); the same for gradients and read-out destinations. Spans
// that end exactly at their allocation's end pass. (Overruns of whole
// megabytes: the driver may round an allocation's size up.)
TEST_F(Gpu, SpansPastTheirAllocationAreRefused)
{
  const int64_t n = 1 << 18; // 1 MiB of floats
  float *block = nullptr, *grad = nullptr;
  CUDA_OK(cudaMalloc(&block, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&grad, n / 2 * sizeof(float)));
  CUDA_OK(cudaMemset(block, 0, n * sizeof(float)));
  CUDA_OK(cudaMemset(grad, 0, n / 2 * sizeof(float)));
  {
    Handle h = make_handle(cuda_config(cpu_config()));
    int64_t shape[1] = {2 * n};
    ASSERT_EQ(polyak_add(h.get(), "too_long", block, POLYAK_F32, 1, shape), POLYAK_OK);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
    EXPECT_NE(std::string(polyak_last_error(h.get())).find("allocation"), std::string::npos)
        << polyak_last_error(h.get());
  }
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].layerwise_beta0 = 0.9;
  Handle h = make_handle(cuda_config(cfg));
  int64_t shape[1] = {n / 2};
  ASSERT_EQ(polyak_add(h.get(), "second_half", block + n / 2, POLYAK_F32, 1, shape), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  void *short_grad[1] = {grad + n / 4}, *fitting_grad[1] = {grad};
  EXPECT_EQ(polyak_set_grads(h.get(), short_grad), POLYAK_ERR_INVALID_ARG);
  EXPECT_NE(std::string(polyak_last_error(h.get())).find("grads[0]"), std::string::npos) << polyak_last_error(h.get());
  EXPECT_EQ(polyak_set_grads(h.get(), fitting_grad), POLYAK_OK) << polyak_last_error(h.get());
  EXPECT_EQ(polyak_get_shadow(h.get(), 0, 0, grad + n / 4, POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_shadow(h.get(), 0, 0, grad, POLYAK_F32, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  EXPECT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  CUDA_OK(cudaDeviceSynchronize());
  cudaFree(block);
  cudaFree(grad);
}

// Memory mapped piece by piece into one reservation, as PyTorch's
// expandable segments map it: a tensor across two pieces is accepted (the
// driver reports one piece at a time), one running into the reservation's
// unmapped rest is refused.
TEST_F(Gpu, SpansAcrossMappedPiecesAreAcceptedAndIntoUnmappedOnesRefused)
{
  auto granularity_of = driver<CUresult (*)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags)>(
      "cuMemGetAllocationGranularity");
  auto reserve =
      driver<CUresult (*)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long)>("cuMemAddressReserve");
  auto create =
      driver<CUresult (*)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long)>(
          "cuMemCreate");
  auto map =
      driver<CUresult (*)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long)>("cuMemMap");
  auto set_access = driver<CUresult (*)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t)>("cuMemSetAccess");
  auto unmap = driver<CUresult (*)(CUdeviceptr, size_t)>("cuMemUnmap");
  auto release = driver<CUresult (*)(CUmemGenericAllocationHandle)>("cuMemRelease");
  auto address_free = driver<CUresult (*)(CUdeviceptr, size_t)>("cuMemAddressFree");
  ASSERT_TRUE(granularity_of && reserve && create && map && set_access && unmap && release && address_free);
  CUDA_OK(cudaFree(nullptr)); // device 0's context
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = 0;
  size_t piece = 0;
  ASSERT_EQ(granularity_of(&piece, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), CUDA_SUCCESS);
  CUdeviceptr base = 0;
  CUmemGenericAllocationHandle pieces[2];
  ASSERT_EQ(reserve(&base, 4 * piece, 0, 0, 0), CUDA_SUCCESS);
  for (int i = 0; i < 2; i++) {
    ASSERT_EQ(create(&pieces[i], piece, &prop, 0), CUDA_SUCCESS);
    ASSERT_EQ(map(base + i * piece, piece, 0, pieces[i], 0), CUDA_SUCCESS);
  }
  CUmemAccessDesc access = {};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  ASSERT_EQ(set_access(base, 2 * piece, &access, 1), CUDA_SUCCESS);
  CUDA_OK(cudaMemset(reinterpret_cast<void *>(base), 0, 2 * piece));
  const int64_t elems = (int64_t)(piece / sizeof(float));
  {
    Handle h = make_handle(cuda_config(cpu_config()));
    int64_t shape[1] = {elems};
    ASSERT_EQ(polyak_add(h.get(), "across", reinterpret_cast<float *>(base) + elems / 2, POLYAK_F32, 1, shape),
              POLYAK_OK);
    ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
    ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(h.get());
    CUDA_OK(cudaDeviceSynchronize());
  }
  {
    Handle h = make_handle(cuda_config(cpu_config()));
    int64_t shape[1] = {elems};
    ASSERT_EQ(
        polyak_add(h.get(), "into_unmapped", reinterpret_cast<float *>(base) + elems + elems / 2, POLYAK_F32, 1, shape),
        POLYAK_OK);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
    EXPECT_NE(std::string(polyak_last_error(h.get())).find("unmapped"), std::string::npos)
        << polyak_last_error(h.get());
  }
  for (int i = 0; i < 2; i++) {
    EXPECT_EQ(unmap(base + i * piece, piece), CUDA_SUCCESS);
    EXPECT_EQ(release(pieces[i]), CUDA_SUCCESS);
  }
  EXPECT_EQ(address_free(base, 4 * piece), CUDA_SUCCESS);
}

} // namespace
