// Windowed GQA attention over the ring buffer.
//
// attention_decode (flash-decoding): grid (splits, KV heads x head chunks, batch). A block serves up to 8 query
// heads of one GQA group, so each K/V element is read from memory once per group, over one range of the
// min64(pos + 1, W) valid keys; only valid ring slots are read, with 16-byte loads (a key row is split over D/V
// lanes). Scores go to shared memory, the range's softmax and P.V are exact; a second launch merges the ranges
// by log-sum-exp.
//
// attention_prefill: a block takes 64 query rows, packed as (token, head of the GQA group) pairs, and walks 64-key
// tiles from the first key in the earliest row's window to the last row's position: O(N W) work. S = Q K^T and
// O += P V use WMMA for bf16/fp16 (a scalar loop for fp32); S, P and O are staged in shared memory, so the
// online softmax never depends on the fragment layout.
#include <cfloat>

#include "cuda/device_math.h"
#include "max_position.h"

namespace mistral_ext::MX_KERNEL_NS {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplitLen = 512;

__device__ __forceinline__ int64_t ring_row(int64_t b, int64_t slots, int64_t kv_heads, int64_t p, int64_t head) {
  return ((b * slots + p % slots) * kv_heads + head);
}

// ---------------- decode ----------------

template <typename T, int D, int GP>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(AttentionArgs a, const int64_t* __restrict__ positions,
                                                                int64_t split_len, float* __restrict__ part_out,
                                                                float* __restrict__ part_lse) {
  constexpr int V = Vec<T>::kSize;
  constexpr int LPK = D / V;         // lanes per key row
  constexpr int KPW = 32 / LPK;      // keys per warp step
  constexpr int KPB = KPW * kWarps;  // keys per block step
  MX_DYNAMIC_SMEM(smem);
  float* scores = reinterpret_cast<float*>(smem);                 // [GP][split_len]
  float* reduce = scores + GP * split_len;                        // [kWarps][GP][D]
  float* stats = reduce + kWarps * GP * D;                        // [GP][2]: max, sum

  const int64_t split = blockIdx.x, splits = gridDim.x, b = blockIdx.z;
  const int64_t group = a.q_heads / a.kv_heads, chunks = (group + GP - 1) / GP;
  const int64_t kvh = blockIdx.y / chunks, g0 = (blockIdx.y % chunks) * GP;
  const int heads_here = static_cast<int>(min64(static_cast<int64_t>(GP), group - g0));
  const int64_t pos = positions[b];
  const int64_t n_valid = a.window > 0 ? min64(pos + 1, a.window) : pos + 1;
  const int64_t first = pos - n_valid + 1;  // position of key 0
  const int64_t begin = split * split_len, end = min64(begin + split_len, n_valid);
  const int64_t out_row = b * a.q_heads + kvh * group + g0;  // first query head of this block

  if (pos < 0 || (a.window <= 0 && pos >= a.slots) || begin >= end) {  // nothing to read in this range
    for (int i = threadIdx.x; i < GP * D; i += kThreads) {
      const int g = i / D;
      if (g < heads_here) part_out[((out_row + g) * splits + split) * D + i % D] = 0.0f;
    }
    if (static_cast<int>(threadIdx.x) < heads_here) part_lse[(out_row + threadIdx.x) * splits + split] = -INFINITY;
    return;
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane / LPK, part = lane % LPK;
  const T* q = static_cast<const T*>(a.q) + out_row * D + part * V;
  const float scale = rsqrtf(static_cast<float>(D));
  float qf[GP][V];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    const Vec<T> qv = load_vec(q + min64(g, heads_here - 1) * D);  // heads past the group repeat the last one
#pragma unroll
    for (int e = 0; e < V; ++e) qf[g][e] = to_float(qv.v[e]) * scale;
  }
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);

  // 1. scores of this range's keys
  for (int64_t j0 = begin; j0 < end; j0 += KPB) {
    const int64_t j = j0 + warp * KPW + sub;
    float s[GP];
#pragma unroll
    for (int g = 0; g < GP; ++g) s[g] = 0.0f;
    if (j < end) {
      const Vec<T> kv = load_vec(k_cache + ring_row(b, a.slots, a.kv_heads, first + j, kvh) * D + part * V);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float kf = to_float(kv.v[e]);
#pragma unroll
        for (int g = 0; g < GP; ++g) s[g] += qf[g][e] * kf;
      }
    }
#pragma unroll
    for (int g = 0; g < GP; ++g) {
#pragma unroll
      for (int offset = LPK / 2; offset > 0; offset /= 2) s[g] += __shfl_xor_sync(0xffffffffu, s[g], offset);
    }
    if (j < end && part == 0) {
#pragma unroll
      for (int g = 0; g < GP; ++g) scores[g * split_len + (j - begin)] = s[g];
    }
  }
  __syncthreads();

  // 2. softmax statistics per head; scores become probabilities (unnormalised)
  const int n = static_cast<int>(end - begin);
  for (int g = warp; g < GP; g += kWarps) {
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, scores[g * split_len + i]);
    m = warp_max(m);
    float l = 0.0f;
    for (int i = lane; i < n; i += 32) {
      const float p = __expf(scores[g * split_len + i] - m);
      scores[g * split_len + i] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      stats[g * 2] = m;
      stats[g * 2 + 1] = l;
    }
  }
  __syncthreads();

  // 3. P.V over the same keys, then across the warp's key lanes and across warps
  float acc[GP][V];
#pragma unroll
  for (int g = 0; g < GP; ++g)
#pragma unroll
    for (int e = 0; e < V; ++e) acc[g][e] = 0.0f;
  for (int64_t j0 = begin; j0 < end; j0 += KPB) {
    const int64_t j = j0 + warp * KPW + sub;
    if (j < end) {
      const Vec<T> vv = load_vec(v_cache + ring_row(b, a.slots, a.kv_heads, first + j, kvh) * D + part * V);
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        const float p = scores[g * split_len + (j - begin)];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[g][e] += p * to_float(vv.v[e]);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GP; ++g)
#pragma unroll
    for (int e = 0; e < V; ++e)
#pragma unroll
      for (int offset = 16; offset >= LPK; offset /= 2) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < GP; ++g)
#pragma unroll
      for (int e = 0; e < V; ++e) reduce[(warp * GP + g) * D + part * V + e] = acc[g][e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < GP * D; i += kThreads) {
    const int g = i / D;
    if (g >= heads_here) continue;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += reduce[w * GP * D + i];
    part_out[((out_row + g) * splits + split) * D + i % D] = o / stats[g * 2 + 1];
  }
  if (static_cast<int>(threadIdx.x) < heads_here)
    part_lse[(out_row + threadIdx.x) * splits + split] = stats[threadIdx.x * 2] + logf(stats[threadIdx.x * 2 + 1]);
}

// out[b, h] = sum over splits of exp(lse_s - lse) * out_s, lse = log sum exp(lse_s). One block per (b, h).
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(const float* __restrict__ part_out,
                                                         const float* __restrict__ part_lse, T* __restrict__ out,
                                                         int64_t splits) {
  const int64_t row = blockIdx.x;
  const float* lse = part_lse + row * splits;
  float m = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) m = fmaxf(m, lse[s]);
  float total = 0.0f, o = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    if (lse[s] == -INFINITY) continue;
    const float w = __expf(lse[s] - m);
    total += w;
    o += w * part_out[(row * splits + s) * D + threadIdx.x];
  }
  // No valid key at all (an out-of-range position): NaN, never a plausible-looking value.
  out[row * D + threadIdx.x] = from_float<T>(total > 0.0f ? o / total : NAN);
}

template <typename T, int D, int GP>
cudaError_t launch_decode(const AttentionArgs& a, const int64_t* positions, int64_t splits, int64_t split_len,
                          float* part_out, float* part_lse, cudaStream_t stream) {
  const int64_t chunks = (a.q_heads / a.kv_heads + GP - 1) / GP;
  const size_t smem = sizeof(float) * (GP * split_len + kWarps * GP * D + 2 * GP);
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(a.kv_heads * chunks),
                  static_cast<unsigned>(a.batch));
  MX_LAUNCH(grid, dim3(kThreads), smem, stream, decode_split_kernel<T, D, GP>)(a, positions, split_len, part_out,
                                                                               part_lse);
  MX_LAUNCH(dim3(static_cast<unsigned>(a.batch * a.q_heads)), dim3(D), 0, stream, decode_merge_kernel<T, D>)(
      part_out, part_lse, static_cast<T*>(a.out), splits);
  return MX_LAST_ERROR();
}

template <typename T, int D>
cudaError_t decode_by_group(const AttentionArgs& a, const int64_t* positions, int64_t splits, int64_t split_len,
                            float* part_out, float* part_lse, cudaStream_t stream) {
  switch (attention_decode_heads_per_block(a.q_heads / a.kv_heads)) {
    case 1:
      return launch_decode<T, D, 1>(a, positions, splits, split_len, part_out, part_lse, stream);
    case 2:
      return launch_decode<T, D, 2>(a, positions, splits, split_len, part_out, part_lse, stream);
    case 4:
      return launch_decode<T, D, 4>(a, positions, splits, split_len, part_out, part_lse, stream);
    default:
      return launch_decode<T, D, 8>(a, positions, splits, split_len, part_out, part_lse, stream);
  }
}

// ---------------- prefill ----------------

constexpr int kRows = 64;  // query rows per block: (token, head) pairs
constexpr int kKeys = 64;  // keys per tile

template <typename T, int D>
struct PrefillSmem {
  static constexpr int kLd = D + 8;          // Q/K/V tiles (T), padded against bank conflicts
  static constexpr int kLdS = kKeys + 4;     // S (float)
  static constexpr int kLdP = kKeys + 8;     // P (T)
  static constexpr int kLdO = D + 4;         // O (float)
  static constexpr size_t q = 0;
  static constexpr size_t k = q + sizeof(T) * kRows * kLd;
  static constexpr size_t v = k + sizeof(T) * kKeys * kLd;
  static constexpr size_t s = v + sizeof(T) * kKeys * kLd;
  static constexpr size_t p = s + sizeof(float) * kRows * kLdS;
  static constexpr size_t o = p + sizeof(T) * kRows * kLdP;
  static constexpr size_t stats = o + sizeof(float) * kRows * kLdO;  // max, sum, rescale per row
  static constexpr size_t bytes = stats + sizeof(float) * 3 * kRows;
};

// One warp: S[16 rows of the warp][64 keys] = Q K^T (unscaled).
template <typename T, int D>
__device__ __forceinline__ void warp_scores(const T* qs, const T* ks, float* ss, int warp) {
  using L = PrefillSmem<T, D>;
  if constexpr (std::is_same_v<T, float>) {
    const int lane = threadIdx.x % 32;
    for (int i = lane; i < 16 * kKeys; i += 32) {
      const int r = warp * 16 + i / kKeys, c = i % kKeys;
      float acc = 0.0f;
      for (int d = 0; d < D; ++d) acc += qs[r * L::kLd + d] * ks[c * L::kLd + d];
      ss[r * L::kLdS + c] = acc;
    }
  } else {
    using namespace nvcuda;
    for (int nt = 0; nt < kKeys / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, qs + warp * 16 * L::kLd + kk * 16, L::kLd);
        wmma::load_matrix_sync(fb, ks + nt * 16 * L::kLd + kk * 16, L::kLd);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(ss + warp * 16 * L::kLdS + nt * 16, acc, L::kLdS, wmma::mem_row_major);
    }
  }
}

// One warp: O[16 rows][D] += P[16 rows][64 keys] V[64 keys][D].
template <typename T, int D>
__device__ __forceinline__ void warp_pv(const T* ps, const T* vs, float* os, int warp) {
  using L = PrefillSmem<T, D>;
  if constexpr (std::is_same_v<T, float>) {
    const int lane = threadIdx.x % 32;
    for (int i = lane; i < 16 * D; i += 32) {
      const int r = warp * 16 + i / D, d = i % D;
      float acc = 0.0f;
      for (int c = 0; c < kKeys; ++c) acc += ps[r * L::kLdP + c] * vs[c * L::kLd + d];
      os[r * L::kLdO + d] += acc;
    }
  } else {
    using namespace nvcuda;
    for (int dt = 0; dt < D / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* o_tile = os + warp * 16 * L::kLdO + dt * 16;
      wmma::load_matrix_sync(acc, o_tile, L::kLdO, wmma::mem_row_major);
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, ps + warp * 16 * L::kLdP + kk * 16, L::kLdP);
        wmma::load_matrix_sync(fb, vs + kk * 16 * L::kLd + dt * 16, L::kLd);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(o_tile, acc, L::kLdO, wmma::mem_row_major);
    }
  }
}

// A run of `tokens` consecutive tokens of sequence `batch_index`, the first at packed index first_token and position
// first_position; its sequence's chunk starts at packed index chunk_offset and position chunk_start.
struct PrefillBlock {
  int64_t batch_index, first_token, first_position, tokens, chunk_offset, chunk_start;
};

// Block `index` of the step: sequence b's ceil(seq_lens[b] / per_block) blocks follow those of b - 1. False past the
// last block, and for values the host would have refused (device values are not checked there): then the block
// reads and writes nothing, and, without a window, never walks more keys than the cache holds.
__device__ bool find_prefill_block(const AttentionArgs& a, const int64_t* __restrict__ seq_lens,
                                   const int64_t* __restrict__ start_pos, int64_t tokens, int64_t per_block,
                                   int64_t index, PrefillBlock& blk) {
  int64_t offset = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t n = seq_lens[b];
    if (n < 0 || n > tokens - offset) return false;
    const int64_t blocks = (n + per_block - 1) / per_block;
    if (index < blocks) {
      const int64_t p = start_pos[b], t = index * per_block;
      if (p < 0 || p > (a.window > 0 ? kMaxPosition : a.slots)) return false;
      blk = {b, offset + t, p + t, min64(per_block, n - t), offset, p};
      return true;
    }
    index -= blocks;
    offset += n;
  }
  return false;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefill_kernel(AttentionArgs a, const int64_t* __restrict__ seq_lens,
                                                           const int64_t* __restrict__ start_pos, int64_t tokens) {
  using L = PrefillSmem<T, D>;
  constexpr int V = Vec<T>::kSize;
  MX_DYNAMIC_SMEM(smem);
  T* qs = reinterpret_cast<T*>(smem + L::q);
  T* ks = reinterpret_cast<T*>(smem + L::k);
  T* vs = reinterpret_cast<T*>(smem + L::v);
  float* ss = reinterpret_cast<float*>(smem + L::s);
  T* ps = reinterpret_cast<T*>(smem + L::p);
  float* os = reinterpret_cast<float*>(smem + L::o);
  float* row_max = reinterpret_cast<float*>(smem + L::stats);
  float* row_sum = row_max + kRows;
  float* row_scale = row_sum + kRows;

  const int64_t kvh = blockIdx.y, group = a.q_heads / a.kv_heads;
  PrefillBlock blk;
  if (!find_prefill_block(a, seq_lens, start_pos, tokens, kRows / group, blockIdx.x, blk)) return;
  const int64_t b = blk.batch_index;
  const int rows = static_cast<int>(blk.tokens * group);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(a.q);
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
  const T* k_new = static_cast<const T*>(a.k);
  const T* v_new = static_cast<const T*>(a.v);

  // Q rows (token-major, head-minor), zero beyond `rows`; O = 0; softmax state empty.
  for (int i = threadIdx.x; i < kRows * (D / V); i += kThreads) {
    const int r = i / (D / V), d = (i % (D / V)) * V;
    Vec<T> x;
    if (r < rows) {
      x = load_vec(q + ((blk.first_token + r / group) * a.q_heads + kvh * group + r % group) * D + d);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) x.v[e] = from_float<T>(0.0f);
    }
    store_vec(qs + r * L::kLd + d, x);
  }
  for (int i = threadIdx.x; i < kRows * D; i += kThreads) os[(i / D) * L::kLdO + i % D] = 0.0f;
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
  }

  const int64_t first_pos = blk.first_position, last_pos = first_pos + blk.tokens - 1;
  const int64_t lo = a.window > 0 ? max64(0, first_pos - a.window + 1) : 0;
  const float scale = rsqrtf(static_cast<float>(D));
  for (int64_t j0 = lo; j0 <= last_pos; j0 += kKeys) {
    __syncthreads();  // the previous tile's K/V/P are no longer read; Q/O/state are initialised
    for (int i = threadIdx.x; i < kKeys * (D / V); i += kThreads) {
      const int c = i / (D / V), d = (i % (D / V)) * V;
      const int64_t j = j0 + c;
      Vec<T> kx, vx;
      if (j <= last_pos) {
        const T* kp;
        const T* vp;
        if (j < blk.chunk_start) {
          const int64_t row = ring_row(b, a.slots, a.kv_heads, j, kvh) * D;
          kp = k_cache + row;
          vp = v_cache + row;
        } else {
          const int64_t row = ((blk.chunk_offset + j - blk.chunk_start) * a.kv_heads + kvh) * D;
          kp = k_new + row;
          vp = v_new + row;
        }
        kx = load_vec(kp + d);
        vx = load_vec(vp + d);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) kx.v[e] = vx.v[e] = from_float<T>(0.0f);
      }
      store_vec(ks + c * L::kLd + d, kx);
      store_vec(vs + c * L::kLd + d, vx);
    }
    __syncthreads();

    warp_scores<T, D>(qs, ks, ss, warp);
    __syncwarp();

    // Online softmax, two lanes per row (32 keys each); each warp owns its 16 rows.
    {
      const int r = warp * 16 + lane / 2, half = lane % 2;
      const int64_t pos = first_pos + r / group;
      const bool row_ok = r < rows;
      const int64_t row_lo = a.window > 0 ? pos - a.window + 1 : 0;
      float s[kKeys / 2];
      float tile_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < kKeys / 2; ++i) {
        const int c = half * (kKeys / 2) + i;
        const int64_t j = j0 + c;
        const bool visible = row_ok && j >= row_lo && j <= pos;
        s[i] = visible ? ss[r * L::kLdS + c] * scale : -INFINITY;
        tile_max = fmaxf(tile_max, s[i]);
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      const float old_max = row_max[r];
      const float new_max = fmaxf(old_max, tile_max);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kKeys / 2; ++i) {
        const float p = s[i] == -INFINITY ? 0.0f : __expf(s[i] - new_max);
        sum += p;
        ps[r * L::kLdP + half * (kKeys / 2) + i] = from_float<T>(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float rescale = old_max == -INFINITY ? 0.0f : __expf(old_max - new_max);
      __syncwarp();  // both lanes of the row have read row_max
      if (half == 0) {
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * rescale + sum;
        row_scale[r] = rescale;
      }
    }
    __syncwarp();
    for (int i = lane; i < 16 * D; i += 32) {
      const int r = warp * 16 + i / D;
      os[r * L::kLdO + i % D] *= row_scale[r];
    }
    __syncwarp();
    warp_pv<T, D>(ps, vs, os, warp);
  }
  __syncthreads();

  T* out = static_cast<T*>(a.out);
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    out[((blk.first_token + r / group) * a.q_heads + kvh * group + r % group) * D + d] =
        from_float<T>(os[r * L::kLdO + d] / row_sum[r]);
  }
}

template <typename T, int D>
cudaError_t launch_prefill(const AttentionArgs& a, const int64_t* seq_lens, const int64_t* start_pos, int64_t tokens,
                           int64_t n_blocks, cudaStream_t stream) {
  constexpr size_t smem = PrefillSmem<T, D>::bytes;
#ifndef MISTRAL_EXT_EMULATE
  const cudaError_t status =
      cudaFuncSetAttribute(prefill_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (status != cudaSuccess) return status;
#endif
  const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>(a.kv_heads));
  MX_LAUNCH(grid, dim3(kThreads), smem, stream, prefill_kernel<T, D>)(a, seq_lens, start_pos, tokens);
  return MX_LAST_ERROR();
}

}  // namespace

int64_t attention_decode_heads_per_block(int64_t group) { return group <= 2 ? group : group <= 4 ? 4 : 8; }

DecodeSplits attention_decode_splits(int64_t max_keys, int64_t batch, int64_t q_heads, int64_t kv_heads,
                                     int64_t multiprocessors) {
  constexpr int64_t kMinSplitLen = 64;
  const int64_t group = q_heads / kv_heads, per_block = attention_decode_heads_per_block(group);
  const int64_t blocks_per_range = batch * kv_heads * ((group + per_block - 1) / per_block);
  const int64_t wanted = (2 * multiprocessors + blocks_per_range - 1) / blocks_per_range;
  int64_t splits = min64(max64(wanted, 1), (max_keys + kMinSplitLen - 1) / kMinSplitLen);
  int64_t split_len = (max_keys + splits - 1) / splits;
  split_len = min64(max64((split_len + kMinSplitLen - 1) / kMinSplitLen * kMinSplitLen, kMinSplitLen), kMaxSplitLen);
  splits = (max_keys + split_len - 1) / split_len;
  return {splits, split_len};
}

cudaError_t attention_decode(DType dtype, const AttentionArgs& args, const int64_t* positions, int64_t splits,
                             int64_t split_len, float* partial_out, float* partial_lse, cudaStream_t stream) {
  if (args.batch == 0 || args.q_heads == 0) return cudaSuccess;
  if (split_len > kMaxSplitLen || (args.head_dim != 64 && args.head_dim != 128)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return args.head_dim == 64
               ? decode_by_group<T, 64>(args, positions, splits, split_len, partial_out, partial_lse, stream)
               : decode_by_group<T, 128>(args, positions, splits, split_len, partial_out, partial_lse, stream);
  });
}

int64_t attention_prefill_tokens_per_block(int64_t group) { return group >= kRows ? 0 : kRows / group; }

// Sequence b takes ceil(n_b / p) <= (n_b + p - 1) / p blocks; summed over the batch, (tokens + batch (p - 1)) / p.
int64_t attention_prefill_blocks(int64_t tokens, int64_t batch, int64_t group) {
  const int64_t p = attention_prefill_tokens_per_block(group);
  return p > 0 ? (tokens + batch * (p - 1)) / p : 0;
}

size_t attention_prefill_smem_bytes(DType dtype, int64_t head_dim) {
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    bytes = head_dim == 64 ? PrefillSmem<T, 64>::bytes : PrefillSmem<T, 128>::bytes;
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t attention_prefill(DType dtype, const AttentionArgs& args, const int64_t* seq_lens,
                              const int64_t* start_pos, int64_t tokens, cudaStream_t stream) {
  const int64_t n_blocks = attention_prefill_blocks(tokens, args.batch, args.q_heads / max64(args.kv_heads, 1));
  if (n_blocks == 0 || args.kv_heads == 0) return cudaSuccess;
  if (args.head_dim != 64 && args.head_dim != 128) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return args.head_dim == 64 ? launch_prefill<T, 64>(args, seq_lens, start_pos, tokens, n_blocks, stream)
                               : launch_prefill<T, 128>(args, seq_lens, start_pos, tokens, n_blocks, stream);
  });
}

}  // namespace mistral_ext::MX_KERNEL_NS
