// rms_norm with the residual add fused: one block per row. Same rounding as the CPU kernel: h is rounded to the
// activation dtype, its squares summed in fp32, out = h * inv_rms * weight rounded once.
#include "cuda/device_math.h"

namespace mistral_ext::MX_KERNEL_NS {
namespace {

template <typename T, bool kVector>
__global__ void __launch_bounds__(256) rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                                       const T* __restrict__ weight, T* __restrict__ out,
                                                       T* __restrict__ h, int64_t dim, float eps) {
  MX_DYNAMIC_SMEM(smem);  // 32 floats for the block sum
  float* scratch = reinterpret_cast<float*>(smem);
  const int64_t row = blockIdx.x;
  const T* xr = x + row * dim;
  const T* rr = residual ? residual + row * dim : nullptr;
  T* hr = h + row * dim;
  T* outr = out + row * dim;
  constexpr int V = kVector ? Vec<T>::kSize : 1;
  float sum_sq = 0.0f;
  // Each thread later re-reads exactly the h elements it wrote, so no barrier is needed between the passes.
  for (int64_t i = threadIdx.x * V; i < dim; i += blockDim.x * V) {
    if constexpr (kVector) {
      Vec<T> a = load_vec(xr + i);
      if (rr) {
        const Vec<T> b = load_vec(rr + i);
#pragma unroll
        for (int j = 0; j < V; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(b.v[j]));
      }
      store_vec(hr + i, a);
#pragma unroll
      for (int j = 0; j < V; ++j) sum_sq += to_float(a.v[j]) * to_float(a.v[j]);
    } else {
      const T a = rr ? from_float<T>(to_float(xr[i]) + to_float(rr[i])) : xr[i];
      hr[i] = a;
      sum_sq += to_float(a) * to_float(a);
    }
  }
  sum_sq = block_sum(sum_sq, scratch);
  const float inv_rms = 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x * V; i < dim; i += blockDim.x * V) {
    if constexpr (kVector) {
      const Vec<T> a = load_vec(hr + i), w = load_vec(weight + i);
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(to_float(a.v[j]) * inv_rms * to_float(w.v[j]));
      store_vec(outr + i, o);
    } else {
      outr[i] = from_float<T>(to_float(hr[i]) * inv_rms * to_float(weight[i]));
    }
  }
}

template <typename T>
cudaError_t launch(const T* x, const T* residual, const T* weight, T* out, T* h, int64_t rows, int64_t dim, float eps,
                   cudaStream_t stream) {
  const bool vector = dim % Vec<T>::kSize == 0 && aligned16(x) && aligned16(weight) && aligned16(out) &&
                      aligned16(h) && (!residual || aligned16(residual));
  const int64_t per_thread = vector ? Vec<T>::kSize : 1;
  constexpr size_t kSmem = 32 * sizeof(float);
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (dim / per_thread + 31) / 32 * 32)));
  if (vector)
    MX_LAUNCH(dim3(rows), dim3(threads), kSmem, stream, rms_norm_kernel<T, true>)(x, residual, weight, out, h, dim, eps);
  else
    MX_LAUNCH(dim3(rows), dim3(threads), kSmem, stream, rms_norm_kernel<T, false>)(x, residual, weight, out, h, dim, eps);
  return MX_LAST_ERROR();
}

}  // namespace

cudaError_t rms_norm(DType dtype, const void* x, const void* residual, const void* weight, void* out, void* h,
                     int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
                  static_cast<T*>(out), static_cast<T*>(h), rows, dim, eps, stream);
  });
}

}  // namespace mistral_ext::MX_KERNEL_NS
