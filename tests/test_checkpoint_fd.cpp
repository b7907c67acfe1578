// test_checkpoint_fd.cpp: checkpoints inside the trainer's own file (an fd at
// an offset) and in memory: the same bytes, exact resume, fds refused.
#include "checkpoint_util.h"

using namespace polyak_test;

namespace {

// ---- inside the trainer's own file, and in memory ---------------------------------

TEST(Checkpoint, MemoryAndFdSavesWriteTheFileBytes)
{
  for (polyak_dtype d : {POLYAK_F32, POLYAK_BF16}) {
    TempDir dir;
    Model m(d);
    for (int64_t s : {1, 2, 7})
      m.step(s);
    ASSERT_EQ(polyak_save(m.h.get(), dir.file("ema").c_str()), POLYAK_OK);
    const std::vector<char> file = read_bytes(dir.file("ema"));
    EXPECT_TRUE(save_to_memory(m.h.get()) == file);
    const std::string prefix = "the trainer's own state";
    Fd state(open(dir.file("state").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    write_all(state.fd, prefix.data(), prefix.size());
    ASSERT_EQ(polyak_save_fd(m.h.get(), state.fd), POLYAK_OK) << polyak_last_error(m.h.get());
    EXPECT_EQ(offset_of(state.fd), (off_t)(prefix.size() + file.size())) << "the offset moves past the checkpoint";
    const std::vector<char> written = read_bytes(dir.file("state"));
    EXPECT_TRUE(std::vector<char>(written.begin() + (long)prefix.size(), written.end()) == file);
  }
}

TEST(Checkpoint, SaveSizeHoldsForTheHandlesWholeLife)
{
  Model m;
  size_t bound = 0, later = 0;
  ASSERT_EQ(polyak_save_size(m.h.get(), &bound), POLYAK_OK);
  for (int64_t s : {int64_t(1), int64_t(2), int64_t(1000), int64_t(999999999999)}) { // the step's text grows
    m.step(s);
    size_t written = save_to_memory(m.h.get()).size();
    EXPECT_LE(written, bound);
    EXPECT_LT(bound - written, 256u) << "a bound, not a guess";
    ASSERT_EQ(polyak_save_size(m.h.get(), &later), POLYAK_OK);
    EXPECT_EQ(later, bound);
  }
  EXPECT_EQ(polyak_save_size(m.h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
}

TEST(Checkpoint, AShortDestinationIsRefusedWithNothingWritten)
{
  Model m;
  m.step(3);
  Snapshot before = m.state();
  const size_t need = save_to_memory(m.h.get()).size();
  std::vector<unsigned char> buffer(need + 64, 0x5A);
  size_t written = 12345;
  EXPECT_EQ(polyak_save_to_memory(m.h.get(), buffer.data(), need - 1, &written), POLYAK_ERR_INVALID_ARG);
  std::string why = polyak_last_error(m.h.get());
  EXPECT_TRUE(contains(why, "dst_num_bytes is " + std::to_string(need - 1))) << why;
  EXPECT_TRUE(contains(why, "takes " + std::to_string(need) + " bytes")) << why;
  EXPECT_TRUE(contains(why, "polyak_save_size")) << why;
  EXPECT_EQ(written, 12345u);
  EXPECT_TRUE(std::all_of(buffer.begin(), buffer.end(), [](unsigned char c) { return c == 0x5A; }))
      << "nothing written, not even before the end";
  EXPECT_EQ(polyak_save_to_memory(m.h.get(), nullptr, need, &written), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(m.h.get()), "dst is NULL"));
  EXPECT_EQ(polyak_save_to_memory(m.h.get(), buffer.data(), need, nullptr), POLYAK_ERR_INVALID_ARG);
  ASSERT_EQ(polyak_save_to_memory(m.h.get(), buffer.data(), need, &written), POLYAK_OK) << "exactly enough";
  EXPECT_EQ(written, need);
  EXPECT_TRUE(std::all_of(buffer.begin() + (long)need, buffer.end(), [](unsigned char c) { return c == 0x5A; }));
  EXPECT_TRUE(m.state() == before);
}

TEST(Checkpoint, AMemoryCheckpointResumesBitIdentically)
{
  std::vector<char> at5;
  expect_exact_resume([&](polyak_t *p) { at5 = save_to_memory(p); },
                      [&](polyak_t *p) {
                        ASSERT_EQ(polyak_load_from_memory(p, at5.data(), at5.size()), POLYAK_OK)
                            << polyak_last_error(p);
                      });
}

TEST(Checkpoint, ACheckpointBetweenTheTrainersOwnStateResumesBitIdentically)
{
  // an llm.c-style state file: the trainer's header, the EMA, the trainer's
  // optimizer state after it
  TempDir dir;
  const std::string path = dir.file("train.state");
  const int64_t trainer_header[4] = {20240501, 5, 1001, -7};
  std::vector<float> moments(1001);
  std::mt19937_64 rng(5);
  for (float &x : moments)
    x = std::normal_distribution<float>(0.0f, 1.0f)(rng);
  auto save = [&](polyak_t *p) {
    Fd state(open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    write_all(state.fd, trainer_header, sizeof trainer_header);
    ASSERT_EQ(polyak_save_fd(p, state.fd), POLYAK_OK) << polyak_last_error(p);
    write_all(state.fd, moments.data(), moments.size() * sizeof(float));
    ASSERT_EQ(fsync(state.fd), 0);
  };
  auto load = [&](polyak_t *p) {
    Fd state(open(path.c_str(), O_RDONLY | O_CLOEXEC));
    int64_t header_back[4];
    ASSERT_EQ(read(state.fd, header_back, sizeof header_back), (ssize_t)sizeof header_back);
    EXPECT_EQ(0, std::memcmp(header_back, trainer_header, sizeof header_back));
    ASSERT_EQ(polyak_load_fd(p, state.fd), POLYAK_OK) << polyak_last_error(p);
    std::vector<float> moments_back(moments.size() + 1);
    ASSERT_EQ(read(state.fd, moments_back.data(), moments_back.size() * sizeof(float)),
              (ssize_t)(moments.size() * sizeof(float)))
        << "the load stopped exactly where the trainer's state goes on";
    moments_back.resize(moments.size());
    EXPECT_TRUE(moments_back == moments);
  };
  expect_exact_resume(save, load);
}

TEST(Checkpoint, AStdioTrainerFileAroundTheCheckpointAsTheReadmeShows)
{
  TempDir dir;
  const std::string path = dir.file("state");
  Model saved, loaded;
  saved.step(4);
  const std::string head(100, 'H'), tail(5000, 'T'); // more than a stdio buffer after it
  FILE *f = std::fopen(path.c_str(), "wb");
  ASSERT_TRUE(f);
  std::fwrite(head.data(), 1, head.size(), f);
  std::fflush(f);
  ASSERT_EQ(polyak_save_fd(saved.h.get(), fileno(f)), POLYAK_OK) << polyak_last_error(saved.h.get());
  std::fseek(f, lseek(fileno(f), 0, SEEK_CUR), SEEK_SET);
  std::fwrite(tail.data(), 1, tail.size(), f);
  std::fclose(f);
  f = std::fopen(path.c_str(), "rb");
  ASSERT_TRUE(f);
  std::string head_back(head.size(), '\0'), tail_back(tail.size() + 1, '\0');
  ASSERT_EQ(std::fread(&head_back[0], 1, head_back.size(), f), head.size());
  std::fflush(f); // stdio read ahead: this puts the fd's offset back
  ASSERT_EQ(polyak_load_fd(loaded.h.get(), fileno(f)), POLYAK_OK) << polyak_last_error(loaded.h.get());
  std::fseek(f, lseek(fileno(f), 0, SEEK_CUR), SEEK_SET);
  tail_back.resize(std::fread(&tail_back[0], 1, tail_back.size(), f));
  std::fclose(f);
  EXPECT_EQ(head_back, head);
  EXPECT_EQ(tail_back, tail);
  EXPECT_TRUE(loaded.state() == saved.state());
}

TEST(Checkpoint, FdsItCannotUseAreIoErrorsWithAMessage)
{
  TempDir dir;
  Model m;
  m.step(1);
  Snapshot before = m.state();
  const std::string good = dir.file("good");
  ASSERT_EQ(polyak_save(m.h.get(), good.c_str()), POLYAK_OK);
  const std::vector<char> good_bytes = read_bytes(good);
  auto expect_io = [&](polyak_status status, const std::string &part) {
    EXPECT_EQ(status, POLYAK_ERR_IO) << part;
    EXPECT_TRUE(contains(polyak_last_error(m.h.get()), part)) << polyak_last_error(m.h.get());
  };
  int closed = open(good.c_str(), O_RDONLY | O_CLOEXEC);
  close(closed);
  expect_io(polyak_save_fd(m.h.get(), closed), "polyak_save_fd: fd " + std::to_string(closed) + ": Bad file");
  expect_io(polyak_load_fd(m.h.get(), closed), "polyak_load_fd: fd " + std::to_string(closed) + ": Bad file");
  expect_io(polyak_save_fd(m.h.get(), -1), "fd -1");
  {
    Fd read_only(open(good.c_str(), O_RDONLY | O_CLOEXEC));
    expect_io(polyak_save_fd(m.h.get(), read_only.fd), "is not open for writing");
    ASSERT_EQ(lseek(read_only.fd, 0, SEEK_END), (off_t)good_bytes.size());
    expect_io(polyak_load_fd(m.h.get(), read_only.fd), "is at the end of its file");
    EXPECT_EQ(offset_of(read_only.fd), (off_t)good_bytes.size());
  }
  {
    Fd write_only(open(dir.file("w").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    expect_io(polyak_load_fd(m.h.get(), write_only.fd), "is not open for reading");
    Fd append(open(dir.file("a").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    expect_io(polyak_save_fd(m.h.get(), append.fd), "O_APPEND");
  }
  int pipe_ends[2]; // a save completes its header after the data: it needs positions
  ASSERT_EQ(pipe(pipe_ends), 0);
  expect_io(polyak_save_fd(m.h.get(), pipe_ends[1]), "has no offset");
  close(pipe_ends[0]);
  close(pipe_ends[1]);
  Fd directory(open(dir.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  expect_io(polyak_load_fd(m.h.get(), directory.fd), "is a directory");
  if (access("/dev/full", W_OK) == 0) { // every write fails: no space left
    Fd full(open("/dev/full", O_WRONLY | O_CLOEXEC));
    expect_io(polyak_save_fd(m.h.get(), full.fd), "cannot write to fd");
    EXPECT_EQ(offset_of(full.fd), 0) << "a failed save leaves the offset";
  }
  EXPECT_TRUE(read_bytes(good) == good_bytes);
  EXPECT_TRUE(read_bytes(dir.file("a")).empty());
  EXPECT_TRUE(m.state() == before);
  m.step(2); // still works
}

TEST(Checkpoint, AFailedFdLoadLeavesTheOffsetAndTheHandle)
{
  TempDir dir;
  Model source, target;
  source.step(2);
  target.step(1);
  Snapshot before = target.state();
  std::vector<char> bytes = save_to_memory(source.h.get());
  const std::string prefix = "0123456789abcdef";
  for (int damage = 0; damage < 2; damage++) {
    std::vector<char> damaged = bytes;
    if (damage == 0)
      damaged[damaged.size() - 3] ^= 0x10; // the checksum finds it
    else
      damaged.resize(damaged.size() - 10); // the file ends inside the data
    Fd state(open(dir.file("state").c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    write_all(state.fd, prefix.data(), prefix.size());
    write_all(state.fd, damaged.data(), damaged.size());
    ASSERT_EQ(lseek(state.fd, (off_t)prefix.size(), SEEK_SET), (off_t)prefix.size());
    EXPECT_EQ(polyak_load_fd(target.h.get(), state.fd), POLYAK_ERR_FORMAT);
    EXPECT_TRUE(contains(polyak_last_error(target.h.get()), damage == 0 ? "checksum" : "outside"))
        << polyak_last_error(target.h.get());
    EXPECT_EQ(offset_of(state.fd), (off_t)prefix.size());
    EXPECT_TRUE(target.state() == before);
  }
  target.step(2); // still works
}

TEST(Checkpoint, TruncatedOrPaddedBuffersAreRefusedWithNothingChanged)
{
  Model source, target;
  source.step(2);
  target.step(1);
  Snapshot before = target.state();
  std::vector<char> bytes = save_to_memory(source.h.get());
  uint64_t header_bytes;
  std::memcpy(&header_bytes, bytes.data(), 8);
  const size_t n = bytes.size(), header_end = 8 + header_bytes;
  for (size_t length : {size_t(0), size_t(1), size_t(7), size_t(8), size_t(9), size_t(100), header_end - 1, header_end,
                        header_end + 1, n / 2, n - 1}) {
    EXPECT_EQ(polyak_load_from_memory(target.h.get(), bytes.data(), length), POLYAK_ERR_FORMAT) << length;
    EXPECT_TRUE(contains(polyak_last_error(target.h.get()), "polyak_load_from_memory: "));
    EXPECT_TRUE(target.state() == before) << length;
  }
  EXPECT_TRUE(contains(polyak_last_error(target.h.get()), "outside the")) << polyak_last_error(target.h.get());
  bytes.push_back(0); // one byte too many: a buffer holds one checkpoint exactly
  EXPECT_EQ(polyak_load_from_memory(target.h.get(), bytes.data(), bytes.size()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(contains(polyak_last_error(target.h.get()), "belong to no tensor")) << polyak_last_error(target.h.get());
  EXPECT_EQ(polyak_load_from_memory(target.h.get(), nullptr, 8), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(target.state() == before);
  target.step(2); // still works
  ASSERT_EQ(polyak_load_from_memory(target.h.get(), bytes.data(), n), POLYAK_OK) << polyak_last_error(target.h.get());
  EXPECT_TRUE(target.state() == source.state());
}

} // namespace
