/* cpu_update_avx2.c: the update's kernels (cpu_kernels.h) for x86-64 CPUs
 * with AVX2 and FMA, eight or sixteen elements a step, picked at run time. Each is the
 * portable kernel's element math written in vector instructions that round
 * the same way: vfmadd for fmaf, the double path of an f32 stochastic
 * rounding in double lanes, the hash in 32-bit lanes. Scalar loops over
 * polyak_math.h take the tails. -ffp-contract=off (CMakeLists.txt) keeps the
 * compiler from fusing a separate multiply and add. */
#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define AVX2        __attribute__((target("avx2,fma,popcnt")))
#define AVX2_INLINE static inline __attribute__((target("avx2,fma,popcnt"), always_inline))

AVX2_INLINE __m256i set1(uint32_t x)
{
  return _mm256_set1_epi32((int)x);
}

/* All ones in the lanes whose param is NaN or Inf (an all-ones exponent). */
AVX2_INLINE __m256i nonfinite_lanes(__m256 param)
{
  __m256i exponent = set1(0x7F800000u);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(param), exponent), exponent);
}

AVX2_INLINE int64_t count_lanes(__m256i mask)
{
  return __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(mask)));
}

/* polyak_mix32 in each lane. */
AVX2_INLINE __m256i mix32(__m256i x)
{
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, set1(0x7FEB352Du));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, set1(0x846CA68Bu));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* The hash's counter for elements first_elem + j: its low halves in
 * lanes, advanced by 8 a step, and its high half (the same for every
 * element of a block: cpu_update.c cuts blocks there) xor the key's,
 * broadcast. */
typedef struct {
  __m256i low, high;
} counter8;

/* Lane j holds element first_elem + lanes[j]. */
AVX2_INLINE counter8 counter_at(uint64_t key, int64_t first_elem, __m256i lanes)
{
  uint64_t e = (uint64_t)first_elem;
  counter8 c = {_mm256_add_epi32(set1((uint32_t)e), lanes), set1((uint32_t)(e >> 32) ^ (uint32_t)(key >> 32))};
  return c;
}

AVX2_INLINE counter8 counter_start(uint64_t key, int64_t first_elem)
{
  return counter_at(key, first_elem, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* polyak_sr_bits(key, element) in each lane. */
AVX2_INLINE __m256i sr_bits8(const counter8 *c, __m256i key_low)
{
  return mix32(_mm256_xor_si256(mix32(_mm256_xor_si256(c->low, key_low)), c->high));
}

/* polyak_lerp_sr before the copy at weight 1, four lanes: the lerp in
 * double, `random`'s low 29 bits (already masked) added below the f32 ulp,
 * cut, narrowed; with `special`, Inf and NaN pass uncut (only a non-finite
 * shadow or param can make them). */
AVX2_INLINE __m128 lerp_sr4(__m128 shadow, __m128 param, __m256d weight, __m128i random, int special)
{
  const __m256i low = _mm256_set1_epi64x(0x1FFFFFFF), exponent = _mm256_set1_epi64x(0x7FF0000000000000ll);
  __m256d s = _mm256_cvtps_pd(shadow), p = _mm256_cvtps_pd(param);
  __m256i bits = _mm256_castpd_si256(_mm256_add_pd(s, _mm256_mul_pd(weight, _mm256_sub_pd(p, s))));
  __m256i cut = _mm256_andnot_si256(low, _mm256_add_epi64(bits, _mm256_cvtepu32_epi64(random)));
  if (special)
    cut = _mm256_blendv_epi8(cut, bits, _mm256_cmpeq_epi64(_mm256_and_si256(bits, exponent), exponent));
  return _mm256_cvtpd_ps(_mm256_castsi256_pd(cut));
}

AVX2_INLINE __m256 lerp_sr8(__m256 s, __m256 p, __m256d w, __m256i random, int special)
{
  __m128 low =
      lerp_sr4(_mm256_castps256_ps128(s), _mm256_castps256_ps128(p), w, _mm256_castsi256_si128(random), special);
  __m128 high = lerp_sr4(_mm256_extractf128_ps(s, 1), _mm256_extractf128_ps(p, 1), w,
                         _mm256_extracti128_si256(random, 1), special);
  return _mm256_set_m128(high, low);
}

/* Lanes to leave as they were: non-finite params under the guard. */
AVX2_INLINE __m256i kept_lanes(__m256i bad, int guard)
{
  return _mm256_and_si256(bad, set1(guard ? 0xFFFFFFFFu : 0u));
}

/* The stochastic kernels' loops take a fast path for groups of eight whose
 * params and shadows are all finite (no guard, no count, no Inf or NaN to
 * pass through) and the full element rules otherwise; `copy` (weight 1) is
 * a constant, so each case is a loop of its own. */

/* Sixteen elements a step, the guard and the count only where a param is
 * not finite: few instructions per byte keep more cache misses in flight,
 * which is what one core's share of memory bandwidth depends on. */
AVX2_INLINE int64_t f32_nearest_loop(float *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                     int copy)
{
  const __m256 w = _mm256_set1_ps(weight);
  int64_t nonfinite = 0, i = 0;
  for (; i + 16 <= num_elems; i += 16) {
    __m256 p0 = _mm256_loadu_ps(param + i), p1 = _mm256_loadu_ps(param + i + 8);
    __m256 s0 = _mm256_loadu_ps(shadow + i), s1 = _mm256_loadu_ps(shadow + i + 8);
    __m256 next0 = copy ? p0 : _mm256_fmadd_ps(w, _mm256_sub_ps(p0, s0), s0);
    __m256 next1 = copy ? p1 : _mm256_fmadd_ps(w, _mm256_sub_ps(p1, s1), s1);
    __m256i bad0 = nonfinite_lanes(p0), bad1 = nonfinite_lanes(p1), bad = _mm256_or_si256(bad0, bad1);
    if (!_mm256_testz_si256(bad, bad)) {
      nonfinite += count_lanes(bad0) + count_lanes(bad1);
      next0 = _mm256_blendv_ps(next0, s0, _mm256_castsi256_ps(kept_lanes(bad0, guard)));
      next1 = _mm256_blendv_ps(next1, s1, _mm256_castsi256_ps(kept_lanes(bad1, guard)));
    }
    _mm256_storeu_ps(shadow + i, next0);
    _mm256_storeu_ps(shadow + i + 8, next1);
  }
  return nonfinite + cpu_f32_nearest_loop(shadow, param, i, num_elems, weight, guard);
}

AVX2 int64_t polyak_cpu_avx2_f32_nearest(float *shadow, const float *param, int64_t num_elems, float weight, int guard)
{
  return cpu_weight_is_one(weight) ? f32_nearest_loop(shadow, param, num_elems, weight, guard, 1)
                                   : f32_nearest_loop(shadow, param, num_elems, weight, guard, 0);
}

AVX2_INLINE int64_t f32_stochastic_loop(float *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                        uint64_t key, int64_t first_elem, int copy)
{
  const __m256d w = _mm256_set1_pd((double)weight);
  const __m256i key_low = set1((uint32_t)key), step = set1(8u), random_bits = set1(0x1FFFFFFFu);
  counter8 counter = counter_start(key, first_elem);
  int64_t nonfinite = 0, i = 0;
  for (; i + 8 <= num_elems; i += 8, counter.low = _mm256_add_epi32(counter.low, step)) {
    __m256 p = _mm256_loadu_ps(param + i), s = _mm256_loadu_ps(shadow + i);
    __m256i random = _mm256_and_si256(sr_bits8(&counter, key_low), random_bits);
    __m256 next = copy ? p : lerp_sr8(s, p, w, random, 0);
    __m256i bad = nonfinite_lanes(p), rare = _mm256_or_si256(bad, nonfinite_lanes(s));
    if (!_mm256_testz_si256(rare, rare)) {
      nonfinite += count_lanes(bad);
      next = copy ? p : lerp_sr8(s, p, w, random, 1);
      next = _mm256_blendv_ps(next, s, _mm256_castsi256_ps(kept_lanes(bad, guard)));
    }
    _mm256_storeu_ps(shadow + i, next);
  }
  return nonfinite + cpu_f32_stochastic_loop(shadow, param, i, num_elems, weight, guard, key, first_elem);
}

AVX2 static int64_t f32_stochastic(float *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                   uint64_t key, int64_t first_elem)
{
  return cpu_weight_is_one(weight) ? f32_stochastic_loop(shadow, param, num_elems, weight, guard, key, first_elem, 1)
                                   : f32_stochastic_loop(shadow, param, num_elems, weight, guard, key, first_elem, 0);
}

/* Eight lanes of a bf16 shadow (`s`, as f32) updated with params `p`:
 * polyak_next_bf16's lerp, then polyak_f32_to_bf16_sr with the hash's
 * bits; the new bits in the low halves of the lanes. */
AVX2_INLINE __m256i bf16_next8(__m256 s, __m256 p, __m256 w, __m256i random, int guard, int copy, int64_t *nonfinite)
{
  __m256 mixed = copy ? p : _mm256_fmadd_ps(w, _mm256_sub_ps(p, s), s);
  __m256i bits = _mm256_castps_si256(mixed);
  __m256i next = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_and_si256(random, set1(0xFFFFu))), 16);
  __m256i special = nonfinite_lanes(mixed);    /* as is every lane whose param is not finite */
  if (!_mm256_testz_si256(special, special)) { /* Inf, and NaN quieted, pass uncut; the guard; the count */
    __m256i bad = nonfinite_lanes(p);
    *nonfinite += count_lanes(bad);
    __m256i payload = _mm256_cmpeq_epi32(_mm256_and_si256(bits, set1(0x007FFFFFu)), _mm256_setzero_si256());
    __m256i passed = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_andnot_si256(payload, set1(0x0040u)));
    next = _mm256_blendv_epi8(next, passed, special);
    next = _mm256_blendv_epi8(next, _mm256_srli_epi32(_mm256_castps_si256(s), 16), kept_lanes(bad, guard));
  }
  return next;
}

/* Sixteen elements a step: interleaving the shadow's halves with zeros
 * widens them in place, lanes 0-3, 8-11 and 4-7, 12-15; the params and the
 * hash's counters take the same order, and packing the two results
 * restores the elements' order. */
AVX2_INLINE int64_t bf16_stochastic_loop(uint16_t *shadow, const float *param, int64_t num_elems, float weight,
                                         int guard, uint64_t key, int64_t first_elem, int copy)
{
  const __m256 w = _mm256_set1_ps(weight);
  const __m256i key_low = set1((uint32_t)key), step = set1(16u), zero = _mm256_setzero_si256();
  counter8 low = counter_at(key, first_elem, _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11));
  counter8 high = counter_at(key, first_elem, _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15));
  int64_t nonfinite = 0, i = 0;
  for (; i + 16 <= num_elems; i += 16) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)(shadow + i));
    __m256 p0 = _mm256_loadu_ps(param + i), p1 = _mm256_loadu_ps(param + i + 8);
    __m256i next_low =
        bf16_next8(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)), _mm256_permute2f128_ps(p0, p1, 0x20), w,
                   sr_bits8(&low, key_low), guard, copy, &nonfinite);
    __m256i next_high =
        bf16_next8(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw)), _mm256_permute2f128_ps(p0, p1, 0x31), w,
                   sr_bits8(&high, key_low), guard, copy, &nonfinite);
    _mm256_storeu_si256((__m256i *)(shadow + i), _mm256_packus_epi32(next_low, next_high));
    low.low = _mm256_add_epi32(low.low, step);
    high.low = _mm256_add_epi32(high.low, step);
  }
  return nonfinite + cpu_half_stochastic_loop(shadow, param, i, num_elems, weight, guard, key, first_elem, POLYAK_BF16);
}

AVX2 static int64_t bf16_stochastic(uint16_t *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                    uint64_t key, int64_t first_elem)
{
  return cpu_weight_is_one(weight) ? bf16_stochastic_loop(shadow, param, num_elems, weight, guard, key, first_elem, 1)
                                   : bf16_stochastic_loop(shadow, param, num_elems, weight, guard, key, first_elem, 0);
}

AVX2 int64_t polyak_cpu_avx2_count_nonfinite(const float *param, int64_t num_elems)
{
  int64_t nonfinite = 0, i = 0;
  for (; i + 8 <= num_elems; i += 8)
    nonfinite += count_lanes(nonfinite_lanes(_mm256_loadu_ps(param + i)));
  for (; i < num_elems; i++)
    nonfinite += !polyak_is_finite(param[i]);
  return nonfinite;
}

AVX2 void polyak_cpu_avx2_bf16_to_f32(float *dst, const uint16_t *src, int64_t num_elems)
{
  int64_t i = 0;
  for (; i + 8 <= num_elems; i += 8) {
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
  }
  for (; i < num_elems; i++)
    dst[i] = polyak_bf16_to_f32(src[i]);
}

/* polyak_f16_to_f32 in lanes (halves zero-extended to 32 bits): a
 * subnormal half is its mantissa times 2^-24, which a float holds exactly
 * (the loop there normalizes to the same value); NaN payloads are kept, not
 * quieted (unlike vcvtph2ps). */
AVX2_INLINE __m256 f16_lanes(__m256i h)
{
  const __m256i top = set1(0x1Fu);
  __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, set1(0x8000u)), 16);
  __m256i exponent = _mm256_and_si256(_mm256_srli_epi32(h, 10), top);
  __m256i mantissa = _mm256_and_si256(h, set1(0x3FFu)), shifted = _mm256_slli_epi32(mantissa, 13);
  __m256i normal = _mm256_or_si256(_mm256_slli_epi32(_mm256_add_epi32(exponent, set1(112u)), 23), shifted);
  __m256i special = _mm256_or_si256(set1(0x7F800000u), shifted);
  __m256i tiny = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(mantissa), _mm256_set1_ps(0x1p-24f)));
  __m256i magnitude = _mm256_blendv_epi8(normal, special, _mm256_cmpeq_epi32(exponent, top));
  magnitude = _mm256_blendv_epi8(magnitude, tiny, _mm256_cmpeq_epi32(exponent, _mm256_setzero_si256()));
  return _mm256_castsi256_ps(_mm256_or_si256(magnitude, sign));
}

AVX2 void polyak_cpu_avx2_f16_to_f32(float *dst, const uint16_t *src, int64_t num_elems)
{
  int64_t i = 0;
  for (; i + 8 <= num_elems; i += 8)
    _mm256_storeu_ps(dst + i, f16_lanes(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)))));
  for (; i < num_elems; i++)
    dst[i] = polyak_f16_to_f32(src[i]);
}

/* An f16 shadow (the caller's): polyak_f32_to_f16_sr's normal-range rule
 * in lanes; a group with a non-finite param or a result outside [2^-14,
 * 65536) (zero, subnormal, overflow, Inf, NaN) takes the scalar loop. */
AVX2_INLINE int64_t f16_stochastic_loop(uint16_t *shadow, const float *param, int64_t num_elems, float weight,
                                        int guard, uint64_t key, int64_t first_elem, int copy)
{
  const __m256 w = _mm256_set1_ps(weight);
  const __m256i key_low = set1((uint32_t)key), step = set1(8u), random_bits = set1(0x1FFFu);
  const __m256i smallest = set1(0x38800000u), largest = set1(0x477FFFFFu), abs = set1(0x7FFFFFFFu);
  counter8 counter = counter_start(key, first_elem);
  int64_t nonfinite = 0, i = 0;
  for (; i + 8 <= num_elems; i += 8, counter.low = _mm256_add_epi32(counter.low, step)) {
    __m256 s = f16_lanes(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(shadow + i))));
    __m256 p = _mm256_loadu_ps(param + i);
    __m256i bits = _mm256_castps_si256(copy ? p : _mm256_fmadd_ps(w, _mm256_sub_ps(p, s), s));
    __m256i magnitude = _mm256_and_si256(bits, abs);
    __m256i rare = _mm256_or_si256(nonfinite_lanes(p), _mm256_cmpgt_epi32(smallest, magnitude));
    rare = _mm256_or_si256(rare, _mm256_cmpgt_epi32(magnitude, largest));
    if (!_mm256_testz_si256(rare, rare)) {
      nonfinite += cpu_half_stochastic_loop(shadow, param, i, i + 8, weight, guard, key, first_elem, POLYAK_F16);
      continue;
    }
    __m256i random = _mm256_and_si256(sr_bits8(&counter, key_low), random_bits);
    __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 16), set1(0x8000u));
    __m256i rounded = _mm256_srli_epi32(_mm256_sub_epi32(_mm256_add_epi32(magnitude, random), set1(0x38000000u)), 13);
    __m256i next = _mm256_or_si256(sign, rounded);
    _mm_storeu_si128((__m128i *)(shadow + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(next), _mm256_extracti128_si256(next, 1)));
  }
  return nonfinite + cpu_half_stochastic_loop(shadow, param, i, num_elems, weight, guard, key, first_elem, POLYAK_F16);
}

AVX2 static int64_t f16_stochastic(uint16_t *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                   uint64_t key, int64_t first_elem)
{
  return cpu_weight_is_one(weight) ? f16_stochastic_loop(shadow, param, num_elems, weight, guard, key, first_elem, 1)
                                   : f16_stochastic_loop(shadow, param, num_elems, weight, guard, key, first_elem, 0);
}

AVX2 void polyak_cpu_avx2_f32_to_bf16(uint16_t *dst, const float *src, int64_t num_elems)
{
  int64_t i = 0;
  for (; i + 8 <= num_elems; i += 8) {
    __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(src + i));
    __m256i high = _mm256_srli_epi32(bits, 16);
    __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, set1(0x7FFFFFFFu)), set1(0x7F800000u));
    __m256i bias = _mm256_add_epi32(set1(0x7FFFu), _mm256_and_si256(high, set1(1u)));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    __m256i next = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, set1(0x0040u)), is_nan);
    _mm_storeu_si128((__m128i *)(dst + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(next), _mm256_extracti128_si256(next, 1)));
  }
  for (; i < num_elems; i++)
    dst[i] = polyak_f32_to_bf16_rne(src[i]);
}

AVX2 void polyak_cpu_avx2_sumsq_row(float *acc, const float *row, int64_t num_elems)
{
  int64_t t = 0;
  for (; t + 8 <= num_elems; t += 8) {
    __m256 g = _mm256_loadu_ps(row + t);
    _mm256_storeu_ps(acc + t, _mm256_fmadd_ps(g, g, _mm256_loadu_ps(acc + t)));
  }
  for (; t < num_elems; t++)
    acc[t] = fmaf(row[t], row[t], acc[t]);
}

static const cpu_kernels avx2_kernels = {
    .isa = "avx2",
    .f32_nearest = polyak_cpu_avx2_f32_nearest,
    .f32_stochastic = f32_stochastic,
    .bf16_stochastic = bf16_stochastic,
    .f16_stochastic = f16_stochastic,
    .count_nonfinite = polyak_cpu_avx2_count_nonfinite,
    .bf16_to_f32 = polyak_cpu_avx2_bf16_to_f32,
    .f16_to_f32 = polyak_cpu_avx2_f16_to_f32,
    .f32_to_bf16 = polyak_cpu_avx2_f32_to_bf16,
    .sumsq_row = polyak_cpu_avx2_sumsq_row,
};

const cpu_kernels *polyak_cpu_avx2_kernels(void)
{
  int usable = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  return usable ? &avx2_kernels : NULL;
}

#else

const cpu_kernels *polyak_cpu_avx2_kernels(void)
{
  return NULL;
}

#endif
