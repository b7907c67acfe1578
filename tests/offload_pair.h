// offload_pair.h: an offloaded handle whose device side is the stand-in
// (offload_standin.h) beside a CPU handle over the same params, compared bit
// for bit: the CPU backend's bits are those of every backend.
#ifndef POLYAK_TEST_OFFLOAD_PAIR_H
#define POLYAK_TEST_OFFLOAD_PAIR_H

#include "offload_standin.h"
#include "test_util.h"

namespace polyak_test {

struct Spec {
  std::string name;
  polyak_dtype dtype;
  int64_t num_elems;
  bool copy_only = false;
};

// Tensors of odd sizes and every param dtype, a copy-only one among them.
inline std::vector<Spec> odd_specs()
{
  return {{"a", POLYAK_F32, 1},        {"b", POLYAK_BF16, 3001},        {"c", POLYAK_F16, 777},
          {"bn", POLYAK_F32, 5, true}, {"d", POLYAK_BF16, 0},           {"e", POLYAK_F32, 4099},
          {"f", POLYAK_BF16, 65537},   {"steps", POLYAK_F16, 33, true}, {"g", POLYAK_F16, 9}};
}

struct Pair {
  Standin standin;
  polyak_config cfg;
  std::vector<Spec> specs;
  std::vector<Tensor> host;   // the CPU handle's params
  std::vector<char *> device; // their twins in the stand-in's device memory
  Handle cpu, off;
  float *grad_norm = nullptr;   // on the device
  float *layer_norms = nullptr; // on the device, one per tensor
  bool checkpoints = true;      // expect_same compares them too

  // adjacent: the device params end to end in one allocation (16-byte aligned)
  Pair(const polyak_config &c, std::vector<Spec> s, size_t staging = 16 << 10, uint64_t seed = 1, bool adjacent = false,
       int max_delay_us = 40)
      : standin(seed, max_delay_us), cfg(c), specs(std::move(s))
  {
    cpu = make_handle(cfg);
    off = make_handle(cfg);
    EXPECT_EQ(polyak_offload_use(off.get(), &Standin::ops, &standin), POLYAK_OK);
    EXPECT_EQ(polyak_set_offload_staging(off.get(), staging), POLYAK_OK) << polyak_last_error(off.get());
    // groups of a ring slot, so that these small models fold in many (the
    // library's own size, at least 4 MiB, is tested alone)
    off->offload_group_bytes = staging / OFFLOAD_RING_SLOTS;
    size_t total = 0;
    for (const Spec &spec : specs)
      total += (spec.num_elems * dtype_bytes(spec.dtype) + 15) / 16 * 16;
    char *pool = adjacent ? static_cast<char *>(standin.device_alloc(total + 16)) : nullptr;
    for (const Spec &spec : specs) {
      host.emplace_back(spec.name, spec.dtype, spec.num_elems);
      size_t bytes = spec.num_elems * dtype_bytes(spec.dtype);
      char *twin = pool ? pool : static_cast<char *>(standin.device_alloc(bytes + 16));
      if (pool)
        pool += (bytes + 15) / 16 * 16;
      device.push_back(twin);
      int64_t shape[1] = {spec.num_elems};
      auto add = spec.copy_only ? polyak_add_copy : polyak_add;
      EXPECT_EQ(add(cpu.get(), spec.name.c_str(), host.back().data(), spec.dtype, 1, shape), POLYAK_OK);
      EXPECT_EQ(add(off.get(), spec.name.c_str(), twin, spec.dtype, 1, shape), POLYAK_OK)
          << polyak_last_error(off.get());
    }
    grad_norm = static_cast<float *>(standin.device_alloc(sizeof(float)));
    layer_norms = static_cast<float *>(standin.device_alloc(sizeof(float) * (specs.size() + 1)));
  }
  ~Pair()
  {
    off.reset(); // destroyed first: its transfers are checked too
    for (const std::string &v : standin.take_violations())
      ADD_FAILURE() << "stand-in: " << v;
  }
  // The trainer's step: new params (NaN and Inf among them with poison),
  // on the host at once and on the device in `stream`'s order; a grad norm
  // and per-tensor norms with them.
  void set_params(uint64_t seed, void *stream = nullptr, bool poison = false)
  {
    std::mt19937_64 rng(seed);
    for (size_t i = 0; i < host.size(); i++) {
      Tensor &t = host[i];
      t.randomize(rng, 0.25f, 2.0f);
      if (poison && t.num_elems > 2 && !specs[i].copy_only) {
        t.set(1, NAN);
        t.set(t.num_elems - 1, INFINITY);
      }
      standin.write_device(stream, device[i], t.data(), t.num_elems * dtype_bytes(t.dtype));
    }
    std::uniform_real_distribution<float> norm(0.1f, 10.0f);
    float g = norm(rng);
    std::vector<float> norms(specs.size() + 1);
    for (float &n : norms)
      n = norm(rng);
    cpu_grad_norm = g;
    cpu_layer_norms = norms;
    standin.write_device(stream, grad_norm, &g, sizeof g);
    standin.write_device(stream, layer_norms, norms.data(), sizeof(float) * norms.size());
  }
  float cpu_grad_norm = 1.0f;
  std::vector<float> cpu_layer_norms;
  // The sources the config's shadows need, set on both handles (after finalize).
  void set_sources()
  {
    if (cfg.num_shadows > 0 && has_grad_norm()) {
      ASSERT_EQ(polyak_set_grad_norm(cpu.get(), &cpu_grad_norm), POLYAK_OK);
      ASSERT_EQ(polyak_set_grad_norm(off.get(), grad_norm), POLYAK_OK) << polyak_last_error(off.get());
    }
    if (has_layerwise()) {
      ASSERT_EQ(polyak_set_layer_norms(cpu.get(), cpu_layer_norms.data()), POLYAK_OK);
      ASSERT_EQ(polyak_set_layer_norms(off.get(), layer_norms), POLYAK_OK) << polyak_last_error(off.get());
    }
  }
  bool has_grad_norm() const
  {
    for (int k = 0; k < cfg.num_shadows; k++)
      if (cfg.shadows[k].grad_norm_c > 0)
        return true;
    return false;
  }
  bool has_layerwise() const
  {
    for (int k = 0; k < cfg.num_shadows; k++)
      if (cfg.shadows[k].layerwise_beta0 > 0)
        return true;
    return false;
  }
  void finalize(uint64_t seed = 7)
  {
    set_params(seed);
    ASSERT_EQ(polyak_finalize(cpu.get(), nullptr), POLYAK_OK) << polyak_last_error(cpu.get());
    ASSERT_EQ(polyak_finalize(off.get(), nullptr), POLYAK_OK) << polyak_last_error(off.get());
    set_sources();
  }
  void update(int64_t step, void *stream = nullptr)
  {
    ASSERT_EQ(polyak_update(cpu.get(), step, nullptr), POLYAK_OK) << polyak_last_error(cpu.get());
    ASSERT_EQ(polyak_update(off.get(), step, stream), POLYAK_OK) << polyak_last_error(off.get());
  }
  // Finalize, then at each step new params and an update.
  void train(std::initializer_list<int64_t> steps, bool poison = false)
  {
    finalize();
    for (int64_t step : steps) {
      set_params(1000 + (uint64_t)step, nullptr, poison);
      update(step);
    }
  }
  // Every shadow of every tensor (this rank's pieces), read out into host
  // memory and, every other one, into device memory through the ring: the
  // CPU handle's bits. The counts, beta products and checkpoints agree too.
  void expect_same()
  {
    for (int k = 0; k < cfg.num_shadows; k++)
      for (size_t i = 0; i < specs.size(); i++) {
        if (specs[i].copy_only && k > 0)
          continue;
        int64_t first = 0, n = specs[i].num_elems;
        if (!specs[i].copy_only) {
          ASSERT_EQ(polyak_local_range(cpu.get(), (int)i, &first, &n), POLYAK_OK);
        }
        polyak_dtype d = specs[i].copy_only ? specs[i].dtype : POLYAK_F32;
        size_t bytes = n * dtype_bytes(d);
        std::vector<char> want(bytes + 4), got(bytes + 4);
        ASSERT_EQ(polyak_get_local_shadow(cpu.get(), k, (int)i, want.data(), d, nullptr), POLYAK_OK)
            << polyak_last_error(cpu.get());
        bool to_device = (i + (size_t)k) % 2 == 1;
        void *dst = to_device ? standin.device_alloc(bytes + 4) : got.data();
        ASSERT_EQ(polyak_get_local_shadow(off.get(), k, (int)i, dst, d, nullptr), POLYAK_OK)
            << polyak_last_error(off.get());
        if (to_device)
          standin.read_device(nullptr, got.data(), dst, bytes);
        ASSERT_EQ(0, std::memcmp(want.data(), got.data(), bytes))
            << "shadow " << k << " of " << specs[i].name << (to_device ? " (into device memory)" : "");
      }
    int64_t a = -1, b = -2;
    ASSERT_EQ(polyak_nonfinite_count(cpu.get(), &a), POLYAK_OK);
    ASSERT_EQ(polyak_nonfinite_count(off.get(), &b), POLYAK_OK) << polyak_last_error(off.get());
    EXPECT_EQ(a, b);
    for (int k = 0; k < cfg.num_shadows; k++) {
      if (cfg.shadows[k].layerwise_beta0 > 0)
        continue;
      double pa = -1, pb = -2;
      ASSERT_EQ(polyak_get_beta_product(cpu.get(), k, &pa), POLYAK_OK);
      ASSERT_EQ(polyak_get_beta_product(off.get(), k, &pb), POLYAK_OK) << polyak_last_error(off.get());
      EXPECT_EQ(pa, pb) << "shadow " << k;
    }
    if (checkpoints) {
      EXPECT_EQ(checkpoint(cpu.get()), checkpoint(off.get())) << "the checkpoints' bytes";
    }
  }
  static std::vector<char> checkpoint(polyak_t *p)
  {
    size_t size = 0, written = 0;
    EXPECT_EQ(polyak_save_size(p, &size), POLYAK_OK) << polyak_last_error(p);
    std::vector<char> bytes(size);
    EXPECT_EQ(polyak_save_to_memory(p, bytes.data(), size, &written), POLYAK_OK) << polyak_last_error(p);
    bytes.resize(written);
    return bytes;
  }
  // The device params hold the CPU handle's params' bits.
  void expect_params_same(void *stream = nullptr)
  {
    for (size_t i = 0; i < specs.size(); i++) {
      size_t bytes = specs[i].num_elems * dtype_bytes(specs[i].dtype);
      std::vector<char> got(bytes + 1);
      standin.read_device(stream, got.data(), device[i], bytes);
      EXPECT_EQ(0, std::memcmp(got.data(), host[i].data(), bytes)) << "param " << specs[i].name;
    }
  }
};

} // namespace polyak_test

#endif // POLYAK_TEST_OFFLOAD_PAIR_H
