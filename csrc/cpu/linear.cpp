// Dense linear layers y = x @ W.T with W [N, K] as stored (float32, bfloat16 or float16) and fp32 arithmetic: the
// weight vectors widen to fp32 in registers, so a bf16 matrix streams half the bytes of an fp32 one.
//
// The loop steps 2 vectors of K at a time. A bf16 step on the avx2/avx512 paths widens without a shuffle: read as
// 32-bit lanes, `lane << 16` holds the even elements and `lane & 0xFFFF0000` the odd ones, so the activations are
// permuted to match once per call (per step: the even elements, then the odd ones). Each (token, row) pair has its
// own vector accumulator, each lane summing its products in order with fused multiply-adds; the lanes then add
// pairwise in a fixed order, and the K % step tail after them. So row t of y is the same bit for bit whatever T,
// the tile or the thread (a test): serving relies on a request giving the same tokens alone or among others. A
// tile of R rows x TT tokens shares every load (R weight vectors, TT token vectors for R * TT multiply-adds); for
// many tokens a block of them stays in L2 while a thread's rows pass over it, each tile of rows then read from L1
// by every tile of tokens of the block and from memory once per block.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "op_checks.h"
#include "cpu/work.h"  // last: opens the code path

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {
namespace {

using cpu::f32xv;
using cpu::kVec;

#if defined(MISTRAL_EXT_CPU_PATH_AVX512)
constexpr int kRows = 4, kTokens = 6;  // 24 accumulators of the 32 registers
#elif defined(MISTRAL_EXT_CPU_PATH_AVX2)
constexpr int kRows = 3, kTokens = 4;  // 12 of 16
#else
constexpr int kRows = 2, kTokens = 2;
#endif
constexpr int64_t kTokenBlock = 8 * kTokens;  // tokens per block: 48 x 16 KB of fp32 at K = 4096, within L2
// A call of one token (decode) takes twice the rows a tile, with no software prefetch: each (row, token) sum is a
// chain of dependent multiply-adds, and twice the chains in flight, without a prefetch per line, ran 1.6x faster
// from L3 (bf16 14336 x 4096 matrices, 2 threads: 93-102 against 48-61 GB/s) and decoded the default model in dense
// fp32 in 22.6-25.4 against 26.9-32.3 ms a step (measured alternating; AMD EPYC, 2 cores). A row's sum is the same.
constexpr int kWideRows = 2 * kRows;

constexpr int64_t kStep = 2 * kVec;  // elements of K per step

#if defined(MISTRAL_EXT_CPU_PATH_AVX512) || defined(MISTRAL_EXT_CPU_PATH_AVX2)
template <typename W>
constexpr bool kSplitsPairs = std::is_same_v<W, c10::BFloat16>;  // the activations come permuted
#else
template <typename W>
constexpr bool kSplitsPairs = false;
#endif

#if defined(MISTRAL_EXT_CPU_PATH_AVX512)
inline f32xv fmadd(f32xv a, f32xv b, f32xv c) {
  return reinterpret_cast<f32xv>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                 reinterpret_cast<__m512>(c)));
}
// The zero-masked forms: GCC 12 warns on the unmasked ones' undefined pass-through operand.
inline void load_step(const c10::BFloat16* p, f32xv& even, f32xv& odd) {
  const __m512i u = _mm512_loadu_si512(p);
  even = reinterpret_cast<f32xv>(_mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, u, 16)));
  odd = reinterpret_cast<f32xv>(_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(0xFFFF0000u))));
}
inline void load_step(const c10::Half* p, f32xv& a, f32xv& b) {
  a = reinterpret_cast<f32xv>(_mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  b = reinterpret_cast<f32xv>(
      _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kVec))));
}
#elif defined(MISTRAL_EXT_CPU_PATH_AVX2)
inline f32xv fmadd(f32xv a, f32xv b, f32xv c) {
  return reinterpret_cast<f32xv>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                 reinterpret_cast<__m256>(c)));
}
inline void load_step(const c10::BFloat16* p, f32xv& even, f32xv& odd) {
  const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = reinterpret_cast<f32xv>(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
  odd = reinterpret_cast<f32xv>(_mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(0xFFFF0000u))));
}
inline void load_step(const c10::Half* p, f32xv& a, f32xv& b) {
  a = reinterpret_cast<f32xv>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  b = reinterpret_cast<f32xv>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kVec))));
}
#else
inline f32xv fmadd(f32xv a, f32xv b, f32xv c) { return a * b + c; }  // no FMA in the baseline: rounded twice
template <typename W>
inline void load_step(const W* p, f32xv& a, f32xv& b) {
  for (int l = 0; l < kVec; ++l) {
    a[l] = cpu::to_float(p[l]);
    b[l] = cpu::to_float(p[kVec + l]);
  }
}
#endif

inline void load_step(const float* p, f32xv& a, f32xv& b) {
  a = cpu::loadv(p);
  b = cpu::loadv(p + kVec);
}

// acc[r][t] += the step of K at i: weights of R rows and activations of TT tokens, rows k apart.
template <int R, int TT, typename W>
inline void multiply_add(const W* w, int64_t k, const float* x, int64_t i, f32xv (&acc)[R][TT]) {
  if constexpr (TT == 1) {  // each row's weights loaded where they are used: as arrays, GCC 12 spilled them
    const f32xv xa = cpu::loadv(x + i), xb = cpu::loadv(x + i + kVec);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      f32xv wa, wb;
      load_step(w + r * k + i, wa, wb);
      acc[r][0] = fmadd(wb, xb, fmadd(wa, xa, acc[r][0]));
    }
    return;
  }
  f32xv wa[R], wb[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) load_step(w + r * k + i, wa[r], wb[r]);
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) {
    const f32xv xa = cpu::loadv(x + t * k + i), xb = cpu::loadv(x + t * k + i + kVec);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][t] = fmadd(wb[r], xb, fmadd(wa[r], xa, acc[r][t]));
  }
}

// out[r * TT + t] = w row r . x row t for R rows and TT tokens, rows k apart. With Prefetch, each step prefetches its
// lines of the next tile's rows: R rows ahead, which stays ahead of the loads whatever K (a fixed distance within
// a row would land in the next row, already streaming, when K is small).
template <int R, int TT, bool Prefetch = true, typename W>
inline void tile(const W* w, int64_t k, const float* x, float* out) {
  constexpr int64_t kStepBytes = kStep * sizeof(W);
  const int64_t ks = k / kStep * kStep;
  f32xv acc[R][TT];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) acc[r][t] = f32xv{};
  for (int64_t i = 0; i < ks; i += kStep) {
    if constexpr (Prefetch) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const char* next = reinterpret_cast<const char*>(w + (R + r) * k + i);
#pragma GCC unroll 4
        for (int64_t b = 0; b < kStepBytes; b += 64) __builtin_prefetch(next + b);
      }
    }
    multiply_add<R, TT>(w, k, x, i, acc);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      float s = cpu::reduce_lanes(acc[r][t]);
      for (int64_t i = ks; i < k; ++i) s = __builtin_fmaf(cpu::to_float(w[r * k + i]), x[t * k + i], s);
      out[r * TT + t] = s;
    }
}

template <int R, typename W, int TT = kTokens>
inline void tile_tokens(int tokens, const W* w, int64_t k, const float* x, float* out) {
  if constexpr (TT > 1) {
    if (tokens < TT) return tile_tokens<R, W, TT - 1>(tokens, w, k, x, out);
  }
  tile<R, TT>(w, k, x, out);
}

}  // namespace

int64_t dense_linear_tiles(int64_t n) { return (n + kRows - 1) / kRows; }

template <typename W, typename T>
void dense_linear_tiles(const float* x, const W* w, T* y, int64_t ldy, int64_t tokens, int64_t n, int64_t k,
                        int64_t begin, int64_t end) {
  float out[std::max(kRows * kTokens, kWideRows)];
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenBlock) {
    const int64_t t1 = std::min(tokens, t0 + kTokenBlock);
    for (int64_t rt = begin; rt < end; ++rt) {
      const int64_t r0 = rt * kRows, m = std::min<int64_t>(kRows, n - r0);
      if (tokens == 1 && rt + 1 < end && r0 + kWideRows <= n) {  // two whole tiles
        tile<kWideRows, 1, false>(w + r0 * k, k, x, out);
        for (int64_t r = 0; r < kWideRows; ++r) y[r0 + r] = cpu::from_float<T>(out[r]);
        ++rt;
        continue;
      }
      for (int64_t t = t0; t < t1; t += kTokens) {
        const int nt = static_cast<int>(std::min<int64_t>(kTokens, t1 - t));
        if (m == kRows) {
          tile_tokens<kRows>(nt, w + r0 * k, k, x + t * k, out);
        } else {
          for (int64_t r = 0; r < m; ++r) tile_tokens<1>(nt, w + (r0 + r) * k, k, x + t * k, out + r * nt);
        }
        for (int64_t r = 0; r < m; ++r)
          for (int i = 0; i < nt; ++i) y[(t + i) * ldy + r0 + r] = cpu::from_float<T>(out[r * nt + i]);
      }
    }
  }
}

// x in fp32 as the weights' steps read it, when it comes in another dtype or must be permuted (kSplitsPairs: per
// whole step, the even elements, then the odd).
template <typename W, typename T>
bool dense_linear_needs_input() {
  return !std::is_same_v<T, float> || kSplitsPairs<W>;
}

template <typename W, typename T>
void dense_linear_input(const T* x, int64_t k, float* out, int64_t begin, int64_t end) {
  const int64_t ks = kSplitsPairs<W> ? k / kStep * kStep : 0;
  for (int64_t t = begin; t < end; ++t) {
    const T* xt = x + t * k;
    float* ot = out + t * k;
    for (int64_t i = 0; i < ks; i += kStep)
      for (int64_t l = 0; l < kVec; ++l) {
        ot[i + l] = cpu::to_float(xt[i + 2 * l]);
        ot[i + kVec + l] = cpu::to_float(xt[i + 2 * l + 1]);
      }
    for (int64_t i = ks; i < k; ++i) ot[i] = cpu::to_float(xt[i]);
  }
}

#define MISTRAL_EXT_INSTANTIATE(W, T)                                                                              \
  template bool dense_linear_needs_input<W, T>();                                                                  \
  template void dense_linear_input<W, T>(const T*, int64_t, float*, int64_t, int64_t);                             \
  template void dense_linear_tiles<W, T>(const float*, const W*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                         int64_t);
#define MISTRAL_EXT_INSTANTIATE_W(W)           \
  MISTRAL_EXT_INSTANTIATE(W, float)            \
  MISTRAL_EXT_INSTANTIATE(W, c10::BFloat16)    \
  MISTRAL_EXT_INSTANTIATE(W, c10::Half)
MISTRAL_EXT_INSTANTIATE_W(float)
MISTRAL_EXT_INSTANTIATE_W(c10::BFloat16)
MISTRAL_EXT_INSTANTIATE_W(c10::Half)
#undef MISTRAL_EXT_INSTANTIATE_W
#undef MISTRAL_EXT_INSTANTIATE

at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_dense_linear_args(x, weight);
  const int64_t tokens = x.size(0), k = x.size(1), n = weight.size(0);
  at::Tensor y = at::empty({tokens, n}, x.options());
  if (tokens == 0 || n == 0) return y;
  if (k == 0) return y.zero_();
  MISTRAL_EXT_DISPATCH_FLOATS(x.scalar_type(), "dense_linear_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    MISTRAL_EXT_DISPATCH_FLOATS(weight.scalar_type(), "dense_linear_cpu", [&] {
      using W = scalar_t;
      // In a buffer of the calling thread: a decode step allocates nothing.
      thread_local std::vector<float> buffer;
      const float* input;
      if (dense_linear_needs_input<W, T>()) {
        if (static_cast<int64_t>(buffer.size()) < tokens * k) buffer.resize(tokens * k);
        dense_linear_input<W>(xp, k, buffer.data(), 0, tokens);
        input = buffer.data();
      } else {
        input = reinterpret_cast<const float*>(xp);  // T is float
      }
      const W* wp = weight.const_data_ptr<W>();
      const int64_t grain = std::max<int64_t>(1, 32768 / (kRows * k * static_cast<int64_t>(sizeof(W))));
      at::parallel_for(0, dense_linear_tiles(n), grain, [&](int64_t begin, int64_t end) {
        dense_linear_tiles(input, wp, yp, n, tokens, n, k, begin, end);
      });
    });
  });
  return y;
}

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
