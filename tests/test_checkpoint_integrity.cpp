// test_checkpoint_integrity.cpp: nothing loads that was not written. The
// checksum covers every byte of the header; numbers have one text each; the
// param dtypes and skip_nonfinite must match, the library version need not.
#include "checkpoint_util.h"

#include <cctype>

using namespace polyak_test;

namespace {

// A model whose checkpoint is under 4 KiB and whose every piece of state
// shows: zero_init (the products debias every read), a shadow that counts
// updates (update_counts), stochastic rounding, a bf16 param, a copy-only
// tensor, non-finite params (the count).
struct Small {
  std::vector<Tensor> tensors; // w (f32), b (bf16), n (copy-only, f32)
  Handle h;
  explicit Small(int skip_nonfinite = 1, polyak_dtype b_dtype = POLYAK_BF16)
  {
    polyak_config cfg = cpu_config(3);
    cfg.zero_init = 1;
    cfg.skip_nonfinite = skip_nonfinite;
    cfg.seed = 77;
    cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_WARMUP;
    cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
    cfg.shadows[1].count_updates = 1;
    cfg.shadows[2].rounding = POLYAK_ROUND_STOCHASTIC;
    tensors.emplace_back("w", POLYAK_F32, 6);
    tensors.emplace_back("b", b_dtype, 4);
    tensors.emplace_back("n", POLYAK_F32, 2);
    h = make_handle(cfg);
    std::mt19937_64 rng(5);
    for (auto &t : tensors)
      t.randomize(rng, 0.5f);
    int64_t w_shape[2] = {2, 3}, b_shape[1] = {4}, n_shape[1] = {2};
    EXPECT_EQ(polyak_add(h.get(), "w", tensors[0].data(), POLYAK_F32, 2, w_shape), POLYAK_OK);
    EXPECT_EQ(polyak_add(h.get(), "b", tensors[1].data(), b_dtype, 1, b_shape), POLYAK_OK);
    EXPECT_EQ(polyak_add_copy(h.get(), "n", tensors[2].data(), POLYAK_F32, 1, n_shape), POLYAK_OK);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  void step(int64_t step)
  {
    std::mt19937_64 rng(500 + step);
    for (auto &t : tensors)
      t.randomize(rng, 0.5f);
    tensors[0].set(step % 6, NAN);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
  }
  // Every shadow's bits, the copy, the step, the count and each product's bits.
  std::vector<uint64_t> state()
  {
    std::vector<uint64_t> out;
    int64_t step = -1, nonfinite = -1;
    EXPECT_EQ(polyak_get_step(h.get(), &step), POLYAK_OK);
    EXPECT_EQ(polyak_nonfinite_count(h.get(), &nonfinite), POLYAK_OK);
    out.push_back((uint64_t)step);
    out.push_back((uint64_t)nonfinite);
    for (int k = 0; k < 3; k++) {
      double product;
      EXPECT_EQ(polyak_get_beta_product(h.get(), k, &product), POLYAK_OK);
      uint64_t bits;
      std::memcpy(&bits, &product, 8);
      out.push_back(bits);
      for (int i = 0; i < 2; i++)
        for (float x : read_shadow(h.get(), k, i, tensors[i].num_elems))
          out.push_back(float_bits(x));
    }
    for (float x : read_shadow(h.get(), 0, 2, 2))
      out.push_back(float_bits(x));
    return out;
  }
};

// One load of `bytes` into `target` (memory, a path, or an fd after a
// prefix) must fail with the target as it was, or restore `saved` exactly:
// the same state, and the same next update (update_counts).
struct BitFlips {
  TempDir dir;
  Small source, target;
  std::vector<char> saved_bytes, target_bytes;
  std::vector<uint64_t> saved, before;
  int refused = 0, accepted = 0;

  BitFlips()
  {
    for (int64_t s : {1, 2, 5, 9})
      source.step(s);
    target.step(3);
    saved_bytes = save_to_memory(source.h.get());
    target_bytes = save_to_memory(target.h.get());
    saved = source.state();
    before = target.state();
  }
  void check(polyak_status status, const char *how, size_t bit)
  {
    if (status != POLYAK_OK) {
      refused++;
      ASSERT_TRUE(status == POLYAK_ERR_FORMAT || status == POLYAK_ERR_MISMATCH || status == POLYAK_ERR_IO)
          << how << " bit " << bit << ": " << polyak_status_name(status);
      ASSERT_TRUE(target.state() == before) << how << " bit " << bit << " changed the handle";
      return;
    }
    accepted++;
    ASSERT_TRUE(target.state() == saved) << how << " bit " << bit << " loaded another state";
    Small twin; // the saved run, continued, against the loaded one, continued
    ASSERT_EQ(polyak_load_from_memory(twin.h.get(), saved_bytes.data(), saved_bytes.size()), POLYAK_OK);
    target.step(12);
    twin.step(12);
    ASSERT_TRUE(target.state() == twin.state()) << how << " bit " << bit << " continues otherwise";
    ASSERT_EQ(polyak_load_from_memory(target.h.get(), target_bytes.data(), target_bytes.size()), POLYAK_OK);
  }
};

TEST(CheckpointIntegrity, EveryBitFlipIsRefusedWithNothingChangedOrLoadsTheSavedState)
{
  BitFlips t;
  const std::vector<char> &good = t.saved_bytes;
  ASSERT_LE(good.size(), 4096u);
  const std::string path = t.dir.file("ema"), state_path = t.dir.file("state"), prefix = "trainer";
  write_bytes(path, good);
  Fd file(open(path.c_str(), O_RDWR | O_CLOEXEC));
  Fd state(open(state_path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  write_all(state.fd, prefix.data(), prefix.size());
  write_all(state.fd, good.data(), good.size());
  std::vector<char> bytes = good;
  for (size_t bit = 0; bit < 8 * good.size(); bit++) {
    size_t at = bit / 8;
    char flipped = (char)(good[at] ^ (1 << (bit % 8)));
    bytes[at] = flipped;
    ASSERT_EQ(pwrite(file.fd, &flipped, 1, (off_t)at), 1);
    ASSERT_EQ(pwrite(state.fd, &flipped, 1, (off_t)(prefix.size() + at)), 1);
    t.check(polyak_load_from_memory(t.target.h.get(), bytes.data(), bytes.size()), "memory", bit);
    t.check(polyak_load(t.target.h.get(), path.c_str()), "path", bit);
    ASSERT_EQ(lseek(state.fd, (off_t)prefix.size(), SEEK_SET), (off_t)prefix.size());
    t.check(polyak_load_fd(t.target.h.get(), state.fd), "fd", bit);
    bytes[at] = good[at];
    ASSERT_EQ(pwrite(file.fd, &good[at], 1, (off_t)at), 1);
    ASSERT_EQ(pwrite(state.fd, &good[at], 1, (off_t)(prefix.size() + at)), 1);
    if (HasFatalFailure())
      return;
  }
  std::printf("%zu bits of a %zu-byte checkpoint flipped one at a time, each loaded 3 ways: %d refused, %d loaded "
              "the saved state\n",
              8 * good.size(), good.size(), t.refused, t.accepted);
  EXPECT_EQ(t.accepted, 0) << "every byte is covered by the checksum";
  t.check(polyak_load(t.target.h.get(), path.c_str()), "unflipped", 0); // the file itself loads
  EXPECT_EQ(t.accepted, 1);
}

TEST(CheckpointIntegrity, HeaderEditsThatKeepTheDataAreCaughtByTheChecksum)
{
  // what a flip in the header did before format 2: each gives a valid
  // header, the state changed, the data untouched
  BitFlips t;
  const std::pair<const char *, const char *> edits[] = {{"step", "30"},
                                                         {"step", "0"},
                                                         {"step", "9223372036854775807"},
                                                         {"nonfinite_count", "7"},
                                                         {"beta_products", "[0.5,1.0,0.25]"},
                                                         {"update_counts", "[4,1,4]"}};
  for (const auto &[key, value] : edits) {
    std::vector<char> bytes = set_metadata(t.saved_bytes, key, value);
    EXPECT_EQ(polyak_load_from_memory(t.target.h.get(), bytes.data(), bytes.size()), POLYAK_ERR_FORMAT) << key;
    EXPECT_TRUE(contains(polyak_last_error(t.target.h.get()), "checksum")) << polyak_last_error(t.target.h.get());
    EXPECT_TRUE(t.target.state() == t.before) << key;
  }
  // the length prefix, the padding and the entries are covered too
  std::vector<char> padded = t.saved_bytes;
  uint64_t header_bytes;
  std::memcpy(&header_bytes, padded.data(), 8);
  Parsed parsed(padded);
  std::string header(padded.data() + 8, header_bytes);
  header.insert(header.size(), 8, ' '); // 8 more spaces: the same JSON, the data where the length says
  std::vector<char> longer = assemble(header, parsed.data);
  EXPECT_EQ(polyak_load_from_memory(t.target.h.get(), longer.data(), longer.size()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(contains(polyak_last_error(t.target.h.get()), "checksum")) << polyak_last_error(t.target.h.get());
  EXPECT_EQ(polyak_load_from_memory(t.target.h.get(), reseal(longer).data(), longer.size()), POLYAK_OK)
      << "resealed, the same checkpoint: " << polyak_last_error(t.target.h.get());
  EXPECT_TRUE(t.target.state() == t.saved);
}

TEST(CheckpointIntegrity, NumbersHaveOneTextEachEvenUnderAValidChecksum)
{
  BitFlips t;
  const std::pair<const char *, const char *> edits[] = {{"step", " 9"},
                                                         {"step", "+9"},
                                                         {"step", "09"},
                                                         {"step", "9 "},
                                                         {"step", "9.0"},
                                                         {"step", "0x9"},
                                                         {"step", "-0"},
                                                         {"step", "1e1"},
                                                         {"step", ""},
                                                         {"nonfinite_count", "+4"},
                                                         {"seed", "077"},
                                                         {"seed", "-77"},
                                                         {"num_shadows", "03"},
                                                         {"zero_init", "01"},
                                                         {"zero_init", " 1"},
                                                         {"skip_nonfinite", "+1"},
                                                         {"lookahead_every", "00"},
                                                         {"beta_products", " [0.0,0.0,0.0]"}};
  for (const auto &[key, value] : edits) {
    std::vector<char> bytes = reseal(set_metadata(t.saved_bytes, key, value));
    EXPECT_EQ(polyak_load_from_memory(t.target.h.get(), bytes.data(), bytes.size()), POLYAK_ERR_FORMAT)
        << key << " = \"" << value << "\"";
    EXPECT_TRUE(contains(polyak_last_error(t.target.h.get()), key)) << polyak_last_error(t.target.h.get());
    EXPECT_TRUE(t.target.state() == t.before) << key;
  }
  // the lists hold the writer's text: no space, the shortest doubles
  Parsed file(t.saved_bytes);
  const std::string products = json_string_value(json_object_get(file.metadata(), "beta_products"));
  const std::string counts = json_string_value(json_object_get(file.metadata(), "update_counts"));
  for (const auto &[key, value] : {std::pair<const char *, std::string>{"beta_products", "[ " + products.substr(1)},
                                   {"beta_products", products.substr(0, products.size() - 1) + ",]"},
                                   {"update_counts", "[" + counts.substr(1, counts.size() - 2) + " ]"},
                                   {"update_counts", "[04" + counts.substr(2)}}) {
    std::vector<char> bytes = reseal(set_metadata(t.saved_bytes, key, value.c_str()));
    EXPECT_EQ(polyak_load_from_memory(t.target.h.get(), bytes.data(), bytes.size()), POLYAK_ERR_FORMAT) << value;
    EXPECT_TRUE(contains(polyak_last_error(t.target.h.get()), key)) << polyak_last_error(t.target.h.get());
  }
  // the checksum in capitals reads as the same number: refused all the same
  std::string checksum = json_string_value(json_object_get(file.metadata(), "checksum"));
  std::transform(checksum.begin() + 8, checksum.end(), checksum.begin() + 8, ::toupper);
  ASSERT_NE(checksum, json_string_value(json_object_get(file.metadata(), "checksum"))) << "a letter among the digits";
  std::vector<char> upper = set_metadata(t.saved_bytes, "checksum", checksum.c_str());
  EXPECT_EQ(polyak_load_from_memory(t.target.h.get(), upper.data(), upper.size()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(contains(polyak_last_error(t.target.h.get()), "lowercase")) << polyak_last_error(t.target.h.get());
  EXPECT_TRUE(t.target.state() == t.before);
  // and the canonical texts themselves, resealed, load
  std::vector<char> same = reseal(t.saved_bytes);
  EXPECT_TRUE(same == t.saved_bytes) << "reseal computes the writer's checksum";
}

TEST(CheckpointIntegrity, ParamDtypesAndSkipNonfiniteMustMatchTheLibraryVersionNeedNot)
{
  Small f32_bias(1, POLYAK_F32), keeps_nonfinite(0), target;
  for (Small *s : {&f32_bias, &keeps_nonfinite})
    s->step(2);
  target.step(1);
  std::vector<uint64_t> before = target.state();
  std::vector<char> bytes = save_to_memory(f32_bias.h.get());
  EXPECT_EQ(polyak_load_from_memory(target.h.get(), bytes.data(), bytes.size()), POLYAK_ERR_MISMATCH);
  EXPECT_STREQ(polyak_last_error(target.h.get()),
               "polyak_load_from_memory: tensor \"b\" was averaged from F32 params, and this handle's are BF16 (the "
               "updates would not continue the same way)");
  bytes = save_to_memory(keeps_nonfinite.h.get());
  EXPECT_EQ(polyak_load_from_memory(target.h.get(), bytes.data(), bytes.size()), POLYAK_ERR_MISMATCH);
  EXPECT_TRUE(contains(polyak_last_error(target.h.get()), "skip_nonfinite = 0, this handle has 1"))
      << polyak_last_error(target.h.get());
  EXPECT_TRUE(target.state() == before);
  // a file of another release of the same format loads; the version must be one
  Small source;
  source.step(4);
  for (const char *version : {"1.7.2", "2.0.0-rc1", "10.20.30+build.5"}) {
    bytes = reseal(set_metadata(save_to_memory(source.h.get()), "library_version", version));
    EXPECT_EQ(polyak_load_from_memory(target.h.get(), bytes.data(), bytes.size()), POLYAK_OK)
        << version << ": " << polyak_last_error(target.h.get());
    EXPECT_TRUE(target.state() == source.state());
  }
  for (const char *version : {"", "one", "1..0", "1.0-", "v1.0"}) {
    bytes = reseal(set_metadata(save_to_memory(source.h.get()), "library_version", version));
    EXPECT_EQ(polyak_load_from_memory(target.h.get(), bytes.data(), bytes.size()), POLYAK_ERR_FORMAT) << version;
    EXPECT_TRUE(contains(polyak_last_error(target.h.get()), "library_version")) << polyak_last_error(target.h.get());
  }
  // format 2 has every key: one missing is refused, resealed or not
  for (const char *key : {"param_dtypes", "skip_nonfinite", "library_version", "update_counts"}) {
    bytes = reseal(edit_header(save_to_memory(source.h.get()), [&](Parsed &f) { json_object_del(f.metadata(), key); }));
    EXPECT_EQ(polyak_load_from_memory(target.h.get(), bytes.data(), bytes.size()), POLYAK_ERR_FORMAT) << key;
    EXPECT_TRUE(contains(polyak_last_error(target.h.get()), std::string("\"") + key + "\" is missing"))
        << polyak_last_error(target.h.get());
  }
}

TEST(CheckpointIntegrity, Format1FilesLoadWithTheirDataChecksumAndTheRulesOfToday)
{
  // a file as format 1 wrote it: its checksum covers the data only
  Small source, target;
  source.step(3);
  std::vector<char> old = as_format_1(save_to_memory(source.h.get()));
  ASSERT_EQ(polyak_load_from_memory(target.h.get(), old.data(), old.size()), POLYAK_OK)
      << polyak_last_error(target.h.get());
  EXPECT_TRUE(target.state() == source.state());
  Small other;
  other.step(1);
  std::vector<uint64_t> before = other.state();
  // a flipped data byte is caught; the numbers have one text there too
  std::vector<char> damaged = old;
  damaged[damaged.size() - 5] ^= 0x04;
  EXPECT_EQ(polyak_load_from_memory(other.h.get(), damaged.data(), damaged.size()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(contains(polyak_last_error(other.h.get()), "the data's checksum")) << polyak_last_error(other.h.get());
  std::vector<char> spaced = set_metadata(old, "step", " 3");
  EXPECT_EQ(polyak_load_from_memory(other.h.get(), spaced.data(), spaced.size()), POLYAK_ERR_FORMAT);
  // a format 2 file called format 1 has a whole-file checksum: refused
  std::vector<char> relabelled = set_metadata(save_to_memory(source.h.get()), "format_version", "1");
  EXPECT_EQ(polyak_load_from_memory(other.h.get(), relabelled.data(), relabelled.size()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(other.state() == before);
  // saving writes format 2
  Parsed again(save_to_memory(target.h.get()));
  EXPECT_STREQ(json_string_value(json_object_get(again.metadata(), "format_version")), "2");
}

TEST(CheckpointIntegrity, ResealGivesAnEditedHeaderTheChecksumItsFormatDefines)
{
  // what a tool that edits the step state does (the Python package's
  // sharded states): the library's checksum is the rule's, computed here
  Small source, target;
  source.step(4);
  for (bool format_1 : {false, true}) {
    std::vector<char> edited = set_metadata(save_to_memory(source.h.get()), "step", "40");
    if (format_1)
      edited = as_format_1(set_metadata(as_format_1(save_to_memory(source.h.get())), "step", "40"));
    std::vector<char> expected = format_1 ? edited : reseal(edited);
    if (format_1) // the data's checksum was right already: spoil it first
      edited = set_metadata(edited, "checksum", "xxh3-64:0123456789abcdef");
    ASSERT_EQ(polyak_checkpoint_reseal(edited.data(), edited.size()), POLYAK_OK);
    EXPECT_TRUE(edited == expected) << "format " << (format_1 ? 1 : 2);
    ASSERT_EQ(polyak_load_from_memory(target.h.get(), edited.data(), edited.size()), POLYAK_OK)
        << polyak_last_error(target.h.get());
    int64_t step = 0;
    ASSERT_EQ(polyak_get_step(target.h.get(), &step), POLYAK_OK);
    EXPECT_EQ(step, 40);
  }
  std::vector<char> text(100, 'x'), copy = text;
  EXPECT_EQ(polyak_checkpoint_reseal(text.data(), text.size()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(text == copy) << "nothing written";
  std::vector<char> other = set_metadata(save_to_memory(source.h.get()), "format_version", "3");
  copy = other;
  EXPECT_EQ(polyak_checkpoint_reseal(other.data(), other.size()), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(other == copy);
  EXPECT_EQ(polyak_checkpoint_reseal(other.data(), 9), POLYAK_ERR_FORMAT);
  EXPECT_EQ(polyak_checkpoint_reseal(nullptr, 100), POLYAK_ERR_INVALID_ARG);
}

} // namespace
