// test_util.h: what the tests share: owned handles, random tensors in any
// dtype, and snapshots of a handle's whole visible state.
#pragma once

#include <gtest/gtest.h>

#include <dirent.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <random>
#include <string>
#include <vector>

#include "polyak.h"
#include "polyak_math.h"

namespace polyak_test {

struct HandleDeleter {
  void operator()(polyak_t *p) const
  {
    polyak_destroy(p);
  }
};
using Handle = std::unique_ptr<polyak_t, HandleDeleter>;

inline Handle make_handle(const polyak_config &cfg)
{
  polyak_t *p = nullptr;
  polyak_status status = polyak_create(&p, &cfg);
  if (status != POLYAK_OK) {
    char why[512];
    polyak_check_config(&cfg, why, sizeof why);
    ADD_FAILURE() << "polyak_create: " << polyak_status_name(status) << ": " << why;
  }
  return Handle(p);
}

inline polyak_config cpu_config(int num_shadows = 1, double beta = 0.9)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = num_shadows;
  for (int k = 0; k < POLYAK_MAX_SHADOWS; k++)
    cfg.shadows[k].schedule.beta = beta;
  return cfg;
}

inline size_t dtype_bytes(polyak_dtype d)
{
  return d == POLYAK_F32 ? 4 : 2;
}

inline const char *dtype_label(polyak_dtype d)
{
  return d == POLYAK_F32 ? "f32" : d == POLYAK_BF16 ? "bf16" : "f16";
}

// float -> storage bits of dtype (round to nearest even), and back.
inline void store_as(polyak_dtype d, void *base, int64_t i, float value)
{
  if (d == POLYAK_F32) {
    std::memcpy(static_cast<char *>(base) + 4 * i, &value, 4);
  } else {
    uint16_t h = d == POLYAK_BF16 ? polyak_f32_to_bf16_rne(value) : polyak_f32_to_f16_rne(value);
    std::memcpy(static_cast<char *>(base) + 2 * i, &h, 2);
  }
}

inline float load_as(polyak_dtype d, const void *base, int64_t i)
{
  if (d == POLYAK_F32) {
    float value;
    std::memcpy(&value, static_cast<const char *>(base) + 4 * i, 4);
    return value;
  }
  uint16_t h;
  std::memcpy(&h, static_cast<const char *>(base) + 2 * i, 2);
  return d == POLYAK_BF16 ? polyak_bf16_to_f32(h) : polyak_f16_to_f32(h);
}

// One parameter tensor in host memory; `offset_bytes` shifts its start
// inside an over-allocated, 64-byte aligned buffer (misaligned starts).
struct Tensor {
  std::string name;
  polyak_dtype dtype = POLYAK_F32;
  int64_t num_elems = 0;
  std::vector<uint64_t> storage; // 8-byte aligned backing
  size_t offset_bytes = 0;

  Tensor(std::string n, polyak_dtype d, int64_t count, size_t offset = 0)
      : name(std::move(n)), dtype(d), num_elems(count), storage((count * dtype_bytes(d) + offset + 64) / 8 + 1),
        offset_bytes(offset)
  {
  }
  void *data()
  {
    return reinterpret_cast<char *>(storage.data()) + offset_bytes;
  }
  const void *data() const
  {
    return reinterpret_cast<const char *>(storage.data()) + offset_bytes;
  }
  float get(int64_t i) const
  {
    return load_as(dtype, data(), i);
  }
  void set(int64_t i, float value)
  {
    store_as(dtype, data(), i, value);
  }
  // Normal values around `mean`, never all zero.
  void randomize(std::mt19937_64 &rng, float mean = 0.0f, float stddev = 1.0f)
  {
    std::normal_distribution<float> dist(mean, stddev);
    for (int64_t i = 0; i < num_elems; i++)
      set(i, dist(rng));
  }
};

inline void add_all(polyak_t *p, std::vector<Tensor> &tensors)
{
  for (auto &t : tensors) {
    int64_t shape[1] = {t.num_elems};
    ASSERT_EQ(polyak_add(p, t.name.c_str(), t.data(), t.dtype, 1, shape), POLYAK_OK) << polyak_last_error(p);
  }
}

// Shadow `k` of tensor `i` read out as f32.
inline std::vector<float> read_shadow(polyak_t *p, int k, int i, int64_t num_elems)
{
  std::vector<float> out(num_elems + 1);
  EXPECT_EQ(polyak_get_shadow(p, k, i, out.data(), POLYAK_F32, nullptr), POLYAK_OK) << polyak_last_error(p);
  out.resize(num_elems);
  return out;
}

// Everything a caller can observe: each shadow's bits, the step, the count.
struct Snapshot {
  std::vector<std::vector<uint32_t>> shadow_bits;
  int64_t step = -1;
  int64_t nonfinite = -1;
  int num_tensors = -1;
  bool operator==(const Snapshot &o) const
  {
    return shadow_bits == o.shadow_bits && step == o.step && nonfinite == o.nonfinite && num_tensors == o.num_tensors;
  }
};

// Every shadow of every tensor as bits (this rank's pieces on a sharded
// handle), the step and the count. A read that fails fails the test: equal
// snapshots must mean equal states.
inline Snapshot snapshot(polyak_t *p, int num_shadows, const std::vector<Tensor> &tensors)
{
  Snapshot s;
  polyak_get_step(p, &s.step);
  polyak_num_tensors(p, &s.num_tensors);
  if (polyak_nonfinite_count(p, &s.nonfinite) != POLYAK_OK)
    return s; // not finalized: no shadows yet
  for (int k = 0; k < num_shadows; k++)
    for (size_t i = 0; i < tensors.size(); i++) {
      std::vector<float> values(tensors[i].num_elems + 1);
      EXPECT_EQ(polyak_get_local_shadow(p, k, (int)i, values.data(), POLYAK_F32, nullptr), POLYAK_OK)
          << polyak_last_error(p);
      std::vector<uint32_t> bits(tensors[i].num_elems);
      for (int64_t e = 0; e < tensors[i].num_elems; e++)
        bits[e] = polyak_f32_bits(values[e]);
      s.shadow_bits.push_back(bits);
    }
  return s;
}

// A fresh, empty directory per test.
struct TempDir {
  std::string path;
  TempDir()
  {
    char pattern[] = "/tmp/polyak-test-XXXXXX";
    path = mkdtemp(pattern);
  }
  ~TempDir()
  {
    std::system(("rm -rf '" + path + "'").c_str());
  }
  std::string file(const std::string &name) const
  {
    return path + "/" + name;
  }
  std::set<std::string> entries() const
  {
    std::set<std::string> names;
    DIR *dir = opendir(path.c_str());
    while (struct dirent *e = readdir(dir))
      if (std::string(e->d_name) != "." && std::string(e->d_name) != "..")
        names.insert(e->d_name);
    closedir(dir);
    return names;
  }
};

inline std::vector<char> read_bytes(const std::string &path)
{
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

inline bool contains(const std::string &text, const std::string &part)
{
  return text.find(part) != std::string::npos;
}

// A float's bits: equal bits, not just equal values (+0 vs -0, NaNs).
inline uint32_t float_bits(float x)
{
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

// The f32 neighbours of a double: the largest f32 <= x and the smallest >= x
// (equal where x is an f32).
inline void f32_neighbours(double x, float *below, float *above)
{
  float nearest = (float)x;
  *below = (double)nearest <= x ? nearest : std::nextafter(nearest, -INFINITY);
  *above = (double)nearest >= x ? nearest : std::nextafter(nearest, INFINITY);
}

// The decay schedules written out again from the table in DESIGN.md, as an
// oracle independent of src/schedule.c.
inline double oracle_beta(const polyak_schedule &s, int64_t step)
{
  if (step <= s.start_step)
    return 0.0;
  double t = (double)(step - s.start_step - 1);
  switch (s.kind) {
  case POLYAK_SCHEDULE_CONSTANT:
    return s.beta;
  case POLYAK_SCHEDULE_TF:
    return std::min(s.beta, (1 + t) / (10 + t));
  case POLYAK_SCHEDULE_WARMUP:
    if (t == 0)
      return 0.0;
    return std::clamp(1 - std::pow(1 + t / s.inv_gamma, -s.power), s.beta_min, s.beta);
  case POLYAK_SCHEDULE_LINEAR:
    return std::min(s.beta, s.beta_min + (t / s.ramp_steps) * (s.beta - s.beta_min));
  case POLYAK_SCHEDULE_COSINE: {
    double r = (double)s.ramp_steps;
    return s.beta - (s.beta - s.beta_min) * (1 + std::cos(M_PI * std::min(t, r) / r)) / 2;
  }
  case POLYAK_SCHEDULE_EQUAL:
    return t / (t + 1);
  case POLYAK_SCHEDULE_POWER:
    return std::pow(t / (t + 1), s.gamma + 1);
  }
  return NAN;
}

// A float64 model of one handle: shadows in double, updated by the step
// semantics with the oracle's betas; zero_init debias included.
struct Oracle {
  polyak_config cfg;
  std::vector<std::vector<std::vector<double>>> shadow; // [k][tensor][elem]
  std::vector<double> prod;                             // prod of applied beta per shadow
  int64_t last_step = 0;

  Oracle(const polyak_config &c, const std::vector<Tensor> &tensors) : cfg(c)
  {
    shadow.resize(cfg.num_shadows);
    prod.assign(cfg.num_shadows, 1.0);
    for (auto &per_shadow : shadow)
      for (auto &t : tensors) {
        std::vector<double> init(t.num_elems, 0.0);
        if (!cfg.zero_init)
          for (int64_t e = 0; e < t.num_elems; e++)
            init[e] = t.get(e);
        per_shadow.push_back(init);
      }
  }
  void update(int64_t step, const std::vector<Tensor> &tensors)
  {
    for (int k = 0; k < cfg.num_shadows; k++) {
      double b = 1.0;
      for (int64_t s = last_step + 1; s <= step; s++)
        b *= oracle_beta(cfg.shadows[k].schedule, s);
      prod[k] *= b;
      for (size_t i = 0; i < tensors.size(); i++)
        for (int64_t e = 0; e < tensors[i].num_elems; e++) {
          double param = tensors[i].get(e);
          if (cfg.skip_nonfinite && !std::isfinite(param))
            continue;
          shadow[k][i][e] = b * shadow[k][i][e] + (1 - b) * param;
        }
    }
    last_step = step;
  }
  double read(int k, int i, int64_t e) const
  {
    return cfg.zero_init ? shadow[k][i][e] / (1 - prod[k]) : shadow[k][i][e];
  }
};

} // namespace polyak_test
