"""build_info() tells the truth about what was compiled."""

import os

import pytest
import torch

import mistral_ext
from mistral_ext import _C
from fatbin import embedded_cuda_code

INFO = mistral_ext.build_info()


OPS = ("rms_norm", "rope", "cache_write", "rope_cache_write", "attention_prefill", "attention_decode", "silu_mul",
       "mlp_decode")


def test_versions():
    assert INFO["version"] == mistral_ext.__version__
    assert INFO["torch"] == torch.__version__, "built against another torch than the one imported: rebuild"


def test_cuda_facts_match_the_binary():
    code = embedded_cuda_code(_C.__file__)
    has_cuda_kernel = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"mistral_ext::{op}", "CUDA") for op in OPS)
    if INFO["cuda"]:
        assert torch.version.cuda is not None
        archs = [int(a.removeprefix("sm_")) for a in INFO["cuda_archs"]]
        assert archs, "CUDA build without architectures"
        assert sorted({arch for kind, arch in code if kind == "cubin"}) == sorted(archs)
        assert has_cuda_kernel
    else:
        assert INFO["cuda_archs"] == [] and INFO["cuda_version"] is None
        assert code == [] and not has_cuda_kernel


def test_cuda_built_exactly_when_asked_or_possible():
    switch = os.environ.get("MISTRAL_EXT_CUDA", "auto").lower()
    if switch in ("1", "0"):
        assert INFO["cuda"] == (switch == "1")
    else:
        nvcc = [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"]
        assert INFO["cuda"] == (torch.version.cuda is not None and any(map(os.path.exists, nvcc)))
    if INFO["cuda"] and "MISTRAL_EXT_CUDA_ARCHS" not in os.environ:
        assert INFO["cuda_archs"] == ["sm_80", "sm_90"]


def test_cpu_kernels_registered_for_every_op():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mistral_ext::{op}", "CPU"), op


def test_emulated_kernels_registered_for_every_op():
    """mistral_ext._emu (the CUDA sources under the CPU emulator) is built when the CUDA headers are found;
    MISTRAL_EXT_EMU=1 (CI) requires it."""
    try:
        import mistral_ext._emu  # noqa: F401
    except ImportError:
        assert os.environ.get("MISTRAL_EXT_EMU") != "1", "MISTRAL_EXT_EMU=1 but mistral_ext._emu was not built"
        return
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mistral_ext_emu::{op}", "CPU"), op
