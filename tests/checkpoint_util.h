// checkpoint_util.h: what the checkpoint tests share: byte helpers, a parsed
// safetensors header, and a small model trained step by step.
#ifndef POLYAK_TEST_CHECKPOINT_UTIL_H
#define POLYAK_TEST_CHECKPOINT_UTIL_H

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

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace polyak_test {

inline void write_bytes(const std::string &path, const std::vector<char> &bytes)
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

inline off_t offset_of(int fd)
{
  return lseek(fd, 0, SEEK_CUR);
}

inline void write_all(int fd, const void *data, size_t num_bytes)
{
  ASSERT_EQ(write(fd, data, num_bytes), (ssize_t)num_bytes) << strerror(errno);
}

// The handle's checkpoint as polyak_save_to_memory writes it.
inline std::vector<char> save_to_memory(polyak_t *p)
{
  size_t bound = 0, written = 0;
  EXPECT_EQ(polyak_save_size(p, &bound), POLYAK_OK);
  std::vector<char> bytes(bound);
  EXPECT_EQ(polyak_save_to_memory(p, bytes.data(), bytes.size(), &written), POLYAK_OK) << polyak_last_error(p);
  bytes.resize(written);
  return bytes;
}

inline std::vector<char> assemble(const std::string &header, const std::vector<char> &data)
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

// A run saved at step 5 with `save`, run on; a fresh handle loaded with
// `load` and run on the same way must end bit-identical to it.
inline void expect_exact_resume(const std::function<void(polyak_t *)> &save,
                                const std::function<void(polyak_t *)> &load)
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

inline std::vector<char> edit_header(const std::vector<char> &bytes, const std::function<void(Parsed &)> &edit)
{
  Parsed file(bytes);
  edit(file);
  return file.bytes();
}

inline std::vector<char> set_metadata(const std::vector<char> &bytes, const char *key, const char *value)
{
  return edit_header(bytes, [&](Parsed &f) { json_object_set_new(f.metadata(), key, json_string(value)); });
}

inline std::vector<char> set_offsets(const std::vector<char> &bytes, const char *name, int64_t begin, int64_t end)
{
  return edit_header(bytes, [&](Parsed &f) {
    json_object_set_new(json_object_get(f.header, name), "data_offsets", json_pack("[I,I]", begin, end));
  });
}

// Schedule k's `key` in the metadata set to `value` (stolen).
inline std::vector<char> set_schedule_field(const std::vector<char> &bytes, int k, const char *key, json_t *value)
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

// The checksum of format 2, computed here from its rule: the XXH3-64 of
// the checkpoint's bytes with the 16 digits after the header's first
// "checksum":"xxh3-64: read as '0's. `bytes` with those digits set to it.
inline std::vector<char> reseal(std::vector<char> bytes)
{
  uint64_t header_bytes;
  std::memcpy(&header_bytes, bytes.data(), 8);
  const std::string field = "\"checksum\":\"xxh3-64:";
  size_t at = std::string(bytes.data() + 8, header_bytes).find(field);
  EXPECT_NE(at, std::string::npos);
  char *digits = bytes.data() + 8 + at + field.size();
  std::memset(digits, '0', 16);
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", (unsigned long long)XXH3_64bits(bytes.data(), bytes.size()));
  std::memcpy(digits, text, 16);
  return bytes;
}

// A file as format 1 wrote it: its checksum the XXH3-64 of the data only,
// without the keys format 2 added (param_dtypes).
inline std::vector<char> as_format_1(const std::vector<char> &bytes)
{
  return edit_header(bytes, [](Parsed &f) {
    json_object_set_new(f.metadata(), "format_version", json_string("1"));
    json_object_del(f.metadata(), "param_dtypes");
    char text[32];
    std::snprintf(text, sizeof text, "xxh3-64:%016llx", (unsigned long long)XXH3_64bits(f.data.data(), f.data.size()));
    json_object_set_new(f.metadata(), "checksum", json_string(text));
  });
}

inline std::vector<char> with_length(std::vector<char> bytes, uint64_t n)
{
  std::memcpy(bytes.data(), &n, 8);
  return bytes;
}

} // namespace polyak_test

#endif // POLYAK_TEST_CHECKPOINT_UTIL_H
