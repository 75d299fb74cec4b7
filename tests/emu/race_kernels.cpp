// Every real kernel in race mode (MISTRAL_EXT_EMU_MODE=threads: one OS thread per CUDA thread) under
// ThreadSanitizer, at small shapes. A report fails the test (TSan exits non-zero); outputs must also be finite.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/device_math.h"

using namespace mistral_ext::emu_kernels;

static std::mt19937 rng(1);

template <typename T>
std::vector<T> random_vec(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> normal;
  std::vector<T> v(n);
  for (auto& x : v) x = from_float<T>(normal(rng) * scale);
  return v;
}

template <typename T>
bool finite(const std::vector<T>& v) {
  for (const auto& x : v)
    if (!std::isfinite(to_float(x))) return false;
  return true;
}

static int failures = 0;
#define EXPECT(cond, what)                       \
  do {                                           \
    if (!(cond)) {                               \
      std::printf("FAIL %s\n", what);            \
      ++failures;                                \
    }                                            \
  } while (0)

template <typename T>
void run_all(DType dt) {
  {  // rms_norm, vector and scalar paths
    for (int64_t dim : {256, 100}) {
      const int64_t rows = 3;
      auto x = random_vec<T>(rows * dim), r = random_vec<T>(rows * dim), w = random_vec<T>(dim);
      std::vector<T> out(rows * dim), h(rows * dim);
      EXPECT(rms_norm(dt, x.data(), r.data(), w.data(), out.data(), h.data(), rows, dim, 1e-5f, nullptr) ==
                 cudaSuccess, "rms_norm launch");
      EXPECT(finite(out) && finite(h), "rms_norm output");
    }
  }
  {  // rope + cache write
    const int64_t tokens = 3, hq = 4, hkv = 2, d = 64, slots = 4;
    auto q = random_vec<T>(tokens * hq * d), k = random_vec<T>(tokens * hkv * d), v = random_vec<T>(tokens * hkv * d);
    std::vector<T> q_out(q.size()), kc(slots * hkv * d), vc(slots * hkv * d);
    std::vector<int64_t> pos = {5, 6, 7}, rows = {1, 2, 3};
    RopeCacheArgs a;
    a.q = q.data();
    a.k = k.data();
    a.v = v.data();
    a.q_out = q_out.data();
    a.k_cache = kc.data();
    a.v_cache = vc.data();
    a.positions = pos.data();
    a.cache_rows = rows.data();
    a.tokens = tokens;
    a.q_heads = hq;
    a.kv_heads = hkv;
    a.head_dim = d;
    a.theta = 1e4;
    EXPECT(rope_cache_write(dt, a, nullptr) == cudaSuccess, "rope_cache_write launch");
    EXPECT(finite(q_out), "rope_cache_write output");
  }
  {  // silu_mul
    const int64_t rows = 2, hidden = 200;
    auto x = random_vec<T>(rows * 2 * hidden);
    std::vector<T> out(rows * hidden);
    EXPECT(silu_mul(dt, x.data(), out.data(), rows, hidden, nullptr) == cudaSuccess, "silu_mul launch");
    EXPECT(finite(out), "silu_mul output");
  }
  {  // dense_linear: a weight in bf16 under activations of the tested dtype, two token tiles
    const int64_t tokens = 9, n = 11, k = 64;
    auto x = random_vec<T>(tokens * k);
    auto w = random_vec<__nv_bfloat16>(n * k, 0.1f);
    std::vector<T> y(tokens * n);
    EXPECT(dense_linear(dt, DType::bf16, x.data(), w.data(), y.data(), tokens, n, k, nullptr) == cudaSuccess,
           "dense_linear launch");
    EXPECT(finite(y), "dense_linear output");
  }
  for (QuantFormat f : {QuantFormat::q8_0, QuantFormat::q4_0, QuantFormat::q4_1}) {  // a whole group and 3 rows left
    const int64_t n = 11, k = 64, tokens = 9;
    std::vector<uint8_t> qweight(n * (f == QuantFormat::q8_0 ? k : k / 2));
    for (auto& b : qweight) b = static_cast<uint8_t>(rng());
    auto scales = random_vec<__half>(n * k / 32, 0.1f), mins = random_vec<__half>(n * k / 32, 0.1f);
    const QuantMatrix w{f, qweight.data(), scales.data(), f == QuantFormat::q4_1 ? mins.data() : nullptr, n, k};
    auto x = random_vec<T>(tokens * k);
    std::vector<T> y(tokens * n), rows(2 * k);
    EXPECT(quant_linear(dt, x.data(), w, y.data(), tokens, nullptr) == cudaSuccess, "quant_linear launch");
    EXPECT(finite(y), "quant_linear output");
    const std::vector<int64_t> ids = {10, 3};
    EXPECT(quant_embedding(dt, ids.data(), w, rows.data(), 2, nullptr) == cudaSuccess, "quant_embedding launch");
    EXPECT(finite(rows), "quant_embedding output");
  }
  for (int64_t d : {64, 128}) {  // attention: decode (split + merge) and prefill (chunk against a wrapped ring)
    const int64_t batch = 2, slots = 8, hq = 4, hkv = 2, window = 6;
    auto kc = random_vec<T>(batch * slots * hkv * d), vc = random_vec<T>(batch * slots * hkv * d);
    auto q = random_vec<T>(batch * hq * d);
    std::vector<T> out(batch * hq * d);
    std::vector<int64_t> positions = {3, 20};
    AttentionArgs a;
    a.q = q.data();
    a.k_cache = kc.data();
    a.v_cache = vc.data();
    a.out = out.data();
    a.batch = batch;
    a.slots = slots;
    a.q_heads = hq;
    a.kv_heads = hkv;
    a.head_dim = d;
    a.window = window;
    const int64_t splits = 2, split_len = 64;
    std::vector<float> part_out(batch * hq * splits * d), part_lse(batch * hq * splits);
    EXPECT(attention_decode(dt, a, positions.data(), splits, split_len, part_out.data(), part_lse.data(), nullptr) ==
               cudaSuccess, "attention_decode launch");
    EXPECT(finite(out), "attention_decode output");

    const int64_t tokens = 5;  // sequence 0: 5 tokens at positions 9..13 (ring holds 4..8); sequence 1: none
    auto qp = random_vec<T>(tokens * hq * d), kn = random_vec<T>(tokens * hkv * d), vn = random_vec<T>(tokens * hkv * d);
    std::vector<T> outp(tokens * hq * d);
    a.q = qp.data();
    a.k = kn.data();
    a.v = vn.data();
    a.out = outp.data();
    const int64_t seq_lens[] = {tokens, 0}, start_pos[] = {9, 4};
    EXPECT(attention_prefill(dt, a, seq_lens, start_pos, tokens, nullptr) == cudaSuccess, "attention_prefill launch");
    EXPECT(finite(outp), "attention_prefill output");
    // Layouts the host checks refuse (on a GPU index values are not checked): the blocks touch nothing.
    const std::vector<T> before = outp;
    const int64_t too_long[] = {tokens + 1, 0}, negative_start[] = {-3, 4}, negative_len[] = {-1, tokens + 1};
    EXPECT(attention_prefill(dt, a, too_long, start_pos, tokens, nullptr) == cudaSuccess &&
               attention_prefill(dt, a, seq_lens, negative_start, tokens, nullptr) == cudaSuccess &&
               attention_prefill(dt, a, negative_len, start_pos, tokens, nullptr) == cudaSuccess,
           "attention_prefill launch with a refused layout");
    a.window = 0;  // without a window a chunk starts at position S at most (the host check)
    const int64_t past_the_cache[] = {slots + 1, 4};
    EXPECT(attention_prefill(dt, a, seq_lens, past_the_cache, tokens, nullptr) == cudaSuccess,
           "attention_prefill launch past a windowless cache");
    EXPECT(std::memcmp(before.data(), outp.data(), outp.size() * sizeof(T)) == 0,
           "attention_prefill with a refused layout wrote its output");
  }
}

int main() {
  run_all<float>(DType::f32);
  run_all<__nv_bfloat16>(DType::bf16);
  run_all<__half>(DType::f16);
  if (failures) return 1;
  std::printf("race mode: all kernels ran\n");
  return 0;
}
