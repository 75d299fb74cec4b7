// The ops' work in pieces a thread can take. Each op's entry (the other files of cpu/) runs its pieces under
// at::parallel_for; decode_layers (cpu/decode.cpp) runs a whole decode step's pieces inside one parallel region,
// with a barrier between dependent ones. A piece computes exactly what its op computes for its part of the output,
// bit for bit, so the two ways of running it agree. Include it last: it opens the CPU code path (path_ops.h).
#pragma once

#include <c10/util/Half.h>

#include <optional>
#include <utility>
#include <vector>

#include "op_checks.h"
#include "cpu/path_ops.h"

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

// [begin, end) of `items` for thread `tid` of `threads`: contiguous shares, their sizes within one of each other.
inline std::pair<int64_t, int64_t> share(int64_t items, int64_t tid, int64_t threads) {
  return {items * tid / threads, items * (tid + 1) / threads};
}

// layernorm.cpp: rms_norm of rows [begin, end) of x [rows, dim] (residual may be null); h may be residual itself.
template <typename T>
void rms_norm_rows(const T* x, const T* residual, const T* weight, double eps, int64_t dim, T* out, T* h,
                   int64_t begin, int64_t end);

// activation.cpp: silu_mul of one row, its gate and up `hidden` apart, elements [begin, end).
template <typename T>
void silu_mul_span(const T* gate_up, int64_t hidden, T* out, int64_t begin, int64_t end);

// pos_encoding.cpp: theta^(-2i/D) for i < D/2; the cosines and sines of a position's angles; `heads` heads of
// head_dim rotated from x into y.
std::vector<double> rope_inverse_frequencies(double theta, int64_t head_dim);
void rope_cos_sin(int64_t position, const std::vector<double>& inv_freq, float* c, float* s);
template <typename T>
void rope_rotate(const T* x, T* y, int64_t heads, int64_t head_dim, const float* c, const float* s);

// attention.cpp: the decode attention of one new token per sequence (of some rows of the caches), in work items of
// `heads` query heads of one (token, KV head).
int64_t decode_heads_per_item(int64_t items, int64_t group, int64_t threads);
template <typename T>
struct DecodeAttention {
  const T* q;  // [tokens, Hq, D]
  const T* k_cache;
  const T* v_cache;  // [B, S, Hkv, D]
  const int64_t* positions;  // [tokens]
  const int64_t* rows;  // [tokens]: each token's cache row; null: token b is row b
  T* out;  // [tokens, Hq, D]
  int64_t tokens, slots, hq, hkv, head_dim;
  int64_t heads;  // query heads per item (decode_heads_per_item)
  std::optional<int64_t> window;

  int64_t items() const { return tokens * hkv * (hq / hkv / heads); }
  int64_t scratch() const;  // the floats run() works in: reserved beforehand, it allocates nothing
  void run(int64_t begin, int64_t end, std::vector<float>& scratch) const;
};

// quant.cpp: activations rounded to int8 per block of 32 (what quant_linear multiplies), and a quantized matrix's
// product with them in groups of 8 rows.
struct QuantActivations {
  int64_t tokens = 0, k = 0;
  std::vector<int8_t> q;  // [T, K]
  std::vector<float> d, dsum;  // per block: the scale, and the scale times the sum of the values
  std::vector<int32_t> offset;  // per block: 8 times the sum of the values (q4_0's offset)
  void resize(int64_t tokens, int64_t k);
};
template <typename T>
void quantize_activation_blocks(const T* x, QuantActivations& a, int64_t begin, int64_t end);  // blocks of [T, K]

struct QuantMatrix {
  const void* qweight;  // int8 (q8_0) or uint8 (q4_0 without mins, q4_1 with)
  bool int8;
  const c10::Half* scales;
  const c10::Half* mins;
  int64_t n, k;
  int64_t groups() const { return (n + kQuantGroup - 1) / kQuantGroup; }
};
// y[t * ldy + row] for the rows of groups [begin, end) and every token of `a`.
template <typename T>
void quant_linear_groups(const QuantMatrix& w, const QuantActivations& a, T* y, int64_t ldy, int64_t begin,
                         int64_t end);

// linear.cpp: a dense matrix W [N, K] as stored times fp32 activations as dense_linear_input makes them.
int64_t dense_linear_tiles(int64_t n);  // the units of dense_linear_tiles' range
// Whether a W matrix reads the activations in another form than T's own values (widened to fp32, or permuted).
template <typename W, typename T>
bool dense_linear_needs_input();
template <typename W, typename T>
void dense_linear_input(const T* x, int64_t k, float* out, int64_t begin, int64_t end);  // rows [begin, end)
template <typename W, typename T>
void dense_linear_tiles(const float* x, const W* w, T* y, int64_t ldy, int64_t tokens, int64_t n, int64_t k,
                        int64_t begin, int64_t end);

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
