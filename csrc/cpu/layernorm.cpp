#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <cmath>

#include "op_checks.h"
#include "cpu/work.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

// h = x + residual, rounded to the activation dtype (it is the residual stream the next layer adds to);
// out = h * rsqrt(mean(h^2) + eps) * weight, accumulated in fp32 and rounded once.
template <typename T>
void rms_norm_rows(const T* x, const T* residual, const T* weight, double eps, int64_t dim, T* out, T* h,
                   int64_t begin, int64_t end) {
  using cpu::to_float;
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * dim;
    T* hr = h + r * dim;
    if (residual) {
      const T* rr = residual + r * dim;
      for (int64_t i = 0; i < dim; ++i) hr[i] = cpu::from_float<T>(to_float(xr[i]) + to_float(rr[i]));
    } else {
      for (int64_t i = 0; i < dim; ++i) hr[i] = xr[i];
    }
    const float inv_rms = 1.0f / std::sqrt(cpu::sum_squares(hr, dim) / static_cast<float>(dim) +
                                           static_cast<float>(eps));
    T* orow = out + r * dim;
    for (int64_t i = 0; i < dim; ++i) orow[i] = cpu::from_float<T>(to_float(hr[i]) * inv_rms * to_float(weight[i]));
  }
}

template void rms_norm_rows<float>(const float*, const float*, const float*, double, int64_t, float*, float*,
                                   int64_t, int64_t);
template void rms_norm_rows<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16*, double,
                                           int64_t, c10::BFloat16*, c10::BFloat16*, int64_t, int64_t);
template void rms_norm_rows<c10::Half>(const c10::Half*, const c10::Half*, const c10::Half*, double, int64_t,
                                       c10::Half*, c10::Half*, int64_t, int64_t);

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, residual, weight, eps);
  const int64_t dim = x.size(-1);

  at::Tensor out = at::empty_like(x);
  at::Tensor h = at::empty_like(x);
  const int64_t rows = dim == 0 ? 0 : x.numel() / dim;
  if (rows == 0) return {out, h};

  MISTRAL_EXT_DISPATCH_FLOATS(x.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / dim);
    at::parallel_for(0, rows, grain,
                     [&](int64_t begin, int64_t end) { rms_norm_rows(xp, rp, wp, eps, dim, op_, hp, begin, end); });
  });
  return {out, h};
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
