// The decode MLP for up to 8 tokens, as two GEMV-style launches that read each weight once for all tokens:
//   1. one warp per hidden unit j reads rows j (w1) and H + j (w3) of w13 and writes h[t, j] = silu(g) * u in fp32;
//   2. one warp per output row i reads row i of w2 and writes out[t, i] = w2[i] . h[t].
// x and h are small and stay in L1/L2; the weights stream through once with 16-byte loads.
#include "cuda/device_math.h"

namespace mistral_ext::MX_KERNEL_NS {
namespace {

constexpr int kWarps = 8;
constexpr int kMaxT = kMlpDecodeMaxTokens;

// acc[t] += w[0, n) . x[t][0, n) for the warp's lanes (strided); rows of w are 16-byte aligned when kVector.
template <typename T, typename X, bool kVector>
__device__ __forceinline__ void warp_dots(const T* __restrict__ w, const X* __restrict__ x, int64_t x_stride,
                                          int tokens, int64_t n, float (&acc)[kMaxT]) {
  const int lane = threadIdx.x % 32;
  if constexpr (kVector) {
    constexpr int V = Vec<T>::kSize;
    for (int64_t i = lane * V; i < n; i += 32 * V) {
      const Vec<T> wv = load_vec(w + i);
#pragma unroll
      for (int t = 0; t < kMaxT; ++t) {
        if (t >= tokens) break;
        const X* xt = x + t * x_stride + i;
#pragma unroll
        for (int j = 0; j < V; ++j) acc[t] += to_float(wv.v[j]) * to_float(xt[j]);
      }
    }
  } else {
    for (int64_t i = lane; i < n; i += 32) {
      const float wi = to_float(w[i]);
#pragma unroll
      for (int t = 0; t < kMaxT; ++t) {
        if (t >= tokens) break;
        acc[t] += wi * to_float(x[t * x_stride + i]);
      }
    }
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kWarps * 32) mlp_up_kernel(const T* __restrict__ x, const T* __restrict__ w13,
                                                             float* __restrict__ h, int tokens, int64_t dim,
                                                             int64_t hidden) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (j >= hidden) return;  // whole warps leave together
  float gate[kMaxT] = {}, up[kMaxT] = {};
  warp_dots<T, T, kVector>(w13 + j * dim, x, dim, tokens, dim, gate);
  warp_dots<T, T, kVector>(w13 + (hidden + j) * dim, x, dim, tokens, dim, up);
#pragma unroll
  for (int t = 0; t < kMaxT; ++t) {
    if (t >= tokens) break;
    const float g = warp_sum(gate[t]), u = warp_sum(up[t]);
    if (threadIdx.x % 32 == 0) h[t * hidden + j] = g / (1.0f + __expf(-g)) * u;
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kWarps * 32) mlp_down_kernel(const float* __restrict__ h, const T* __restrict__ w2,
                                                               T* __restrict__ out, int tokens, int64_t dim,
                                                               int64_t hidden) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= dim) return;
  float acc[kMaxT] = {};
  warp_dots<T, float, kVector>(w2 + i * hidden, h, hidden, tokens, hidden, acc);
#pragma unroll
  for (int t = 0; t < kMaxT; ++t) {
    if (t >= tokens) break;
    const float y = warp_sum(acc[t]);
    if (threadIdx.x % 32 == 0) out[t * dim + i] = from_float<T>(y);
  }
}

template <typename T>
cudaError_t launch(const T* x, const T* w13, const T* w2, T* out, float* h, int tokens, int64_t dim, int64_t hidden,
                   cudaStream_t stream) {
  constexpr int V = Vec<T>::kSize;
  // Only the weight rows are read as 16-byte vectors (x and h are read element by element).
  const bool up_vector = dim % V == 0 && aligned16(w13);
  const bool down_vector = hidden % V == 0 && aligned16(w2);
  const dim3 block(kWarps * 32);
  const dim3 up_grid(static_cast<unsigned>((hidden + kWarps - 1) / kWarps));
  const dim3 down_grid(static_cast<unsigned>((dim + kWarps - 1) / kWarps));
  if (up_vector)
    MX_LAUNCH(up_grid, block, 0, stream, mlp_up_kernel<T, true>)(x, w13, h, tokens, dim, hidden);
  else
    MX_LAUNCH(up_grid, block, 0, stream, mlp_up_kernel<T, false>)(x, w13, h, tokens, dim, hidden);
  if (down_vector)
    MX_LAUNCH(down_grid, block, 0, stream, mlp_down_kernel<T, true>)(h, w2, out, tokens, dim, hidden);
  else
    MX_LAUNCH(down_grid, block, 0, stream, mlp_down_kernel<T, false>)(h, w2, out, tokens, dim, hidden);
  return MX_LAST_ERROR();
}

}  // namespace

cudaError_t mlp_decode(DType dtype, const void* x, const void* w13, const void* w2, void* out, float* workspace,
                       int64_t tokens, int64_t dim, int64_t hidden, cudaStream_t stream) {
  if (tokens == 0 || dim == 0) return cudaSuccess;
  if (tokens > kMlpDecodeMaxTokens) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(static_cast<const T*>(x), static_cast<const T*>(w13), static_cast<const T*>(w2),
                  static_cast<T*>(out), workspace, static_cast<int>(tokens), dim, hidden, stream);
  });
}

}  // namespace mistral_ext::MX_KERNEL_NS
