// test_owned.cpp: shadows in the caller's memory (polyak_add_with_shadow):
// the bits a library shadow of the same dtype would have, f16 stochastic
// rounding that keeps moving where rounding to nearest stalls, read-outs,
// hard updates, checkpoints that leave them out, and bad arguments.
#include "test_util.h"

using namespace polyak_test;

namespace {

// Params plus the caller's shadow of each, in a chosen dtype.
struct Model {
  std::vector<Tensor> params, shadows;
  Handle h;
  Model(const polyak_config &cfg, const std::vector<polyak_dtype> &shadow_dtypes, int flags = 0)
  {
    const int64_t sizes[] = {1001, 65537, 3, 0, 17};
    for (size_t i = 0; i < shadow_dtypes.size(); i++) {
      polyak_dtype param_dtype = (polyak_dtype)(i % 3);
      int64_t n = sizes[i % 5];
      params.emplace_back("t" + std::to_string(i), param_dtype, n, 2 * (i % 4) * dtype_bytes(param_dtype) % 16);
      shadows.emplace_back("s" + std::to_string(i), shadow_dtypes[i], n, dtype_bytes(shadow_dtypes[i]) * (i % 3));
    }
    std::mt19937_64 rng(23);
    for (auto &t : params)
      t.randomize(rng);
    for (auto &s : shadows)
      s.randomize(rng, 100.0f); // garbage: finalize overwrites it
    h = make_handle(cfg);
    for (size_t i = 0; i < params.size(); i++) {
      int64_t shape[1] = {params[i].num_elems};
      EXPECT_EQ(polyak_add_with_shadow(h.get(), params[i].name.c_str(), params[i].data(), params[i].dtype, 1, shape,
                                       shadows[i].data(), shadows[i].dtype, flags),
                POLYAK_OK)
          << polyak_last_error(h.get());
    }
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  void step(int64_t step)
  {
    std::mt19937_64 rng(900 + step);
    for (auto &t : params)
      t.randomize(rng, 0.5f, 2.0f);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
};

// The same params with library shadows of one dtype.
struct Reference {
  std::vector<Tensor> params;
  Handle h;
  Reference(polyak_config cfg, const Model &like, polyak_dtype shadow_dtype)
  {
    for (auto &t : like.params)
      params.emplace_back(t.name, t.dtype, t.num_elems, t.offset_bytes);
    std::mt19937_64 rng(23);
    for (auto &t : params)
      t.randomize(rng);
    cfg.shadow_dtype = shadow_dtype;
    h = make_handle(cfg);
    add_all(h.get(), params);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  }
  void step(int64_t step)
  {
    std::mt19937_64 rng(900 + step);
    for (auto &t : params)
      t.randomize(rng, 0.5f, 2.0f);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
  }
  std::vector<char> shadow(int i, polyak_dtype d)
  {
    std::vector<char> out(params[i].num_elems * dtype_bytes(d) + 4);
    EXPECT_EQ(polyak_get_shadow(h.get(), 0, i, out.data(), d, nullptr), POLYAK_OK);
    out.resize(params[i].num_elems * dtype_bytes(d));
    return out;
  }
};

std::vector<char> bytes_of(const Tensor &t)
{
  const char *data = static_cast<const char *>(t.data());
  return std::vector<char>(data, data + t.num_elems * dtype_bytes(t.dtype));
}

TEST(Owned, ShadowsHaveTheBitsOfLibraryShadowsOfTheirDtype)
{
  // f32 shadows: the library's f32 lerp, or its stochastic rounding where
  // shadow 0 asks for it (unless the flag asks for nearest); bf16 ones: its
  // stochastic rounding
  struct {
    polyak_dtype dtype;
    int rounding, flags;
  } variants[] = {{POLYAK_F32, POLYAK_ROUND_NEAREST, 0},
                  {POLYAK_F32, POLYAK_ROUND_STOCHASTIC, 0},
                  {POLYAK_F32, POLYAK_ROUND_STOCHASTIC, POLYAK_SHADOW_ROUND_NEAREST},
                  {POLYAK_BF16, POLYAK_ROUND_NEAREST, 0}};
  for (auto v : variants) {
    polyak_dtype d = v.dtype;
    polyak_config cfg = cpu_config(1, 0.95);
    cfg.seed = 77;
    cfg.shadows[0].rounding = v.rounding;
    Model model(cfg, std::vector<polyak_dtype>(5, d), v.flags);
    cfg.shadows[0].rounding = v.flags ? POLYAK_ROUND_NEAREST : v.rounding;
    Reference reference(cfg, model, d);
    for (size_t i = 0; i < model.params.size(); i++)
      ASSERT_EQ(bytes_of(model.shadows[i]), reference.shadow((int)i, d)) << "finalize copies the params";
    for (int64_t step : {1, 2, 5, 6}) {
      model.step(step);
      reference.step(step);
    }
    for (size_t i = 0; i < model.params.size(); i++)
      EXPECT_EQ(bytes_of(model.shadows[i]), reference.shadow((int)i, d)) << model.params[i].name;
  }
}

TEST(Owned, F16ShadowsKeepMovingWhereRoundingToNearestStalls)
{
  // a shadow at 1 pulled toward 1.01 at beta 0.999: each step's change,
  // 1e-5, is a hundredth of an f16 ulp at 1 (2^-10)
  polyak_config cfg = cpu_config(1, 0.999);
  auto run = [&](int flags) {
    std::vector<float> param(65536, 1.0f);
    std::vector<uint16_t> shadow(65536);
    Handle h = make_handle(cfg);
    int64_t shape[1] = {65536};
    EXPECT_EQ(
        polyak_add_with_shadow(h.get(), "w", param.data(), POLYAK_F32, 1, shape, shadow.data(), POLYAK_F16, flags),
        POLYAK_OK);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    std::fill(param.begin(), param.end(), 1.01f);
    for (int64_t step = 1; step <= 200; step++)
      EXPECT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    double mean = 0;
    for (uint16_t s : shadow)
      mean += polyak_f16_to_f32(s) / 65536.0;
    return mean;
  };
  double want = 1.01 - (double)(1.01f - 1.0f) * std::pow(0.999, 200);
  EXPECT_EQ(run(POLYAK_SHADOW_ROUND_NEAREST), 1.0) << "stalled";
  EXPECT_NEAR(run(0), want, 0.02 * (want - 1.0)) << "stochastic rounding tracks the EMA";
}

TEST(Owned, ReadOutsBlendsAndCopyToParamsReadTheCallersShadow)
{
  polyak_config cfg = cpu_config(1, 0.9);
  Model model(cfg, {POLYAK_F16, POLYAK_F32, POLYAK_BF16});
  for (int64_t step : {1, 2})
    model.step(step);
  const double one = 1.0;
  for (size_t i = 0; i < model.params.size(); i++) {
    const Tensor &s = model.shadows[i];
    std::vector<float> read = read_shadow(model.h.get(), 0, (int)i, s.num_elems), blend(s.num_elems + 1);
    ASSERT_EQ(polyak_get_blend(model.h.get(), &one, 0, (int)i, blend.data(), POLYAK_F32, nullptr), POLYAK_OK);
    for (int64_t e = 0; e < s.num_elems; e++) {
      ASSERT_EQ(float_bits(read[e]), float_bits(s.get(e))) << i << " " << e;
      ASSERT_EQ(float_bits(blend[e]), float_bits(s.get(e))) << i << " " << e;
    }
  }
  ASSERT_EQ(polyak_copy_to_params(model.h.get(), 0, nullptr), POLYAK_OK);
  for (size_t i = 0; i < model.params.size(); i++)
    for (int64_t e = 0; e < model.params[i].num_elems; e++) {
      std::vector<char> want(4);
      store_as(model.params[i].dtype, want.data(), 0, model.shadows[i].get(e));
      ASSERT_EQ(model.params[i].get(e), load_as(model.params[i].dtype, want.data(), 0)) << i << " " << e;
    }
}

TEST(Owned, HardUpdateCopiesTheParamsAndZeroesTheProduct)
{
  polyak_config cfg = cpu_config(1, 0.99);
  Model model(cfg, {POLYAK_BF16, POLYAK_F16, POLYAK_F32, POLYAK_F32, POLYAK_F16});
  model.step(1);
  int64_t step_before = 0;
  ASSERT_EQ(polyak_get_step(model.h.get(), &step_before), POLYAK_OK);
  ASSERT_EQ(polyak_hard_update(model.h.get(), 0, nullptr), POLYAK_OK);
  for (size_t i = 0; i < model.params.size(); i++)
    for (int64_t e = 0; e < model.params[i].num_elems; e++) {
      std::vector<char> want(4);
      store_as(model.shadows[i].dtype, want.data(), 0, model.params[i].get(e)); // nearest even
      ASSERT_EQ(
          0, std::memcmp(static_cast<const char *>(model.shadows[i].data()) + e * dtype_bytes(model.shadows[i].dtype),
                         want.data(), dtype_bytes(model.shadows[i].dtype)))
          << i << " " << e;
    }
  double product = -1;
  ASSERT_EQ(polyak_get_beta_product(model.h.get(), 0, &product), POLYAK_OK);
  EXPECT_EQ(product, 0.0);
  int64_t step_after = 0;
  ASSERT_EQ(polyak_get_step(model.h.get(), &step_after), POLYAK_OK);
  EXPECT_EQ(step_after, step_before) << "the step stays";
  // a NaN param is refused with the guard on, nothing written
  auto kept = bytes_of(model.shadows[0]);
  model.params[0].set(5, NAN);
  EXPECT_EQ(polyak_hard_update(model.h.get(), 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(model.h.get()), "element 5")) << polyak_last_error(model.h.get());
  EXPECT_EQ(bytes_of(model.shadows[0]), kept);
  EXPECT_EQ(polyak_hard_update(model.h.get(), 1, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_hard_update(model.h.get(), -1, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_hard_update(nullptr, 0, nullptr), POLYAK_ERR_INVALID_ARG);
  ASSERT_EQ(polyak_graph_reserve(model.h.get(), 2, 2, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_hard_update(model.h.get(), 0, nullptr), POLYAK_ERR_STATE);
  ASSERT_EQ(polyak_graph_release(model.h.get(), nullptr), POLYAK_OK);
  Handle unfinalized = make_handle(cfg);
  EXPECT_EQ(polyak_hard_update(unfinalized.get(), 0, nullptr), POLYAK_ERR_STATE);
}

TEST(Owned, HardUpdateWorksOnLibraryShadowsToo)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.zero_init = 1;
  cfg.shadows[1].grad_norm_c = 0.5;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_BF16, 999, 2);
  std::mt19937_64 rng(8);
  tensors[0].randomize(rng);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  float norm = 2.0f;
  ASSERT_EQ(polyak_set_grad_norm(h.get(), &norm), POLYAK_OK);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK);
  tensors[0].randomize(rng);
  for (int k : {0, 1}) {
    ASSERT_EQ(polyak_hard_update(h.get(), k, nullptr), POLYAK_OK);
    auto got = read_shadow(h.get(), k, 0, 999); // the debias of a zero product is 1
    for (int64_t e = 0; e < 999; e++)
      ASSERT_EQ(got[e], tensors[0].get(e)) << k << " " << e;
    double product = -1;
    ASSERT_EQ(polyak_get_beta_product(h.get(), k, &product), POLYAK_OK);
    EXPECT_EQ(product, 0.0) << k;
  }
}

TEST(Owned, CheckpointsLeaveTheCallersShadowsOut)
{
  polyak_config cfg = cpu_config(1, 0.9);
  TempDir dir;
  Model model(cfg, {POLYAK_F32, POLYAK_BF16});
  model.step(1);
  ASSERT_EQ(polyak_save(model.h.get(), dir.file("owned").c_str()), POLYAK_OK) << polyak_last_error(model.h.get());
  Model other(cfg, {POLYAK_F32, POLYAK_BF16});
  auto kept = bytes_of(other.shadows[0]);
  ASSERT_EQ(polyak_load(other.h.get(), dir.file("owned").c_str()), POLYAK_OK) << polyak_last_error(other.h.get());
  int64_t step = 0;
  ASSERT_EQ(polyak_get_step(other.h.get(), &step), POLYAK_OK);
  EXPECT_EQ(step, 1);
  EXPECT_EQ(bytes_of(other.shadows[0]), kept) << "the caller's shadow is the caller's to load";

  // the same names with library shadows: neither file fits the other handle
  Reference library(cfg, model, POLYAK_F32);
  EXPECT_EQ(polyak_load(library.h.get(), dir.file("owned").c_str()), POLYAK_ERR_MISMATCH);
  ASSERT_EQ(polyak_save(library.h.get(), dir.file("library").c_str()), POLYAK_OK);
  EXPECT_EQ(polyak_load(other.h.get(), dir.file("library").c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(other.h.get()), "the caller's")) << polyak_last_error(other.h.get());
}

TEST(Owned, BadArgumentsAreRefusedAndChangeNothing)
{
  std::vector<float> param(64, 1.0f), other(64, 2.0f);
  std::vector<uint16_t> shadow(64);
  int64_t shape[1] = {64};
  struct Setup {
    const char *what;
    void (*set)(polyak_config &);
  } unsupported[] = {
      {"num_shadows", [](polyak_config &c) { c.num_shadows = 2; }},
      {"zero_init", [](polyak_config &c) { c.zero_init = 1; }},
      {"sharding", [](polyak_config &c) { c.world_size = 2; }},
      {"Lookahead", [](polyak_config &c) { c.lookahead_every = 3; }},
  };
  for (auto &u : unsupported) {
    polyak_config cfg = cpu_config(1);
    u.set(cfg);
    Handle h = make_handle(cfg);
    EXPECT_EQ(polyak_add_with_shadow(h.get(), "w", param.data(), POLYAK_F32, 1, shape, shadow.data(), POLYAK_BF16, 0),
              POLYAK_ERR_UNSUPPORTED)
        << u.what;
    EXPECT_TRUE(contains(polyak_last_error(h.get()), u.what)) << polyak_last_error(h.get());
  }

  Handle h = make_handle(cpu_config(1));
  ASSERT_EQ(polyak_add(h.get(), "other", other.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  char *raw = reinterpret_cast<char *>(shadow.data());
  struct Bad {
    const char *what;
    void *shadow;
    int dtype;
    int flags;
  } bad[] = {
      {"NULL", nullptr, POLYAK_BF16, 0},
      {"aligned", raw + 1, POLYAK_BF16, 0},
      {"dtype", shadow.data(), 7, 0},
      {"flags", shadow.data(), POLYAK_BF16, 4},
      {"own param", param.data() + 8, POLYAK_BF16, 0},
      {"overlaps tensor 0", other.data() + 60, POLYAK_F32, 0},
  };
  for (auto &b : bad) {
    EXPECT_EQ(polyak_add_with_shadow(h.get(), "w", param.data(), POLYAK_F32, 1, shape, b.shadow, (polyak_dtype)b.dtype,
                                     b.flags),
              POLYAK_ERR_INVALID_ARG)
        << b.what;
    EXPECT_TRUE(contains(polyak_last_error(h.get()), b.what)) << b.what << ": " << polyak_last_error(h.get());
  }
  int count = -1;
  ASSERT_EQ(polyak_num_tensors(h.get(), &count), POLYAK_OK);
  EXPECT_EQ(count, 1) << "nothing registered";
  ASSERT_EQ(polyak_add_with_shadow(h.get(), "w", param.data(), POLYAK_F32, 1, shape, shadow.data(), POLYAK_BF16, 0),
            POLYAK_OK);
  // a later param on an earlier tensor's shadow memory
  EXPECT_EQ(polyak_add(h.get(), "late", shadow.data() + 4, POLYAK_BF16, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "overlaps tensor 1")) << polyak_last_error(h.get());
}

} // namespace
