// CUDA emulation: g++ compiles our .cu kernel sources as C++ and runs them on the CPU, one block at a time.
// See ../../../README.md ("CUDA without a GPU") and the design note it cites. Kernels include
// "cuda/kernel_prelude.h", which picks this header when MISTRAL_EXT_EMULATE is defined.
//
// Two execution modes, same semantics:
//   fibers  - one coroutine per CUDA thread on the calling OS thread, switched at every barrier, shuffle, vote and
//             WMMA call. With `shuffle_wake` the order in which threads resume after each switch point is random,
//             so a fixed schedule cannot hide a missing barrier. A barrier that some live thread never reaches
//             (divergent __syncthreads) is reported and the process aborts instead of hanging.
//   threads - one OS thread per CUDA thread with std::barrier: slow, but ThreadSanitizer sees every shared-memory
//             access, so a missing __syncthreads is reported as a data race (tests/emu/).
//
// Emulated: __shared__ (static storage: valid because blocks run one at a time) and dynamic shared memory, poisoned
// with 0xFF bytes (NaN for floats) before every block (static __shared__ only outside templates, see below);
// __syncthreads, __syncwarp; full-warp shuffles and votes; atomics on global and shared memory; the math intrinsics
// below; nvcuda::wmma 16x16x16 fragments whose element layout is drawn at random per run (code that assumes a
// layout gets wrong answers); a misaligned 16-byte vector access aborts, as it faults on the GPU.
//
// The subset our kernels stay inside:
//   - full-warp masks (0xffffffff) on every *_sync intrinsic, block sizes a multiple of 32;
//   - tensor cores only through WMMA (no mma.sync / ldmatrix / cp.async / inline PTX);
//   - no communication between blocks of one launch (partials are merged by a second launch);
//   - shared memory through MX_DYNAMIC_SMEM (poisoned everywhere); launches through MX_LAUNCH.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "cuda/emu/emu_options.h"

// Static shared variables live in one ELF section of the module, which the runtime poisons before every block.
// GCC ignores the section of static locals in templates: those are not poisoned, so our (template) kernels take
// all their shared memory through MX_DYNAMIC_SMEM.
#undef __shared__
#define __shared__ static __attribute__((section("mistral_ext_emu_shared"), aligned(16)))
#define __launch_bounds__(...)
#define __syncthreads() ::emu::sync_block()
#define __syncwarp(...) ::emu::sync_warp()
#define MX_LAST_ERROR() cudaSuccess

namespace emu {

struct ThreadState {
  uint3 thread_idx;
  int lane;
  int warp;
  unsigned parity = 0;  // which half of the warp's exchange buffer the next shuffle uses
};

struct LaunchState {
  dim3 grid, block;
  uint3 block_idx;
  unsigned char* dynamic_smem;
  size_t dynamic_smem_bytes;
};

ThreadState& self();
LaunchState& launch_state();

void sync_block();
void sync_warp();
// Every lane publishes 8 bytes; returns the value of lane `src` (after a warp barrier). Entries of exited lanes
// are stale.
uint64_t warp_exchange(uint64_t value, int src);
// Shared per-warp scratch for WMMA staging (floats), valid between warp barriers.
float* warp_scratch();
constexpr int kWarpScratchFloats = 2 * 3 * 256;

// Runs a launch and adds it to the record (take_launches, emu_options.h).
void run(dim3 grid, dim3 block, size_t smem, const char* kernel, const std::function<void()>& body);

// WMMA element layout: for a fragment kind (0 = a, 1 = b, 2 = accumulator), slot i of lane l holds element
// element[kind][l][i] (row-major index in its 16x16 tile): a random permutation per run.
struct WmmaLayout {
  uint8_t element[3][32][8];
};
const WmmaLayout& wmma_layout();

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "emu: only full-warp masks are supported, got 0x%08x\n", mask);
    std::abort();
  }
}

inline void check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "emu: misaligned 16-byte access at %p (a GPU would fault)\n", p);
    std::abort();
  }
}

template <typename T>
inline T shuffle_from(T v, int src) {
  static_assert(sizeof(T) <= 8, "emu: shuffled values must be at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

#define threadIdx (::emu::self().thread_idx)
#define blockIdx (::emu::launch_state().block_idx)
#define blockDim (::emu::launch_state().block)
#define gridDim (::emu::launch_state().grid)
constexpr int warpSize = 32;

#define MX_DYNAMIC_SMEM(name) unsigned char* name = ::emu::launch_state().dynamic_smem
// The kernel is the last argument so a template kernel's commas need no parentheses.
#define MX_LAUNCH(grid, block, smem, stream, ...)                         \
  ::emu::Launch{(grid), (block), static_cast<size_t>(smem), #__VA_ARGS__, \
                [&](auto&&... args) { __VA_ARGS__(args...); }}

namespace emu {
template <typename F>
struct Launch {
  dim3 grid, block;
  size_t smem;
  const char* name;
  F kernel;
  template <typename... Args>
  void operator()(Args... args) {
    run(grid, block, smem, name, [&] { kernel(args...); });
  }
};
template <typename F>
Launch(dim3, dim3, size_t, const char*, F) -> Launch<F>;
}  // namespace emu

// ---- warp intrinsics (full masks only) ----
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  emu::check_mask(mask);
  const int lane = emu::self().lane;
  return emu::shuffle_from(v, (lane / width) * width + (src % width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  emu::check_mask(mask);
  const int lane = emu::self().lane;
  int src = lane ^ lane_mask;
  if (src >= (lane / width + 1) * width) src = lane;
  return emu::shuffle_from(v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  emu::check_mask(mask);
  const int lane = emu::self().lane;
  int src = lane + static_cast<int>(delta);
  if (src >= (lane / width + 1) * width) src = lane;
  return emu::shuffle_from(v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  emu::check_mask(mask);
  const int lane = emu::self().lane;
  int src = lane - static_cast<int>(delta);
  if (src < (lane / width) * width) src = lane;
  return emu::shuffle_from(v, src);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  emu::check_mask(mask);
  unsigned bits = 0;
  // 32 exchanges would be slow; one exchange of the predicate per lane, read back by every lane.
  const uint64_t mine = predicate ? 1 : 0;
  for (int src = 0; src < 32; ++src) bits |= static_cast<unsigned>(emu::warp_exchange(mine, src) & 1u) << src;
  return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == 0xffffffffu; }

// ---- atomics ----
template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
inline T atomicMax(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (old < value && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}

// ---- math intrinsics: exact on the CPU (GPU approximation error is not modelled) ----
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
// Each rounds once, as on the GPU, where nvcc never fuses them into a multiply-add.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// ---- WMMA, 16x16x16 only ----
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use>
constexpr int kind_of() {
  if constexpr (std::is_same_v<Use, matrix_a>) return 0;
  else if constexpr (std::is_same_v<Use, matrix_b>) return 1;
  else return 2;
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emu: only 16x16x16 WMMA fragments are emulated");
  using element_type = T;
  static constexpr int num_elements = 8;
  T x[num_elements];
};

template <typename Use, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& value) {
  for (auto& e : f.x) e = static_cast<T>(value);
}

// Element (r, c) of a 16x16 operand in memory.
template <typename T>
inline T element_at(const T* p, unsigned ldm, int r, int c, bool row_major_mem) {
  return row_major_mem ? p[r * ldm + c] : p[c * ldm + r];
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads need a layout_t");
  emu::sync_warp();
  constexpr int kind = kind_of<Use>();
  const int lane = emu::self().lane;
  const bool row = std::is_same_v<Layout, row_major>;
  for (int i = 0; i < 8; ++i) {
    const int e = emu::wmma_layout().element[kind][lane][i];
    f.x[i] = element_at(p, ldm, e / 16, e % 16, row);
  }
  emu::sync_warp();
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t layout) {
  emu::sync_warp();
  const int lane = emu::self().lane;
  for (int i = 0; i < 8; ++i) {
    const int e = emu::wmma_layout().element[2][lane][i];
    f.x[i] = element_at(p, ldm, e / 16, e % 16, layout == mem_row_major);
  }
  emu::sync_warp();
}

template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  emu::sync_warp();
  const int lane = emu::self().lane;
  for (int i = 0; i < 8; ++i) {
    const int e = emu::wmma_layout().element[2][lane][i];
    const int r = e / 16, c = e % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[i];
  }
  emu::sync_warp();
}

inline float as_float(float v) { return v; }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float as_float(__half v) { return __half2float(v); }

// d = a * b + c: every lane stages its elements in per-warp memory; after a warp barrier each lane computes the
// elements it holds of d in fp32; a second barrier keeps the staging area until all lanes have read it.
template <typename T, typename La, typename Lb>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, La>& a,
                     const fragment<matrix_b, 16, 16, 16, T, Lb>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  const auto& layout = emu::wmma_layout();
  const int lane = emu::self().lane;
  float* stage = emu::warp_scratch() + (emu::self().parity & 1) * 3 * 256;
  emu::self().parity ^= 1;
  for (int i = 0; i < 8; ++i) {
    stage[layout.element[0][lane][i]] = as_float(a.x[i]);
    stage[256 + layout.element[1][lane][i]] = as_float(b.x[i]);
    stage[512 + layout.element[2][lane][i]] = c.x[i];
  }
  emu::sync_warp();
  for (int i = 0; i < 8; ++i) {
    const int e = layout.element[2][lane][i], r = e / 16, col = e % 16;
    float acc = stage[512 + e];
    for (int k = 0; k < 16; ++k) acc += stage[r * 16 + k] * stage[256 + k * 16 + col];
    d.x[i] = acc;
  }
  emu::sync_warp();
}
}  // namespace nvcuda::wmma
