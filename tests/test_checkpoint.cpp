// test_checkpoint.cpp: safetensors checkpoints: the file's layout, exact
// resume, every kind of damaged or foreign file refused with nothing
// changed, and crash safety under SIGKILL at random points of a save.
#include "test_util.h"

#include <dirent.h>
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

using namespace polyak_test;

namespace {

void write_bytes(const std::string &path, const std::vector<char> &bytes)
{
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), (std::streamsize)bytes.size());
}

// length + header + data
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
  ~Parsed() { json_decref(header); }
  // Re-serializes the (edited) header in front of the same data.
  std::vector<char> bytes() const
  {
    char *text = json_dumps(header, JSON_COMPACT | JSON_PRESERVE_ORDER);
    std::string h(text);
    free(text);
    return assemble(h, data);
  }
  json_t *metadata() const { return json_object_get(header, "__metadata__"); }
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
      cfg.rounding[k] = (stochastic >> k) & 1 ? POLYAK_ROUND_STOCHASTIC : POLYAK_ROUND_NEAREST;
    cfg.seed = 31;
    cfg.schedules[1].kind = POLYAK_SCHEDULE_WARMUP;
    cfg.schedules[2].kind = POLYAK_SCHEDULE_EQUAL;
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
  Snapshot state() { return snapshot(h.get(), 3, tensors); }
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

TEST(Checkpoint, ResumeIsBitIdenticalToAnUninterruptedRun)
{
  // bf16 shadows, and f32 shadows of which two round stochastically
  for (polyak_dtype d : {POLYAK_BF16, POLYAK_F32}) {
    TempDir dir;
    Model whole(d, 1, 0b101), resumed(d, 1, 0b101);
    for (int64_t s : {1, 2, 5})
      whole.step(s);
    ASSERT_EQ(polyak_save(whole.h.get(), dir.file("at5").c_str()), POLYAK_OK);
    for (int64_t s : {6, 9, 10})
      whole.step(s);
    ASSERT_EQ(polyak_load(resumed.h.get(), dir.file("at5").c_str()), POLYAK_OK) << polyak_last_error(resumed.h.get());
    EXPECT_EQ(polyak_update(resumed.h.get(), 5, nullptr), POLYAK_ERR_INVALID_ARG) << "step 5 is done";
    for (int64_t s : {6, 9, 10})
      resumed.step(s);
    EXPECT_TRUE(whole.state() == resumed.state()) << dtype_label(d); // zero_init debias included
  }
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
  for (const char *name : {"format", "format_version", "step", "beta_products", "schedules", "shadow_dtype",
                           "seed", "nonfinite_count", "checksum"})
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
  ASSERT_EQ(polyak_graph_reserve(m.h.get(), 1, 5, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_save(m.h.get(), dir.file("x").c_str()), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_load(m.h.get(), dir.file("x").c_str()), POLYAK_ERR_STATE);
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

// Sets key of schedule k in the metadata's "schedules" list (value stolen).
std::vector<char> set_schedule(const std::vector<char> &bytes, int k, const char *key, json_t *value)
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
    {"HeaderNotJson", POLYAK_ERR_FORMAT, "not JSON",
     [](auto &b) {
       auto out = b;
       out[8] = '[';
       out[9] = '!';
       return out;
     }},
    {"HeaderNotAnObject", POLYAK_ERR_FORMAT, "not a JSON object",
     [](auto &) { return assemble("[1,2]   ", {}); }},
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
    {"OverlappingOffsets", POLYAK_ERR_FORMAT, "overlap",
     [](auto &b) { return set_offsets(b, "head.bias", 0, 12); }},
    {"OffsetsOutOfRange", POLYAK_ERR_FORMAT, "outside",
     [](auto &b) { return set_offsets(b, "head.bias", 1 << 30, (1 << 30) + 12); }},
    {"OffsetsDisagreeWithShape", POLYAK_ERR_FORMAT, "span",
     [](auto &b) { return set_offsets(b, "head.bias", 0, 8); }},
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
    {"OtherShape", POLYAK_ERR_MISMATCH, "another shape",
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
         json_object_set_new(f.header, "extra", json_pack("{s:s,s:[],s:[I,I]}", "dtype", "F32", "shape",
                                                          "data_offsets", (json_int_t)0, (json_int_t)0));
       });
     }},
    {"OtherShadowCount", POLYAK_ERR_MISMATCH, "shadows", [](auto &b) { return set_metadata(b, "num_shadows", "2"); }},
    {"OtherShadowDtype", POLYAK_ERR_MISMATCH, "BF16", [](auto &b) { return set_metadata(b, "shadow_dtype", "BF16"); }},
    {"OtherSeed", POLYAK_ERR_MISMATCH, "seed", [](auto &b) { return set_metadata(b, "seed", "32"); }},
    {"OtherZeroInit", POLYAK_ERR_MISMATCH, "zero_init", [](auto &b) { return set_metadata(b, "zero_init", "1"); }},
    {"OtherSchedule", POLYAK_ERR_MISMATCH, "another schedule",
     [](auto &b) { return set_schedule(b, 0, "beta", json_real(0.95)); }},
    {"OtherRounding", POLYAK_ERR_MISMATCH, "shadow 1 was averaged with stochastic rounding",
     [](auto &b) { return set_schedule(b, 1, "rounding", json_string("stochastic")); }},
    {"UnknownRounding", POLYAK_ERR_FORMAT, "rounding \"sideways\"",
     [](auto &b) { return set_schedule(b, 2, "rounding", json_string("sideways")); }},
};

void PrintTo(const Damage &d, std::ostream *os) { *os << d.label; }

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
  target.step(2); // still works
  EXPECT_EQ(polyak_load(target.h.get(), dir.file("good").c_str()), POLYAK_OK) << polyak_last_error(target.h.get());
}

INSTANTIATE_TEST_SUITE_P(Checkpoint, DamagedFile, ::testing::ValuesIn(kDamages),
                         [](const auto &info) { return std::string(info.param.label); });

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
