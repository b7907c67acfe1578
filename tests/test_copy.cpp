// test_copy.cpp: copy-only tensors (polyak_add_copy): buffers of any dtype
// whose every shadow is one mirror of the param, set at finalize and at
// every update, written back by the evaluation calls, and leaving the
// averaged tensors' bits exactly as a handle without them has them.
#include "test_util.h"

using namespace polyak_test;

namespace {

// Raw bytes of any dtype, at an offset into an 8-byte aligned buffer.
struct Buffer {
  std::string name;
  polyak_dtype dtype;
  int64_t num_elems;
  size_t elem_bytes, offset;
  std::vector<uint64_t> storage;
  Buffer(std::string n, polyak_dtype d, size_t bytes_per_elem, int64_t count, size_t offset_bytes = 0)
      : name(std::move(n)), dtype(d), num_elems(count), elem_bytes(bytes_per_elem), offset(offset_bytes),
        storage((count * bytes_per_elem + offset_bytes) / 8 + 2)
  {
  }
  unsigned char *data()
  {
    return reinterpret_cast<unsigned char *>(storage.data()) + offset;
  }
  size_t num_bytes() const
  {
    return (size_t)num_elems * elem_bytes;
  }
  std::vector<unsigned char> bytes()
  {
    return std::vector<unsigned char>(data(), data() + num_bytes());
  }
  void randomize(std::mt19937_64 &rng)
  {
    for (size_t b = 0; b < num_bytes(); b++)
      data()[b] = (unsigned char)rng();
    if (dtype == POLYAK_BOOL)
      for (size_t b = 0; b < num_bytes(); b++)
        data()[b] &= 1;
  }
};

std::vector<Buffer> buffers()
{
  std::vector<Buffer> out;
  out.emplace_back("bn.num_batches_tracked", POLYAK_I64, 8, 1);
  out.emplace_back("bn.running_mean", POLYAK_F32, 4, 65537, 4); // misaligned: the byte path
  out.emplace_back("counts", POLYAK_I32, 4, 300001);            // more than one copy chunk
  out.emplace_back("mask", POLYAK_BOOL, 1, 13, 3);
  out.emplace_back("bytes", POLYAK_U8, 1, 0);
  out.emplace_back("stats64", POLYAK_F64, 8, 7);
  out.emplace_back("half", POLYAK_BF16, 2, 1001, 2);
  return out;
}

// Shadow k of copy-only tensor `tensor` read out of p (whole, or with
// polyak_get_local_shadow_n) in its dtype: `want`'s bytes.
void expect_copy(polyak_t *p, int tensor, const Buffer &c, int k, const std::vector<unsigned char> &want,
                 bool local = false)
{
  std::vector<unsigned char> got(c.num_bytes() + 8, 0xee);
  polyak_status status = local ? polyak_get_local_shadow_n(p, k, tensor, got.data(), c.dtype, got.size(), nullptr)
                               : polyak_get_shadow_n(p, k, tensor, got.data(), c.dtype, got.size(), nullptr);
  ASSERT_EQ(status, POLYAK_OK) << polyak_last_error(p);
  got.resize(c.num_bytes());
  EXPECT_EQ(got, want) << c.name << " shadow " << k;
}

polyak_config mixed_config()
{
  polyak_config cfg = cpu_config(3, 0.9);
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadow_dtype = POLYAK_BF16; // stochastic rounding: hashed by each element's flat index
  cfg.seed = 77;
  return cfg;
}

// The same averaged tensors in two handles, copy-only tensors in one.
struct WithCopies {
  std::vector<Tensor> tensors;
  std::vector<Buffer> copies = buffers();
  Handle with, without;
  explicit WithCopies(const polyak_config &cfg)
  {
    tensors.emplace_back("w", POLYAK_F32, 70001, 4);
    tensors.emplace_back("b", POLYAK_BF16, 33, 2);
    std::mt19937_64 rng(90);
    for (auto &t : tensors)
      t.randomize(rng);
    for (auto &c : copies)
      c.randomize(rng);
    with = make_handle(cfg);
    without = make_handle(cfg);
    // interleaved, so the copies sit between the averaged tensors' numbers
    int64_t shape[1];
    for (size_t i = 0; i < copies.size(); i++) {
      shape[0] = copies[i].num_elems;
      EXPECT_EQ(polyak_add_copy(with.get(), copies[i].name.c_str(), copies[i].data(), copies[i].dtype, 1, shape),
                POLYAK_OK)
          << polyak_last_error(with.get());
      if (i < tensors.size()) {
        shape[0] = tensors[i].num_elems;
        EXPECT_EQ(polyak_add(with.get(), tensors[i].name.c_str(), tensors[i].data(), tensors[i].dtype, 1, shape),
                  POLYAK_OK);
      }
    }
    add_all(without.get(), tensors);
  }
  void finalize()
  {
    ASSERT_EQ(polyak_finalize(with.get(), nullptr), POLYAK_OK) << polyak_last_error(with.get());
    ASSERT_EQ(polyak_finalize(without.get(), nullptr), POLYAK_OK);
  }
  void step(int64_t step, uint64_t seed)
  {
    std::mt19937_64 rng(seed);
    for (auto &t : tensors)
      t.randomize(rng);
    for (auto &c : copies)
      c.randomize(rng);
    ASSERT_EQ(polyak_update(with.get(), step, nullptr), POLYAK_OK) << polyak_last_error(with.get());
    ASSERT_EQ(polyak_update(without.get(), step, nullptr), POLYAK_OK);
  }
  int number(const std::string &name)
  {
    int tensor = -1;
    EXPECT_EQ(polyak_find_tensor(with.get(), name.c_str(), &tensor), POLYAK_OK);
    return tensor;
  }
  // Every shadow of every copy reads out as its param's bytes.
  void expect_mirrors()
  {
    for (auto &c : copies)
      for (int k = 0; k < 3; k++)
        expect_copy(with.get(), number(c.name), c, k, c.bytes());
  }
  // The averaged tensors have the bits of the handle without copies.
  void expect_averages_unchanged()
  {
    for (int k = 0; k < 3; k++)
      for (size_t i = 0; i < tensors.size(); i++) {
        std::vector<float> a(tensors[i].num_elems + 1), b(tensors[i].num_elems + 1);
        ASSERT_EQ(polyak_get_shadow(with.get(), k, number(tensors[i].name), a.data(), POLYAK_F32, nullptr), POLYAK_OK);
        ASSERT_EQ(polyak_get_shadow(without.get(), k, (int)i, b.data(), POLYAK_F32, nullptr), POLYAK_OK);
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), tensors[i].num_elems * 4)) << tensors[i].name << " shadow " << k;
      }
  }
};

TEST(CopyOnly, EveryShadowMirrorsTheParamAtEveryUpdate)
{
  WithCopies h(mixed_config());
  h.finalize();
  h.expect_mirrors(); // from finalize
  for (int64_t step : {1, 2, 5, 6}) {
    h.step(step, 100 + (uint64_t)step);
    h.expect_mirrors();
  }
  h.expect_averages_unchanged();
  polyak_tensor_info_t info;
  ASSERT_EQ(polyak_tensor_info(h.with.get(), h.number("counts"), &info), POLYAK_OK);
  EXPECT_EQ(info.flags, POLYAK_TENSOR_COPY);
  EXPECT_EQ(info.dtype, POLYAK_I32);
  EXPECT_EQ(info.shadow_dtype, POLYAK_I32) << "the mirror's dtype";
  EXPECT_EQ(info.local_num_elems, 300001);
  int64_t count = -1;
  ASSERT_EQ(polyak_nonfinite_count(h.with.get(), &count), POLYAK_OK);
  EXPECT_EQ(count, 0) << "copies are not averaged, so not counted";
}

TEST(CopyOnly, ReadOutsKeepTheDtypeOrConvertBetweenFloats)
{
  WithCopies h(mixed_config());
  h.finalize();
  std::vector<double> f64(8);
  EXPECT_EQ(polyak_get_shadow(h.with.get(), 0, h.number("bn.num_batches_tracked"), f64.data(), POLYAK_F32, nullptr),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(h.with.get()), "reads out as I64 only")) << polyak_last_error(h.with.get());
  EXPECT_EQ(polyak_get_shadow(h.with.get(), 0, h.number("stats64"), f64.data(), POLYAK_F64, nullptr), POLYAK_OK);
  EXPECT_EQ(0, std::memcmp(f64.data(), h.copies[5].data(), 7 * 8));
  // an F32 buffer reads out as BF16, rounded to nearest even
  Buffer &mean = h.copies[1];
  std::vector<uint16_t> halves(mean.num_elems);
  ASSERT_EQ(
      polyak_get_shadow_n(h.with.get(), 1, h.number(mean.name), halves.data(), POLYAK_BF16, halves.size() * 2, nullptr),
      POLYAK_OK);
  for (int64_t e = 0; e < mean.num_elems; e += 977)
    EXPECT_EQ(halves[e], polyak_f32_to_bf16_rne(load_as(POLYAK_F32, mean.data(), e))) << e;
  // short buffers are refused as for any tensor
  std::vector<unsigned char> small(4 * 300001 - 1);
  EXPECT_EQ(polyak_get_shadow_n(h.with.get(), 0, h.number("counts"), small.data(), POLYAK_I32, small.size(), nullptr),
            POLYAK_ERR_INVALID_ARG);
  // a blend of a copy is the mirror
  const double weights[3] = {0.2, 0.3, 0.5};
  std::vector<int64_t> tracked(1);
  ASSERT_EQ(polyak_get_blend_n(h.with.get(), weights, 0, h.number("bn.num_batches_tracked"), tracked.data(), POLYAK_I64,
                               8, nullptr),
            POLYAK_OK);
  EXPECT_EQ(0, std::memcmp(tracked.data(), h.copies[0].data(), 8));
  // averaged tensors still read out as floats only
  std::vector<int64_t> ints(70001);
  EXPECT_EQ(polyak_get_shadow(h.with.get(), 0, h.number("w"), ints.data(), POLYAK_I64, nullptr),
            POLYAK_ERR_INVALID_ARG);
}

TEST(CopyOnly, EvaluationWritesMirrorsBackAndRestoreUndoesIt)
{
  WithCopies h(mixed_config());
  h.finalize();
  h.step(1, 7);
  std::vector<std::vector<unsigned char>> at_update;
  for (auto &c : h.copies)
    at_update.push_back(c.bytes());
  std::mt19937_64 rng(8); // a forward pass moves the buffers after the update
  for (auto &c : h.copies)
    c.randomize(rng);
  std::vector<std::vector<unsigned char>> moved;
  for (auto &c : h.copies)
    moved.push_back(c.bytes());
  ASSERT_EQ(polyak_store(h.with.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_copy_to_params(h.with.get(), 2, nullptr), POLYAK_OK);
  for (size_t i = 0; i < h.copies.size(); i++)
    EXPECT_EQ(h.copies[i].bytes(), at_update[i]) << h.copies[i].name << ": the mirror, written back";
  ASSERT_EQ(polyak_restore(h.with.get(), nullptr), POLYAK_OK);
  for (size_t i = 0; i < h.copies.size(); i++)
    EXPECT_EQ(h.copies[i].bytes(), moved[i]) << h.copies[i].name << ": restored";
  const double weights[3] = {1.0, 0.0, 0.0};
  ASSERT_EQ(polyak_blend_to_params(h.with.get(), weights, 0, nullptr), POLYAK_OK);
  for (size_t i = 0; i < h.copies.size(); i++)
    EXPECT_EQ(h.copies[i].bytes(), at_update[i]) << h.copies[i].name << ": a blend writes the mirror too";
}

TEST(CopyOnly, HardUpdatesAndGraphReplaysMirrorToo)
{
  WithCopies h(mixed_config());
  h.finalize();
  std::mt19937_64 rng(9);
  for (auto &c : h.copies)
    c.randomize(rng);
  ASSERT_EQ(polyak_hard_update(h.with.get(), 1, nullptr), POLYAK_OK);
  h.expect_mirrors();
  ASSERT_EQ(polyak_graph_reserve(h.with.get(), 1, 3, nullptr), POLYAK_OK);
  for (int replay = 0; replay < 3; replay++) {
    for (auto &c : h.copies)
      c.randomize(rng);
    ASSERT_EQ(polyak_graph_update(h.with.get(), nullptr), POLYAK_OK);
    h.expect_mirrors();
  }
  ASSERT_EQ(polyak_graph_release(h.with.get(), nullptr), POLYAK_OK);
}

TEST(CopyOnly, EveryRankKeepsTheWholeMirrorAndTheSameSlices)
{
  polyak_config cfg = mixed_config();
  cfg.world_size = 2;
  for (int rank = 0; rank < 2; rank++) {
    cfg.rank = rank;
    WithCopies h(cfg);
    h.finalize();
    h.step(1, 11);
    for (auto &c : h.copies)
      expect_copy(h.with.get(), h.number(c.name), c, 0, c.bytes(), true);
    for (size_t i = 0; i < h.tensors.size(); i++) { // the copies take no part in the slicing
      int64_t a0 = -1, an = -1, b0 = -2, bn = -2;
      ASSERT_EQ(polyak_local_range(h.with.get(), h.number(h.tensors[i].name), &a0, &an), POLYAK_OK);
      ASSERT_EQ(polyak_local_range(h.without.get(), (int)i, &b0, &bn), POLYAK_OK);
      EXPECT_EQ(a0, b0);
      EXPECT_EQ(an, bn);
    }
  }
}

TEST(CopyOnly, LayerwiseShadowsIgnoreCopies)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[0].layerwise_beta0 = 0.99;
  WithCopies h(cfg);
  h.finalize();
  // gradients for the averaged tensors only: a copy's entry may be NULL
  std::vector<Tensor> grads;
  std::mt19937_64 rng(12);
  for (auto &t : h.tensors) {
    grads.emplace_back("g" + t.name, t.dtype, t.num_elems);
    grads.back().randomize(rng, 0.0f, 0.1f);
  }
  int num_with = 0;
  ASSERT_EQ(polyak_num_tensors(h.with.get(), &num_with), POLYAK_OK);
  std::vector<void *> with_table(num_with, nullptr), without_table;
  for (size_t i = 0; i < grads.size(); i++) {
    with_table[h.number(h.tensors[i].name)] = grads[i].data();
    without_table.push_back(grads[i].data());
  }
  ASSERT_EQ(polyak_set_grads(h.with.get(), with_table.data()), POLYAK_OK) << polyak_last_error(h.with.get());
  ASSERT_EQ(polyak_set_grads(h.without.get(), without_table.data()), POLYAK_OK);
  for (int64_t step = 1; step <= 3; step++) {
    ASSERT_EQ(polyak_update(h.with.get(), step, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_update(h.without.get(), step, nullptr), POLYAK_OK);
  }
  std::vector<double> with_betas(num_with), without_betas(h.tensors.size());
  ASSERT_EQ(polyak_get_layer_betas(h.with.get(), 0, with_betas.data()), POLYAK_OK);
  ASSERT_EQ(polyak_get_layer_betas(h.without.get(), 0, without_betas.data()), POLYAK_OK);
  for (size_t i = 0; i < h.tensors.size(); i++)
    EXPECT_EQ(with_betas[h.number(h.tensors[i].name)], without_betas[i]) << h.tensors[i].name;
}

TEST(CopyOnly, CheckpointsHoldEachMirrorOnceAndResumeExactly)
{
  TempDir dir;
  const std::string path = dir.file("with_copies");
  WithCopies run(mixed_config()), resumed(mixed_config());
  run.finalize();
  resumed.finalize();
  for (int64_t step : {1, 2})
    run.step(step, 200 + (uint64_t)step);
  ASSERT_EQ(polyak_save(run.with.get(), path.c_str()), POLYAK_OK) << polyak_last_error(run.with.get());
  size_t num_bytes = 0;
  ASSERT_EQ(polyak_save_size(run.with.get(), &num_bytes), POLYAK_OK);
  std::vector<char> memory(num_bytes);
  ASSERT_EQ(polyak_save_to_memory(run.with.get(), memory.data(), memory.size(), &num_bytes), POLYAK_OK);
  memory.resize(num_bytes);
  EXPECT_EQ(memory, read_bytes(path)) << "the same bytes in memory and in the file";
  // the resumed run's own buffers differ until its first update
  ASSERT_EQ(polyak_load(resumed.with.get(), path.c_str()), POLYAK_OK) << polyak_last_error(resumed.with.get());
  ASSERT_EQ(polyak_load(resumed.without.get(), path.c_str()), POLYAK_ERR_MISMATCH) << "another model";
  for (auto &c : run.copies) // the saved mirrors
    expect_copy(resumed.with.get(), resumed.number(c.name), c, 2, c.bytes());
  ASSERT_EQ(polyak_load_from_memory(resumed.with.get(), memory.data(), memory.size()), POLYAK_OK);
  // both go on from step 2 with the same params: the same bits
  for (int64_t step : {3, 7}) {
    run.step(step, 300 + (uint64_t)step);
    std::mt19937_64 rng(300 + (uint64_t)step);
    for (auto &t : resumed.tensors)
      t.randomize(rng);
    for (auto &c : resumed.copies)
      c.randomize(rng);
    ASSERT_EQ(polyak_update(resumed.with.get(), step, nullptr), POLYAK_OK);
  }
  std::vector<Tensor> all; // every tensor of the handle, for the snapshot's element counts
  int num = 0;
  ASSERT_EQ(polyak_num_tensors(run.with.get(), &num), POLYAK_OK);
  for (int i = 0; i < num; i++) {
    polyak_tensor_info_t info;
    ASSERT_EQ(polyak_tensor_info(run.with.get(), i, &info), POLYAK_OK);
    if (!(info.flags & POLYAK_TENSOR_COPY))
      all.emplace_back(info.name, POLYAK_F32, info.num_elems);
  }
  for (int k = 0; k < 3; k++)
    for (auto &t : all) {
      int i = run.number(t.name);
      EXPECT_EQ(read_shadow(run.with.get(), k, i, t.num_elems), read_shadow(resumed.with.get(), k, i, t.num_elems))
          << t.name << " shadow " << k;
    }
}

TEST(CopyOnly, ALoadRefusesATensorCopiedInOneAndAveragedInTheOther)
{
  TempDir dir;
  polyak_config cfg = cpu_config(1, 0.9); // one f32 shadow: an F32 copy and an average look alike
  Tensor stats("stats", POLYAK_F32, 9);
  std::mt19937_64 rng(5);
  stats.randomize(rng);
  int64_t shape[1] = {9};
  Handle copied = make_handle(cfg), averaged = make_handle(cfg);
  ASSERT_EQ(polyak_add_copy(copied.get(), "stats", stats.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  ASSERT_EQ(polyak_add(averaged.get(), "stats", stats.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(copied.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(averaged.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_save(copied.get(), dir.file("copied").c_str()), POLYAK_OK);
  ASSERT_EQ(polyak_save(averaged.get(), dir.file("averaged").c_str()), POLYAK_OK);
  EXPECT_EQ(polyak_load(averaged.get(), dir.file("copied").c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(averaged.get()), "\"stats\" is copy-only in the file and averaged here"))
      << polyak_last_error(averaged.get());
  EXPECT_EQ(polyak_load(copied.get(), dir.file("averaged").c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(copied.get()), "\"stats\" is averaged in the file and copy-only here"))
      << polyak_last_error(copied.get());
}

TEST(CopyOnly, ShardedRanksLoadTheWholeMirror)
{
  TempDir dir;
  WithCopies whole(mixed_config());
  whole.finalize();
  whole.step(1, 400);
  ASSERT_EQ(polyak_save(whole.with.get(), dir.file("whole").c_str()), POLYAK_OK);
  polyak_config cfg = mixed_config();
  cfg.world_size = 3;
  for (int rank = 0; rank < 3; rank++) {
    cfg.rank = rank;
    WithCopies part(cfg);
    part.finalize();
    ASSERT_EQ(polyak_load(part.with.get(), dir.file("whole").c_str()), POLYAK_OK) << polyak_last_error(part.with.get());
    for (auto &c : whole.copies)
      expect_copy(part.with.get(), part.number(c.name), c, 1, c.bytes(), true);
  }
}

TEST(CopyOnly, BadArgumentsAreRefusedAndChangeNothing)
{
  Handle h = make_handle(cpu_config());
  Buffer counts("counts", POLYAK_I64, 8, 5);
  int64_t shape[1] = {5};
  EXPECT_EQ(polyak_add(h.get(), "counts", counts.data(), POLYAK_I64, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "polyak_add_copy")) << polyak_last_error(h.get());
  EXPECT_EQ(polyak_add_copy(h.get(), "counts", counts.data(), (polyak_dtype)42, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_add_copy(h.get(), "counts", counts.data() + 4, POLYAK_I64, 1, shape), POLYAK_ERR_INVALID_ARG)
      << "misaligned for its 8-byte elements";
  EXPECT_EQ(polyak_add_copy(h.get(), "polyak.x", counts.data(), POLYAK_I64, 1, shape), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_add_copy(nullptr, "counts", counts.data(), POLYAK_I64, 1, shape), POLYAK_ERR_INVALID_ARG);
  ASSERT_EQ(polyak_add_copy(h.get(), "counts", counts.data(), POLYAK_I64, 1, shape), POLYAK_OK);
  EXPECT_EQ(polyak_add_copy(h.get(), "again", counts.data() + 8, POLYAK_I64, 1, shape), POLYAK_ERR_INVALID_ARG)
      << "overlaps";
  int n = -1;
  ASSERT_EQ(polyak_num_tensors(h.get(), &n), POLYAK_OK);
  EXPECT_EQ(n, 1);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_add_copy(h.get(), "late", counts.data(), POLYAK_I64, 1, shape), POLYAK_ERR_STATE);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK) << "a handle of copies alone works";
}

} // namespace
