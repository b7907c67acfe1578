// test_evaluation.cpp: evaluating with an average and returning exactly:
// polyak_copy_to_params, polyak_store, polyak_restore.
#include "test_util.h"

using namespace polyak_test;

namespace {

struct Trained {
  std::vector<Tensor> tensors;
  Handle h;
  explicit Trained(int zero_init = 0)
  {
    tensors.emplace_back("w", POLYAK_BF16, 65537, 2);
    tensors.emplace_back("b", POLYAK_F32, 7);
    tensors.emplace_back("s", POLYAK_F16, 1003, 6);
    polyak_config cfg = cpu_config(2, 0.9);
    cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
    cfg.zero_init = zero_init;
    h = make_handle(cfg);
    std::mt19937_64 rng(60);
    for (auto &t : tensors)
      t.randomize(rng);
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  }
  void train(int64_t steps)
  {
    std::mt19937_64 rng(61);
    for (int64_t s = 1; s <= steps; s++) {
      for (auto &t : tensors)
        t.randomize(rng, 1.0f);
      ASSERT_EQ(polyak_update(h.get(), s, nullptr), POLYAK_OK);
    }
  }
  std::vector<std::vector<char>> param_bytes() const
  {
    std::vector<std::vector<char>> all;
    for (auto &t : tensors) {
      const char *p = static_cast<const char *>(t.data());
      all.emplace_back(p, p + t.num_elems * dtype_bytes(t.dtype));
    }
    return all;
  }
};

TEST(Evaluation, CopyToParamsWritesTheDebiasedShadowInEachParamDtype)
{
  for (int zero_init : {0, 1}) {
    Trained m(zero_init);
    m.train(5);
    for (int k = 0; k < 2; k++) {
      std::vector<std::vector<float>> shadows;
      for (size_t i = 0; i < m.tensors.size(); i++)
        shadows.push_back(read_shadow(m.h.get(), k, (int)i, m.tensors[i].num_elems));
      ASSERT_EQ(polyak_copy_to_params(m.h.get(), k, nullptr), POLYAK_OK);
      for (size_t i = 0; i < m.tensors.size(); i++) {
        std::vector<char> want(m.tensors[i].num_elems * dtype_bytes(m.tensors[i].dtype));
        for (int64_t e = 0; e < m.tensors[i].num_elems; e++)
          store_as(m.tensors[i].dtype, want.data(), e, shadows[i][e]); // round to nearest even
        EXPECT_EQ(0, std::memcmp(want.data(), m.tensors[i].data(), want.size()))
            << "shadow " << k << " tensor " << m.tensors[i].name;
      }
    }
  }
}

TEST(Evaluation, StoreCopyRestoreReturnsTheExactTrainingWeights)
{
  Trained m;
  m.train(3);
  m.tensors[1].set(2, polyak_f32_from_bits(0x7FC01234)); // a NaN payload survives too
  auto before = m.param_bytes();
  ASSERT_EQ(polyak_store(m.h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(m.h.get(), 1, nullptr), POLYAK_OK);
  EXPECT_NE(m.param_bytes(), before);
  ASSERT_EQ(polyak_restore(m.h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(m.param_bytes(), before);
  // the copy stays: evaluate again and restore again
  ASSERT_EQ(polyak_copy_to_params(m.h.get(), 0, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_restore(m.h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(m.param_bytes(), before);
}

TEST(Evaluation, ASecondStoreWaitsForTheRestoreThenReplacesTheCopy)
{
  Trained m;
  m.train(2);
  auto trained = m.param_bytes();
  ASSERT_EQ(polyak_store(m.h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(m.h.get(), 0, nullptr), POLYAK_OK);
  // storing now would keep the average in place of the trained weights
  EXPECT_EQ(polyak_store(m.h.get(), nullptr), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(m.h.get()), "pending")) << polyak_last_error(m.h.get());
  ASSERT_EQ(polyak_restore(m.h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(m.param_bytes(), trained);
  std::mt19937_64 rng(62); // the optimizer moves the params on
  for (auto &t : m.tensors)
    t.randomize(rng);
  auto now = m.param_bytes();
  ASSERT_EQ(polyak_store(m.h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(m.h.get(), 0, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_restore(m.h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(m.param_bytes(), now);
}

TEST(Evaluation, WhileAStoreIsPendingNothingFoldsTheParams)
{
  Trained m;
  m.train(3);
  ASSERT_EQ(polyak_store(m.h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(m.h.get(), 1, nullptr), POLYAK_OK); // evaluate with the SWA mean
  auto evaluated = m.param_bytes();
  Snapshot shadows = snapshot(m.h.get(), 2, m.tensors);
  // forgetting polyak_restore: the update would fold the average into itself
  EXPECT_EQ(polyak_update(m.h.get(), 4, nullptr), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(m.h.get()), "polyak_restore")) << polyak_last_error(m.h.get());
  EXPECT_EQ(polyak_hard_update(m.h.get(), 0, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_graph_reserve(m.h.get(), 4, 2, nullptr), POLYAK_ERR_STATE);
  EXPECT_TRUE(snapshot(m.h.get(), 2, m.tensors) == shadows);
  EXPECT_EQ(m.param_bytes(), evaluated);
  int64_t step = -1;
  ASSERT_EQ(polyak_get_step(m.h.get(), &step), POLYAK_OK);
  EXPECT_EQ(step, 3);
  ASSERT_EQ(polyak_restore(m.h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_update(m.h.get(), 4, nullptr), POLYAK_OK) << polyak_last_error(m.h.get());
}

TEST(Evaluation, DiscardingTheStoreGoesOnFromTheParamsAsTheyAre)
{
  Trained m;
  m.train(3);
  ASSERT_EQ(polyak_store(m.h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(m.h.get(), 0, nullptr), POLYAK_OK); // continue from the EMA, on purpose
  auto averaged = m.param_bytes();
  ASSERT_EQ(polyak_discard_store(m.h.get()), POLYAK_OK);
  EXPECT_EQ(polyak_restore(m.h.get(), nullptr), POLYAK_ERR_STATE) << "the copy is gone";
  EXPECT_EQ(polyak_discard_store(m.h.get()), POLYAK_ERR_STATE) << "nothing to discard";
  EXPECT_EQ(m.param_bytes(), averaged);
  EXPECT_EQ(polyak_update(m.h.get(), 4, nullptr), POLYAK_OK) << polyak_last_error(m.h.get());
  EXPECT_EQ(polyak_discard_store(nullptr), POLYAK_ERR_INVALID_ARG);
}

TEST(Evaluation, MisuseIsRefusedAndChangesNothing)
{
  Trained m(1);
  auto params = m.param_bytes();
  EXPECT_EQ(polyak_restore(m.h.get(), nullptr), POLYAK_ERR_STATE) << "nothing stored";
  EXPECT_EQ(polyak_copy_to_params(m.h.get(), 0, nullptr), POLYAK_ERR_STATE) << "zero_init, no update";
  EXPECT_EQ(m.param_bytes(), params);
  m.train(1);
  params = m.param_bytes();
  Snapshot shadows = snapshot(m.h.get(), 2, m.tensors);
  EXPECT_EQ(polyak_copy_to_params(m.h.get(), 2, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_copy_to_params(m.h.get(), -1, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_copy_to_params(nullptr, 0, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_store(nullptr, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_restore(nullptr, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(m.param_bytes(), params);
  EXPECT_TRUE(snapshot(m.h.get(), 2, m.tensors) == shadows);
  Handle fresh = make_handle(cpu_config());
  EXPECT_EQ(polyak_store(fresh.get(), nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_copy_to_params(fresh.get(), 0, nullptr), POLYAK_ERR_STATE);
}

} // namespace
