// test_validation.cpp: every bad input is refused with a status and a
// message, and leaves the handle exactly as it was.
#include "test_util.h"

using namespace polyak_test;

namespace {

// A finalized two-tensor handle after two updates, and its snapshot.
struct Live {
  std::vector<Tensor> tensors;
  Handle h;
  Snapshot before;

  explicit Live(int num_shadows = 2)
  {
    tensors.emplace_back("a", POLYAK_F32, 65537);
    tensors.emplace_back("b", POLYAK_BF16, 3);
    std::mt19937_64 rng(50);
    for (auto &t : tensors)
      t.randomize(rng);
    h = make_handle(cpu_config(num_shadows));
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    EXPECT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK);
    for (auto &t : tensors)
      t.randomize(rng);
    EXPECT_EQ(polyak_update(h.get(), 4, nullptr), POLYAK_OK);
    before = snapshot(h.get(), num_shadows, tensors);
  }
  void expect_unchanged()
  {
    EXPECT_TRUE(snapshot(h.get(), 2, tensors) == before);
  }
  std::string error() const
  {
    return polyak_last_error(h.get());
  }
};

// A handle still registering, with one tensor.
struct Registering {
  std::vector<float> params = std::vector<float>(64, 1.0f);
  Handle h = make_handle(cpu_config());
  Registering()
  {
    int64_t shape[2] = {4, 4};
    EXPECT_EQ(polyak_add(h.get(), "first", params.data(), POLYAK_F32, 2, shape), POLYAK_OK);
  }
  int num_tensors() const
  {
    int n = -1;
    polyak_num_tensors(h.get(), &n);
    return n;
  }
  std::string error() const
  {
    return polyak_last_error(h.get());
  }
};

TEST(Status, NamesCoverEveryCode)
{
  EXPECT_STREQ(polyak_status_name(POLYAK_OK), "POLYAK_OK");
  EXPECT_STREQ(polyak_status_name(POLYAK_ERR_INVALID_ARG), "POLYAK_ERR_INVALID_ARG");
  EXPECT_STREQ(polyak_status_name(POLYAK_ERR_MISMATCH), "POLYAK_ERR_MISMATCH");
  for (int s = 0; s <= 9; s++)
    EXPECT_EQ(std::string(polyak_status_name((polyak_status)s)).rfind("POLYAK_", 0), 0u) << s;
  EXPECT_STREQ(polyak_status_name((polyak_status)10), "POLYAK_UNKNOWN_STATUS");
  EXPECT_STREQ(polyak_status_name((polyak_status)-1), "POLYAK_UNKNOWN_STATUS");
  // pinned values
  EXPECT_EQ(POLYAK_ERR_STATE, 2);
  EXPECT_EQ(POLYAK_ERR_CUDA, 5);
  EXPECT_EQ(POLYAK_ERR_FORMAT, 8);
}

TEST(Config, InitSetsTheDocumentedDefaults)
{
  polyak_config cfg;
  std::memset(&cfg, 0xAB, sizeof cfg);
  polyak_config_init(&cfg);
  EXPECT_EQ(cfg.struct_size, sizeof(polyak_config));
  EXPECT_EQ(cfg.magic, POLYAK_CONFIG_MAGIC);
  EXPECT_EQ(cfg.backend, POLYAK_BACKEND_CPU);
  EXPECT_EQ(cfg.num_shadows, 1);
  EXPECT_EQ(cfg.shadows[0].schedule.kind, POLYAK_SCHEDULE_CONSTANT);
  EXPECT_EQ(cfg.shadows[7].schedule.beta, 0.999);
  EXPECT_EQ(cfg.shadows[0].schedule.start_step, 0);
  EXPECT_EQ(cfg.shadow_dtype, POLYAK_F32);
  EXPECT_EQ(cfg.zero_init, 0);
  EXPECT_EQ(cfg.skip_nonfinite, 1);
  EXPECT_EQ(cfg.shadows[3].rounding, POLYAK_ROUND_NEAREST);
  EXPECT_EQ(cfg.shadows[3].count_updates, 0);
  EXPECT_EQ(cfg.shadows[3].grad_norm_c, 0.0);
  EXPECT_EQ(cfg.shadows[3].layerwise_beta0, 0.0);
  EXPECT_EQ(cfg.lookahead_every, 0);
  EXPECT_EQ(cfg.world_size, 1);
  EXPECT_EQ(cfg.cpu_threads, 1);
  EXPECT_EQ(cfg.shadow_location, POLYAK_SHADOWS_DEVICE);
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_OK);
  polyak_config_init(nullptr); // ignored
  EXPECT_STREQ(polyak_version_string(), POLYAK_VERSION_STRING);
  EXPECT_EQ(POLYAK_VERSION_MAJOR, 1);
}

TEST(Create, RefusesNullPointers)
{
  polyak_config cfg = cpu_config();
  EXPECT_EQ(polyak_create(nullptr, &cfg), POLYAK_ERR_INVALID_ARG);
  polyak_t *p = reinterpret_cast<polyak_t *>(0x1);
  EXPECT_EQ(polyak_create(&p, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(p, nullptr);
}

TEST(Create, RefusesAWrongStructSize)
{
  polyak_config cfg = cpu_config();
  for (size_t size : {size_t(0), POLYAK_CONFIG_SIZE_1_0 - 4, POLYAK_CONFIG_SIZE_1_0 + 8, sizeof(polyak_config) + 8,
                      offsetof(polyak_config, shadow_location)}) {
    cfg.struct_size = size;
    polyak_t *p = nullptr;
    EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_INVALID_ARG) << size;
    EXPECT_EQ(p, nullptr);
    char why[256];
    polyak_check_config(&cfg, why, sizeof why);
    EXPECT_TRUE(contains(why, "struct_size")) << why;
    EXPECT_TRUE(contains(why, "polyak_config_init")) << why;
  }
}

TEST(Create, TakesThe10StructSize)
{
  polyak_config cfg = cpu_config();
  EXPECT_EQ(cfg.struct_size, POLYAK_CONFIG_SIZE_1_0); // 1.0 ends at its last field: no tail padding
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_OK);
}

TEST(Create, RefusesAConfigThatInitDidNotFill)
{
  polyak_config cfg;
  std::memset(&cfg, 0, sizeof cfg); // zeroed, size set by hand: beta 0, no guard
  cfg.struct_size = sizeof cfg;
  cfg.num_shadows = 1;
  polyak_t *p = nullptr;
  EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_INVALID_ARG);
  char why[256];
  polyak_check_config(&cfg, why, sizeof why);
  EXPECT_TRUE(contains(why, "magic")) << why;
}

TEST(Create, ShadowLocationIsDeviceOrHost)
{
  polyak_config cfg = cpu_config();
  char why[256];
  cfg.shadow_location = POLYAK_SHADOWS_HOST; // the CPU backend's shadows are host memory anyway
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_OK) << why;
  cfg.shadow_location = 2;
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(why, "shadow_location = 2")) << why;
  cfg.shadow_location = POLYAK_SHADOWS_DEVICE;
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_OK) << why;
}

TEST(Create, RefusesNumShadowsOutside1To8)
{
  for (int k : {-1, 0, 9, 1000}) {
    polyak_config cfg = cpu_config();
    cfg.num_shadows = k;
    polyak_t *p = nullptr;
    EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_INVALID_ARG) << k;
    EXPECT_EQ(p, nullptr);
  }
  polyak_config cfg = cpu_config(8);
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_OK);
}

TEST(Create, RefusesUnknownEnumValues)
{
  polyak_config cfg = cpu_config();
  cfg.backend = (polyak_backend)2;
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_ERR_INVALID_ARG);
  cfg = cpu_config();
  cfg.shadow_dtype = (polyak_dtype)5;
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_ERR_INVALID_ARG);
  cfg.shadow_dtype = POLYAK_F16; // a real dtype, but not one shadows come in
  char why[256];
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(why, "shadow_dtype")) << why;
}

TEST(Create, RefusesFlagsOtherThanZeroOrOne)
{
  polyak_config cfg = cpu_config();
  cfg.zero_init = 2;
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_ERR_INVALID_ARG);
  cfg = cpu_config();
  cfg.skip_nonfinite = -1;
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_ERR_INVALID_ARG);
}

TEST(Create, RefusesRoundingModesOutsideTheTwo)
{
  for (int value : {-1, 2, 7}) {
    polyak_config cfg = cpu_config(3);
    cfg.shadows[0].rounding = POLYAK_ROUND_STOCHASTIC;
    cfg.shadows[2].rounding = value;
    char why[256];
    EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_INVALID_ARG) << value;
    EXPECT_TRUE(contains(why, "shadows[2].rounding")) << why;
    polyak_t *p = reinterpret_cast<polyak_t *>(0x1);
    EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_INVALID_ARG) << value;
    EXPECT_EQ(p, nullptr) << "nothing created";
  }
  polyak_config cfg = cpu_config(2);
  cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
  cfg.shadows[5].rounding = 9; // beyond num_shadows: never read, as the other per-shadow fields
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 0), POLYAK_OK);
}

TEST(Create, CudaBackendWithoutADeviceIsUnsupportedWithTheCause)
{
  if (polyak_backend_available(POLYAK_BACKEND_CUDA))
    GTEST_SKIP() << "a CUDA device is present; the GPU tests cover this backend";
  polyak_config cfg = cpu_config();
  cfg.backend = POLYAK_BACKEND_CUDA;
  polyak_t *p = nullptr;
  EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_UNSUPPORTED);
  EXPECT_EQ(p, nullptr);
  char why[512];
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_UNSUPPORTED);
  EXPECT_TRUE(contains(why, "CUDA")) << why;
  EXPECT_TRUE(polyak_backend_available(POLYAK_BACKEND_CPU));
  EXPECT_FALSE(polyak_backend_available((polyak_backend)9));
}

TEST(CheckConfig, TruncatesItsMessageSafely)
{
  polyak_config cfg = cpu_config();
  cfg.num_shadows = 0;
  char why[8];
  std::memset(why, 'x', sizeof why);
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(why[7], '\0');
  EXPECT_EQ(polyak_check_config(&cfg, nullptr, 100), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_check_config(nullptr, why, sizeof why), POLYAK_ERR_INVALID_ARG);
}

// ---- polyak_add ------------------------------------------------------------

TEST(Add, RefusesNullHandleNameAndParam)
{
  Registering r;
  int64_t shape[1] = {4};
  float other[4] = {1, 2, 3, 4};
  EXPECT_EQ(polyak_add(nullptr, "x", other, POLYAK_F32, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_add(r.h.get(), nullptr, other, POLYAK_F32, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "name is NULL")) << r.error();
  EXPECT_EQ(polyak_add(r.h.get(), "", other, POLYAK_F32, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "empty")) << r.error();
  EXPECT_EQ(polyak_add(r.h.get(), "x", nullptr, POLYAK_F32, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "param is NULL")) << r.error();
  EXPECT_EQ(r.num_tensors(), 1);
}

TEST(Add, RefusesUnknownDtypes)
{
  Registering r;
  int64_t shape[1] = {4};
  float other[4] = {};
  for (int d : {-1, 3, 100})
    EXPECT_EQ(polyak_add(r.h.get(), "x", other, (polyak_dtype)d, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "dtype")) << r.error();
  EXPECT_EQ(r.num_tensors(), 1);
}

TEST(Add, RefusesNdimOutside0To8)
{
  Registering r;
  int64_t shape[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  float other[1] = {1};
  EXPECT_EQ(polyak_add(r.h.get(), "x", other, POLYAK_F32, -1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_add(r.h.get(), "x", other, POLYAK_F32, 9, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "ndim = 9")) << r.error();
  EXPECT_EQ(r.num_tensors(), 1);
  EXPECT_EQ(polyak_add(r.h.get(), "eight", other, POLYAK_F32, 8, shape), POLYAK_OK);
  EXPECT_EQ(polyak_add(r.h.get(), "scalar", other + 1, POLYAK_F32, 0, nullptr), POLYAK_OK);
}

TEST(Add, RefusesNullShapesAndNegativeDims)
{
  Registering r;
  float other[4] = {};
  EXPECT_EQ(polyak_add(r.h.get(), "x", other, POLYAK_F32, 2, nullptr), POLYAK_ERR_INVALID_ARG);
  int64_t negative[3] = {2, -1, 0};
  EXPECT_EQ(polyak_add(r.h.get(), "x", other, POLYAK_F32, 3, negative), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "shape[1] = -1")) << r.error();
  EXPECT_EQ(r.num_tensors(), 1);
}

TEST(Add, RefusesShapesWhoseSizeOverflows)
{
  Registering r;
  float other[4] = {};
  int64_t huge[3] = {int64_t(1) << 31, int64_t(1) << 31, 4};
  EXPECT_EQ(polyak_add(r.h.get(), "x", other, POLYAK_F32, 3, huge), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "more than")) << r.error();
  EXPECT_EQ(r.num_tensors(), 1);
}

TEST(Add, RefusesDuplicateNames)
{
  Registering r;
  int64_t shape[1] = {4};
  float other[4] = {};
  EXPECT_EQ(polyak_add(r.h.get(), "first", other, POLYAK_F32, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "\"first\"")) << r.error();
  EXPECT_EQ(r.num_tensors(), 1);
  EXPECT_EQ(polyak_add(r.h.get(), "First", other, POLYAK_F32, 1, shape), POLYAK_OK);
}

TEST(Add, RefusesOverlappingParamMemory)
{
  Registering r; // "first" holds params[0..16)
  int64_t four[1] = {4};
  float *base = r.params.data();
  EXPECT_EQ(polyak_add(r.h.get(), "inside", base + 3, POLYAK_F32, 1, four), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "overlaps tensor 0 (\"first\")")) << r.error();
  EXPECT_EQ(polyak_add(r.h.get(), "straddle", base + 14, POLYAK_F32, 1, four), POLYAK_ERR_INVALID_ARG);
  int64_t all[1] = {64};
  EXPECT_EQ(polyak_add(r.h.get(), "around", base, POLYAK_F32, 1, all), POLYAK_ERR_INVALID_ARG);
  int64_t one[1] = {1};
  EXPECT_EQ(polyak_add(r.h.get(), "half_bf16", reinterpret_cast<char *>(base + 15) + 2, POLYAK_BF16, 1, one),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(r.num_tensors(), 1);
  EXPECT_EQ(polyak_add(r.h.get(), "adjacent", base + 16, POLYAK_F32, 1, four), POLYAK_OK);
  int64_t none[1] = {0};
  EXPECT_EQ(polyak_add(r.h.get(), "empty_inside", base + 2, POLYAK_F32, 1, none), POLYAK_OK);
}

TEST(Add, RefusesParamsMisalignedForTheirDtype)
{
  Registering r;
  int64_t shape[1] = {2};
  char *bytes = reinterpret_cast<char *>(r.params.data() + 32);
  EXPECT_EQ(polyak_add(r.h.get(), "f32_at_2", bytes + 2, POLYAK_F32, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(r.error(), "aligned")) << r.error();
  EXPECT_EQ(polyak_add(r.h.get(), "bf16_at_1", bytes + 1, POLYAK_BF16, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(r.num_tensors(), 1);
  EXPECT_EQ(polyak_add(r.h.get(), "bf16_at_2", bytes + 2, POLYAK_BF16, 1, shape), POLYAK_OK);
}

TEST(Add, AcceptsZeroSizeTensorsWithoutMemory)
{
  Registering r;
  int64_t shape[2] = {0, 7};
  EXPECT_EQ(polyak_add(r.h.get(), "empty", nullptr, POLYAK_BF16, 2, shape), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(r.h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_update(r.h.get(), 1, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_get_shadow(r.h.get(), 0, 1, nullptr, POLYAK_F32, nullptr), POLYAK_OK);
}

TEST(Add, AfterFinalizeIsAStateError)
{
  Live live;
  float other[4] = {};
  int64_t shape[1] = {4};
  EXPECT_EQ(polyak_add(live.h.get(), "late", other, POLYAK_F32, 1, shape), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(live.error(), "finalized")) << live.error();
  live.expect_unchanged();
}

// ---- lifecycle order ---------------------------------------------------------

TEST(Lifecycle, CallsBeforeFinalizeAreStateErrors)
{
  Registering r;
  float dst[16];
  int64_t count = 0;
  EXPECT_EQ(polyak_update(r.h.get(), 1, nullptr), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(r.error(), "polyak_finalize")) << r.error();
  EXPECT_EQ(polyak_get_shadow(r.h.get(), 0, 0, dst, POLYAK_F32, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_nonfinite_count(r.h.get(), &count), POLYAK_ERR_STATE);
  int64_t step = -1;
  EXPECT_EQ(polyak_get_step(r.h.get(), &step), POLYAK_OK);
  EXPECT_EQ(step, 0);
}

TEST(Lifecycle, FinalizeTwiceIsAStateError)
{
  Live live;
  EXPECT_EQ(polyak_finalize(live.h.get(), nullptr), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(live.error(), "already finalized")) << live.error();
  live.expect_unchanged();
}

TEST(Lifecycle, NullHandlesAreRefusedWithoutCrashing)
{
  int64_t value;
  float dst[1];
  EXPECT_EQ(polyak_finalize(nullptr, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_update(nullptr, 1, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_shadow(nullptr, 0, 0, dst, POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_nonfinite_count(nullptr, &value), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_get_step(nullptr, &value), POLYAK_ERR_INVALID_ARG);
  EXPECT_STREQ(polyak_last_error(nullptr), "");
  polyak_destroy(nullptr);
}

TEST(Lifecycle, LastErrorIsEmptyUntilAFailureAndNamesIt)
{
  Live live;
  EXPECT_STREQ(polyak_last_error(live.h.get()), "");
  EXPECT_EQ(polyak_update(live.h.get(), 4, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(live.error(), "polyak_update")) << live.error();
  EXPECT_TRUE(contains(live.error(), "step 4")) << live.error();
}

// ---- update and read-out ---------------------------------------------------------

TEST(Update, RefusesAStepThatDoesNotFollowTheLast)
{
  Live live; // last update at step 4
  for (int64_t step : {int64_t(4), int64_t(3), int64_t(1), int64_t(0), int64_t(-7), INT64_MIN}) {
    EXPECT_EQ(polyak_update(live.h.get(), step, nullptr), POLYAK_ERR_INVALID_ARG) << step;
    live.expect_unchanged();
  }
  EXPECT_EQ(polyak_update(live.h.get(), 5, nullptr), POLYAK_OK);
}

TEST(GetShadow, RefusesIndicesOutOfRange)
{
  Live live;
  std::vector<float> dst(65537);
  for (int k : {-1, 2, 8})
    EXPECT_EQ(polyak_get_shadow(live.h.get(), k, 0, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(live.error(), "shadow = 8")) << live.error();
  for (int t : {-1, 2, 1000})
    EXPECT_EQ(polyak_get_shadow(live.h.get(), 0, t, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(live.error(), "tensor = 1000")) << live.error();
  live.expect_unchanged();
}

TEST(GetShadow, RefusesNullMisalignedDstAndUnknownDtypes)
{
  Live live;
  std::vector<float> dst(65537);
  EXPECT_EQ(polyak_get_shadow(live.h.get(), 0, 0, nullptr, POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(live.error(), "dst is NULL")) << live.error();
  EXPECT_EQ(polyak_get_shadow(live.h.get(), 0, 0, dst.data(), (polyak_dtype)3, nullptr), POLYAK_ERR_INVALID_ARG);
  char *misaligned = reinterpret_cast<char *>(dst.data()) + 2;
  EXPECT_EQ(polyak_get_shadow(live.h.get(), 0, 0, misaligned, POLYAK_F32, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(live.error(), "aligned")) << live.error();
  std::vector<uint16_t> halves(3 + 1);
  EXPECT_EQ(polyak_get_shadow(live.h.get(), 0, 1, halves.data() + 1, POLYAK_BF16, nullptr), POLYAK_OK);
  live.expect_unchanged();
}

TEST(NonfiniteCount, RefusesANullCount)
{
  Live live;
  EXPECT_EQ(polyak_nonfinite_count(live.h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  live.expect_unchanged();
}

TEST(Getters, ANullOutputIsNamedNotLeftToAStaleMessage)
{
  Live live;
  EXPECT_EQ(polyak_update(live.h.get(), 4, nullptr), POLYAK_ERR_INVALID_ARG); // an earlier failure's text
  EXPECT_EQ(polyak_get_step(live.h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(live.error(), "polyak_get_step: step is NULL");
  EXPECT_EQ(polyak_update(live.h.get(), 4, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_num_tensors(live.h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(live.error(), "polyak_num_tensors: num_tensors is NULL");
  live.expect_unchanged();
}

TEST(Dtypes, ADtypeThatExistsButDoesNotFitIsCalledByItsName)
{
  // I8 is a polyak_dtype, just not one a shadow, an arena or an average's
  // read-out can be; 42 is none
  Registering r;
  int64_t shape[1] = {4};
  float param[4] = {1, 2, 3, 4};
  alignas(16) uint8_t shadow[16] = {};
  EXPECT_EQ(polyak_add_with_shadow(r.h.get(), "w", param, POLYAK_F32, 1, shape, shadow, POLYAK_I8, 0),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(r.error(), "polyak_add_with_shadow(\"w\"): shadow_dtype I8 is not a shadow dtype (F32, BF16 or F16)");
  EXPECT_EQ(polyak_add_with_shadow(r.h.get(), "w", param, POLYAK_F32, 1, shape, shadow, (polyak_dtype)42, 0),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(r.error(), "polyak_add_with_shadow(\"w\"): shadow_dtype = 42 is not a polyak_dtype");
  polyak_view view = {"v", 1, {16}};
  EXPECT_EQ(polyak_add_arena(r.h.get(), shadow, POLYAK_I8, 16, &view, 1), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(r.error(), "polyak_add_arena: dtype I8 is not F32, BF16 or F16, which arenas of averaged params hold");
  EXPECT_EQ(r.num_tensors(), 1);
  Live live;
  std::vector<int8_t> dst(65537);
  EXPECT_EQ(polyak_get_shadow(live.h.get(), 0, 0, dst.data(), POLYAK_I8, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(live.error(), "dst_dtype I8 is not one an average reads out as (F32, BF16, F16)"))
      << live.error();
  live.expect_unchanged();
}

TEST(Handles, TwoHandlesNeverInterfere)
{
  Live a, b;
  EXPECT_EQ(polyak_update(a.h.get(), 100, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_update(b.h.get(), 3, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_STREQ(polyak_last_error(a.h.get()), "");
  b.expect_unchanged();
}

} // namespace
