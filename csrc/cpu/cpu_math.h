// Small helpers the CPU kernels share: element conversion and loops that GCC vectorises without fast-math
// (independent lane accumulators instead of one serial float sum).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace mistral_ext::cpu {

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);  // c10 rounds to nearest even for bf16/fp16
}

constexpr int kLanes = 16;

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * to_float(b[i + l]);
  for (; i < n; ++i) acc[0] += a[i] * to_float(b[i]);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
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

}  // namespace mistral_ext::cpu

// The activation dtypes every op accepts (checked before dispatch).
#define MISTRAL_EXT_DISPATCH_FLOATS(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
