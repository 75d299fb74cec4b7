"""Quantized weights as the kernels hold them: a matrix ``[N, K]`` in blocks of 32 along K, each block with an fp16
scale (and for q4_1 an fp16 minimum). The content is that of GGUF's Q8_0, Q4_0 and Q4_1:

- ``q8_0``: ``w = d * q`` with ``q`` int8; ``qweight`` int8 ``[N, K]``.
- ``q4_0``: ``w = d * (q - 8)`` with ``q`` in 0..15; ``qweight`` uint8 ``[N, K / 2]``, 16 bytes per block: element
  ``j < 16`` of a block is the low nibble of its byte ``j``, element ``j >= 16`` the high nibble of byte ``j - 16``
  (GGUF's order).
- ``q4_1``: ``w = d * q + m``, values packed as in q4_0.

``scales`` (and ``mins`` for q4_1) are fp16 ``[N, K / 32]``. The format follows from the tensors: int8 values are
q8_0, uint8 values q4_1 when ``mins`` is given and q4_0 when not.

The layout interleaves rows in groups of ``GROUP = 8`` (the last group holds the ``N % 8`` rows left, if any), so
that one 32-byte vector load gives 4 bytes of each of 8 rows and an integer dot-product instruction leaves one
row's sum in each lane (llama.cpp's CPU repack does the same). A group of ``m`` rows occupies the bytes its rows
would in row-major order; inside it ``qweight`` runs ``[block][4-byte chunk][row][4 bytes]`` and ``scales``/``mins``
``[block][row]``. Rows ``8g..`` start group ``g``, so a slice of whole groups is a weight of its own. For ``N = 3``,
``K = 64`` in q4_0 (32 bytes a row, 2 blocks of 4 chunks): ``qweight`` holds row 0's bytes 0-3, row 1's bytes
0-3, row 2's bytes 0-3, row 0's bytes 4-7, ... row 2's bytes 28-31; ``scales`` holds ``d[0,0], d[1,0], d[2,0],
d[0,1], d[1,1], d[2,1]``. ``interleave``/``deinterleave`` convert from/to row-major.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .tracked import TrackedModule

BLOCK = 32
GROUP = 8  # rows interleaved together
CHUNK = 4  # bytes of one row next to each other in qweight
FORMATS = ("q8_0", "q4_0", "q4_1")
GGUF_BLOCK_BYTES = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2, "Q4_1": 4 + BLOCK // 2}


def format_of(qweight: Tensor, mins: Tensor | None) -> str:
    return "q8_0" if qweight.dtype == torch.int8 else ("q4_1" if mins is not None else "q4_0")


def _unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [..., K/2] -> values [..., K] in 0..15, in the block order above."""
    blocks = packed.reshape(*packed.shape[:-1], -1, BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def _pack_nibbles(values: Tensor) -> Tensor:
    """values [..., K] in 0..15 -> uint8 [..., K/2]."""
    blocks = values.to(torch.uint8).reshape(*values.shape[:-1], -1, BLOCK)
    return (blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2 :] << 4)).reshape(*values.shape[:-1], -1)


def dequantize(qweight: Tensor, scales: Tensor, mins: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weights ``[N, K]`` in ``dtype``, computed in float32 as GGUF's dequantization does (so a repacked GGUF
    tensor gives the very floats the dense loader produces), then cast."""
    return dequantize_rows(*deinterleave(qweight, scales, mins), dtype)


def dequantize_rows(qweight: Tensor, scales: Tensor, mins: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``dequantize`` of tensors in row-major order (``deinterleave``'s output, or some of its rows)."""
    fmt = format_of(qweight, mins)
    q = qweight.float() if fmt == "q8_0" else _unpack_nibbles(qweight).float()
    if fmt == "q4_0":
        q = q - 8
    n, k = q.shape
    d = scales.float()[:, :, None]
    w = d * q.reshape(n, k // BLOCK, BLOCK)
    if fmt == "q4_1":
        w = w + mins.float()[:, :, None]
    return w.reshape(n, k).to(dtype)


def _regroup(t: Tensor, unit: int, to_groups: bool) -> Tensor:
    n, width = t.shape
    full = n - n % GROUP
    parts = []
    for start, rows, m in ((0, full, GROUP), (full, n - full, n - full)):
        if rows:
            part = t[start : start + rows]
            shape = (rows // m, m, width // unit, unit) if to_groups else (rows // m, width // unit, m, unit)
            parts.append(part.reshape(shape).transpose(1, 2).reshape(rows, width))
    return torch.cat(parts) if parts else t.clone()


def _regroup_weight(qweight: Tensor, scales: Tensor, mins: Tensor | None,
                    to_groups: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    # qweight moves in chunks of CHUNK bytes, scales and mins one element at a time
    return (_regroup(qweight, CHUNK, to_groups), _regroup(scales, 1, to_groups),
            None if mins is None else _regroup(mins, 1, to_groups))


def interleave(qweight: Tensor, scales: Tensor, mins: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Row-major ``(qweight, scales, mins)`` -> the kernels' layout (above)."""
    return _regroup_weight(qweight, scales, mins, to_groups=True)


def deinterleave(qweight: Tensor, scales: Tensor, mins: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The kernels' layout -> row-major ``(qweight, scales, mins)``."""
    return _regroup_weight(qweight, scales, mins, to_groups=False)


def _check_format(fmt: str, n: int, k: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if k % BLOCK:
        raise ValueError(f"cannot quantize a [{n}, {k}] matrix: K = {k} is not a multiple of {BLOCK}")


def quantize(w: Tensor, fmt: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(qweight, scales, mins)`` of a float matrix ``[N, K]`` (K a multiple of 32), with ggml's rounding rules
    (quantize_row_*_ref); the values are computed with the fp16-rounded scale they will be multiplied by."""
    return interleave(*_quantize_rows(w, fmt))


def _inverse(d: Tensor) -> Tensor:
    """1 / d of the fp16 scales in float32, 0 where d is 0 (an all-zero block quantizes to zeros)."""
    d = d.float()
    return torch.where(d != 0, 1 / d, torch.zeros((), dtype=torch.float32))


def _quantize_rows(w: Tensor, fmt: str) -> tuple[Tensor, Tensor, Tensor | None]:
    n, k = w.shape
    _check_format(fmt, n, k)
    x = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    if fmt == "q8_0":
        d = (x.abs().amax(-1) / 127).half()
        inv = _inverse(d)
        q = torch.round(x * inv[..., None]).clamp(-127, 127).to(torch.int8)
        return q.reshape(n, k), d, None
    if fmt == "q4_0":  # the value of largest magnitude maps to -8, so the sign of the extreme is kept
        extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
        d = (extreme / -8).half()
        inv = _inverse(d)
        q = torch.floor(x * inv[..., None] + 8.5).clamp(0, 15)
        return _pack_nibbles(q.reshape(n, k)), d, None
    lo, hi = x.amin(-1), x.amax(-1)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    inv = _inverse(d)
    q = torch.floor((x - m.float()[..., None]) * inv[..., None] + 0.5).clamp(0, 15)
    return _pack_nibbles(q.reshape(n, k)), d, m


def from_gguf_blocks(data: Tensor, type_name: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor | None]:
    """GGUF Q8_0/Q4_0/Q4_1 bytes (uint8, rows of blocks) -> ``(qweight, scales, mins)``: the same content, repacked."""
    return interleave(*_split_gguf_blocks(data, type_name, shape))


def _split_gguf_blocks(data: Tensor, type_name: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor | None]:
    n, k = shape
    b = data.reshape(n, k // BLOCK, GGUF_BLOCK_BYTES[type_name])
    scales = b[:, :, :2].contiguous().view(torch.float16).reshape(n, k // BLOCK)
    if type_name == "Q8_0":
        return b[:, :, 2:].contiguous().view(torch.int8).reshape(n, k), scales, None
    if type_name == "Q4_0":
        return b[:, :, 2:].reshape(n, k // 2).contiguous(), scales, None
    mins = b[:, :, 2:4].contiguous().view(torch.float16).reshape(n, k // BLOCK)
    return b[:, :, 4:].reshape(n, k // 2).contiguous(), scales, mins


class QuantizedWeight(TrackedModule):
    """A quantized matrix ``[N, K]`` (buffers ``qweight``, ``scales``, ``mins``), used where a dense weight would be:
    ``mistral_ext.ops.quant_linear`` multiplies by it, ``quant_embedding`` gathers its rows."""

    def __init__(self, qweight: Tensor, scales: Tensor, mins: Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    @classmethod
    def quantize(cls, w: Tensor, fmt: str) -> "QuantizedWeight":
        return cls(*quantize(w, fmt))

    @classmethod
    def empty(cls, n: int, k: int, fmt: str) -> "QuantizedWeight":
        """Uninitialised ``[n, k]`` in format ``fmt``, on torch's default device (a loader fills it)."""
        _check_format(fmt, n, k)
        qweight = torch.empty(n, k, dtype=torch.int8) if fmt == "q8_0" else torch.empty(n, k // 2, dtype=torch.uint8)
        scales = torch.empty(n, k // BLOCK, dtype=torch.float16)
        return cls(qweight, scales, torch.empty_like(scales) if fmt == "q4_1" else None)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.qweight, self.scales, self.mins

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Rows ``start:stop``, sharing this weight's storage (for filling a fused matrix part by part): whole groups
        of the layout, so ``start`` and ``stop`` are multiples of GROUP, or ``stop`` is the last row."""
        n = self.shape[0]
        if start % GROUP or (stop % GROUP and stop != n) or not 0 <= start <= stop <= n:
            raise ValueError(f"rows {start}:{stop} of a {n}-row quantized weight are not whole groups of {GROUP} rows")
        return QuantizedWeight(*(None if t is None else t[start:stop] for t in self.tensors()))

    def permute_rows(self, permute: Callable[[Tensor], Tensor]) -> "QuantizedWeight":
        """A new weight whose row-major tensors are ``permute`` of this one's (a function that reorders whole rows)."""
        return QuantizedWeight(*interleave(*(None if t is None else permute(t) for t in deinterleave(*self.tensors()))))

    def copy_(self, other: "QuantizedWeight") -> "QuantizedWeight":
        if other.format != self.format or other.shape != self.shape:
            raise ValueError(f"cannot copy a {other.format} {tuple(other.shape)} weight into a {self.format} "
                             f"{tuple(self.shape)} one")
        for mine, theirs in zip(self.tensors(), other.tensors()):
            if mine is not None:
                mine.copy_(theirs)
        return self

    @property
    def format(self) -> str:
        return format_of(self.qweight, self.mins)

    @property
    def shape(self) -> torch.Size:
        n, k = self.scales.shape
        return torch.Size((n, k * BLOCK))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors() if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.qweight, self.scales, self.mins, dtype)

    def extra_repr(self) -> str:
        return f"{self.format}, shape={tuple(self.shape)}"
