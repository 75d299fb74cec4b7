// Launch functions of the torch-free CUDA kernels (.cu files include CUDA headers only, so they compile in
// seconds). The .cpp launchers check tensors and pass raw pointers and the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mistral_ext::cuda {

// y = 2 * x + 1. Exists to prove the build -> link -> dispatch -> launch path until real kernels land.
cudaError_t launch_smoke(const float* x, float* y, int64_t n, cudaStream_t stream);

}  // namespace mistral_ext::cuda
