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

void configure(bool threads, bool shuffle_wake, uint64_t seed) {
  emu::configure(emu::Options{threads, shuffle_wake, seed});
}

pybind11::dict options() {
  const auto& o = emu::options();
  pybind11::dict d;
  d["threads"] = o.threads;
  d["shuffle_wake"] = o.shuffle_wake;
  d["seed"] = o.seed;
  return d;
}

}  // namespace

PYBIND11_MODULE(_emu, m) {
  m.doc() = "CUDA kernels run by the CPU emulator; importing registers torch.ops.mistral_ext_emu";
  m.def("configure", &configure, pybind11::arg("threads") = false, pybind11::arg("shuffle_wake") = true,
        pybind11::arg("seed") = 1,
        "Execution mode (fibers or OS threads), random wake order of fibers, and the seed of the wake order and "
        "of the WMMA fragment layouts");
  m.def("options", &options, "The current emulator options");
}
