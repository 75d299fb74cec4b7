// rope, cache_write and rope_cache_write as one kernel: one block per token rotates its query and key heads
// (half-split pairs (x[i], x[i + D/2]), angles in double as on the CPU) and writes the key and value rows into
// its ring slot. Each thread keeps the same pair index across heads when blockDim is a multiple of D/2, so it
// computes its cos/sin once per token.
#include "cuda/device_math.h"

namespace mistral_ext::MX_KERNEL_NS {
namespace {

template <typename T, int V>  // V: consecutive pairs per item (16-byte loads when V = Vec<T>::kSize)
__global__ void __launch_bounds__(128) rope_cache_kernel(RopeCacheArgs a) {
  const int64_t t = blockIdx.x, d = a.head_dim, half = d / 2, hq = a.q_heads, hkv = a.kv_heads;
  const int64_t row = a.cache_rows && a.cache_rows[t] < a.ring_rows ? a.cache_rows[t] : -1;
  const bool rotate = a.theta > 0;
  const double pos = rotate ? static_cast<double>(a.positions[t]) : 0.0;
  const int64_t groups = half / V;
  const int64_t heads = (a.q_out ? hq : 0) + hkv;
  const int64_t first_head = a.q_out ? 0 : hq;  // heads are numbered q first, then k
  int64_t cached = -1;
  float c[V] = {}, s[V] = {};
  for (int64_t item = threadIdx.x; item < heads * groups; item += blockDim.x) {
    const int64_t head = first_head + item / groups, i0 = (item % groups) * V;
    if (rotate && i0 != cached) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        double sn, cs;
        sincos(pos * pow(a.theta, -2.0 * static_cast<double>(i0 + j) / static_cast<double>(d)), &sn, &cs);
        c[j] = static_cast<float>(cs);
        s[j] = static_cast<float>(sn);
      }
      cached = i0;
    }
    const T* src = head < hq ? static_cast<const T*>(a.q) + (t * hq + head) * d
                             : static_cast<const T*>(a.k) + (t * hkv + head - hq) * d;
    Vec<T> lo, hi;
    if constexpr (V == Vec<T>::kSize) {
      lo = load_vec(src + i0);
      hi = load_vec(src + i0 + half);
    } else {
      lo.v[0] = src[i0];
      hi.v[0] = src[i0 + half];
    }
    if (rotate) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float x0 = to_float(lo.v[j]), x1 = to_float(hi.v[j]);
        lo.v[j] = from_float<T>(x0 * c[j] - x1 * s[j]);
        hi.v[j] = from_float<T>(x1 * c[j] + x0 * s[j]);
      }
    }
    T* dst[2] = {nullptr, nullptr};
    if (head < hq) {
      dst[0] = static_cast<T*>(a.q_out) + (t * hq + head) * d;
    } else {
      if (a.k_out) dst[0] = static_cast<T*>(a.k_out) + (t * hkv + head - hq) * d;
      if (row >= 0) dst[1] = static_cast<T*>(a.k_cache) + (row * hkv + head - hq) * d;
    }
    for (T* p : dst) {
      if (!p) continue;
      if constexpr (V == Vec<T>::kSize) {
        store_vec(p + i0, lo);
        store_vec(p + i0 + half, hi);
      } else {
        p[i0] = lo.v[0];
        p[i0 + half] = hi.v[0];
      }
    }
  }
  if (row < 0) return;
  const int64_t n = hkv * d;
  const T* v = static_cast<const T*>(a.v) + t * n;
  T* vc = static_cast<T*>(a.v_cache) + row * n;
  if constexpr (V == Vec<T>::kSize) {  // rows of whole 16-byte vectors (checked by the launcher)
    for (int64_t i = threadIdx.x * V; i < n; i += blockDim.x * V) store_vec(vc + i, load_vec(v + i));
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) vc[i] = v[i];
  }
}

template <typename T>
cudaError_t launch(const RopeCacheArgs& a, cudaStream_t stream) {
  constexpr int kV = Vec<T>::kSize;
  const bool vector = (a.head_dim / 2) % kV == 0 && aligned16(a.q) && aligned16(a.k) && aligned16(a.v) &&
                      aligned16(a.q_out) && aligned16(a.k_out) && aligned16(a.k_cache) && aligned16(a.v_cache);
  if (vector)
    MX_LAUNCH(dim3(a.tokens), dim3(128), 0, stream, rope_cache_kernel<T, kV>)(a);
  else
    MX_LAUNCH(dim3(a.tokens), dim3(128), 0, stream, rope_cache_kernel<T, 1>)(a);
  return MX_LAST_ERROR();
}

}  // namespace

cudaError_t rope_cache_write(DType dtype, const RopeCacheArgs& args, cudaStream_t stream) {
  if (args.tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) { return launch<decltype(tag)>(args, stream); });
}

}  // namespace mistral_ext::MX_KERNEL_NS
