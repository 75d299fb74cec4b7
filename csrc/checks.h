// Input checks shared by every kernel entry (CPU and CUDA). Each failure names the op and the argument and
// raises the Python exception that fits: TypeError for dtypes, ValueError for shapes, layouts and devices,
// IndexError for positions.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace mistral_ext {

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A float tensor of `dim` dimensions (any number if dim < 0), dense and contiguous.
inline void check_activation(const char* op, const char* name, const at::Tensor& t, int64_t dim = -1) {
  TORCH_CHECK_TYPE(is_activation_dtype(t.scalar_type()), "mistral_ext.", op, ": `", name,
                   "` must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(dim < 0 || t.dim() == dim, "mistral_ext.", op, ": `", name, "` must have ", dim,
                    " dimensions, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "mistral_ext.", op, ": `", name, "` must be a dense tensor");
  TORCH_CHECK_VALUE(t.is_contiguous(), "mistral_ext.", op, ": `", name, "` must be contiguous (call .contiguous())");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "mistral_ext.", op, ": `", name, "` has dtype ",
                   t.scalar_type(), " but `", ref_name, "` has ", ref.scalar_type(), "; they must match");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "mistral_ext.", op, ": `", name, "` is on ", t.device(),
                    " but `", ref_name, "` is on ", ref.device(), "; they must be on the same device");
}

// An int64 vector of `n` entries (positions, lengths) on the device of `ref`, or on the CPU: index values are
// checked on the host, so host-made index tensors cost a GPU op no synchronisation.
inline void check_index_vector(const char* op, const char* name, const at::Tensor& t, int64_t n,
                               const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "mistral_ext.", op, ": `", name, "` must be int64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "mistral_ext.", op, ": `", name, "` must have shape [", n,
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "mistral_ext.", op, ": `", name, "` must be contiguous");
  TORCH_CHECK_VALUE(t.device() == ref.device() || t.is_cpu(), "mistral_ext.", op, ": `", name, "` is on ",
                    t.device(), " but `", ref_name, "` is on ", ref.device(),
                    "; index tensors must be on that device or on the CPU");
}

// [B, S, Hkv, D] ring caches matching `k` ([T, Hkv, D] keys, or [T, Hq, D] queries with match_heads = false).
inline void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                         const char* k_name, bool match_heads = true) {
  check_activation(op, "k_cache", k_cache, 4);
  check_activation(op, "v_cache", v_cache, 4);
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "mistral_ext.", op, ": `v_cache` shape ", v_cache.sizes(),
                    " differs from `k_cache` shape ", k_cache.sizes());
  check_same_dtype(op, "k_cache", k_cache, k_name, k);
  check_same_dtype(op, "v_cache", v_cache, k_name, k);
  check_same_device(op, "k_cache", k_cache, k_name, k);
  check_same_device(op, "v_cache", v_cache, k_name, k);
  TORCH_CHECK_VALUE(k_cache.size(1) > 0, "mistral_ext.", op, ": the cache has no slots");
  TORCH_CHECK_VALUE((!match_heads || k_cache.size(2) == k.size(-2)) && k_cache.size(3) == k.size(-1),
                    "mistral_ext.", op, ": cache [B, S, Hkv, D] = ", k_cache.sizes(), " does not match `", k_name,
                    "` ", k.sizes(), match_heads ? " in heads or head_dim" : " in head_dim");
}

// New keys and values [T, Hkv, D] of one call.
inline void check_new_kv(const char* op, const at::Tensor& k, const at::Tensor& v) {
  check_activation(op, "k", k, 3);
  check_activation(op, "v", v, 3);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "mistral_ext.", op, ": `v` shape ", v.sizes(), " differs from `k` shape ",
                    k.sizes());
  check_same_dtype(op, "v", v, "k", k);
  check_same_device(op, "v", v, "k", k);
}

inline void check_window(const char* op, std::optional<int64_t> window, int64_t slots) {
  if (!window) return;
  TORCH_CHECK_VALUE(*window >= 1, "mistral_ext.", op, ": `window` must be >= 1 or None, got ", *window);
  TORCH_CHECK_VALUE(*window <= slots, "mistral_ext.", op, ": `window` ", *window, " exceeds the ", slots,
                    " cache slots; in-window keys would be overwritten");
}

}  // namespace mistral_ext
