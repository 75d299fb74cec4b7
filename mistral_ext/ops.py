"""The kernels of mistral_ext as typed Python functions.

Each function calls one op of ``torch.ops.mistral_ext``, which dispatches to the CPU or CUDA kernel by the device
of its tensors. ``mistral_ext.reference`` holds a plain-PyTorch function of the same name and signature for each
one: that is the spec the kernels are tested against. The fake (meta) implementations registered here let the
ops run under torch.compile and CUDA graphs.

Layouts used throughout:

- Activations are float32, bfloat16 or float16; every tensor of one call has the same dtype and device.
- Packed tokens: ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``. Sequence ``b`` owns ``seq_lens[b]`` consecutive tokens,
  at absolute positions ``start_pos[b], start_pos[b] + 1, ...``. Unequal lengths need no padding.
- Ring caches: ``k_cache``/``v_cache [B, S, Hkv, D]``. Position ``p`` of sequence ``b`` lives in slot ``p % S``.
  With a sliding window ``W`` (``W <= S``), a query at position ``i`` sees keys ``j`` with ``i - W < j <= i``: W keys,
  itself included. ``window=None`` is full causal attention, and then the cache must hold every position (``S`` is
  the context length).
- Metadata tensors (``seq_lens``, ``start_pos``, ``positions``, ``cache_rows``) are int64 vectors on the device of
  the activations or on the CPU. ``cache_rows[t]`` is the ring row ``b * S + slot`` token t writes (-1: none), the
  slot mapping ``mistral_ext.model.step_layout`` makes once per step. Metadata on the host is checked value by value
  (and uploaded by the CUDA ops); metadata on the GPU only in shape and dtype, so that a step needs no
  synchronisation and can be captured as a CUDA graph: the caller vouches for its values (RollingBufferCache.step
  makes them from checked host values), and the kernels never touch memory outside their tensors whatever they are
  (an id outside the table gives a NaN row, a ring row outside the caches is not written). ``attention_prefill``
  reads its layout back (it plans its blocks on the host), so its ``seq_lens``/``start_pos`` are best kept there.
- CPU code paths: the CPU kernels are compiled once per instruction set (``generic``, and on x86-64 ``avx2`` and
  ``avx512``); the best one this CPU runs is used, unless the environment variable ``MISTRAL_EXT_CPU_PATH`` names
  another (read at import). ``cpu_paths()``, ``cpu_path()`` and ``set_cpu_path()`` see and change it.
- RoPE uses the half-split convention of HF Llama/Mistral: the pair ``(x[i], x[i + D/2])`` is rotated by angle
  ``pos * theta ** (-2i / D)``. Checkpoints in the interleaved convention are permuted at load.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _C
from ._C import build_info

__all__ = [
    "build_info",
    "cpu_path",
    "cpu_paths",
    "set_cpu_path",
    "rms_norm",
    "rope",
    "cache_write",
    "rope_cache_write",
    "attention_prefill",
    "attention_decode",
    "silu_mul",
    "dense_linear",
    "quant_linear",
    "quant_embedding",
]

_ops = torch.ops.mistral_ext
assert _C  # importing _C registered the ops


def cpu_paths() -> dict[str, dict]:
    """The CPU code paths compiled in, best last: ``{name: {"missing_features": [...], "vector_floats": n}}``; a path
    runs on this CPU when it misses no feature."""
    return _C.cpu_paths()


def cpu_path() -> str:
    """The code path the CPU kernels run now."""
    return _C.cpu_path()


def set_cpu_path(name: str) -> None:
    """Runs the CPU kernels on path ``name``; ValueError when this build lacks it or this CPU cannot run it."""
    _C.set_cpu_path(name)


if os.environ.get("MISTRAL_EXT_CPU_PATH"):
    try:
        set_cpu_path(os.environ["MISTRAL_EXT_CPU_PATH"])
    except ValueError as e:
        raise ValueError(f"MISTRAL_EXT_CPU_PATH: {e}") from None


def rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Residual add fused with RMSNorm over the last dimension.

    ``h = x + residual`` (just ``x`` when ``residual`` is None), rounded to the activation dtype; returns
    ``(h * rsqrt(mean(h**2) + eps) * weight, h)``: the normalised output and the new residual stream.
    """
    return _ops.rms_norm(x, residual, weight, eps)


def rope(q: Tensor, k: Tensor, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """Rotary embedding of ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` at absolute ``positions [T]``."""
    return _ops.rope(q, k, positions, theta)


def cache_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_rows: Tensor) -> None:
    """Writes packed ``k``/``v [T, Hkv, D]`` into the rings in place: token t to ring row ``cache_rows[t]`` of
    ``k_cache.flatten(0, 1)`` (none for -1; no row twice)."""
    _ops.cache_write(k, v, k_cache, v_cache, cache_rows)


def rope_cache_write(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, cache_rows: Tensor,
    theta: float,
) -> Tensor:
    """``rope`` at ``positions [T]``, then ``cache_write`` of the rotated k and v to ``cache_rows [T]``, in one pass.
    Returns the rotated q. For decode steps: a prefill chunk must be attended before it is written."""
    return _ops.rope_cache_write(q, k, v, k_cache, v_cache, positions, cache_rows, theta)


def attention_prefill(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, start_pos: Tensor,
    window: int | None,
) -> Tensor:
    """Causal, windowed GQA attention of packed chunks ``q [T, Hq, D]`` with their own ``k``/``v [T, Hkv, D]`` and the
    keys already in the rings. Keys before ``start_pos[b]`` are read from the ring; the ring must not yet hold the
    chunk (call ``cache_write`` afterwards), so no in-window key is lost. Query head h uses KV head
    ``h // (Hq // Hkv)``. Scale ``1/sqrt(D)``. Returns ``[T, Hq, D]``."""
    return _ops.attention_prefill(q, k, v, k_cache, v_cache, seq_lens, start_pos, window)


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, window: int | None) -> Tensor:
    """One query per sequence, ``q [B, Hq, D]`` at ``positions [B]``, against its ring, which already holds that
    position's key and value. Returns ``[B, Hq, D]``."""
    return _ops.attention_decode(q, k_cache, v_cache, positions, window)


def silu_mul(x: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dimension (the fused w1/w3 projection)."""
    return _ops.silu_mul(x)


def dense_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x [T, K] @ weight.T`` for a dense ``weight [N, K]`` in its own dtype (float32, bfloat16 or float16, which
    may differ from x's), in fp32 arithmetic: a bf16 matrix is read as it is stored and widened in registers. The
    weights are read once per call whatever T (once per block of tokens for many), and row t of the result does not
    depend on T or on the other rows. Returns ``[T, N]`` in x's dtype."""
    return _ops.dense_linear(x, weight)


def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None) -> Tensor:
    """``x [T, K] @ W.T`` for a quantized ``W [N, K]`` (``mistral_ext.quant``: q8_0 when ``qweight`` is int8, q4_1
    when uint8 with ``mins``, q4_0 without). On the CPU the activations are quantized per block of 32 to int8 once
    per call and the blocks multiplied as integers, the weights read once whatever T; on CUDA the activations stay
    in float and the products accumulate in fp32. Row t of the result does not depend on T or on the other rows.
    Returns ``[T, N]`` in x's dtype."""
    return _ops.quant_linear(x, qweight, scales, mins)


def quant_embedding(ids: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Rows ``ids [T]`` of a quantized table ``[V, K]``, dequantized to ``dtype``: ``[T, K]``. ValueError for an id
    outside ``[0, V)``."""
    return _ops.quant_embedding(ids, qweight, scales, mins, dtype)


# ---- fake implementations: shapes only, for torch.compile, meta tensors and CUDA graphs ----


_INDEX_TENSORS = ("seq_lens", "start_pos", "positions", "cache_rows", "ids")


def _same_device(op: str, **tensors: Tensor | None) -> None:
    """One device for all tensors, except that index tensors may also be on the CPU."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    used = {d for name, d in devices.items() if name not in _INDEX_TENSORS or d.type != "cpu"}
    if len(used) > 1:
        listed = ", ".join(f"`{name}` on {device}" for name, device in devices.items())
        raise ValueError(f"mistral_ext.{op}: all tensors must be on one device, got {listed}")


@torch.library.register_fake("mistral_ext::rms_norm")
def _rms_norm_fake(x, residual, weight, eps):
    _same_device("rms_norm", x=x, residual=residual, weight=weight)
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("mistral_ext::rope")
def _rope_fake(q, k, positions, theta):
    _same_device("rope", q=q, k=k, positions=positions)
    return torch.empty_like(q), torch.empty_like(k)


def _check_index(op: str, name: str, t: Tensor, n) -> None:
    torch._check(t.dtype == torch.long and t.dim() == 1 and t.shape[0] == n,
                 lambda: f"mistral_ext.{op}: `{name}` must be int64 of shape [{n}], got {t.dtype} {tuple(t.shape)}")


@torch.library.register_fake("mistral_ext::cache_write")
def _cache_write_fake(k, v, k_cache, v_cache, cache_rows):
    _same_device("cache_write", k=k, v=v, k_cache=k_cache, v_cache=v_cache, cache_rows=cache_rows)
    _check_index("cache_write", "cache_rows", cache_rows, k.shape[0])


@torch.library.register_fake("mistral_ext::rope_cache_write")
def _rope_cache_write_fake(q, k, v, k_cache, v_cache, positions, cache_rows, theta):
    _same_device("rope_cache_write", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, positions=positions,
                 cache_rows=cache_rows)
    _check_index("rope_cache_write", "positions", positions, q.shape[0])
    _check_index("rope_cache_write", "cache_rows", cache_rows, q.shape[0])
    return torch.empty_like(q)


@torch.library.register_fake("mistral_ext::attention_prefill")
def _attention_prefill_fake(q, k, v, k_cache, v_cache, seq_lens, start_pos, window):
    _same_device("attention_prefill", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens,
                 start_pos=start_pos)
    return torch.empty_like(q)


@torch.library.register_fake("mistral_ext::attention_decode")
def _attention_decode_fake(q, k_cache, v_cache, positions, window):
    _same_device("attention_decode", q=q, k_cache=k_cache, v_cache=v_cache, positions=positions)
    torch._check(q.dim() == 3 and q.shape[0] == k_cache.shape[0],
                 lambda: f"mistral_ext.attention_decode: `q` has {q.shape[0]} tokens but the cache has batch "
                         f"{k_cache.shape[0]}; decode takes one token per sequence")
    _check_index("attention_decode", "positions", positions, k_cache.shape[0])
    return torch.empty_like(q)


@torch.library.register_fake("mistral_ext::silu_mul")
def _silu_mul_fake(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.register_fake("mistral_ext::dense_linear")
def _dense_linear_fake(x, weight):
    _same_device("dense_linear", x=x, weight=weight)
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"mistral_ext.dense_linear: `x` [T, K] and `weight` [N, K] must agree in K, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    return x.new_empty(x.shape[0], weight.shape[0])


def _check_quantized(op: str, qweight: Tensor, scales: Tensor, mins: Tensor | None) -> int:
    """The shape contract of a quantized matrix (the kernels check the same, csrc/op_checks.h); returns K."""
    torch._check(qweight.dim() == 2 and scales.dim() == 2, lambda: f"mistral_ext.{op}: `qweight` and `scales` must be 2-D")
    torch._check(qweight.dtype in (torch.int8, torch.uint8), lambda: f"mistral_ext.{op}: `qweight` must be int8 or uint8")
    torch._check(scales.dtype == torch.float16, lambda: f"mistral_ext.{op}: `scales` must be float16")
    k = scales.shape[1] * 32
    torch._check(qweight.shape[0] == scales.shape[0] and qweight.shape[1] * (1 if qweight.dtype == torch.int8 else 2) == k,
                 lambda: f"mistral_ext.{op}: `qweight` {tuple(qweight.shape)} does not match `scales` {tuple(scales.shape)}")
    if mins is not None:
        torch._check(qweight.dtype == torch.uint8 and mins.shape == scales.shape and mins.dtype == torch.float16,
                     lambda: f"mistral_ext.{op}: `mins` must be float16 like `scales`, with uint8 (4-bit) values")
    return k


@torch.library.register_fake("mistral_ext::quant_linear")
def _quant_linear_fake(x, qweight, scales, mins):
    _same_device("quant_linear", x=x, qweight=qweight, scales=scales, mins=mins)
    k = _check_quantized("quant_linear", qweight, scales, mins)
    torch._check(x.dim() == 2 and x.shape[1] == k, lambda: f"mistral_ext.quant_linear: `x` must be [T, {k}]")
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("mistral_ext::quant_embedding")
def _quant_embedding_fake(ids, qweight, scales, mins, dtype):
    _same_device("quant_embedding", ids=ids, qweight=qweight, scales=scales, mins=mins)
    k = _check_quantized("quant_embedding", qweight, scales, mins)
    torch._check(ids.dim() == 1 and ids.dtype == torch.long, lambda: "mistral_ext.quant_embedding: `ids` must be int64 [T]")
    return scales.new_empty(ids.shape[0], k, dtype=dtype)
