// The CPU entry point of every op calls the kernel of the active code path: by default the best path this CPU runs;
// mistral_ext/ops.py applies MISTRAL_EXT_CPU_PATH at import, and the tests switch paths to run each one.
#include <atomic>
#include <stdexcept>

#include "ops.h"

namespace mistral_ext {

namespace generic {
extern const CpuKernels kernels;
}
#ifdef MISTRAL_EXT_X86_CPU_PATHS
namespace avx2 {
extern const CpuKernels kernels;
}
namespace avx512 {
extern const CpuKernels kernels;
}
#endif

namespace {

struct Path {
  const CpuKernels* kernels;
  std::vector<std::string> missing;
};

#ifdef MISTRAL_EXT_X86_CPU_PATHS
// The features cpu/cpu_path.h compiles each path for, as this CPU (and its OS) reports them.
std::vector<std::string> missing_features(bool avx512) {
  __builtin_cpu_init();
  std::vector<std::string> missing;
  auto need = [&](bool present, const char* name) {
    if (!present) missing.push_back(name);
  };
  need(__builtin_cpu_supports("avx2"), "avx2");
  need(__builtin_cpu_supports("fma"), "fma");
  need(__builtin_cpu_supports("f16c"), "f16c");
  need(__builtin_cpu_supports("bmi"), "bmi");
  need(__builtin_cpu_supports("bmi2"), "bmi2");
  need(__builtin_cpu_supports("lzcnt"), "lzcnt");
  need(__builtin_cpu_supports("popcnt"), "popcnt");
  if (avx512) {
    need(__builtin_cpu_supports("avx512f"), "avx512f");
    need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    need(__builtin_cpu_supports("avx512vl"), "avx512vl");
    need(__builtin_cpu_supports("avx512dq"), "avx512dq");
    need(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
  }
  return missing;
}
#endif

const std::vector<Path>& paths() {
  static const std::vector<Path> all = {
      {&generic::kernels, {}},
#ifdef MISTRAL_EXT_X86_CPU_PATHS
      {&avx2::kernels, missing_features(false)},
      {&avx512::kernels, missing_features(true)},
#endif
  };
  return all;
}

const CpuKernels* best_path() {
  const CpuKernels* best = nullptr;
  for (const Path& p : paths())
    if (p.missing.empty()) best = p.kernels;
  return best;
}

std::atomic<const CpuKernels*> active{best_path()};

const CpuKernels& kernels() { return *active.load(std::memory_order_relaxed); }

}  // namespace

std::vector<CpuPath> cpu_paths() {
  std::vector<CpuPath> out;
  for (const Path& p : paths()) out.push_back({p.kernels->name, p.missing, p.kernels->vector_floats});
  return out;
}

std::string active_cpu_path() { return kernels().name; }

void set_cpu_path(const std::string& name) {
  std::string known;
  for (const Path& p : paths()) {
    if (name == p.kernels->name) {
      if (!p.missing.empty()) {
        std::string lacks;
        for (const auto& f : p.missing) lacks += (lacks.empty() ? "" : ", ") + f;
        throw std::invalid_argument("CPU path '" + name + "' needs CPU features this machine lacks: " + lacks);
      }
      active.store(p.kernels);
      return;
    }
    known += (known.empty() ? "" : ", ") + std::string(p.kernels->name);
  }
  throw std::invalid_argument("unknown CPU path '" + name + "'; this build has: " + known);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  return kernels().rms_norm(x, residual, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                            double theta) {
  return kernels().rope(q, k, positions, theta);
}

void cache_write_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& cache_rows) {
  kernels().cache_write(k, v, k_cache, v_cache, cache_rows);
}

at::Tensor rope_cache_write_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& cache_rows,
                                double theta) {
  return kernels().rope_cache_write(q, k, v, k_cache, v_cache, positions, cache_rows, theta);
}

at::Tensor attention_prefill_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 const at::Tensor& start_pos, std::optional<int64_t> window) {
  return kernels().attention_prefill(q, k, v, k_cache, v_cache, seq_lens, start_pos, window);
}

at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& positions, std::optional<int64_t> window) {
  return kernels().attention_decode(q, k_cache, v_cache, positions, window);
}

at::Tensor silu_mul_cpu(const at::Tensor& x) { return kernels().silu_mul(x); }

at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight) {
  return kernels().dense_linear(x, weight);
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& mins) {
  return kernels().quant_linear(x, qweight, scales, mins);
}

at::Tensor quant_embedding_cpu(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& mins, at::ScalarType dtype) {
  return kernels().quant_embedding(ids, qweight, scales, mins, dtype);
}

std::tuple<at::Tensor, at::Tensor> decode_layers_cpu(
    const at::Tensor& x, const at::Tensor& residual, at::TensorList norms, double eps,
    const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef parts, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& rows, const at::Tensor& positions, const at::Tensor& cache_rows,
    int64_t n_heads, double theta, std::optional<int64_t> window) {
  return kernels().decode_layers(x, residual, norms, eps, weights, parts, k_caches, v_caches, rows, positions, cache_rows,
                                 n_heads, theta, window);
}

}  // namespace mistral_ext
