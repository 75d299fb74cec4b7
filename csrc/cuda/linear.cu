// Dense linear layers y = x @ W.T with W [N, K] in its own dtype (fp32, bf16 or fp16) and fp32 accumulation, for
// the few tokens of a decode step (cuBLAS serves large prefill GEMMs). One warp per row, 8 rows per block, a tile
// of up to 8 tokens per blockIdx.y: the warp reads its row once per tile with 16-byte loads and keeps one
// accumulator per token. Lane l sums k = l V + 32 V j + e (V values per load, e < V) in order and the lanes add by
// a fixed butterfly, so a token's row does not depend on T or on the tile the token falls in; a row that cannot be
// read in 16-byte loads (misaligned, or K not a multiple of V) is read element by element in the same order.
#include "cuda/device_math.h"

namespace mistral_ext::MX_KERNEL_NS {
namespace {

constexpr int kWarps = 8;
constexpr int kTileTokens = 8;

template <typename W, typename X, bool kVector>
__global__ void __launch_bounds__(kWarps * 32) dense_linear_kernel(const X* __restrict__ x, const W* __restrict__ w,
                                                                   X* __restrict__ y, int64_t tokens, int64_t n,
                                                                   int64_t k) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= n) return;  // whole warps leave together
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTileTokens;
  const int nt = static_cast<int>(tokens - t0 < kTileTokens ? tokens - t0 : kTileTokens);
  const int lane = threadIdx.x % 32;
  const W* wr = w + row * k;
  const X* xt0 = x + t0 * k;
  float acc[kTileTokens] = {};
  constexpr int V = Vec<W>::kSize;
  for (int64_t i = lane * V; i < k; i += 32 * V) {
    float wv[V];
    if constexpr (kVector) {
      const Vec<W> loaded = load_vec(wr + i);
#pragma unroll
      for (int j = 0; j < V; ++j) wv[j] = to_float(loaded.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) wv[j] = i + j < k ? to_float(wr[i + j]) : 0.0f;
    }
#pragma unroll
    for (int t = 0; t < kTileTokens; ++t) {
      if (t >= nt) break;
      const X* xt = xt0 + t * k + i;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (kVector || i + j < k) acc[t] += wv[j] * to_float(xt[j]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTileTokens; ++t) {
    if (t >= nt) break;
    const float s = warp_sum(acc[t]);
    if (lane == 0) y[(t0 + t) * n + row] = from_float<X>(s);
  }
}

template <typename W, typename X>
cudaError_t launch(const X* x, const W* w, X* y, int64_t tokens, int64_t n, int64_t k, cudaStream_t stream) {
  const int64_t tiles = (tokens + kTileTokens - 1) / kTileTokens;
  if (tiles > 65535) return cudaErrorInvalidValue;
  const dim3 block(kWarps * 32);
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps), static_cast<unsigned>(tiles));
  // Only the weight rows are read as 16-byte vectors (x is small and read element by element from L1/L2).
  if (k % Vec<W>::kSize == 0 && aligned16(w))
    MX_LAUNCH(grid, block, 0, stream, dense_linear_kernel<W, X, true>)(x, w, y, tokens, n, k);
  else
    MX_LAUNCH(grid, block, 0, stream, dense_linear_kernel<W, X, false>)(x, w, y, tokens, n, k);
  return MX_LAST_ERROR();
}

}  // namespace

cudaError_t dense_linear(DType x_dtype, DType w_dtype, const void* x, const void* w, void* y, int64_t tokens,
                         int64_t n, int64_t k, cudaStream_t stream) {
  if (tokens == 0 || n == 0) return cudaSuccess;
  return dispatch_dtype(x_dtype, [&](auto x_tag) {
    using X = decltype(x_tag);
    return dispatch_dtype(w_dtype, [&](auto w_tag) {
      using W = decltype(w_tag);
      return launch(static_cast<const X*>(x), static_cast<const W*>(w), static_cast<X*>(y), tokens, n, k, stream);
    });
  });
}

}  // namespace mistral_ext::MX_KERNEL_NS
