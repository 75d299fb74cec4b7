#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "op_checks.h"
#include "cpu/path_ops.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {
namespace {

// y[t] = w_row . x[t] for the few tokens, fp32 accumulation; the row is read once.
template <typename T>
inline void row_dots(const T* w_row, const float* x, int64_t tokens, int64_t n, float* y) {
  for (int64_t t = 0; t < tokens; ++t) y[t] = cpu::dot(x + t * n, w_row, n);
}

}  // namespace

// The MLP of a decode step, fused: h = silu(w1 x) * (w3 x) with w13 = [w1; w3] read once and h kept in fp32,
// then out = w2 h. For a few tokens (decode), where the work is reading the weights.
at::Tensor mlp_decode_cpu(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2) {
  check_mlp_decode_args(x, w13, w2);
  const int64_t tokens = x.size(0), dim = x.size(1), hidden = w13.size(0) / 2;
  at::Tensor out = at::empty({tokens, dim}, x.options());
  if (tokens == 0) return out;

  MISTRAL_EXT_DISPATCH_FLOATS(x.scalar_type(), "mlp_decode_cpu", [&] {
    std::vector<float> xf(tokens * dim), h(tokens * hidden);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < tokens * dim; ++i) xf[i] = cpu::to_float(xp[i]);
    const scalar_t* w13p = w13.const_data_ptr<scalar_t>();
    const scalar_t* w2p = w2.const_data_ptr<scalar_t>();
    at::parallel_for(0, hidden, 64, [&](int64_t begin, int64_t end) {
      float gate[kMaxDecodeTokens], up[kMaxDecodeTokens];
      for (int64_t j = begin; j < end; ++j) {
        row_dots(w13p + j * dim, xf.data(), tokens, dim, gate);
        row_dots(w13p + (hidden + j) * dim, xf.data(), tokens, dim, up);
        for (int64_t t = 0; t < tokens; ++t)
          h[t * hidden + j] = gate[t] / (1.0f + cpu::exp_approx(-gate[t])) * up[t];
      }
    });
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, dim, 64, [&](int64_t begin, int64_t end) {
      float y[kMaxDecodeTokens];
      for (int64_t i = begin; i < end; ++i) {
        row_dots(w2p + i * hidden, h.data(), tokens, hidden, y);
        for (int64_t t = 0; t < tokens; ++t) op_[t * dim + i] = cpu::from_float<scalar_t>(y[t]);
      }
    });
  });
  return out;
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
