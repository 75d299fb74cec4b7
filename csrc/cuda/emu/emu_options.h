// How the CUDA emulator runs kernels (see cuda_emu.h), and what it ran. The options are also read from the
// environment at start-up: MISTRAL_EXT_EMU_MODE=threads|fibers and MISTRAL_EXT_EMU_SEED=<n>.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace emu {

struct Options {
  bool threads = false;      // OS-thread mode (for ThreadSanitizer) instead of fibers
  bool shuffle_wake = true;  // randomise the order in which fibers resume at every switch point
  uint64_t seed = 1;         // of the wake order and of the WMMA fragment layouts
  int64_t sm_count = 8;      // multiprocessors the launchers see (a GPU's cudaDevAttrMultiProcessorCount)
};
void configure(const Options& options);
const Options& options();

// The most recent launches (at most 64), so tests can check the grid a launcher chose. `kernel` is the launch's
// kernel expression as written in MX_LAUNCH, e.g. "decode_split_kernel<T, D, GP>".
struct LaunchRecord {
  const char* kernel;
  unsigned grid[3], block[3];
  size_t smem;
};
std::vector<LaunchRecord> take_launches();  // oldest first; empties the record

}  // namespace emu
