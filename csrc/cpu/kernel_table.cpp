// The table of this code path's kernels, read by cpu/dispatch.cpp.
#include "cpu/path_ops.h"

namespace mistral_ext::MISTRAL_EXT_CPU_PATH {

#define MISTRAL_EXT_STR2(x) #x
#define MISTRAL_EXT_STR(x) MISTRAL_EXT_STR2(x)

extern const CpuKernels kernels{MISTRAL_EXT_STR(MISTRAL_EXT_CPU_PATH), cpu::kVec, &rms_norm_cpu, &rope_cpu,
                                &cache_write_cpu, &rope_cache_write_cpu, &attention_prefill_cpu,
                                &attention_decode_cpu, &silu_mul_cpu, &dense_linear_cpu, &quant_linear_cpu,
                                &quant_embedding_cpu, &decode_layers_cpu};

}  // namespace mistral_ext::MISTRAL_EXT_CPU_PATH
