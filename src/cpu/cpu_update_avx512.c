/* cpu_update_avx512.c: the stochastic-rounding kernels (cpu_kernels.h) for
 * x86-64 CPUs with AVX-512 (F, BW, DQ, VL), sixteen elements a step,
 * picked at run time; the table's other entries, bandwidth-bound already,
 * are the AVX2 ones. Each kernel is the portable one's element math in
 * vector instructions that round the same way: the f32 rounding's double
 * expression in double lanes (a sub, a mul and an add, as the reference
 * has them; never fused), vfmadd for fmaf, the hash in 32-bit lanes.
 * What AVX-512 saves over AVX2 is instructions, not lanes: vpternlogd
 * fuses the hash's xors with their masks, vfpclass tests for Inf and NaN
 * in one step, and loads widen as they convert, so that the hash and the
 * lerp fit under the time the memory takes. Scalar loops over
 * polyak_math.h take the tails. */
#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>

#define AVX512_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,popcnt"
#define AVX512        __attribute__((target(AVX512_TARGET)))
#define AVX512_INLINE static inline __attribute__((target(AVX512_TARGET), always_inline))

/* vfpclass categories: quiet NaN, +Inf, -Inf, signalling NaN */
#define NONFINITE 0x99

AVX512_INLINE __m512i set1(uint32_t x)
{
  return _mm512_set1_epi32((int)x);
}

/* vpternlogd truth tables over (a, b, c) */
#define XOR3    0x96 /* a ^ b ^ c */
#define XOR_AND 0x28 /* (a ^ b) & c */

/* polyak_mix32's two multiplications and the shift between them. */
AVX512_INLINE __m512i mix32_middle(__m512i x)
{
  x = _mm512_mullo_epi32(x, set1(0x7FEB352Du));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  return _mm512_mullo_epi32(x, set1(0x846CA68Bu));
}

/* The hash's counter for sixteen elements of a run (run_elems): the low
 * halves of their indices in lanes, advanced by 16 a step, xor `first`;
 * and the high half (the same for every element of a block: cpu_update.c
 * cuts blocks there) xor the key's, broadcast. polyak_mix32's first step,
 * x ^ (x >> 16) of x = index ^ key, is index ^ `first` throughout a run:
 * x >> 16 is the same for all of it. */
typedef struct {
  __m512i low, first, high;
} counter16;

/* Elements from index `elem` on, at most num_elems, before the index's
 * bits 16-31 change: a run. The kernels go run by run. */
static inline int64_t run_elems(int64_t elem, int64_t num_elems)
{
  int64_t run = 65536 - (int64_t)((uint64_t)elem & 0xFFFFu);
  return run < num_elems ? run : num_elems;
}

/* Lane j holds element first_elem + lanes[j], all of one run. */
AVX512_INLINE counter16 counter_at(uint64_t key, int64_t first_elem, __m512i lanes)
{
  uint64_t e = (uint64_t)first_elem;
  uint32_t first = (uint32_t)key ^ (((uint32_t)e ^ (uint32_t)key) >> 16);
  counter16 c = {_mm512_add_epi32(set1((uint32_t)e), lanes), set1(first),
                 set1((uint32_t)(e >> 32) ^ (uint32_t)(key >> 32))};
  return c;
}

/* polyak_sr_bits(key, element) & mask in each lane: two rounds of
 * polyak_mix32, each one's last xor fused with what follows it. */
AVX512_INLINE __m512i sr_bits16(const counter16 *c, __m512i mask)
{
  __m512i x = mix32_middle(_mm512_xor_si512(c->low, c->first));
  x = _mm512_ternarylogic_epi32(x, _mm512_srli_epi32(x, 16), c->high, XOR3);
  x = mix32_middle(_mm512_xor_si512(x, _mm512_srli_epi32(x, 16)));
  return _mm512_ternarylogic_epi32(x, _mm512_srli_epi32(x, 16), mask, XOR_AND);
}

/* sr_bits16 for two groups, `c`'s and the sixteen after it, statement by
 * statement: with two chains of multiplies and shifts in flight the units
 * wait less on each one's latency (6% less time per element on Zen 4). */
AVX512_INLINE void sr_bits16x2(const counter16 *c, __m512i mask, __m512i *random0, __m512i *random1)
{
  __m512i x0 = _mm512_xor_si512(c->low, c->first);
  __m512i x1 = _mm512_xor_si512(_mm512_add_epi32(c->low, set1(16u)), c->first);
  x0 = mix32_middle(x0);
  x1 = mix32_middle(x1);
  x0 = _mm512_ternarylogic_epi32(x0, _mm512_srli_epi32(x0, 16), c->high, XOR3);
  x1 = _mm512_ternarylogic_epi32(x1, _mm512_srli_epi32(x1, 16), c->high, XOR3);
  x0 = mix32_middle(_mm512_xor_si512(x0, _mm512_srli_epi32(x0, 16)));
  x1 = mix32_middle(_mm512_xor_si512(x1, _mm512_srli_epi32(x1, 16)));
  *random0 = _mm512_ternarylogic_epi32(x0, _mm512_srli_epi32(x0, 16), mask, XOR_AND);
  *random1 = _mm512_ternarylogic_epi32(x1, _mm512_srli_epi32(x1, 16), mask, XOR_AND);
}

AVX512_INLINE int64_t count(__mmask16 lanes)
{
  return __builtin_popcount((unsigned)lanes);
}

/* ---- f32 shadows rounded stochastically ------------------------------------------ */

/* Eight lanes of polyak_lerp_sr before the copy at weight 1: the lerp in
 * double from the f32s at shadow and param, `random`'s low 29 bits (zero
 * extended, already masked) added below the f32 ulp, cut, narrowed.
 * *special gets the lanes whose double is Inf or NaN, which pass uncut
 * where the caller asks (only a non-finite shadow or param makes them);
 * *exact their bits. */
AVX512_INLINE __m256 lerp_sr8(const float *shadow, const float *param, __m512d weight, __m512i random,
                              __mmask8 *special, __m512i *exact)
{
  __m512d s = _mm512_cvtps_pd(_mm256_loadu_ps(shadow)), p = _mm512_cvtps_pd(_mm256_loadu_ps(param));
  __m512d mixed = _mm512_add_pd(s, _mm512_mul_pd(weight, _mm512_sub_pd(p, s)));
  __m512i bits = _mm512_castpd_si512(mixed);
  __m512i cut = _mm512_andnot_si512(_mm512_set1_epi64(0x1FFFFFFF), _mm512_add_epi64(bits, random));
  *special = _mm512_fpclass_pd_mask(mixed, NONFINITE);
  *exact = bits;
  return _mm512_cvtpd_ps(_mm512_castsi512_pd(cut));
}

/* Sixteen elements at weight 1: the params copied, but for the guard. */
AVX512_INLINE int64_t f32_copy16(float *shadow, const float *param, __mmask16 guarded)
{
  __m512 p = _mm512_loadu_ps(param);
  __mmask16 bad = _mm512_fpclass_ps_mask(p, NONFINITE);
  if (bad)
    p = _mm512_mask_mov_ps(p, bad & guarded, _mm512_loadu_ps(shadow));
  _mm512_storeu_ps(shadow, p);
  return count(bad);
}

/* Sixteen elements rounded with `random` (from lanes that take elements 0,
 * 8, 1, 9, ... 7, 15, so that as 64-bit lanes their low halves hold
 * elements 0-7 and their high halves 8-15: zero-extending them for the
 * double lanes costs no shuffle): the two halves, and in `special` the
 * lanes whose double is Inf or NaN, in `exact` those doubles. */
typedef struct {
  __m256 next[2];
  __m512i exact[2];
  __mmask8 special[2];
} f32_group;

AVX512_INLINE f32_group f32_stochastic16(const float *shadow, const float *param, __m512d w, __m512i random)
{
  f32_group g;
  g.next[0] = lerp_sr8(shadow, param, w, _mm512_maskz_mov_epi32(0x5555, random), &g.special[0], &g.exact[0]);
  g.next[1] = lerp_sr8(shadow + 8, param + 8, w, _mm512_srli_epi64(random, 32), &g.special[1], &g.exact[1]);
  return g;
}

/* Stores a group: as it is where all its doubles are finite (no guard, no
 * count, nothing to pass through), else by the full rules: Inf and NaN
 * pass uncut; the guard; the count, returned. */
AVX512_INLINE int64_t f32_store16(float *shadow, const float *param, const f32_group *g, __mmask16 guarded)
{
  if (!(g->special[0] | g->special[1])) {
    _mm256_storeu_ps(shadow, g->next[0]);
    _mm256_storeu_ps(shadow + 8, g->next[1]);
    return 0;
  }
  __mmask16 bad = _mm512_fpclass_ps_mask(_mm512_loadu_ps(param), NONFINITE);
  __m256 next0 = _mm256_mask_mov_ps(g->next[0], g->special[0], _mm512_cvtpd_ps(_mm512_castsi512_pd(g->exact[0])));
  __m256 next1 = _mm256_mask_mov_ps(g->next[1], g->special[1], _mm512_cvtpd_ps(_mm512_castsi512_pd(g->exact[1])));
  __m512 next = _mm512_insertf32x8(_mm512_castps256_ps512(next0), next1, 1);
  _mm512_storeu_ps(shadow, _mm512_mask_mov_ps(next, bad & guarded, _mm512_loadu_ps(shadow)));
  return count(bad);
}

/* Thirty-two elements a step (two groups, their hashes interleaved), then
 * sixteen, then the scalar loop. `copy` (weight 1) is a constant, so each
 * case is a loop of its own. */
AVX512_INLINE int64_t f32_stochastic_loop(float *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                          uint64_t key, int64_t first_elem, int copy)
{
  const __m512d w = _mm512_set1_pd((double)weight);
  const __m512i step = set1(32u), random_bits = set1(0x1FFFFFFFu);
  const __mmask16 guarded = guard ? 0xFFFF : 0;
  counter16 counter =
      counter_at(key, first_elem, _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15));
  int64_t nonfinite = 0, i = 0;
  for (; i + 32 <= num_elems; i += 32, counter.low = _mm512_add_epi32(counter.low, step)) {
    if (copy) {
      nonfinite += f32_copy16(shadow + i, param + i, guarded) + f32_copy16(shadow + i + 16, param + i + 16, guarded);
      continue;
    }
    __m512i random0, random1; /* both groups loaded before either is stored: they may not alias, for all
                                 the compiler knows */
    sr_bits16x2(&counter, random_bits, &random0, &random1);
    f32_group g0 = f32_stochastic16(shadow + i, param + i, w, random0);
    f32_group g1 = f32_stochastic16(shadow + i + 16, param + i + 16, w, random1);
    nonfinite += f32_store16(shadow + i, param + i, &g0, guarded);
    nonfinite += f32_store16(shadow + i + 16, param + i + 16, &g1, guarded);
  }
  if (i + 16 <= num_elems && copy) {
    nonfinite += f32_copy16(shadow + i, param + i, guarded);
    i += 16;
  } else if (i + 16 <= num_elems) {
    f32_group g = f32_stochastic16(shadow + i, param + i, w, sr_bits16(&counter, random_bits));
    nonfinite += f32_store16(shadow + i, param + i, &g, guarded);
    i += 16;
  }
  return nonfinite + cpu_f32_stochastic_loop(shadow, param, i, num_elems, weight, guard, key, first_elem);
}

AVX512 static int64_t f32_stochastic(float *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                     uint64_t key, int64_t first_elem)
{
  int copy = cpu_weight_is_one(weight);
  int64_t nonfinite = 0;
  for (int64_t i = 0, n; i < num_elems; i += n) {
    n = run_elems(first_elem + i, num_elems - i);
    nonfinite += copy ? f32_stochastic_loop(shadow + i, param + i, n, weight, guard, key, first_elem + i, 1)
                      : f32_stochastic_loop(shadow + i, param + i, n, weight, guard, key, first_elem + i, 0);
  }
  return nonfinite;
}

/* ---- 16-bit shadows -------------------------------------------------------------- */

/* Sixteen elements a step, in order. */
AVX512_INLINE counter16 counter_start(uint64_t key, int64_t first_elem)
{
  return counter_at(key, first_elem, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

/* polyak_next_bf16 on sixteen elements: the lerp in f32 (vfmadd for
 * fmaf), then polyak_f32_to_bf16_sr with the hash's bits. A group with an
 * Inf or NaN lerp (a non-finite param or shadow makes them) takes the full
 * rules: Inf, and NaN quieted, pass uncut; the guard; the count. */
AVX512_INLINE int64_t bf16_stochastic_loop(uint16_t *shadow, const float *param, int64_t num_elems, float weight,
                                           int guard, uint64_t key, int64_t first_elem, int copy)
{
  const __m512 w = _mm512_set1_ps(weight);
  const __m512i step = set1(16u), random_bits = set1(0xFFFFu);
  const __mmask16 guarded = guard ? 0xFFFF : 0;
  counter16 counter = counter_start(key, first_elem);
  int64_t nonfinite = 0, i = 0;
  for (; i + 16 <= num_elems; i += 16, counter.low = _mm512_add_epi32(counter.low, step)) {
    __m512i raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(shadow + i)));
    __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), p = _mm512_loadu_ps(param + i);
    __m512 mixed = copy ? p : _mm512_fmadd_ps(w, _mm512_sub_ps(p, s), s);
    __m512i bits = _mm512_castps_si512(mixed);
    __m512i next = _mm512_srli_epi32(_mm512_add_epi32(bits, sr_bits16(&counter, random_bits)), 16);
    __mmask16 special = _mm512_fpclass_ps_mask(mixed, NONFINITE);
    if (special) {
      __mmask16 bad = _mm512_fpclass_ps_mask(p, NONFINITE);
      nonfinite += count(bad);
      __mmask16 payload = _mm512_test_epi32_mask(bits, set1(0x007FFFFFu));
      __m512i passed = _mm512_srli_epi32(bits, 16);
      passed = _mm512_mask_or_epi32(passed, payload, passed, set1(0x0040u));
      next = _mm512_mask_mov_epi32(next, special, passed);
      next = _mm512_mask_mov_epi32(next, bad & guarded, raw);
    }
    _mm256_storeu_si256((__m256i *)(shadow + i), _mm512_cvtepi32_epi16(next));
  }
  return nonfinite + cpu_half_stochastic_loop(shadow, param, i, num_elems, weight, guard, key, first_elem, POLYAK_BF16);
}

AVX512 static int64_t bf16_stochastic(uint16_t *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                      uint64_t key, int64_t first_elem)
{
  int copy = cpu_weight_is_one(weight);
  int64_t nonfinite = 0;
  for (int64_t i = 0, n; i < num_elems; i += n) {
    n = run_elems(first_elem + i, num_elems - i);
    nonfinite += copy ? bf16_stochastic_loop(shadow + i, param + i, n, weight, guard, key, first_elem + i, 1)
                      : bf16_stochastic_loop(shadow + i, param + i, n, weight, guard, key, first_elem + i, 0);
  }
  return nonfinite;
}

/* polyak_f16_to_f32 in lanes (halves zero-extended to 32 bits): a
 * subnormal half is its mantissa times 2^-24, which a float holds exactly;
 * NaN payloads are kept, not quieted (unlike vcvtph2ps). */
AVX512_INLINE __m512 f16_lanes(__m512i h)
{
  const __m512i top = set1(0x1Fu);
  __m512i sign = _mm512_slli_epi32(_mm512_and_si512(h, set1(0x8000u)), 16);
  __m512i exponent = _mm512_and_si512(_mm512_srli_epi32(h, 10), top);
  __m512i mantissa = _mm512_and_si512(h, set1(0x3FFu)), shifted = _mm512_slli_epi32(mantissa, 13);
  __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(exponent, set1(112u)), 23), shifted);
  __m512i special = _mm512_or_si512(set1(0x7F800000u), shifted);
  __m512i tiny = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(mantissa), _mm512_set1_ps(0x1p-24f)));
  __m512i magnitude = _mm512_mask_mov_epi32(normal, _mm512_cmpeq_epi32_mask(exponent, top), special);
  magnitude = _mm512_mask_mov_epi32(magnitude, _mm512_testn_epi32_mask(exponent, exponent), tiny);
  return _mm512_castsi512_ps(_mm512_or_si512(magnitude, sign));
}

/* An f16 shadow (the caller's): polyak_f32_to_f16_sr's normal-range rule
 * in lanes; a group with a non-finite param or a result outside [2^-14,
 * 65536) (zero, subnormal, overflow, Inf, NaN) takes the scalar loop. */
AVX512_INLINE int64_t f16_stochastic_loop(uint16_t *shadow, const float *param, int64_t num_elems, float weight,
                                          int guard, uint64_t key, int64_t first_elem, int copy)
{
  const __m512 w = _mm512_set1_ps(weight);
  const __m512i step = set1(16u), random_bits = set1(0x1FFFu);
  const __m512i smallest = set1(0x38800000u), largest = set1(0x477FFFFFu), abs = set1(0x7FFFFFFFu);
  counter16 counter = counter_start(key, first_elem);
  int64_t nonfinite = 0, i = 0;
  for (; i + 16 <= num_elems; i += 16, counter.low = _mm512_add_epi32(counter.low, step)) {
    __m512 s = f16_lanes(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(shadow + i))));
    __m512 p = _mm512_loadu_ps(param + i);
    __m512i bits = _mm512_castps_si512(copy ? p : _mm512_fmadd_ps(w, _mm512_sub_ps(p, s), s));
    __m512i magnitude = _mm512_and_si512(bits, abs);
    __mmask16 rare = _mm512_fpclass_ps_mask(p, NONFINITE) | _mm512_cmplt_epi32_mask(magnitude, smallest) |
                     _mm512_cmpgt_epi32_mask(magnitude, largest);
    if (rare) {
      nonfinite += cpu_half_stochastic_loop(shadow, param, i, i + 16, weight, guard, key, first_elem, POLYAK_F16);
      continue;
    }
    __m512i random = sr_bits16(&counter, random_bits);
    __m512i sign = _mm512_and_si512(_mm512_srli_epi32(bits, 16), set1(0x8000u));
    __m512i rounded = _mm512_srli_epi32(_mm512_sub_epi32(_mm512_add_epi32(magnitude, random), set1(0x38000000u)), 13);
    _mm256_storeu_si256((__m256i *)(shadow + i), _mm512_cvtepi32_epi16(_mm512_or_si512(sign, rounded)));
  }
  return nonfinite + cpu_half_stochastic_loop(shadow, param, i, num_elems, weight, guard, key, first_elem, POLYAK_F16);
}

AVX512 static int64_t f16_stochastic(uint16_t *shadow, const float *param, int64_t num_elems, float weight, int guard,
                                     uint64_t key, int64_t first_elem)
{
  int copy = cpu_weight_is_one(weight);
  int64_t nonfinite = 0;
  for (int64_t i = 0, n; i < num_elems; i += n) {
    n = run_elems(first_elem + i, num_elems - i);
    nonfinite += copy ? f16_stochastic_loop(shadow + i, param + i, n, weight, guard, key, first_elem + i, 1)
                      : f16_stochastic_loop(shadow + i, param + i, n, weight, guard, key, first_elem + i, 0);
  }
  return nonfinite;
}

/* ---- the table ------------------------------------------------------------------- */

static const cpu_kernels avx512_kernels = {
    .isa = "avx512",
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

/* 1 where the OS saves the AVX-512 registers (XCR0: SSE, AVX, the opmask
 * and both halves of the upper ZMM state), without which the instructions
 * fault whatever cpuid says. */
static int os_saves_zmm(void)
{
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE))
    return 0;
  uint32_t xcr0_low, xcr0_high;
  __asm__("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  return (xcr0_low & 0xE6u) == 0xE6u;
}

const cpu_kernels *polyak_cpu_avx512_kernels(void)
{
  int usable = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && os_saves_zmm() &&
               polyak_cpu_avx2_kernels() != NULL;
  return usable ? &avx512_kernels : NULL;
}

#else

const cpu_kernels *polyak_cpu_avx512_kernels(void)
{
  return NULL;
}

#endif
