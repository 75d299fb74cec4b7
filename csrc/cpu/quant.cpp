// Quantized linear layers and the quantized embedding gather (formats: mistral_ext/quant.py).
//
// quant_linear quantizes the activations of a call once, per block of 32, to int8 with a float scale (q8_0's rule:
// d = max|x| / 127, values rounded to nearest even), then multiplies each weight block with them as integers:
// maddubs + madd on AVX2, VNNI's dpbusd on the avx512 path, plain loops on the generic one. A block's integer sum is
// exact and the float accumulation over blocks runs in one fixed order per (row, token), so row t of the result is
// the same bit for bit whatever the number of tokens or rows in the call. The weights are read once per call: each
// weight row serves every token while it is in L1, each unpacked block a tile of tokens.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "op_checks.h"
#include "cpu/path_ops.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {
namespace {

constexpr int64_t kBlock = kQuantBlock;

enum class Format { q8_0, q4_0, q4_1 };

Format format_of(const at::Tensor& qweight, const std::optional<at::Tensor>& mins) {
  if (qweight.scalar_type() == at::kChar) return Format::q8_0;
  return mins ? Format::q4_1 : Format::q4_0;
}

constexpr int64_t kGroup = 8;  // blocks whose integer sums are reduced together into one vector of 8 lanes

int64_t padded_blocks(int64_t blocks) { return (blocks + kGroup - 1) / kGroup * kGroup; }

// The activations of one call: int8 values [T, K] and per block the scale d and d * (sum of the values), which the
// q4 formats need for their offset (q4_0) and minimum (q4_1) terms; per token, `stride` = blocks rounded up to a
// group, the padding zero.
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> d, dsum;
  int64_t stride;
};

template <typename T>
Activations quantize_activations(const T* x, int64_t tokens, int64_t k) {
  const int64_t blocks = k / kBlock, stride = padded_blocks(blocks);
  Activations a{std::vector<int8_t>(tokens * k), std::vector<float>(tokens * stride, 0.0f),
                std::vector<float>(tokens * stride, 0.0f), stride};
  at::parallel_for(0, tokens * blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xb = x + i * kBlock;
      const int64_t at = i / blocks * stride + i % blocks;
      float xf[kBlock], amax = 0.0f;
      for (int j = 0; j < kBlock; ++j) {
        xf[j] = cpu::to_float(xb[j]);
        amax = std::max(amax, std::fabs(xf[j]));
      }
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* qb = a.q.data() + i * kBlock;
      int sum = 0;
      for (int j = 0; j < kBlock; ++j) {
        const int v = static_cast<int>(std::nearbyint(xf[j] * inv));
        qb[j] = static_cast<int8_t>(v);
        sum += v;
      }
      a.d[at] = amax / 127.0f;
      a.dsum[at] = a.d[at] * static_cast<float>(sum);
    }
  });
  return a;
}

void half_to_float(const at::Half* h, float* out, int64_t n) {
  int64_t i = 0;
#if defined(MISTRAL_EXT_CPU_PATH_AVX2) || defined(MISTRAL_EXT_CPU_PATH_AVX512)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(h[i]);
}

// For one weight row and NT tokens: per block b, the integer dot of weight block b with each token's block b, times
// dw[b] * dx[b], summed over the blocks; plus the q4 formats' correction: -8 * sum_b dw[b] * dsum[b] (q4_0) or
// sum_b mw[b] * dsum[b] (q4_1). A weight block is unpacked once for the NT tokens; each token's arithmetic is the
// same whatever NT, so tiling the tokens changes no bit of the result.
struct TokenBlocks {
  const int8_t* q;  // the token's int8 activations
  const float* d;   // its block scales
  const float* dsum;
};

#if defined(MISTRAL_EXT_CPU_PATH_AVX2) || defined(MISTRAL_EXT_CPU_PATH_AVX512)

// 8 int32 sums of 4 products u8 x s8 each.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(MISTRAL_EXT_CPU_PATH_AVX512)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // maddubs saturates pairs at 2^15: ours stay below (|w| <= 128 or nibbles <= 15, |x| <= 127)
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// A weight block made ready for dot_u8s8: the 32 nibbles as bytes (q4), or |w| (q8_0, whose signs go onto x).
template <Format F>
inline __m256i unpack(const uint8_t* w) {
  if constexpr (F == Format::q8_0) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm256_sign_epi8(wv, wv);
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
  }
}

template <Format F>
inline __m256i block_dot(__m256i u, const uint8_t* w, const int8_t* x) {
  __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  if constexpr (F == Format::q8_0) xv = _mm256_sign_epi8(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return dot_u8s8(u, xv);
}

// Lane i of the result: the sum of the 8 lanes of v[i].
inline __m256i sum_lanes(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <Format F>
inline float correction(const float* dw, const float* mw, const float* dsum, int64_t blocks) {
  const float* c = F == Format::q4_0 ? dw : mw;
  __m256 e = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; b += kGroup)  // padded: the tails are zero
    e = _mm256_fmadd_ps(_mm256_loadu_ps(c + b), _mm256_loadu_ps(dsum + b), e);
  const float extra = hsum(e);
  return F == Format::q4_0 ? -8.0f * extra : extra;
}

// A group of 8 blocks: the integer sum of each block lands in one lane, then one multiply-add by the 8 blocks'
// scales. `full` is false for the last group of a row whose block count is not a multiple of 8.
template <Format F, int NT, bool full>
inline void group_dots(const uint8_t* w, const float* dw, const TokenBlocks* x, int64_t b0, int64_t blocks,
                       __m256* acc) {
  constexpr int64_t bytes = F == Format::q8_0 ? kBlock : kBlock / 2;
  const int64_t n = full ? kGroup : blocks - b0;
  __m256i u[kGroup];
  for (int64_t i = 0; i < kGroup; ++i) u[i] = (full || i < n) ? unpack<F>(w + (b0 + i) * bytes) : _mm256_setzero_si256();
  const __m256 scale_w = _mm256_loadu_ps(dw + b0);
  for (int t = 0; t < NT; ++t) {
    __m256i p[kGroup];
    for (int64_t i = 0; i < kGroup; ++i)
      p[i] = (full || i < n) ? block_dot<F>(u[i], w + (b0 + i) * bytes, x[t].q + (b0 + i) * kBlock)
                             : _mm256_setzero_si256();
    const __m256 scale = _mm256_mul_ps(scale_w, _mm256_loadu_ps(x[t].d + b0));
    acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum_lanes(p)), acc[t]);
  }
}

// dw, mw and each token's d, dsum are padded to whole groups with zeros.
template <Format F, int NT>
void row_dots(const uint8_t* w, const float* dw, const float* mw, const TokenBlocks* x, int64_t blocks, float* out) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + kGroup <= blocks; b += kGroup) group_dots<F, NT, true>(w, dw, x, b, blocks, acc);
  if (b < blocks) group_dots<F, NT, false>(w, dw, x, b, blocks, acc);
  for (int t = 0; t < NT; ++t) {
    out[t] = hsum(acc[t]);
    if constexpr (F != Format::q8_0) out[t] += correction<F>(dw, mw, x[t].dsum, blocks);
  }
}

#else

template <Format F>
inline float correction(const float* dw, const float* mw, const float* dsum, int64_t blocks) {
  const float* c = F == Format::q4_0 ? dw : mw;
  float extra = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) extra += c[b] * dsum[b];
  return F == Format::q4_0 ? -8.0f * extra : extra;
}

template <Format F, int NT>
void row_dots(const uint8_t* w, const float* dw, const float* mw, const TokenBlocks* x, int64_t blocks, float* out) {
  for (int t = 0; t < NT; ++t) {
    float sum = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
      const int8_t* xb = x[t].q + b * kBlock;
      int32_t dot = 0;
      if constexpr (F == Format::q8_0) {
        const int8_t* wb = reinterpret_cast<const int8_t*>(w) + b * kBlock;
        for (int j = 0; j < kBlock; ++j) dot += static_cast<int32_t>(wb[j]) * xb[j];
      } else {
        const uint8_t* wb = w + b * kBlock / 2;
        for (int j = 0; j < kBlock / 2; ++j) dot += (wb[j] & 0x0F) * xb[j] + (wb[j] >> 4) * xb[j + kBlock / 2];
      }
      sum += dw[b] * x[t].d[b] * static_cast<float>(dot);
    }
    out[t] = F == Format::q8_0 ? sum : sum + correction<F>(dw, mw, x[t].dsum, blocks);
  }
}

#endif

constexpr int kTokenTile = 4;      // tokens that share each unpacked weight block
constexpr int64_t kRowTile = 16;   // weight rows kept in L1 while a long call's tokens pass over them

template <Format F, typename T>
void linear(const T* x, const uint8_t* qweight, const at::Half* scales, const at::Half* mins, T* y, int64_t tokens,
            int64_t n, int64_t k) {
  const int64_t blocks = k / kBlock;
  const int64_t row_bytes = F == Format::q8_0 ? k : k / 2;
  const Activations a = quantize_activations(x, tokens, k);
  std::vector<TokenBlocks> rows(tokens);
  for (int64_t t = 0; t < tokens; ++t)
    rows[t] = {a.q.data() + t * k, a.d.data() + t * a.stride, a.dsum.data() + t * a.stride};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_bytes * std::min<int64_t>(tokens, 8)));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    // per row of the tile: dw then mw, each padded with zeros like the activations' scales
    std::vector<float> tile_scales(kRowTile * 2 * a.stride, 0.0f);
    float out[kTokenTile];
    for (int64_t r0 = begin; r0 < end; r0 += kRowTile) {
      const int64_t r1 = std::min(end, r0 + kRowTile);
      for (int64_t r = r0; r < r1; ++r) {
        float* dw = tile_scales.data() + (r - r0) * 2 * a.stride;
        half_to_float(scales + r * blocks, dw, blocks);
        if (F == Format::q4_1) half_to_float(mins + r * blocks, dw + a.stride, blocks);
      }
      for (int64_t t = 0; t < tokens; t += kTokenTile) {
        const int64_t nt = std::min<int64_t>(kTokenTile, tokens - t);
        for (int64_t r = r0; r < r1; ++r) {
          const float* dw = tile_scales.data() + (r - r0) * 2 * a.stride;
          const uint8_t* w = qweight + r * row_bytes;
          if (nt == kTokenTile) {
            row_dots<F, kTokenTile>(w, dw, dw + a.stride, rows.data() + t, blocks, out);
          } else {
            for (int64_t i = 0; i < nt; ++i) row_dots<F, 1>(w, dw, dw + a.stride, rows.data() + t + i, blocks, out + i);
          }
          for (int64_t i = 0; i < nt; ++i) y[(t + i) * n + r] = cpu::from_float<T>(out[i]);
        }
      }
    }
  });
}

// One row of the table in float32, as mistral_ext.quant.dequantize computes it (this file is compiled with
// -ffp-contract=off, so q4_1's d * q + m rounds twice there too).
template <Format F, typename T>
void dequantize_row(const uint8_t* w, const at::Half* scales, const at::Half* mins, T* out, int64_t k) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float d = static_cast<float>(scales[b]);
    const float m = F == Format::q4_1 ? static_cast<float>(mins[b]) : 0.0f;
    for (int j = 0; j < kBlock; ++j) {
      float v;
      if constexpr (F == Format::q8_0) {
        v = d * static_cast<float>(reinterpret_cast<const int8_t*>(w)[b * kBlock + j]);
      } else {
        const uint8_t byte = w[b * kBlock / 2 + j % (kBlock / 2)];
        const float q = static_cast<float>(j < kBlock / 2 ? byte & 0x0F : byte >> 4);
        v = F == Format::q4_0 ? d * (q - 8.0f) : d * q + m;
      }
      out[b * kBlock + j] = cpu::from_float<T>(v);
    }
  }
}

template <typename Fn>
void with_format(Format f, Fn&& fn) {
  switch (f) {
    case Format::q8_0: fn(std::integral_constant<Format, Format::q8_0>{}); break;
    case Format::q4_0: fn(std::integral_constant<Format, Format::q4_0>{}); break;
    case Format::q4_1: fn(std::integral_constant<Format, Format::q4_1>{}); break;
  }
}

}  // namespace

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& mins) {
  check_quant_linear_args(x, qweight, scales, mins);
  const int64_t tokens = x.size(0), k = x.size(1), n = qweight.size(0);
  at::Tensor y = at::empty({tokens, n}, x.options());
  if (tokens == 0 || n == 0) return y;
  if (k == 0) return y.zero_();
  const uint8_t* w = static_cast<const uint8_t*>(qweight.const_data_ptr());
  const at::Half* s = scales.const_data_ptr<at::Half>();
  const at::Half* m = mins ? mins->const_data_ptr<at::Half>() : nullptr;
  MISTRAL_EXT_DISPATCH_FLOATS(x.scalar_type(), "quant_linear_cpu", [&] {
    with_format(format_of(qweight, mins), [&](auto f) {
      linear<decltype(f)::value>(x.const_data_ptr<scalar_t>(), w, s, m, y.mutable_data_ptr<scalar_t>(), tokens, n, k);
    });
  });
  return y;
}

at::Tensor quant_embedding_cpu(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& mins, at::ScalarType dtype) {
  const at::Tensor host_ids = check_quant_embedding_args(ids, qweight, scales, mins, dtype);
  const int64_t tokens = ids.size(0), k = scales.size(1) * kBlock, blocks = scales.size(1);
  const int64_t row_bytes = qweight.scalar_type() == at::kChar ? k : k / 2;
  at::Tensor out = at::empty({tokens, k}, qweight.options().dtype(dtype));
  const int64_t* id = host_ids.const_data_ptr<int64_t>();
  const uint8_t* w = static_cast<const uint8_t*>(qweight.const_data_ptr());
  const at::Half* s = scales.const_data_ptr<at::Half>();
  const at::Half* m = mins ? mins->const_data_ptr<at::Half>() : nullptr;
  MISTRAL_EXT_DISPATCH_FLOATS(dtype, "quant_embedding_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    with_format(format_of(qweight, mins), [&](auto f) {
      at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          dequantize_row<decltype(f)::value>(w + id[t] * row_bytes, s + id[t] * blocks,
                                             m ? m + id[t] * blocks : nullptr, o + t * k, k);
      });
    });
  });
  return out;
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
