// The negative control of the race tests: a block sum whose __syncthreads() between writing the per-warp partials
// and reading them is missing when kBroken. The correct variant must run clean; the broken one must be caught.
#pragma once

#include "cuda/kernel_prelude.h"

template <bool kBroken>
__global__ void block_sum_kernel(const float* x, float* out, int n) {
  __shared__ float partials[32];
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[blockIdx.x * n + i];
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (threadIdx.x % 32 == 0) partials[threadIdx.x / 32] = s;
  if (!kBroken) __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += partials[w];
    out[blockIdx.x] = total;
  }
}
