#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <vector>

#include "op_checks.h"
#include "cpu/work.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

// Rotary embedding, half-split convention (as HF Llama/Mistral): for i < D/2 the pair (x[i], x[i + D/2]) is
// rotated by angle pos * theta^(-2i/D). Angles are formed in double so large positions keep full fp32 accuracy.
std::vector<double> rope_inverse_frequencies(double theta, int64_t head_dim) {
  std::vector<double> inv_freq(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i) inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / head_dim);
  return inv_freq;
}

void rope_cos_sin(int64_t position, const std::vector<double>& inv_freq, float* c, float* s) {
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const double angle = static_cast<double>(position) * inv_freq[i];
    c[i] = static_cast<float>(std::cos(angle));
    s[i] = static_cast<float>(std::sin(angle));
  }
}

template <typename T>
void rope_rotate(const T* x, T* y, int64_t heads, int64_t head_dim, const float* c, const float* s) {
  using cpu::from_float;
  using cpu::to_float;
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h, x += head_dim, y += head_dim)
    for (int64_t i = 0; i < half; ++i) {
      const float a = to_float(x[i]), b = to_float(x[i + half]);
      y[i] = from_float<T>(a * c[i] - b * s[i]);
      y[i + half] = from_float<T>(b * c[i] + a * s[i]);
    }
}

template void rope_rotate<float>(const float*, float*, int64_t, int64_t, const float*, const float*);
template void rope_rotate<c10::BFloat16>(const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t, const float*,
                                         const float*);
template void rope_rotate<c10::Half>(const c10::Half*, c10::Half*, int64_t, int64_t, const float*, const float*);

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                            double theta) {
  const at::Tensor host_positions = check_rope_args(q, k, positions, theta);
  const int64_t* pos = host_positions.const_data_ptr<int64_t>();
  const int64_t tokens = q.size(0), head_dim = q.size(2);

  at::Tensor q_out = at::empty_like(q);
  at::Tensor k_out = at::empty_like(k);
  const int64_t half = head_dim / 2, hq = q.size(1), hk = k.size(1);
  const std::vector<double> inv_freq = rope_inverse_frequencies(theta, head_dim);

  MISTRAL_EXT_DISPATCH_FLOATS(q.scalar_type(), "rope_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.mutable_data_ptr<scalar_t>();
    scalar_t* ko = k_out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> cos_sin(2 * half);
      float* c = cos_sin.data();
      float* s = c + half;
      for (int64_t t = begin; t < end; ++t) {
        rope_cos_sin(pos[t], inv_freq, c, s);
        rope_rotate(qp + t * hq * head_dim, qo + t * hq * head_dim, hq, head_dim, c, s);
        rope_rotate(kp + t * hk * head_dim, ko + t * hk * head_dim, hk, head_dim, c, s);
      }
    });
  });
  return {q_out, k_out};
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
