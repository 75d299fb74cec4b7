// The packed ("varlen") batch layout of prefill chunks: sequence b owns tokens [offset[b], offset[b] + seq_lens[b])
// of the packed tensors, at absolute positions start_pos[b], start_pos[b] + 1, ... No padding anywhere.
// Index tensors on the host are checked value by value. Those on the GPU are checked in shape and dtype only (reading
// them back would synchronise, and a CUDA graph replays no host code): RollingBufferCache.step made them from checked
// host values, and the kernels never touch memory outside their tensors whatever the values.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks.h"
#include "max_position.h"

namespace mistral_ext {

inline void check_position(const char* op, const char* name, int64_t index, int64_t p) {
  TORCH_CHECK_INDEX(p >= 0 && p <= kMaxPosition, "mistral_ext.", op, ": ", name, "[", index, "] = ", p,
                    " is out of range (must be >= 0)");
}

// Checks an int64 position vector of n entries (on ref's device or the host); returns it when on the host (values
// checked), an undefined tensor when on the GPU.
inline at::Tensor checked_positions(const char* op, const char* name, const at::Tensor& positions, int64_t n,
                                    const char* ref_name, const at::Tensor& ref) {
  check_index_vector(op, name, positions, n, ref_name, ref);
  if (!positions.is_cpu()) return {};
  const int64_t* p = positions.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) check_position(op, name, i, p[i]);
  return positions;
}

// The ring row (b * S + slot of rings [B, S, ...], ring_rows = B * S) each of n tokens writes, or -1 for none: the
// slot mapping of one step, made once by RollingBufferCache.step. On the host each value is checked and no row may
// be taken twice (two writers of one slot would race).
inline void check_cache_rows(const char* op, const at::Tensor& cache_rows, int64_t n, int64_t ring_rows,
                             const char* ref_name, const at::Tensor& ref) {
  check_index_vector(op, "cache_rows", cache_rows, n, ref_name, ref);
  if (!cache_rows.is_cpu()) return;
  const int64_t* r = cache_rows.const_data_ptr<int64_t>();
  std::vector<int64_t> taken;
  taken.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(r[i] >= -1 && r[i] < ring_rows, "mistral_ext.", op, ": cache_rows[", i, "] = ", r[i],
                      " is outside [-1, ", ring_rows, ") (B * S ring rows; -1 writes nothing)");
    if (r[i] >= 0) taken.push_back(r[i]);
  }
  std::sort(taken.begin(), taken.end());
  const auto twice = std::adjacent_find(taken.begin(), taken.end());
  TORCH_CHECK_VALUE(twice == taken.end(), "mistral_ext.", op, ": cache_rows takes ring row ", *twice,
                    " twice; each row is written by one token at most");  // the message is built on failure only
}

struct BatchLayout {
  std::vector<int64_t> offset;  // B + 1 entries, offset[B] == total tokens
  const int64_t* seq_lens;
  const int64_t* start_pos;
  int64_t batch() const { return static_cast<int64_t>(offset.size()) - 1; }
};

// The layout with its values checked when seq_lens and start_pos are on the host; nullopt when they are on the GPU.
inline std::optional<BatchLayout> batch_layout(const char* op, const at::Tensor& seq_lens, const at::Tensor& start_pos,
                                               int64_t batch, int64_t tokens, const char* ref_name,
                                               const at::Tensor& ref) {
  check_index_vector(op, "seq_lens", seq_lens, batch, ref_name, ref);
  check_index_vector(op, "start_pos", start_pos, batch, ref_name, ref);
  TORCH_CHECK_VALUE(seq_lens.is_cpu() == start_pos.is_cpu(), "mistral_ext.", op, ": `seq_lens` is on ",
                    seq_lens.device(), " but `start_pos` on ", start_pos.device(), "; both must be on one device");
  if (!seq_lens.is_cpu()) return std::nullopt;
  BatchLayout layout{std::vector<int64_t>(batch + 1, 0), seq_lens.const_data_ptr<int64_t>(),
                     start_pos.const_data_ptr<int64_t>()};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = layout.seq_lens[b], p = layout.start_pos[b];
    TORCH_CHECK_VALUE(n >= 0 && n <= tokens, "mistral_ext.", op, ": seq_lens[", b, "] = ", n,
                      " is outside [0, ", tokens, "]");
    check_position(op, "start_pos", b, p);
    layout.offset[b + 1] = layout.offset[b] + n;
  }
  TORCH_CHECK_VALUE(layout.offset[batch] == tokens, "mistral_ext.", op, ": seq_lens sum to ", layout.offset[batch],
                    " but `", ref_name, "` holds ", tokens, " tokens");
  return layout;
}

}  // namespace mistral_ext
