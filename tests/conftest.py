import os
import secrets
import zlib

import pytest
import torch

import mistral_ext  # noqa: F401  (registers the ops)

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32,) + LOW_PRECISION


# Every CPU code path compiled in; a test on a path this CPU cannot run is skipped, saying which features it lacks.
CPU_PATHS = list(mistral_ext.cpu_paths())


def _kernel_backends():
    """cpu-<path>: the CPU kernels on each code path (generic, avx2, avx512). emu: the CUDA kernel sources run by the
    CPU emulator (mistral_ext._emu; required when MISTRAL_EXT_EMU=1, as in CI). cuda: the CUDA kernels, when a GPU is
    present."""
    backends = [f"cpu-{path}" for path in CPU_PATHS]
    try:
        import mistral_ext._emu  # noqa: F401
        backends.append("emu")
    except ImportError:
        if os.environ.get("MISTRAL_EXT_EMU") == "1":
            raise
    if torch.cuda.is_available():
        backends.append("cuda")
    return backends


KERNEL_BACKENDS = _kernel_backends()
# The CUDA kernels as the model tests can run them: emulated on the CPU ("emu") and on a GPU ("cuda").
GPU_KERNEL_SETS = [b for b in KERNEL_BACKENDS if not b.startswith("cpu-")]


class OnDevice:
    """The ops of a torch.ops namespace, called with every tensor moved to `device` and the results moved back; tensors
    the op mutates (the caches) are copied back into the caller's tensors."""

    def __init__(self, namespace, device):
        self.namespace, self.device = namespace, device

    def __getattr__(self, name):
        op = getattr(self.namespace, name)

        def call(*args):
            moved = [a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args]
            out = op(*moved)
            for a, m in zip(args, moved):
                if isinstance(a, torch.Tensor) and m is not a:
                    a.copy_(m)
            return torch.utils._pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)

        return call


def _backend(param):
    if param.startswith("cpu-"):
        from mistral_ext import ops

        path = param.removeprefix("cpu-")
        missing = mistral_ext.cpu_paths()[path]["missing_features"]
        if missing:
            pytest.skip(f"this CPU lacks {', '.join(missing)} for the {path} path")
        before = mistral_ext.cpu_path()
        mistral_ext.set_cpu_path(path)
        yield ops
        mistral_ext.set_cpu_path(before)
    elif param == "emu":
        yield torch.ops.mistral_ext_emu
    else:
        yield OnDevice(torch.ops.mistral_ext, "cuda")


@pytest.fixture(params=KERNEL_BACKENDS)
def kernels(request):
    """The ops to test: mistral_ext.ops on one CPU code path, the emulated CUDA kernels, or the CUDA kernels."""
    yield from _backend(request.param)


@pytest.fixture(params=[b for b in KERNEL_BACKENDS if b.startswith("cpu-")])
def cpu_kernels(request):
    """mistral_ext.ops on each CPU code path, for the ops that have CPU kernels only (the quantized ones)."""
    yield from _backend(request.param)


@pytest.fixture(params=GPU_KERNEL_SETS)
def gpu_kernels(request):
    """The CUDA kernels alone (emulated, and on a GPU when present), for what they do differently from the CPU ones:
    quant_linear's float activations."""
    yield from _backend(request.param)


def ops_and_device(kernels):
    """The op namespace behind the `kernels` fixture and the device of its tensors, for tensors that must be made on
    that device (OnDevice would move a misaligned view into a fresh, aligned buffer)."""
    if isinstance(kernels, OnDevice):
        return kernels.namespace, kernels.device
    return kernels, "cpu"


def misaligned(t):
    """The same values in a contiguous tensor that starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


# One seed per run, printed in the header; every test and every module's fixtures draw from a seed derived from it and
# their name, so MISTRAL_EXT_SEED=<run seed> replays any test, alone or in the whole run.
RUN_SEED = int(os.environ.get("MISTRAL_EXT_SEED", secrets.randbits(31)))


def derived_seed(name: str) -> int:
    return (RUN_SEED ^ zlib.crc32(name.encode())) & 0x7FFFFFFF


def pytest_report_header(config):
    return f"mistral_ext: MISTRAL_EXT_SEED={RUN_SEED}; CPU paths {CPU_PATHS}, default {mistral_ext.cpu_path()}"


@pytest.fixture(scope="module", autouse=True)
def module_seed(request):
    """Seeds torch before the module's own fixtures are built (autouse fixtures come first in their scope)."""
    torch.manual_seed(derived_seed(request.node.nodeid))


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A fresh seed for every test (torch and the emulator's wake order and WMMA layouts), printed with the run seed
    that replays it."""
    seed = derived_seed(request.node.nodeid)
    torch.manual_seed(seed)
    if "emu" in KERNEL_BACKENDS:
        import mistral_ext._emu as emu

        emu.configure(threads=False, shuffle_wake=True, seed=seed)
    print(f"seed={seed} (rerun with MISTRAL_EXT_SEED={RUN_SEED})")
    return seed


def assert_matches_reference(out, ref64, ref_lowp=None, *, fp32_tol=1e-5, what="output"):
    """The comparison every kernel test uses.

    float32: max |out - ref64| <= fp32_tol * max(1, max |ref64|).
    bfloat16/float16 (flash-attention's rule): the error against the float64 reference is at most twice the error
    of the same reference computed naively in that dtype (ref_lowp), plus a floor of one unit of that dtype's
    epsilon at the output's scale.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if out.numel() else 0.0)
    if out.dtype == torch.float32:
        bound = fp32_tol * scale
    else:
        assert ref_lowp is not None, "low-precision comparisons need the reference run in that dtype"
        ref_err = (ref_lowp.double() - ref64).abs().max().item() if out.numel() else 0.0
        bound = 2 * ref_err + torch.finfo(out.dtype).eps * scale
    assert err <= bound, f"{what} ({out.dtype}): max error {err:.3g} exceeds bound {bound:.3g}"


def half_ulp(dtype: torch.dtype, magnitude: torch.Tensor) -> torch.Tensor:
    """The most that rounding a value of this magnitude to dtype can move it: half an ulp, and where the value is
    subnormal in dtype, half the subnormal spacing (tiny * eps; 2^-24 for float16), which is larger than eps/2 of it."""
    info = torch.finfo(dtype)
    return info.eps / 2 * magnitude + info.tiny * info.eps / 2


def allocation_peak(prof) -> int:
    """The peak of live bytes from the CPU allocator's allocation (+) and free (-) events, in order; frees of blocks
    allocated before profiling started are not reported. The fields torch.profiler._memory_profiler reads too."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_time_ns):
        live += e.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


# Tiny models for GGUF files: (args, the HF model, its tensors under GGUF names). Imports inside: the GPU check
# machine may lack transformers and gguf.
@pytest.fixture(scope="module")
def tiny():
    from gguf_files import gguf_tensors
    from tiny import random_hf_model, tiny_args

    args = tiny_args(vocab_size=96)  # every row a whole number of 32-element blocks
    hf = random_hf_model(args)
    return args, hf, gguf_tensors(hf, args)


@pytest.fixture(scope="module")
def tiny256():
    from gguf_files import gguf_tensors
    from tiny import random_hf_model, tiny_args

    args = tiny_args(vocab_size=96, dim=256, hidden_dim=512, head_dim=64)  # rows of 256-value super-blocks
    hf = random_hf_model(args)
    return args, hf, gguf_tensors(hf, args)
