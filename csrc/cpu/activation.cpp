#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "op_checks.h"
#include "cpu/work.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

// x = [gate | up] along the last dimension (w1 and w3 fused into w13): out = silu(gate) * up, in fp32, rounded once.
template <typename T>
void silu_mul_span(const T* gate_up, int64_t hidden, T* out, int64_t begin, int64_t end) {
  const T* up = gate_up + hidden;
  for (int64_t i = begin; i < end; ++i) {
    const float g = cpu::to_float(gate_up[i]);
    out[i] = cpu::from_float<T>(g / (1.0f + cpu::exp_approx(-g)) * cpu::to_float(up[i]));
  }
}

template void silu_mul_span<float>(const float*, int64_t, float*, int64_t, int64_t);
template void silu_mul_span<c10::BFloat16>(const c10::BFloat16*, int64_t, c10::BFloat16*, int64_t, int64_t);
template void silu_mul_span<c10::Half>(const c10::Half*, int64_t, c10::Half*, int64_t, int64_t);

at::Tensor silu_mul_cpu(const at::Tensor& x) {
  check_silu_mul_args(x);
  const int64_t hidden = x.size(-1) / 2;
  auto out_shape = x.sizes().vec();
  out_shape.back() = hidden;
  at::Tensor out = at::empty(out_shape, x.options());
  const int64_t rows = hidden == 0 ? 0 : x.numel() / (2 * hidden);
  if (rows == 0) return out;

  MISTRAL_EXT_DISPATCH_FLOATS(x.scalar_type(), "silu_mul_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / hidden);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_span(xp + r * 2 * hidden, hidden, op_ + r * hidden, 0, hidden);
    });
  });
  return out;
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
