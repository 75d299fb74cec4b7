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
  (an id outside the table gives a NaN row, a ring row outside the caches is not written, a prefill layout whose
  chunks do not fit ``q`` attends nothing). ``seq_lens`` and ``start_pos`` share one device.
- CPU code paths: the CPU kernels are compiled once per instruction set (``generic``, and on x86-64 ``avx2`` and
  ``avx512``); the best one this CPU runs is used, unless the environment variable ``MISTRAL_EXT_CPU_PATH`` names
  another (read at import). ``cpu_paths()``, ``cpu_path()`` and ``set_cpu_path()`` see and change it.
- RoPE uses the half-split convention of HF Llama/Mistral: the pair ``(x[i], x[i + D/2])`` is rotated by angle
  ``pos * theta ** (-2i / D)``. Checkpoints in the interleaved convention are permuted at load.
"""

from __future__ import annotations

import math
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
    "decode_layers",
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


def decode_layers(
    x: Tensor, residual: Tensor, norms: list[Tensor], eps: float, weights: list[Tensor | None], parts: list[int],
    k_caches: list[Tensor], v_caches: list[Tensor], rows: Tensor, positions: Tensor, cache_rows: Tensor, n_heads: int,
    theta: float, window: int | None,
) -> tuple[Tensor, Tensor]:
    """One decode step of a stack of L transformer blocks (``mistral_ext.model.TransformerBlock``'s), as one op (CPU
    only). Each block computes the fused qkv projection, ``rope_cache_write``, ``attention_decode``, wo, ``rms_norm``
    with the residual, w13, ``silu_mul``, w2 and ``rms_norm`` by the norm after it, with the pieces those ops' own
    kernels run, so the result is the Python blocks' bit for bit; the threads stay in one parallel region for the
    whole step. ``x [R, dim]`` is the stream normed by the first block's attention_norm, one token for each of R
    rows of the caches: token r for row ``rows[r]`` (int64 on the host, distinct; rows left out are idle), at
    ``positions[r]``, its K/V going to ring row ``cache_rows[r]`` (of that row's ring). ``norms`` holds 2L vectors,
    block l's ffn_norm and the norm after it (block l + 1's attention_norm, or the final norm); block l writes its
    K/V into ``k_caches[l]``/``v_caches[l]`` (all of one shape). Each block's four matrices (wqkv, wo, w13, w2) come
    in ``parts`` (4L counts, each >= 1: a matrix kept as row blocks in different formats has several) as
    consecutive ``(weight, None, None)`` triples of ``weights`` for a dense part (as ``dense_linear`` takes it) or
    ``(qweight, scales, mins)`` for a quantized one (as ``quant_linear``); a matrix's parts' outputs lie side by
    side. Returns ``(out, residual_out)`` of the last block as ``rms_norm`` does."""
    return _ops.decode_layers(x, residual, norms, eps, weights, parts, k_caches, v_caches, rows, positions,
                              cache_rows, n_heads, theta, window)


# ---- fake implementations, for torch.compile, meta tensors and CUDA graphs ----
# Each checks the shape, dtype and device contract its kernels check (csrc/op_checks.h), raising the same exception
# type with a message that names the op and the argument, so a compiled model fails the way an eager one does.
# Index values are the kernels' to check: a fake tensor has none.

_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_TENSORS = ("seq_lens", "start_pos", "positions", "cache_rows", "ids", "rows")


def _same_device(op: str, **tensors: Tensor | None) -> None:
    """One device for all tensors, except that index tensors may also be on the CPU."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    used = {d for name, d in devices.items() if name not in _INDEX_TENSORS or d.type != "cpu"}
    if len(used) > 1:
        listed = ", ".join(f"`{name}` on {device}" for name, device in devices.items())
        raise ValueError(f"mistral_ext.{op}: all tensors must be on one device, got {listed}")


def _activation(op: str, name: str, t: Tensor, dims: int | None = None) -> None:
    torch._check_type(t.dtype in _ACTIVATION_DTYPES,
                      lambda: f"mistral_ext.{op}: `{name}` must be float32, bfloat16 or float16, got {t.dtype}")
    torch._check_value(dims is None or t.dim() == dims,
                       lambda: f"mistral_ext.{op}: `{name}` must have {dims} dimensions, got shape {tuple(t.shape)}")
    torch._check_value(t.is_contiguous(), lambda: f"mistral_ext.{op}: `{name}` must be contiguous")


def _same_dtype(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    torch._check_type(t.dtype == ref.dtype, lambda: f"mistral_ext.{op}: `{name}` has dtype {t.dtype} but "
                                                    f"`{ref_name}` has {ref.dtype}; they must match")


def _check_index(op: str, name: str, t: Tensor, n) -> None:
    torch._check_type(t.dtype == torch.long, lambda: f"mistral_ext.{op}: `{name}` must be int64, got {t.dtype}")
    torch._check_value(t.dim() == 1 and t.shape[0] == n,
                       lambda: f"mistral_ext.{op}: `{name}` must have shape [{n}], got {tuple(t.shape)}")


def _new_kv(op: str, k: Tensor, v: Tensor) -> None:
    _activation(op, "k", k, 3)
    _activation(op, "v", v, 3)
    torch._check_value(v.shape == k.shape, lambda: f"mistral_ext.{op}: `v` shape {tuple(v.shape)} differs from `k` "
                                                   f"shape {tuple(k.shape)}")
    _same_dtype(op, "v", v, "k", k)


def _caches(op: str, k_cache: Tensor, v_cache: Tensor, k: Tensor, k_name: str, match_heads: bool = True) -> None:
    _activation(op, "k_cache", k_cache, 4)
    _activation(op, "v_cache", v_cache, 4)
    torch._check_value(v_cache.shape == k_cache.shape, lambda: f"mistral_ext.{op}: `v_cache` shape "
                                                               f"{tuple(v_cache.shape)} differs from `k_cache` shape")
    _same_dtype(op, "k_cache", k_cache, k_name, k)
    _same_dtype(op, "v_cache", v_cache, k_name, k)
    torch._check_value((not match_heads or k_cache.shape[2] == k.shape[-2]) and k_cache.shape[3] == k.shape[-1],
                       lambda: f"mistral_ext.{op}: cache {tuple(k_cache.shape)} does not match `{k_name}` "
                               f"{tuple(k.shape)}")


def _rope_params(op: str, head_dim, theta: float) -> None:
    torch._check_value(head_dim % 2 == 0 and head_dim > 0, lambda: f"mistral_ext.{op}: head_dim must be even")
    torch._check_value(math.isfinite(theta) and theta > 1, lambda: f"mistral_ext.{op}: `theta` must be finite and > 1")


def _window(op: str, window: int | None, slots) -> None:
    torch._check_value(window is None or 1 <= window <= slots,
                       lambda: f"mistral_ext.{op}: `window` must be >= 1 or None and at most the {slots} cache slots")


def _attention(op: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, window: int | None) -> None:
    _activation(op, "q", q, 3)
    _caches(op, k_cache, v_cache, q, "q", match_heads=False)
    torch._check_value(q.shape[1] % k_cache.shape[2] == 0, lambda: f"mistral_ext.{op}: {q.shape[1]} query heads "
                                                                   f"are not a multiple of {k_cache.shape[2]} KV heads")
    _window(op, window, k_cache.shape[1])


@torch.library.register_fake("mistral_ext::rms_norm")
def _rms_norm_fake(x, residual, weight, eps):
    _same_device("rms_norm", x=x, residual=residual, weight=weight)
    _activation("rms_norm", "x", x)
    _activation("rms_norm", "weight", weight, 1)
    _same_dtype("rms_norm", "weight", weight, "x", x)
    torch._check_value(x.dim() >= 1, lambda: "mistral_ext.rms_norm: `x` must have at least one dimension")
    torch._check_value(weight.shape[0] == x.shape[-1],
                       lambda: f"mistral_ext.rms_norm: `weight` has {weight.shape[0]} entries but `x` has last "
                               f"dimension {x.shape[-1]}")
    if residual is not None:
        _activation("rms_norm", "residual", residual)
        _same_dtype("rms_norm", "residual", residual, "x", x)
        torch._check_value(residual.shape == x.shape, lambda: f"mistral_ext.rms_norm: `residual` shape "
                                                              f"{tuple(residual.shape)} differs from `x` shape")
    torch._check_value(math.isfinite(eps) and eps > 0, lambda: "mistral_ext.rms_norm: `eps` must be finite and > 0")
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("mistral_ext::rope")
def _rope_fake(q, k, positions, theta):
    _same_device("rope", q=q, k=k, positions=positions)
    _activation("rope", "q", q, 3)
    _activation("rope", "k", k, 3)
    _same_dtype("rope", "k", k, "q", q)
    torch._check_value(k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2],
                       lambda: f"mistral_ext.rope: `q` {tuple(q.shape)} and `k` {tuple(k.shape)} must agree on "
                               f"tokens and head_dim ([T, H, D])")
    _rope_params("rope", q.shape[2], theta)
    _check_index("rope", "positions", positions, q.shape[0])
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("mistral_ext::cache_write")
def _cache_write_fake(k, v, k_cache, v_cache, cache_rows):
    _same_device("cache_write", k=k, v=v, k_cache=k_cache, v_cache=v_cache, cache_rows=cache_rows)
    _new_kv("cache_write", k, v)
    _caches("cache_write", k_cache, v_cache, k, "k")
    _check_index("cache_write", "cache_rows", cache_rows, k.shape[0])


@torch.library.register_fake("mistral_ext::rope_cache_write")
def _rope_cache_write_fake(q, k, v, k_cache, v_cache, positions, cache_rows, theta):
    op = "rope_cache_write"
    _same_device(op, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, positions=positions, cache_rows=cache_rows)
    _activation(op, "q", q, 3)
    _new_kv(op, k, v)
    _same_dtype(op, "k", k, "q", q)
    _caches(op, k_cache, v_cache, k, "k")
    torch._check_value(k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2],
                       lambda: f"mistral_ext.{op}: `q` {tuple(q.shape)} and `k` {tuple(k.shape)} must agree on tokens "
                               f"and head_dim ([T, H, D])")
    _rope_params(op, q.shape[2], theta)
    _check_index(op, "positions", positions, q.shape[0])
    _check_index(op, "cache_rows", cache_rows, q.shape[0])
    return torch.empty_like(q)


@torch.library.register_fake("mistral_ext::attention_prefill")
def _attention_prefill_fake(q, k, v, k_cache, v_cache, seq_lens, start_pos, window):
    op = "attention_prefill"
    _same_device(op, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, start_pos=start_pos)
    _attention(op, q, k_cache, v_cache, window)
    _new_kv(op, k, v)
    _same_dtype(op, "k", k, "q", q)
    torch._check_value(k.shape[0] == q.shape[0] and k.shape[1] == k_cache.shape[2] and k.shape[2] == q.shape[2],
                       lambda: f"mistral_ext.{op}: `k` and `v` must be [T, Hkv, D], got {tuple(k.shape)}")
    _check_index(op, "seq_lens", seq_lens, k_cache.shape[0])
    _check_index(op, "start_pos", start_pos, k_cache.shape[0])
    torch._check_value(seq_lens.device == start_pos.device,
                       lambda: f"mistral_ext.{op}: `seq_lens` is on {seq_lens.device} but `start_pos` on "
                               f"{start_pos.device}; both must be on one device")
    return torch.empty_like(q)


@torch.library.register_fake("mistral_ext::attention_decode")
def _attention_decode_fake(q, k_cache, v_cache, positions, window):
    _same_device("attention_decode", q=q, k_cache=k_cache, v_cache=v_cache, positions=positions)
    _attention("attention_decode", q, k_cache, v_cache, window)
    torch._check_value(q.shape[0] == k_cache.shape[0],
                       lambda: f"mistral_ext.attention_decode: `q` has {q.shape[0]} tokens but the cache has batch "
                               f"{k_cache.shape[0]}; decode takes one token per sequence")
    _check_index("attention_decode", "positions", positions, k_cache.shape[0])
    return torch.empty_like(q)


@torch.library.register_fake("mistral_ext::silu_mul")
def _silu_mul_fake(x):
    _activation("silu_mul", "x", x)
    torch._check_value(x.dim() >= 1 and x.shape[-1] % 2 == 0,
                       lambda: f"mistral_ext.silu_mul: the last dimension of `x` must be even, got {tuple(x.shape)}")
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.register_fake("mistral_ext::dense_linear")
def _dense_linear_fake(x, weight):
    _same_device("dense_linear", x=x, weight=weight)
    _activation("dense_linear", "x", x, 2)
    _activation("dense_linear", "weight", weight, 2)
    torch._check_value(x.shape[1] == weight.shape[1],
                       lambda: f"mistral_ext.dense_linear: `x` has {x.shape[1]} features but `weight` "
                               f"{tuple(weight.shape)} has K = {weight.shape[1]}")
    return x.new_empty(x.shape[0], weight.shape[0])


def _check_quantized(op: str, qweight: Tensor, scales: Tensor, mins: Tensor | None) -> int:
    """The shape contract of a quantized matrix (csrc/op_checks.h's check_quantized_weight); returns K."""
    torch._check_type(qweight.dtype in (torch.int8, torch.uint8),
                      lambda: f"mistral_ext.{op}: `qweight` must be int8 (q8_0) or uint8 (4-bit), got {qweight.dtype}")
    torch._check_type(scales.dtype == torch.float16, lambda: f"mistral_ext.{op}: `scales` must be float16")
    torch._check_value(qweight.dim() == 2 and scales.dim() == 2, lambda: f"mistral_ext.{op}: `qweight` and `scales` "
                                                                         f"must be 2-D")
    torch._check_value(qweight.is_contiguous() and scales.is_contiguous(),
                       lambda: f"mistral_ext.{op}: `qweight` and `scales` must be contiguous")
    k = scales.shape[1] * 32
    torch._check_value(qweight.shape[0] == scales.shape[0] and
                       qweight.shape[1] * (1 if qweight.dtype == torch.int8 else 2) == k,
                       lambda: f"mistral_ext.{op}: `qweight` {tuple(qweight.shape)} does not match `scales` "
                               f"{tuple(scales.shape)}")
    if mins is not None:
        torch._check_value(qweight.dtype == torch.uint8, lambda: f"mistral_ext.{op}: `mins` belong to the 4-bit q4_1 "
                                                                 f"format; q8_0 (int8 `qweight`) has none")
        torch._check_type(mins.dtype == torch.float16, lambda: f"mistral_ext.{op}: `mins` must be float16")
        torch._check_value(mins.shape == scales.shape and mins.is_contiguous(),
                           lambda: f"mistral_ext.{op}: `mins` must be contiguous with the shape of `scales`")
    return k


@torch.library.register_fake("mistral_ext::quant_linear")
def _quant_linear_fake(x, qweight, scales, mins):
    _same_device("quant_linear", x=x, qweight=qweight, scales=scales, mins=mins)
    _activation("quant_linear", "x", x, 2)
    k = _check_quantized("quant_linear", qweight, scales, mins)
    torch._check_value(x.shape[1] == k, lambda: f"mistral_ext.quant_linear: `x` has {x.shape[1]} features but the "
                                                f"weight has K = {k}")
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("mistral_ext::quant_embedding")
def _quant_embedding_fake(ids, qweight, scales, mins, dtype):
    _same_device("quant_embedding", ids=ids, qweight=qweight, scales=scales, mins=mins)
    torch._check_type(dtype in _ACTIVATION_DTYPES, lambda: "mistral_ext.quant_embedding: `dtype` must be float32, "
                                                           "bfloat16 or float16")
    torch._check_value(ids.dim() == 1, lambda: f"mistral_ext.quant_embedding: `ids` must be 1-D, got {tuple(ids.shape)}")
    _check_index("quant_embedding", "ids", ids, ids.shape[0])
    k = _check_quantized("quant_embedding", qweight, scales, mins)
    return scales.new_empty(ids.shape[0], k, dtype=dtype)


_DECODE_MATRICES = ("wqkv", "wo", "w13", "w2")


@torch.library.register_fake("mistral_ext::decode_layers")
def _decode_layers_fake(x, residual, norms, eps, weights, parts, k_caches, v_caches, rows, positions, cache_rows,
                        n_heads, theta, window):
    op = "decode_layers"
    _same_device(op, x=x, residual=residual, rows=rows, positions=positions, cache_rows=cache_rows,
                 **{f"norms[{i}]": t for i, t in enumerate(norms)},
                 **{f"weights[{i}]": t for i, t in enumerate(weights) if t is not None},
                 **{f"k_caches[{i}]": t for i, t in enumerate(k_caches)},
                 **{f"v_caches[{i}]": t for i, t in enumerate(v_caches)})
    _activation(op, "x", x, 2)
    _activation(op, "residual", residual, 2)
    _same_dtype(op, "residual", residual, "x", x)
    torch._check_value(residual.shape == x.shape, lambda: f"mistral_ext.{op}: `residual` shape {tuple(residual.shape)} "
                                                          f"differs from `x` shape {tuple(x.shape)}")
    torch._check_value(math.isfinite(eps) and eps > 0, lambda: f"mistral_ext.{op}: `eps` must be finite and > 0")
    layers = len(k_caches)
    torch._check_value(layers >= 1, lambda: f"mistral_ext.{op}: no layers (`k_caches` is empty)")
    torch._check_value(len(v_caches) == layers, lambda: f"mistral_ext.{op}: {len(v_caches)} `v_caches` for {layers} "
                                                        f"`k_caches`")
    torch._check_value(len(norms) == 2 * layers, lambda: f"mistral_ext.{op}: `norms` has {len(norms)} tensors; "
                                                         f"{layers} layers need {2 * layers}")
    torch._check_value(len(parts) == 4 * layers, lambda: f"mistral_ext.{op}: `parts` has {len(parts)} entries; "
                                                         f"{layers} layers need {4 * layers}")
    for i, n in enumerate(parts):
        torch._check_value(n >= 1, lambda: f"mistral_ext.{op}: `{_DECODE_MATRICES[i % 4]}` of layer {i // 4} has {n} "
                                           f"parts; each matrix has at least one")
    torch._check_value(len(weights) == 3 * sum(parts), lambda: f"mistral_ext.{op}: `weights` has {len(weights)} "
                                                               f"entries; `parts` needs {3 * sum(parts)}")
    torch._check_value(n_heads >= 1, lambda: f"mistral_ext.{op}: `n_heads` must be >= 1, got {n_heads}")
    cache = k_caches[0]
    for k_cache, v_cache in zip(k_caches, v_caches):
        _activation(op, "k_caches", k_cache, 4)
        _activation(op, "v_caches", v_cache, 4)
        _same_dtype(op, "k_caches", k_cache, "x", x)
        _same_dtype(op, "v_caches", v_cache, "x", x)
        torch._check_value(k_cache.shape == cache.shape and v_cache.shape == cache.shape,
                           lambda: f"mistral_ext.{op}: the caches of a layer differ from `k_caches[0]`")
    batch, dim = x.shape
    _, slots, hkv, head_dim = cache.shape
    torch._check_value(batch <= cache.shape[0], lambda: f"mistral_ext.{op}: `x` has {batch} tokens but the caches "
                                                        f"have {cache.shape[0]} rows")
    for norm in norms:
        _activation(op, "norms", norm, 1)
        _same_dtype(op, "norms", norm, "x", x)
        torch._check_value(norm.shape[0] == dim, lambda: f"mistral_ext.{op}: a norm has {norm.shape[0]} entries but "
                                                         f"`x` has {dim} features")
    entry = 0
    for layer in range(layers):
        hidden = None
        for m, name in enumerate(_DECODE_MATRICES):
            k = (dim, n_heads * head_dim, dim, hidden)[m]
            n_rows = 0
            for _ in range(parts[4 * layer + m]):
                w, scales, mins = weights[entry : entry + 3]
                torch._check_value(w is not None, lambda: f"mistral_ext.{op}: weight entry {entry} is None")
                torch._check_value(scales is not None or mins is None,
                                   lambda: f"mistral_ext.{op}: weight entry {entry} has mins but no scales")
                if scales is not None:
                    part_k = _check_quantized(op, w, scales, mins)
                else:
                    _activation(op, "weights", w, 2)
                    part_k = w.shape[1]
                torch._check_value(part_k == k, lambda: f"mistral_ext.{op}: a part of `{name}` of layer {layer} has "
                                                        f"K = {part_k}; it takes {k} features")
                n_rows += w.shape[0]
                entry += 3
            if m == 0:
                need = (n_heads + 2 * hkv) * head_dim
                torch._check_value(n_rows == need, lambda: f"mistral_ext.{op}: `wqkv` has {n_rows} rows; {n_heads} "
                                                           f"query heads and the cache's {hkv} KV heads of {head_dim} "
                                                           f"need {need}")
            elif m == 2:
                torch._check_value(n_rows % 2 == 0 and n_rows > 0, lambda: f"mistral_ext.{op}: `w13` of layer {layer} "
                                                                           f"has {n_rows} rows; it holds w1 and w3")
                hidden = n_rows // 2
            else:
                torch._check_value(n_rows == dim, lambda: f"mistral_ext.{op}: `{name}` of layer {layer} has {n_rows} "
                                                          f"rows; it makes the {dim} features of `x`")
    torch._check_value(n_heads % hkv == 0, lambda: f"mistral_ext.{op}: {n_heads} query heads are not a multiple of "
                                                   f"{hkv} KV heads")
    _rope_params(op, head_dim, theta)
    _window(op, window, slots)
    _check_index(op, "rows", rows, batch)
    _check_index(op, "positions", positions, batch)
    _check_index(op, "cache_rows", cache_rows, batch)
    return torch.empty_like(x), torch.empty_like(x)
