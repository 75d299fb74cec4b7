// Every op's CPU entry point (the CUDA ones are in cuda/launchers.h). Schemas live in schemas.h; semantics are
// defined by the plain-PyTorch spec in mistral_ext/reference.py. Each entry point (cpu/dispatch.cpp) calls the
// kernel of the active CPU code path.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace mistral_ext {

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps);

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                            double theta);

void cache_write_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& cache_rows);

at::Tensor rope_cache_write_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& cache_rows,
                                double theta);

at::Tensor attention_prefill_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 const at::Tensor& start_pos, std::optional<int64_t> window);

at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& positions, std::optional<int64_t> window);

at::Tensor silu_mul_cpu(const at::Tensor& x);

at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight);

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& mins);

at::Tensor quant_embedding_cpu(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& mins, at::ScalarType dtype);

std::tuple<at::Tensor, at::Tensor> decode_layers_cpu(
    const at::Tensor& x, const at::Tensor& residual, at::TensorList norms, double eps,
    const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef parts, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& rows, const at::Tensor& positions, const at::Tensor& cache_rows,
    int64_t n_heads, double theta, std::optional<int64_t> window);

// The CPU kernels of one code path: the same sources compiled for an instruction set (cpu/cpu_path.h).
struct CpuKernels {
  const char* name;
  int vector_floats;  // floats per vector register in the kernels' loops
  decltype(&rms_norm_cpu) rms_norm;
  decltype(&rope_cpu) rope;
  decltype(&cache_write_cpu) cache_write;
  decltype(&rope_cache_write_cpu) rope_cache_write;
  decltype(&attention_prefill_cpu) attention_prefill;
  decltype(&attention_decode_cpu) attention_decode;
  decltype(&silu_mul_cpu) silu_mul;
  decltype(&dense_linear_cpu) dense_linear;
  decltype(&quant_linear_cpu) quant_linear;
  decltype(&quant_embedding_cpu) quant_embedding;
  decltype(&decode_layers_cpu) decode_layers;
};

struct CpuPath {
  std::string name;
  std::vector<std::string> missing_features;  // what this CPU lacks for the path; empty: it can run
  int vector_floats;
};

std::vector<CpuPath> cpu_paths();             // every path compiled in, best last
std::string active_cpu_path();
void set_cpu_path(const std::string& name);   // std::invalid_argument for an unknown or unsupported path

}  // namespace mistral_ext
