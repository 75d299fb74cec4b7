// The schema of every op, defined once and registered under two namespaces: mistral_ext (CPU and CUDA kernels,
// bindings.cpp) and mistral_ext_emu (the CUDA kernel sources run by the CPU emulator, cuda/emu/emu_bindings.cpp).
#pragma once

#include <torch/library.h>

namespace mistral_ext {

inline void define_ops(torch::Library& m) {
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor out, Tensor residual_out)");
  m.def("rope(Tensor q, Tensor k, Tensor positions, float theta) -> (Tensor q_out, Tensor k_out)");
  m.def(
      "cache_write(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_rows) -> ()");
  m.def(
      "rope_cache_write(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions,"
      " Tensor cache_rows, float theta) -> Tensor");
  m.def(
      "attention_prefill(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor seq_lens,"
      " Tensor start_pos, int? window) -> Tensor");
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor positions, int? window) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins) -> Tensor");
  m.def("quant_embedding(Tensor ids, Tensor qweight, Tensor scales, Tensor? mins, ScalarType dtype) -> Tensor");
}

// Ops with a CPU kernel only, in the mistral_ext namespace only. decode_layers (cpu/decode.cpp): a decode step of a
// stack of blocks, the ops above in one parallel region; on CUDA a captured graph replays the op by op step.
inline void define_cpu_ops(torch::Library& m) {
  m.def(
      "decode_layers(Tensor x, Tensor residual, Tensor[] norms, float eps, Tensor?[] weights, int[] parts,"
      " Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor rows, Tensor positions, Tensor cache_rows, int n_heads,"
      " float theta, int? window) -> (Tensor out, Tensor residual_out)");
}

}  // namespace mistral_ext
