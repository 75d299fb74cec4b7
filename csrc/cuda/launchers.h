// The tensor-level entries of the CUDA kernels: the same argument checks as the CPU kernels (op_checks.h), then
// a launch of the torch-free kernels in kernels.h. launchers.cpp builds twice: for CUDA tensors into
// mistral_ext::cuda, and under the emulator for CPU tensors into mistral_ext::emu_kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/kernels.h"

namespace mistral_ext::MX_KERNEL_NS {

std::tuple<at::Tensor, at::Tensor> rms_norm_op(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rope_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                           double theta);
void cache_write_op(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& cache_rows);
at::Tensor rope_cache_write_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                               at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& cache_rows,
                               double theta);
at::Tensor attention_prefill_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                const at::Tensor& start_pos, std::optional<int64_t> window);
at::Tensor attention_decode_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& positions, std::optional<int64_t> window);
at::Tensor silu_mul_op(const at::Tensor& x);
at::Tensor dense_linear_op(const at::Tensor& x, const at::Tensor& weight);
at::Tensor quant_linear_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& mins);
at::Tensor quant_embedding_op(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                              const std::optional<at::Tensor>& mins, at::ScalarType dtype);

// Registers every op above (by the schema names of bindings.cpp) with `m`, a TORCH_LIBRARY_IMPL block.
inline void register_kernels(torch::Library& m) {
  m.impl("rms_norm", &rms_norm_op);
  m.impl("rope", &rope_op);
  m.impl("cache_write", &cache_write_op);
  m.impl("rope_cache_write", &rope_cache_write_op);
  m.impl("attention_prefill", &attention_prefill_op);
  m.impl("attention_decode", &attention_decode_op);
  m.impl("silu_mul", &silu_mul_op);
  m.impl("dense_linear", &dense_linear_op);
  m.impl("quant_linear", &quant_linear_op);
  m.impl("quant_embedding", &quant_embedding_op);
}

}  // namespace mistral_ext::MX_KERNEL_NS
