// Included first by every .cu kernel file. Under nvcc: the CUDA headers. Under g++ with MISTRAL_EXT_EMULATE: the
// emulator (cuda/emu/cuda_emu.h), so the same kernel source runs on the CPU. Kernels use MX_LAUNCH and
// MX_DYNAMIC_SMEM instead of <<<>>> and `extern __shared__`; everything else is plain CUDA.
#pragma once

#ifdef MISTRAL_EXT_EMULATE
#include "cuda/emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define MX_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define MX_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#define MX_LAST_ERROR() cudaGetLastError()
#endif

#include <cstdint>

#include "cuda/kernels.h"
