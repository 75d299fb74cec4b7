// decode_block: one decode step of a transformer block (mistral_ext.model.TransformerBlock) as one op. It calls
// the same ops as the Python block, through the dispatcher, in the same order and on the same tensors, so its
// result is the Python block's bit for bit; the Python block stays the reference (tests compare the two). It
// exists for the host's sake: from Python an op call costs microseconds (argument parsing, boxing, module
// attribute lookups), and a decode step makes about nine per block; from here a call costs a fraction of one.
// Registered as CompositeImplicitAutograd, so it runs on any device its ops do, and torch.compile traces through
// it to those ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "ops.h"
#include "schemas.h"

namespace mistral_ext {
namespace {

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// The signatures of the kernels these ops are registered with (ops.h).
using Linear = decltype(dense_linear_cpu);
using QuantLinear = decltype(quant_linear_cpu);
using RmsNorm = decltype(rms_norm_cpu);
using RopeCacheWrite = decltype(rope_cache_write_cpu);
using AttentionDecode = decltype(attention_decode_cpu);
using SiluMul = decltype(silu_mul_cpu);

// x @ w.T: quantized when the weight comes with its scales (a QuantizedWeight), dense otherwise.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                  const std::optional<at::Tensor>& mins) {
  static const auto quant_linear = op<QuantLinear>("mistral_ext::quant_linear");
  static const auto dense_linear = op<Linear>("mistral_ext::dense_linear");
  if (scales) return quant_linear.call(x, w, *scales, mins);
  TORCH_CHECK_VALUE(!mins, "mistral_ext.decode_block: a weight has mins but no scales");
  return dense_linear.call(x, w);
}

std::tuple<at::Tensor, at::Tensor> decode_block(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& ffn_norm, const at::Tensor& next_norm,
    double eps, const at::Tensor& wqkv, const std::optional<at::Tensor>& wqkv_scales,
    const std::optional<at::Tensor>& wqkv_mins, const at::Tensor& wo, const std::optional<at::Tensor>& wo_scales,
    const std::optional<at::Tensor>& wo_mins, const at::Tensor& w13, const std::optional<at::Tensor>& w13_scales,
    const std::optional<at::Tensor>& w13_mins, const at::Tensor& w2, const std::optional<at::Tensor>& w2_scales,
    const std::optional<at::Tensor>& w2_mins, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions,
    const at::Tensor& cache_rows, int64_t n_heads, double theta, std::optional<int64_t> window) {
  static const auto rms_norm = op<RmsNorm>("mistral_ext::rms_norm");
  static const auto rope_cache_write = op<RopeCacheWrite>("mistral_ext::rope_cache_write");
  static const auto attention_decode = op<AttentionDecode>("mistral_ext::attention_decode");
  static const auto silu_mul = op<SiluMul>("mistral_ext::silu_mul");
  const char* name = "decode_block";
  check_activation(name, "x", x, 2);
  check_activation(name, "k_cache", k_cache, 4);
  TORCH_CHECK_VALUE(n_heads >= 1, "mistral_ext.decode_block: `n_heads` must be >= 1, got ", n_heads);
  const int64_t tokens = x.size(0), n_kv = k_cache.size(2), head_dim = k_cache.size(3);
  const int64_t q_size = n_heads * head_dim, kv_size = n_kv * head_dim;
  const at::Tensor qkv = linear(x, wqkv, wqkv_scales, wqkv_mins);
  TORCH_CHECK_VALUE(qkv.size(1) == q_size + 2 * kv_size, "mistral_ext.decode_block: `wqkv` has ", qkv.size(1),
                    " rows; ", n_heads, " query heads and the cache's ", n_kv, " KV heads of ", head_dim,
                    " need ", q_size + 2 * kv_size);
  const auto parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
  const at::Tensor q = parts[0].reshape({tokens, n_heads, head_dim}).contiguous();
  const at::Tensor k = parts[1].reshape({tokens, n_kv, head_dim}).contiguous();
  const at::Tensor v = parts[2].reshape({tokens, n_kv, head_dim}).contiguous();
  const at::Tensor rotated = rope_cache_write.call(q, k, v, k_cache, v_cache, positions, cache_rows, theta);
  const at::Tensor attended = attention_decode.call(rotated, k_cache, v_cache, positions, window);
  const at::Tensor h = linear(attended.reshape({tokens, -1}), wo, wo_scales, wo_mins);
  const auto [normed, stream] = rms_norm.call(h, residual, ffn_norm, eps);
  const at::Tensor gated = silu_mul.call(linear(normed, w13, w13_scales, w13_mins));
  return rms_norm.call(linear(gated, w2, w2_scales, w2_mins), stream, next_norm, eps);
}

}  // namespace

void define_block_ops(torch::Library& m) {
  m.def(
      "decode_block(Tensor x, Tensor residual, Tensor ffn_norm, Tensor next_norm, float eps,"
      " Tensor wqkv, Tensor? wqkv_scales, Tensor? wqkv_mins, Tensor wo, Tensor? wo_scales, Tensor? wo_mins,"
      " Tensor w13, Tensor? w13_scales, Tensor? w13_mins, Tensor w2, Tensor? w2_scales, Tensor? w2_mins,"
      " Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, Tensor cache_rows, int n_heads, float theta,"
      " int? window) -> (Tensor out, Tensor residual_out)");
}

void register_block_ops(torch::Library& m) { m.impl("decode_block", &decode_block); }

}  // namespace mistral_ext
