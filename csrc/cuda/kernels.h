// The torch-free entry points of the CUDA kernels: raw pointers, sizes and a stream. The same sources build twice:
// with nvcc into mistral_ext::cuda (the GPU kernels), and with g++ under the emulator into mistral_ext::emu (the
// CPU-emulated kernels that CI checks against the reference). The .cpp launchers check tensors and call these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#ifdef MISTRAL_EXT_EMULATE
#define MX_KERNEL_NS emu_kernels
#else
#define MX_KERNEL_NS cuda
#endif

namespace mistral_ext::MX_KERNEL_NS {

enum class DType { f32, f16, bf16 };

// out = rms_norm(h) * weight with h = x + residual (residual may be null); h is written too. [rows, dim].
cudaError_t rms_norm(DType dtype, const void* x, const void* residual, const void* weight, void* out, void* h,
                     int64_t rows, int64_t dim, float eps, cudaStream_t stream);

// One pass over T tokens: q [T, Hq, D] and k [T, Hkv, D] rotated by RoPE at positions[t] (when theta > 0), q into
// q_out (when not null), k into k_out (when not null), and k (rotated) and v [T, Hkv, D] into ring row
// cache_rows[t] of k_cache/v_cache [ring_rows, Hkv, D] (when cache_rows is not null; a row outside [0, ring_rows)
// is not written).
struct RopeCacheArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* q_out = nullptr;
  void* k_out = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* positions = nullptr;
  const int64_t* cache_rows = nullptr;
  int64_t ring_rows = 0;
  int64_t tokens = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  double theta = 0;  // 0: no rotation
};
cudaError_t rope_cache_write(DType dtype, const RopeCacheArgs& args, cudaStream_t stream);

// out [rows, hidden] = silu(x[:, :hidden]) * x[:, hidden:]
cudaError_t silu_mul(DType dtype, const void* x, void* out, int64_t rows, int64_t hidden, cudaStream_t stream);

// y [T, N] = x [T, K] @ W.T, x and y in x_dtype, W [N, K] in w_dtype, fp32 accumulation; row t of y depends on
// x[t] alone, bit for bit. K == 0 is the caller's (y is not written); T at most 8 * 65535.
cudaError_t dense_linear(DType x_dtype, DType w_dtype, const void* x, const void* w, void* y, int64_t tokens,
                         int64_t n, int64_t k, cudaStream_t stream);

// Windowed GQA attention over ring caches k_cache/v_cache [B, S, Hkv, D] (position p in slot p % S); a query at
// position i sees keys j with i - W < j <= i (window <= 0: no window). head_dim 64 or 128.
struct AttentionArgs {
  const void* q = nullptr;  // [T, Hq, D]
  const void* k = nullptr;  // prefill: the chunk's own keys and values [T, Hkv, D]
  const void* v = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* out = nullptr;  // [T, Hq, D]
  int64_t batch = 0, slots = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t window = 0;
};

// Decode: one query per sequence at positions[b] (device), whose key is already in the ring. Split-KV: the
// min(pos + 1, W) valid keys are cut into `splits` ranges of `split_len` keys (ranges past them exit at once, so a
// plan made for the cache's size serves every position), each block serves all query heads of a GQA group over
// one range; `partial_out` [B, Hq, splits, D] and `partial_lse` [B, Hq, splits] (fp32) are then
// merged by log-sum-exp in a second launch.
// Query heads one decode block serves: the group rounded up to 1, 2, 4 or 8 (larger groups take several blocks).
int64_t attention_decode_heads_per_block(int64_t group);
// The split-KV plan for `max_keys` valid keys (the launcher passes the most a query can see in its cache) on a GPU with `multiprocessors` SMs: ranges of
// a multiple of 64 keys, at most 512 (the kernel's shared-memory bound), as many as give about two blocks per SM
// (never more than one per 64 keys). The launcher's choice, named so that tests can see which branch a case takes.
struct DecodeSplits {
  int64_t splits, split_len;
};
DecodeSplits attention_decode_splits(int64_t max_keys, int64_t batch, int64_t q_heads, int64_t kv_heads,
                                     int64_t multiprocessors);
cudaError_t attention_decode(DType dtype, const AttentionArgs& args, const int64_t* positions, int64_t splits,
                             int64_t split_len, float* partial_out, float* partial_lse, cudaStream_t stream);

// Prefill: packed chunks, sequence b bringing seq_lens[b] tokens from position start_pos[b] (both on the device).
// A block takes a run of consecutive tokens of one sequence, each with all query heads of a GQA group (tokens *
// group <= 64 rows); the blocks of sequence b follow those of b - 1, and each finds its own run from seq_lens, so
// the host plans nothing but the grid: attention_prefill_blocks(tokens, batch, group) blocks, enough for any
// layout of `tokens` tokens over `batch` sequences (those past the last run exit at once). Keys before the chunk's
// start position come from the ring, the chunk's own keys from k/v (the ring does not hold them yet).
int64_t attention_prefill_tokens_per_block(int64_t group);
int64_t attention_prefill_blocks(int64_t tokens, int64_t batch, int64_t group);
size_t attention_prefill_smem_bytes(DType dtype, int64_t head_dim);
cudaError_t attention_prefill(DType dtype, const AttentionArgs& args, const int64_t* seq_lens,
                              const int64_t* start_pos, int64_t tokens, cudaStream_t stream);

// A quantized matrix [rows, cols] in the layout of mistral_ext/quant.py: q8_0 (int8 qweight [N, K]), q4_0 and
// q4_1 (uint8 [N, K/2], GGUF's nibble order); fp16 scales (and q4_1's mins) [N, K/32]; rows interleaved by 8.
enum class QuantFormat { q8_0, q4_0, q4_1 };
struct QuantMatrix {
  QuantFormat format = QuantFormat::q8_0;
  const void* qweight = nullptr;
  const void* scales = nullptr;
  const void* mins = nullptr;  // q4_1 only
  int64_t rows = 0, cols = 0;
};

// y [T, N] = x [T, K] @ W.T with x and y in `dtype`: float activations, fp32 accumulation; row t of y depends on
// x[t] alone, bit for bit.
cudaError_t quant_linear(DType dtype, const void* x, const QuantMatrix& w, void* y, int64_t tokens,
                         cudaStream_t stream);
// out [T, K] = rows ids[t] (device; NaN for an id outside [0, N)) of W dequantized as mistral_ext.quant.dequantize
// does (fp32, no fused multiply-add), rounded to `dtype`.
cudaError_t quant_embedding(DType dtype, const int64_t* ids, const QuantMatrix& w, void* out, int64_t tokens,
                            cudaStream_t stream);

}  // namespace mistral_ext::MX_KERNEL_NS
