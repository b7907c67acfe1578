/*
 * polyak_math.h: the per-element math, shared by the CPU path (src/) and the
 * CUDA kernels (kernels/). Every function is static inline and host+device,
 * so both sides run the same expressions and produce the same bits:
 *   - conversions between fp32 and bf16/f16 storage (exact widening,
 *     round-to-nearest-even narrowing);
 *   - the shadow update, a lerp in fp32 with one fmaf;
 *   - the non-finite guard;
 *   - stochastic rounding to bf16, f16 and f32 from a counter-based hash of
 *     (seed, step, shadow, global element index).
 * Compile the host side with -ffp-contract=off and the device side with
 * --fmad=false: the only fused multiply-add is the explicit fmaf().
 */
#ifndef POLYAK_MATH_H
#define POLYAK_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define POLYAK_HD static inline __host__ __device__
#else
#define POLYAK_HD static inline
#endif

/* ---- bit casts ------------------------------------------------------------ */

POLYAK_HD uint32_t polyak_f32_bits(float x)
{
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return bits;
}

POLYAK_HD float polyak_f32_from_bits(uint32_t bits)
{
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

POLYAK_HD uint64_t polyak_f64_bits(double x)
{
  uint64_t bits;
  memcpy(&bits, &x, sizeof bits);
  return bits;
}

POLYAK_HD double polyak_f64_from_bits(uint64_t bits)
{
  double x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

/* Inf and NaN have an all-ones exponent; tested on bits so that no compiler
 * flag can fold it away. */
POLYAK_HD int polyak_is_finite(float x)
{
  return (polyak_f32_bits(x) & 0x7F800000u) != 0x7F800000u;
}

/* ---- bf16 ------------------------------------------------------------------ */

POLYAK_HD float polyak_bf16_to_f32(uint16_t h)
{
  return polyak_f32_from_bits((uint32_t)h << 16);
}

/* NaN keeps its sign and gets the quiet bit, so truncating its payload can
 * never turn it into Inf. */
POLYAK_HD uint16_t polyak_bf16_nan(uint32_t bits)
{
  return (uint16_t)((bits >> 16) | 0x0040u);
}

POLYAK_HD uint16_t polyak_f32_to_bf16_rne(float x)
{
  uint32_t bits = polyak_f32_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u)
    return polyak_bf16_nan(bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

/* Rounds up with probability (distance to the lower bf16 neighbour) / (the
 * gap between neighbours), so E[result] == x: updates far below half an ulp
 * still move the shadow on average. `random` supplies 16 uniform bits in its
 * low half. Inf and NaN pass through unrounded. */
POLYAK_HD uint16_t polyak_f32_to_bf16_sr(float x, uint32_t random)
{
  /* branch-free, so CPU loops vectorize: selects, not jumps */
  uint32_t bits = polyak_f32_bits(x);
  uint32_t rounded = (bits + (random & 0xFFFFu)) >> 16;
  uint32_t special = (bits >> 16) | ((bits & 0x007FFFFFu) ? 0x0040u : 0u); /* Inf; quiet NaN */
  return (uint16_t)((bits & 0x7F800000u) == 0x7F800000u ? special : rounded);
}

/* ---- f16 (IEEE binary16) ----------------------------------------------- */

POLYAK_HD float polyak_f16_to_f32(uint16_t h)
{
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) /* Inf, NaN */
    return polyak_f32_from_bits(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) /* normal: rebias 15 -> 127 */
    return polyak_f32_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0)
    return polyak_f32_from_bits(sign);
  /* subnormal: mantissa * 2^-24, normalized into an fp32 normal */
  exponent = 113u;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    exponent--;
  }
  return polyak_f32_from_bits(sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13));
}

POLYAK_HD uint16_t polyak_f32_to_f16_rne(float x)
{
  uint32_t bits = polyak_f32_bits(x);
  uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
  uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) /* NaN: quiet, keep the top payload bits */
    return (uint16_t)(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  if (magnitude >= 0x477FF000u) /* >= 65520 rounds to Inf */
    return (uint16_t)(sign | 0x7C00u);
  if (magnitude >= 0x38800000u) { /* >= 2^-14: normal half */
    uint32_t rounded = magnitude + 0xFFFu + ((magnitude >> 13) & 1u);
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
  }
  if (magnitude < 0x33000000u) /* < 2^-25: rounds to zero (a tie goes to even 0) */
    return sign;
  /* subnormal half: the value in units of 2^-24, rounded to nearest even */
  {
    uint32_t exponent = magnitude >> 23; /* 102..112 */
    uint32_t mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - exponent; /* 14..24 */
    uint32_t result = mantissa >> shift;
    uint32_t rest = mantissa & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (result & 1u)))
      result++;
    return (uint16_t)(sign | result);
  }
}

/* ---- elements of any dtype as f32 ------------------------------------------ */

/* Element i of `base`, a polyak_dtype array (0 F32, 1 BF16, 2 F16), exactly. */
POLYAK_HD float polyak_load_f32(const void *base, int64_t i, int dtype)
{
  if (dtype == 0)
    return ((const float *)base)[i];
  uint16_t h = ((const uint16_t *)base)[i];
  return dtype == 1 ? polyak_bf16_to_f32(h) : polyak_f16_to_f32(h);
}

/* Element i of `base` = value, rounded to nearest even for BF16 and F16. */
POLYAK_HD void polyak_store_f32(void *base, int64_t i, float value, int dtype)
{
  if (dtype == 0)
    ((float *)base)[i] = value;
  else
    ((uint16_t *)base)[i] = dtype == 1 ? polyak_f32_to_bf16_rne(value) : polyak_f32_to_f16_rne(value);
}

/* Rounds up in magnitude with probability (distance to the lower f16
 * neighbour) / (the gap between neighbours), so E[result] == x, as the bf16
 * version does: 13 of `random`'s bits for a normal half, up to 32 for a
 * subnormal one (magnitudes below 2^-33, 1/512 of the smallest subnormal,
 * go to zero). Past the largest half (65504) the next step is Inf. Inf and
 * NaN pass through as polyak_f32_to_f16_rne gives them. */
POLYAK_HD uint16_t polyak_f32_to_f16_sr(float x, uint32_t random)
{
  uint32_t bits = polyak_f32_bits(x);
  uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
  uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u)
    return polyak_f32_to_f16_rne(x);
  if (magnitude >= 0x47800000u) /* >= 65536 */
    return (uint16_t)(sign | 0x7C00u);
  if (magnitude >= 0x38800000u) /* >= 2^-14: a carry out of the mantissa bumps the exponent */
    return (uint16_t)(sign | ((magnitude + (random & 0x1FFFu) - 0x38000000u) >> 13));
  uint32_t exponent = magnitude >> 23, shift = 126u - exponent; /* units of 2^-24: shift >= 14 */
  if (exponent == 0 || shift > 32u)
    return sign;
  uint64_t mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
  uint64_t mask = ((uint64_t)1 << shift) - 1u;
  return (uint16_t)(sign | (uint16_t)((mantissa + ((uint64_t)random & mask)) >> shift));
}

/* ---- the shadow update --------------------------------------------------- */

/* a where pick is 1, else b: chosen by a bit mask, not a branch, so that
 * CPU loops vectorize. */
POLYAK_HD float polyak_pick_f32(int pick, float a, float b)
{
  uint32_t mask = 0u - (uint32_t)pick; /* all ones at 1 */
  return polyak_f32_from_bits((polyak_f32_bits(a) & mask) | (polyak_f32_bits(b) & ~mask));
}

/* param where weight == 1 (a copy, exact), else mixed. Tested on bits
 * (+1.0f has one encoding), not by a float compare. */
POLYAK_HD float polyak_copy_at_one(float weight, float param, float mixed)
{
  return polyak_pick_f32(polyak_f32_bits(weight) == 0x3F800000u, param, mixed);
}

/* shadow + weight * (param - shadow), with weight = 1 - B computed on the
 * host in double. The difference form keeps the rounding error of an EMA
 * step at half an ulp of the result, and weight == 1 (a copy) is exact. */
POLYAK_HD float polyak_lerp(float shadow, float param, float weight)
{
  return polyak_copy_at_one(weight, param, fmaf(weight, param - shadow, shadow));
}

/* x rounded to one of its two f32 neighbours, up in magnitude with
 * probability (distance to the lower one) / (the gap between them), so
 * E[result] == x: a double carries 29 bits below an f32's last place, and
 * `random`'s low 29 bits are added there before they are cut off (the bf16
 * rule, one format up; a carry steps into the next binade). Exact where x
 * is an f32. Magnitudes below 2^-126 (f32 subnormals) end rounded to
 * nearest; Inf and NaN pass through. Branch-free, as the bf16 version. */
POLYAK_HD float polyak_f64_to_f32_sr(double x, uint32_t random)
{
  const uint64_t low = 0x1FFFFFFFull; /* the 29 bits an f32 drops */
  uint64_t bits = polyak_f64_bits(x);
  uint64_t cut = (bits + (random & low)) & ~low;
  int special = (bits & 0x7FF0000000000000ull) == 0x7FF0000000000000ull; /* the cut could leave a NaN Inf */
  return (float)polyak_f64_from_bits(special ? bits : cut);
}

/* The shadow update of an f32 shadow that rounds stochastically: shadow +
 * weight * (param - shadow) in double (the difference of two floats is
 * exact there unless their exponents are 29 apart; the rest rounds 29 bits
 * below an f32 ulp), then polyak_f64_to_f32_sr. weight == 1 copies, as in
 * polyak_lerp. */
POLYAK_HD float polyak_lerp_sr(float shadow, float param, float weight, uint32_t random)
{
  double exact = (double)shadow + (double)weight * ((double)param - (double)shadow);
  return polyak_copy_at_one(weight, param, polyak_f64_to_f32_sr(exact, random));
}

/* A read-out value: shadow * scale (1, or the zero_init debias factor
 * 1 / (1 - prod beta)) in double, rounded once to fp32. */
POLYAK_HD float polyak_debias(float shadow, double scale)
{
  return (float)((double)shadow * scale);
}

/* One step of a blend: acc + coefficient * shadow, one rounding. */
POLYAK_HD float polyak_blend_step(float acc, float coefficient, float shadow)
{
  return fmaf(coefficient, shadow, acc);
}

/* ---- stochastic-rounding hash --------------------------------------------- */

/* splitmix64's finalizer: a bijection on 64 bits with full avalanche. */
POLYAK_HD uint64_t polyak_mix64(uint64_t x)
{
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

/* One key per (seed, step, shadow); computed once per update and shadow. */
POLYAK_HD uint64_t polyak_sr_key(uint64_t seed, int64_t step, int shadow)
{
  uint64_t key = polyak_mix64(seed + 0x9E3779B97F4A7C15ull);
  key = polyak_mix64(key ^ (uint64_t)step);
  return polyak_mix64(key ^ (uint64_t)(uint32_t)shadow);
}

/* A 32-bit bijection with low bias (the "lowbias32" constants of C. Wellons'
 * hash-prospector); 32-bit operations keep the per-element cost low on GPUs. */
POLYAK_HD uint32_t polyak_mix32(uint32_t x)
{
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

/* 32 random bits for global element `elem` under `key`. For a fixed key the
 * map from the low 32 bits of elem is a bijection, so neighbouring elements
 * never share a draw. */
POLYAK_HD uint32_t polyak_sr_bits(uint64_t key, int64_t elem)
{
  uint64_t e = (uint64_t)elem;
  uint32_t h = polyak_mix32((uint32_t)e ^ (uint32_t)key);
  return polyak_mix32(h ^ (uint32_t)(e >> 32) ^ (uint32_t)(key >> 32));
}

/* The next bits of a bf16 shadow element: the lerp in f32, rounded
 * stochastically with the bits of (key, global element index). */
POLYAK_HD uint16_t polyak_next_bf16(uint16_t shadow, float param, float weight, uint64_t key, int64_t elem)
{
  float mixed = polyak_lerp(polyak_bf16_to_f32(shadow), param, weight);
  return polyak_f32_to_bf16_sr(mixed, polyak_sr_bits(key, elem));
}

/* The next bits of an f32 shadow element that rounds stochastically. */
POLYAK_HD float polyak_next_f32_sr(float shadow, float param, float weight, uint64_t key, int64_t elem)
{
  return polyak_lerp_sr(shadow, param, weight, polyak_sr_bits(key, elem));
}

/* The next value of element i of a caller's shadow (F32, BF16 or F16),
 * rounded stochastically with the bits of (key, global element index), or
 * to nearest even if round_nearest: an F32 one as polyak_next_f32_sr or
 * polyak_lerp gives it; a 16-bit one from the lerp in f32, a BF16 one with
 * the bits polyak_next_bf16 gives. */
POLYAK_HD void polyak_next_owned(void *shadow, int64_t i, int dtype, int round_nearest, float param, float weight,
                                 uint64_t key, int64_t elem)
{
  float current = polyak_load_f32(shadow, i, dtype);
  if (round_nearest) {
    polyak_store_f32(shadow, i, polyak_lerp(current, param, weight), dtype);
    return;
  }
  uint32_t random = polyak_sr_bits(key, elem);
  if (dtype == 0) {
    ((float *)shadow)[i] = polyak_lerp_sr(current, param, weight, random);
    return;
  }
  float mixed = polyak_lerp(current, param, weight);
  ((uint16_t *)shadow)[i] = dtype == 1 ? polyak_f32_to_bf16_sr(mixed, random) : polyak_f32_to_f16_sr(mixed, random);
}

#endif /* POLYAK_MATH_H */
