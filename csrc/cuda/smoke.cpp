#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "checks.h"
#include "cuda/kernels.h"
#include "ops.h"

namespace mistral_ext {

at::Tensor cuda_smoke_cuda(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "mistral_ext._cuda_smoke: `x` must be float32, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.is_cuda() && x.is_contiguous(), "mistral_ext._cuda_smoke: `x` must be a contiguous CUDA tensor");
  TORCH_CHECK_VALUE(x.numel() < std::numeric_limits<int32_t>::max() * int64_t{256},
                    "mistral_ext._cuda_smoke: `x` is too large");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  C10_CUDA_CHECK(cuda::launch_smoke(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), x.numel(),
                                    c10::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace mistral_ext
