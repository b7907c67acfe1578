// test_shard_checkpoint.cpp: checkpoint shards on CPU ranks without a
// communicator (polyak_save_shards, polyak_load_shards, polyak-consolidate).
// The oracle is an unsharded handle that ran the same steps without
// stopping: a set saved at one world size, loaded at another and run on must
// hold its bits exactly; a consolidated file must be what polyak_save of it
// writes, byte for byte.
#include "checkpoint_util.h"
#include "shard_util.h"

#include "checkpoint/shard.h"

using namespace polyak_test;

namespace {

// Runs polyak-consolidate with `args`; its exit status, stderr in *err.
int consolidate(const std::string &args, std::string *err = nullptr)
{
  TempDir scratch;
  std::string err_path = scratch.file("stderr");
  int rc = std::system((std::string(POLYAK_CONSOLIDATE) + " " + args + " 2>" + err_path).c_str());
  if (err) {
    auto bytes = read_bytes(err_path);
    err->assign(bytes.begin(), bytes.end());
  }
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

} // namespace

TEST(ShardCheckpoint, SavedAtFourRanksResumesAtThreeOneAndFiveBitForBit)
{
  // bf16 shadows with zero_init's debias; f32 shadows, shadow 0 rounding stochastically
  for (polyak_dtype dtype : {POLYAK_BF16, POLYAK_F32}) {
    ShardModel m(4, dtype, dtype == POLYAK_BF16);
    for (auto &rank : m.ranks) // files of many blocks, each rank's range starting inside one
      rank->shard_block_bytes = dtype == POLYAK_BF16 ? 4096 : 0;
    for (int64_t s : {1, 2, 5}) // a NaN at 5: the non-finite count travels
      m.step(s);
    TempDir dir;
    m.save_all(dir.path);
    EXPECT_EQ(shard_files(dir).size(), 4u);
    for (int64_t s : {6, 9}) // the run goes on without stopping
      m.step(s);
    for (int world : {3, 1, 5}) {
      std::vector<Handle> resumed;
      for (int r = 0; r < world; r++) {
        resumed.push_back(m.make(world, r));
        ASSERT_EQ(polyak_load_shards(resumed.back().get(), dir.path.c_str()), POLYAK_OK)
            << polyak_last_error(resumed.back().get());
      }
      EXPECT_EQ(polyak_update(resumed[0].get(), 5, nullptr), POLYAK_ERR_INVALID_ARG) << "step 5 is done";
      m.step(6, pointers(resumed));
      m.step(9, pointers(resumed));
      expect_same_as(m.whole.get(), pointers(resumed),
                     std::string(dtype_label(dtype)) + " W' = " + std::to_string(world));
    }
    expect_same_as(m.whole.get(), pointers(m.ranks), "the ranks that saved");
  }
}

TEST(ShardCheckpoint, EachFileHoldsItsRanksSliceAndTheSetDescribesTheWholeModel)
{
  ShardModel m(3, POLYAK_BF16);
  for (int64_t s : {1, 2})
    m.step(s);
  TempDir dir;
  m.save_all(dir.path);
  std::string save_id;
  int64_t covered = 0;
  for (int r = 0; r < 3; r++) {
    std::vector<char> bytes = read_bytes(rank_file(dir, r, 3));
    Parsed file(bytes);
    json_t *meta = file.metadata();
    auto text = [&](const char *key) { return std::string(json_string_value(json_object_get(meta, key))); };
    EXPECT_EQ(text("format"), "polyak-shard");
    EXPECT_EQ(text("step"), "2");
    EXPECT_EQ(text("rank"), std::to_string(r));
    EXPECT_EQ(text("world_size"), "3");
    if (r == 0)
      save_id = text("save_id");
    EXPECT_EQ(text("save_id"), save_id) << "the ranks agree on the save id without an exchange";
    EXPECT_NE(bytes.size(), 0u);
    // its slice: every shadow's elements of its range, in order, as the rank holds them
    json_error_t e;
    json_t *boundaries = json_loads(text("boundaries").c_str(), 0, &e);
    int64_t begin = json_integer_value(json_array_get(boundaries, r));
    int64_t end = json_integer_value(json_array_get(boundaries, r + 1));
    json_decref(boundaries);
    EXPECT_EQ(begin, covered);
    covered = end;
    std::vector<char> mine;
    for (int k = 0; k < 3; k++)
      for (size_t i = 0; i < m.tensors.size(); i++) {
        int64_t first, num;
        ASSERT_EQ(polyak_local_range(m.ranks[r].get(), (int)i, &first, &num), POLYAK_OK);
        std::vector<char> piece(num * 2 + 2);
        ASSERT_EQ(polyak_get_local_shadow(m.ranks[r].get(), k, (int)i, piece.data(), POLYAK_BF16, nullptr), POLYAK_OK);
        mine.insert(mine.end(), piece.begin(), piece.begin() + num * 2);
      }
    ASSERT_GE(file.data.size(), mine.size());
    EXPECT_TRUE(std::equal(mine.begin(), mine.end(), file.data.begin())) << "rank " << r;
    EXPECT_EQ(json_object_get(file.header, "bn.running_var") != nullptr, r == 0) << "rank 0 holds the copies";
  }
  EXPECT_EQ(covered, 65537 + 130001 + 1 + 3 + 5 + 7) << "the ranges tile the flattened parameter space";
}

TEST(ShardCheckpoint, TheSaveIdTellsSavesApartAndARepeatedSaveIsTheSameSet)
{
  TempDir dir, other_dir;
  ShardModel m(2, POLYAK_F32), other(2, POLYAK_F32, 0, 71); // another run: other params
  m.step(1);
  other.step(1);
  m.save_all(dir.path);
  auto first = shard_files(dir);
  m.save_all(dir.path); // the same state again: the same names, the files replaced
  EXPECT_EQ(shard_files(dir), first);
  other.save_all(other_dir.path);
  auto id = [](const std::string &name) { return name.substr(name.find('-', 7) + 1, 16); };
  EXPECT_NE(id(first[0]), id(shard_files(other_dir)[0])) << "another run at the same step has another id";
  m.step(2);
  m.save_all(dir.path);
  auto later = shard_files(dir);
  ASSERT_EQ(later.size(), 2u) << "the older set is gone once the newer one is complete";
  EXPECT_NE(id(later[0]), id(first[0]));
}

TEST(ShardCheckpoint, ConsolidatedCheckpointIsWhatAnUnshardedSaveWritesByteForByte)
{
  for (polyak_dtype dtype : {POLYAK_F32, POLYAK_BF16}) {
    ShardModel m(4, dtype, dtype == POLYAK_BF16);
    Handle loaded = m.make(1, 0);
    for (int64_t s : {1, 3, 5})
      m.step(s);
    TempDir dir, out;
    m.save_all(dir.path);
    ASSERT_EQ(polyak_save(m.whole.get(), out.file("whole.safetensors").c_str()), POLYAK_OK);
    std::string err;
    ASSERT_EQ(consolidate(dir.path + " " + out.file("joined.safetensors"), &err), 0) << err;
    EXPECT_EQ(read_bytes(out.file("joined.safetensors")), read_bytes(out.file("whole.safetensors")))
        << dtype_label(dtype);
    ASSERT_EQ(polyak_load(loaded.get(), out.file("joined.safetensors").c_str()), POLYAK_OK)
        << polyak_last_error(loaded.get());
    expect_same_as(m.whole.get(), {loaded.get()}, "polyak_load of the consolidated file");
  }
}

TEST(ShardCheckpoint, ConsolidatedShadowReadsOutAsGetShadowUnderTheModelsNames)
{
  ShardModel m(3, POLYAK_F32, 1); // zero_init: read-outs are debiased
  for (int64_t s : {1, 2, 4})
    m.step(s);
  TempDir dir, out;
  m.save_all(dir.path);
  for (auto [k, dtype, flag] : {std::make_tuple(1, POLYAK_BF16, "bf16"), std::make_tuple(2, POLYAK_F32, "f32"),
                                std::make_tuple(0, POLYAK_F16, "f16")}) {
    std::string path = out.file(std::string("shadow-") + flag + ".safetensors"), err;
    ASSERT_EQ(consolidate("--shadow " + std::to_string(k) + " --dtype " + flag + " " + dir.path + " " + path, &err), 0)
        << err;
    Parsed file(read_bytes(path));
    ASSERT_NE(file.header, nullptr);
    EXPECT_EQ(std::string(json_string_value(json_object_get(file.metadata(), "format"))), "pt");
    EXPECT_EQ((int)json_object_size(file.header), m.num_tensors() + 1) << "every tensor, buffers included";
    for (int i = 0; i < m.num_tensors(); i++) {
      polyak_tensor_info_t info;
      ASSERT_EQ(polyak_tensor_info(m.whole.get(), i, &info), POLYAK_OK);
      polyak_dtype as = info.flags & POLYAK_TENSOR_COPY ? info.dtype : dtype;
      std::vector<char> want(info.num_elems * polyak_dtype_num_bytes(as) + 8);
      ASSERT_EQ(polyak_get_shadow(m.whole.get(), k, i, want.data(), as, nullptr), POLYAK_OK);
      json_t *entry = json_object_get(file.header, info.name);
      ASSERT_NE(entry, nullptr) << info.name;
      EXPECT_EQ(std::string(json_string_value(json_object_get(entry, "dtype"))), polyak_dtype_name(as));
      json_t *shape = json_object_get(entry, "shape");
      ASSERT_EQ((int)json_array_size(shape), info.ndim) << info.name;
      for (int d = 0; d < info.ndim; d++)
        EXPECT_EQ(json_integer_value(json_array_get(shape, d)), info.shape[d]);
      int64_t begin = json_integer_value(json_array_get(json_object_get(entry, "data_offsets"), 0));
      ASSERT_EQ(0, std::memcmp(file.data.data() + begin, want.data(), info.num_elems * polyak_dtype_num_bytes(as)))
          << "shadow " << k << " of " << info.name << " as " << flag;
    }
  }
}

TEST(ShardCheckpoint, ConsolidateRefusesBadUsageAndNamesTheFileOfADamagedSet)
{
  ShardModel m(2, POLYAK_F32);
  m.step(1);
  TempDir dir, out;
  m.save_all(dir.path);
  std::string err;
  EXPECT_EQ(consolidate(dir.path, &err), 2) << "one directory and one output";
  EXPECT_EQ(consolidate("--shadow 9 " + dir.path + " " + out.file("x"), &err), 2);
  EXPECT_EQ(consolidate("--dtype bf16 " + dir.path + " " + out.file("x"), &err), 2) << "--dtype needs --shadow";
  EXPECT_EQ(consolidate("--shadow 3 " + dir.path + " " + out.file("x"), &err), 1) << "the set has 3 shadows";
  EXPECT_TRUE(contains(err, "no shadow 3")) << err;
  EXPECT_EQ(consolidate(out.path + " " + out.file("x"), &err), 1);
  EXPECT_TRUE(contains(err, "no complete set")) << err;
  std::string victim = rank_file(dir, 1, 2);
  std::vector<char> bytes = read_bytes(victim);
  bytes[bytes.size() - 3] ^= 0x10; // in the last block of the data
  write_bytes(victim, bytes);
  EXPECT_EQ(consolidate(dir.path + " " + out.file("x"), &err), 1);
  EXPECT_TRUE(contains(err, victim) && contains(err, "does not match its checksum")) << err;
  EXPECT_TRUE(out.entries().empty()) << "nothing written";
}

TEST(ShardCheckpoint, CallsCheckTheirArgumentsAndChangeNothing)
{
  ShardModel m(2, POLYAK_F32);
  m.step(1);
  TempDir dir;
  polyak_t *h = m.ranks[1].get();
  RankState before = rank_state(h);
  EXPECT_EQ(polyak_save_shards(nullptr, dir.path.c_str()), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_load_shards(nullptr, dir.path.c_str()), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_save_shards(h, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_load_shards(h, ""), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_save_shards(h, dir.file("absent").c_str()), POLYAK_ERR_IO);
  EXPECT_TRUE(contains(polyak_last_error(h), "absent")) << polyak_last_error(h);
  write_bytes(dir.file("plain"), {'x'});
  EXPECT_EQ(polyak_load_shards(h, dir.file("plain").c_str()), POLYAK_ERR_IO);
  EXPECT_TRUE(contains(polyak_last_error(h), "not a directory")) << polyak_last_error(h);
  EXPECT_EQ(polyak_load_shards(h, dir.path.c_str()), POLYAK_ERR_IO);
  EXPECT_TRUE(contains(polyak_last_error(h), "holds no shard files")) << polyak_last_error(h);
  ASSERT_EQ(polyak_graph_reserve(h, 2, 4, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_save_shards(h, dir.path.c_str()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_load_shards(h, dir.path.c_str()), POLYAK_ERR_STATE);
  ASSERT_EQ(polyak_graph_release(h, nullptr), POLYAK_OK);
  EXPECT_TRUE(rank_state(h) == before);
  EXPECT_EQ(dir.entries(), std::set<std::string>{"plain"});
  Handle fresh = make_handle(m.config(2, 0));
  EXPECT_EQ(polyak_save_shards(fresh.get(), dir.path.c_str()), POLYAK_ERR_STATE) << "before finalize";
  // shadows in the caller's memory leave no room in shard files
  polyak_config cfg = cpu_config(1);
  Handle owner = make_handle(cfg);
  std::vector<float> param(10, 1.0f), shadow(10, 1.0f);
  int64_t shape[1] = {10};
  ASSERT_EQ(polyak_add_with_shadow(owner.get(), "t", param.data(), POLYAK_F32, 1, shape, shadow.data(), POLYAK_F32, 0),
            POLYAK_OK);
  ASSERT_EQ(polyak_finalize(owner.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_save_shards(owner.get(), dir.path.c_str()), POLYAK_ERR_UNSUPPORTED);
  EXPECT_TRUE(contains(polyak_last_error(owner.get()), "polyak_save")) << polyak_last_error(owner.get());
}

TEST(ShardCheckpoint, AShardFileIsNoCheckpointAndPolyakLoadSaysWhatItIs)
{
  ShardModel m(2, POLYAK_F32);
  m.step(1);
  TempDir dir;
  m.save_all(dir.path);
  RankState before = rank_state(m.whole.get());
  EXPECT_EQ(polyak_load(m.whole.get(), rank_file(dir, 0, 2).c_str()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(contains(polyak_last_error(m.whole.get()), "polyak_load_shards")) << polyak_last_error(m.whole.get());
  EXPECT_TRUE(rank_state(m.whole.get()) == before);
}

TEST(ShardCheckpoint, AFileNameHasOneTextAndSaysItsSet)
{
  polyak_shard_name name;
  for (polyak_shard_name n : {polyak_shard_name{0, 0, 0, 1}, polyak_shard_name{INT64_MAX, ~0ull, 1023, 1024},
                              polyak_shard_name{5, 0x0123456789abcdefull, 2, 3}}) {
    char text[POLYAK_SHARD_NAME_BYTES];
    polyak_shard_format_name(&n, text);
    ASSERT_EQ(polyak_shard_parse_name(text, &name), 0) << text;
    EXPECT_TRUE(name.step == n.step && name.save_id == n.save_id && name.rank == n.rank &&
                name.world_size == n.world_size)
        << text;
  }
  char text[POLYAK_SHARD_NAME_BYTES];
  name = {12, 0xabcull, 3, 8};
  polyak_shard_format_name(&name, text);
  EXPECT_STREQ(text, "polyak-step12-0000000000000abc-rank3-of8.safetensors");
  for (const char *other : {"polyak-step012-0000000000000abc-rank3-of8.safetensors", // a leading zero
                            "polyak-step12-0000000000000ABC-rank3-of8.safetensors",  // uppercase
                            "polyak-step12-000000000000abc-rank3-of8.safetensors",   // 15 digits
                            "polyak-step12-0000000000000abc-rank8-of8.safetensors",  // rank >= W
                            "polyak-step12-0000000000000abc-rank0-of0.safetensors",
                            "polyak-step12-0000000000000abc-rank3-of8.safetensors.tmp",
                            ".polyak-step12-0000000000000abc-rank3-of8.safetensors",
                            "polyak-step9223372036854775808-0000000000000abc-rank3-of8.safetensors", // > int64
                            "polyak-step-1-0000000000000abc-rank3-of8.safetensors"})
    EXPECT_NE(polyak_shard_parse_name(other, &name), 0) << other;
}
