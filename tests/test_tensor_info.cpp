// test_tensor_info.cpp: what a caller can ask about its tensors
// (polyak_tensor_info, polyak_find_tensor) and read-outs that know the
// destination's size (the _n calls): a short buffer is refused with nothing
// written, and the messages say which index is which.
#include "test_util.h"

using namespace polyak_test;

namespace {

struct Registered {
  std::vector<Tensor> tensors;
  Handle h;
  explicit Registered(const polyak_config &cfg)
  {
    tensors.emplace_back("wte", POLYAK_BF16, 6 * 5, 2);
    tensors.emplace_back("ln.bias", POLYAK_F32, 7);
    tensors.emplace_back("empty", POLYAK_F16, 0);
    h = make_handle(cfg);
    std::mt19937_64 rng(70);
    for (auto &t : tensors)
      t.randomize(rng);
    const int64_t wte_shape[2] = {6, 5}, bias_shape[1] = {7}, empty_shape[3] = {2, 0, 3};
    EXPECT_EQ(polyak_add(h.get(), "wte", tensors[0].data(), POLYAK_BF16, 2, wte_shape), POLYAK_OK);
    EXPECT_EQ(polyak_add(h.get(), "ln.bias", tensors[1].data(), POLYAK_F32, 1, bias_shape), POLYAK_OK);
    EXPECT_EQ(polyak_add(h.get(), "empty", tensors[2].data(), POLYAK_F16, 3, empty_shape), POLYAK_OK);
  }
  polyak_t *get()
  {
    return h.get();
  }
  std::string error()
  {
    return polyak_last_error(h.get());
  }
};

TEST(TensorInfo, SaysWhatWasRegisteredBeforeAndAfterFinalize)
{
  Registered r(cpu_config(2));
  polyak_tensor_info_t info;
  ASSERT_EQ(polyak_tensor_info(r.get(), 0, &info), POLYAK_OK);
  EXPECT_STREQ(info.name, "wte");
  EXPECT_EQ(info.dtype, POLYAK_BF16);
  EXPECT_EQ(info.ndim, 2);
  EXPECT_EQ(info.shape[0], 6);
  EXPECT_EQ(info.shape[1], 5);
  EXPECT_EQ(info.shape[2], 0);
  EXPECT_EQ(info.num_elems, 30);
  EXPECT_EQ(info.shadow_dtype, POLYAK_F32);
  EXPECT_EQ(info.flags, 0);
  EXPECT_EQ(info.local_first_elem, -1) << "no slice before finalize";
  EXPECT_EQ(info.local_num_elems, -1);
  ASSERT_EQ(polyak_finalize(r.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_tensor_info(r.get(), 2, &info), POLYAK_OK);
  EXPECT_STREQ(info.name, "empty");
  EXPECT_EQ(info.num_elems, 0);
  EXPECT_EQ(info.local_first_elem, 0);
  EXPECT_EQ(info.local_num_elems, 0);
  ASSERT_EQ(polyak_tensor_info(r.get(), 1, &info), POLYAK_OK);
  EXPECT_EQ(info.local_num_elems, 7) << "unsharded: the whole tensor";
}

TEST(TensorInfo, FindTensorGivesTheNumberOfAName)
{
  Registered r(cpu_config());
  for (int i = 0; i < 3; i++) {
    int found = -1;
    ASSERT_EQ(polyak_find_tensor(r.get(), r.tensors[i].name.c_str(), &found), POLYAK_OK);
    EXPECT_EQ(found, i);
  }
  int found = 42;
  EXPECT_EQ(polyak_find_tensor(r.get(), "wpe", &found), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "\"wpe\"")) << r.error();
  EXPECT_EQ(found, 42) << "nothing written";
  EXPECT_EQ(polyak_find_tensor(r.get(), nullptr, &found), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_find_tensor(r.get(), "wte", nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_find_tensor(nullptr, "wte", &found), POLYAK_ERR_INVALID_ARG);
}

TEST(TensorInfo, ASlicedHandleSaysWhichElementsThisRankKeeps)
{
  polyak_config cfg = cpu_config();
  cfg.world_size = 3;
  int64_t covered = 0;
  for (int rank = 0; rank < 3; rank++) {
    cfg.rank = rank;
    Registered r(cfg);
    ASSERT_EQ(polyak_finalize(r.get(), nullptr), POLYAK_OK) << r.error();
    polyak_tensor_info_t info;
    ASSERT_EQ(polyak_tensor_info(r.get(), 0, &info), POLYAK_OK);
    int64_t first = -1, count = -1;
    ASSERT_EQ(polyak_local_range(r.get(), 0, &first, &count), POLYAK_OK);
    EXPECT_EQ(info.local_first_elem, first);
    EXPECT_EQ(info.local_num_elems, count);
    covered += count;
  }
  EXPECT_EQ(covered, 30) << "the ranks' slices cover the tensor";
}

TEST(TensorInfo, BadArgumentsAreRefused)
{
  Registered r(cpu_config());
  polyak_tensor_info_t info;
  std::memset(&info, 0x5a, sizeof info);
  for (int t : {-1, 3, 1000})
    EXPECT_EQ(polyak_tensor_info(r.get(), t, &info), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "tensor 1000 is outside 0..2")) << r.error();
  EXPECT_EQ(reinterpret_cast<unsigned char *>(&info)[0], 0x5a) << "nothing written";
  EXPECT_EQ(polyak_tensor_info(r.get(), 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_tensor_info(nullptr, 0, &info), POLYAK_ERR_INVALID_ARG);
}

// dst[0..fit) then canaries: a read-out into `given` bytes of it.
struct Canaried {
  std::vector<unsigned char> bytes;
  size_t fit;
  Canaried(size_t fit_bytes) : bytes(fit_bytes + 64, 0xcd), fit(fit_bytes)
  {
  }
  bool canaries_intact() const
  {
    return std::all_of(bytes.begin() + (long)fit, bytes.end(), [](unsigned char b) { return b == 0xcd; });
  }
  bool untouched() const
  {
    return std::all_of(bytes.begin(), bytes.end(), [](unsigned char b) { return b == 0xcd; });
  }
};

TEST(SizedReadOut, AShortBufferIsRefusedWithNothingWritten)
{
  Registered r(cpu_config(2));
  ASSERT_EQ(polyak_finalize(r.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(r.get(), 1, nullptr), POLYAK_OK);
  const double weights[2] = {0.5, 0.5};
  // "wte": 30 elements, 120 bytes as f32, 60 as bf16
  for (size_t short_bytes : {0, 8, 119}) {
    Canaried dst(short_bytes);
    EXPECT_EQ(polyak_get_shadow_n(r.get(), 1, 0, dst.bytes.data(), POLYAK_F32, short_bytes, nullptr),
              POLYAK_ERR_INVALID_ARG);
    EXPECT_EQ(polyak_get_local_shadow_n(r.get(), 1, 0, dst.bytes.data(), POLYAK_F32, short_bytes, nullptr),
              POLYAK_ERR_INVALID_ARG);
    EXPECT_EQ(polyak_get_blend_n(r.get(), weights, 0, 0, dst.bytes.data(), POLYAK_F32, short_bytes, nullptr),
              POLYAK_ERR_INVALID_ARG);
    EXPECT_TRUE(dst.untouched()) << short_bytes << " bytes";
  }
  Canaried dst(120);
  EXPECT_EQ(polyak_get_shadow_n(r.get(), 1, 0, dst.bytes.data(), POLYAK_F32, 119, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "holds 119 bytes")) << r.error();
  EXPECT_TRUE(contains(r.error(), "need 120")) << r.error();
  EXPECT_TRUE(contains(r.error(), "\"wte\"")) << r.error();
  // exactly the size, and a bf16 read-out in half of it
  ASSERT_EQ(polyak_get_shadow_n(r.get(), 1, 0, dst.bytes.data(), POLYAK_F32, 120, nullptr), POLYAK_OK);
  EXPECT_TRUE(dst.canaries_intact());
  std::vector<float> plain = read_shadow(r.get(), 1, 0, 30);
  EXPECT_EQ(0, std::memcmp(dst.bytes.data(), plain.data(), 120)) << "the same as polyak_get_shadow";
  Canaried half(60);
  ASSERT_EQ(polyak_get_blend_n(r.get(), weights, 0, 0, half.bytes.data(), POLYAK_BF16, 60, nullptr), POLYAK_OK);
  EXPECT_TRUE(half.canaries_intact());
  // an empty tensor needs no room, nor a dst
  EXPECT_EQ(polyak_get_shadow_n(r.get(), 0, 2, nullptr, POLYAK_F32, 0, nullptr), POLYAK_OK);
}

TEST(SizedReadOut, SwappedIndicesAreNamedInTheMessage)
{
  Registered r(cpu_config(2));
  ASSERT_EQ(polyak_finalize(r.get(), nullptr), POLYAK_OK);
  std::vector<float> dst(64);
  // tensor 2 given as the shadow, shadow 0 as the tensor
  EXPECT_EQ(polyak_get_shadow_n(r.get(), 2, 0, dst.data(), POLYAK_F32, dst.size() * 4, nullptr),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "polyak_get_shadow_n(shadow = 2, tensor = 0)")) << r.error();
  EXPECT_TRUE(contains(r.error(), "shadow 2 is outside 0..1")) << r.error();
  EXPECT_EQ(polyak_get_shadow(r.get(), 0, 3, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "tensor 3 is outside 0..2")) << r.error();
  EXPECT_TRUE(contains(r.error(), "the shadow comes first")) << r.error();
}

} // namespace
