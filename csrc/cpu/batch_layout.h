// The packed ("varlen") batch layout of prefill chunks: sequence b owns tokens [offset[b], offset[b] + seq_lens[b])
// of the packed tensors, at absolute positions start_pos[b], start_pos[b] + 1, ... No padding anywhere.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>
#include <vector>

#include "checks.h"

namespace mistral_ext::cpu {

struct BatchLayout {
  std::vector<int64_t> offset;  // B + 1 entries, offset[B] == total tokens
  const int64_t* seq_lens;
  const int64_t* start_pos;
  int64_t batch() const { return static_cast<int64_t>(offset.size()) - 1; }
};

// Positions stay far below int64 overflow even after adding a chunk length.
constexpr int64_t kMaxPosition = std::numeric_limits<int64_t>::max() / 4;

inline void check_position(const char* op, const char* name, int64_t index, int64_t p) {
  TORCH_CHECK_INDEX(p >= 0 && p <= kMaxPosition, "mistral_ext.", op, ": ", name, "[", index, "] = ", p,
                    " is out of range (must be >= 0)");
}

inline BatchLayout batch_layout(const char* op, const at::Tensor& seq_lens, const at::Tensor& start_pos,
                                int64_t batch, int64_t tokens, const char* ref_name, const at::Tensor& ref) {
  check_index_vector(op, "seq_lens", seq_lens, batch, ref_name, ref);
  check_index_vector(op, "start_pos", start_pos, batch, ref_name, ref);
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

}  // namespace mistral_ext::cpu
