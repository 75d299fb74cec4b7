import os
import secrets

import pytest
import torch

import mistral_ext  # noqa: F401  (registers the ops)

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32,) + LOW_PRECISION


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
