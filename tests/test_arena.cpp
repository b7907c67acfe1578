// test_arena.cpp: polyak_add_arena, the tensors of one allocation as C
// trainers keep them: registered only if the views tile the arena exactly,
// all or nothing, and then the same as registering each view by hand.
#include "test_util.h"

using namespace polyak_test;

namespace {

// GPT-2's parameter tensors as llm.c lays them out in params_memory
// (V = 50, C = 8, L = 2, maxT = 16: small, with the real shapes' ranks).
struct Gpt2Arena {
  std::vector<polyak_view> views;
  std::vector<std::string> names;
  int64_t num_elems = 0;
  Gpt2Arena()
  {
    const int64_t V = 50, C = 8, L = 2, T = 16;
    add("wte", {V, C});
    add("wpe", {T, C});
    add("ln1w", {L, C});
    add("ln1b", {L, C});
    add("qkvw", {L, 3 * C, C});
    add("qkvb", {L, 3 * C});
    add("attprojw", {L, C, C});
    add("attprojb", {L, C});
    add("ln2w", {L, C});
    add("ln2b", {L, C});
    add("fcw", {L, 4 * C, C});
    add("fcb", {L, 4 * C});
    add("fcprojw", {L, C, 4 * C});
    add("fcprojb", {L, C});
    add("lnfw", {C});
    add("lnfb", {C});
    for (size_t i = 0; i < views.size(); i++)
      views[i].name = names[i].c_str();
  }
  void add(const char *name, std::initializer_list<int64_t> shape)
  {
    polyak_view v{};
    v.ndim = (int)shape.size();
    int64_t count = 1;
    int d = 0;
    for (int64_t n : shape) {
      v.shape[d++] = n;
      count *= n;
    }
    names.emplace_back(name);
    views.push_back(v);
    num_elems += count;
  }
};

int num_tensors(polyak_t *p)
{
  int n = -1;
  EXPECT_EQ(polyak_num_tensors(p, &n), POLYAK_OK);
  return n;
}

TEST(Arena, TilingViewsAreTheTensorsPolyakAddWouldRegister)
{
  Gpt2Arena gpt2;
  Tensor arena("params_memory", POLYAK_F32, gpt2.num_elems);
  std::mt19937_64 rng(80);
  arena.randomize(rng);
  polyak_config cfg = cpu_config(2, 0.9);
  Handle whole = make_handle(cfg), by_hand = make_handle(cfg);
  ASSERT_EQ(polyak_add_arena(whole.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems, gpt2.views.data(),
                             (int)gpt2.views.size()),
            POLYAK_OK)
      << polyak_last_error(whole.get());
  ASSERT_EQ(num_tensors(whole.get()), 16);
  int64_t offset = 0;
  for (size_t i = 0; i < gpt2.views.size(); i++) {
    const polyak_view &v = gpt2.views[i];
    ASSERT_EQ(
        polyak_add(by_hand.get(), v.name, static_cast<float *>(arena.data()) + offset, POLYAK_F32, v.ndim, v.shape),
        POLYAK_OK);
    polyak_tensor_info_t info;
    ASSERT_EQ(polyak_tensor_info(whole.get(), (int)i, &info), POLYAK_OK);
    EXPECT_STREQ(info.name, v.name);
    EXPECT_EQ(info.ndim, v.ndim);
    EXPECT_EQ(0, std::memcmp(info.shape, v.shape, sizeof v.shape));
    offset += info.num_elems;
  }
  ASSERT_EQ(polyak_finalize(whole.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(by_hand.get(), nullptr), POLYAK_OK);
  std::vector<Tensor> views_as_tensors; // for the snapshots' element counts
  for (auto &v : gpt2.views) {
    int64_t count = 1;
    for (int d = 0; d < v.ndim; d++)
      count *= v.shape[d];
    views_as_tensors.emplace_back(v.name, POLYAK_F32, count);
  }
  for (int64_t step = 1; step <= 3; step++) {
    arena.randomize(rng);
    ASSERT_EQ(polyak_update(whole.get(), step, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_update(by_hand.get(), step, nullptr), POLYAK_OK);
  }
  EXPECT_TRUE(snapshot(whole.get(), 2, views_as_tensors) == snapshot(by_hand.get(), 2, views_as_tensors));
}

TEST(Arena, AShapeTooLargeIsNamedAndNothingIsRegistered)
{
  Gpt2Arena gpt2;
  Tensor arena("params_memory", POLYAK_F32, gpt2.num_elems);
  gpt2.views[4].shape[1] += 1; // qkvw one row too many
  Handle h = make_handle(cpu_config());
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems, gpt2.views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  std::string error = polyak_last_error(h.get());
  EXPECT_TRUE(contains(error, "view 14 (\"lnfw\")")) << "the first view past the end: " << error;
  EXPECT_TRUE(contains(error, "past the arena's")) << error;
  EXPECT_EQ(num_tensors(h.get()), 0);
  // the last view too large: it would read past the allocation
  Gpt2Arena last;
  last.views[15].shape[0] += 1;
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)last.num_elems, last.views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "view 15")) << polyak_last_error(h.get());
  EXPECT_EQ(num_tensors(h.get()), 0);
}

TEST(Arena, ElementsNoViewCoversAreRefused)
{
  Gpt2Arena gpt2;
  Tensor arena("params_memory", POLYAK_F32, gpt2.num_elems + 3);
  Handle h = make_handle(cpu_config());
  // a view too small: the views end 8 elements early
  std::vector<polyak_view> views = gpt2.views;
  views[0].shape[0] -= 1;
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems, views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  std::string error = polyak_last_error(h.get());
  EXPECT_TRUE(contains(error, "cover " + std::to_string(gpt2.num_elems - 8) + " of the arena's " +
                                  std::to_string(gpt2.num_elems)))
      << error;
  // a view missing
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems, gpt2.views.data(), 15),
            POLYAK_ERR_INVALID_ARG);
  // an arena larger than its views
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems + 3, gpt2.views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(num_tensors(h.get()), 0);
}

TEST(Arena, APerViewFailureUndoesTheViewsBeforeIt)
{
  Gpt2Arena gpt2;
  Tensor arena("params_memory", POLYAK_F32, gpt2.num_elems);
  Tensor other("other", POLYAK_F32, 5);
  Handle h = make_handle(cpu_config());
  int64_t five[1] = {5};
  ASSERT_EQ(polyak_add(h.get(), "other", other.data(), POLYAK_F32, 1, five), POLYAK_OK);
  std::vector<polyak_view> views = gpt2.views;
  views[9].name = "ln1b"; // a duplicate of view 3
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems, views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "\"ln1b\"")) << polyak_last_error(h.get());
  EXPECT_EQ(num_tensors(h.get()), 1) << "views 0..8 undone, the earlier tensor kept";
  views[9].name = "polyak.reserved";
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems, views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  views[9].name = nullptr;
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems, views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  // overlapping the earlier tensor's memory
  EXPECT_EQ(polyak_add_arena(h.get(), other.data(), POLYAK_F32, (size_t)gpt2.num_elems, gpt2.views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "overlaps")) << polyak_last_error(h.get());
  EXPECT_EQ(num_tensors(h.get()), 1);
  // after all that, the same names register fine: nothing was left behind
  ASSERT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_F32, (size_t)gpt2.num_elems, gpt2.views.data(), 16),
            POLYAK_OK)
      << polyak_last_error(h.get());
  EXPECT_EQ(num_tensors(h.get()), 17);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
}

TEST(Arena, BadArgumentsAreRefused)
{
  Gpt2Arena gpt2;
  Tensor arena("params_memory", POLYAK_BF16, gpt2.num_elems);
  Handle h = make_handle(cpu_config());
  size_t n = (size_t)gpt2.num_elems;
  EXPECT_EQ(polyak_add_arena(nullptr, arena.data(), POLYAK_BF16, n, gpt2.views.data(), 16), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), (polyak_dtype)7, n, gpt2.views.data(), 16), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_BF16, n, nullptr, 16), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_BF16, n, gpt2.views.data(), -1), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_BF16, SIZE_MAX, gpt2.views.data(), 16),
            POLYAK_ERR_INVALID_ARG);
  std::vector<polyak_view> views = gpt2.views;
  views[2].shape[1] = -8;
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_BF16, n, views.data(), 16), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "view 2 (\"ln1w\")")) << polyak_last_error(h.get());
  views = gpt2.views;
  views[2].ndim = POLYAK_MAX_NDIM + 1;
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_BF16, n, views.data(), 16), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(num_tensors(h.get()), 0);
  EXPECT_EQ(polyak_add_arena(h.get(), nullptr, POLYAK_BF16, 0, nullptr, 0), POLYAK_OK) << "nothing to register";
  ASSERT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_BF16, n, gpt2.views.data(), 16), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_add_arena(h.get(), arena.data(), POLYAK_BF16, n, gpt2.views.data(), 16), POLYAK_ERR_STATE);
}

} // namespace
