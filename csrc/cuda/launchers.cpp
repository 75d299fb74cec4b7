#include "cuda/launchers.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "op_checks.h"

#ifdef MISTRAL_EXT_EMULATE
#include "cuda/emu/emu_options.h"
namespace {
cudaStream_t stream_of(const at::Tensor&) { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
at::Tensor to_device(const at::Tensor& t, const at::Tensor&) { return t; }
void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "mistral_ext.", op, ": emulated launch failed (", static_cast<int>(status), ")");
}
int64_t multiprocessors(const at::Tensor&) { return emu::options().sm_count; }
int64_t max_smem_per_block(const at::Tensor&) { return 227 * 1024; }
}  // namespace
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
namespace {
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
// Index data on the host goes to the GPU through pinned memory: an asynchronous copy, with no synchronisation.
at::Tensor to_device(const at::Tensor& t, const at::Tensor& like) {
  if (!t.is_cpu()) return t;
  at::Tensor pinned = at::empty(t.sizes(), t.options().pinned_memory(true));
  pinned.copy_(t);
  return pinned.to(like.device(), /*non_blocking=*/true);
}
void check_launch(cudaError_t status, const char*) { C10_CUDA_CHECK(status); }
int64_t multiprocessors(const at::Tensor& t) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.device().index()));
  return n;
}
int64_t max_smem_per_block(const at::Tensor& t) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.device().index()));
  return n;
}
}  // namespace
#endif

namespace mistral_ext::MX_KERNEL_NS {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK_TYPE(false, "mistral_ext: no CUDA kernel for dtype ", t.scalar_type());
  }
}

// The key side of the rope/cache kernel: k [T, Hkv, D], and when given, v and the rings with each token's ring row.
RopeCacheArgs rope_cache_args(const at::Tensor& k, const at::Tensor* v, at::Tensor* k_cache, at::Tensor* v_cache,
                              const int64_t* cache_rows) {
  RopeCacheArgs a;
  a.k = k.const_data_ptr();
  a.tokens = k.size(0);
  a.kv_heads = k.size(1);
  a.head_dim = k.size(2);
  if (v) {
    a.v = v->const_data_ptr();
    a.k_cache = k_cache->mutable_data_ptr();
    a.v_cache = v_cache->mutable_data_ptr();
    a.cache_rows = cache_rows;
    a.ring_rows = k_cache->size(0) * k_cache->size(1);
  }
  return a;
}

// Adds the rotation: q [T, Hq, D] into q_out, q and k at positions[t].
void add_rope(RopeCacheArgs& a, const at::Tensor& q, at::Tensor& q_out, const int64_t* positions, double theta) {
  a.q = q.const_data_ptr();
  a.q_out = q_out.mutable_data_ptr();
  a.q_heads = q.size(1);
  a.positions = positions;
  a.theta = theta;
}

void check_head_dim(const char* op, int64_t head_dim) {
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128, "mistral_ext.", op,
                    ": the CUDA attention kernels take head_dim 64 or 128, got ", head_dim);
}

// The attention kernels read every row with 16-byte loads and have no scalar path (the other kernels fall back to
// one): a view that starts off a 16-byte boundary, such as buf[1:].view(shape), is refused, not faulted on.
void check_aligned16(const char* op, const char* name, const at::Tensor& t) {
  const auto address = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  TORCH_CHECK_VALUE(address % 16 == 0, "mistral_ext.", op, ": `", name, "` must start at a 16-byte aligned address ",
                    "for the CUDA attention kernels' vector loads, but starts ", address % 16,
                    " bytes past one (storage offset ", t.storage_offset(), "); pass a copy (.clone())");
}

AttentionArgs attention_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             std::optional<int64_t> window, at::Tensor& out) {
  AttentionArgs a;
  a.q = q.const_data_ptr();
  a.k_cache = k_cache.const_data_ptr();
  a.v_cache = v_cache.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.batch = k_cache.size(0);
  a.slots = k_cache.size(1);
  a.kv_heads = k_cache.size(2);
  a.q_heads = q.size(1);
  a.head_dim = q.size(2);
  a.window = window ? *window : 0;
  return a;
}

QuantMatrix quant_matrix(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& mins) {
  QuantMatrix w;
  w.format = qweight.scalar_type() == at::kChar ? QuantFormat::q8_0 : mins ? QuantFormat::q4_1 : QuantFormat::q4_0;
  w.qweight = qweight.const_data_ptr();
  w.scales = scales.const_data_ptr();
  w.mins = mins ? mins->const_data_ptr() : nullptr;
  w.rows = qweight.size(0);
  w.cols = scales.size(1) * kQuantBlock;
  return w;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_op(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, residual, weight, eps);
  const DeviceGuard guard(x);
  at::Tensor out = at::empty_like(x), h = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = dim == 0 ? 0 : x.numel() / dim;
  check_launch(rms_norm(dtype_of(x), x.const_data_ptr(), residual ? residual->const_data_ptr() : nullptr,
                        weight.const_data_ptr(), out.mutable_data_ptr(), h.mutable_data_ptr(), rows, dim,
                        static_cast<float>(eps), stream_of(x)),
               "rms_norm");
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> rope_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                           double theta) {
  check_rope_args(q, k, positions, theta);
  const DeviceGuard guard(q);
  const at::Tensor device_positions = to_device(positions, q);
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  RopeCacheArgs a = rope_cache_args(k, nullptr, nullptr, nullptr, nullptr);
  a.k_out = k_out.mutable_data_ptr();
  add_rope(a, q, q_out, device_positions.const_data_ptr<int64_t>(), theta);
  check_launch(rope_cache_write(dtype_of(q), a, stream_of(q)), "rope");
  return {q_out, k_out};
}

void cache_write_op(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& cache_rows) {
  check_cache_write_args(k, v, k_cache, v_cache, cache_rows);
  const DeviceGuard guard(k);
  const at::Tensor rows = to_device(cache_rows, k);
  const RopeCacheArgs a = rope_cache_args(k, &v, &k_cache, &v_cache, rows.const_data_ptr<int64_t>());
  check_launch(rope_cache_write(dtype_of(k), a, stream_of(k)), "cache_write");
}

at::Tensor rope_cache_write_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                               at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& cache_rows,
                               double theta) {
  check_rope_cache_write_args(q, k, v, k_cache, v_cache, positions, cache_rows, theta);
  const DeviceGuard guard(q);
  const at::Tensor device_positions = to_device(positions, q), rows = to_device(cache_rows, q);
  at::Tensor q_out = at::empty_like(q);
  RopeCacheArgs a = rope_cache_args(k, &v, &k_cache, &v_cache, rows.const_data_ptr<int64_t>());
  add_rope(a, q, q_out, device_positions.const_data_ptr<int64_t>(), theta);
  check_launch(rope_cache_write(dtype_of(q), a, stream_of(q)), "rope_cache_write");
  return q_out;
}

at::Tensor silu_mul_op(const at::Tensor& x) {
  check_silu_mul_args(x);
  const DeviceGuard guard(x);
  const int64_t hidden = x.size(-1) / 2;
  auto shape = x.sizes().vec();
  shape.back() = hidden;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t rows = hidden == 0 ? 0 : x.numel() / (2 * hidden);
  check_launch(silu_mul(dtype_of(x), x.const_data_ptr(), out.mutable_data_ptr(), rows, hidden, stream_of(x)),
               "silu_mul");
  return out;
}

at::Tensor dense_linear_op(const at::Tensor& x, const at::Tensor& weight) {
  check_dense_linear_args(x, weight);
  const DeviceGuard guard(x);
  const int64_t tokens = x.size(0), k = x.size(1), n = weight.size(0);
  at::Tensor y = at::empty({tokens, n}, x.options());
  if (k == 0) return y.zero_();
  check_launch(dense_linear(dtype_of(x), dtype_of(weight), x.const_data_ptr(), weight.const_data_ptr(),
                            y.mutable_data_ptr(), tokens, n, k, stream_of(x)),
               "dense_linear");
  return y;
}

at::Tensor quant_linear_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& mins) {
  check_quant_linear_args(x, qweight, scales, mins);
  const DeviceGuard guard(x);
  const int64_t tokens = x.size(0);
  at::Tensor y = at::empty({tokens, qweight.size(0)}, x.options());
  check_launch(quant_linear(dtype_of(x), x.const_data_ptr(), quant_matrix(qweight, scales, mins), y.mutable_data_ptr(),
                            tokens, stream_of(x)),
               "quant_linear");
  return y;
}

at::Tensor quant_embedding_op(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                              const std::optional<at::Tensor>& mins, at::ScalarType dtype) {
  check_quant_embedding_args(ids, qweight, scales, mins, dtype);
  const DeviceGuard guard(qweight);
  const QuantMatrix w = quant_matrix(qweight, scales, mins);
  at::Tensor out = at::empty({ids.size(0), w.cols}, qweight.options().dtype(dtype));
  const at::Tensor device_ids = to_device(ids, qweight);
  check_launch(quant_embedding(dtype_of(out), device_ids.const_data_ptr<int64_t>(), w, out.mutable_data_ptr(),
                               ids.size(0), stream_of(qweight)),
               "quant_embedding");
  return out;
}

// Split-KV decode: the ranges are sized so that about two blocks per multiprocessor run even at batch 1
// (attention_decode_splits), planned for the most keys a query can see in this cache rather than for the positions,
// so that the launch reads nothing from the host and one captured graph serves every context.
at::Tensor attention_decode_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& positions, std::optional<int64_t> window) {
  const char* op = "attention_decode";
  check_attention_decode_args(q, k_cache, v_cache, positions, window);
  check_head_dim(op, q.size(2));
  check_aligned16(op, "q", q);
  check_aligned16(op, "k_cache", k_cache);
  check_aligned16(op, "v_cache", v_cache);
  const DeviceGuard guard(q);
  at::Tensor out = at::empty_like(q);
  AttentionArgs a = attention_args(q, k_cache, v_cache, window, out);
  if (a.batch == 0) return out;
  const int64_t max_keys = window ? *window : a.slots;
  const auto [splits, split_len] =
      attention_decode_splits(max_keys, a.batch, a.q_heads, a.kv_heads, multiprocessors(q));
  const auto fp32 = q.options().dtype(at::kFloat);
  at::Tensor partial_out = at::empty({a.batch, a.q_heads, splits, a.head_dim}, fp32);
  at::Tensor partial_lse = at::empty({a.batch, a.q_heads, splits}, fp32);
  const at::Tensor device_positions = to_device(positions, q);
  check_launch(attention_decode(dtype_of(q), a, device_positions.const_data_ptr<int64_t>(), splits, split_len,
                                partial_out.mutable_data_ptr<float>(), partial_lse.mutable_data_ptr<float>(),
                                stream_of(q)),
               op);
  return out;
}

// The blocks find their runs of tokens on the device (attention_prefill): the launch reads no index value, so
// seq_lens and start_pos made once per step (StepMetadata.chunks) serve every layer without an upload.
at::Tensor attention_prefill_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                const at::Tensor& start_pos, std::optional<int64_t> window) {
  const char* op = "attention_prefill";
  check_attention_prefill_args(q, k, v, k_cache, v_cache, seq_lens, start_pos, window);
  check_head_dim(op, q.size(2));
  check_aligned16(op, "q", q);
  check_aligned16(op, "k", k);
  check_aligned16(op, "v", v);
  check_aligned16(op, "k_cache", k_cache);
  check_aligned16(op, "v_cache", v_cache);
  const int64_t group = q.size(1) / k_cache.size(2);
  TORCH_CHECK_VALUE(attention_prefill_tokens_per_block(group) > 0, "mistral_ext.attention_prefill: the CUDA kernel ",
                    "takes at most 63 query heads per KV head, got ", group);
  const DeviceGuard guard(q);
  const int64_t smem = static_cast<int64_t>(attention_prefill_smem_bytes(dtype_of(q), q.size(2)));
  TORCH_CHECK_VALUE(smem <= max_smem_per_block(q), "mistral_ext.attention_prefill: ", q.scalar_type(),
                    " with head_dim ", q.size(2), " needs ", smem / 1024, " KiB of shared memory per block but this ",
                    "GPU allows ", max_smem_per_block(q) / 1024, " KiB; use bfloat16 or float16");
  at::Tensor out = at::empty_like(q);
  AttentionArgs a = attention_args(q, k_cache, v_cache, window, out);
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  const at::Tensor device_seq_lens = to_device(seq_lens, q), device_start_pos = to_device(start_pos, q);
  check_launch(attention_prefill(dtype_of(q), a, device_seq_lens.const_data_ptr<int64_t>(),
                                 device_start_pos.const_data_ptr<int64_t>(), q.size(0), stream_of(q)),
               op);
  return out;
}

}  // namespace mistral_ext::MX_KERNEL_NS
