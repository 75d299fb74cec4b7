#include "cuda/launchers.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <vector>

#include "op_checks.h"

#ifdef MISTRAL_EXT_EMULATE
namespace {
cudaStream_t stream_of(const at::Tensor&) { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
at::Tensor to_device(const at::Tensor& host, const at::Tensor&) { return host; }
void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "mistral_ext.", op, ": emulated launch failed (", static_cast<int>(status), ")");
}
}  // namespace
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
namespace {
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
at::Tensor to_device(const at::Tensor& host, const at::Tensor& like) { return host.to(like.device(), true); }
void check_launch(cudaError_t status, const char*) { C10_CUDA_CHECK(status); }
}  // namespace
#endif

namespace mistral_ext::MX_KERNEL_NS {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK_TYPE(false, "mistral_ext: no CUDA kernel for dtype ", t.scalar_type());
  }
}

static_assert(kMlpDecodeMaxTokens == kMaxDecodeTokens);

// Positions and ring rows ([2, T], on the device) of the packed tokens of one call: token t of sequence b sits at
// position start_pos[b] + t and goes to ring row b * S + position % S, except the tokens of a chunk longer than
// the ring that later tokens of the same chunk overwrite (row -1: not written), so no two threads race on a slot.
at::Tensor token_rows(const BatchLayout& layout, int64_t tokens, int64_t slots, const at::Tensor& like) {
  at::Tensor host = at::empty({2, tokens}, at::TensorOptions().dtype(at::kLong));
  int64_t* pos = host.mutable_data_ptr<int64_t>();
  int64_t* row = pos + tokens;
  for (int64_t b = 0; b < layout.batch(); ++b) {
    const int64_t n = layout.seq_lens[b];
    for (int64_t t = 0; t < n; ++t) {
      const int64_t i = layout.offset[b] + t, p = layout.start_pos[b] + t;
      pos[i] = p;
      row[i] = t < n - slots ? -1 : b * slots + p % slots;
    }
  }
  return to_device(host, like);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_op(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, residual, weight, eps);
  const DeviceGuard guard(x);
  at::Tensor out = at::empty_like(x), h = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = dim == 0 ? 0 : x.numel() / dim;
  check_launch(rms_norm(dtype_of(x), x.const_data_ptr(), residual ? residual->const_data_ptr() : nullptr,
                        weight.const_data_ptr(), out.mutable_data_ptr(), h.mutable_data_ptr(), rows, dim,
                        static_cast<float>(eps), stream_of(x)),
               "rms_norm");
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> rope_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                           double theta) {
  check_rope_args(q, k, positions, theta);
  const DeviceGuard guard(q);
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  RopeCacheArgs a;
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.q_out = q_out.mutable_data_ptr();
  a.k_out = k_out.mutable_data_ptr();
  a.positions = positions.const_data_ptr<int64_t>();
  a.tokens = q.size(0);
  a.q_heads = q.size(1);
  a.kv_heads = k.size(1);
  a.head_dim = q.size(2);
  a.theta = theta;
  check_launch(rope_cache_write(dtype_of(q), a, stream_of(q)), "rope");
  return {q_out, k_out};
}

void cache_write_op(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& seq_lens, const at::Tensor& start_pos) {
  const auto layout = check_cache_write_args(k, v, k_cache, v_cache, seq_lens, start_pos);
  const DeviceGuard guard(k);
  const at::Tensor rows = token_rows(layout, k.size(0), k_cache.size(1), k);
  RopeCacheArgs a;
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.k_cache = k_cache.mutable_data_ptr();
  a.v_cache = v_cache.mutable_data_ptr();
  a.cache_rows = rows.const_data_ptr<int64_t>() + k.size(0);
  a.tokens = k.size(0);
  a.kv_heads = k.size(1);
  a.head_dim = k.size(2);
  check_launch(rope_cache_write(dtype_of(k), a, stream_of(k)), "cache_write");
}

at::Tensor rope_cache_write_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                               at::Tensor& v_cache, const at::Tensor& seq_lens, const at::Tensor& start_pos,
                               double theta) {
  const auto layout = check_rope_cache_write_args(q, k, v, k_cache, v_cache, seq_lens, start_pos, theta);
  const DeviceGuard guard(q);
  const at::Tensor rows = token_rows(layout, q.size(0), k_cache.size(1), q);
  at::Tensor q_out = at::empty_like(q);
  RopeCacheArgs a;
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.q_out = q_out.mutable_data_ptr();
  a.k_cache = k_cache.mutable_data_ptr();
  a.v_cache = v_cache.mutable_data_ptr();
  a.positions = rows.const_data_ptr<int64_t>();
  a.cache_rows = rows.const_data_ptr<int64_t>() + q.size(0);
  a.tokens = q.size(0);
  a.q_heads = q.size(1);
  a.kv_heads = k.size(1);
  a.head_dim = q.size(2);
  a.theta = theta;
  check_launch(rope_cache_write(dtype_of(q), a, stream_of(q)), "rope_cache_write");
  return q_out;
}

at::Tensor silu_mul_op(const at::Tensor& x) {
  check_silu_mul_args(x);
  const DeviceGuard guard(x);
  const int64_t hidden = x.size(-1) / 2;
  auto shape = x.sizes().vec();
  shape.back() = hidden;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t rows = hidden == 0 ? 0 : x.numel() / (2 * hidden);
  check_launch(silu_mul(dtype_of(x), x.const_data_ptr(), out.mutable_data_ptr(), rows, hidden, stream_of(x)),
               "silu_mul");
  return out;
}

at::Tensor mlp_decode_op(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2) {
  check_mlp_decode_args(x, w13, w2);
  const DeviceGuard guard(x);
  const int64_t tokens = x.size(0), dim = x.size(1), hidden = w13.size(0) / 2;
  at::Tensor out = at::empty({tokens, dim}, x.options());
  at::Tensor workspace = at::empty({tokens, hidden}, x.options().dtype(at::kFloat));
  check_launch(mlp_decode(dtype_of(x), x.const_data_ptr(), w13.const_data_ptr(), w2.const_data_ptr(),
                          out.mutable_data_ptr(), workspace.mutable_data_ptr<float>(), tokens, dim, hidden,
                          stream_of(x)),
               "mlp_decode");
  return out;
}

}  // namespace mistral_ext::MX_KERNEL_NS
