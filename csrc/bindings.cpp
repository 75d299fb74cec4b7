// The one place every op is declared (TORCH_LIBRARY) and bound to its CPU and CUDA kernels, plus the build facts.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops.h"
#include "schemas.h"
#ifdef MISTRAL_EXT_WITH_CUDA
#include "cuda/launchers.h"
#endif

TORCH_LIBRARY(mistral_ext, m) {
  mistral_ext::define_ops(m);
  mistral_ext::define_cpu_ops(m);
}

TORCH_LIBRARY_IMPL(mistral_ext, CPU, m) {
  m.impl("rms_norm", &mistral_ext::rms_norm_cpu);
  m.impl("rope", &mistral_ext::rope_cpu);
  m.impl("cache_write", &mistral_ext::cache_write_cpu);
  m.impl("rope_cache_write", &mistral_ext::rope_cache_write_cpu);
  m.impl("attention_prefill", &mistral_ext::attention_prefill_cpu);
  m.impl("attention_decode", &mistral_ext::attention_decode_cpu);
  m.impl("silu_mul", &mistral_ext::silu_mul_cpu);
  m.impl("dense_linear", &mistral_ext::dense_linear_cpu);
  m.impl("quant_linear", &mistral_ext::quant_linear_cpu);
  m.impl("quant_embedding", &mistral_ext::quant_embedding_cpu);
  m.impl("decode_layers", &mistral_ext::decode_layers_cpu);
}

#ifdef MISTRAL_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(mistral_ext, CUDA, m) { mistral_ext::cuda::register_kernels(m); }
#endif

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t begin = 0;
  while (begin <= s.size()) {
    const size_t end = std::min(s.find(sep, begin), s.size());
    if (end > begin) parts.push_back(s.substr(begin, end - begin));
    begin = end + 1;
  }
  return parts;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = MISTRAL_EXT_VERSION;
  info["torch"] = MISTRAL_EXT_TORCH_VERSION;
  info["compiler"] = __VERSION__;
#ifdef MISTRAL_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = MISTRAL_EXT_NVCC_VERSION;
  std::vector<std::string> archs;
  for (const auto& a : split(MISTRAL_EXT_CUDA_ARCHS, ',')) archs.push_back("sm_" + a);
  info["cuda_archs"] = archs;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = std::vector<std::string>{};
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mistral_ext kernels; importing this module registers the torch.ops.mistral_ext ops";
  m.def("build_info", &build_info, "What this build compiled: version, torch, CUDA and its architectures");
  m.def(
      "cpu_paths",
      [] {
        pybind11::dict paths;  // best last
        for (const auto& p : mistral_ext::cpu_paths()) {
          pybind11::dict facts;
          facts["missing_features"] = p.missing_features;  // empty: this CPU runs the path
          facts["vector_floats"] = p.vector_floats;
          paths[pybind11::str(p.name)] = facts;
        }
        return paths;
      },
      "The CPU code paths compiled in, best last: the CPU features this machine lacks for each, its vector width");
  m.def("cpu_path", &mistral_ext::active_cpu_path, "The CPU code path the CPU kernels run");
  m.def("set_cpu_path", &mistral_ext::set_cpu_path, pybind11::arg("name"),
        "Run the CPU kernels on this code path (ValueError if unknown or unsupported by this CPU)");
}
