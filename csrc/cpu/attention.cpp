#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "op_checks.h"
#include "cpu/work.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {
namespace {

constexpr int64_t kQueryBlock = 64;  // query tokens that share one pass over their keys
constexpr int64_t kKeyTile = 64;     // keys converted to fp32 and kept hot in cache at a time

// Where the key/value of position j of one sequence and KV head live: ring slot j mod S before `chunk_start`,
// row j - chunk_start of the new chunk from there on.
template <typename T>
struct KeySource {
  const T* ring_k;
  const T* ring_v;
  int64_t slots;
  const T* chunk_k;
  const T* chunk_v;
  int64_t chunk_start;
  int64_t stride;  // elements between consecutive rows: Hkv * D

  int64_t row(int64_t j) const { return (j < chunk_start ? j % slots : j - chunk_start) * stride; }
  const T* k(int64_t j) const { return (j < chunk_start ? ring_k : chunk_k) + row(j); }
  const T* v(int64_t j) const { return (j < chunk_start ? ring_v : chunk_v) + row(j); }
};

constexpr int kRowBlock = 4;  // query rows that share each K/V load in the inner loops

// A head's consecutive K/V rows lie Hkv * D elements apart (4 KB at Mistral 7B's shape, a page): the hardware
// prefetcher does not follow them, so a decode step, which reads each row once, asks for them itself.
constexpr int64_t kPrefetchRows = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  for (int64_t byte = 0; byte < n * static_cast<int64_t>(sizeof(T)); byte += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + byte);
}

// scores[r][c] = q_r . k_c for R query rows (stride head_dim) and the tile's kKeyTile keys, stored transposed
// (kt[i * kKeyTile + c]) so the loops run across keys in registers with no horizontal sums; each K value loaded
// serves R rows. Partial tiles are computed whole (their unused columns are zero).
template <int R>
inline void tile_scores(const float* q, int64_t head_dim, const float* kt, float* scores) {
  using cpu::f32xv;
  using cpu::kVec;
  static_assert(kKeyTile % (4 * kVec) == 0);
  for (int h = 0; h < kKeyTile; h += 4 * kVec) {
    f32xv s[R][4] = {};
    for (int64_t i = 0; i < head_dim; ++i) {
      const float* k = kt + i * kKeyTile + h;
      const f32xv k0 = cpu::loadv(k), k1 = cpu::loadv(k + kVec), k2 = cpu::loadv(k + 2 * kVec),
                  k3 = cpu::loadv(k + 3 * kVec);
      for (int r = 0; r < R; ++r) {
        const float qi = q[r * head_dim + i];
        s[r][0] += qi * k0;
        s[r][1] += qi * k1;
        s[r][2] += qi * k2;
        s[r][3] += qi * k3;
      }
    }
    for (int r = 0; r < R; ++r)
      for (int w = 0; w < 4; ++w) cpu::storev(scores + r * kKeyTile + h + kVec * w, s[r][w]);
  }
}

// acc_r[0, head_dim) += sum over c in [c_lo, c_hi] of p_r[c] * v_c for R rows (p stride kKeyTile, acc stride
// head_dim), two registers of outputs per row at a time; each V value loaded serves R rows.
template <int R>
inline void tile_weighted_sum(const float* p, const float* vt, int64_t c_lo, int64_t c_hi, int64_t head_dim,
                              float* acc) {
  using cpu::f32xv;
  using cpu::kVec;
  int64_t i = 0;
  for (; i + 2 * kVec <= head_dim; i += 2 * kVec) {
    f32xv a[R][2];
    for (int r = 0; r < R; ++r) {
      a[r][0] = cpu::loadv(acc + r * head_dim + i);
      a[r][1] = cpu::loadv(acc + r * head_dim + i + kVec);
    }
    for (int64_t c = c_lo; c <= c_hi; ++c) {
      const f32xv v0 = cpu::loadv(vt + c * head_dim + i), v1 = cpu::loadv(vt + c * head_dim + i + kVec);
      for (int r = 0; r < R; ++r) {
        a[r][0] += p[r * kKeyTile + c] * v0;
        a[r][1] += p[r * kKeyTile + c] * v1;
      }
    }
    for (int r = 0; r < R; ++r) {
      cpu::storev(acc + r * head_dim + i, a[r][0]);
      cpu::storev(acc + r * head_dim + i + kVec, a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = c_lo; c <= c_hi; ++c)
      cpu::axpy(acc + r * head_dim + i, p[r * kKeyTile + c], vt + c * head_dim + i, head_dim - i);
}

// f(std::integral_constant<int, nr>) for 1 <= nr <= kRowBlock: a partial block of rows still shares its loads.
template <typename F>
inline void with_rows(int nr, F&& f) {
  static_assert(kRowBlock == 4);
  switch (nr) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// Queries at positions first_pos .. first_pos + tokens - 1, each with the `group` query heads that share this KV
// head, attend over their keys tile by tile with an online softmax. Each K/V row is read from memory once for the
// whole block of rows (tokens x group); accumulation is fp32 and the output is rounded once.
// Keys outside every row's window are never read.
// The floats attend_block works in for `rows` query rows of head_dim d.
int64_t attend_scratch(int64_t rows, int64_t d) {
  return 2 * rows * d + 2 * rows + kRowBlock * kKeyTile + 2 * kKeyTile * d;
}

template <typename T>
void attend_block(const T* q, T* out, int64_t token_stride, int64_t tokens, int64_t group, int64_t head_dim,
                  int64_t first_pos, std::optional<int64_t> window, const KeySource<T>& keys,
                  std::vector<float>& scratch) {
  const int64_t rows = tokens * group, d = head_dim;
  scratch.resize(static_cast<size_t>(attend_scratch(rows, d)));
  float* qf = scratch.data();
  float* acc = qf + rows * d;
  float* row_max = acc + rows * d;
  float* row_sum = row_max + rows;
  float* p = row_sum + rows;
  float* kt = p + kRowBlock * kKeyTile;  // [d][kKeyTile]: transposed
  float* vt = kt + kKeyTile * d;

  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int64_t r = 0; r < rows; ++r) {
    const T* qr = q + (r / group) * token_stride + (r % group) * d;
    for (int64_t i = 0; i < d; ++i) {
      qf[r * d + i] = cpu::to_float(qr[i]) * scale;
      acc[r * d + i] = 0.0f;
    }
    row_max[r] = -std::numeric_limits<float>::infinity();
    row_sum[r] = 0.0f;
  }

  const int64_t last_pos = first_pos + tokens - 1;
  const int64_t lo = window ? std::max<int64_t>(0, first_pos - *window + 1) : 0;
  // One query token has too few rows to pay for transposing each key tile: its scores are dot products read in place.
  const bool decode = tokens == 1;
  for (int64_t j0 = lo; j0 <= last_pos; j0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, last_pos - j0 + 1);
    for (int64_t c = 0; c < n; ++c) {
      if (decode) {
        prefetch_row(keys.k(j0 + c), d);
        if (j0 + c + kPrefetchRows <= last_pos) prefetch_row(keys.v(j0 + c + kPrefetchRows), d);
      }
      const T* vr = keys.v(j0 + c);
      for (int64_t i = 0; i < d; ++i) vt[c * d + i] = cpu::to_float(vr[i]);
      if (!decode) {
        const T* kr = keys.k(j0 + c);
        for (int64_t i = 0; i < d; ++i) kt[i * kKeyTile + c] = cpu::to_float(kr[i]);
      }
    }
    if (!decode && n < kKeyTile)  // a partial tile: its unused columns are computed over, so make them finite
      for (int64_t i = 0; i < d; ++i) std::fill(kt + i * kKeyTile + n, kt + (i + 1) * kKeyTile, 0.0f);
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
      int64_t c_lo[kRowBlock], c_hi[kRowBlock], u_lo = n, u_hi = -1;  // each row's visible keys, and their union
      for (int r = 0; r < nr; ++r) {
        const int64_t pos = first_pos + (r0 + r) / group;
        c_lo[r] = std::max<int64_t>(0, (window ? pos - *window + 1 : 0) - j0);
        c_hi[r] = std::min(n - 1, pos - j0);
        if (c_lo[r] <= c_hi[r]) {
          u_lo = std::min(u_lo, c_lo[r]);
          u_hi = std::max(u_hi, c_hi[r]);
        }
      }
      if (u_lo > u_hi) continue;
      if (decode)
        for (int64_t c = u_lo; c <= u_hi; ++c) {
          const T* kr = keys.k(j0 + c);
          for (int r = 0; r < nr; ++r) p[r * kKeyTile + c] = cpu::dot(qf + (r0 + r) * d, kr, d);
        }
      else
        with_rows(nr, [&](auto rows) { tile_scores<rows.value>(qf + r0 * d, d, kt, p); });
      for (int r = 0; r < nr; ++r) {
        float* pr = p + r * kKeyTile;
        const int64_t lo_r = c_lo[r], hi_r = c_hi[r];
        if (lo_r > hi_r) {  // nothing visible to this row in this tile: it adds nothing
          std::fill(pr + u_lo, pr + u_hi + 1, 0.0f);
          continue;
        }
        float tile_max = -std::numeric_limits<float>::infinity();
        for (int64_t c = lo_r; c <= hi_r; ++c) tile_max = std::max(tile_max, pr[c]);
        const int64_t row = r0 + r;
        const float new_max = std::max(row_max[row], tile_max);
        const float rescale = cpu::exp_approx(row_max[row] - new_max);
        float sum = 0.0f;
        for (int64_t c = u_lo; c <= u_hi; ++c) {
          pr[c] = (c >= lo_r && c <= hi_r) ? cpu::exp_approx(pr[c] - new_max) : 0.0f;
          sum += pr[c];
        }
        row_max[row] = new_max;
        row_sum[row] = row_sum[row] * rescale + sum;
        if (rescale != 1.0f)
          for (int64_t i = 0; i < d; ++i) acc[row * d + i] *= rescale;
      }
      with_rows(nr, [&](auto rows) { tile_weighted_sum<rows.value>(p, vt, u_lo, u_hi, d, acc + r0 * d); });
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* orow = out + (r / group) * token_stride + (r % group) * d;
    const float inv = 1.0f / row_sum[r];
    for (int64_t i = 0; i < d; ++i) orow[i] = cpu::from_float<T>(acc[r * d + i] * inv);
  }
}

}  // namespace

// Query heads per work item of a decode call. An item per (sequence, KV head) reads each K/V row once for all
// `group` query heads, but when there are too few such items to spread evenly over the threads (3 KV heads on 2
// threads leave one thread idle a third of the time; MQA at batch 1 has one item) the group is split into items of
// fewer heads, which read the rows again (from cache) and keep every thread busy. A query head's arithmetic in
// attend_block does not depend on the heads beside it, so the split changes no result.
int64_t decode_heads_per_item(int64_t items, int64_t group, int64_t threads) {
  for (int64_t heads = group; heads > 1; --heads) {
    if (group % heads != 0) continue;
    const int64_t n = items * (group / heads);
    if (8 * ((n + threads - 1) / threads) * threads <= 9 * n) return heads;  // the busiest thread within 1/8 of even
  }
  return 1;
}

// Packed chunks: sequence b's tokens sit at positions start_pos[b] + t. Query at position i sees keys j with
// i - W < j <= i. Keys before start_pos[b] are read from the ring, the chunk's own keys from k/v: the ring must
// not yet hold this chunk (read before write), so no in-window key is lost however the chunk wraps the ring.
at::Tensor attention_prefill_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 const at::Tensor& start_pos, std::optional<int64_t> window) {
  const BatchLayout layout = *check_attention_prefill_args(q, k, v, k_cache, v_cache, seq_lens, start_pos, window);
  const int64_t batch = k_cache.size(0), slots = k_cache.size(1);

  at::Tensor out = at::empty_like(q);
  const int64_t hq = q.size(1), hkv = k_cache.size(2), head_dim = q.size(2);
  const int64_t group = hq / hkv, stride = hkv * head_dim;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (sequence, first token of the block)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < layout.seq_lens[b]; t += kQueryBlock) blocks.emplace_back(b, t);

  MISTRAL_EXT_DISPATCH_FLOATS(q.scalar_type(), "attention_prefill_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* kc = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vc = v_cache.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(blocks.size()) * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      for (int64_t item = begin; item < end; ++item) {
        const auto [b, t0] = blocks[item / hkv];
        const int64_t g = item % hkv;
        const int64_t ring = (b * slots * hkv + g) * head_dim, chunk = layout.offset[b] * stride + g * head_dim;
        const KeySource<scalar_t> keys{kc + ring, vc + ring, slots, kp + chunk, vp + chunk, layout.start_pos[b],
                                       stride};
        const int64_t first = (layout.offset[b] + t0) * hq + g * group;  // q/out row of the block's first query
        attend_block(qp + first * head_dim, op_ + first * head_dim, hq * head_dim,
                     std::min(kQueryBlock, layout.seq_lens[b] - t0), group, head_dim, layout.start_pos[b] + t0,
                     window, keys, scratch);
      }
    });
  });
  return out;
}

// One new token per sequence at positions[b], whose K/V are already in the ring: it sees positions
// max(0, p - W + 1) .. p, read from slots j mod S.
template <typename T>
void DecodeAttention<T>::run(int64_t begin, int64_t end, std::vector<float>& scratch) const {
  const int64_t group = hq / hkv, parts = group / heads, stride = hkv * head_dim;  // parts: items per (b, KV head)
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / (hkv * parts), g = item / parts % hkv, part = item % parts;
    const int64_t ring = ((rows ? rows[b] : b) * slots * hkv + g) * head_dim;
    // Every key is in the ring (there is no chunk): chunk_start is past the query.
    const KeySource<T> keys{k_cache + ring, v_cache + ring, slots, nullptr, nullptr, positions[b] + 1, stride};
    const int64_t first = (b * hq + g * group + part * heads) * head_dim;
    attend_block(q + first, out + first, hq * head_dim, 1, heads, head_dim, positions[b], window, keys, scratch);
  }
}

template <typename T>
int64_t DecodeAttention<T>::scratch() const {
  return attend_scratch(heads, head_dim);
}

template struct DecodeAttention<float>;
template struct DecodeAttention<c10::BFloat16>;
template struct DecodeAttention<c10::Half>;

at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& positions, std::optional<int64_t> window) {
  const at::Tensor host_positions = check_attention_decode_args(q, k_cache, v_cache, positions, window);
  at::Tensor out = at::empty_like(q);
  const int64_t batch = k_cache.size(0), hq = q.size(1), hkv = k_cache.size(2);
  const int64_t heads = decode_heads_per_item(batch * hkv, hq / hkv, at::get_num_threads());
  MISTRAL_EXT_DISPATCH_FLOATS(q.scalar_type(), "attention_decode_cpu", [&] {
    const DecodeAttention<scalar_t> attention{q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                                              v_cache.const_data_ptr<scalar_t>(),
                                              host_positions.const_data_ptr<int64_t>(), nullptr,
                                              out.mutable_data_ptr<scalar_t>(), batch, k_cache.size(1), hq, hkv,
                                              q.size(2), heads, window};
    at::parallel_for(0, attention.items(), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      attention.run(begin, end, scratch);
    });
  });
  return out;
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
