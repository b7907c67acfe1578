// test_shard_faults.cpp: checkpoint shards that go wrong. A rank killed in
// the middle of a save; a missing file, a file from another save, a
// truncated one, a flipped byte in a header or in any block: each is refused
// naming the file, with the handle unchanged, and a rank that loads despite
// damage it does not read holds the right bits. Saves remove only what a
// newer complete set replaces, and refuse to bury a newer set.
#include "checkpoint_util.h"
#include "shard_util.h"

#include <dirent.h>
#include <malloc.h>
#include <sys/resource.h>

using namespace polyak_test;

namespace {

// A model of W = 4 ranks saved at step 5 into dir, with `block_bytes` blocks.
struct Saved {
  ShardModel m;
  TempDir dir;
  explicit Saved(int64_t block_bytes = 0, uint64_t seed = 70) : m(4, POLYAK_F32, 0, seed)
  {
    for (auto &h : m.ranks)
      h->shard_block_bytes = block_bytes;
    for (int64_t s : {1, 2, 5})
      m.step(s);
    m.save_all(dir.path);
  }
  // Handles of world_size W' (the caller runs step 1, so that they hold a state to keep).
  std::vector<Handle> fresh(int world_size)
  {
    m.step(1, {}); // params without step 5's NaN, which finalize refuses
    std::vector<Handle> out;
    for (int r = 0; r < world_size; r++)
      out.push_back(m.make(world_size, r));
    return out;
  }
};

// Rank r of W's flat elements [begin, end).
std::pair<int64_t, int64_t> range_of(polyak_t *p, int world_size, int rank)
{
  return {polyak_shard_begin(p, world_size, rank), polyak_shard_begin(p, world_size, rank + 1)};
}

// Flips bits `mask` of the byte at `offset` of the file, in place.
void flip(const std::string &path, int64_t offset, uint8_t mask)
{
  Fd fd(open(path.c_str(), O_RDWR | O_CLOEXEC));
  uint8_t byte = 0;
  ASSERT_EQ(pread(fd.fd, &byte, 1, offset), 1);
  byte ^= mask;
  ASSERT_EQ(pwrite(fd.fd, &byte, 1, offset), 1);
}

// Loads dir into every handle; each must refuse, naming `file`, and keep its state.
void expect_all_refuse(std::vector<Handle> &handles, const std::string &dir, const std::string &file,
                       const std::string &why, polyak_status status)
{
  for (auto &h : handles) {
    RankState before = rank_state(h.get());
    EXPECT_EQ(polyak_load_shards(h.get(), dir.c_str()), status) << polyak_last_error(h.get());
    std::string error = polyak_last_error(h.get());
    EXPECT_TRUE(contains(error, file)) << error;
    EXPECT_TRUE(contains(error, why)) << error;
    EXPECT_TRUE(rank_state(h.get()) == before) << "a refused load changes nothing";
  }
}

} // namespace

TEST(ShardFaults, ARankKilledInTheMiddleOfASaveLeavesThePreviousSetLoadable)
{
  ShardModel m(4, POLYAK_F32);
  Handle at2 = m.make(1, 0); // the oracle of step 2; m.whole goes on to step 3
  std::vector<polyak_t *> all = pointers(m.ranks);
  all.push_back(m.whole.get());
  all.push_back(at2.get());
  m.step(1, all);
  m.step(2, all);
  TempDir dir;
  m.save_all(dir.path);
  all.pop_back();
  m.step(3, all);
  for (int r : {0, 1, 3})
    ASSERT_EQ(polyak_save_shards(m.ranks[r].get(), dir.path.c_str()), POLYAK_OK);
  std::set<std::string> before = dir.entries();
  // rank 2 dies at byte 64 KiB of its file: the file-size limit raises SIGXFSZ, whose handler sends SIGKILL
  pid_t pid = fork();
  if (pid == 0) {
    struct rlimit limit = {64 << 10, 64 << 10};
    setrlimit(RLIMIT_FSIZE, &limit);
    signal(SIGXFSZ, [](int) { kill(getpid(), SIGKILL); });
    polyak_save_shards(m.ranks[2].get(), dir.path.c_str());
    _exit(0);
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << "the save ran to its end";
  EXPECT_EQ(dir.entries(), before) << "no file and no litter from the killed rank";
  EXPECT_EQ(before.size(), 7u) << "step 2's set and 3 files of step 3's";
  for (int world : {3, 1}) {
    std::vector<Handle> resumed;
    for (int r = 0; r < world; r++) {
      resumed.push_back(m.make(world, r));
      ASSERT_EQ(polyak_load_shards(resumed.back().get(), dir.path.c_str()), POLYAK_OK)
          << polyak_last_error(resumed.back().get());
    }
    expect_same_as(at2.get(), pointers(resumed), "the previous set");
  }
  // killed at random moments: the directory loads as step 2 or as step 3, whole
  std::map<std::string, std::vector<char>> kept;
  for (const auto &name : before)
    kept[name] = read_bytes(dir.file(name));
  auto t0 = std::chrono::steady_clock::now();
  {
    TempDir scratch;
    ASSERT_EQ(polyak_save_shards(m.ranks[2].get(), scratch.path.c_str()), POLYAK_OK);
  }
  double save_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  std::mt19937_64 rng(5);
  int saw[2] = {0, 0};
  for (int trial = 0; trial < 8; trial++) {
    for (const auto &name : dir.entries())
      unlink(dir.file(name).c_str());
    for (const auto &[name, bytes] : kept)
      write_bytes(dir.file(name), bytes);
    pid = fork();
    if (pid == 0) {
      polyak_save_shards(m.ranks[2].get(), dir.path.c_str());
      _exit(0);
    }
    usleep((useconds_t)std::uniform_real_distribution<double>(0, 1.5 * save_us)(rng));
    kill(pid, SIGKILL);
    ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
    for (const auto &name : dir.entries())
      EXPECT_EQ(name.rfind("polyak-step", 0), 0u) << "litter: " << name;
    Handle resumed = m.make(1, 0);
    ASSERT_EQ(polyak_load_shards(resumed.get(), dir.path.c_str()), POLYAK_OK) << polyak_last_error(resumed.get());
    int64_t step = 0;
    polyak_get_step(resumed.get(), &step);
    ASSERT_TRUE(step == 2 || step == 3) << step;
    saw[step - 2]++;
    expect_same_as(step == 2 ? at2.get() : m.whole.get(), {resumed.get()}, "after a kill at a random moment");
  }
  std::printf("random kills: %d loaded step 2, %d step 3\n", saw[0], saw[1]);
}

TEST(ShardFaults, AMissingFileIsRefusedNamingIt)
{
  Saved s;
  std::string victim = rank_file(s.dir, 2, 4);
  ASSERT_EQ(unlink(victim.c_str()), 0);
  auto resumed = s.fresh(3);
  s.m.step(1, pointers(resumed));
  expect_all_refuse(resumed, s.dir.path, victim, "no complete set", POLYAK_ERR_IO);
}

TEST(ShardFaults, AFileFromAnotherSaveIsRefusedByEveryRankThatOpensIt)
{
  Saved s, other(0, 71); // another run: other params, another save id
  std::string victim = rank_file(s.dir, 2, 4);
  write_bytes(victim, read_bytes(rank_file(other.dir, 2, 4))); // under this set's name
  auto resumed = s.fresh(3);
  s.m.step(1, pointers(resumed));
  auto old2 = range_of(s.m.whole.get(), 4, 2);
  for (int r = 0; r < 3; r++) {
    polyak_t *h = resumed[r].get();
    auto mine = range_of(h, 3, r);
    bool reads = r == 0 || (mine.first < old2.second && old2.first < mine.second); // rank 0 opens every file
    RankState before = rank_state(h);
    polyak_status status = polyak_load_shards(h, s.dir.path.c_str());
    if (reads) {
      EXPECT_EQ(status, POLYAK_ERR_FORMAT) << "rank " << r;
      EXPECT_TRUE(contains(polyak_last_error(h), victim) && contains(polyak_last_error(h), "another save"))
          << polyak_last_error(h);
      EXPECT_TRUE(rank_state(h) == before);
    } else {
      EXPECT_EQ(status, POLYAK_OK) << "rank " << r << " reads nothing of it: " << polyak_last_error(h);
    }
  }
  // a file of another world size under this set's name
  TempDir two;
  ShardModel m2(2, POLYAK_F32);
  m2.step(1);
  m2.save_all(two.path);
  write_bytes(victim, read_bytes(rank_file(two, 1, 2)));
  auto again = s.fresh(1);
  s.m.step(1, pointers(again));
  expect_all_refuse(again, s.dir.path, victim, "another save", POLYAK_ERR_FORMAT);
}

// A message names the file at fault by its own name, whatever the length
// of the directory: a long one is shortened in the middle.
TEST(ShardFaults, AFileInADeepDirectoryIsStillNamedWithItsRank)
{
  ShardModel m(2, POLYAK_F32);
  m.step(1);
  TempDir top;
  std::string dir = top.path + "/" + std::string(110, 'd');
  ASSERT_EQ(mkdir(dir.c_str(), 0700), 0);
  dir += "/" + std::string(110, 'e');
  ASSERT_EQ(mkdir(dir.c_str(), 0700), 0);
  ASSERT_GT(dir.size(), 220u);
  m.save_all(dir);
  std::string victim;
  DIR *listing = opendir(dir.c_str());
  for (struct dirent *e; (e = readdir(listing)) != nullptr;)
    if (std::strstr(e->d_name, "-rank1-of2"))
      victim = dir + "/" + e->d_name;
  closedir(listing);
  ASSERT_FALSE(victim.empty());
  ASSERT_EQ(truncate(victim.c_str(), 100), 0);
  Handle h = m.make(1, 0);
  EXPECT_EQ(polyak_load_shards(h.get(), dir.c_str()), POLYAK_ERR_FORMAT);
  std::string error = polyak_last_error(h.get());
  EXPECT_TRUE(contains(error, victim.substr(victim.rfind('/'))) && contains(error, "...")) << error;
  EXPECT_TRUE(contains(error, "polyak_load_shards: " + top.path)) << error;
}

TEST(ShardFaults, ATruncatedOrLongerFileIsRefusedNamingIt)
{
  Saved s;
  std::string victim = rank_file(s.dir, 3, 4);
  std::vector<char> bytes = read_bytes(victim);
  auto resumed = s.fresh(1);
  s.m.step(1, pointers(resumed));
  for (size_t length : {bytes.size() - 1, bytes.size() / 2, (size_t)64, (size_t)5}) {
    write_bytes(victim, std::vector<char>(bytes.begin(), bytes.begin() + (long)length));
    for (auto &h : resumed) {
      RankState before = rank_state(h.get());
      EXPECT_EQ(polyak_load_shards(h.get(), s.dir.path.c_str()), POLYAK_ERR_FORMAT) << length;
      EXPECT_TRUE(contains(polyak_last_error(h.get()), victim)) << polyak_last_error(h.get());
      EXPECT_TRUE(rank_state(h.get()) == before);
    }
  }
  std::vector<char> longer = bytes;
  longer.push_back(0);
  write_bytes(victim, longer);
  expect_all_refuse(resumed, s.dir.path, victim, "bytes follow its data", POLYAK_ERR_FORMAT);
}

TEST(ShardFaults, AFlippedByteInAHeaderIsRefusedNamingTheFile)
{
  Saved s;
  auto resumed = s.fresh(2);
  s.m.step(1, pointers(resumed));
  polyak_t *h = resumed[0].get(); // rank 0 opens every file's header, rank 0's first
  RankState before = rank_state(h);
  int flips = 0;
  // every byte of rank 0's header (the length prefix included), a sample of rank 2's
  for (int old : {0, 2}) {
    std::string victim = rank_file(s.dir, old, 4);
    std::vector<char> bytes = read_bytes(victim);
    uint64_t header_bytes = 0;
    std::memcpy(&header_bytes, bytes.data(), 8);
    for (uint64_t at = 0; at < 8 + header_bytes; at += old == 0 ? 1 : 37) {
      uint8_t bit = (uint8_t)(1u << (at % 8));
      flip(victim, (int64_t)at, bit);
      ASSERT_NE(polyak_load_shards(h, s.dir.path.c_str()), POLYAK_OK) << "byte " << at;
      ASSERT_TRUE(contains(polyak_last_error(h), victim)) << "byte " << at << ": " << polyak_last_error(h);
      flip(victim, (int64_t)at, bit);
      flips++;
    }
  }
  // damage that leaves no JSON is told as damage: the checksum is checked on the raw text first
  std::string victim = rank_file(s.dir, 2, 4);
  for (int64_t at : {8, 9}) { // the header's "{", the quote of its first key
    flip(victim, at, 0x40);
    ASSERT_EQ(polyak_load_shards(h, s.dir.path.c_str()), POLYAK_ERR_FORMAT);
    EXPECT_TRUE(
        contains(polyak_last_error(h), victim + ": the header does not match its checksum: the file is corrupt"))
        << polyak_last_error(h);
    flip(victim, at, 0x40);
  }
  EXPECT_TRUE(rank_state(h) == before);
  ASSERT_EQ(polyak_load_shards(h, s.dir.path.c_str()), POLYAK_OK) << "the files restored load";
  std::printf("%d header bits flipped, each refused\n", flips);
}

TEST(ShardFaults, AFlippedByteInABlockIsRefusedByEveryRankThatReadsItAndNoRankLoadsWrongBits)
{
  const int64_t block = 4096;
  Saved s(block); // files of many 4 KiB blocks
  auto resumed = s.fresh(3);
  s.m.step(1, pointers(resumed));
  std::vector<RankState> loaded; // each rank's state loaded from the undamaged set
  for (auto &h : resumed) {
    ASSERT_EQ(polyak_load_shards(h.get(), s.dir.path.c_str()), POLYAK_OK) << polyak_last_error(h.get());
    loaded.push_back(rank_state(h.get()));
    s.m.step(6, {h.get()}); // and away from it again, so that a load must change it back
  }
  polyak_t *any = s.m.whole.get();
  const int64_t elem = 4, num_shadows = 3;
  for (int old = 0; old < 4; old++) {
    std::string victim = rank_file(s.dir, old, 4);
    std::vector<char> bytes = read_bytes(victim);
    uint64_t header_bytes = 0;
    std::memcpy(&header_bytes, bytes.data(), 8);
    int64_t data_start = 8 + (int64_t)header_bytes, data_bytes = (int64_t)bytes.size() - data_start;
    int64_t num_blocks = (data_bytes + block - 1) / block;
    auto file_range = range_of(any, 4, old);
    int64_t slice = file_range.second - file_range.first;
    for (int64_t b : {(int64_t)0, num_blocks / 3, num_blocks / 2, 2 * num_blocks / 3 + 1, num_blocks - 1}) {
      int64_t at = data_start + b * block + (b * 977) % std::min(block, data_bytes - b * block);
      flip(victim, at, 0x08);
      for (int r = 0; r < 3; r++) {
        // the blocks rank r reads: its range of each shadow's section, and in rank 0's file the copies
        auto mine = range_of(any, 3, r);
        int64_t lo = std::max(mine.first, file_range.first), hi = std::min(mine.second, file_range.second);
        bool reads = old == 0 && b * block + block > num_shadows * slice * elem;
        for (int64_t k = 0; k < num_shadows && lo < hi; k++) {
          int64_t begin = (k * slice + lo - file_range.first) * elem, end = (k * slice + hi - file_range.first) * elem;
          reads |= begin / block <= b && b <= (end - 1) / block;
        }
        polyak_t *h = resumed[r].get();
        RankState before = rank_state(h);
        polyak_status status = polyak_load_shards(h, s.dir.path.c_str());
        if (reads) {
          EXPECT_EQ(status, POLYAK_ERR_FORMAT) << "file " << old << " block " << b << " rank " << r;
          EXPECT_TRUE(contains(polyak_last_error(h), victim) && contains(polyak_last_error(h), "checksum"))
              << polyak_last_error(h);
          EXPECT_TRUE(rank_state(h) == before);
        } else {
          EXPECT_EQ(status, POLYAK_OK) << "file " << old << " block " << b << " rank " << r << ": "
                                       << polyak_last_error(h);
          EXPECT_TRUE(rank_state(h) == loaded[r]) << "damage it does not read leaves its bits right";
          s.m.step(6, {h});
        }
      }
      flip(victim, at, 0x08);
    }
  }
  // the set whole again: every rank loads, and runs on beside the oracle
  for (auto &h : resumed)
    ASSERT_EQ(polyak_load_shards(h.get(), s.dir.path.c_str()), POLYAK_OK);
  s.m.step(6, {s.m.whole.get()});
  s.m.step(6, pointers(resumed));
  expect_same_as(s.m.whole.get(), pointers(resumed), "after the damage was mended");
}

TEST(ShardFaults, SavesRemoveOnlySetsOlderThanTheNewestCompleteOne)
{
  ShardModel m(2, POLYAK_F32);
  TempDir dir;
  write_bytes(dir.file("notes.txt"), {'k'});
  write_bytes(dir.file(".polyak-step1-0000000000000000-rank0-of2.safetensors"), {'k'}); // not a shard name
  m.step(1);
  m.save_all(dir.path);
  auto step1 = shard_files(dir);
  m.step(2);
  ASSERT_EQ(polyak_save_shards(m.ranks[0].get(), dir.path.c_str()), POLYAK_OK);
  EXPECT_EQ(shard_files(dir).size(), 3u) << "step 1 stays while step 2 is incomplete";
  for (const auto &name : step1)
    EXPECT_TRUE(dir.entries().count(name)) << name;
  // an incomplete set of a later step (a killed attempt) is not older: it stays
  std::string later = dir.file("polyak-step9-00000000000000ab-rank1-of2.safetensors");
  write_bytes(later, {'x'});
  ASSERT_EQ(polyak_save_shards(m.ranks[1].get(), dir.path.c_str()), POLYAK_OK);
  auto now = dir.entries();
  for (const auto &name : step1)
    EXPECT_FALSE(now.count(name)) << name << " is older than the complete step 2";
  EXPECT_TRUE(now.count("notes.txt") && now.count(".polyak-step1-0000000000000000-rank0-of2.safetensors"));
  EXPECT_TRUE(now.count("polyak-step9-00000000000000ab-rank1-of2.safetensors"));
  EXPECT_EQ(shard_files(dir).size(), 3u);
  Handle resumed = m.make(1, 0);
  ASSERT_EQ(polyak_load_shards(resumed.get(), dir.path.c_str()), POLYAK_OK) << polyak_last_error(resumed.get());
  expect_same_as(m.whole.get(), {resumed.get()}, "the newest complete set, step 2");
}

// A name of a step past int64's range is no shard name, but its parse
// leaves ERANGE in errno while the directory is listed: listing, saving,
// removing and loading must not take it for a failure of the listing.
TEST(ShardFaults, AStrayNameWithAStepPastInt64sRangeIsPassedOver)
{
  ShardModel m(2, POLYAK_F32);
  TempDir dir;
  std::string stray = "polyak-step9999999999999999999-0000000000000000-rank0-of1.safetensors";
  write_bytes(dir.file(stray), {'k'});
  m.step(1);
  m.save_all(dir.path);
  auto step1 = shard_files(dir);
  m.step(2);
  m.save_all(dir.path);
  for (const auto &name : step1)
    EXPECT_EQ(dir.entries().count(name), name == stray ? 1u : 0u) << name;
  Handle resumed = m.make(1, 0);
  ASSERT_EQ(polyak_load_shards(resumed.get(), dir.path.c_str()), POLYAK_OK) << polyak_last_error(resumed.get());
  expect_same_as(m.whole.get(), {resumed.get()}, "step 2 beside the stray name");
}

// The data a save streams out must be what its header says, to the byte:
// a handle whose pieces disagree with its boundaries (a bug, forced here)
// writes no file, instead of one a load finds truncated.
TEST(ShardFaults, ASaveWhoseDataIsNotWhatItsHeaderSaysWritesNothing)
{
  ShardModel m(2, POLYAK_F32);
  m.step(1);
  TempDir dir;
  polyak_t *h = m.ranks[1].get();
  int big = 4; // layer4: 130001 elements, on both ranks
  ASSERT_GT(h->descs[big].local_num_elems, 8);
  for (int64_t delta : {-3, 3}) {
    h->descs[big].local_num_elems += delta;
    EXPECT_EQ(polyak_save_shards(h, dir.path.c_str()), POLYAK_ERR_STATE) << delta;
    EXPECT_TRUE(contains(polyak_last_error(h), "the header says")) << polyak_last_error(h);
    h->descs[big].local_num_elems -= delta;
    EXPECT_TRUE(dir.entries().empty()) << "nothing written";
  }
  m.save_all(dir.path);
}

TEST(ShardFaults, ASaveIntoADirectoryWithANewerCompleteSetIsRefused)
{
  Saved other(0, 71); // another run, complete at step 5
  ShardModel m(2, POLYAK_F32);
  m.step(3);
  auto before = other.dir.entries();
  polyak_t *h = m.ranks[0].get();
  EXPECT_EQ(polyak_save_shards(h, other.dir.path.c_str()), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(h), "step 5") && contains(polyak_last_error(h), "rank0-of4"))
      << polyak_last_error(h);
  EXPECT_EQ(other.dir.entries(), before) << "nothing written, nothing removed";
}

// The FSDP pattern docs/sharding.md warns of: each rank's own world_size 1
// handle (its own params) saving into one directory. A second complete set
// of the same step from another save is refused by the save; if two appear
// anyway (saves that raced), a load refuses the ambiguity naming both.
TEST(ShardFaults, TwoSavesOfOneStepFromDifferentHandlesAreRefusedNotConfused)
{
  ShardModel a(1, POLYAK_F32, 0, 70), b(1, POLYAK_F32, 0, 71), c(2, POLYAK_F32, 0, 72);
  for (ShardModel *m : {&a, &b, &c})
    m->step(3);
  TempDir dir, aside;
  ASSERT_EQ(polyak_save_shards(a.ranks[0].get(), dir.path.c_str()), POLYAK_OK);
  auto before = dir.entries();
  for (polyak_t *h : {b.ranks[0].get(), c.ranks[1].get()}) { // W equal or not
    EXPECT_EQ(polyak_save_shards(h, dir.path.c_str()), POLYAK_ERR_STATE);
    std::string error = polyak_last_error(h);
    EXPECT_TRUE(contains(error, *before.begin()) && contains(error, "its own directory")) << error;
    EXPECT_EQ(dir.entries(), before) << "nothing written, nothing removed";
  }
  ASSERT_EQ(polyak_save_shards(a.ranks[0].get(), dir.path.c_str()), POLYAK_OK) << "the same save again is the same set";
  // two sets that appeared anyway
  ASSERT_EQ(polyak_save_shards(b.ranks[0].get(), aside.path.c_str()), POLYAK_OK);
  std::string theirs = shard_files(aside)[0];
  write_bytes(dir.file(theirs), read_bytes(aside.file(theirs)));
  Handle h = a.make(1, 0);
  RankState kept = rank_state(h.get());
  EXPECT_EQ(polyak_load_shards(h.get(), dir.path.c_str()), POLYAK_ERR_STATE);
  std::string error = polyak_last_error(h.get());
  EXPECT_TRUE(contains(error, *before.begin()) && contains(error, theirs)) << error;
  EXPECT_TRUE(rank_state(h.get()) == kept);
}

// A stand-in communicator for CPU handles: the backend's ops with a
// comparison that says rank `differs` holds another value (-1: none).
struct FakeComm {
  static int differs, compares;
  polyak_backend_ops ops;
  polyak_t *h;
  const polyak_backend_ops *saved;
  explicit FakeComm(polyak_t *handle) : ops(*handle->ops), h(handle), saved(handle->ops)
  {
    ops.compare = [](polyak_t *, uint64_t, int *other) {
      compares++;
      *other = differs;
      return POLYAK_OK;
    };
    h->ops = &ops;
    h->cfg.nccl_comm = &ops; // never used as a communicator: the CPU backend's agreements are local
  }
  ~FakeComm()
  {
    h->ops = saved;
    h->cfg.nccl_comm = nullptr;
  }
};
int FakeComm::differs = -1, FakeComm::compares = 0;

// With a communicator the ranks compare what they chose: a rank whose
// listing of the directory shows another newest set makes every rank
// refuse the load, before anything changes.
TEST(ShardFaults, RanksThatChooseDifferentSetsRefuseTheLoadTogether)
{
  Saved s;
  auto handles = s.fresh(2);
  FakeComm comm(handles[0].get());
  polyak_t *h = handles[0].get();
  RankState before = rank_state(h);
  FakeComm::differs = 1;
  FakeComm::compares = 0;
  EXPECT_EQ(polyak_load_shards(h, s.dir.path.c_str()), POLYAK_ERR_STATE);
  std::string error = polyak_last_error(h);
  EXPECT_TRUE(contains(error, "chose different sets") && contains(error, rank_file(s.dir, 0, 4)) &&
              contains(error, "rank 1"))
      << error;
  EXPECT_EQ(FakeComm::compares, 1);
  EXPECT_TRUE(rank_state(h) == before) << "a refused load changes nothing";
  FakeComm::differs = -1;
  EXPECT_EQ(polyak_load_shards(h, s.dir.path.c_str()), POLYAK_OK) << polyak_last_error(h);
  EXPECT_EQ(FakeComm::compares, 2);
}

// Ranks whose params differ have different save ids: their files never
// form a set. With a communicator the save says so and writes nothing;
// without one each rank's save succeeds, and a load says why no set is
// complete.
TEST(ShardFaults, RanksWithDifferentSaveIdsAreRefusedWithACommunicatorAndExplainedWithout)
{
  ShardModel m(2, POLYAK_F32, 0, 70), other(2, POLYAK_F32, 0, 71);
  m.step(3);
  other.step(3);
  TempDir dir;
  {
    FakeComm comm(m.ranks[0].get());
    FakeComm::differs = 1;
    polyak_t *h = m.ranks[0].get();
    EXPECT_EQ(polyak_save_shards(h, dir.path.c_str()), POLYAK_ERR_MISMATCH);
    EXPECT_TRUE(contains(polyak_last_error(h), "rank 1's save id")) << polyak_last_error(h);
    EXPECT_TRUE(dir.entries().empty()) << "nothing written";
    FakeComm::differs = -1;
  }
  ASSERT_EQ(polyak_save_shards(m.ranks[0].get(), dir.path.c_str()), POLYAK_OK);
  ASSERT_EQ(polyak_save_shards(other.ranks[1].get(), dir.path.c_str()), POLYAK_OK);
  EXPECT_EQ(shard_files(dir).size(), 2u);
  Handle h = m.make(1, 0);
  EXPECT_EQ(polyak_load_shards(h.get(), dir.path.c_str()), POLYAK_ERR_IO);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "save ids differed")) << polyak_last_error(h.get());
}

TEST(ShardFaults, ASetOfAnotherModelOrOtherSettingsIsAMismatchNamingTheDifference)
{
  Saved s;
  ShardModel bigger(2, POLYAK_F32);
  bigger.sizes.push_back(11);
  bigger.tensors.emplace_back("extra.bias", POLYAK_F32, 11);
  Handle h = bigger.make(2, 1);
  EXPECT_EQ(polyak_load_shards(h.get(), s.dir.path.c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "\"extra.bias\" is missing")) << polyak_last_error(h.get());
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "rank0-of4")) << polyak_last_error(h.get());
  polyak_config cfg = s.m.config(2, 0);
  cfg.seed = 32;
  Handle other = make_handle(cfg);
  for (size_t i = 0; i < s.m.tensors.size(); i++) {
    int64_t shape[2] = {i % 2 ? 1 : s.m.tensors[i].num_elems, s.m.tensors[i].num_elems};
    ASSERT_EQ(polyak_add(other.get(), s.m.tensors[i].name.c_str(), s.m.tensors[i].data(), s.m.tensors[i].dtype,
                         i % 2 ? 2 : 1, shape),
              POLYAK_OK);
  }
  ASSERT_EQ(polyak_add_copy(other.get(), "bn.num_batches_tracked", s.m.counter.data(), POLYAK_I64, 0, nullptr),
            POLYAK_OK);
  int64_t var_shape[1] = {3};
  ASSERT_EQ(polyak_add_copy(other.get(), "bn.running_var", s.m.running_var.data(), POLYAK_F32, 1, var_shape),
            POLYAK_OK);
  s.m.step(6, {}); // finite params again
  ASSERT_EQ(polyak_finalize(other.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_load_shards(other.get(), s.dir.path.c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(other.get()), "seed")) << polyak_last_error(other.get());
}

namespace {

// A line of /proc/self/status ("VmHWM", "VmRSS") in bytes; -1 if absent.
int64_t status_bytes(const char *key)
{
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(std::string(key) + ":", 0) == 0)
      return std::stoll(line.substr(line.find(':') + 1)) * 1024;
  return -1;
}

// The peak resident memory `work` adds to this process: the high-water
// mark reset to the current size first (/proc/self/clear_refs).
int64_t peak_extra(const std::function<void()> &work)
{
  std::ofstream("/proc/self/clear_refs") << "5";
  int64_t before = status_bytes("VmRSS");
  work();
  return status_bytes("VmHWM") - before;
}

} // namespace

TEST(ShardLimits, ARanksExtraMemoryWhileSavingOrLoadingIsOneBlockAndTheHeaders)
{
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "under a sanitizer freed memory stays resident in quarantine: RSS does not measure the buffers";
#endif
  {
    std::ofstream reset("/proc/self/clear_refs");
    if (!(reset << "5").flush())
      GTEST_SKIP() << "/proc/self/clear_refs cannot reset the high-water mark here";
  }
  TempDir dir;
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  if (pid == 0) {                         // a process of its own: the model, the handles and the measures
    mallopt(M_MMAP_THRESHOLD, 128 << 10); // buffers mapped and unmapped each time, as a fresh process would
    const int64_t n = (8 << 20) + 5;      // 32 MiB of f32 shadow: 16 MiB a rank at W = 2, all of it at W = 1
    std::vector<float> big(n), small = {1, 2, 3};
    for (int64_t e = 0; e < n; e++)
      big[e] = 0.5f + 0.001f * (float)(e % 1000);
    auto make = [&](int world, int rank) {
      polyak_config cfg = cpu_config(1, 0.9);
      cfg.world_size = world;
      cfg.rank = rank;
      polyak_t *p = nullptr;
      polyak_create(&p, &cfg);
      int64_t big_shape[1] = {n}, small_shape[1] = {3};
      polyak_add(p, "big", big.data(), POLYAK_F32, 1, big_shape);
      polyak_add(p, "small", small.data(), POLYAK_F32, 1, small_shape);
      polyak_finalize(p, nullptr);
      polyak_update(p, 1, nullptr);
      return p;
    };
    polyak_t *rank0 = make(2, 0), *rank1 = make(2, 1);
    int64_t extra[3] = {-1, -1, -1};
    polyak_status ok[3];
    extra[0] = peak_extra([&] { ok[0] = polyak_save_shards(rank0, dir.path.c_str()); });
    polyak_status saved = polyak_save_shards(rank1, dir.path.c_str());
    polyak_destroy(rank0);
    polyak_destroy(rank1);
    polyak_t *whole = make(1, 0), *half = make(2, 1);
    extra[1] = peak_extra([&] { ok[1] = polyak_load_shards(whole, dir.path.c_str()); });
    extra[2] = peak_extra([&] { ok[2] = polyak_load_shards(half, dir.path.c_str()); });
    for (int i = 0; i < 3; i++)
      extra[i] = ok[i] == POLYAK_OK && saved == POLYAK_OK ? extra[i] : -1;
    ssize_t written = write(fds[1], extra, sizeof extra);
    _exit(written == sizeof extra ? 0 : 1);
  }
  close(fds[1]);
  int64_t extra[3] = {-1, -1, -1};
  ASSERT_EQ(read(fds[0], extra, sizeof extra), (ssize_t)sizeof extra);
  close(fds[0]);
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  const int64_t bound = (4 << 20) + (1 << 20); // the 4 MiB block buffer, and 1 MiB for the headers and the rest
  const char *what[3] = {"save of a 16 MiB slice", "load of the 32 MiB whole at W = 1", "load of a 16 MiB slice"};
  for (int i = 0; i < 3; i++) {
    ASSERT_GE(extra[i], 0) << what[i] << " failed";
    EXPECT_LT(extra[i], bound) << what[i];
    std::printf("peak extra memory, %s: %.2f MiB\n", what[i], extra[i] / 1048576.0);
  }
}
