// How the CUDA emulator runs kernels (see cuda_emu.h). Also read from the environment at start-up:
// MISTRAL_EXT_EMU_MODE=threads|fibers and MISTRAL_EXT_EMU_SEED=<n>.
#pragma once

#include <cstdint>

namespace emu {

struct Options {
  bool threads = false;      // OS-thread mode (for ThreadSanitizer) instead of fibers
  bool shuffle_wake = true;  // randomise the order in which fibers resume at every switch point
  uint64_t seed = 1;         // of the wake order and of the WMMA fragment layouts
};
void configure(const Options& options);
const Options& options();

}  // namespace emu
