// mistral_ext._emu: the CUDA kernel sources compiled for the CPU under the emulator, registered as
// torch.ops.mistral_ext_emu with the same schemas as torch.ops.mistral_ext. They take CPU tensors. For tests.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cuda/emu/emu_options.h"
#include "cuda/launchers.h"
#include "schemas.h"

TORCH_LIBRARY(mistral_ext_emu, m) { mistral_ext::define_ops(m); }

TORCH_LIBRARY_IMPL(mistral_ext_emu, CPU, m) { mistral_ext::emu_kernels::register_kernels(m); }

namespace {

namespace py = pybind11;

void configure(bool threads, bool shuffle_wake, uint64_t seed, int64_t sm_count) {
  if (sm_count < 1) throw py::value_error("mistral_ext._emu.configure: sm_count must be >= 1");
  emu::configure(emu::Options{threads, shuffle_wake, seed, sm_count});
}

py::dict options() {
  const auto& o = emu::options();
  py::dict d;
  d["threads"] = o.threads;
  d["shuffle_wake"] = o.shuffle_wake;
  d["seed"] = o.seed;
  d["sm_count"] = o.sm_count;
  return d;
}

py::tuple dims(const unsigned (&d)[3]) { return py::make_tuple(d[0], d[1], d[2]); }

py::list take_launches() {
  py::list out;
  for (const auto& r : emu::take_launches()) {
    py::dict d;
    d["kernel"] = r.kernel;
    d["grid"] = dims(r.grid);
    d["block"] = dims(r.block);
    d["smem"] = r.smem;
    out.append(d);
  }
  return out;
}

py::dict decode_splits(int64_t max_keys, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t sm_count) {
  namespace k = mistral_ext::emu_kernels;
  if (max_keys < 1 || batch < 1 || kv_heads < 1 || q_heads < kv_heads || q_heads % kv_heads || sm_count < 1)
    throw py::value_error("mistral_ext._emu.decode_splits: needs max_keys, batch, sm_count >= 1 and q_heads a "
                          "positive multiple of kv_heads");
  const auto plan = k::attention_decode_splits(max_keys, batch, q_heads, kv_heads, sm_count);
  py::dict d;
  d["splits"] = plan.splits;
  d["split_len"] = plan.split_len;
  d["heads_per_block"] = k::attention_decode_heads_per_block(q_heads / kv_heads);
  return d;
}

}  // namespace

PYBIND11_MODULE(_emu, m) {
  m.doc() = "CUDA kernels run by the CPU emulator; importing registers torch.ops.mistral_ext_emu";
  m.def("configure", &configure, py::arg("threads") = false, py::arg("shuffle_wake") = true, py::arg("seed") = 1,
        py::arg("sm_count") = 8,
        "Execution mode (fibers or OS threads), random wake order of fibers, the seed of the wake order and of the "
        "WMMA fragment layouts, and the multiprocessor count the launchers size their grids for (8 unless given)");
  m.def("options", &options, "The current emulator options");
  m.def("take_launches", &take_launches,
        "The most recent kernel launches (at most 64, oldest first) as dicts of kernel, grid, block and smem bytes; "
        "empties the record");
  m.def("decode_splits", &decode_splits, py::arg("max_keys"), py::arg("batch"), py::arg("q_heads"),
        py::arg("kv_heads"), py::arg("sm_count"),
        "The split-KV plan attention_decode launches for the longest sequence's max_keys valid keys on a GPU with "
        "sm_count multiprocessors: splits, split_len (keys per range) and heads_per_block");
}
