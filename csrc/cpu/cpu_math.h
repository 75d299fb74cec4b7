// Small helpers the CPU kernels share: element conversion and loops that GCC vectorises without fast-math
// (independent lane accumulators instead of one serial float sum). Include it last: it opens the CPU code path
// (cpu_path.h), and everything after it is compiled for that path's instruction set.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/cpu_path.h"

namespace mistral_ext::MISTRAL_EXT_CPU_PATH::cpu {

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);  // c10 rounds to nearest even for fp16
}

// c10's rounding to bf16 (nearest even, NaN -> 0x7FC0) written without branches, so loops around it vectorise.
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = x != x ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
}

constexpr int kLanes = 16;

// One register of floats, as wide as the build's target has (16 with AVX-512, else 8: one AVX register or two
// SSE ones): GCC/Clang vector extensions, any alignment.
#ifdef MISTRAL_EXT_CPU_PATH_AVX512  // (g++ does not update __AVX512F__ and the like for the target pragma)
constexpr int kVec = 16;
#else
constexpr int kVec = 8;
#endif
typedef float f32xv __attribute__((vector_size(4 * kVec), aligned(4)));

inline f32xv loadv(const float* p) { return *reinterpret_cast<const f32xv*>(p); }
inline void storev(float* p, f32xv v) { *reinterpret_cast<f32xv*>(p) = v; }

// Lane l adds lane l + kVec/2, then l + kVec/4, ... down to one: the same order on every path, in shuffles where
// the path has them.
inline float reduce_lanes(f32xv v) {
#if defined(MISTRAL_EXT_CPU_PATH_AVX512) || defined(MISTRAL_EXT_CPU_PATH_AVX2)
#if defined(MISTRAL_EXT_CPU_PATH_AVX512)
  typedef float f32x8 __attribute__((vector_size(32)));
  const f32x8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const f32x8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m256 h = reinterpret_cast<__m256>(lo + hi);
#else
  const __m256 h = reinterpret_cast<__m256>(v);
#endif
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#else
  float a[kVec];
  storev(a, v);
  for (int w = kVec / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  return a[0];
#endif
}

// sum a[i] * b[i] in kLanes lane sums (lane l takes i = l mod kLanes, the tail goes to lane 0), halved in order:
// kLanes / kVec registers, so the sums stay in registers and the halving is reduce_lanes' shuffles.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  constexpr int kParts = kLanes / kVec;
  f32xv acc[kParts] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int p = 0; p < kParts; ++p) {
      f32xv bv;
      if constexpr (std::is_same_v<T, float>) {
        bv = loadv(b + i + p * kVec);
      } else {
        float wide[kVec];
        for (int l = 0; l < kVec; ++l) wide[l] = to_float(b[i + p * kVec + l]);
        bv = loadv(wide);
      }
      acc[p] += loadv(a + i + p * kVec) * bv;
    }
  float lane0 = acc[0][0];
  for (; i < n; ++i) lane0 += a[i] * to_float(b[i]);
  acc[0][0] = lane0;
  if constexpr (kParts == 2) return reduce_lanes(acc[0] + acc[1]);
  return reduce_lanes(acc[0]);
}

// e^x from Cephes' expf polynomial, within 2 ulp on [-87.3, 88] (a little more up to the overflow at 88.72):
// unlike std::exp it vectorises, which matters in softmax and silu.
inline float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float xc = std::min(std::max(x, -87.3f), 88.72f);
  const float t = xc * kLog2e;
  const int32_t n = std::min(static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f)), 127);
  const float fn = static_cast<float>(n);
  const float r = xc - fn * kLn2Hi - fn * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float y = p * scale;
  return x > 88.72f ? std::numeric_limits<float>::infinity() : (x < -87.3f ? 0.0f : y);
}

// y += a * x
template <typename T>
inline void axpy(float* y, float a, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
}

template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      float f = to_float(x[i + l]);
      acc[l] += f * f;
    }
  for (; i < n; ++i) acc[0] += to_float(x[i]) * to_float(x[i]);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH::cpu

// The activation dtypes every op accepts (checked before dispatch).
#define MISTRAL_EXT_DISPATCH_FLOATS(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
