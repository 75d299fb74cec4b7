// Every op's CPU entry point (the CUDA ones are in cuda/launchers.h). Schemas live in bindings.cpp; semantics are defined by
// the plain-PyTorch spec in mistral_ext/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace mistral_ext {

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps);

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                            double theta);

void cache_write_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& seq_lens, const at::Tensor& start_pos);

at::Tensor rope_cache_write_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& seq_lens, const at::Tensor& start_pos,
                                double theta);

at::Tensor attention_prefill_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 const at::Tensor& start_pos, std::optional<int64_t> window);

at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& positions, std::optional<int64_t> window);

at::Tensor silu_mul_cpu(const at::Tensor& x);

at::Tensor mlp_decode_cpu(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2);

}  // namespace mistral_ext
