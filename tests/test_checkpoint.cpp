// test_checkpoint.cpp: safetensors checkpoints: the file's layout, exact
// resume, the numbers in metadata, and crash safety under SIGKILL at random
// points of a save.
#include "checkpoint_util.h"

#include "checkpoint/safe_file.h"

using namespace polyak_test;

namespace {

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
  Model refused; // format 2 holds the one text the writer gives a value
  std::vector<char> resealed = reseal(old);
  EXPECT_EQ(polyak_load_from_memory(refused.h.get(), resealed.data(), resealed.size()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(contains(polyak_last_error(refused.h.get()), "beta_products")) << polyak_last_error(refused.h.get());
  old = as_format_1(old); // files of the format before
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

// ---- files of earlier versions ---------------------------------------------------

TEST(Checkpoint, FilesFromBeforeTheNewerModesStillLoad)
{
  // format 1 files written before update counting, Lookahead, grad-norm,
  // LAWA and rounding modes lack their keys; absent means off (rounded to
  // nearest)
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
  write_bytes(dir.file("old"), as_format_1(old));
  Model resumed;
  ASSERT_EQ(polyak_load(resumed.h.get(), dir.file("old").c_str()), POLYAK_OK) << polyak_last_error(resumed.h.get());
  EXPECT_TRUE(resumed.state() == m.state());
  Model stochastic(POLYAK_F32, 0, 0b010);
  EXPECT_EQ(polyak_load(stochastic.h.get(), dir.file("old").c_str()), POLYAK_ERR_MISMATCH)
      << "an old file's shadows were rounded to nearest";
}

// The run that wrote tests/fixtures/checkpoint-0.1.0.safetensors (its
// README), rebuilt with the 1.0 config.
struct Run010 {
  float w[15];
  uint16_t b[7];
  int64_t n[1];
  Handle h;
  void fill(int step)
  {
    for (int i = 0; i < 15; i++)
      w[i] = sinf(0.37f * (float)i + (float)step);
    for (int i = 0; i < 7; i++)
      b[i] = polyak_f32_to_bf16_rne(cosf(0.91f * (float)i - (float)step));
    n[0] = 1000 + step;
  }
  Run010()
  {
    polyak_config cfg;
    polyak_config_init(&cfg);
    cfg.num_shadows = 3;
    cfg.seed = 42;
    cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_WARMUP;
    cfg.shadows[0].schedule.beta = 0.9999;
    cfg.shadows[0].rounding = POLYAK_ROUND_STOCHASTIC;
    cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_POWER;
    cfg.shadows[1].schedule.gamma = 6.94;
    cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_EQUAL;
    cfg.shadows[2].count_updates = 1;
    h = make_handle(cfg);
    fill(0);
    const int64_t ws[2] = {3, 5}, bs[1] = {7}, ns[1] = {1};
    EXPECT_EQ(polyak_add(h.get(), "w", w, POLYAK_F32, 2, ws), POLYAK_OK);
    EXPECT_EQ(polyak_add(h.get(), "b", b, POLYAK_BF16, 1, bs), POLYAK_OK);
    EXPECT_EQ(polyak_add_copy(h.get(), "n", n, POLYAK_I64, 1, ns), POLYAK_OK);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  void update(int step)
  {
    fill(step);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  std::vector<char> state()
  {
    return save_to_memory(h.get());
  }
  std::vector<float> shadow(int k, int tensor, int64_t num_elems)
  {
    return read_shadow(h.get(), k, tensor, num_elems);
  }
};

TEST(Checkpoint, FilesFrom010LoadAndContinueAsTheRunThatWroteThem)
{
  const std::string fixture = std::string(POLYAK_TEST_FIXTURES) + "/checkpoint-0.1.0.safetensors";
  Run010 whole, resumed;
  for (int step : {1, 2, 5, 9})
    whole.update(step);
  ASSERT_EQ(polyak_load(resumed.h.get(), fixture.c_str()), POLYAK_OK) << polyak_last_error(resumed.h.get());
  int64_t step = 0;
  ASSERT_EQ(polyak_get_step(resumed.h.get(), &step), POLYAK_OK);
  EXPECT_EQ(step, 9);
  for (int k = 0; k < 3; k++) {
    EXPECT_EQ(resumed.shadow(k, 0, 15), whole.shadow(k, 0, 15)) << "shadow " << k;
    EXPECT_EQ(resumed.shadow(k, 1, 7), whole.shadow(k, 1, 7)) << "shadow " << k;
  }
  for (int s : {10, 14}) { // the step state came back too: the same bits after more updates
    whole.update(s);
    resumed.update(s);
  }
  for (int k = 0; k < 3; k++)
    EXPECT_EQ(resumed.shadow(k, 0, 15), whole.shadow(k, 0, 15)) << "shadow " << k;
  EXPECT_TRUE(resumed.state() == whole.state());
}

// ---- crash safety ------------------------------------------------------------------

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
  // a temporary left by a kill between link and rename is gone after a save
  ASSERT_EQ(polyak_save(a.h.get(), target.c_str()), POLYAK_OK);
  EXPECT_EQ(dir.entries(), std::set<std::string>{"ema"});
}

// A child that gives its new file a temporary name, as a save does before
// renaming it over the target, and exits there (a crash) or, with `ready`,
// says so and waits to be killed. Returns its pid.
pid_t linker(const std::string &target, int ready = -1)
{
  pid_t child = fork();
  if (child != 0)
    return child;
  polyak_safe_file f;
  if (polyak_safe_file_open(&f, target.c_str()) != 0 || polyak_safe_file_pwrite(&f, "partial", 7, 0) != 0 ||
      polyak_safe_file_link(&f) != 0)
    _exit(1);
  if (ready >= 0) {
    (void)!write(ready, "r", 1);
    pause();
  }
  _exit(0);
}

TEST(Checkpoint, SavesRemoveTheTemporariesOfDeadWritersOfThisHostOnly)
{
  TempDir dir;
  const std::string target = dir.file("ema");
  Model m;
  m.step(1);
  ASSERT_EQ(polyak_save(m.h.get(), target.c_str()), POLYAK_OK);
  char tag[17];
  ASSERT_EQ(polyak_safe_file_host_tag(tag), 0) << "this host has a boot id";
  auto temporary = [&](pid_t pid, const std::string &base = "ema") {
    return "." + base + ".polyak-" + tag + "-" + std::to_string(pid) + "-0";
  };
  pid_t dead = linker(target);
  int wstatus;
  ASSERT_EQ(waitpid(dead, &wstatus, 0), dead);
  ASSERT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
  EXPECT_EQ(dir.entries(), (std::set<std::string>{"ema", temporary(dead)})) << "the crash's litter";
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t live = linker(target, ready[1]);
  char byte;
  ASSERT_EQ(read(ready[0], &byte, 1), 1);
  // names this save must keep: another host's (or container's), an older
  // version's (no host), a file of the user's that only looks alike
  const std::set<std::string> kept = {".ema.polyak-0123456789abcdef-" + std::to_string(dead) + "-0",
                                      ".ema.polyak-" + std::to_string(dead) + "-0",
                                      ".ema.polyak-" + std::string(tag) + "-" + std::to_string(dead) + "-x",
                                      "ema.polyak-" + std::string(tag) + "-" + std::to_string(dead) + "-0"};
  for (const std::string &name : kept)
    write_bytes(dir.file(name), {'k'});
  write_bytes(dir.file(temporary(dead, "other.safetensors")), {'d'}); // another target's dead one
  m.step(2);
  ASSERT_EQ(polyak_save(m.h.get(), target.c_str()), POLYAK_OK);
  std::set<std::string> expected = kept;
  expected.insert({"ema", temporary(live)});
  EXPECT_EQ(dir.entries(), expected) << "the dead writers' temporaries went, the living one's stayed";
  kill(live, SIGKILL);
  ASSERT_EQ(waitpid(live, &wstatus, 0), live);
  close(ready[0]);
  close(ready[1]);
  m.step(3);
  ASSERT_EQ(polyak_save(m.h.get(), target.c_str()), POLYAK_OK);
  expected.erase(temporary(live));
  EXPECT_EQ(dir.entries(), expected);
  Model reader;
  ASSERT_EQ(polyak_load(reader.h.get(), target.c_str()), POLYAK_OK) << polyak_last_error(reader.h.get());
  EXPECT_TRUE(reader.state() == m.state());
}

} // namespace
