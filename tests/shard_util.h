// shard_util.h: what the checkpoint-shard tests share: a model with odd
// sizes, two kinds of copy-only buffers and three shadows, run by an
// unsharded handle (the oracle) and by W rank handles (world_size W, no
// communicator) over the same params, and the comparisons between them.
#ifndef POLYAK_TEST_SHARD_UTIL_H
#define POLYAK_TEST_SHARD_UTIL_H

#include "test_util.h"

#include <sys/stat.h>
#include <unistd.h>

#include <functional>

#include "polyak_internal.h"

namespace polyak_test {

struct ShardModel {
  polyak_dtype shadow_dtype;
  int zero_init;
  uint64_t params_seed;    // another run: other params
  int64_t block_bytes = 0; // polyak_save_shards' blocks (0: 4 MiB)
  std::vector<int64_t> sizes = {0, 1, 3, 65537, 130001, 5, 7, 0};
  std::vector<Tensor> tensors;
  std::vector<int64_t> counter = {0}; // copy-only I64, a BatchNorm's num_batches_tracked
  std::vector<float> running_var = {1, 1, 1};
  Handle whole;
  std::vector<Handle> ranks;

  ShardModel(int world_size, polyak_dtype dtype = POLYAK_F32, int zero = 0, uint64_t seed = 70)
      : shadow_dtype(dtype), zero_init(zero), params_seed(seed)
  {
    const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16};
    for (size_t i = 0; i < sizes.size(); i++)
      tensors.emplace_back("layer" + std::to_string(i) + ".weight", dtypes[i % 3], sizes[i], i % 3 == 0 ? 4 : 6);
    std::mt19937_64 rng(seed);
    for (auto &t : tensors)
      t.randomize(rng);
    whole = make(1, 0);
    for (int r = 0; r < world_size; r++)
      ranks.push_back(make(world_size, r));
  }
  polyak_config config(int world_size, int rank) const
  {
    polyak_config cfg = cpu_config(3, 0.9);
    cfg.shadow_dtype = shadow_dtype;
    cfg.zero_init = zero_init;
    cfg.seed = 31;
    cfg.shadows[0].rounding = shadow_dtype == POLYAK_F32 ? POLYAK_ROUND_STOCHASTIC : POLYAK_ROUND_NEAREST;
    cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
    cfg.shadows[1].schedule.beta = 0.999;
    cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
    cfg.world_size = world_size;
    cfg.rank = rank;
    return cfg;
  }
  // A finalized handle of rank `rank` of world_size over the same params.
  Handle make(int world_size, int rank)
  {
    Handle h = make_handle(config(world_size, rank));
    for (size_t i = 0; i < tensors.size(); i++) {
      int64_t shape[2] = {i % 2 ? 1 : tensors[i].num_elems, tensors[i].num_elems};
      EXPECT_EQ(polyak_add(h.get(), tensors[i].name.c_str(), tensors[i].data(), tensors[i].dtype, i % 2 ? 2 : 1, shape),
                POLYAK_OK);
    }
    EXPECT_EQ(polyak_add_copy(h.get(), "bn.num_batches_tracked", counter.data(), POLYAK_I64, 0, nullptr), POLYAK_OK);
    int64_t var_shape[1] = {3};
    EXPECT_EQ(polyak_add_copy(h.get(), "bn.running_var", running_var.data(), POLYAK_F32, 1, var_shape), POLYAK_OK);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
    h->shard_block_bytes = block_bytes;
    return h;
  }
  int num_tensors() const
  {
    return (int)tensors.size() + 2;
  }
  // New params (random, never all zero; a NaN at step 5) and one update of `handles`.
  void step(int64_t step, std::vector<polyak_t *> handles)
  {
    std::mt19937_64 rng(params_seed * 1000 + (uint64_t)step);
    for (auto &t : tensors)
      t.randomize(rng, 0.5f);
    if (step == 5)
      tensors[4].set(77, NAN);
    counter[0] = step;
    for (float &v : running_var)
      v = std::uniform_real_distribution<float>(0.5f, 2.0f)(rng);
    for (polyak_t *h : handles)
      ASSERT_EQ(polyak_update(h, step, nullptr), POLYAK_OK) << polyak_last_error(h);
  }
  // The oracle and the ranks, one step.
  void step(int64_t s)
  {
    std::vector<polyak_t *> all = {whole.get()};
    for (auto &h : ranks)
      all.push_back(h.get());
    step(s, all);
  }
  void save_all(const std::string &dir)
  {
    for (auto &h : ranks)
      ASSERT_EQ(polyak_save_shards(h.get(), dir.c_str()), POLYAK_OK) << polyak_last_error(h.get());
  }
};

// Everything a rank's handle holds, as bits: its slice of every shadow,
// the copy-only mirrors, the step, the non-finite count.
struct RankState {
  std::vector<std::vector<uint32_t>> bits;
  std::vector<std::vector<char>> copies;
  int64_t step = -1, nonfinite = -1;
  bool operator==(const RankState &o) const
  {
    return bits == o.bits && copies == o.copies && step == o.step && nonfinite == o.nonfinite;
  }
};

inline RankState rank_state(polyak_t *p)
{
  RankState s;
  int num_tensors = 0;
  polyak_get_step(p, &s.step);
  polyak_num_tensors(p, &num_tensors);
  EXPECT_EQ(polyak_nonfinite_count(p, &s.nonfinite), POLYAK_OK) << polyak_last_error(p);
  for (int i = 0; i < num_tensors; i++) {
    polyak_tensor_info_t info;
    EXPECT_EQ(polyak_tensor_info(p, i, &info), POLYAK_OK);
    if (info.flags & POLYAK_TENSOR_COPY) {
      std::vector<char> raw(info.num_elems * 8 + 8);
      EXPECT_EQ(polyak_get_shadow(p, 0, i, raw.data(), info.dtype, nullptr), POLYAK_OK) << polyak_last_error(p);
      s.copies.push_back(raw);
      continue;
    }
    for (int k = 0; k < p->cfg.num_shadows; k++) {
      std::vector<float> values(info.local_num_elems + 1);
      EXPECT_EQ(polyak_get_local_shadow(p, k, i, values.data(), POLYAK_F32, nullptr), POLYAK_OK)
          << polyak_last_error(p);
      std::vector<uint32_t> bits(info.local_num_elems);
      for (int64_t e = 0; e < info.local_num_elems; e++)
        bits[e] = float_bits(values[e]);
      s.bits.push_back(bits);
    }
  }
  return s;
}

// The ranks together hold what the unsharded handle holds, bit for bit:
// every element of every shadow kept by exactly one rank, debiased read-outs
// equal, the copies, the step, the non-finite counts' sum.
inline void expect_same_as(polyak_t *whole, const std::vector<polyak_t *> &ranks, const std::string &what)
{
  int num_tensors = 0;
  polyak_num_tensors(whole, &num_tensors);
  int64_t sum = 0, count = 0, whole_step = 0;
  for (polyak_t *h : ranks) {
    int64_t step = 0;
    ASSERT_EQ(polyak_nonfinite_count(h, &count), POLYAK_OK) << polyak_last_error(h);
    polyak_get_step(h, &step);
    polyak_get_step(whole, &whole_step);
    ASSERT_EQ(step, whole_step) << what;
    sum += count;
  }
  ASSERT_EQ(polyak_nonfinite_count(whole, &count), POLYAK_OK);
  EXPECT_EQ(sum, count) << what << ": the non-finite counts";
  for (int i = 0; i < num_tensors; i++) {
    polyak_tensor_info_t info;
    ASSERT_EQ(polyak_tensor_info(whole, i, &info), POLYAK_OK);
    for (int k = 0; k < whole->cfg.num_shadows; k++) {
      std::vector<uint64_t> want(info.num_elems + 1), got(info.num_elems + 1, ~0ull);
      ASSERT_EQ(polyak_get_shadow(whole, k, i, want.data(), info.shadow_dtype, nullptr), POLYAK_OK);
      if (info.flags & POLYAK_TENSOR_COPY) { // whole on every rank
        for (polyak_t *h : ranks) {
          std::fill(got.begin(), got.end(), ~0ull);
          ASSERT_EQ(polyak_get_shadow(h, k, i, got.data(), info.dtype, nullptr), POLYAK_OK);
          ASSERT_EQ(0, std::memcmp(got.data(), want.data(), info.num_elems * polyak_dtype_num_bytes(info.dtype)))
              << what << ": copy-only \"" << info.name << "\"";
        }
        continue;
      }
      size_t elem = polyak_dtype_num_bytes(info.shadow_dtype);
      std::vector<int> owners(info.num_elems, 0);
      for (polyak_t *h : ranks) {
        int64_t first = 0, num = 0;
        ASSERT_EQ(polyak_local_range(h, i, &first, &num), POLYAK_OK);
        ASSERT_EQ(polyak_get_local_shadow(h, k, i, (char *)got.data() + first * elem, info.shadow_dtype, nullptr),
                  POLYAK_OK)
            << polyak_last_error(h);
        for (int64_t e = first; e < first + num; e++)
          owners[e]++;
      }
      for (int64_t e = 0; e < info.num_elems; e++)
        ASSERT_EQ(owners[e], 1) << what << ": element " << e << " of \"" << info.name << "\"";
      ASSERT_EQ(0, std::memcmp(got.data(), want.data(), info.num_elems * elem))
          << what << ": shadow " << k << " of \"" << info.name << "\"";
    }
  }
}

inline std::vector<polyak_t *> pointers(const std::vector<Handle> &handles)
{
  std::vector<polyak_t *> out;
  for (auto &h : handles)
    out.push_back(h.get());
  return out;
}

// The shard files in dir (names only), sorted.
inline std::vector<std::string> shard_files(const TempDir &dir)
{
  std::vector<std::string> out;
  for (const auto &name : dir.entries())
    if (name.rfind("polyak-step", 0) == 0)
      out.push_back(name);
  return out;
}

// The file of rank r in dir (the one set there).
inline std::string rank_file(const TempDir &dir, int rank, int world_size)
{
  std::string suffix = "-rank" + std::to_string(rank) + "-of" + std::to_string(world_size) + ".safetensors";
  for (const auto &name : shard_files(dir))
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
      return dir.file(name);
  ADD_FAILURE() << "no file of rank " << rank << " of " << world_size << " in " << dir.path;
  return "";
}

} // namespace polyak_test

#endif // POLYAK_TEST_SHARD_UTIL_H
