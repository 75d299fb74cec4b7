"""build_info() tells the truth about what was compiled."""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import mistral_ext
from mistral_ext import _C
from fatbin import embedded_cuda_code

INFO = mistral_ext.build_info()


OPS = ("rms_norm", "rope", "cache_write", "rope_cache_write", "attention_prefill", "attention_decode", "silu_mul",
       "dense_linear", "quant_linear", "quant_embedding")


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


# The instruction sets each CPU code path is compiled for (csrc/cpu/cpu_path.h), as /proc/cpuinfo names them.
PATH_FEATURES = {
    "generic": [],
    "avx2": ["avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "popcnt"],
}
PATH_FEATURES["avx512"] = PATH_FEATURES["avx2"] + ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"]


def cpuinfo_flags() -> set:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.fail("no flags line in /proc/cpuinfo")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the avx2/avx512 paths are x86-64 only")
def test_every_cpu_path_this_cpu_runs_is_enabled():
    """The paths the kernels fixture runs are those /proc/cpuinfo allows (so no path this CPU has goes untested),
    and the vector width of each path is the one it is compiled for."""
    paths = mistral_ext.cpu_paths()
    assert list(paths) == ["generic", "avx2", "avx512"]
    flags = cpuinfo_flags()
    for name, facts in paths.items():
        lacking = [f for f in PATH_FEATURES[name] if f not in flags]
        assert bool(facts["missing_features"]) == bool(lacking), (name, facts, lacking)
    assert {n: f["vector_floats"] for n, f in paths.items()} == {"generic": 8, "avx2": 8, "avx512": 16}
    runnable = [n for n, f in paths.items() if not f["missing_features"]]
    assert mistral_ext.cpu_path() == runnable[-1] or "MISTRAL_EXT_CPU_PATH" in os.environ


def test_cpu_path_is_chosen_by_the_environment():
    run = lambda value: subprocess.run([sys.executable, "-c", "import mistral_ext; print(mistral_ext.cpu_path())"],
                                       env=dict(os.environ, MISTRAL_EXT_CPU_PATH=value), capture_output=True, text=True)
    out = run("generic")
    assert out.returncode == 0 and out.stdout.strip() == "generic", out.stderr
    out = run("sse9")
    assert out.returncode != 0 and "MISTRAL_EXT_CPU_PATH: unknown CPU path 'sse9'; this build has: generic" in out.stderr
    with pytest.raises(ValueError, match="unknown CPU path 'sse9'"):
        mistral_ext.set_cpu_path("sse9")


def test_path_instructions_stay_in_their_path():
    """Vector (VEX/EVEX), mask and BMI instructions appear only in functions of the avx2/avx512 namespaces: the
    inline functions of torch and the standard library, merged across the paths by the linker, keep the baseline, so
    the module runs on any x86-64 CPU."""
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump (binutils)")
    listing = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    extended = re.compile(r"^(v\w+|k\w+|shlx|shrx|sarx|rorx|andn|bextr|blsi|blsr|blsmsk|bzhi|pdep|pext|mulx|lzcnt|"
                          r"popcnt)$")
    function, inside, outside = "", {"avx2": 0, "avx512": 0}, {}
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line[line.index("<") + 1 : -2]
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[1].split() or not extended.match(fields[1].split()[0]):
            continue
        path = next((p for p in inside if f"mistral_ext::{p}::" in function), None)
        if path:
            inside[path] += 1
        else:
            outside.setdefault(function, fields[1].strip())
    assert not outside, f"{len(outside)} functions outside the avx2/avx512 paths use their instructions: " + \
        "; ".join(f"{f} ({i})" for f, i in list(outside.items())[:5])
    assert all(inside.values()), inside  # the check sees the paths' own instructions
