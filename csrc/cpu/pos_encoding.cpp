#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <vector>

#include "op_checks.h"
#include "cpu/path_ops.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

// Rotary embedding, half-split convention (as HF Llama/Mistral): for i < D/2 the pair (x[i], x[i + D/2]) is
// rotated by angle pos * theta^(-2i/D). Angles are formed in double so large positions keep full fp32 accuracy.
std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                            double theta) {
  const at::Tensor host_positions = check_rope_args(q, k, positions, theta);
  const int64_t* pos = host_positions.const_data_ptr<int64_t>();
  const int64_t tokens = q.size(0), head_dim = q.size(2);

  at::Tensor q_out = at::empty_like(q);
  at::Tensor k_out = at::empty_like(k);
  const int64_t half = head_dim / 2, hq = q.size(1), hk = k.size(1);
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / head_dim);

  MISTRAL_EXT_DISPATCH_FLOATS(q.scalar_type(), "rope_cpu", [&] {
    using cpu::from_float;
    using cpu::to_float;
    auto rotate = [&](const scalar_t* x, scalar_t* y, int64_t heads, const float* c, const float* s) {
      for (int64_t h = 0; h < heads; ++h, x += head_dim, y += head_dim)
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(x[i]), b = to_float(x[i + half]);
          y[i] = from_float<scalar_t>(a * c[i] - b * s[i]);
          y[i + half] = from_float<scalar_t>(b * c[i] + a * s[i]);
        }
    };
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.mutable_data_ptr<scalar_t>();
    scalar_t* ko = k_out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> cos_sin(2 * half);
      float* c = cos_sin.data();
      float* s = c + half;
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < half; ++i) {
          const double angle = static_cast<double>(pos[t]) * inv_freq[i];
          c[i] = static_cast<float>(std::cos(angle));
          s[i] = static_cast<float>(std::sin(angle));
        }
        rotate(qp + t * hq * head_dim, qo + t * hq * head_dim, hq, c, s);
        rotate(kp + t * hk * head_dim, ko + t * hk * head_dim, hk, c, s);
      }
    });
  });
  return {q_out, k_out};
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
