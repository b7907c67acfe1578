// test_cpu_isa.cpp: every kernel table this CPU runs (AVX2, AVX-512)
// against the portable reference, which defines the bits: kernel by kernel
// on odd sizes (0 to 65537), misaligned starts, hash counters whose low
// half crosses a multiple of 2^16 or ends just below 2^32, weights 1 and 0,
// non-finite params with the guard on and off; chunk by chunk with K = 1..8
// shadows on every dtype pair, the caller's shadows and Lookahead's
// write-back; and the dispatch itself (POLYAK_CPU_ISA, polyak_cpu_isa).
// The tests print which instruction sets ran, and a CPU with AVX-512 fails
// them unless its table ran.
#include "test_util.h"

#include <cstdio>
#include <cstdlib>

#include "cpu/cpu_state.h"

using namespace polyak_test;

namespace {

struct Table {
  const char *name;
  const cpu_kernels *kernels;
};

// The vector tables this build and CPU run, said once per test.
std::vector<Table> vector_tables()
{
  std::vector<Table> all;
  if (const cpu_kernels *avx2 = polyak_cpu_avx2_kernels())
    all.push_back({"avx2", avx2});
  if (const cpu_kernels *avx512 = polyak_cpu_avx512_kernels())
    all.push_back({"avx512", avx512});
  std::string names;
  for (const Table &t : all)
    names += std::string(" ") + t.name;
  std::printf("[ kernels  ] against portable:%s\n", all.empty() ? " none (no vector table here)" : names.c_str());
  return all;
}

// Bytes with room to start `misalign` elements past a 64-byte boundary.
struct Bytes {
  std::vector<uint64_t> storage;
  size_t offset;
  Bytes(int64_t num_elems, size_t elem_bytes, int misalign)
      : storage((num_elems * elem_bytes + 64 * 2) / 8 + 8), offset(misalign * elem_bytes)
  {
  }
  template <typename T> T *at()
  {
    uintptr_t base = (reinterpret_cast<uintptr_t>(storage.data()) + 63) / 64 * 64;
    return reinterpret_cast<T *>(base + offset);
  }
};

// Params: ordinary values, and in `rare` runs every kind the rare paths
// take: quiet and signalling NaN with payloads, Inf, differences that
// overflow, subnormals, any bits.
float param_value(std::mt19937_64 &rng, bool rare)
{
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  if (!rare)
    return uniform(rng);
  switch (rng() % 10) {
  case 0:
    return polyak_f32_from_bits(0x7FC00000u | (uint32_t)(rng() & 0x3FFFFF));
  case 1:
    return polyak_f32_from_bits(0xFF800001u | (uint32_t)(rng() & 0x3FFFFF));
  case 2:
    return rng() % 2 ? INFINITY : -INFINITY;
  case 3:
    return rng() % 2 ? 3.0e38f : -3.0e38f;
  case 4:
    return polyak_f32_from_bits((uint32_t)(rng() & 0x807FFFFFu));
  case 5:
    return polyak_f32_from_bits((uint32_t)rng());
  default:
    return uniform(rng);
  }
}

// Shadows never hold NaN: where a NaN shadow meets a NaN param, which
// payload survives is the compiler's choice of operand order, not ours.
// Without the guard they may hold Inf, and 16-bit ones any other bits.
void fill_shadow(void *base, polyak_dtype dtype, int64_t num_elems, std::mt19937_64 &rng, bool rare, bool finite)
{
  for (int64_t i = 0; i < num_elems; i++)
    do {
      if (dtype != POLYAK_F32 && rare && rng() % 4 == 0)
        static_cast<uint16_t *>(base)[i] = (uint16_t)rng();
      else
        store_as(dtype, base, i, rare ? param_value(rng, true) : param_value(rng, false) * 0.5f + 0.25f);
    } while (std::isnan(load_as(dtype, base, i)) || (finite && !polyak_is_finite(load_as(dtype, base, i))));
}

const int64_t kSizes[] = {0, 1, 3, 15, 16, 17, 65535, 65537};

// First elements: aligned and not, runs of 2^16 crossed, and the last
// elements below 2^32 (a kernel's elements share their index's high half).
std::vector<int64_t> first_elems(int64_t num_elems)
{
  return {0, 65536 - 5, 3 * 65536 + 12345, ((int64_t)5 << 32) + 7, ((int64_t)1 << 32) - num_elems - 3};
}

enum Kernel { F32_NEAREST, F32_STOCHASTIC, BF16_STOCHASTIC, F16_STOCHASTIC };
const char *const kKernelNames[] = {"f32_nearest", "f32_stochastic", "bf16_stochastic", "f16_stochastic"};

int64_t run_kernel(const cpu_kernels *k, Kernel kernel, void *shadow, const float *param, int64_t num_elems,
                   float weight, int guard, uint64_t key, int64_t first_elem)
{
  switch (kernel) {
  case F32_NEAREST:
    return k->f32_nearest(static_cast<float *>(shadow), param, num_elems, weight, guard);
  case F32_STOCHASTIC:
    return k->f32_stochastic(static_cast<float *>(shadow), param, num_elems, weight, guard, key, first_elem);
  case BF16_STOCHASTIC:
    return k->bf16_stochastic(static_cast<uint16_t *>(shadow), param, num_elems, weight, guard, key, first_elem);
  default:
    return k->f16_stochastic(static_cast<uint16_t *>(shadow), param, num_elems, weight, guard, key, first_elem);
  }
}

// One kernel on one case through `table` and through the portable table,
// from the same inputs: the shadows' bits and the counts must agree.
void compare_kernel(const Table &table, Kernel kernel, int64_t num_elems, int misalign, int64_t first_elem,
                    float weight, int guard, bool rare, uint64_t seed)
{
  polyak_dtype dtype = kernel == BF16_STOCHASTIC ? POLYAK_BF16 : kernel == F16_STOCHASTIC ? POLYAK_F16 : POLYAK_F32;
  size_t bytes = dtype_bytes(dtype);
  std::mt19937_64 rng(seed);
  Bytes param(num_elems, 4, misalign), expected(num_elems, bytes, misalign), got(num_elems, bytes, (misalign + 1) % 4);
  for (int64_t i = 0; i < num_elems; i++) // rare values in runs, so both the fast and the full paths run
    param.at<float>()[i] = param_value(rng, rare && (i / 24) % 3 == 1);
  fill_shadow(expected.at<void>(), dtype, num_elems, rng, rare, guard);
  std::memcpy(got.at<void>(), expected.at<void>(), num_elems * bytes);
  uint64_t key = polyak_sr_key(seed, 11, 2);
  int64_t want = run_kernel(&polyak_cpu_portable_kernels, kernel, expected.at<void>(), param.at<float>(), num_elems,
                            weight, guard, key, first_elem);
  int64_t have =
      run_kernel(table.kernels, kernel, got.at<void>(), param.at<float>(), num_elems, weight, guard, key, first_elem);
  std::string where = std::string(table.name) + " " + kKernelNames[kernel] + ": " + std::to_string(num_elems) +
                      " elements from " + std::to_string(first_elem) + ", misaligned by " + std::to_string(misalign) +
                      ", weight " + std::to_string(weight) + ", guard " + std::to_string(guard);
  EXPECT_EQ(want, have) << where << ": non-finite count";
  for (int64_t i = 0; i < num_elems; i++)
    if (std::memcmp(expected.at<char>() + i * bytes, got.at<char>() + i * bytes, bytes)) {
      ADD_FAILURE() << where << ": element " << i << " differs from the portable kernel's";
      break;
    }
}

TEST(CpuIsa, UpdateKernelsMatchThePortableOnes)
{
  uint64_t seed = 1;
  for (const Table &table : vector_tables())
    for (int kernel = F32_NEAREST; kernel <= F16_STOCHASTIC; kernel++)
      for (int64_t num_elems : kSizes)
        for (int64_t first_elem : first_elems(num_elems))
          for (int variant = 0; variant < 6; variant++) {
            float weight = variant == 4 ? 1.0f : variant == 5 ? 0.0f : 0.01f * (float)(variant + 1);
            compare_kernel(table, (Kernel)kernel, num_elems, variant % 4, first_elem, weight, variant % 2, variant != 2,
                           seed++);
            if (HasFailure())
              return;
          }
}

TEST(CpuIsa, CountsAndConversionsMatchThePortableOnes)
{
  std::mt19937_64 rng(3);
  const cpu_kernels *portable = &polyak_cpu_portable_kernels;
  for (const Table &table : vector_tables())
    for (int64_t num_elems : kSizes)
      for (int misalign = 0; misalign < 4; misalign++) {
        Bytes values(num_elems, 4, misalign), halves(num_elems, 2, misalign);
        for (int64_t i = 0; i < num_elems; i++) {
          values.at<float>()[i] = param_value(rng, i % 5 == 0);
          halves.at<uint16_t>()[i] = (uint16_t)rng();
        }
        std::string where = std::string(table.name) + ", " + std::to_string(num_elems) + " elements misaligned by " +
                            std::to_string(misalign);
        EXPECT_EQ(portable->count_nonfinite(values.at<float>(), num_elems),
                  table.kernels->count_nonfinite(values.at<float>(), num_elems))
            << where;
        std::vector<float> wide_a(num_elems + 1), wide_b(num_elems + 1);
        portable->bf16_to_f32(wide_a.data(), halves.at<uint16_t>(), num_elems);
        table.kernels->bf16_to_f32(wide_b.data(), halves.at<uint16_t>(), num_elems);
        EXPECT_EQ(0, std::memcmp(wide_a.data(), wide_b.data(), num_elems * 4)) << where << ": bf16_to_f32";
        portable->f16_to_f32(wide_a.data(), halves.at<uint16_t>(), num_elems);
        table.kernels->f16_to_f32(wide_b.data(), halves.at<uint16_t>(), num_elems);
        EXPECT_EQ(0, std::memcmp(wide_a.data(), wide_b.data(), num_elems * 4)) << where << ": f16_to_f32";
        std::vector<uint16_t> narrow_a(num_elems + 1), narrow_b(num_elems + 1);
        portable->f32_to_bf16(narrow_a.data(), values.at<float>(), num_elems);
        table.kernels->f32_to_bf16(narrow_b.data(), values.at<float>(), num_elems);
        EXPECT_EQ(0, std::memcmp(narrow_a.data(), narrow_b.data(), num_elems * 2)) << where << ": f32_to_bf16";
        if (num_elems <= 256) {
          std::vector<float> acc_a(num_elems + 1, 0.5f), acc_b(num_elems + 1, 0.5f);
          portable->sumsq_row(acc_a.data(), values.at<float>(), num_elems);
          table.kernels->sumsq_row(acc_b.data(), values.at<float>(), num_elems);
          EXPECT_EQ(0, std::memcmp(acc_a.data(), acc_b.data(), num_elems * 4)) << where << ": sumsq_row";
        }
      }
}

struct ChunkCase {
  polyak_dtype param_dtype, shadow_dtype;
  int num_shadows;
  int64_t global_offset;
  int skip_nonfinite;
  bool write_back;
  uint32_t stochastic_f32;
  polyak_dtype owned_dtype; // a caller's shadow of this dtype, with num_shadows 1 (F32 and owned false: none)
  bool owned;
  int owned_round_nearest;
};

// A chunk of a 9001-element tensor, [17, 17 + 8983), through `table` and
// through the portable table: params (Lookahead writes them back), every
// shadow and the count must agree.
void compare_chunk(const Table &table, const ChunkCase &s, uint64_t seed)
{
  const int64_t num_elems = 9001;
  std::mt19937_64 rng(seed);
  size_t param_bytes = dtype_bytes(s.param_dtype), shadow_bytes = dtype_bytes(s.shadow_dtype);
  size_t owned_bytes = dtype_bytes(s.owned_dtype);
  Bytes param_a(num_elems, param_bytes, 1), param_b(num_elems, param_bytes, 1);
  for (int64_t i = 0; i < num_elems; i++)
    store_as(s.param_dtype, param_a.at<void>(), i, param_value(rng, (i / 40) % 4 == 3));
  std::memcpy(param_b.at<void>(), param_a.at<void>(), num_elems * param_bytes);
  std::vector<std::unique_ptr<Bytes>> arenas;
  void *shadows_a[POLYAK_MAX_SHADOWS] = {}, *shadows_b[POLYAK_MAX_SHADOWS] = {};
  for (int k = 0; k < s.num_shadows; k++) {
    arenas.push_back(std::make_unique<Bytes>(num_elems, shadow_bytes, k % 3));
    shadows_a[k] = arenas.back()->at<void>();
    fill_shadow(shadows_a[k], s.shadow_dtype, num_elems, rng, k % 2, s.skip_nonfinite);
    arenas.push_back(std::make_unique<Bytes>(num_elems, shadow_bytes, k % 3));
    shadows_b[k] = arenas.back()->at<void>();
    std::memcpy(shadows_b[k], shadows_a[k], num_elems * shadow_bytes);
  }
  Bytes owned_a(num_elems, owned_bytes, 2), owned_b(num_elems, owned_bytes, 2);
  fill_shadow(owned_a.at<void>(), s.owned_dtype, num_elems, rng, true, s.skip_nonfinite);
  std::memcpy(owned_b.at<void>(), owned_a.at<void>(), num_elems * owned_bytes);

  polyak_update_args args{};
  args.step = 9;
  args.gap = 1;
  args.num_shadows = s.num_shadows;
  args.skip_nonfinite = s.skip_nonfinite;
  args.write_back = s.write_back;
  args.stochastic_f32 = s.stochastic_f32;
  for (int k = 0; k < s.num_shadows; k++) {
    args.weight[k] = k == 1 ? 1.0f : 0.003f * (float)(k + 1);
    args.sr_key[k] = polyak_sr_key(seed, 9, k);
  }
  polyak_tensor_desc t{};
  t.num_elems = t.local_num_elems = num_elems;
  t.global_offset_elems = s.global_offset;
  t.param_dtype = s.param_dtype;
  t.owned_dtype = s.owned_dtype;
  t.owned_round_nearest = s.owned_round_nearest;
  polyak_chunk chunk{17, 0, 8983};
  t.param = param_a.at<void>();
  t.owned = s.owned ? owned_a.at<void>() : nullptr;
  int64_t want = polyak_cpu_update_chunk(&polyak_cpu_portable_kernels, &t, &chunk, shadows_a, s.shadow_dtype, &args);
  t.param = param_b.at<void>();
  t.owned = s.owned ? owned_b.at<void>() : nullptr;
  int64_t have = polyak_cpu_update_chunk(table.kernels, &t, &chunk, shadows_b, s.shadow_dtype, &args);

  std::string where = std::string(table.name) + ": params " + dtype_label(s.param_dtype) + ", " +
                      std::to_string(s.num_shadows) + " " + dtype_label(s.shadow_dtype) + " shadows" +
                      (s.owned ? std::string(", the caller's ") + dtype_label(s.owned_dtype) : std::string()) +
                      ", offset " + std::to_string(s.global_offset) + ", guard " + std::to_string(s.skip_nonfinite);
  EXPECT_EQ(want, have) << where << ": non-finite count";
  EXPECT_EQ(0, std::memcmp(param_a.at<void>(), param_b.at<void>(), num_elems * param_bytes)) << where << ": params";
  for (int k = 0; k < s.num_shadows; k++)
    EXPECT_EQ(0, std::memcmp(shadows_a[k], shadows_b[k], num_elems * shadow_bytes)) << where << ": shadow " << k;
  if (s.owned) {
    EXPECT_EQ(0, std::memcmp(owned_a.at<void>(), owned_b.at<void>(), num_elems * owned_bytes))
        << where << ": the caller's shadow";
  }
}

// Global offsets whose chunk crosses a multiple of 2^16 (a run of the
// hash's counter) or of 2^32 (the counter's high half; blocks are cut there).
const int64_t kOffsets[] = {0, 65536 - 3000, ((int64_t)1 << 32) - 5003, ((int64_t)7 << 32) + 1};

TEST(CpuIsa, ChunksOfOneToEightShadowsMatchThePortableOnes)
{
  uint64_t seed = 100;
  for (const Table &table : vector_tables())
    for (polyak_dtype param_dtype : {POLYAK_F32, POLYAK_BF16, POLYAK_F16})
      for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16})
        for (int num_shadows = 1; num_shadows <= POLYAK_MAX_SHADOWS; num_shadows++) {
          ChunkCase s{param_dtype,
                      shadow_dtype,
                      num_shadows,
                      kOffsets[num_shadows % 4],
                      num_shadows % 2,
                      num_shadows == 3,
                      num_shadows % 3 == 0 ? 0xFFu : 0x55u << (num_shadows % 2),
                      POLYAK_F32,
                      false,
                      0};
          compare_chunk(table, s, seed++);
          if (HasFailure())
            return;
        }
}

TEST(CpuIsa, CallersShadowsMatchThePortableOnes)
{
  uint64_t seed = 200;
  for (const Table &table : vector_tables())
    for (polyak_dtype param_dtype : {POLYAK_F32, POLYAK_BF16, POLYAK_F16})
      for (polyak_dtype owned_dtype : {POLYAK_F32, POLYAK_BF16, POLYAK_F16})
        for (int variant = 0; variant < 4; variant++) {
          ChunkCase s{param_dtype, POLYAK_F32,  1,    kOffsets[variant], variant % 2, false,
                      0,           owned_dtype, true, variant / 3};
          compare_chunk(table, s, seed++);
          if (HasFailure())
            return;
        }
}

// AVX-512 F without BW, DQ and VL is only the Xeon Phi's, which the table
// does not take; every other CPU that reports it must have run it.
TEST(CpuIsa, TheWidestTableTheCpuHasRan)
{
  std::vector<Table> tables = vector_tables();
  auto ran = [&](const char *name) {
    return std::any_of(tables.begin(), tables.end(), [&](const Table &t) { return std::strcmp(t.name, name) == 0; });
  };
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    EXPECT_TRUE(ran("avx2")) << "this CPU has AVX2 and FMA, but the AVX2 table did not run";
  }
  if (__builtin_cpu_supports("avx512f")) {
    bool full =
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    std::printf("[ kernels  ] the CPU has avx512f%s\n", full ? ", bw, dq and vl" : " without bw, dq or vl");
    if (full) {
      EXPECT_TRUE(ran("avx512")) << "this CPU has AVX-512, but the AVX-512 table did not run";
    }
  }
#endif
}

// Sets POLYAK_CPU_ISA for one scope (each test is a process of its own).
struct IsaCap {
  explicit IsaCap(const char *value)
  {
    if (value)
      setenv("POLYAK_CPU_ISA", value, 1);
    else
      unsetenv("POLYAK_CPU_ISA");
  }
  ~IsaCap()
  {
    unsetenv("POLYAK_CPU_ISA");
  }
};

// Three shadows (one f32 rounded stochastically; bf16 ones always are),
// Lookahead, NaN params, six tensors of every dtype: the same bits and
// count on every table POLYAK_CPU_ISA can hold a handle to, and
// polyak_cpu_isa names the one it got.
TEST(CpuIsa, HandlesCappedByTheEnvironmentGiveTheSameBits)
{
  std::vector<std::string> isas = {"portable"};
  for (const Table &t : vector_tables())
    isas.push_back(t.name);
  for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16}) {
    std::vector<Snapshot> results;
    for (const std::string &isa : isas) {
      IsaCap cap(isa.c_str());
      polyak_config cfg = cpu_config(3, 0.95);
      cfg.shadow_dtype = shadow_dtype;
      cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
      cfg.lookahead_every = 2;
      cfg.seed = 8;
      std::vector<Tensor> tensors;
      const int64_t sizes[] = {1, 17, 65537, 4099, 70001, 3};
      for (size_t i = 0; i < std::size(sizes); i++)
        tensors.emplace_back("t" + std::to_string(i), (polyak_dtype)(i % 3), sizes[i],
                             dtype_bytes((polyak_dtype)(i % 3)) * (i % 2));
      std::mt19937_64 rng(4);
      for (auto &t : tensors)
        t.randomize(rng, 0.5f, 1.0f);
      Handle h = make_handle(cfg);
      add_all(h.get(), tensors);
      ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
      const char *picked = nullptr;
      ASSERT_EQ(polyak_cpu_isa(h.get(), &picked), POLYAK_OK);
      EXPECT_EQ(isa, picked);
      for (int64_t step : {1, 2, 3, 4, 6}) {
        for (auto &t : tensors) {
          t.randomize(rng, 0.5f, 1.0f);
          if (t.num_elems > 2)
            t.set(1, step % 2 ? NAN : INFINITY);
        }
        ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK) << polyak_last_error(h.get());
      }
      results.push_back(snapshot(h.get(), 3, tensors));
    }
    for (size_t i = 1; i < results.size(); i++)
      EXPECT_TRUE(results[i] == results[0]) << isas[i] << " differs from portable, " << dtype_label(shadow_dtype);
  }
}

TEST(CpuIsa, WithoutACapTheWidestTableIsPicked)
{
  IsaCap cap(nullptr);
  Handle h = make_handle(cpu_config());
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 5);
  add_all(h.get(), tensors);
  const char *isa = nullptr;
  EXPECT_EQ(polyak_cpu_isa(h.get(), &isa), POLYAK_ERR_STATE); // before finalize
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_cpu_isa(h.get(), &isa), POLYAK_OK);
  std::vector<Table> tables = vector_tables();
  EXPECT_STREQ(tables.empty() ? "portable" : tables.back().name, isa);
  EXPECT_EQ(polyak_cpu_isa(h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_cpu_isa(nullptr, &isa), POLYAK_ERR_INVALID_ARG);
}

TEST(CpuIsa, AnUnknownCapFailsFinalizeAndSaysWhy)
{
  IsaCap cap("avx1024");
  Handle h = make_handle(cpu_config());
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 5);
  add_all(h.get(), tensors);
  EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(h.get()), "POLYAK_CPU_ISA")) << polyak_last_error(h.get());
  unsetenv("POLYAK_CPU_ISA");
  EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get()); // nothing was left half done
}

} // namespace
