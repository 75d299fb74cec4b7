// The kernels of the CPU code path being compiled (cpu/cpu_path.h), in namespace mistral_ext::<path>, each with the
// signature of the entry point in ops.h that dispatches to it. Every CPU kernel file includes this header last.
#pragma once

#include "ops.h"
#include "cpu/cpu_math.h"

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

decltype(mistral_ext::rms_norm_cpu) rms_norm_cpu;
decltype(mistral_ext::rope_cpu) rope_cpu;
decltype(mistral_ext::cache_write_cpu) cache_write_cpu;
decltype(mistral_ext::rope_cache_write_cpu) rope_cache_write_cpu;
decltype(mistral_ext::attention_prefill_cpu) attention_prefill_cpu;
decltype(mistral_ext::attention_decode_cpu) attention_decode_cpu;
decltype(mistral_ext::silu_mul_cpu) silu_mul_cpu;
decltype(mistral_ext::dense_linear_cpu) dense_linear_cpu;
decltype(mistral_ext::quant_linear_cpu) quant_linear_cpu;
decltype(mistral_ext::quant_embedding_cpu) quant_embedding_cpu;
decltype(mistral_ext::decode_layers_cpu) decode_layers_cpu;

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
