// The packed ("varlen") batch layout of prefill chunks: sequence b owns tokens [offset[b], offset[b] + seq_lens[b])
// of the packed tensors, at absolute positions start_pos[b], start_pos[b] + 1, ... No padding anywhere.
// Index tensors may live on the GPU: their values are checked on a host copy (which costs one synchronisation).
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>
#include <vector>

#include "checks.h"

namespace mistral_ext {

// Positions stay far below int64 overflow even after adding a chunk length.
constexpr int64_t kMaxPosition = std::numeric_limits<int64_t>::max() / 4;

inline void check_position(const char* op, const char* name, int64_t index, int64_t p) {
  TORCH_CHECK_INDEX(p >= 0 && p <= kMaxPosition, "mistral_ext.", op, ": ", name, "[", index, "] = ", p,
                    " is out of range (must be >= 0)");
}

inline at::Tensor host_copy(const at::Tensor& t) { return t.is_cpu() ? t : t.cpu(); }

// Checks an int64 position vector of n entries (on ref's device) and returns its values on the host.
inline at::Tensor checked_positions(const char* op, const char* name, const at::Tensor& positions, int64_t n,
                                    const char* ref_name, const at::Tensor& ref) {
  check_index_vector(op, name, positions, n, ref_name, ref);
  at::Tensor host = host_copy(positions);
  const int64_t* p = host.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) check_position(op, name, i, p[i]);
  return host;
}

struct BatchLayout {
  std::vector<int64_t> offset;  // B + 1 entries, offset[B] == total tokens
  at::Tensor seq_lens_host, start_pos_host;
  const int64_t* seq_lens;
  const int64_t* start_pos;
  int64_t batch() const { return static_cast<int64_t>(offset.size()) - 1; }
};

inline BatchLayout batch_layout(const char* op, const at::Tensor& seq_lens, const at::Tensor& start_pos,
                                int64_t batch, int64_t tokens, const char* ref_name, const at::Tensor& ref) {
  check_index_vector(op, "seq_lens", seq_lens, batch, ref_name, ref);
  check_index_vector(op, "start_pos", start_pos, batch, ref_name, ref);
  BatchLayout layout{std::vector<int64_t>(batch + 1, 0), host_copy(seq_lens), host_copy(start_pos), nullptr,
                     nullptr};
  layout.seq_lens = layout.seq_lens_host.const_data_ptr<int64_t>();
  layout.start_pos = layout.start_pos_host.const_data_ptr<int64_t>();
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
