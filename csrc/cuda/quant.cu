// quant_linear and quant_embedding for the quantized formats of mistral_ext/quant.py (q8_0, q4_0, q4_1; rows
// interleaved in groups of 8, 4 bytes of each row side by side).
//
// quant_linear keeps the activations in float (no int8 rounding, unlike the CPU kernel): one block of kThreads
// threads per group of 8 rows, the threads splitting K. A 16-byte load holds one 4-byte chunk of 4 rows, so a
// block of a whole group is 16 (q8_0) or 8 (q4) loads, contiguous across threads; each thread keeps the same
// chunk and the same 4 rows for every block it reads, and multiplies each load with a tile of up to kTokenTile
// tokens. Per (row, token) the arithmetic is fixed by N and K alone: each thread sums its blocks in order with
// explicit fmaf, and the threads' partials are added by a tree in shared memory in a fixed order, so a token's
// result is the same bit for bit whatever the other tokens of the call and however the threads are scheduled.
//
// quant_embedding dequantizes rows exactly as mistral_ext.quant.dequantize does: in fp32, d * q (q4_1: d * q + m),
// then rounded to the output dtype. d * q is exact in fp32 (11 bits of fp16 mantissa times at most 8), so a fused
// q4_1 d * q + m would round the same; __fmul_rn/__fadd_rn say that no fusion is meant.
#include "cuda/device_math.h"

namespace mistral_ext::MX_KERNEL_NS {
namespace {

constexpr int kBlock = 32;   // weights per scale
constexpr int kGroup = 8;    // rows interleaved together
constexpr int kChunk = 4;    // bytes of one row side by side
constexpr int kThreads = 128;
constexpr int kTokenTile = 8;
constexpr int kRowsPerLoad = 16 / kChunk;
constexpr int kPartials = kRowsPerLoad * kTokenTile;  // one thread's sums of a tile
constexpr int kPartialStride = kPartials + 1;         // padded: threads write their partials to different banks

template <QuantFormat F>
constexpr int kBlockBytes = F == QuantFormat::q8_0 ? kBlock : kBlock / 2;  // of one row
template <QuantFormat F>
constexpr int kChunks = kBlockBytes<F> / kChunk;
template <QuantFormat F>
constexpr int kLoadsPerBlock = kChunks<F> * kGroup / kRowsPerLoad;  // 16-byte loads per block of a whole group
template <QuantFormat F>
constexpr int kValues = F == QuantFormat::q8_0 ? kChunk : 2 * kChunk;  // values of one row in a 4-byte chunk

// The rows [8 g, 8 g + rows) of a quantized matrix with `blocks` blocks per row.
template <QuantFormat F>
struct Group {
  const uint8_t* w;  // [block][chunk][row][4 bytes]
  const __half* d;   // [block][row]
  const __half* m;   // q4_1 only
  int rows;

  __device__ Group(const QuantMatrix& q, int64_t g, int64_t blocks) {
    const int64_t first = g * kGroup;
    w = static_cast<const uint8_t*>(q.qweight) + first * blocks * kBlockBytes<F>;
    d = static_cast<const __half*>(q.scales) + first * blocks;
    m = F == QuantFormat::q4_1 ? static_cast<const __half*>(q.mins) + first * blocks : nullptr;
    rows = static_cast<int>(min64(kGroup, q.rows - first));
  }

  __device__ const uint8_t* chunk(int64_t b, int c, int row) const {
    return w + ((b * kChunks<F> + c) * rows + row) * kChunk;
  }
};

// Chunk c of block b of rows 4 h .. 4 h + 3, one 32-bit word per row (0 for rows past the group's end).
template <QuantFormat F, bool kVector>
__device__ __forceinline__ void load_chunk(const Group<F>& g, int64_t b, int c, int h, uint32_t (&word)[kRowsPerLoad]) {
  if (kVector && g.rows == kGroup) {
    const Vec<uint32_t> v = load_vec(reinterpret_cast<const uint32_t*>(g.chunk(b, c, kRowsPerLoad * h)));
#pragma unroll
    for (int r = 0; r < kRowsPerLoad; ++r) word[r] = v.v[r];
    return;
  }
#pragma unroll
  for (int r = 0; r < kRowsPerLoad; ++r) {
    const int row = kRowsPerLoad * h + r;
    word[r] = 0;
    if (row < g.rows) {
      const uint8_t* p = g.chunk(b, c, row);
      word[r] = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
    }
  }
}

// The values of one row in a chunk word, as the weights' integer factor: q8_0 its 4 int8 (elements 4c..4c+3 of
// the block); q4 the 4 low nibbles (elements 4c..) then the 4 high ones (16 + 4c..), minus 8 for q4_0.
template <QuantFormat F>
__device__ __forceinline__ void decode(uint32_t word, float (&q)[kValues<F>]) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const uint32_t byte = (word >> (8 * i)) & 0xFFu;
    if constexpr (F == QuantFormat::q8_0) {
      q[i] = static_cast<float>(static_cast<int8_t>(byte));
    } else {
      const int offset = F == QuantFormat::q4_0 ? 8 : 0;
      q[i] = static_cast<float>(static_cast<int>(byte & 0x0Fu) - offset);
      q[kChunk + i] = static_cast<float>(static_cast<int>(byte >> 4) - offset);
    }
  }
}

template <typename T, QuantFormat F, bool kVector>
__global__ void __launch_bounds__(kThreads) quant_linear_kernel(const T* __restrict__ x, QuantMatrix q,
                                                                T* __restrict__ y, int64_t tokens) {
  MX_DYNAMIC_SMEM(smem);
  float* partial = reinterpret_cast<float*>(smem);  // [kThreads][kPartialStride]
  const int tid = threadIdx.x;
  const int slot = tid % kLoadsPerBlock<F>, c = slot / 2, h = slot % 2;
  constexpr int kBlockStride = kThreads / kLoadsPerBlock<F>;
  const int64_t k = q.cols, n = q.rows, blocks = k / kBlock;
  const int64_t groups = (n + kGroup - 1) / kGroup, tiles = (tokens + kTokenTile - 1) / kTokenTile;
  for (int64_t gi = blockIdx.y; gi < groups; gi += gridDim.y) {
    const Group<F> g(q, gi, blocks);
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t t0 = tile * kTokenTile;
      const int nt = static_cast<int>(min64(kTokenTile, tokens - t0));
      float acc[kRowsPerLoad][kTokenTile] = {};
      for (int64_t b = tid / kLoadsPerBlock<F>; b < blocks; b += kBlockStride) {
        uint32_t word[kRowsPerLoad];
        load_chunk<F, kVector>(g, b, c, h, word);
        float d[kRowsPerLoad], mn[kRowsPerLoad];
#pragma unroll
        for (int r = 0; r < kRowsPerLoad; ++r) {
          const int row = kRowsPerLoad * h + r;
          d[r] = row < g.rows ? to_float(g.d[b * g.rows + row]) : 0.0f;
          mn[r] = F == QuantFormat::q4_1 && row < g.rows ? to_float(g.m[b * g.rows + row]) : 0.0f;
        }
        const int64_t first = b * kBlock + kChunk * c;  // elements first.. (and first + 16.. for q4) of x
#pragma unroll
        for (int t = 0; t < kTokenTile; ++t) {
          if (t >= nt) break;
          const T* xt = x + (t0 + t) * k + first;
          float xv[kValues<F>];
#pragma unroll
          for (int i = 0; i < kValues<F>; ++i) xv[i] = to_float(xt[i < kChunk ? i : kBlock / 2 + i - kChunk]);
          float xsum = 0.0f;
          if constexpr (F == QuantFormat::q4_1) {
#pragma unroll
            for (int i = 0; i < kValues<F>; ++i) xsum += xv[i];
          }
#pragma unroll
          for (int r = 0; r < kRowsPerLoad; ++r) {
            float wq[kValues<F>];  // decoded per token: holding 4 rows' values across the tile would spill
            decode<F>(word[r], wq);
            float p = wq[0] * xv[0];
#pragma unroll
            for (int i = 1; i < kValues<F>; ++i) p = fmaf(wq[i], xv[i], p);
            acc[r][t] = fmaf(d[r], p, acc[r][t]);
            if constexpr (F == QuantFormat::q4_1) acc[r][t] = fmaf(mn[r], xsum, acc[r][t]);
          }
        }
      }
      float* mine = partial + tid * kPartialStride;
#pragma unroll
      for (int r = 0; r < kRowsPerLoad; ++r)
#pragma unroll
        for (int t = 0; t < kTokenTile; ++t) mine[r * kTokenTile + t] = acc[r][t];
      __syncthreads();
      // Threads tid and tid + stride read the same rows (stride is even), so partial[h] ends with rows 4h..4h+3.
      for (int stride = kThreads / 2; stride >= 2; stride /= 2) {
        if (tid < stride) {
          const float* theirs = partial + (tid + stride) * kPartialStride;
          for (int j = 0; j < kPartials; ++j) mine[j] += theirs[j];
        }
        __syncthreads();
      }
      for (int o = tid; o < kGroup * nt; o += kThreads) {
        const int t = o / kGroup, row = o % kGroup;
        if (row < g.rows)
          y[(t0 + t) * n + gi * kGroup + row] =
              from_float<T>(partial[(row / kRowsPerLoad) * kPartialStride + (row % kRowsPerLoad) * kTokenTile + t]);
      }
      __syncthreads();  // the next tile rewrites the partials
    }
  }
}

constexpr int kEmbeddingThreads = 128;

template <typename T, QuantFormat F>
__global__ void __launch_bounds__(kEmbeddingThreads) quant_embedding_kernel(const int64_t* __restrict__ ids,
                                                                            QuantMatrix q, T* __restrict__ out,
                                                                            int64_t tokens) {
  const int64_t k = q.cols, blocks = k / kBlock;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t id = ids[t];
    if (id < 0 || id >= q.rows) {  // unchecked device ids (op_checks.h): a NaN row, never a read outside the table
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) out[t * k + j] = from_float<T>(NAN);
      continue;
    }
    const Group<F> g(q, id / kGroup, blocks);
    const int row = static_cast<int>(id % kGroup);
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const int64_t b = j / kBlock;
      const int e = static_cast<int>(j % kBlock);
      const int byte_index = F == QuantFormat::q8_0 ? e : e % (kBlock / 2);
      const uint8_t byte = g.chunk(b, byte_index / kChunk, row)[byte_index % kChunk];
      const float d = to_float(g.d[b * g.rows + row]);
      float v;
      if constexpr (F == QuantFormat::q8_0) {
        v = __fmul_rn(d, static_cast<float>(static_cast<int8_t>(byte)));
      } else {
        const float value = static_cast<float>(e < kBlock / 2 ? byte & 0x0F : byte >> 4);
        v = F == QuantFormat::q4_0 ? __fmul_rn(d, value - 8.0f)
                                   : __fadd_rn(__fmul_rn(d, value), to_float(g.m[b * g.rows + row]));
      }
      out[t * k + j] = from_float<T>(v);
    }
  }
}

template <typename F>
cudaError_t dispatch_format(QuantFormat format, F&& f) {
  switch (format) {
    case QuantFormat::q8_0:
      return f(std::integral_constant<QuantFormat, QuantFormat::q8_0>{});
    case QuantFormat::q4_0:
      return f(std::integral_constant<QuantFormat, QuantFormat::q4_0>{});
    case QuantFormat::q4_1:
      return f(std::integral_constant<QuantFormat, QuantFormat::q4_1>{});
  }
  return cudaErrorInvalidValue;
}

constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace

cudaError_t quant_linear(DType dtype, const void* x, const QuantMatrix& w, void* y, int64_t tokens,
                         cudaStream_t stream) {
  if (tokens == 0 || w.rows == 0) return cudaSuccess;
  const int64_t groups = (w.rows + kGroup - 1) / kGroup, tiles = (tokens + kTokenTile - 1) / kTokenTile;
  // Tiles along x: the blocks that run together share a group, whose weights stay in L2 while its tiles pass.
  const dim3 grid(static_cast<unsigned>(min64(tiles, kMaxGridX)), static_cast<unsigned>(min64(groups, kMaxGridY)));
  constexpr size_t kSmem = kThreads * kPartialStride * sizeof(float);
  const bool vector = aligned16(w.qweight);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_format(w.format, [&](auto format) {
      constexpr QuantFormat F = decltype(format)::value;
      const T* xt = static_cast<const T*>(x);
      T* yt = static_cast<T*>(y);
      if (vector)
        MX_LAUNCH(grid, dim3(kThreads), kSmem, stream, quant_linear_kernel<T, F, true>)(xt, w, yt, tokens);
      else
        MX_LAUNCH(grid, dim3(kThreads), kSmem, stream, quant_linear_kernel<T, F, false>)(xt, w, yt, tokens);
      return MX_LAST_ERROR();
    });
  });
}

cudaError_t quant_embedding(DType dtype, const int64_t* ids, const QuantMatrix& w, void* out, int64_t tokens,
                            cudaStream_t stream) {
  if (tokens == 0 || w.cols == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(min64(tokens, kMaxGridX)));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_format(w.format, [&](auto format) {
      constexpr QuantFormat F = decltype(format)::value;
      MX_LAUNCH(grid, dim3(kEmbeddingThreads), 0, stream, quant_embedding_kernel<T, F>)(ids, w, static_cast<T*>(out),
                                                                                       tokens);
      return MX_LAST_ERROR();
    });
  });
}

}  // namespace mistral_ext::MX_KERNEL_NS
