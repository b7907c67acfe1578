// test_checkpoint_damage.cpp: every kind of damaged or foreign checkpoint
// refused with nothing changed, and messages that name what differs.
#include "checkpoint_util.h"

using namespace polyak_test;

namespace {

// ---- damaged and foreign files -------------------------------------------------

struct Damage {
  const char *label;
  polyak_status status;
  const char *message_part;
  std::function<std::vector<char>(const std::vector<char> &)> apply;
};

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
    {"UnknownFormatVersion", POLYAK_ERR_FORMAT,
     "format version \"3\" is not one this library (" POLYAK_VERSION_STRING
     ") reads (1, 2); the file was written by polyak " POLYAK_VERSION_STRING,
     [](auto &b) { return set_metadata(b, "format_version", "3"); }},
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

} // namespace
