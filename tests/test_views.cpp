// test_views.cpp: the shadows in place (polyak_shadow_data) and the step
// state a caller sets after writing them there (polyak_begin_shadow_write,
// polyak_set_step_state): the addresses are what read-outs read and stay put
// through loads, a write then a step state continues as a load of the same
// state would, and a write left unfinished refuses updates and saves.
#include <cmath>

#include "test_util.h"

using namespace polyak_test;

namespace {

struct Registered {
  std::vector<Tensor> tensors;
  std::vector<int64_t> counter{3, -4};
  Handle h;
  explicit Registered(polyak_config cfg)
  {
    tensors.emplace_back("w", POLYAK_BF16, 37);
    tensors.emplace_back("b", POLYAK_F32, 5);
    h = make_handle(cfg);
    std::mt19937_64 rng(71);
    for (auto &t : tensors)
      t.randomize(rng);
    add_all(h.get(), tensors);
    const int64_t shape[1] = {2};
    EXPECT_EQ(polyak_add_copy(h.get(), "count", counter.data(), POLYAK_I64, 1, shape), POLYAK_OK);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  polyak_t *get()
  {
    return h.get();
  }
  void train(int64_t first, int64_t last)
  {
    std::mt19937_64 rng(first);
    for (int64_t step = first; step <= last; step++) {
      for (auto &t : tensors)
        t.randomize(rng);
      counter[0] = step;
      ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
    }
  }
};

polyak_config two_shadows()
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[1].count_updates = 1;
  return cfg;
}

} // namespace

TEST(ShadowViews, AddressHoldsWhatReadOutsGiveAndStaysThroughLoads)
{
  Registered r(two_shadows());
  r.train(1, 3);
  void *data = nullptr;
  polyak_dtype dtype;
  int64_t num_elems = -1;
  ASSERT_EQ(polyak_shadow_data(r.get(), 1, 0, &data, &dtype, &num_elems), POLYAK_OK);
  EXPECT_EQ(dtype, POLYAK_F32);
  EXPECT_EQ(num_elems, 37);
  std::vector<float> read = read_shadow(r.get(), 1, 0, 37);
  EXPECT_EQ(std::memcmp(read.data(), data, 37 * sizeof(float)), 0);
  void *mirror = nullptr;
  ASSERT_EQ(polyak_shadow_data(r.get(), 0, 2, &mirror, &dtype, &num_elems), POLYAK_OK);
  EXPECT_EQ(dtype, POLYAK_I64);
  EXPECT_EQ(num_elems, 2);
  EXPECT_EQ(static_cast<int64_t *>(mirror)[0], 3) << "the copy-only tensor's mirror as of the last update";

  std::vector<char> saved(1 << 16);
  size_t size = 0;
  ASSERT_EQ(polyak_save_to_memory(r.get(), saved.data(), saved.size(), &size), POLYAK_OK);
  r.train(4, 5);
  ASSERT_EQ(polyak_load_from_memory(r.get(), saved.data(), size), POLYAK_OK);
  void *again = nullptr;
  ASSERT_EQ(polyak_shadow_data(r.get(), 1, 0, &again, nullptr, nullptr), POLYAK_OK);
  EXPECT_EQ(again, data) << "a load copies into the shadows; they do not move";
  EXPECT_EQ(std::memcmp(read.data(), data, 37 * sizeof(float)), 0);
}

TEST(ShadowViews, RefusesBadIndicesAndUnfinalizedHandles)
{
  polyak_config cfg = cpu_config(2);
  Handle h = make_handle(cfg);
  void *data = nullptr;
  EXPECT_EQ(polyak_shadow_data(h.get(), 0, 0, &data, nullptr, nullptr), POLYAK_ERR_STATE);
  Registered r(two_shadows());
  EXPECT_EQ(polyak_shadow_data(r.get(), 2, 0, &data, nullptr, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_shadow_data(r.get(), 0, 3, &data, nullptr, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_shadow_data(r.get(), 1, 2, &data, nullptr, nullptr), POLYAK_ERR_INVALID_ARG)
      << "a copy-only tensor has one mirror";
  EXPECT_TRUE(contains(polyak_last_error(r.get()), "\"count\""));
  EXPECT_EQ(polyak_shadow_data(r.get(), 0, 0, nullptr, nullptr, nullptr), POLYAK_ERR_INVALID_ARG);
}

// Writing a saved state's shadows through the addresses and its step state
// through polyak_set_step_state continues as loading the checkpoint does.
TEST(ShadowViews, WriteThenStepStateContinuesAsALoad)
{
  Registered saved(two_shadows()), written(two_shadows()), loaded(two_shadows());
  saved.train(1, 4);
  polyak_step_state state;
  ASSERT_EQ(polyak_get_step_state(saved.get(), &state), POLYAK_OK);
  EXPECT_EQ(state.struct_size, sizeof state);
  EXPECT_EQ(state.step, 4);
  EXPECT_EQ(state.update_counts[1], 4);
  EXPECT_DOUBLE_EQ(state.beta_products[0], std::pow(0.9, 4));
  std::vector<char> checkpoint(1 << 16);
  size_t size = 0;
  ASSERT_EQ(polyak_save_to_memory(saved.get(), checkpoint.data(), checkpoint.size(), &size), POLYAK_OK);
  ASSERT_EQ(polyak_load_from_memory(loaded.get(), checkpoint.data(), size), POLYAK_OK);

  ASSERT_EQ(polyak_begin_shadow_write(written.get()), POLYAK_OK);
  for (int i = 0; i < 3; i++)
    for (int k = 0; k < (i == 2 ? 1 : 2); k++) {
      void *from = nullptr, *to = nullptr;
      polyak_dtype dtype;
      int64_t num_elems;
      ASSERT_EQ(polyak_shadow_data(saved.get(), k, i, &from, &dtype, &num_elems), POLYAK_OK);
      ASSERT_EQ(polyak_shadow_data(written.get(), k, i, &to, nullptr, nullptr), POLYAK_OK);
      std::memcpy(to, from, num_elems * (i == 2 ? 8 : 4));
    }
  ASSERT_EQ(polyak_set_step_state(written.get(), &state), POLYAK_OK) << polyak_last_error(written.get());
  int64_t step = 0;
  ASSERT_EQ(polyak_get_step(written.get(), &step), POLYAK_OK);
  EXPECT_EQ(step, 4);
  for (Registered *r : {&written, &loaded})
    r->train(5, 7);
  EXPECT_EQ(snapshot(written.get(), 2, written.tensors), snapshot(loaded.get(), 2, loaded.tensors));
}

TEST(ShadowViews, AnUnfinishedWriteRefusesUpdatesAndSavesUntilAStepStateOrALoad)
{
  Registered r(two_shadows());
  r.train(1, 2);
  polyak_step_state state;
  ASSERT_EQ(polyak_get_step_state(r.get(), &state), POLYAK_OK);
  std::vector<char> checkpoint(1 << 16);
  size_t size = 0;
  ASSERT_EQ(polyak_save_to_memory(r.get(), checkpoint.data(), checkpoint.size(), &size), POLYAK_OK);
  EXPECT_EQ(state.shadows_open, 0);
  ASSERT_EQ(polyak_begin_shadow_write(r.get()), POLYAK_OK);
  polyak_step_state open;
  ASSERT_EQ(polyak_get_step_state(r.get(), &open), POLYAK_OK);
  EXPECT_EQ(open.shadows_open, 1);
  EXPECT_EQ(polyak_update(r.get(), 3, nullptr), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(r.get()), "polyak_set_step_state"));
  EXPECT_EQ(polyak_hard_update(r.get(), 0, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_graph_reserve(r.get(), 3, 2, nullptr), POLYAK_ERR_STATE);
  std::vector<char> out(1 << 16);
  EXPECT_EQ(polyak_save_to_memory(r.get(), out.data(), out.size(), &size), POLYAK_ERR_STATE);

  // a bad step state is refused, names the field and changes nothing
  polyak_step_state bad = state;
  bad.beta_products[1] = 1.5;
  EXPECT_EQ(polyak_set_step_state(r.get(), &bad), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(r.get()), "beta_products[1]"));
  bad = state;
  bad.update_counts[0] = 3;
  EXPECT_EQ(polyak_set_step_state(r.get(), &bad), POLYAK_ERR_INVALID_ARG);
  bad = state;
  bad.step = -1;
  EXPECT_EQ(polyak_set_step_state(r.get(), &bad), POLYAK_ERR_INVALID_ARG);
  bad = state;
  bad.num_shadows = 1;
  EXPECT_EQ(polyak_set_step_state(r.get(), &bad), POLYAK_ERR_INVALID_ARG);
  bad = state;
  bad.struct_size = sizeof bad - 8;
  EXPECT_EQ(polyak_set_step_state(r.get(), &bad), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_update(r.get(), 3, nullptr), POLYAK_ERR_STATE) << "still open after the refusals";

  ASSERT_EQ(polyak_set_step_state(r.get(), &open), POLYAK_OK) << "shadows_open is read, not written";
  ASSERT_EQ(polyak_get_step_state(r.get(), &open), POLYAK_OK);
  EXPECT_EQ(open.shadows_open, 0);
  EXPECT_EQ(polyak_update(r.get(), 3, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_begin_shadow_write(r.get()), POLYAK_OK);
  ASSERT_EQ(polyak_load_from_memory(r.get(), checkpoint.data(), size), POLYAK_OK);
  EXPECT_EQ(polyak_update(r.get(), 3, nullptr), POLYAK_OK) << "a load ends the write too";
}

TEST(ShadowViews, AnUnfinishedWriteRefusesShardSavesAndAShardLoadEndsIt)
{
  Registered r(two_shadows());
  r.train(1, 2);
  TempDir dir;
  ASSERT_EQ(polyak_save_shards(r.get(), dir.path.c_str()), POLYAK_OK) << polyak_last_error(r.get());
  ASSERT_EQ(polyak_begin_shadow_write(r.get()), POLYAK_OK);
  std::set<std::string> before = dir.entries();
  EXPECT_EQ(polyak_save_shards(r.get(), dir.path.c_str()), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(r.get()), "polyak_begin_shadow_write"));
  EXPECT_EQ(dir.entries(), before) << "a refused save writes nothing";
  EXPECT_EQ(polyak_update(r.get(), 3, nullptr), POLYAK_ERR_STATE);
  ASSERT_EQ(polyak_load_shards(r.get(), dir.path.c_str()), POLYAK_OK) << polyak_last_error(r.get());
  polyak_step_state state;
  ASSERT_EQ(polyak_get_step_state(r.get(), &state), POLYAK_OK);
  EXPECT_EQ(state.shadows_open, 0);
  EXPECT_EQ(state.step, 2);
  EXPECT_EQ(polyak_update(r.get(), 3, nullptr), POLYAK_OK) << "a shard load ends the write too";
}

TEST(ShadowViews, ShardedHandlesGiveTheirPiece)
{
  polyak_config cfg = cpu_config(1);
  cfg.world_size = 2;
  cfg.rank = 1;
  Registered r(cfg);
  polyak_tensor_info_t info;
  ASSERT_EQ(polyak_tensor_info(r.get(), 0, &info), POLYAK_OK);
  void *data = nullptr;
  int64_t num_elems = -1;
  ASSERT_EQ(polyak_shadow_data(r.get(), 0, 0, &data, nullptr, &num_elems), POLYAK_OK);
  EXPECT_EQ(num_elems, info.local_num_elems);
  std::vector<float> local(num_elems + 1);
  ASSERT_EQ(polyak_get_local_shadow(r.get(), 0, 0, local.data(), POLYAK_F32, nullptr), POLYAK_OK);
  EXPECT_EQ(std::memcmp(local.data(), data, num_elems * sizeof(float)), 0);
}
