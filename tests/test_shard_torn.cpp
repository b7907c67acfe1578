// test_shard_torn.cpp: a shard load that finds a file changed between its
// checking pass and its copying pass. This executable is linked with
// -Wl,--wrap=pread, so every pread of the library comes here first: armed,
// the n-th read of a file at an offset returns its bytes with one changed,
// as if the file had been rewritten between the two reads. The shadows are
// then partly written: the handle must refuse everything but a load, and a
// load must mend it. Armed with an action instead, the read runs it first
// (a save removing the set, say). Flaky, reads are interrupted (EINTR) and
// cut short, as signals and network file systems make them.
#include "checkpoint_util.h"
#include "shard_util.h"

#include "checkpoint/shard.h"

using namespace polyak_test;

namespace {

struct Arm {
  std::string file_part; // "" : disarmed
  off_t offset = 0;
  int reads_left = 0;
  std::function<void()> action; // empty: flip the last byte read
} arm;

// Interrupted and short reads: on, every third pread fails with EINTR and
// every third returns about half of what it was asked for.
struct Flaky {
  bool on = false;
  int calls = 0, interrupted = 0, shortened = 0;
} flaky;

} // namespace

extern "C" ssize_t __real_pread(int fd, void *buf, size_t count, off_t offset);

extern "C" ssize_t __wrap_pread(int fd, void *buf, size_t count, off_t offset)
{
  if (flaky.on) {
    int n = ++flaky.calls;
    if (n % 3 == 1) {
      flaky.interrupted++;
      errno = EINTR;
      return -1;
    }
    if (n % 3 == 2 && count > 1) {
      flaky.shortened++;
      count = count / 2 + 1;
    }
  }
  ssize_t got = __real_pread(fd, buf, count, offset);
  if (got <= 0 || arm.file_part.empty() || offset != arm.offset)
    return got;
  char link[64], path[4096];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, path, sizeof path - 1);
  path[n > 0 ? n : 0] = '\0';
  if (std::strstr(path, arm.file_part.c_str()) && --arm.reads_left == 0) {
    if (arm.action)
      arm.action();
    else
      static_cast<char *>(buf)[got - 1] ^= 0x01;
    arm.file_part.clear();
  }
  return got;
}

namespace {

// Steps 2 and 3 of a W = 4 model whose files have many 4 KiB blocks.
void run_with_small_blocks(ShardModel &m)
{
  for (auto &rank : m.ranks)
    rank->shard_block_bytes = 4096;
  for (int64_t s : {2, 3})
    m.step(s);
}

// Every call that needs a whole state refuses a torn handle; loads do not.
void expect_torn(polyak_t *h, const std::string &victim)
{
  std::string error = polyak_last_error(h);
  EXPECT_TRUE(contains(error, victim)) << error;
  int64_t count = 0, step = 0, first = 0, num = 0;
  std::vector<float> dst(200000);
  EXPECT_EQ(polyak_update(h, 10, nullptr), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(h), "partly loaded")) << polyak_last_error(h);
  EXPECT_EQ(polyak_nonfinite_count(h, &count), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_get_shadow(h, 0, 3, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_get_local_shadow(h, 0, 3, dst.data(), POLYAK_F32, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_local_range(h, 3, &first, &num), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_copy_to_params(h, 0, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_store(h, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_hard_update(h, 0, nullptr), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_graph_reserve(h, 10, 2, nullptr), POLYAK_ERR_STATE);
  TempDir scratch;
  EXPECT_EQ(polyak_save(h, scratch.file("x").c_str()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_save_shards(h, scratch.path.c_str()), POLYAK_ERR_STATE);
  EXPECT_TRUE(scratch.entries().empty());
  EXPECT_EQ(polyak_get_step(h, &step), POLYAK_OK);
  EXPECT_EQ(step, 1) << "the step state is the one before the load";
}

} // namespace

TEST(ShardTorn, AFileChangedBetweenThePassesLeavesAHandleThatRefusesAllButALoad)
{
  ShardModel m(4, POLYAK_F32);
  for (auto &rank : m.ranks)
    rank->shard_block_bytes = 4096; // rank 1's file of many blocks
  for (int64_t s : {2, 3})
    m.step(s);
  TempDir dir;
  m.save_all(dir.path);
  std::vector<char> file1 = read_bytes(rank_file(dir, 1, 4));
  uint64_t header1 = 0;
  std::memcpy(&header1, file1.data(), 8);
  struct Case {
    std::string file;
    off_t offset;
    const char *what;
  } cases[] = {
      {"-rank2-of4", 8, "a header"},                        // rank 2's header, when pass 2 opens it again
      {"-rank1-of4", (off_t)(8 + header1), "a data block"}, // rank 1's first block, when pass 2 reads it again
  };
  for (const Case &c : cases) {
    m.step(1, {}); // params without step 5's NaN
    Handle h = m.make(1, 0);
    h->shard_max_kept = 1; // rank 1's file stays open between the passes, rank 2's is opened again
    m.step(1, {h.get()});
    arm = {c.file, c.offset, 2, {}}; // the second read: pass 2's
    EXPECT_NE(polyak_load_shards(h.get(), dir.path.c_str()), POLYAK_OK) << c.what;
    EXPECT_TRUE(arm.file_part.empty()) << c.what << ": the change was never read";
    expect_torn(h.get(), c.file);
    // a load mends it: the set again, whole
    ASSERT_EQ(polyak_load_shards(h.get(), dir.path.c_str()), POLYAK_OK) << polyak_last_error(h.get());
    expect_same_as(m.whole.get(), {h.get()}, std::string("after ") + c.what + " changed");
  }
  // so does polyak_load of a checkpoint
  Handle h = m.make(1, 0);
  h->shard_max_kept = 1;
  arm = {"-rank2-of4", 8, 2, {}};
  EXPECT_NE(polyak_load_shards(h.get(), dir.path.c_str()), POLYAK_OK);
  ASSERT_EQ(polyak_save(m.whole.get(), dir.file("whole.safetensors").c_str()), POLYAK_OK);
  ASSERT_EQ(polyak_load(h.get(), dir.file("whole.safetensors").c_str()), POLYAK_OK) << polyak_last_error(h.get());
  expect_same_as(m.whole.get(), {h.get()}, "after polyak_load");
}

// A save that completes a newer set removes the older one at once, perhaps
// while a load or a consolidation reads it: the files they opened stay
// readable, so both finish with the set they began with.
TEST(ShardTorn, ASetRemovedWhileALoadOrAConsolidationReadsItIsReadWhole)
{
  ShardModel m(4, POLYAK_F32);
  run_with_small_blocks(m);
  TempDir dir, out, copy;
  m.save_all(dir.path);
  auto remove_all = [&] {
    for (const auto &name : shard_files(dir)) {
      write_bytes(copy.file(name), read_bytes(dir.file(name)));
      unlink(dir.file(name).c_str());
    }
  };
  auto restore = [&] {
    for (const auto &name : shard_files(copy))
      write_bytes(dir.file(name), read_bytes(copy.file(name)));
  };
  for (int world_size : {1, 3}) {
    m.step(1, {}); // params without step 5's NaN
    std::vector<Handle> handles;
    for (int r = 0; r < world_size; r++)
      handles.push_back(m.make(world_size, r));
    for (int r = 0; r < world_size; r++) {
      polyak_t *h = handles[r].get();
      // the last file pass 1 opens: rank 3's for rank 0 (it checks every header), else the one of its last element
      int64_t last = polyak_shard_begin(h, world_size, r + 1) - 1;
      int file = 3;
      while (r != 0 && polyak_shard_begin(h, 4, file) > last)
        file--;
      restore();
      arm = {"-rank" + std::to_string(file) + "-of4", 8, 1, remove_all}; // then every file goes
      ASSERT_EQ(polyak_load_shards(h, dir.path.c_str()), POLYAK_OK) << polyak_last_error(h);
      EXPECT_TRUE(arm.file_part.empty()) << "the files were never removed";
      EXPECT_TRUE(shard_files(dir).empty());
    }
    expect_same_as(m.whole.get(), pointers(handles), "a load whose set was removed under it");
  }
  restore();
  char msg[1024] = "";
  arm = {"-rank3-of4", 8, 1, remove_all};
  ASSERT_EQ(polyak_shards_consolidate(dir.path.c_str(), out.file("whole.safetensors").c_str(), -1, POLYAK_F32, msg,
                                      sizeof msg),
            POLYAK_OK)
      << msg;
  EXPECT_TRUE(arm.file_part.empty()) << "the files were never removed";
  Handle h = m.make(1, 0);
  ASSERT_EQ(polyak_load(h.get(), out.file("whole.safetensors").c_str()), POLYAK_OK) << polyak_last_error(h.get());
  expect_same_as(m.whole.get(), {h.get()}, "a consolidation whose set was removed under it");
}

// Reads interrupted by signals and reads that return less than asked are
// retried: a load at another world size and a consolidation get every bit.
TEST(ShardTorn, InterruptedAndShortReadsAreRetried)
{
  ShardModel m(4, POLYAK_F32);
  run_with_small_blocks(m);
  TempDir dir, out;
  m.save_all(dir.path);
  m.step(1, {}); // params without step 5's NaN
  std::vector<Handle> handles;
  for (int r = 0; r < 3; r++)
    handles.push_back(m.make(3, r));
  flaky = {true, 0, 0, 0};
  for (auto &h : handles)
    EXPECT_EQ(polyak_load_shards(h.get(), dir.path.c_str()), POLYAK_OK) << polyak_last_error(h.get());
  char msg[1024] = "";
  EXPECT_EQ(polyak_shards_consolidate(dir.path.c_str(), out.file("whole.safetensors").c_str(), -1, POLYAK_F32, msg,
                                      sizeof msg),
            POLYAK_OK)
      << msg;
  Flaky seen = flaky;
  flaky = {};
  EXPECT_GT(seen.interrupted, 100);
  EXPECT_GT(seen.shortened, 100);
  expect_same_as(m.whole.get(), pointers(handles), "loads through interrupted and short reads");
  Handle h = m.make(1, 0);
  ASSERT_EQ(polyak_load(h.get(), out.file("whole.safetensors").c_str()), POLYAK_OK) << polyak_last_error(h.get());
  expect_same_as(m.whole.get(), {h.get()}, "a consolidation through interrupted and short reads");
}
