/*
 * update_chunk.h: the body of the fused update kernel, as a host+device
 * C++ function over one chunk of the plan and one thread's share of it.
 * update.cu calls it from every block and thread; tests/test_kernel_logic.cpp
 * calls it for every chunk and thread index on the CPU, so CI checks the
 * kernel's own indexing, heads, tails and vector path bit for bit against
 * the CPU backend without a GPU.
 *
 * A chunk of n elements is split so that both the param and the shadows
 * are 16-byte aligned in the middle:
 *   [0, head)              scalar: until the param pointer is 16-byte aligned
 *   [head, head + 8*nvec)  vectors of 8 elements: 16-byte loads and stores
 *   [head + 8*nvec, n)     scalar tail
 * Shadow slices start 16-byte aligned (plan.c) and chunks start at
 * multiples of 8 elements, so the shadows are aligned at `head` whenever
 * head * shadow element size is a multiple of 16; otherwise (a param
 * misaligned against its shadow) the whole chunk takes the scalar path.
 * Thread `thread` of `num_threads` takes elements thread, thread +
 * num_threads, ... of the head and tail and vectors thread, ... of the
 * middle: a warp's vector loads are contiguous.
 */
#ifndef POLYAK_UPDATE_CHUNK_H
#define POLYAK_UPDATE_CHUNK_H

#include "polyak_math.h"
#include "polyak_plan.h"

#define POLYAK_VEC_ELEMS 8

#if defined(__CUDACC__)
#define POLYAK_HD_MEMBER __host__ __device__ __forceinline__
#else
#define POLYAK_HD_MEMBER inline
#endif

/* The shadow loop stays a loop on the device: unrolled 8 times over 3 param
 * dtypes it bloats the kernel into spills, and the per-shadow values it
 * indexes live in shared memory. */
#if defined(__CUDA_ARCH__)
#define POLYAK_SHADOW_LOOP _Pragma("unroll 1")
#else
#define POLYAK_SHADOW_LOOP
#endif

/* ---- 16-byte memory access ------------------------------------------------ */

typedef struct {
  uint32_t v[4];
} polyak_u32x4;

/* Params are read once and never written by the kernel: the read-only path. */
POLYAK_HD polyak_u32x4 polyak_load16_readonly(const void *src)
{
  polyak_u32x4 out;
#if defined(__CUDA_ARCH__)
  uint4 raw = __ldg(reinterpret_cast<const uint4 *>(src));
  out.v[0] = raw.x, out.v[1] = raw.y, out.v[2] = raw.z, out.v[3] = raw.w;
#else
  memcpy(&out, src, 16);
#endif
  return out;
}

/* Shadows are read and written once per update: cache in L2 only. */
POLYAK_HD polyak_u32x4 polyak_load16(const void *src)
{
  polyak_u32x4 out;
#if defined(__CUDA_ARCH__)
  uint4 raw = __ldcg(reinterpret_cast<const uint4 *>(src));
  out.v[0] = raw.x, out.v[1] = raw.y, out.v[2] = raw.z, out.v[3] = raw.w;
#else
  memcpy(&out, src, 16);
#endif
  return out;
}

POLYAK_HD void polyak_store16(void *dst, polyak_u32x4 value)
{
#if defined(__CUDA_ARCH__)
  __stcg(reinterpret_cast<uint4 *>(dst), make_uint4(value.v[0], value.v[1], value.v[2], value.v[3]));
#else
  memcpy(dst, &value, 16);
#endif
}

/* ---- storage types ------------------------------------------------------ */

template <int DTYPE> struct polyak_storage;

template <> struct polyak_storage<POLYAK_F32> {
  typedef float elem;
  static POLYAK_HD_MEMBER float to_f32(float x)
  {
    return x;
  }
};

template <> struct polyak_storage<POLYAK_BF16> {
  typedef uint16_t elem;
  static POLYAK_HD_MEMBER float to_f32(uint16_t x)
  {
    return polyak_bf16_to_f32(x);
  }
};

template <> struct polyak_storage<POLYAK_F16> {
  typedef uint16_t elem;
  static POLYAK_HD_MEMBER float to_f32(uint16_t x)
  {
    return polyak_f16_to_f32(x);
  }
};

/* 16 bytes of params: through the read-only path, unless this kernel writes
 * params back (Lookahead), which that path does not allow. */
template <bool WRITE_BACK> POLYAK_HD polyak_u32x4 polyak_load16_param(const void *src)
{
  return WRITE_BACK ? polyak_load16(src) : polyak_load16_readonly(src);
}

/* 8 param elements from 16-byte aligned memory: two 16-byte loads of f32,
 * or one of a 16-bit type. */
template <int DTYPE, bool WRITE_BACK>
POLYAK_HD void polyak_load8(const typename polyak_storage<DTYPE>::elem *src, float out[8])
{
  if constexpr (DTYPE == POLYAK_F32) {
    polyak_u32x4 a = polyak_load16_param<WRITE_BACK>(src), b = polyak_load16_param<WRITE_BACK>(src + 4);
    for (int j = 0; j < 4; j++) {
      out[j] = polyak_f32_from_bits(a.v[j]);
      out[4 + j] = polyak_f32_from_bits(b.v[j]);
    }
  } else {
    polyak_u32x4 a = polyak_load16_param<WRITE_BACK>(src);
    for (int j = 0; j < 4; j++) {
      out[2 * j] = polyak_storage<DTYPE>::to_f32((uint16_t)(a.v[j] & 0xFFFFu));
      out[2 * j + 1] = polyak_storage<DTYPE>::to_f32((uint16_t)(a.v[j] >> 16));
    }
  }
}

/* 8 elements from 16-byte aligned memory, rounded to nearest even into
 * DTYPE (Lookahead's write-back of the slow weights into the params). */
template <int DTYPE> POLYAK_HD void polyak_store8(typename polyak_storage<DTYPE>::elem *dst, const float value[8])
{
  if constexpr (DTYPE == POLYAK_F32) {
    polyak_u32x4 a, b;
    for (int j = 0; j < 4; j++) {
      a.v[j] = polyak_f32_bits(value[j]);
      b.v[j] = polyak_f32_bits(value[4 + j]);
    }
    polyak_store16(dst, a);
    polyak_store16(dst + 4, b);
  } else {
    polyak_u32x4 a;
    for (int j = 0; j < 4; j++) {
      uint16_t even = DTYPE == POLYAK_BF16 ? polyak_f32_to_bf16_rne(value[2 * j]) : polyak_f32_to_f16_rne(value[2 * j]);
      uint16_t odd =
          DTYPE == POLYAK_BF16 ? polyak_f32_to_bf16_rne(value[2 * j + 1]) : polyak_f32_to_f16_rne(value[2 * j + 1]);
      a.v[j] = (uint32_t)even | ((uint32_t)odd << 16);
    }
    polyak_store16(dst, a);
  }
}

/* 8 shadow elements from 16-byte aligned memory, as f32. */
template <int SHADOW_DTYPE> POLYAK_HD void polyak_load8_shadow(const void *arena, int64_t slot, float out[8])
{
  if constexpr (SHADOW_DTYPE == POLYAK_F32) {
    const float *s = static_cast<const float *>(arena) + slot;
    polyak_u32x4 lo = polyak_load16(s), hi = polyak_load16(s + 4);
    for (int j = 0; j < 4; j++) {
      out[j] = polyak_f32_from_bits(lo.v[j]);
      out[4 + j] = polyak_f32_from_bits(hi.v[j]);
    }
  } else {
    polyak_u32x4 bits = polyak_load16(static_cast<const uint16_t *>(arena) + slot);
    for (int j = 0; j < 4; j++) {
      out[2 * j] = polyak_bf16_to_f32((uint16_t)(bits.v[j] & 0xFFFFu));
      out[2 * j + 1] = polyak_bf16_to_f32((uint16_t)(bits.v[j] >> 16));
    }
  }
}

/* ---- the chunk ---------------------------------------------------------------- */

/* Lookahead: param element i <- the slow weights' (the last shadow). */
template <int PARAM_DTYPE, int SHADOW_DTYPE>
POLYAK_HD void polyak_write_back_scalar(const polyak_tensor_desc &t, int64_t i, void *const *shadows,
                                        const polyak_update_args &a)
{
  int64_t slot = t.shadow_offset_elems + i;
  float slow = polyak_load_f32(shadows[a.num_shadows - 1], slot, SHADOW_DTYPE);
  polyak_store_f32(t.param, i, slow, PARAM_DTYPE);
}

/* One element at chunk-relative index i, every shadow; returns 1 if the
 * param is non-finite. */
template <int PARAM_DTYPE, int SHADOW_DTYPE, bool WRITE_BACK>
POLYAK_HD int polyak_update_scalar(const polyak_tensor_desc &t, int64_t i, void *const *shadows,
                                   const polyak_update_args &a)
{
  typedef typename polyak_storage<PARAM_DTYPE>::elem param_elem;
  float param = polyak_storage<PARAM_DTYPE>::to_f32(static_cast<const param_elem *>(t.param)[i]);
  int finite = polyak_is_finite(param);
  if (!finite && a.skip_nonfinite) {
    if (WRITE_BACK)
      polyak_write_back_scalar<PARAM_DTYPE, SHADOW_DTYPE>(t, i, shadows, a);
    return 1;
  }
  int64_t slot = t.shadow_offset_elems + i;
  POLYAK_SHADOW_LOOP
  for (int k = 0; k < a.num_shadows; k++) {
    if (SHADOW_DTYPE == POLYAK_F32) {
      float *s = static_cast<float *>(shadows[k]) + slot;
      *s = (a.stochastic_f32 >> k) & 1u
               ? polyak_next_f32_sr(*s, param, a.weight[k], a.sr_key[k], t.global_offset_elems + i)
               : polyak_lerp(*s, param, a.weight[k]);
    } else {
      uint16_t *s = static_cast<uint16_t *>(shadows[k]) + slot;
      *s = polyak_next_bf16(*s, param, a.weight[k], a.sr_key[k], t.global_offset_elems + i);
    }
  }
  if (WRITE_BACK)
    polyak_write_back_scalar<PARAM_DTYPE, SHADOW_DTYPE>(t, i, shadows, a);
  return !finite;
}

/* Eight elements from index i (param and shadows 16-byte aligned there).
 * SR_F32 false: no f32 shadow rounds stochastically (a.stochastic_f32 is
 * 0), and that path is left out. */
template <int PARAM_DTYPE, int SHADOW_DTYPE, bool WRITE_BACK, bool SR_F32>
POLYAK_HD int polyak_update_vector(const polyak_tensor_desc &t, int64_t i, void *const *shadows,
                                   const polyak_update_args &a)
{
  typedef typename polyak_storage<PARAM_DTYPE>::elem param_elem;
  float param[POLYAK_VEC_ELEMS];
  polyak_load8<PARAM_DTYPE, WRITE_BACK>(static_cast<const param_elem *>(t.param) + i, param);
  int keep[POLYAK_VEC_ELEMS]; /* 1: leave this element's shadows as they are */
  int nonfinite = 0;
  for (int j = 0; j < POLYAK_VEC_ELEMS; j++) {
    int finite = polyak_is_finite(param[j]);
    nonfinite += !finite;
    keep[j] = !finite && a.skip_nonfinite;
  }
  int64_t slot = t.shadow_offset_elems + i;
  POLYAK_SHADOW_LOOP
  for (int k = 0; k < a.num_shadows; k++) {
    if (SHADOW_DTYPE == POLYAK_F32) {
      float *s = static_cast<float *>(shadows[k]) + slot;
      polyak_u32x4 lo = polyak_load16(s), hi = polyak_load16(s + 4);
      if (SR_F32 && ((a.stochastic_f32 >> k) & 1u)) { /* uniform across the launch: no divergence */
        int64_t elem = t.global_offset_elems + i;
        for (int j = 0; j < 4; j++) {
          if (!keep[j])
            lo.v[j] = polyak_f32_bits(
                polyak_next_f32_sr(polyak_f32_from_bits(lo.v[j]), param[j], a.weight[k], a.sr_key[k], elem + j));
          if (!keep[4 + j])
            hi.v[j] = polyak_f32_bits(polyak_next_f32_sr(polyak_f32_from_bits(hi.v[j]), param[4 + j], a.weight[k],
                                                         a.sr_key[k], elem + 4 + j));
        }
      } else {
        for (int j = 0; j < 4; j++) {
          if (!keep[j])
            lo.v[j] = polyak_f32_bits(polyak_lerp(polyak_f32_from_bits(lo.v[j]), param[j], a.weight[k]));
          if (!keep[4 + j])
            hi.v[j] = polyak_f32_bits(polyak_lerp(polyak_f32_from_bits(hi.v[j]), param[4 + j], a.weight[k]));
        }
      }
      polyak_store16(s, lo);
      polyak_store16(s + 4, hi);
    } else {
      uint16_t *s = static_cast<uint16_t *>(shadows[k]) + slot;
      polyak_u32x4 bits = polyak_load16(s);
      int64_t elem = t.global_offset_elems + i;
      for (int j = 0; j < 4; j++) {
        uint16_t even = (uint16_t)(bits.v[j] & 0xFFFFu), odd = (uint16_t)(bits.v[j] >> 16);
        if (!keep[2 * j])
          even = polyak_next_bf16(even, param[2 * j], a.weight[k], a.sr_key[k], elem + 2 * j);
        if (!keep[2 * j + 1])
          odd = polyak_next_bf16(odd, param[2 * j + 1], a.weight[k], a.sr_key[k], elem + 2 * j + 1);
        bits.v[j] = (uint32_t)even | ((uint32_t)odd << 16);
      }
      polyak_store16(s, bits);
    }
  }
  if (WRITE_BACK) { /* Lookahead: the params <- the slow weights just stored */
    float slow[POLYAK_VEC_ELEMS];
    polyak_load8_shadow<SHADOW_DTYPE>(shadows[a.num_shadows - 1], slot, slow);
    polyak_store8<PARAM_DTYPE>(static_cast<param_elem *>(t.param) + i, slow);
  }
  return nonfinite;
}

/* Where the 16-byte aligned middle of a chunk starts (chunk-relative), or
 * chunk.num_elems if the param and its shadows never align together. */
template <int PARAM_DTYPE, int SHADOW_DTYPE>
POLYAK_HD int64_t polyak_chunk_head(const polyak_tensor_desc &t, const polyak_chunk &chunk)
{
  const int64_t param_bytes = sizeof(typename polyak_storage<PARAM_DTYPE>::elem);
  const int64_t shadow_bytes = SHADOW_DTYPE == POLYAK_F32 ? 4 : 2;
  uintptr_t start = (uintptr_t)t.param + (uintptr_t)(chunk.first_elem * param_bytes);
  int64_t head = (int64_t)((16 - start % 16) % 16) / param_bytes;
  if ((head * shadow_bytes) % 16 != 0 || head > chunk.num_elems)
    return chunk.num_elems;
  return head;
}

/* Thread `thread` of `num_threads`'s share of one chunk. Returns the
 * non-finite params it met. */
template <int PARAM_DTYPE, int SHADOW_DTYPE, bool WRITE_BACK, bool SR_F32>
POLYAK_HD int64_t polyak_update_chunk_thread(const polyak_tensor_desc &t, const polyak_chunk &chunk,
                                             void *const *shadows, const polyak_update_args &a, int thread,
                                             int num_threads)
{
  int64_t n = chunk.num_elems, base = chunk.first_elem;
  int64_t head = polyak_chunk_head<PARAM_DTYPE, SHADOW_DTYPE>(t, chunk);
  int64_t num_vectors = (n - head) / POLYAK_VEC_ELEMS;
  int64_t tail = head + num_vectors * POLYAK_VEC_ELEMS;
  int64_t nonfinite = 0;
  for (int64_t i = thread; i < head; i += num_threads)
    nonfinite += polyak_update_scalar<PARAM_DTYPE, SHADOW_DTYPE, WRITE_BACK>(t, base + i, shadows, a);
  for (int64_t v = thread; v < num_vectors; v += num_threads)
    nonfinite += polyak_update_vector<PARAM_DTYPE, SHADOW_DTYPE, WRITE_BACK, SR_F32>(
        t, base + head + v * POLYAK_VEC_ELEMS, shadows, a);
  for (int64_t i = tail + thread; i < n; i += num_threads)
    nonfinite += polyak_update_scalar<PARAM_DTYPE, SHADOW_DTYPE, WRITE_BACK>(t, base + i, shadows, a);
  return nonfinite;
}

/* The per-chunk dispatch on the param dtype (uniform across a chunk, so no
 * divergence within a block). */
template <int SHADOW_DTYPE, bool WRITE_BACK, bool SR_F32>
POLYAK_HD int64_t polyak_update_chunk_as(const polyak_tensor_desc &t, const polyak_chunk &chunk, void *const *shadows,
                                         const polyak_update_args &a, int thread, int num_threads)
{
  switch (t.param_dtype) {
  case POLYAK_F32:
    return polyak_update_chunk_thread<POLYAK_F32, SHADOW_DTYPE, WRITE_BACK, SR_F32>(t, chunk, shadows, a, thread,
                                                                                    num_threads);
  case POLYAK_BF16:
    return polyak_update_chunk_thread<POLYAK_BF16, SHADOW_DTYPE, WRITE_BACK, SR_F32>(t, chunk, shadows, a, thread,
                                                                                     num_threads);
  case POLYAK_F16:
    return polyak_update_chunk_thread<POLYAK_F16, SHADOW_DTYPE, WRITE_BACK, SR_F32>(t, chunk, shadows, a, thread,
                                                                                    num_threads);
  }
  return 0;
}

/* A chunk of a tensor whose shadow is the caller's (its only one: such
 * handles have one shadow and no Lookahead): element by element, coalesced
 * across a warp, in the dtypes the tensor has. */
POLYAK_HD int64_t polyak_update_owned_chunk(const polyak_tensor_desc &t, const polyak_chunk &chunk,
                                            const polyak_update_args &a, int thread, int num_threads)
{
  int64_t nonfinite = 0;
  for (int64_t i = chunk.first_elem + thread; i < chunk.first_elem + chunk.num_elems; i += num_threads) {
    float param = polyak_load_f32(t.param, i, t.param_dtype);
    int finite = polyak_is_finite(param);
    nonfinite += !finite;
    if ((finite || !a.skip_nonfinite) && a.num_shadows > 0)
      polyak_next_owned(t.owned, i, t.owned_dtype, t.owned_round_nearest, param, a.weight[0], a.sr_key[0],
                        t.global_offset_elems + i);
  }
  return nonfinite;
}

/* ... and on Lookahead's write-back (uniform across a launch). SR_F32
 * false leaves out stochastic rounding of f32 shadows' vectors: only for
 * updates whose a.stochastic_f32 is 0. */
template <int SHADOW_DTYPE, bool SR_F32 = true>
POLYAK_HD int64_t polyak_update_chunk(const polyak_tensor_desc &t, const polyak_chunk &chunk, void *const *shadows,
                                      const polyak_update_args &a, int thread, int num_threads)
{
  if (t.owned)
    return polyak_update_owned_chunk(t, chunk, a, thread, num_threads);
  return a.write_back ? polyak_update_chunk_as<SHADOW_DTYPE, true, SR_F32>(t, chunk, shadows, a, thread, num_threads)
                      : polyak_update_chunk_as<SHADOW_DTYPE, false, SR_F32>(t, chunk, shadows, a, thread, num_threads);
}

#endif /* POLYAK_UPDATE_CHUNK_H */
