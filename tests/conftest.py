import os
import secrets

import pytest
import torch

import mistral_ext  # noqa: F401  (registers the ops)

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32,) + LOW_PRECISION


def _kernel_backends():
    """cpu: the CPU kernels. emu: the CUDA kernel sources run by the CPU emulator (mistral_ext._emu; required when
    MISTRAL_EXT_EMU=1, as in CI). cuda: the CUDA kernels, when a GPU is present."""
    backends = ["cpu"]
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
GPU_KERNEL_SETS = [b for b in KERNEL_BACKENDS if b != "cpu"]


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


@pytest.fixture(params=KERNEL_BACKENDS)
def kernels(request, fresh_seed):
    """The ops to test: mistral_ext.ops (CPU), the emulated CUDA kernels, or the CUDA kernels. The emulator gets this
    test's seed, so the wake order of its threads and its WMMA fragment layouts change from run to run."""
    if request.param == "cpu":
        from mistral_ext import ops

        return ops
    if request.param == "emu":
        import mistral_ext._emu as emu

        emu.configure(threads=False, shuffle_wake=True, seed=fresh_seed)
        return torch.ops.mistral_ext_emu
    return OnDevice(torch.ops.mistral_ext, "cuda")


@pytest.fixture(autouse=True)
def fresh_seed():
    """A fresh random seed for every test, printed so a failure can be replayed with MISTRAL_EXT_SEED=<seed>."""
    seed = int(os.environ.get("MISTRAL_EXT_SEED", secrets.randbits(31)))
    torch.manual_seed(seed)
    print(f"seed={seed} (rerun with MISTRAL_EXT_SEED={seed})")
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
