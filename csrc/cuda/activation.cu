// silu_mul: out[r, i] = silu(x[r, i]) * x[r, hidden + i], fp32 math, rounded once (as the CPU kernel).
#include "cuda/device_math.h"

namespace mistral_ext::MX_KERNEL_NS {
namespace {

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

template <typename T, bool kVector>
__global__ void __launch_bounds__(256) silu_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows,
                                                       int64_t hidden) {
  constexpr int V = kVector ? Vec<T>::kSize : 1;
  const int64_t per_row = hidden / V;
  const int64_t items = rows * per_row;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = item / per_row, i = (item % per_row) * V;
    const T* gate = x + r * 2 * hidden + i;
    T* o = out + r * hidden + i;
    if constexpr (kVector) {
      const Vec<T> g = load_vec(gate), u = load_vec(gate + hidden);
      Vec<T> y;
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = from_float<T>(silu_times(to_float(g.v[j]), to_float(u.v[j])));
      store_vec(o, y);
    } else {
      *o = from_float<T>(silu_times(to_float(*gate), to_float(gate[hidden])));
    }
  }
}

template <typename T>
cudaError_t launch(const T* x, T* out, int64_t rows, int64_t hidden, cudaStream_t stream) {
  const bool vector = hidden % Vec<T>::kSize == 0 && aligned16(x) && aligned16(out);
  const int64_t items = rows * (vector ? hidden / Vec<T>::kSize : hidden);
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, 65536)));
  if (vector)
    MX_LAUNCH(grid, dim3(kThreads), 0, stream, silu_mul_kernel<T, true>)(x, out, rows, hidden);
  else
    MX_LAUNCH(grid, dim3(kThreads), 0, stream, silu_mul_kernel<T, false>)(x, out, rows, hidden);
  return MX_LAST_ERROR();
}

}  // namespace

cudaError_t silu_mul(DType dtype, const void* x, void* out, int64_t rows, int64_t hidden, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(static_cast<const T*>(x), static_cast<T*>(out), rows, hidden, stream);
  });
}

}  // namespace mistral_ext::MX_KERNEL_NS
