#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>

#include "op_checks.h"
#include "cpu/path_ops.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

// Token t of sequence b (absolute position start_pos[b] + t) goes to ring slot position mod S of row b.
// When a chunk is longer than the ring, only its last S tokens survive, so the earlier ones are not written:
// the result is the same as writing in order, without racing writers on one slot.
void cache_write_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& seq_lens, const at::Tensor& start_pos) {
  const auto layout = check_cache_write_args(k, v, k_cache, v_cache, seq_lens, start_pos);
  const int64_t batch = k_cache.size(0), slots = k_cache.size(1);

  const int64_t row = k.size(1) * k.size(2);
  const size_t row_bytes = static_cast<size_t>(row) * k.element_size();
  const auto* kp = static_cast<const char*>(k.const_data_ptr());
  const auto* vp = static_cast<const char*>(v.const_data_ptr());
  auto* kc = static_cast<char*>(k_cache.mutable_data_ptr());
  auto* vc = static_cast<char*>(v_cache.mutable_data_ptr());
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = layout.seq_lens[b];
      for (int64_t t = std::max<int64_t>(0, n - slots); t < n; ++t) {
        const int64_t src = layout.offset[b] + t;
        const int64_t dst = b * slots + (layout.start_pos[b] + t) % slots;
        std::memcpy(kc + dst * row_bytes, kp + src * row_bytes, row_bytes);
        std::memcpy(vc + dst * row_bytes, vp + src * row_bytes, row_bytes);
      }
    }
  });
}

// rope on q and k, then k (rotated) and v into the ring. Returns rotated q. The CPU version composes the two ops.
at::Tensor rope_cache_write_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& seq_lens, const at::Tensor& start_pos,
                                double theta) {
  const auto layout = check_rope_cache_write_args(q, k, v, k_cache, v_cache, seq_lens, start_pos, theta);
  at::Tensor positions = at::empty({q.size(0)}, seq_lens.options());
  int64_t* pos = positions.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < layout.batch(); ++b)
    for (int64_t t = 0; t < layout.seq_lens[b]; ++t) pos[layout.offset[b] + t] = layout.start_pos[b] + t;
  auto [q_rot, k_rot] = rope_cpu(q, k, positions, theta);
  cache_write_cpu(k_rot, v, k_cache, v_cache, seq_lens, start_pos);
  return q_rot;
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
