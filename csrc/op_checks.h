// The argument checks of every op, shared by its CPU, CUDA and emulated entries so that bad input is refused the
// same way everywhere. Index values are checked when on the host (batch_layout.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <ATen/core/List.h>

#include <cmath>
#include <optional>
#include <vector>

#include "batch_layout.h"
#include "checks.h"

namespace mistral_ext {

inline void check_rms_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  check_activation(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "mistral_ext.rms_norm: `x` must have at least one dimension");
  check_activation(op, "weight", weight, 1);
  check_same_dtype(op, "weight", weight, "x", x);
  check_same_device(op, "weight", weight, "x", x);
  TORCH_CHECK_VALUE(weight.size(0) == x.size(-1), "mistral_ext.rms_norm: `weight` has ", weight.size(0),
                    " entries but `x` has last dimension ", x.size(-1));
  if (residual) {
    check_activation(op, "residual", *residual);
    check_same_dtype(op, "residual", *residual, "x", x);
    check_same_device(op, "residual", *residual, "x", x);
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "mistral_ext.rms_norm: `residual` shape ", residual->sizes(),
                      " differs from `x` shape ", x.sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "mistral_ext.rms_norm: `eps` must be finite and > 0, got ", eps);
}

inline void check_rope_params(const char* op, int64_t head_dim, double theta) {
  TORCH_CHECK_VALUE(head_dim % 2 == 0 && head_dim > 0, "mistral_ext.", op, ": head_dim must be even, got ", head_dim);
  TORCH_CHECK_VALUE(std::isfinite(theta) && theta > 1.0, "mistral_ext.", op, ": `theta` must be finite and > 1, got ",
                    theta);
}

// Returns the positions when on the host.
inline at::Tensor check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                  double theta) {
  const char* op = "rope";
  check_activation(op, "q", q, 3);
  check_activation(op, "k", k, 3);
  check_same_dtype(op, "k", k, "q", q);
  check_same_device(op, "k", k, "q", q);
  const int64_t tokens = q.size(0), head_dim = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == tokens && k.size(2) == head_dim, "mistral_ext.rope: `q` ", q.sizes(), " and `k` ",
                    k.sizes(), " must agree on tokens and head_dim ([T, H, D])");
  check_rope_params(op, head_dim, theta);
  return checked_positions(op, "positions", positions, tokens, "q", q);
}

inline void check_cache_write_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& cache_rows) {
  const char* op = "cache_write";
  check_new_kv(op, k, v);
  check_caches(op, k_cache, v_cache, k, "k");
  check_cache_rows(op, cache_rows, k.size(0), k_cache.size(0) * k_cache.size(1), "k", k);
}

inline void check_rope_cache_write_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& positions, const at::Tensor& cache_rows, double theta) {
  const char* op = "rope_cache_write";
  check_activation(op, "q", q, 3);
  check_new_kv(op, k, v);
  check_same_dtype(op, "k", k, "q", q);
  check_same_device(op, "k", k, "q", q);
  check_caches(op, k_cache, v_cache, k, "k");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(2) == q.size(2), "mistral_ext.rope_cache_write: `q` ",
                    q.sizes(), " and `k` ", k.sizes(), " must agree on tokens and head_dim ([T, H, D])");
  check_rope_params(op, q.size(2), theta);
  checked_positions(op, "positions", positions, q.size(0), "q", q);
  check_cache_rows(op, cache_rows, q.size(0), k_cache.size(0) * k_cache.size(1), "q", q);
}

// q [.., Hq, D] against caches [B, S, Hkv, D]: shared shape checks of both attention ops.
inline void check_attention_shapes(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache) {
  check_activation(op, "q", q, 3);
  check_caches(op, k_cache, v_cache, q, "q", /*match_heads=*/false);
  TORCH_CHECK_VALUE(q.size(1) % k_cache.size(2) == 0, "mistral_ext.", op, ": ", q.size(1),
                    " query heads are not a multiple of ", k_cache.size(2), " KV heads");
}

// Returns the layout when seq_lens and start_pos are on the host (values checked), nullopt when on the GPU.
inline std::optional<BatchLayout> check_attention_prefill_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                const at::Tensor& seq_lens, const at::Tensor& start_pos,
                                                std::optional<int64_t> window) {
  const char* op = "attention_prefill";
  check_attention_shapes(op, q, k_cache, v_cache);
  check_new_kv(op, k, v);
  check_same_dtype(op, "k", k, "q", q);
  check_same_device(op, "k", k, "q", q);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == k_cache.size(2) && k.size(2) == q.size(2),
                    "mistral_ext.attention_prefill: `k` and `v` must be [T, Hkv, D] = [", q.size(0), ", ",
                    k_cache.size(2), ", ", q.size(2), "], got ", k.sizes());
  const int64_t batch = k_cache.size(0), slots = k_cache.size(1);
  check_window(op, window, slots);
  auto layout = batch_layout(op, seq_lens, start_pos, batch, q.size(0), "q", q);
  if (layout && !window)
    for (int64_t b = 0; b < batch; ++b)
      TORCH_CHECK_INDEX(layout->start_pos[b] <= slots, "mistral_ext.attention_prefill: start_pos[", b, "] = ",
                        layout->start_pos[b], " but a cache without window holds only ", slots, " positions");
  return layout;
}

// Returns the positions when on the host.
inline at::Tensor check_attention_decode_args(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache, const at::Tensor& positions,
                                              std::optional<int64_t> window) {
  const char* op = "attention_decode";
  check_attention_shapes(op, q, k_cache, v_cache);
  const int64_t batch = k_cache.size(0), slots = k_cache.size(1);
  TORCH_CHECK_VALUE(q.size(0) == batch, "mistral_ext.attention_decode: `q` has ", q.size(0),
                    " tokens but the cache has batch ", batch, "; decode takes one token per sequence");
  check_window(op, window, slots);
  at::Tensor host = checked_positions(op, "positions", positions, batch, "q", q);
  const int64_t* pos = host.defined() ? host.const_data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; pos && b < batch; ++b)
    TORCH_CHECK_INDEX(window || pos[b] < slots, "mistral_ext.attention_decode: positions[", b, "] = ", pos[b],
                      " but a cache without window holds only ", slots, " positions");
  return host;
}

inline void check_silu_mul_args(const at::Tensor& x) {
  check_activation("silu_mul", "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) % 2 == 0, "mistral_ext.silu_mul: the last dimension of `x` must be ",
                    "even ([..., 2 * hidden]), got shape ", x.sizes());
}

inline void check_dense_linear_args(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "dense_linear";
  check_activation(op, "x", x, 2);
  check_activation(op, "weight", weight, 2);
  check_same_device(op, "weight", weight, "x", x);
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "mistral_ext.dense_linear: `x` has ", x.size(1),
                    " features but `weight` ", weight.sizes(), " has K = ", weight.size(1));
}

constexpr int64_t kQuantBlock = 32;  // weights per scale in the quantized formats (mistral_ext/quant.py)
constexpr int64_t kQuantGroup = 8;   // rows interleaved in their layout
constexpr int64_t kQuantChunk = 4;   // bytes of one row side by side there

// A quantized matrix [N, K]: int8 qweight [N, K] (q8_0) or uint8 [N, K/2] (q4_0; q4_1 with mins), fp16 scales and
// mins [N, K/32], contiguous, on the device of `ref`, rows interleaved in groups of kQuantGroup. Returns K.
inline int64_t check_quantized_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                                      const std::optional<at::Tensor>& mins, const char* ref_name,
                                      const at::Tensor& ref) {
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kChar || qweight.scalar_type() == at::kByte, "mistral_ext.", op,
                   ": `qweight` must be int8 (q8_0) or uint8 (4-bit), got ", qweight.scalar_type());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kHalf, "mistral_ext.", op, ": `scales` must be float16, got ",
                   scales.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2 && scales.dim() == 2, "mistral_ext.", op,
                    ": `qweight` and `scales` must be 2-D, got ", qweight.sizes(), " and ", scales.sizes());
  TORCH_CHECK_VALUE(qweight.is_contiguous() && scales.is_contiguous(), "mistral_ext.", op,
                    ": `qweight` and `scales` must be contiguous");
  check_same_device(op, "qweight", qweight, ref_name, ref);
  check_same_device(op, "scales", scales, ref_name, ref);
  const int64_t k = scales.size(1) * kQuantBlock;
  const int64_t per_byte = qweight.scalar_type() == at::kChar ? 1 : 2;
  TORCH_CHECK_VALUE(qweight.size(0) == scales.size(0) && qweight.size(1) * per_byte == k, "mistral_ext.", op,
                    ": `qweight` ", qweight.sizes(), " does not match `scales` ", scales.sizes(), " (", per_byte,
                    per_byte == 1 ? " value" : " values", " per byte, ", kQuantBlock, " per scale)");
  if (mins) {
    TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte, "mistral_ext.", op,
                      ": `mins` belong to the 4-bit q4_1 format; q8_0 (int8 `qweight`) has none");
    TORCH_CHECK_TYPE(mins->scalar_type() == at::kHalf, "mistral_ext.", op, ": `mins` must be float16, got ",
                     mins->scalar_type());
    TORCH_CHECK_VALUE(mins->sizes() == scales.sizes() && mins->is_contiguous(), "mistral_ext.", op,
                      ": `mins` must be contiguous with the shape of `scales` ", scales.sizes(), ", got ",
                      mins->sizes());
    check_same_device(op, "mins", *mins, ref_name, ref);
  }
  return k;
}

inline void check_quant_linear_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& mins) {
  const char* op = "quant_linear";
  check_activation(op, "x", x, 2);
  const int64_t k = check_quantized_weight(op, qweight, scales, mins, "x", x);
  TORCH_CHECK_VALUE(x.size(1) == k, "mistral_ext.quant_linear: `x` has ", x.size(1), " features but the weight has K = ",
                    k);
}

// Ids on the host are checked to lie in [0, V); on the GPU the kernel writes NaN rows for ids outside it.
inline void check_quant_embedding_args(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                                       const std::optional<at::Tensor>& mins, at::ScalarType dtype) {
  const char* op = "quant_embedding";
  TORCH_CHECK_TYPE(is_activation_dtype(dtype), "mistral_ext.quant_embedding: `dtype` must be float32, bfloat16 or "
                   "float16, got ", dtype);
  TORCH_CHECK_VALUE(ids.dim() == 1, "mistral_ext.quant_embedding: `ids` must be 1-D, got shape ", ids.sizes());
  check_index_vector(op, "ids", ids, ids.size(0), "qweight", qweight);
  check_quantized_weight(op, qweight, scales, mins, "qweight", qweight);
  if (!ids.is_cpu()) return;
  const int64_t* p = ids.const_data_ptr<int64_t>();
  const int64_t rows = qweight.size(0);
  for (int64_t i = 0; i < ids.size(0); ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < rows, "mistral_ext.quant_embedding: token id ", p[i], " (at ", i,
                      ") is outside the vocabulary [0, ", rows, ")");
}

// decode_layers' sizes, once its arguments are checked.
struct DecodeLayersShape {
  int64_t layers, batch, dim, slots, hq, hkv, head_dim;  // batch: the tokens, one for each of some cache rows
  std::vector<int64_t> hidden;  // per layer: w13 is [2 * hidden, dim]
  at::Tensor rows, positions;   // on the host
};

constexpr int64_t kDecodeMatrices = 4;  // per block: wqkv, wo, w13, w2
constexpr const char* kDecodeMatrixNames[kDecodeMatrices] = {"wqkv", "wo", "w13", "w2"};

inline DecodeLayersShape check_decode_layers_args(
    const at::Tensor& x, const at::Tensor& residual, at::TensorList norms, double eps,
    const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef parts, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& rows, const at::Tensor& positions, const at::Tensor& cache_rows,
    int64_t n_heads, double theta, std::optional<int64_t> window) {
  const char* op = "decode_layers";
  check_activation(op, "x", x, 2);
  check_activation(op, "residual", residual, 2);
  check_same_dtype(op, "residual", residual, "x", x);
  check_same_device(op, "residual", residual, "x", x);
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "mistral_ext.decode_layers: `residual` shape ", residual.sizes(),
                    " differs from `x` shape ", x.sizes());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "mistral_ext.decode_layers: `eps` must be finite and > 0, got ",
                    eps);
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK_VALUE(layers >= 1, "mistral_ext.decode_layers: no layers (`k_caches` is empty)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(v_caches.size()) == layers, "mistral_ext.decode_layers: ",
                    v_caches.size(), " `v_caches` for ", layers, " `k_caches`");
  TORCH_CHECK_VALUE(static_cast<int64_t>(norms.size()) == 2 * layers, "mistral_ext.decode_layers: `norms` has ",
                    norms.size(), " tensors; ", layers, " layers need ", 2 * layers,
                    " (each its ffn_norm and the norm after it)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(parts.size()) == kDecodeMatrices * layers,
                    "mistral_ext.decode_layers: `parts` has ", parts.size(), " entries; ", layers, " layers need ",
                    kDecodeMatrices * layers);
  int64_t triples = 0;
  for (int64_t i = 0; i < kDecodeMatrices * layers; ++i) {
    TORCH_CHECK_VALUE(parts[i] >= 1, "mistral_ext.decode_layers: `", kDecodeMatrixNames[i % kDecodeMatrices],
                      "` of layer ", i / kDecodeMatrices, " has ", parts[i], " parts; each matrix has at least one");
    triples += parts[i];
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == 3 * triples, "mistral_ext.decode_layers: `weights` has ",
                    weights.size(), " entries; `parts` needs ", 3 * triples, " (weight, scales, mins per part)");
  TORCH_CHECK_VALUE(n_heads >= 1, "mistral_ext.decode_layers: `n_heads` must be >= 1, got ", n_heads);

  const at::Tensor& cache = k_caches[0];
  for (int64_t l = 0; l < layers; ++l) {
    check_activation(op, "k_caches", k_caches[l], 4);
    check_activation(op, "v_caches", v_caches[l], 4);
    check_same_dtype(op, "k_caches", k_caches[l], "x", x);
    check_same_dtype(op, "v_caches", v_caches[l], "x", x);
    check_same_device(op, "k_caches", k_caches[l], "x", x);
    check_same_device(op, "v_caches", v_caches[l], "x", x);
    TORCH_CHECK_VALUE(k_caches[l].sizes() == cache.sizes() && v_caches[l].sizes() == cache.sizes(),
                      "mistral_ext.decode_layers: the caches of layer ", l, " (", k_caches[l].sizes(), ", ",
                      v_caches[l].sizes(), ") differ from `k_caches[0]` ", cache.sizes());
  }
  TORCH_CHECK_VALUE(cache.size(1) > 0, "mistral_ext.decode_layers: the cache has no slots");
  DecodeLayersShape shape{layers, x.size(0), x.size(1), cache.size(1), n_heads, cache.size(2), cache.size(3),
                          {}, {}, {}};
  const int64_t cache_batch = cache.size(0);
  TORCH_CHECK_VALUE(shape.batch <= cache_batch, "mistral_ext.decode_layers: `x` has ", shape.batch,
                    " tokens but the caches have ", cache_batch, " rows; decode takes one token per row at most");
  for (int64_t i = 0; i < 2 * layers; ++i) {
    check_activation(op, "norms", norms[i], 1);
    check_same_dtype(op, "norms", norms[i], "x", x);
    check_same_device(op, "norms", norms[i], "x", x);
    TORCH_CHECK_VALUE(norms[i].size(0) == shape.dim, "mistral_ext.decode_layers: `norms[", i, "]` has ",
                      norms[i].size(0), " entries but `x` has ", shape.dim, " features");
  }

  // Each matrix: its parts' K, and their rows summed.
  int64_t entry = 0;
  for (int64_t l = 0; l < layers; ++l) {
    int64_t hidden = -1;
    for (int64_t m = 0; m < kDecodeMatrices; ++m) {
      const char* name = kDecodeMatrixNames[m];
      const int64_t k = m == 0 || m == 2 ? shape.dim : m == 1 ? shape.hq * shape.head_dim : hidden;
      int64_t rows = 0;
      for (int64_t p = 0; p < parts[l * kDecodeMatrices + m]; ++p, entry += 3) {
        const std::optional<at::Tensor> w = weights.get(entry), scales = weights.get(entry + 1),
                                        mins = weights.get(entry + 2);
        TORCH_CHECK_VALUE(w.has_value(), "mistral_ext.decode_layers: weight entry ", entry,
                          " is None; a part's matrix must be given");
        TORCH_CHECK_VALUE(scales.has_value() || !mins.has_value(), "mistral_ext.decode_layers: weight entry ", entry,
                          " has mins but no scales");
        int64_t part_k;
        if (scales) {
          part_k = check_quantized_weight(op, *w, *scales, mins, "x", x);
        } else {
          check_activation(op, "weights", *w, 2);
          check_same_device(op, "weights", *w, "x", x);
          part_k = w->size(1);
        }
        TORCH_CHECK_VALUE(part_k == k, "mistral_ext.decode_layers: a part of `", name, "` of layer ", l, " has K = ",
                          part_k, "; it takes ", k, " features");
        rows += w->size(0);
      }
      if (m == 0) {
        const int64_t need = (shape.hq + 2 * shape.hkv) * shape.head_dim;
        TORCH_CHECK_VALUE(rows == need, "mistral_ext.decode_layers: `wqkv` has ", rows, " rows; ", shape.hq,
                          " query heads and the cache's ", shape.hkv, " KV heads of ", shape.head_dim, " need ", need);
      } else if (m == 2) {
        TORCH_CHECK_VALUE(rows % 2 == 0 && rows > 0, "mistral_ext.decode_layers: `w13` of layer ", l, " has ", rows,
                          " rows; it holds w1 and w3, an even number");
        hidden = rows / 2;
      } else {
        TORCH_CHECK_VALUE(rows == shape.dim, "mistral_ext.decode_layers: `", name, "` of layer ", l, " has ", rows,
                          " rows; it makes the ", shape.dim, " features of `x`");
      }
    }
    shape.hidden.push_back(hidden);
  }
  TORCH_CHECK_VALUE(shape.hq % shape.hkv == 0, "mistral_ext.decode_layers: ", shape.hq,
                    " query heads are not a multiple of ", shape.hkv, " KV heads");
  check_rope_params(op, shape.head_dim, theta);
  check_window(op, window, shape.slots);
  check_index_vector(op, "rows", rows, shape.batch, "x", x);
  TORCH_CHECK_VALUE(rows.is_cpu(), "mistral_ext.decode_layers: `rows` must be on the CPU");
  shape.rows = rows;
  const int64_t* row = rows.const_data_ptr<int64_t>();
  std::vector<bool> taken(cache_batch, false);
  for (int64_t b = 0; b < shape.batch; ++b) {
    TORCH_CHECK_INDEX(row[b] >= 0 && row[b] < cache_batch, "mistral_ext.decode_layers: rows[", b, "] = ", row[b],
                      " is outside the caches' ", cache_batch, " rows");
    TORCH_CHECK_VALUE(!taken[row[b]], "mistral_ext.decode_layers: rows takes cache row ", row[b],
                      " twice; each row decodes one token at most");
    taken[row[b]] = true;
  }
  shape.positions = checked_positions(op, "positions", positions, shape.batch, "x", x);
  const int64_t* pos = shape.positions.defined() ? shape.positions.const_data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; pos && b < shape.batch; ++b)
    TORCH_CHECK_INDEX(window || pos[b] < shape.slots, "mistral_ext.decode_layers: positions[", b, "] = ", pos[b],
                      " but a cache without window holds only ", shape.slots, " positions");
  check_cache_rows(op, cache_rows, shape.batch, cache_batch * shape.slots, "x", x);
  const int64_t* ring = cache_rows.is_cpu() ? cache_rows.const_data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; ring && b < shape.batch; ++b)
    TORCH_CHECK_INDEX(ring[b] < 0 || ring[b] / shape.slots == row[b], "mistral_ext.decode_layers: cache_rows[", b,
                      "] = ", ring[b], " is not in the ring of its row ", row[b]);
  return shape;
}

}  // namespace mistral_ext
