// test_checkpoint.cpp: safetensors checkpoints: the file's layout, exact
// resume (from a file, from memory, from inside the trainer's own file),
// every kind of damaged or foreign file refused with nothing changed, and
// crash safety under SIGKILL at random points of a save.
#include "test_util.h"

#include <cfloat>

#include <dirent.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <set>
#include <thread>

#include "polyak_internal.h" // polyak_format_double

using namespace polyak_test;

namespace {

void write_bytes(const std::string &path, const std::vector<char> &bytes)
{
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), (std::streamsize)bytes.size());
}

// length + header + data
// An open file descriptor, closed at the end of its scope.
struct Fd {
  int fd;
  explicit Fd(int f) : fd(f)
  {
    EXPECT_GE(f, 0) << strerror(errno);
  }
  ~Fd()
  {
    if (fd >= 0)
      close(fd);
  }
};

off_t offset_of(int fd)
{
  return lseek(fd, 0, SEEK_CUR);
}

void write_all(int fd, const void *data, size_t num_bytes)
{
  ASSERT_EQ(write(fd, data, num_bytes), (ssize_t)num_bytes) << strerror(errno);
}

// The handle's checkpoint as polyak_save_to_memory writes it.
std::vector<char> save_to_memory(polyak_t *p)
{
  size_t bound = 0, written = 0;
  EXPECT_EQ(polyak_save_size(p, &bound), POLYAK_OK);
  std::vector<char> bytes(bound);
  EXPECT_EQ(polyak_save_to_memory(p, bytes.data(), bytes.size(), &written), POLYAK_OK) << polyak_last_error(p);
  bytes.resize(written);
  return bytes;
}

std::vector<char> assemble(const std::string &header, const std::vector<char> &data)
{
  uint64_t n = header.size();
  std::vector<char> out(8 + header.size() + data.size());
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  std::copy(data.begin(), data.end(), out.begin() + 8 + (long)header.size());
  return out;
}

// The file split into its header (parsed) and data.
struct Parsed {
  json_t *header = nullptr;
  std::vector<char> data;
  uint64_t header_bytes = 0;
  explicit Parsed(const std::vector<char> &bytes)
  {
    std::memcpy(&header_bytes, bytes.data(), 8);
    json_error_t error;
    header = json_loadb(bytes.data() + 8, header_bytes, 0, &error);
    data.assign(bytes.begin() + 8 + (long)header_bytes, bytes.end());
  }
  ~Parsed()
  {
    json_decref(header);
  }
  // Re-serializes the (edited) header in front of the same data.
  std::vector<char> bytes() const
  {
    char *text = json_dumps(header, JSON_COMPACT | JSON_PRESERVE_ORDER);
    std::string h(text);
    free(text);
    return assemble(h, data);
  }
  json_t *metadata() const
  {
    return json_object_get(header, "__metadata__");
  }
};

// A handle in a known state: three shadows, odd sizes, a scalar, an empty tensor.
struct Model {
  std::vector<Tensor> tensors;
  polyak_config cfg;
  Handle h;
  // stochastic: bit k rounds shadow k stochastically
  explicit Model(polyak_dtype shadow_dtype = POLYAK_F32, int zero_init = 0, unsigned stochastic = 0)
  {
    cfg = cpu_config(3);
    cfg.shadow_dtype = shadow_dtype;
    cfg.zero_init = zero_init;
    for (int k = 0; k < 3; k++)
      cfg.shadows[k].rounding = (stochastic >> k) & 1 ? POLYAK_ROUND_STOCHASTIC : POLYAK_ROUND_NEAREST;
    cfg.seed = 31;
    cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
    cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
    tensors.emplace_back("embed.weight", POLYAK_BF16, 65537, 2);
    tensors.emplace_back("head.bias", POLYAK_F32, 3);
    tensors.emplace_back("norm.scale", POLYAK_F16, 1);
    tensors.emplace_back("unused", POLYAK_F32, 0);
    h = make_handle(cfg);
    int64_t embed_shape[2] = {1, 65537}, bias_shape[1] = {3}, empty_shape[2] = {0, 4};
    std::mt19937_64 rng(3);
    for (auto &t : tensors)
      t.randomize(rng);
    EXPECT_EQ(polyak_add(h.get(), "embed.weight", tensors[0].data(), POLYAK_BF16, 2, embed_shape), POLYAK_OK);
    EXPECT_EQ(polyak_add(h.get(), "head.bias", tensors[1].data(), POLYAK_F32, 1, bias_shape), POLYAK_OK);
    EXPECT_EQ(polyak_add(h.get(), "norm.scale", tensors[2].data(), POLYAK_F16, 0, nullptr), POLYAK_OK);
    EXPECT_EQ(polyak_add(h.get(), "unused", tensors[3].data(), POLYAK_F32, 2, empty_shape), POLYAK_OK);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  }
  void step(int64_t step)
  {
    std::mt19937_64 rng(1000 + step);
    for (auto &t : tensors)
      t.randomize(rng);
    tensors[0].set(5, NAN); // the count travels too
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
  }
  Snapshot state()
  {
    return snapshot(h.get(), 3, tensors);
  }
};

TEST(Checkpoint, RoundTripRestoresShadowsAndStepExactly)
{
  for (polyak_dtype d : {POLYAK_F32, POLYAK_BF16}) {
    TempDir dir;
    Model a(d);
    for (int64_t s : {1, 2, 7})
      a.step(s);
    ASSERT_EQ(polyak_save(a.h.get(), dir.file("ema.safetensors").c_str()), POLYAK_OK) << polyak_last_error(a.h.get());
    Model b(d);
    ASSERT_EQ(polyak_load(b.h.get(), dir.file("ema.safetensors").c_str()), POLYAK_OK) << polyak_last_error(b.h.get());
    EXPECT_TRUE(a.state() == b.state());
    EXPECT_EQ(b.state().step, 7);
    EXPECT_EQ(b.state().nonfinite, 3);
  }
}

// A run saved at step 5 with `save`, run on; a fresh handle loaded with
// `load` and run on the same way must end bit-identical to it.
void expect_exact_resume(const std::function<void(polyak_t *)> &save, const std::function<void(polyak_t *)> &load)
{
  // bf16 shadows, and f32 shadows of which two round stochastically
  for (polyak_dtype d : {POLYAK_BF16, POLYAK_F32}) {
    Model whole(d, 1, 0b101), resumed(d, 1, 0b101);
    for (int64_t s : {1, 2, 5})
      whole.step(s);
    save(whole.h.get());
    for (int64_t s : {6, 9, 10})
      whole.step(s);
    load(resumed.h.get());
    EXPECT_EQ(polyak_update(resumed.h.get(), 5, nullptr), POLYAK_ERR_INVALID_ARG) << "step 5 is done";
    for (int64_t s : {6, 9, 10})
      resumed.step(s);
    EXPECT_TRUE(whole.state() == resumed.state()) << dtype_label(d); // zero_init debias included
  }
}

TEST(Checkpoint, ResumeIsBitIdenticalToAnUninterruptedRun)
{
  TempDir dir;
  const std::string path = dir.file("at5");
  expect_exact_resume([&](polyak_t *p) { ASSERT_EQ(polyak_save(p, path.c_str()), POLYAK_OK); },
                      [&](polyak_t *p) { ASSERT_EQ(polyak_load(p, path.c_str()), POLYAK_OK) << polyak_last_error(p); });
}

TEST(Checkpoint, TheFileIsSafetensorsThatPyTorchNamesMatch)
{
  TempDir dir;
  Model m;
  m.step(1);
  ASSERT_EQ(polyak_save(m.h.get(), dir.file("ema").c_str()), POLYAK_OK);
  std::vector<char> bytes = read_bytes(dir.file("ema"));
  Parsed file(bytes);
  ASSERT_TRUE(json_is_object(file.header));
  EXPECT_EQ(file.header_bytes % 8, 0u) << "data starts 8-byte aligned";
  EXPECT_EQ(json_object_size(file.header), 1u + 3 * 4);
  // shadow 0 under the registered name and shape, the others prefixed
  json_t *embed = json_object_get(file.header, "embed.weight");
  EXPECT_STREQ(json_string_value(json_object_get(embed, "dtype")), "F32");
  EXPECT_EQ(json_integer_value(json_array_get(json_object_get(embed, "shape"), 1)), 65537);
  EXPECT_EQ(json_array_size(json_object_get(json_object_get(file.header, "norm.scale"), "shape")), 0u);
  EXPECT_TRUE(json_is_object(json_object_get(file.header, "polyak.shadow.2.head.bias")));
  // the data of shadow 0 of head.bias is what get_shadow reads
  json_t *bias_offsets = json_object_get(json_object_get(file.header, "head.bias"), "data_offsets");
  int64_t begin = json_integer_value(json_array_get(bias_offsets, 0));
  auto expected = read_shadow(m.h.get(), 0, 1, 3);
  EXPECT_EQ(0, std::memcmp(file.data.data() + begin, expected.data(), 12));
  // every metadata value is a string; the state is all there
  const char *key;
  json_t *value;
  json_object_foreach(file.metadata(), key, value)
  {
    EXPECT_TRUE(json_is_string(value)) << key;
  }
  for (const char *name : {"format", "format_version", "step", "beta_products", "schedules", "shadow_dtype", "seed",
                           "nonfinite_count", "checksum"})
    EXPECT_TRUE(json_object_get(file.metadata(), name)) << name;
  EXPECT_STREQ(json_string_value(json_object_get(file.metadata(), "step")), "1");
}

TEST(Checkpoint, SaveLeavesNothingElseBehind)
{
  TempDir dir;
  Model m;
  m.step(1);
  ASSERT_EQ(polyak_save(m.h.get(), dir.file("ema").c_str()), POLYAK_OK);
  m.step(2);
  ASSERT_EQ(polyak_save(m.h.get(), dir.file("ema").c_str()), POLYAK_OK); // replaces it
  EXPECT_EQ(dir.entries(), std::set<std::string>{"ema"});
}

TEST(Checkpoint, IoErrorsForMissingFilesAndUnwritableDirectories)
{
  TempDir dir;
  Model m;
  m.step(1);
  Snapshot before = m.state();
  EXPECT_EQ(polyak_load(m.h.get(), dir.file("missing").c_str()), POLYAK_ERR_IO);
  EXPECT_NE(std::string(polyak_last_error(m.h.get())).find("missing"), std::string::npos);
  write_bytes(dir.file("plain"), {'x'});
  EXPECT_EQ(polyak_save(m.h.get(), dir.file("plain/ema").c_str()), POLYAK_ERR_IO) << "a file is no directory";
  EXPECT_EQ(polyak_save(m.h.get(), "/nonexistent-dir/ema"), POLYAK_ERR_IO);
  EXPECT_EQ(polyak_save(m.h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_load(m.h.get(), ""), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(m.state() == before);
  EXPECT_EQ(dir.entries(), std::set<std::string>{"plain"});
}

TEST(Checkpoint, SaveAndLoadNeedAFinalizedHandleWithoutReservedSteps)
{
  TempDir dir;
  Model m;
  Handle fresh = make_handle(cpu_config());
  EXPECT_EQ(polyak_save(fresh.get(), dir.file("x").c_str()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_load(fresh.get(), dir.file("x").c_str()), POLYAK_ERR_STATE);
  std::vector<char> buffer(1 << 20);
  size_t num_bytes = 0;
  Fd file(open(dir.file("x").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  EXPECT_EQ(polyak_save_fd(fresh.get(), file.fd), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_load_fd(fresh.get(), file.fd), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_save_size(fresh.get(), &num_bytes), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_save_to_memory(fresh.get(), buffer.data(), buffer.size(), &num_bytes), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_load_from_memory(fresh.get(), buffer.data(), buffer.size()), POLYAK_ERR_STATE);
  EXPECT_NE(std::string(polyak_last_error(fresh.get())).find("polyak_load_from_memory: call polyak_finalize first"),
            std::string::npos)
      << polyak_last_error(fresh.get());
  ASSERT_EQ(polyak_graph_reserve(m.h.get(), 1, 5, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_save(m.h.get(), dir.file("x").c_str()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_load(m.h.get(), dir.file("x").c_str()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_save_fd(m.h.get(), file.fd), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_load_fd(m.h.get(), file.fd), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_save_to_memory(m.h.get(), buffer.data(), buffer.size(), &num_bytes), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_load_from_memory(m.h.get(), buffer.data(), buffer.size()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_save_size(m.h.get(), &num_bytes), POLYAK_OK) << "a size needs no current step";
}

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
  int pipe_ends[2];
  ASSERT_EQ(pipe(pipe_ends), 0);
  expect_io(polyak_save_fd(m.h.get(), pipe_ends[1]), "has no offset");
  expect_io(polyak_load_fd(m.h.get(), pipe_ends[0]), "has no offset");
  close(pipe_ends[0]);
  close(pipe_ends[1]);
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

// ---- damaged and foreign files -------------------------------------------------

struct Damage {
  const char *label;
  polyak_status status;
  const char *message_part;
  std::function<std::vector<char>(const std::vector<char> &)> apply;
};

std::vector<char> edit_header(const std::vector<char> &bytes, const std::function<void(Parsed &)> &edit)
{
  Parsed file(bytes);
  edit(file);
  return file.bytes();
}

std::vector<char> set_metadata(const std::vector<char> &bytes, const char *key, const char *value)
{
  return edit_header(bytes, [&](Parsed &f) { json_object_set_new(f.metadata(), key, json_string(value)); });
}

std::vector<char> set_offsets(const std::vector<char> &bytes, const char *name, int64_t begin, int64_t end)
{
  return edit_header(bytes, [&](Parsed &f) {
    json_object_set_new(json_object_get(f.header, name), "data_offsets", json_pack("[I,I]", begin, end));
  });
}

// Schedule k's `key` in the metadata set to `value` (stolen).
std::vector<char> set_schedule_field(const std::vector<char> &bytes, int k, const char *key, json_t *value)
{
  Parsed f(bytes);
  json_error_t e;
  json_t *list = json_loads(json_string_value(json_object_get(f.metadata(), "schedules")), 0, &e);
  json_object_set_new(json_array_get(list, k), key, value);
  char *text = json_dumps(list, JSON_COMPACT);
  json_decref(list);
  auto out = set_metadata(bytes, "schedules", text);
  free(text);
  return out;
}

std::vector<char> with_length(std::vector<char> bytes, uint64_t n)
{
  std::memcpy(bytes.data(), &n, 8);
  return bytes;
}

const Damage kDamages[] = {
    {"Empty", POLYAK_ERR_FORMAT, "too short", [](auto &) { return std::vector<char>(); }},
    {"SevenBytes", POLYAK_ERR_FORMAT, "too short", [](auto &) { return std::vector<char>(7, 0); }},
    {"TruncatedInTheHeader", POLYAK_ERR_FORMAT, "runs past the end",
     [](auto &b) { return std::vector<char>(b.begin(), b.begin() + 100); }},
    {"TruncatedInTheData", POLYAK_ERR_FORMAT, "outside",
     [](auto &b) { return std::vector<char>(b.begin(), b.end() - 10); }},
    {"HeaderLengthBeyondTheFile", POLYAK_ERR_FORMAT, "runs past the end",
     [](auto &b) { return with_length(b, b.size()); }},
    {"HeaderLengthAbsurd", POLYAK_ERR_FORMAT, "absurdly large",
     [](auto &b) { return with_length(b, uint64_t(1) << 60); }},
    {"HeaderNotJson", POLYAK_ERR_FORMAT, "the header is not JSON",
     [](auto &b) {
       auto out = b;
       out[9] = '!'; // after the '{'
       return out;
     }},
    {"HeaderNotAnObject", POLYAK_ERR_FORMAT,
     "is not safetensors: it begins \"\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x00[\", where "
     "safetensors has an 8-byte header length, then '{'",
     [](auto &) { return assemble("[1,2]   ", {}); }},
    {"TextFile", POLYAK_ERR_FORMAT, "is not safetensors: it begins \"# config \"",
     [](auto &) {
       std::string text = "# config for run 7\nlr = 3e-4\n";
       return std::vector<char>(text.begin(), text.end());
     }},
    {"PyTorchZipFile", POLYAK_ERR_FORMAT, "is not safetensors: it begins \"PK\\x03\\x04\\x00\\x00\\x08\\x00\\x00\"",
     [](auto &) {
       std::vector<char> zip = {'P', 'K', 3, 4, 0, 0, 8, 0, 0, 0, 0, 0};
       zip.resize(4096, 0);
       return zip;
     }},
    {"NoMetadata", POLYAK_ERR_FORMAT, "__metadata__",
     [](auto &b) { return edit_header(b, [](Parsed &f) { json_object_del(f.header, "__metadata__"); }); }},
    {"MetadataNotString", POLYAK_ERR_FORMAT, "not a string",
     [](auto &b) {
       return edit_header(b, [](Parsed &f) { json_object_set_new(f.metadata(), "step", json_integer(3)); });
     }},
    {"ForeignFormat", POLYAK_ERR_FORMAT, "not a polyak checkpoint",
     [](auto &b) { return set_metadata(b, "format", "other"); }},
    {"UnknownFormatVersion", POLYAK_ERR_FORMAT, "format version \"2\"",
     [](auto &b) { return set_metadata(b, "format_version", "2"); }},
    {"StepNotANumber", POLYAK_ERR_FORMAT, "\"step\"", [](auto &b) { return set_metadata(b, "step", "12x"); }},
    {"BetaProductsBroken", POLYAK_ERR_FORMAT, "beta_products",
     [](auto &b) { return set_metadata(b, "beta_products", "[0.5, 2.0, 0.1]"); }},
    {"SchedulesBroken", POLYAK_ERR_FORMAT, "schedules", [](auto &b) { return set_metadata(b, "schedules", "{"); }},
    {"ChecksumMalformed", POLYAK_ERR_FORMAT, "checksum",
     [](auto &b) { return set_metadata(b, "checksum", "crc32:1234"); }},
    {"ChecksumMismatch", POLYAK_ERR_FORMAT, "checksum",
     [](auto &b) {
       auto out = b;
       out[out.size() - 3] ^= 0x10;
       return out;
     }},
    {"OverlappingOffsets", POLYAK_ERR_FORMAT, "overlap", [](auto &b) { return set_offsets(b, "head.bias", 0, 12); }},
    {"OffsetsOutOfRange", POLYAK_ERR_FORMAT, "outside",
     [](auto &b) { return set_offsets(b, "head.bias", 1 << 30, (1 << 30) + 12); }},
    {"OffsetsDisagreeWithShape", POLYAK_ERR_FORMAT, "span", [](auto &b) { return set_offsets(b, "head.bias", 0, 8); }},
    {"OffsetsNegative", POLYAK_ERR_FORMAT, "outside", [](auto &b) { return set_offsets(b, "head.bias", -12, 0); }},
    {"UnknownDtype", POLYAK_ERR_FORMAT, "does not know",
     [](auto &b) {
       return edit_header(b, [](Parsed &f) {
         json_object_set_new(json_object_get(f.header, "head.bias"), "dtype", json_string("Q4"));
       });
     }},
    {"OtherDtype", POLYAK_ERR_MISMATCH, "is F16",
     [](auto &b) {
       return edit_header(b, [](Parsed &f) {
         json_object_set_new(json_object_get(f.header, "head.bias"), "dtype", json_string("F16"));
       });
     }},
    {"OtherShape", POLYAK_ERR_MISMATCH, "tensor \"head.bias\" is [1, 3] in the file and [3] here",
     [](auto &b) {
       return edit_header(b, [](Parsed &f) {
         json_object_set_new(json_object_get(f.header, "head.bias"), "shape", json_pack("[I,I]", 1, 3));
       });
     }},
    {"MissingTensor", POLYAK_ERR_MISMATCH, "missing",
     [](auto &b) { return edit_header(b, [](Parsed &f) { json_object_del(f.header, "polyak.shadow.1.head.bias"); }); }},
    {"ExtraTensor", POLYAK_ERR_MISMATCH, "does not register",
     [](auto &b) {
       return edit_header(b, [](Parsed &f) {
         json_object_set_new(
             f.header, "extra",
             json_pack("{s:s,s:[],s:[I,I]}", "dtype", "F32", "shape", "data_offsets", (json_int_t)0, (json_int_t)0));
       });
     }},
    {"OtherShadowCount", POLYAK_ERR_MISMATCH, "shadows", [](auto &b) { return set_metadata(b, "num_shadows", "2"); }},
    {"OtherShadowDtype", POLYAK_ERR_MISMATCH, "BF16", [](auto &b) { return set_metadata(b, "shadow_dtype", "BF16"); }},
    {"OtherSeed", POLYAK_ERR_MISMATCH, "seed", [](auto &b) { return set_metadata(b, "seed", "32"); }},
    {"OtherZeroInit", POLYAK_ERR_MISMATCH, "zero_init", [](auto &b) { return set_metadata(b, "zero_init", "1"); }},
    {"OtherSchedule", POLYAK_ERR_MISMATCH,
     "shadow 0 was averaged with another schedule: the file's is CONSTANT (beta 0.95, start_step 0), this "
     "handle's CONSTANT (beta 0.9, start_step 0)",
     [](auto &b) { return set_schedule_field(b, 0, "beta", json_real(0.95)); }},
    {"OtherGradNormC", POLYAK_ERR_MISMATCH,
     "shadow 1 was averaged with grad_norm_c = 0.25, layerwise_beta0 = 0.0; this handle has 0.0, 0.0",
     [](auto &b) { return set_schedule_field(b, 1, "grad_norm_c", json_real(0.25)); }},
    {"OtherRounding", POLYAK_ERR_MISMATCH, "shadow 1 was averaged with stochastic rounding",
     [](auto &b) { return set_schedule_field(b, 1, "rounding", json_string("stochastic")); }},
    {"UnknownRounding", POLYAK_ERR_FORMAT, "rounding \"sideways\"",
     [](auto &b) { return set_schedule_field(b, 2, "rounding", json_string("sideways")); }},
};

void PrintTo(const Damage &d, std::ostream *os)
{
  *os << d.label;
}

class DamagedFile : public ::testing::TestWithParam<Damage> {};

TEST_P(DamagedFile, IsRefusedWithNothingChanged)
{
  const Damage &damage = GetParam();
  TempDir dir;
  Model source;
  for (int64_t s : {1, 2})
    source.step(s);
  ASSERT_EQ(polyak_save(source.h.get(), dir.file("good").c_str()), POLYAK_OK);
  write_bytes(dir.file("bad"), damage.apply(read_bytes(dir.file("good"))));

  Model target;
  target.step(1);
  Snapshot before = target.state();
  EXPECT_EQ(polyak_load(target.h.get(), dir.file("bad").c_str()), damage.status);
  std::string why = polyak_last_error(target.h.get());
  EXPECT_NE(why.find(damage.message_part), std::string::npos) << why;
  EXPECT_TRUE(target.state() == before);
  // the same bytes from memory: the same verdict
  const std::vector<char> bad = read_bytes(dir.file("bad"));
  EXPECT_EQ(polyak_load_from_memory(target.h.get(), bad.data(), bad.size()), damage.status);
  why = polyak_last_error(target.h.get());
  EXPECT_NE(why.find(damage.message_part), std::string::npos) << why;
  EXPECT_TRUE(target.state() == before);
  target.step(2); // still works
  EXPECT_EQ(polyak_load(target.h.get(), dir.file("good").c_str()), POLYAK_OK) << polyak_last_error(target.h.get());
}

INSTANTIATE_TEST_SUITE_P(Checkpoint, DamagedFile, ::testing::ValuesIn(kDamages),
                         [](const auto &info) { return std::string(info.param.label); });

// A file of another model with other averaging: the tensors are compared first.
TEST(Checkpoint, AnotherModelsFileNamesTheTensorsThatDiffer)
{
  TempDir dir;
  std::vector<Tensor> tensors;
  for (const char *name : {"tok.weight", "head.bias", "ln.g", "ln.b"})
    tensors.emplace_back(name, POLYAK_F32, name[0] == 'h' ? 3 : 10);
  std::mt19937_64 rng(8);
  for (auto &t : tensors)
    t.randomize(rng);
  polyak_config cfg = cpu_config(2, 0.5);
  cfg.seed = 99;
  Handle other = make_handle(cfg);
  add_all(other.get(), tensors);
  ASSERT_EQ(polyak_finalize(other.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_save(other.get(), dir.file("other").c_str()), POLYAK_OK);
  Model m;
  m.step(1);
  Snapshot before = m.state();
  EXPECT_EQ(polyak_load(m.h.get(), dir.file("other").c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_STREQ(polyak_last_error(m.h.get()),
               "polyak_load: the checkpoint is of another model: tensor \"embed.weight\" is missing from the file "
               "(and 2 more); the file has a tensor \"ln.b\" that this handle does not register (and 2 more)");
  // the same names, other shapes: the shapes, before the seed and schedules
  std::vector<Tensor> same_names;
  for (const char *name : {"embed.weight", "head.bias", "norm.scale", "unused"})
    same_names.emplace_back(name, POLYAK_F32, name[0] == 'e' ? 4 : 1);
  Handle resized = make_handle(cfg);
  add_all(resized.get(), same_names);
  ASSERT_EQ(polyak_finalize(resized.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_save(resized.get(), dir.file("resized").c_str()), POLYAK_OK);
  EXPECT_EQ(polyak_load(m.h.get(), dir.file("resized").c_str()), POLYAK_ERR_MISMATCH);
  EXPECT_STREQ(polyak_last_error(m.h.get()),
               "polyak_load: tensor \"embed.weight\" is [4] in the file and [1, 65537] here");
  EXPECT_TRUE(m.state() == before);
}

TEST(Checkpoint, ALoadAtAnotherOffsetSaysWhatItFound)
{
  TempDir dir;
  Model source, target;
  source.step(2);
  std::vector<char> bytes = save_to_memory(source.h.get());
  Fd state(open(dir.file("state").c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  write_all(state.fd, "step=12;", 8);
  write_all(state.fd, bytes.data(), bytes.size());
  ASSERT_EQ(lseek(state.fd, 0, SEEK_SET), 0); // forgot to read the trainer's own state first
  EXPECT_EQ(polyak_load_fd(target.h.get(), state.fd), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(contains(polyak_last_error(target.h.get()), "polyak_load_fd: the file after offset 0 of fd " +
                                                              std::to_string(state.fd) +
                                                              " is not safetensors: it begins \"step=12;"))
      << polyak_last_error(target.h.get());
  EXPECT_EQ(offset_of(state.fd), 0);
  ASSERT_EQ(lseek(state.fd, 8, SEEK_SET), 8);
  ASSERT_EQ(polyak_load_fd(target.h.get(), state.fd), POLYAK_OK) << polyak_last_error(target.h.get());
  EXPECT_TRUE(target.state() == source.state());
}

// ---- numbers in messages and metadata ---------------------------------------------

TEST(Checkpoint, DoublesAreWrittenWithTheFewestDigitsThatReadBack)
{
  const std::pair<double, const char *> cases[] = {{0.99, "0.99"},
                                                   {0.999, "0.999"},
                                                   {0.9999, "0.9999"},
                                                   {0.1 + 0.2, "0.30000000000000004"},
                                                   {1.0, "1.0"},
                                                   {0.0, "0.0"},
                                                   {-0.0, "-0.0"},
                                                   {1e-5, "1e-05"},
                                                   {2.0 / 3.0, "0.6666666666666666"},
                                                   {5e-324, "5e-324"},
                                                   {1e300, "1e+300"},
                                                   {-DBL_MIN, "-2.2250738585072014e-308"},
                                                   {DBL_MAX, "1.7976931348623157e+308"}};
  for (const auto &[value, text] : cases)
    EXPECT_STREQ(polyak_format_double(value).text, text) << text;
  std::mt19937_64 rng(12);
  for (int n = 0; n < 100000; n++) { // any finite double reads back to its bits
    uint64_t bits = rng();
    double value;
    std::memcpy(&value, &bits, 8);
    if (!std::isfinite(value))
      continue;
    double back = std::strtod(polyak_format_double(value).text, nullptr);
    ASSERT_EQ(std::memcmp(&back, &value, 8), 0) << polyak_format_double(value).text;
  }
}

TEST(Checkpoint, MetadataHoldsShortDoublesAndOldSeventeenDigitFilesStillLoad)
{
  TempDir dir;
  Model m;
  for (int64_t s : {1, 2, 7})
    m.step(s);
  ASSERT_EQ(polyak_save(m.h.get(), dir.file("new").c_str()), POLYAK_OK);
  const std::vector<char> new_bytes = read_bytes(dir.file("new"));
  Parsed file(new_bytes);
  const std::string schedules = json_string_value(json_object_get(file.metadata(), "schedules"));
  EXPECT_TRUE(contains(schedules, "\"beta\":0.9,")) << schedules;
  EXPECT_TRUE(contains(schedules, "\"power\":0.6666666666666666,")) << schedules;
  EXPECT_FALSE(contains(schedules, "0.90000000000000002")) << schedules;
  // the writer before: jansson's 17 significant digits, in the same keys
  auto old = edit_header(new_bytes, [](Parsed &f) {
    for (const char *key : {"schedules", "beta_products"}) {
      json_error_t error;
      json_t *value = json_loads(json_string_value(json_object_get(f.metadata(), key)), 0, &error);
      char *text = json_dumps(value, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
      json_object_set_new(f.metadata(), key, json_string(text));
      free(text);
      json_decref(value);
    }
  });
  EXPECT_TRUE(contains(std::string(old.begin(), old.end()), "0.90000000000000002")) << "really the old form";
  write_bytes(dir.file("old"), old);
  Model resumed;
  ASSERT_EQ(polyak_load(resumed.h.get(), dir.file("old").c_str()), POLYAK_OK) << polyak_last_error(resumed.h.get());
  EXPECT_TRUE(resumed.state() == m.state());
  ASSERT_EQ(polyak_save(resumed.h.get(), dir.file("again").c_str()), POLYAK_OK);
  EXPECT_TRUE(read_bytes(dir.file("again")) == new_bytes) << "the same doubles, the same bytes";
}

TEST(Checkpoint, AwkwardBetasAndProductsReadBackBitExactly)
{
  // schedules compare exactly on load, and the products feed zero_init's
  // debias: any rounding in the text would refuse the file or move a bit
  polyak_config cfg = cpu_config(3);
  cfg.zero_init = 1;
  cfg.shadows[0].schedule.beta = std::nextafter(0.9999, 0.0);
  cfg.shadows[1].schedule.beta = 1.0 - std::ldexp(1.0, -53);
  cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[2].schedule.power = 2.0 / 3.0;
  cfg.shadows[2].schedule.inv_gamma = 0.1 + 0.2;
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 257);
  std::mt19937_64 rng(4);
  auto make = [&]() {
    Handle h = make_handle(cfg);
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    return h;
  };
  tensors[0].randomize(rng);
  Handle a = make(), b = make();
  for (int64_t s : {1, 2, 3, 50}) {
    tensors[0].randomize(rng);
    ASSERT_EQ(polyak_update(a.get(), s, nullptr), POLYAK_OK);
  }
  std::vector<char> bytes = save_to_memory(a.get());
  ASSERT_EQ(polyak_load_from_memory(b.get(), bytes.data(), bytes.size()), POLYAK_OK) << polyak_last_error(b.get());
  for (int k = 0; k < 3; k++) {
    double pa, pb;
    ASSERT_EQ(polyak_get_beta_product(a.get(), k, &pa), POLYAK_OK);
    ASSERT_EQ(polyak_get_beta_product(b.get(), k, &pb), POLYAK_OK);
    EXPECT_EQ(std::memcmp(&pa, &pb, 8), 0) << "shadow " << k << ": " << pa << " vs " << pb;
  }
  EXPECT_TRUE(snapshot(a.get(), 3, tensors) == snapshot(b.get(), 3, tensors));
}

// ---- crash safety ------------------------------------------------------------------

TEST(Checkpoint, FilesFromBeforeTheNewerModesStillLoad)
{
  // files written before update counting, Lookahead, grad-norm, LAWA and
  // rounding modes lack their keys; absent means off (rounded to nearest)
  TempDir dir;
  Model m;
  m.step(1);
  ASSERT_EQ(polyak_save(m.h.get(), dir.file("new").c_str()), POLYAK_OK);
  auto old = edit_header(read_bytes(dir.file("new")), [](Parsed &f) {
    json_object_del(f.metadata(), "lookahead_every");
    json_object_del(f.metadata(), "update_counts");
    json_error_t error;
    json_t *schedules = json_loads(json_string_value(json_object_get(f.metadata(), "schedules")), 0, &error);
    size_t k;
    json_t *schedule;
    json_array_foreach(schedules, k, schedule)
    {
      for (const char *key : {"count_updates", "grad_norm_c", "layerwise_beta0", "rounding"})
        json_object_del(schedule, key);
    }
    char *text = json_dumps(schedules, JSON_COMPACT);
    json_object_set_new(f.metadata(), "schedules", json_string(text));
    free(text);
    json_decref(schedules);
  });
  write_bytes(dir.file("old"), old);
  Model resumed;
  ASSERT_EQ(polyak_load(resumed.h.get(), dir.file("old").c_str()), POLYAK_OK) << polyak_last_error(resumed.h.get());
  EXPECT_TRUE(resumed.state() == m.state());
  Model stochastic(POLYAK_F32, 0, 0b010);
  EXPECT_EQ(polyak_load(stochastic.h.get(), dir.file("old").c_str()), POLYAK_ERR_MISMATCH)
      << "an old file's shadows were rounded to nearest";
}

TEST(Checkpoint, KilledSavesLeaveTheOldOrTheNewFileWhole)
{
  TempDir dir;
  const std::string target = dir.file("ema");
  // two handles in different states; a child saves them in turn, forever
  Model a, b;
  a.step(10);
  b.step(20);
  ASSERT_EQ(polyak_save(a.h.get(), target.c_str()), POLYAK_OK);
  Snapshot state_a = a.state(), state_b = b.state();
  std::mt19937_64 rng(99);
  int of_a = 0, of_b = 0;
  const int kills = 200;
  for (int kill_index = 0; kill_index < kills; kill_index++) {
    pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      for (;;) {
        polyak_save(b.h.get(), target.c_str());
        polyak_save(a.h.get(), target.c_str());
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, 20000)(rng)));
    kill(child, SIGKILL);
    int wstatus;
    waitpid(child, &wstatus, 0);
    Model reader;
    ASSERT_EQ(polyak_load(reader.h.get(), target.c_str()), POLYAK_OK)
        << "kill " << kill_index << ": " << polyak_last_error(reader.h.get());
    Snapshot got = reader.state();
    ASSERT_TRUE(got == state_a || got == state_b) << "kill " << kill_index;
    (got == state_a ? of_a : of_b)++;
    // besides the target, at most a temporary name from the instant between link and rename
    for (const std::string &name : dir.entries())
      ASSERT_TRUE(name == "ema" || name.rfind(".ema.polyak-", 0) == 0) << name;
  }
  std::printf("%d kills: the file held the first state %d times, the second %d times\n", kills, of_a, of_b);
}

} // namespace
