// test_cpu_kernels.cpp: the CPU update's chunk code (src/cpu/cpu_update.c) with
// each kernel table, portable C, AVX2 and AVX-512 where the CPU has them, against the
// GPU kernel's own per-chunk code (kernels/update_chunk.h) run on the CPU:
// the same bits on every dtype pair and rounding, on values chosen to hit
// the rare paths (NaN payloads, Inf, overflowing differences, subnormal
// halves, weight 1, the guard on and off), and on global element indices
// that cross multiples of 2^32, where the hash's counter changes its high
// half inside a chunk.
#include "test_util.h"

#include <cstdlib>

#include "cpu/cpu_state.h"
#include "layerwise.h"
#include "update_chunk.h"

using namespace polyak_test;

namespace {

struct Buffer {
  void *data;
  explicit Buffer(size_t num_bytes) : data(std::aligned_alloc(64, (num_bytes + 63) / 64 * 64 + 64))
  {
  }
  ~Buffer()
  {
    std::free(data);
  }
  Buffer(const Buffer &) = delete;
  Buffer &operator=(const Buffer &) = delete;
};

// f32 values for the params and shadows: ordinary ones mostly, and every
// kind of value the rare paths take.
float awkward_value(std::mt19937_64 &rng)
{
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  switch (rng() % 16) {
  case 0:
    return polyak_f32_from_bits(0x7FC00000u | (uint32_t)(rng() & 0x3FFFFF)); // quiet NaN, payload
  case 1:
    return polyak_f32_from_bits(0xFF800001u | (uint32_t)(rng() & 0x3FFFFF)); // signalling NaN
  case 2:
    return rng() % 2 ? INFINITY : -INFINITY;
  case 3:
    return rng() % 2 ? 3.0e38f : -3.0e38f; // param - shadow overflows
  case 4:
    return polyak_f32_from_bits((uint32_t)(rng() & 0x807FFFFFu)); // subnormal
  case 5:
    return polyak_f32_from_bits((uint32_t)rng()); // any bits
  default:
    return uniform(rng);
  }
}

// Runs of 64 ordinary values (the kernels' fast paths) alternate with runs
// of awkward ones. Values that may not be NaN (`finite`: nor Inf) fill shadows: where a NaN
// shadow meets a NaN param, which payload an operation keeps is the
// compiler's choice of operand order (and GPUs return their canonical
// NaN), so only NaN-ness is defined there; every other case has its bits.
void fill(void *base, polyak_dtype dtype, int64_t num_elems, std::mt19937_64 &rng, bool no_nan, bool finite)
{
  for (int64_t i = 0; i < num_elems; i++)
    do {
      if ((i / 64) % 2 == 0)
        store_as(dtype, base, i, std::uniform_real_distribution<float>(0.25f, 2.0f)(rng) * (rng() % 2 ? 1 : -1));
      else if (dtype != POLYAK_F32 && rng() % 8 == 0) // any half bits: subnormals, NaN payloads
        static_cast<uint16_t *>(base)[i] = (uint16_t)rng();
      else
        store_as(dtype, base, i, awkward_value(rng));
    } while ((no_nan && std::isnan(load_as(dtype, base, i))) || (finite && !polyak_is_finite(load_as(dtype, base, i))));
}

struct ChunkCase {
  polyak_dtype param_dtype, shadow_dtype;
  int num_shadows;
  int64_t global_offset;
  int skip_nonfinite;
  bool write_back;
  float weight0;           // shadow 0's weight (1: a copy)
  uint32_t stochastic_f32; // bit k: f32 shadow k rounds stochastically
  bool owned = false;      // shadow 0 is the caller's, of owned_dtype
  polyak_dtype owned_dtype = POLYAK_F32;
  int owned_round_nearest = 0;
};

// One tensor of `num_elems` as a chunk [first, first + count): the update
// through the kernel's code and through the CPU chunk code with `kernels`,
// from the same inputs; params and shadows must end equal.
void check(const ChunkCase &s, const cpu_kernels *kernels, int64_t num_elems, int64_t first, int32_t count,
           uint64_t seed)
{
  std::mt19937_64 rng(seed);
  size_t param_bytes = dtype_bytes(s.param_dtype), shadow_bytes = dtype_bytes(s.shadow_dtype);
  size_t owned_bytes = dtype_bytes(s.owned_dtype);
  Buffer param_a(num_elems * param_bytes), param_b(num_elems * param_bytes);
  fill(param_a.data, s.param_dtype, num_elems, rng, false, false);
  std::memcpy(param_b.data, param_a.data, num_elems * param_bytes);
  std::vector<std::unique_ptr<Buffer>> arenas;
  void *shadows_a[POLYAK_MAX_SHADOWS] = {}, *shadows_b[POLYAK_MAX_SHADOWS] = {};
  for (int k = 0; k < s.num_shadows; k++) {
    arenas.push_back(std::make_unique<Buffer>(num_elems * shadow_bytes));
    shadows_a[k] = arenas.back()->data;
    fill(shadows_a[k], s.shadow_dtype, num_elems, rng, true, s.skip_nonfinite);
    arenas.push_back(std::make_unique<Buffer>(num_elems * shadow_bytes));
    shadows_b[k] = arenas.back()->data;
    std::memcpy(shadows_b[k], shadows_a[k], num_elems * shadow_bytes);
  }
  Buffer owned_a(num_elems * owned_bytes), owned_b(num_elems * owned_bytes);
  fill(owned_a.data, s.owned_dtype, num_elems, rng, true, s.skip_nonfinite);
  std::memcpy(owned_b.data, owned_a.data, num_elems * owned_bytes);

  polyak_update_args args{};
  args.step = 7;
  args.gap = 1;
  args.num_shadows = s.num_shadows;
  args.skip_nonfinite = s.skip_nonfinite;
  args.write_back = s.write_back;
  args.stochastic_f32 = s.stochastic_f32;
  for (int k = 0; k < s.num_shadows; k++) {
    args.weight[k] = k == 0 ? s.weight0 : 0.001f * (float)(k + 1);
    args.sr_key[k] = polyak_sr_key(seed, 7, k);
  }
  polyak_tensor_desc t{};
  t.num_elems = t.local_num_elems = num_elems;
  t.global_offset_elems = s.global_offset;
  t.param_dtype = s.param_dtype;
  t.owned_dtype = s.owned_dtype;
  t.owned_round_nearest = s.owned_round_nearest;
  polyak_chunk chunk{first, 0, count};

  t.param = param_a.data;
  t.owned = s.owned ? owned_a.data : nullptr;
  const int threads = 64;
  int64_t expected = 0;
  for (int thread = 0; thread < threads; thread++)
    expected += s.shadow_dtype == POLYAK_F32
                    ? polyak_update_chunk<POLYAK_F32>(t, chunk, shadows_a, args, thread, threads)
                    : polyak_update_chunk<POLYAK_BF16>(t, chunk, shadows_a, args, thread, threads);
  t.param = param_b.data;
  t.owned = s.owned ? owned_b.data : nullptr;
  int64_t got = polyak_cpu_update_chunk(kernels, &t, &chunk, shadows_b, s.shadow_dtype, &args);

  EXPECT_EQ(expected, got) << "non-finite count";
  EXPECT_EQ(0, std::memcmp(param_a.data, param_b.data, num_elems * param_bytes)) << "params";
  for (int k = 0; k < s.num_shadows; k++)
    for (int64_t i = 0; i < num_elems; i++)
      if (std::memcmp((char *)shadows_a[k] + i * shadow_bytes, (char *)shadows_b[k] + i * shadow_bytes, shadow_bytes)) {
        ADD_FAILURE() << "shadow " << k << " element " << i << " differs from the kernel's";
        break;
      }
  for (int64_t i = 0; s.owned && i < num_elems; i++)
    if (std::memcmp((char *)owned_a.data + i * owned_bytes, (char *)owned_b.data + i * owned_bytes, owned_bytes)) {
      ADD_FAILURE() << "owned shadow element " << i << " differs from the kernel's";
      break;
    }
}

std::vector<std::pair<const char *, const cpu_kernels *>> tables()
{
  std::vector<std::pair<const char *, const cpu_kernels *>> all = {{"portable", &polyak_cpu_portable_kernels}};
  if (const cpu_kernels *avx2 = polyak_cpu_avx2_kernels())
    all.push_back({"avx2", avx2});
  if (const cpu_kernels *avx512 = polyak_cpu_avx512_kernels())
    all.push_back({"avx512", avx512});
  return all;
}

// Offsets whose chunks cross multiples of 2^32 in the global index.
const int64_t kGlobalOffsets[] = {0, 1, ((int64_t)1 << 32) - 5003, ((int64_t)3 << 32) - 4096, ((int64_t)1 << 40) + 3};

TEST(CpuKernels, ArenaShadowsMatchTheKernelsCode)
{
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16};
  uint64_t seed = 1;
  for (auto [name, kernels] : tables())
    for (polyak_dtype param_dtype : dtypes)
      for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16})
        for (int64_t offset : kGlobalOffsets)
          for (int variant = 0; variant < 6; variant++) {
            ChunkCase s{param_dtype,
                        shadow_dtype,
                        1 + variant % 4,
                        offset,
                        variant % 2,
                        variant == 3,
                        variant == 4 ? 1.0f : 0.01f,
                        variant % 3 == 0 ? 0x5u : 0xAu};
            check(s, kernels, 10007, 1000, 8001, seed++);
            if (HasFailure())
              FAIL() << name << " params " << dtype_label(param_dtype) << " shadows " << dtype_label(shadow_dtype)
                     << " offset " << offset << " variant " << variant;
          }
}

TEST(CpuKernels, NoShadowsBetweenLookaheadSyncsStillCount)
{
  for (auto [name, kernels] : tables())
    for (int skip : {0, 1}) {
      ChunkCase s{POLYAK_BF16, POLYAK_F32, 0, 5, skip, false, 0.5f, 0};
      check(s, kernels, 3000, 0, 3000, 11);
      if (HasFailure())
        FAIL() << name;
    }
}

TEST(CpuKernels, CallersShadowsMatchTheKernelsCode)
{
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16};
  uint64_t seed = 100;
  for (auto [name, kernels] : tables())
    for (polyak_dtype param_dtype : dtypes)
      for (polyak_dtype owned_dtype : dtypes)
        for (int variant = 0; variant < 4; variant++) {
          ChunkCase s{param_dtype,
                      POLYAK_F32,
                      1,
                      kGlobalOffsets[2 + variant % 2],
                      variant % 2,
                      false,
                      variant == 3 ? 1.0f : 0.02f,
                      0,
                      true,
                      owned_dtype,
                      variant / 2};
          check(s, kernels, 9001, 17, 8500, seed++);
          if (HasFailure())
            FAIL() << name << " params " << dtype_label(param_dtype) << " owned " << dtype_label(owned_dtype)
                   << " variant " << variant;
        }
}

TEST(CpuKernels, LayerwiseSumsOfSquaresFollowTheKernelsOrder)
{
  std::mt19937_64 rng(5);
  for (auto [name, kernels] : tables())
    for (polyak_dtype dtype : {POLYAK_F32, POLYAK_BF16, POLYAK_F16}) {
      Buffer grad(70001 * 4);
      for (int64_t i = 0; i < 70001; i++)
        store_as(dtype, grad.data, i, std::normal_distribution<float>(0.0f, 3.0f)(rng));
      for (polyak_chunk chunk : {polyak_chunk{0, 0, 65536}, polyak_chunk{65536, 0, 4465}, polyak_chunk{3, 0, 255}}) {
        float part[POLYAK_LAYER_THREADS];
        for (int t = 0; t < POLYAK_LAYER_THREADS; t++)
          part[t] = polyak_chunk_sumsq_part(grad.data, dtype, &chunk, t);
        EXPECT_EQ(float_bits(polyak_sum_parts_f32(part)),
                  float_bits(polyak_cpu_chunk_sumsq(kernels, grad.data, dtype, &chunk)))
            << name << " " << dtype_label(dtype) << " chunk at " << chunk.first_elem;
      }
    }
}

TEST(CpuKernels, ConversionsMatchPolyakMathOnEveryHalf)
{
  std::vector<uint16_t> halves(65536);
  for (uint32_t h = 0; h < 65536; h++)
    halves[h] = (uint16_t)h;
  std::vector<float> widened(65536), expected(65536);
  for (auto [name, kernels] : tables()) {
    kernels->f16_to_f32(widened.data(), halves.data(), 65536);
    for (uint32_t h = 0; h < 65536; h++)
      ASSERT_EQ(float_bits(polyak_f16_to_f32((uint16_t)h)), float_bits(widened[h])) << name << " f16 " << h;
    kernels->bf16_to_f32(widened.data(), halves.data(), 65536);
    for (uint32_t h = 0; h < 65536; h++)
      ASSERT_EQ(float_bits(polyak_bf16_to_f32((uint16_t)h)), float_bits(widened[h])) << name << " bf16 " << h;
    std::mt19937_64 rng(9);
    std::vector<float> values(4099);
    std::vector<uint16_t> narrowed(4099);
    for (auto &v : values)
      v = awkward_value(rng);
    kernels->f32_to_bf16(narrowed.data(), values.data(), 4099);
    for (size_t i = 0; i < values.size(); i++)
      ASSERT_EQ(polyak_f32_to_bf16_rne(values[i]), narrowed[i]) << name << " " << values[i];
  }
}

} // namespace

// Whole handles: one on the table the CPU picked, one switched to the
// portable table after finalize, updated alike; every shadow and the count
// must agree (on a CPU without AVX2 both run the portable table).
TEST(CpuKernels, HandlesGiveTheSameBitsOnEitherTable)
{
  for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16}) {
    polyak_config cfg = cpu_config(3, 0.95);
    cfg.shadow_dtype = shadow_dtype;
    cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
    cfg.lookahead_every = 2;
    cfg.seed = 8;
    std::vector<Tensor> tensors;
    const int64_t sizes[] = {1, 17, 65537, 4099, 130001, 3};
    for (size_t i = 0; i < std::size(sizes); i++)
      tensors.emplace_back("t" + std::to_string(i), (polyak_dtype)(i % 3), sizes[i],
                           dtype_bytes((polyak_dtype)(i % 3)) * (i % 2));
    std::mt19937_64 rng(4);
    for (auto &t : tensors)
      t.randomize(rng, 0.5f, 1.0f);
    std::vector<Tensor> other = tensors;
    Handle picked = make_handle(cfg), portable = make_handle(cfg);
    add_all(picked.get(), tensors);
    add_all(portable.get(), other);
    ASSERT_EQ(polyak_finalize(picked.get(), nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_finalize(portable.get(), nullptr), POLYAK_OK);
    static_cast<cpu_state *>(portable.get()->backend)->kernels = &polyak_cpu_portable_kernels;
    for (int64_t step : {1, 2, 3, 4, 6}) {
      for (size_t i = 0; i < tensors.size(); i++) {
        tensors[i].randomize(rng, 0.5f, 1.0f);
        if (tensors[i].num_elems > 2)
          tensors[i].set(1, NAN);
        std::memcpy(other[i].data(), tensors[i].data(), tensors[i].num_elems * dtype_bytes(tensors[i].dtype));
      }
      ASSERT_EQ(polyak_update(picked.get(), step, nullptr), POLYAK_OK);
      ASSERT_EQ(polyak_update(portable.get(), step, nullptr), POLYAK_OK);
    }
    EXPECT_TRUE(snapshot(picked.get(), 3, tensors) == snapshot(portable.get(), 3, other));
    for (size_t i = 0; i < tensors.size(); i++) // Lookahead wrote the params back
      EXPECT_EQ(0,
                std::memcmp(tensors[i].data(), other[i].data(), tensors[i].num_elems * dtype_bytes(tensors[i].dtype)));
  }
}
