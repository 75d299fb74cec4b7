// The emulator's semantics in fiber mode: warp intrinsics, atomics, shared-memory poisoning, thread/block
// indexing, WMMA against a plain GEMM, and that a race or a layout assumption is caught rather than hidden.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "broken_reduction.h"
#include "cuda/emu/emu_options.h"

using namespace nvcuda;

static int failures = 0;
#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                               \
      std::printf("\n");                                      \
      ++failures;                                             \
    }                                                         \
  } while (0)

__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  int* o = out + (w * 32 + lane) * 6;
  o[0] = __shfl_xor_sync(0xffffffffu, lane * 10, 5);
  o[1] = __shfl_down_sync(0xffffffffu, lane * 10, 3);
  o[2] = __shfl_up_sync(0xffffffffu, lane * 10, 2, 16);
  o[3] = __shfl_sync(0xffffffffu, lane * 10, 7, 8);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5] = __any_sync(0xffffffffu, lane == 31 && w == 1) * 2 + __all_sync(0xffffffffu, lane < 32);
}

void test_shuffles() {
  std::vector<int> out(64 * 6);
  MX_LAUNCH(dim3(1), dim3(64), 0, nullptr, shuffle_kernel)(out.data());
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, w = t / 32;
    const int* o = &out[t * 6];
    CHECK(o[0] == (lane ^ 5) * 10, "xor lane %d got %d", lane, o[0]);
    CHECK(o[1] == (lane + 3 < 32 ? lane + 3 : lane) * 10, "down lane %d got %d", lane, o[1]);
    CHECK(o[2] == (lane % 16 >= 2 ? lane - 2 : lane) * 10, "up lane %d got %d", lane, o[2]);
    CHECK(o[3] == (lane / 8 * 8 + 7) * 10, "idx lane %d got %d", lane, o[3]);
    CHECK(static_cast<unsigned>(o[4]) == ballot, "ballot got %x", o[4]);
    CHECK(o[5] == (w == 1 ? 3 : 1), "any/all warp %d got %d", w, o[5]);
  }
}

__global__ void index_and_atomic_kernel(int* ids, float* total) {
  __shared__ float block_total;
  if (threadIdx.x == 0 && threadIdx.y == 0) block_total = 0.0f;
  __syncthreads();
  atomicAdd(&block_total, 1.0f);
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int b = blockIdx.y * gridDim.x + blockIdx.x;
  ids[b * blockDim.x * blockDim.y + t] = b * 1000 + t;
  __syncthreads();
  if (t == 0) atomicAdd(total, block_total);
}

void test_indices_and_atomics() {
  std::vector<int> ids(6 * 64, -1);
  float total = 0.0f;
  MX_LAUNCH(dim3(3, 2), dim3(16, 4), 0, nullptr, index_and_atomic_kernel)(ids.data(), &total);
  for (int b = 0; b < 6; ++b)
    for (int t = 0; t < 64; ++t) CHECK(ids[b * 64 + t] == b * 1000 + t, "block %d thread %d", b, t);
  CHECK(total == 6 * 64, "atomic total %g", total);
}

// Reads dynamic and static shared memory before writing it (must see the poison, in every block: a value written
// by the previous block must not leak), then after writing it.
__global__ void smem_poison_kernel(float* out) {
  MX_DYNAMIC_SMEM(smem);
  __shared__ float fixed[32];
  float* s = reinterpret_cast<float*>(smem);
  float* o = out + (blockIdx.x * 32 + threadIdx.x) * 4;
  o[0] = s[threadIdx.x];
  o[1] = fixed[threadIdx.x];
  __syncthreads();
  s[threadIdx.x] = 1.0f;
  fixed[threadIdx.x] = 2.0f;
  __syncthreads();
  o[2] = s[(threadIdx.x + 1) % 32];
  o[3] = fixed[(threadIdx.x + 1) % 32];
}

void test_smem_poison() {
  std::vector<float> out(3 * 32 * 4, 0.0f);
  MX_LAUNCH(dim3(3), dim3(32), 32 * sizeof(float), nullptr, smem_poison_kernel)(out.data());
  for (int i = 0; i < 3 * 32; ++i) {
    const float* o = &out[i * 4];
    CHECK(std::isnan(o[0]) && std::isnan(o[1]), "thread %d read %g / %g from unwritten shared memory", i, o[0], o[1]);
    CHECK(o[2] == 1.0f && o[3] == 2.0f, "thread %d", i);
  }
}

void test_barrier_race_is_caught_by_random_wake_order() {
  const int blocks = 8, n = 256;
  std::vector<float> x(blocks * n, 1.0f), out(blocks);
  int wrong_runs = 0;
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    emu::configure({false, true, seed});
    MX_LAUNCH(dim3(blocks), dim3(128), 0, nullptr, block_sum_kernel<false>)(x.data(), out.data(), n);
    for (int b = 0; b < blocks; ++b) CHECK(out[b] == n, "correct reduction gave %g", out[b]);
    MX_LAUNCH(dim3(blocks), dim3(128), 0, nullptr, block_sum_kernel<true>)(x.data(), out.data(), n);
    bool wrong = false;
    for (int b = 0; b < blocks; ++b) wrong |= out[b] != n;
    wrong_runs += wrong;
  }
  CHECK(wrong_runs > 0, "the reduction without its barrier was right in all 8 seeds");
}

// C[32x32] = A[32x32] (row-major) * B[32x32] (column-major), one warp per 16x16 tile of C.
template <bool kAssumeLayout>
__global__ void wmma_gemm_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  const int warp = threadIdx.x / 32, tm = warp / 2, tn = warp % 2;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k = 0; k < 32; k += 16) {
    wmma::load_matrix_sync(fa, a + tm * 16 * 32 + k, 32);
    wmma::load_matrix_sync(fb, b + tn * 16 * 32 + k, 32);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 2.0f;  // elementwise: layout-independent
  float* tile = c + tm * 16 * 32 + tn * 16;
  if (kAssumeLayout) {  // wrong on purpose: lane l holds row l / 2, columns (l % 2) * 8 ...
    const int lane = threadIdx.x % 32;
    for (int i = 0; i < 8; ++i) tile[(lane / 2) * 32 + (lane % 2) * 8 + i] = acc.x[i];
  } else {
    wmma::store_matrix_sync(tile, acc, 32, wmma::mem_row_major);
  }
}

void test_wmma() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<__nv_bfloat16> a(32 * 32), b(32 * 32);
  for (auto& v : a) v = __float2bfloat16(normal(rng));
  for (auto& v : b) v = __float2bfloat16(normal(rng));
  std::vector<double> ref(32 * 32, 0.0);
  for (int i = 0; i < 32; ++i)
    for (int j = 0; j < 32; ++j)
      for (int k = 0; k < 32; ++k)
        ref[i * 32 + j] += 2.0 * __bfloat162float(a[i * 32 + k]) * __bfloat162float(b[j * 32 + k]);
  int layout_caught = 0;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    emu::configure({false, true, seed});
    std::vector<float> c(32 * 32, 0.0f);
    MX_LAUNCH(dim3(1), dim3(128), 0, nullptr, wmma_gemm_kernel<false>)(a.data(), b.data(), c.data());
    double err = 0;
    for (int i = 0; i < 32 * 32; ++i) err = std::max(err, std::abs(c[i] - ref[i]));
    CHECK(err < 1e-4, "seed %d: WMMA GEMM max error %g", static_cast<int>(seed), err);
    MX_LAUNCH(dim3(1), dim3(128), 0, nullptr, wmma_gemm_kernel<true>)(a.data(), b.data(), c.data());
    err = 0;
    for (int i = 0; i < 32 * 32; ++i) err = std::max(err, std::abs(c[i] - ref[i]));
    layout_caught += err > 1e-2;
  }
  CHECK(layout_caught == 3, "a kernel assuming a fragment layout matched the reference (%d of 3 seeds caught)",
        layout_caught);
}

int main() {
  test_shuffles();
  test_indices_and_atomics();
  test_smem_poison();
  test_barrier_race_is_caught_by_random_wake_order();
  test_wmma();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("harness: all checks passed\n");
  return 0;
}
