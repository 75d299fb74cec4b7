// The emulator's runtime: block scheduling, barriers, warp exchange and WMMA layouts (see cuda_emu.h).
#include "cuda/emu/cuda_emu.h"

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <utility>
#include <vector>

// x86-64 switches fibers with a few instructions of assembly; elsewhere (or with MISTRAL_EXT_EMU_UCONTEXT, which
// the tests use to keep the fallback working) with ucontext, which is slower: it saves the signal mask.
#if defined(__x86_64__) && !defined(MISTRAL_EXT_EMU_UCONTEXT)
#define MISTRAL_EXT_EMU_ASM_SWITCH 1
#else
#define MISTRAL_EXT_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

// The linker's bounds of the section that holds every static __shared__ variable of this module (see cuda_emu.h);
// weak, so a module without any gets null.
extern "C" char __start_mistral_ext_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_mistral_ext_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace emu {
namespace {

struct Barrier {  // fiber mode: counts arrivals; a generation bump releases the waiters
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Warp {
  Barrier barrier;
  std::unique_ptr<std::barrier<>> os_barrier;
  uint64_t exchange[2][32] = {};
  float scratch[kWarpScratchFloats] = {};
};

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ThreadState state;
  char* stack = nullptr;
  void* sp = nullptr;
#if !MISTRAL_EXT_EMU_ASM_SWITCH
  ucontext_t context;
#endif
  bool done = false;
  Barrier* waiting = nullptr;
  uint64_t waiting_generation = 0;
};

Options g_options;
WmmaLayout g_layout;
std::mt19937_64 g_rng{1};
std::mutex g_run_mutex;  // one emulated launch at a time: __shared__ is static storage

LaunchState g_launch;
bool g_threads_mode = false;
std::vector<Warp> g_warps;
Barrier g_block_barrier;
std::unique_ptr<std::barrier<>> g_block_os_barrier;
std::vector<unsigned char, std::allocator<unsigned char>> g_smem;
const std::function<void()>* g_body = nullptr;
std::vector<LaunchRecord> g_launch_log;
constexpr size_t kLaunchLogSize = 64;

std::vector<Fiber> g_fibers;
void* g_scheduler_sp = nullptr;
#if !MISTRAL_EXT_EMU_ASM_SWITCH
ucontext_t g_scheduler_context;
#endif

thread_local ThreadState* t_self = nullptr;
thread_local Fiber* t_fiber = nullptr;

void make_layouts() {
  for (int kind = 0; kind < 3; ++kind) {
    std::vector<int> perm(256);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), g_rng);
    for (int e = 0; e < 256; ++e) g_layout.element[kind][perm[e] / 8][perm[e] % 8] = static_cast<uint8_t>(e);
  }
}

struct Init {
  Init() {
    if (const char* s = std::getenv("MISTRAL_EXT_EMU_SEED")) g_options.seed = std::strtoull(s, nullptr, 10);
    if (const char* m = std::getenv("MISTRAL_EXT_EMU_MODE")) g_options.threads = std::string_view(m) == "threads";
    g_rng.seed(g_options.seed);
    make_layouts();
  }
} g_init;

}  // namespace
}  // namespace emu

// ---- context switch ----
#if MISTRAL_EXT_EMU_ASM_SWITCH
extern "C" void mistral_ext_emu_switch(void** save_sp, void* next_sp);
extern "C" void mistral_ext_emu_trampoline();
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack
// pointer in *save_sp, and resumes the context whose stack pointer is next_sp.
asm(R"(
.text
.hidden mistral_ext_emu_switch
.globl mistral_ext_emu_switch
.type mistral_ext_emu_switch,@function
mistral_ext_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mistral_ext_emu_switch,.-mistral_ext_emu_switch

.hidden mistral_ext_emu_trampoline
.globl mistral_ext_emu_trampoline
.type mistral_ext_emu_trampoline,@function
mistral_ext_emu_trampoline:
  movq %r13, %rdi
  callq *%r12
  ud2
.size mistral_ext_emu_trampoline,.-mistral_ext_emu_trampoline
)");
#endif

namespace emu {
namespace {

void fiber_main(Fiber* f);

void to_scheduler(Fiber* f) {
#if MISTRAL_EXT_EMU_ASM_SWITCH
  mistral_ext_emu_switch(&f->sp, g_scheduler_sp);
#else
  swapcontext(&f->context, &g_scheduler_context);
#endif
}

void resume(Fiber* f) {
#if MISTRAL_EXT_EMU_ASM_SWITCH
  mistral_ext_emu_switch(&g_scheduler_sp, f->sp);
#else
  swapcontext(&g_scheduler_context, &f->context);
#endif
}

void prepare(Fiber& f) {
#if MISTRAL_EXT_EMU_ASM_SWITCH
  const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top - 80);  // 16-byte aligned: the trampoline calls with rsp % 16 == 0
  sp[0] = 0x1F80u | (uint64_t{0x037F} << 32);        // default MXCSR and x87 control word
  sp[1] = sp[2] = sp[5] = sp[6] = 0;                 // r15 r14 . . rbx rbp
  sp[3] = reinterpret_cast<uint64_t>(&f);            // r13: the trampoline's argument
  sp[4] = reinterpret_cast<uint64_t>(&fiber_main);   // r12: the function it calls
  sp[7] = reinterpret_cast<uint64_t>(&mistral_ext_emu_trampoline);
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_main), 1, &f);
#endif
}

void release_if_complete(Barrier& b) {
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

void fiber_wait(Barrier& b) {
  Fiber* f = t_fiber;
  f->waiting = &b;
  f->waiting_generation = b.generation;
  ++b.arrived;
  release_if_complete(b);
  to_scheduler(f);  // even when this arrival released the barrier: the resume order is the scheduler's
}

void fiber_main(Fiber* f) {
  (*g_body)();
  f->done = true;
  --g_block_barrier.expected;
  release_if_complete(g_block_barrier);
  Barrier& w = g_warps[f->state.warp].barrier;
  --w.expected;
  release_if_complete(w);
  to_scheduler(f);
  std::abort();  // a finished fiber is never resumed
}

[[noreturn]] void report_deadlock() {
  std::fprintf(stderr,
               "emu: deadlock in block (%u, %u, %u): no thread can proceed. A __syncthreads or warp operation is not "
               "reached by every live thread (divergent barrier). Waiting threads:",
               g_launch.block_idx.x, g_launch.block_idx.y, g_launch.block_idx.z);
  for (const Fiber& f : g_fibers)
    if (!f.done)
      std::fprintf(stderr, " %u%s", f.state.thread_idx.x + g_launch.block.x * (f.state.thread_idx.y + g_launch.block.y * f.state.thread_idx.z),
                   f.waiting == &g_block_barrier ? "(block)" : "(warp)");
  std::fprintf(stderr, "\n");
  std::abort();
}

void run_block_fibers(int threads) {
  for (int i = 0; i < threads; ++i) {
    Fiber& f = g_fibers[i];
    f.done = false;
    f.waiting = nullptr;
    f.state.parity = 0;
    prepare(f);
  }
  std::vector<int> order(threads);
  std::iota(order.begin(), order.end(), 0);
  int live = threads;
  while (live > 0) {
    if (g_options.shuffle_wake) std::shuffle(order.begin(), order.end(), g_rng);
    bool progress = false;
    for (int i : order) {
      Fiber& f = g_fibers[i];
      if (f.done || (f.waiting && f.waiting->generation == f.waiting_generation)) continue;
      f.waiting = nullptr;
      t_fiber = &f;
      t_self = &f.state;
      resume(&f);
      progress = true;
      if (f.done) --live;
    }
    if (!progress) report_deadlock();
  }
  t_fiber = nullptr;
  t_self = nullptr;
}

ThreadState thread_state(const dim3& block, int linear) {
  ThreadState s;
  s.thread_idx = make_uint3(linear % block.x, (linear / block.x) % block.y, linear / (block.x * block.y));
  s.lane = linear % 32;
  s.warp = linear / 32;
  return s;
}

void begin_block(uint64_t index, int threads) {
  const dim3& g = g_launch.grid;
  g_launch.block_idx = make_uint3(index % g.x, (index / g.x) % g.y, index / (uint64_t{g.x} * g.y));
  std::fill(g_smem.begin(), g_smem.end(), 0xFF);  // uninitialised float reads become NaN
  if (__start_mistral_ext_emu_shared != nullptr)
    std::memset(__start_mistral_ext_emu_shared, 0xFF, __stop_mistral_ext_emu_shared - __start_mistral_ext_emu_shared);
  g_block_barrier = Barrier{threads, 0, 0};
  for (size_t w = 0; w < g_warps.size(); ++w) {
    const int lanes = std::min(32, threads - static_cast<int>(w) * 32);
    g_warps[w].barrier = Barrier{lanes, 0, 0};
    if (g_threads_mode) g_warps[w].os_barrier = std::make_unique<std::barrier<>>(lanes);
  }
  if (g_threads_mode) g_block_os_barrier = std::make_unique<std::barrier<>>(threads);
}

void run_fibers(uint64_t blocks, int threads) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  if (g_fibers.size() < static_cast<size_t>(threads)) g_fibers.resize(threads);
  while (stacks.size() < static_cast<size_t>(threads)) stacks.emplace_back(new char[kStackBytes]);
  for (int i = 0; i < threads; ++i) {
    g_fibers[i].stack = stacks[i].get();
    g_fibers[i].state = thread_state(g_launch.block, i);
  }
  for (uint64_t b = 0; b < blocks; ++b) {
    begin_block(b, threads);
    run_block_fibers(threads);
  }
}

void run_threads(uint64_t blocks, int threads) {
  std::barrier start(threads + 1), end(threads + 1);
  bool quit = false;
  std::vector<std::thread> workers;
  for (int i = 0; i < threads; ++i)
    workers.emplace_back([&, i] {
      ThreadState state = thread_state(g_launch.block, i);
      t_self = &state;
      for (;;) {
        start.arrive_and_wait();
        if (quit) break;
        state.parity = 0;
        (*g_body)();
        g_block_os_barrier->arrive_and_drop();
        g_warps[state.warp].os_barrier->arrive_and_drop();
        end.arrive_and_wait();
      }
    });
  for (uint64_t b = 0; b < blocks; ++b) {
    begin_block(b, threads);
    start.arrive_and_wait();
    end.arrive_and_wait();
  }
  quit = true;
  start.arrive_and_wait();
  for (auto& w : workers) w.join();
}

}  // namespace

void configure(const Options& options) {
  std::lock_guard<std::mutex> lock(g_run_mutex);
  g_options = options;
  g_rng.seed(options.seed);
  make_layouts();
}

const Options& options() { return g_options; }

ThreadState& self() { return *t_self; }
LaunchState& launch_state() { return g_launch; }
const WmmaLayout& wmma_layout() { return g_layout; }

float* warp_scratch() { return g_warps[t_self->warp].scratch; }

void sync_block() {
  if (g_threads_mode)
    g_block_os_barrier->arrive_and_wait();
  else
    fiber_wait(g_block_barrier);
}

void sync_warp() {
  Warp& w = g_warps[t_self->warp];
  if (g_threads_mode)
    w.os_barrier->arrive_and_wait();
  else
    fiber_wait(w.barrier);
}

uint64_t warp_exchange(uint64_t value, int src) {
  Warp& w = g_warps[t_self->warp];
  const unsigned p = t_self->parity & 1;
  t_self->parity ^= 1;
  w.exchange[p][t_self->lane] = value;
  sync_warp();
  return w.exchange[p][src];
}

std::vector<LaunchRecord> take_launches() {
  std::lock_guard<std::mutex> lock(g_run_mutex);
  return std::exchange(g_launch_log, {});
}

void run(dim3 grid, dim3 block, size_t smem, const char* kernel, const std::function<void()>& body) {
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (blocks == 0 || threads == 0) return;
  if (threads > 1024) {
    std::fprintf(stderr, "emu: %llu threads per block exceeds CUDA's 1024\n", static_cast<unsigned long long>(threads));
    std::abort();
  }
  std::lock_guard<std::mutex> lock(g_run_mutex);
  if (g_launch_log.size() == kLaunchLogSize) g_launch_log.erase(g_launch_log.begin());
  g_launch_log.push_back({kernel, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem});
  g_launch = LaunchState{grid, block, make_uint3(0, 0, 0), nullptr, smem};
  g_smem.assign(smem + 16, 0xFF);
  // 16-byte alignment, as extern __shared__ __align__(16) gives on the GPU
  const uintptr_t base = reinterpret_cast<uintptr_t>(g_smem.data());
  g_launch.dynamic_smem = g_smem.data() + ((16 - base % 16) % 16);
  g_warps = std::vector<Warp>((threads + 31) / 32);
  g_body = &body;
  g_threads_mode = g_options.threads;
  if (g_threads_mode)
    run_threads(blocks, static_cast<int>(threads));
  else
    run_fibers(blocks, static_cast<int>(threads));
  g_body = nullptr;
}

}  // namespace emu
