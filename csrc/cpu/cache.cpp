#include <ATen/Parallel.h>

#include <cstring>

#include "op_checks.h"
#include "cpu/path_ops.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

namespace {

// Token t's key and value rows go to ring row cache_rows[t] (b * S + slot, RollingBufferCache.step), none for -1.
void write_rows(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                const at::Tensor& cache_rows) {
  const int64_t* rows = cache_rows.const_data_ptr<int64_t>();
  const size_t row_bytes = static_cast<size_t>(k.size(1) * k.size(2)) * k.element_size();
  const auto* kp = static_cast<const char*>(k.const_data_ptr());
  const auto* vp = static_cast<const char*>(v.const_data_ptr());
  auto* kc = static_cast<char*>(k_cache.mutable_data_ptr());
  auto* vc = static_cast<char*>(v_cache.mutable_data_ptr());
  at::parallel_for(0, k.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (rows[t] < 0) continue;
      std::memcpy(kc + rows[t] * row_bytes, kp + t * row_bytes, row_bytes);
      std::memcpy(vc + rows[t] * row_bytes, vp + t * row_bytes, row_bytes);
    }
  });
}

}  // namespace

void cache_write_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& cache_rows) {
  check_cache_write_args(k, v, k_cache, v_cache, cache_rows);
  write_rows(k, v, k_cache, v_cache, cache_rows);
}

// rope on q and k, then k (rotated) and v into the ring. Returns rotated q. The CPU version composes the two ops.
at::Tensor rope_cache_write_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& cache_rows,
                                double theta) {
  check_rope_cache_write_args(q, k, v, k_cache, v_cache, positions, cache_rows, theta);
  auto [q_rot, k_rot] = rope_cpu(q, k, positions, theta);
  write_rows(k_rot, v, k_cache, v_cache, cache_rows);  // checked above
  return q_rot;
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
