// Quantized linear layers and the quantized embedding gather (formats and layout: mistral_ext/quant.py).
//
// quant_linear quantizes the activations of a call once, per block of 32, to int8 with a float scale (q8_0's rule:
// d = max|x| / 127, values rounded to nearest even), then multiplies them with the weights as integers. The layout
// interleaves 8 rows 4 bytes at a time, so one 32-byte load holds 4 values of each of 8 rows; with the token's 4
// matching values broadcast to every lane, one integer dot-product instruction (VNNI's dpbusd on the avx512 path,
// maddubs + madd on avx2) adds each row's 4 products into its own lane, and a block's 8 row sums come out in one
// vector with no horizontal reduction. Per block: the integer sum (exact), then one multiply-add by the row's scale
// times the token's; the blocks accumulate in one fixed order per (row, token), so row t of the result is the same
// bit for bit whatever the number of tokens or rows in the call. The weights are read once per call: a tile of row
// groups stays in L1/L2 while the tokens pass over it, each unpacked vector serving a tile of tokens.
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
#include "cpu/work.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {
namespace {

constexpr int64_t kBlock = kQuantBlock;
constexpr int64_t kGroup = kQuantGroup;
constexpr int64_t kChunk = kQuantChunk;

enum class Format { q8_0, q4_0, q4_1 };

Format format_of(const at::Tensor& qweight, const std::optional<at::Tensor>& mins) {
  if (qweight.scalar_type() == at::kChar) return Format::q8_0;
  return mins ? Format::q4_1 : Format::q4_0;
}

template <Format F>
constexpr int64_t kBlockBytes = F == Format::q8_0 ? kBlock : kBlock / 2;  // of one row
template <Format F>
constexpr int64_t kChunks = kBlockBytes<F> / kChunk;

struct TokenBlocks {
  const int8_t* q;
  const float* d;
  const float* dsum;
  const int32_t* offset;
};

// One block: q = round-half-even(x * (127 / max|x|)) (0 when the block is all zeros); returns max|x| and the sum.
#if defined(MISTRAL_EXT_CPU_PATH_AVX2) || defined(MISTRAL_EXT_CPU_PATH_AVX512)
inline float quantize_block(const float* x, int8_t* q, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4];
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i)
    i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  __m256i s = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *sum = _mm_cvtsi128_si32(s4);
  // packs work within 128-bit halves: the 4-value pieces come out in the order 0 2 4 6 1 3 5 7
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return amax;
}
#else
inline float quantize_block(const float* x, int8_t* q, int32_t* sum) {
  float amax = 0.0f;
  for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t s = 0;
  for (int j = 0; j < kBlock; ++j) {
    const int v = static_cast<int>(std::nearbyint(x[j] * inv));
    q[j] = static_cast<int8_t>(v);
    s += v;
  }
  *sum = s;
  return amax;
}
#endif

}  // namespace

void QuantActivations::resize(int64_t t, int64_t kk) {
  tokens = t;
  k = kk;
  const int64_t blocks = t * (kk / kBlock);
  q.resize(t * kk);
  d.resize(blocks);
  dsum.resize(blocks);
  offset.resize(blocks);
}

template <typename T>
void quantize_activation_blocks(const T* x, QuantActivations& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float xf[kBlock];
    const float* xb = xf;
    if constexpr (std::is_same_v<T, float>) {
      xb = x + i * kBlock;
    } else {
      for (int j = 0; j < kBlock; ++j) xf[j] = cpu::to_float(x[i * kBlock + j]);
    }
    int32_t sum;
    const float d = quantize_block(xb, a.q.data() + i * kBlock, &sum) / 127.0f;
    a.d[i] = d;
    a.dsum[i] = d * static_cast<float>(sum);
    a.offset[i] = 8 * sum;
  }
}

namespace {

// The activations of one call, in buffers kept per calling thread so a decode step allocates nothing.
template <typename T>
const QuantActivations& quantize_activations(const T* x, int64_t tokens, int64_t k) {
  thread_local QuantActivations mine;
  QuantActivations& a = mine;  // the lambda below runs on other threads too: they must use this thread's buffers
  a.resize(tokens, k);
  at::parallel_for(0, tokens * (k / kBlock), 256,
                   [&](int64_t begin, int64_t end) { quantize_activation_blocks(x, a, begin, end); });
  return a;
}

// One group of 8 rows: values [block][chunk][8 rows][4 bytes], scales and mins [block][8 rows].
struct Group {
  const uint8_t* w;
  const at::Half* d;
  const at::Half* m;
};

#if defined(MISTRAL_EXT_CPU_PATH_AVX2) || defined(MISTRAL_EXT_CPU_PATH_AVX512)

// acc + per lane the sum of the 4 products u8 x s8 of that lane.
inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) {
#if defined(MISTRAL_EXT_CPU_PATH_AVX512)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  // maddubs saturates pairs at 2^15: ours stay below (|w| <= 128 or nibbles <= 15, |x| <= 127)
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// Integer sums accumulated side by side per token: dpbusd's 4-cycle latency would otherwise chain a block's 8 (q4)
// or 16 (q8_0) instructions per token; maddubs + madd end in a 1-cycle add.
#if defined(MISTRAL_EXT_CPU_PATH_AVX512)
constexpr int kChains = 2;
#else
constexpr int kChains = 1;
#endif

constexpr int64_t kPrefetchAhead = 2048;  // bytes: 8-16 blocks of a group ahead; the hardware prefetcher alone left T = 4 at half the bandwidth

// out[t * 8 + r]: row r of the group times token t, for NT tokens.
template <Format F, int NT>
void group_dots(const Group& g, const TokenBlocks* x, int64_t blocks, float* out) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = g.w + b * kGroup * kBlockBytes<F>;
    for (int64_t line = 0; line < kGroup * kBlockBytes<F>; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchAhead + line), _MM_HINT_T0);
    __m256i isum[kChains][NT];
    for (int i = 0; i < kChains; ++i)
      for (int t = 0; t < NT; ++t) isum[i][t] = _mm256_setzero_si256();
    for (int64_t c = 0; c < kChunks<F>; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * kGroup * kChunk));
      if constexpr (F == Format::q8_0) {
        const __m256i u = _mm256_sign_epi8(v, v);  // |w|; w's signs go onto x
        __m256i* chain = isum[c % kChains];
        for (int t = 0; t < NT; ++t)
          chain[t] = dot_add(chain[t], u, _mm256_sign_epi8(broadcast4(x[t].q + b * kBlock + c * kChunk), v));
      } else {
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int t = 0; t < NT; ++t) {
          isum[0][t] = dot_add(isum[0][t], lo, broadcast4(x[t].q + b * kBlock + c * kChunk));
          isum[kChains - 1][t] = dot_add(isum[kChains - 1][t], hi, broadcast4(x[t].q + b * kBlock + kBlock / 2 + c * kChunk));
        }
      }
    }
    if constexpr (kChains == 2)
      for (int t = 0; t < NT; ++t) isum[0][t] = _mm256_add_epi32(isum[0][t], isum[1][t]);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g.d + b * kGroup)));
    __m256 mw;
    if constexpr (F == Format::q4_1)
      mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g.m + b * kGroup)));
    for (int t = 0; t < NT; ++t) {
      __m256i s = isum[0][t];
      if constexpr (F == Format::q4_0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(x[t].offset[b]));
      acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b])), _mm256_cvtepi32_ps(s), acc[t]);
      if constexpr (F == Format::q4_1) acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x[t].dsum[b]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + t * kGroup, acc[t]);
}

#else

template <Format F, int NT>
void group_dots(const Group& g, const TokenBlocks* x, int64_t blocks, float* out) {
  for (int t = 0; t < NT; ++t) {
    for (int64_t r = 0; r < kGroup; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* wb = g.w + b * kGroup * kBlockBytes<F>;
        const int8_t* xb = x[t].q + b * kBlock;
        int32_t isum = 0;
        for (int64_t c = 0; c < kChunks<F>; ++c) {
          for (int64_t i = 0; i < kChunk; ++i) {
            const uint8_t byte = wb[(c * kGroup + r) * kChunk + i];
            if constexpr (F == Format::q8_0) {
              isum += static_cast<int8_t>(byte) * xb[c * kChunk + i];
            } else {
              isum += (byte & 0x0F) * xb[c * kChunk + i] + (byte >> 4) * xb[kBlock / 2 + c * kChunk + i];
            }
          }
        }
        if constexpr (F == Format::q4_0) isum -= x[t].offset[b];
        acc += static_cast<float>(g.d[b * kGroup + r]) * x[t].d[b] * static_cast<float>(isum);
        if constexpr (F == Format::q4_1) acc += static_cast<float>(g.m[b * kGroup + r]) * x[t].dsum[b];
      }
      out[t * kGroup + r] = acc;
    }
  }
}

#endif

// The last group when N is not a multiple of 8, its m rows copied into a whole group whose other rows are zero, so
// it runs through the same arithmetic as the others.
template <Format F>
struct PaddedGroup {
  std::vector<uint8_t> w;
  std::vector<at::Half> d, m;

  PaddedGroup() = default;  // none: N is whole groups
  PaddedGroup(const Group& g, int64_t rows, int64_t blocks)
      : w(kGroup * blocks * kBlockBytes<F>, 0), d(kGroup * blocks, at::Half(0.0f)), m(g.m ? d.size() : 0, at::Half(0.0f)) {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t c = 0; c < kChunks<F>; ++c)
        std::memcpy(w.data() + (b * kChunks<F> + c) * kGroup * kChunk, g.w + (b * kChunks<F> + c) * rows * kChunk,
                    rows * kChunk);
      for (int64_t r = 0; r < rows; ++r) {
        d[b * kGroup + r] = g.d[b * rows + r];
        if (g.m) m[b * kGroup + r] = g.m[b * rows + r];
      }
    }
  }

  Group group() const { return {w.data(), d.data(), m.empty() ? nullptr : m.data()}; }
};

constexpr int kTokenTile = 4;     // tokens that share each unpacked weight vector
constexpr int64_t kGroupTile = 2;  // row groups kept in cache while a long call's tokens pass over them

template <Format F>
void tile_dots(int64_t nt, const Group& g, const TokenBlocks* x, int64_t blocks, float* out) {
  switch (nt) {
    case 1: group_dots<F, 1>(g, x, blocks, out); break;
    case 2: group_dots<F, 2>(g, x, blocks, out); break;
    case 3: group_dots<F, 3>(g, x, blocks, out); break;
    default: group_dots<F, kTokenTile>(g, x, blocks, out); break;
  }
}

template <Format F, typename T>
void linear_groups(const QuantMatrix& w, const QuantActivations& a, T* y, int64_t ldy, int64_t begin, int64_t end) {
  const int64_t tokens = a.tokens, k = w.k, n = w.n, blocks = k / kBlock;
  const int64_t group_bytes = kGroup * blocks * kBlockBytes<F>, whole = n / kGroup, tail_rows = n % kGroup;
  const auto* qweight = static_cast<const uint8_t*>(w.qweight);
  TokenBlocks rows[kTokenTile];
  auto group_at = [&](int64_t g) {
    return Group{qweight + g * group_bytes, w.scales + g * kGroup * blocks,
                 w.mins ? w.mins + g * kGroup * blocks : nullptr};
  };
  const PaddedGroup<F> tail = tail_rows ? PaddedGroup<F>(group_at(whole), tail_rows, blocks) : PaddedGroup<F>();
  float out[kTokenTile * kGroup];
  for (int64_t g0 = begin; g0 < end; g0 += kGroupTile) {
    const int64_t g1 = std::min(end, g0 + kGroupTile);
    for (int64_t t = 0; t < tokens; t += kTokenTile) {
      const int64_t nt = std::min<int64_t>(kTokenTile, tokens - t);
      for (int64_t i = 0; i < nt; ++i)
        rows[i] = {a.q.data() + (t + i) * k, a.d.data() + (t + i) * blocks, a.dsum.data() + (t + i) * blocks,
                   a.offset.data() + (t + i) * blocks};
      for (int64_t g = g0; g < g1; ++g) {
        const bool whole_group = g < whole;
        tile_dots<F>(nt, whole_group ? group_at(g) : tail.group(), rows, blocks, out);
        const int64_t m = whole_group ? kGroup : tail_rows;
        for (int64_t i = 0; i < nt; ++i)
          for (int64_t r = 0; r < m; ++r) y[(t + i) * ldy + g * kGroup + r] = cpu::from_float<T>(out[i * kGroup + r]);
      }
    }
  }
}

// Row `row` of the table in float32, as mistral_ext.quant.dequantize computes it (this file is compiled with
// -ffp-contract=off, so q4_1's d * q + m rounds twice there too).
template <Format F, typename T>
void dequantize_row(const uint8_t* qweight, const at::Half* scales, const at::Half* mins, int64_t n, int64_t row,
                    T* out, int64_t k) {
  const int64_t blocks = k / kBlock, g = row / kGroup, r = row % kGroup;
  const int64_t m = std::min(kGroup, n - g * kGroup);  // rows in this row's group
  const uint8_t* w = qweight + g * kGroup * blocks * kBlockBytes<F>;
  for (int64_t b = 0; b < blocks; ++b) {
    const float d = static_cast<float>(scales[g * kGroup * blocks + b * m + r]);
    const float mw = F == Format::q4_1 ? static_cast<float>(mins[g * kGroup * blocks + b * m + r]) : 0.0f;
    uint8_t bytes[kBlockBytes<F>];
    for (int64_t c = 0; c < kChunks<F>; ++c)
      std::memcpy(bytes + c * kChunk, w + ((b * kChunks<F> + c) * m + r) * kChunk, kChunk);
    for (int j = 0; j < kBlock; ++j) {
      float v;
      if constexpr (F == Format::q8_0) {
        v = d * static_cast<float>(static_cast<int8_t>(bytes[j]));
      } else {
        const uint8_t byte = bytes[j % (kBlock / 2)];
        const float q = static_cast<float>(j < kBlock / 2 ? byte & 0x0F : byte >> 4);
        v = F == Format::q4_0 ? d * (q - 8.0f) : d * q + mw;
      }
      out[b * kBlock + j] = cpu::from_float<T>(v);
    }
  }
}

Format format_of(const QuantMatrix& w) { return w.int8 ? Format::q8_0 : w.mins ? Format::q4_1 : Format::q4_0; }

template <typename Fn>
void with_format(Format f, Fn&& fn) {
  switch (f) {
    case Format::q8_0: fn(std::integral_constant<Format, Format::q8_0>{}); break;
    case Format::q4_0: fn(std::integral_constant<Format, Format::q4_0>{}); break;
    case Format::q4_1: fn(std::integral_constant<Format, Format::q4_1>{}); break;
  }
}

}  // namespace

template <typename T>
void quant_linear_groups(const QuantMatrix& w, const QuantActivations& a, T* y, int64_t ldy, int64_t begin,
                         int64_t end) {
  with_format(format_of(w), [&](auto f) { linear_groups<decltype(f)::value>(w, a, y, ldy, begin, end); });
}

#define MISTRAL_EXT_INSTANTIATE(T)                                                                          \
  template void quantize_activation_blocks<T>(const T*, QuantActivations&, int64_t, int64_t);               \
  template void quant_linear_groups<T>(const QuantMatrix&, const QuantActivations&, T*, int64_t, int64_t, \
                                       int64_t);
MISTRAL_EXT_INSTANTIATE(float)
MISTRAL_EXT_INSTANTIATE(c10::BFloat16)
MISTRAL_EXT_INSTANTIATE(c10::Half)
#undef MISTRAL_EXT_INSTANTIATE

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& mins) {
  check_quant_linear_args(x, qweight, scales, mins);
  const int64_t tokens = x.size(0), k = x.size(1), n = qweight.size(0);
  at::Tensor y = at::empty({tokens, n}, x.options());
  if (tokens == 0 || n == 0) return y;
  if (k == 0) return y.zero_();
  const QuantMatrix w{qweight.const_data_ptr(), qweight.scalar_type() == at::kChar,
                      scales.const_data_ptr<at::Half>(), mins ? mins->const_data_ptr<at::Half>() : nullptr, n, k};
  const int64_t group_bytes = kGroup * (k / kBlock) * (w.int8 ? kBlock : kBlock / 2);
  const int64_t grain = std::max<int64_t>(1, 16384 / (group_bytes * std::min<int64_t>(tokens, 8)));
  MISTRAL_EXT_DISPATCH_FLOATS(x.scalar_type(), "quant_linear_cpu", [&] {
    const QuantActivations& a = quantize_activations(x.const_data_ptr<scalar_t>(), tokens, k);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, w.groups(), grain,
                     [&](int64_t begin, int64_t end) { quant_linear_groups(w, a, yp, n, begin, end); });
  });
  return y;
}

at::Tensor quant_embedding_cpu(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& mins, at::ScalarType dtype) {
  check_quant_embedding_args(ids, qweight, scales, mins, dtype);
  const int64_t tokens = ids.size(0), k = scales.size(1) * kBlock, n = qweight.size(0);
  at::Tensor out = at::empty({tokens, k}, qweight.options().dtype(dtype));
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const uint8_t* w = static_cast<const uint8_t*>(qweight.const_data_ptr());
  const at::Half* s = scales.const_data_ptr<at::Half>();
  const at::Half* m = mins ? mins->const_data_ptr<at::Half>() : nullptr;
  MISTRAL_EXT_DISPATCH_FLOATS(dtype, "quant_embedding_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    with_format(format_of(qweight, mins), [&](auto f) {
      at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          dequantize_row<decltype(f)::value>(w, s, m, n, id[t], o + t * k, k);
      });
    });
  });
  return out;
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
