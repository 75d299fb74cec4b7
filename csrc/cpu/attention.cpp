#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/batch_layout.h"
#include "cpu/cpu_math.h"
#include "ops.h"

namespace mistral_ext {
namespace {

// Consecutive key/value rows of one KV head, `stride` elements apart (ring slots or chunk tokens).
template <typename T>
struct KeySpan {
  const T* k;
  const T* v;
  int64_t rows;
};

// The `ring` slots holding positions [first, first + count) of one sequence, as at most two spans (it may wrap).
template <typename T>
int ring_spans(const T* k_ring, const T* v_ring, int64_t slots, int64_t stride, int64_t first, int64_t count,
               KeySpan<T>* spans) {
  if (count <= 0) return 0;
  const int64_t s0 = first % slots;
  const int64_t n0 = std::min(count, slots - s0);
  spans[0] = {k_ring + s0 * stride, v_ring + s0 * stride, n0};
  if (n0 == count) return 1;
  spans[1] = {k_ring, v_ring, count - n0};
  return 2;
}

// All `group` query heads that share one KV head attend to the same keys, so each K/V row is read once for the
// group. Scores, softmax and the weighted sum are fp32; the output is rounded once.
template <typename T>
void attend_group(const T* q, int64_t group, int64_t head_dim, const KeySpan<T>* spans, int nspans, int64_t stride,
                  T* out, std::vector<float>& scratch) {
  int64_t keys = 0;
  for (int s = 0; s < nspans; ++s) keys += spans[s].rows;
  scratch.resize(static_cast<size_t>(group) * (2 * head_dim + keys));
  float* qf = scratch.data();
  float* acc = qf + group * head_dim;
  float* scores = acc + group * head_dim;  // [group, keys]

  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (int64_t i = 0; i < group * head_dim; ++i) {
    qf[i] = cpu::to_float(q[i]) * scale;
    acc[i] = 0.0f;
  }
  int64_t j = 0;
  for (int s = 0; s < nspans; ++s)
    for (int64_t r = 0; r < spans[s].rows; ++r, ++j) {
      const T* krow = spans[s].k + r * stride;
      for (int64_t h = 0; h < group; ++h) scores[h * keys + j] = cpu::dot(qf + h * head_dim, krow, head_dim);
    }
  std::vector<float> inv_sum(group);
  for (int64_t h = 0; h < group; ++h) {
    float* sh = scores + h * keys;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < keys; ++i) m = std::max(m, sh[i]);
    float sum = 0.0f;
    for (int64_t i = 0; i < keys; ++i) {
      sh[i] = std::exp(sh[i] - m);
      sum += sh[i];
    }
    inv_sum[h] = 1.0f / sum;
  }
  j = 0;
  for (int s = 0; s < nspans; ++s)
    for (int64_t r = 0; r < spans[s].rows; ++r, ++j) {
      const T* vrow = spans[s].v + r * stride;
      for (int64_t h = 0; h < group; ++h) cpu::axpy(acc + h * head_dim, scores[h * keys + j], vrow, head_dim);
    }
  for (int64_t h = 0; h < group; ++h)
    for (int64_t d = 0; d < head_dim; ++d)
      out[h * head_dim + d] = cpu::from_float<T>(acc[h * head_dim + d] * inv_sum[h]);
}

// q [.., Hq, D] against caches [B, S, Hkv, D]: shared shape checks of both attention ops.
void check_attention_shapes(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache) {
  check_activation(op, "q", q, 3);
  check_caches(op, k_cache, v_cache, q, "q", /*match_heads=*/false);
  TORCH_CHECK_VALUE(q.size(1) % k_cache.size(2) == 0, "mistral_ext.", op, ": ", q.size(1),
                    " query heads are not a multiple of ", k_cache.size(2), " KV heads");
}

}  // namespace

// Packed chunks: sequence b's tokens sit at positions start_pos[b] + t. Query at position i sees keys j with
// i - W < j <= i. Keys before start_pos[b] are read from the ring, the chunk's own keys from k/v: the ring must
// not yet hold this chunk (read before write), so no in-window key is lost however the chunk wraps the ring.
at::Tensor attention_prefill_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 const at::Tensor& start_pos, std::optional<int64_t> window) {
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
  const auto layout = cpu::batch_layout(op, seq_lens, start_pos, batch, q.size(0), "q", q);
  if (!window)
    for (int64_t b = 0; b < batch; ++b)
      TORCH_CHECK_INDEX(layout.start_pos[b] <= slots, "mistral_ext.attention_prefill: start_pos[", b, "] = ",
                        layout.start_pos[b], " but a cache without window holds only ", slots, " positions");

  at::Tensor out = at::empty_like(q);
  const int64_t tokens = q.size(0), hq = q.size(1), hkv = k_cache.size(2), head_dim = q.size(2);
  const int64_t group = hq / hkv, stride = hkv * head_dim;
  std::vector<int64_t> seq_of_token(tokens);
  for (int64_t b = 0; b < batch; ++b)
    std::fill(seq_of_token.begin() + layout.offset[b], seq_of_token.begin() + layout.offset[b + 1], b);

  MISTRAL_EXT_DISPATCH_FLOATS(q.scalar_type(), "attention_prefill_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* kc = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vc = v_cache.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tokens * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      KeySpan<scalar_t> spans[3];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t tok = item / hkv, g = item % hkv;
        const int64_t b = seq_of_token[tok];
        const int64_t start = layout.start_pos[b], t = tok - layout.offset[b], i = start + t;
        const int64_t lo = window ? std::max<int64_t>(0, i - *window + 1) : 0;
        const int64_t ring_off = (b * slots * hkv + g) * head_dim;
        int n = ring_spans(kc + ring_off, vc + ring_off, slots, stride, lo, start - lo, spans);
        const int64_t first = std::max(lo, start) - start;  // first chunk row in the window
        const int64_t chunk_off = (layout.offset[b] + first) * stride + g * head_dim;
        spans[n++] = {kp + chunk_off, vp + chunk_off, t - first + 1};
        attend_group(qp + (tok * hq + g * group) * head_dim, group, head_dim, spans, n, stride,
                     op_ + (tok * hq + g * group) * head_dim, scratch);
      }
    });
  });
  return out;
}

// One new token per sequence at positions[b], whose K/V are already in the ring: it sees positions
// max(0, p - W + 1) .. p, read from slots j mod S.
at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& positions, std::optional<int64_t> window) {
  const char* op = "attention_decode";
  check_attention_shapes(op, q, k_cache, v_cache);
  const int64_t batch = k_cache.size(0), slots = k_cache.size(1);
  TORCH_CHECK_VALUE(q.size(0) == batch, "mistral_ext.attention_decode: `q` has ", q.size(0),
                    " tokens but the cache has batch ", batch, "; decode takes one token per sequence");
  check_window(op, window, slots);
  check_index_vector(op, "positions", positions, batch, "q", q);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_INDEX(pos[b] >= 0 && pos[b] <= cpu::kMaxPosition, "mistral_ext.attention_decode: positions[", b,
                      "] = ", pos[b], " is out of range (must be >= 0)");
    TORCH_CHECK_INDEX(window || pos[b] < slots, "mistral_ext.attention_decode: positions[", b, "] = ", pos[b],
                      " but a cache without window holds only ", slots, " positions");
  }

  at::Tensor out = at::empty_like(q);
  const int64_t hq = q.size(1), hkv = k_cache.size(2), head_dim = q.size(2);
  const int64_t group = hq / hkv, stride = hkv * head_dim;
  MISTRAL_EXT_DISPATCH_FLOATS(q.scalar_type(), "attention_decode_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kc = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vc = v_cache.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      KeySpan<scalar_t> spans[2];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / hkv, g = item % hkv;
        const int64_t lo = window ? std::max<int64_t>(0, pos[b] - *window + 1) : 0;
        const int64_t ring_off = (b * slots * hkv + g) * head_dim;
        const int n = ring_spans(kc + ring_off, vc + ring_off, slots, stride, lo, pos[b] - lo + 1, spans);
        attend_group(qp + (b * hq + g * group) * head_dim, group, head_dim, spans, n, stride,
                     op_ + (b * hq + g * group) * head_dim, scratch);
      }
    });
  });
  return out;
}

}  // namespace mistral_ext
