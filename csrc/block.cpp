// decode_layers: one decode step of a stack of transformer blocks (mistral_ext.model.TransformerBlock) as one op.
// Each block calls the same ops as the Python block, through the dispatcher, in the same order and on the same
// tensors, so its result is the Python blocks' bit for bit; the Python block stays the reference (tests compare
// the two). It exists for the host's sake: from Python an op call costs microseconds (argument parsing, boxing,
// module attribute lookups), and a decode step makes about nine per block; from here a call costs a fraction of
// one, and the whole stack is one call. Registered as CompositeImplicitAutograd, so it runs on any device its ops
// do, and torch.compile traces through it to those ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

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

constexpr int64_t kMatrices = 4;  // per block: wqkv, wo, w13, w2
constexpr const char* kMatrixNames[kMatrices] = {"wqkv", "wo", "w13", "w2"};

// A block's matrix as decode_layers takes it: `parts` consecutive (weight, scales, mins) triples of `weights` from
// entry `first`, each a row block of the matrix, quantized when it has scales (a QuantizedWeight), dense when not.
struct Matrix {
  const c10::List<std::optional<at::Tensor>>* weights;
  int64_t first;
  int64_t parts;
};

// x @ w.T, the parts' outputs side by side, as mistral_ext.model.linear computes it.
at::Tensor linear(const at::Tensor& x, const Matrix& m) {
  static const auto quant_linear = op<QuantLinear>("mistral_ext::quant_linear");
  static const auto dense_linear = op<Linear>("mistral_ext::dense_linear");
  std::vector<at::Tensor> outs;
  for (int64_t p = 0; p < m.parts; ++p) {
    const int64_t e = m.first + 3 * p;
    const at::Tensor w = m.weights->get(e).value();
    const std::optional<at::Tensor> scales = m.weights->get(e + 1), mins = m.weights->get(e + 2);
    outs.push_back(scales ? quant_linear.call(x, w, *scales, mins) : dense_linear.call(x, w));
  }
  return outs.size() == 1 ? outs[0] : at::cat(outs, -1);
}

std::tuple<at::Tensor, at::Tensor> decode_block(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& ffn_norm, const at::Tensor& next_norm, double eps,
                                                const Matrix (&w)[kMatrices], at::Tensor& k_cache,
                                                at::Tensor& v_cache, const at::Tensor& positions,
                                                const at::Tensor& cache_rows, int64_t n_heads, double theta,
                                                std::optional<int64_t> window) {
  static const auto rms_norm = op<RmsNorm>("mistral_ext::rms_norm");
  static const auto rope_cache_write = op<RopeCacheWrite>("mistral_ext::rope_cache_write");
  static const auto attention_decode = op<AttentionDecode>("mistral_ext::attention_decode");
  static const auto silu_mul = op<SiluMul>("mistral_ext::silu_mul");
  const int64_t tokens = x.size(0), n_kv = k_cache.size(2), head_dim = k_cache.size(3);
  const int64_t q_size = n_heads * head_dim, kv_size = n_kv * head_dim;
  const at::Tensor qkv = linear(x, w[0]);
  TORCH_CHECK_VALUE(qkv.size(1) == q_size + 2 * kv_size, "mistral_ext.decode_layers: `wqkv` has ", qkv.size(1),
                    " rows; ", n_heads, " query heads and the cache's ", n_kv, " KV heads of ", head_dim,
                    " need ", q_size + 2 * kv_size);
  const auto parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
  const at::Tensor q = parts[0].reshape({tokens, n_heads, head_dim}).contiguous();
  const at::Tensor k = parts[1].reshape({tokens, n_kv, head_dim}).contiguous();
  const at::Tensor v = parts[2].reshape({tokens, n_kv, head_dim}).contiguous();
  const at::Tensor rotated = rope_cache_write.call(q, k, v, k_cache, v_cache, positions, cache_rows, theta);
  const at::Tensor attended = attention_decode.call(rotated, k_cache, v_cache, positions, window);
  const at::Tensor h = linear(attended.reshape({tokens, -1}), w[1]);
  const auto [normed, stream] = rms_norm.call(h, residual, ffn_norm, eps);
  const at::Tensor gated = silu_mul.call(linear(normed, w[2]));
  return rms_norm.call(linear(gated, w[3]), stream, next_norm, eps);
}

std::tuple<at::Tensor, at::Tensor> decode_layers(
    const at::Tensor& x, const at::Tensor& residual, at::TensorList norms, double eps,
    const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef parts, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& positions, const at::Tensor& cache_rows, int64_t n_heads,
    double theta, std::optional<int64_t> window) {
  const char* name = "decode_layers";
  check_activation(name, "x", x, 2);
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK_VALUE(layers >= 1, "mistral_ext.decode_layers: no layers (`k_caches` is empty)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(v_caches.size()) == layers, "mistral_ext.decode_layers: ",
                    v_caches.size(), " `v_caches` for ", layers, " `k_caches`");
  TORCH_CHECK_VALUE(static_cast<int64_t>(norms.size()) == 2 * layers, "mistral_ext.decode_layers: `norms` has ",
                    norms.size(), " tensors; ", layers, " layers need ", 2 * layers, " (each its ffn_norm and the "
                    "norm after it)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(parts.size()) == kMatrices * layers, "mistral_ext.decode_layers: `parts` has ",
                    parts.size(), " entries; ", layers, " layers need ", kMatrices * layers);
  int64_t triples = 0;
  for (int64_t i = 0; i < kMatrices * layers; ++i) {
    TORCH_CHECK_VALUE(parts[i] >= 1, "mistral_ext.decode_layers: `", kMatrixNames[i % kMatrices], "` of layer ",
                      i / kMatrices, " has ", parts[i], " parts; each matrix has at least one");
    triples += parts[i];
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == 3 * triples, "mistral_ext.decode_layers: `weights` has ",
                    weights.size(), " entries; `parts` needs ", 3 * triples, " (weight, scales, mins per part)");
  for (int64_t t = 0; t < triples; ++t) {
    TORCH_CHECK_VALUE(weights.get(3 * t).has_value(), "mistral_ext.decode_layers: weight entry ", 3 * t,
                      " is None; a part's matrix must be given");
    TORCH_CHECK_VALUE(weights.get(3 * t + 1).has_value() || !weights.get(3 * t + 2).has_value(),
                      "mistral_ext.decode_layers: weight entry ", 3 * t, " has mins but no scales");
  }
  TORCH_CHECK_VALUE(n_heads >= 1, "mistral_ext.decode_layers: `n_heads` must be >= 1, got ", n_heads);
  for (int64_t l = 0; l < layers; ++l) check_activation(name, "k_caches", k_caches[l], 4);

  at::Tensor out = x, stream = residual;
  int64_t first = 0;
  for (int64_t l = 0; l < layers; ++l) {
    Matrix w[kMatrices];
    for (int64_t i = 0; i < kMatrices; ++i) {
      w[i] = {&weights, first, parts[l * kMatrices + i]};
      first += 3 * w[i].parts;
    }
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    std::tie(out, stream) = decode_block(out, stream, norms[2 * l], norms[2 * l + 1], eps, w, k_cache, v_cache,
                                         positions, cache_rows, n_heads, theta, window);
  }
  return {out, stream};
}

}  // namespace

void define_block_ops(torch::Library& m) {
  m.def(
      "decode_layers(Tensor x, Tensor residual, Tensor[] norms, float eps, Tensor?[] weights, int[] parts,"
      " Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor positions, Tensor cache_rows, int n_heads, float theta,"
      " int? window) -> (Tensor out, Tensor residual_out)");
}

void register_block_ops(torch::Library& m) { m.impl("decode_layers", &decode_layers); }

}  // namespace mistral_ext
