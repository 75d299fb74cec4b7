"""The spec: plain PyTorch, one function per op with the signature of ``mistral_ext.ops``, and a whole-sequence
model forward with an explicit mask and no cache.

It computes in the dtype of its inputs, so it runs in float64 for ground truth and in bfloat16/float16 to
measure how much error a naive low-precision computation makes. Readability beats speed here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quant
from .args import ModelArgs


def rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h = x if residual is None else x + residual
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight
    return out, h.clone()


def rope(q: Tensor, k: Tensor, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    head_dim = q.shape[-1]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=q.device) / head_dim)
    angles = positions.to(q.device, torch.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = angles.cos().to(q.dtype)[:, None, :]
    sin = angles.sin().to(q.dtype)[:, None, :]

    def rotate(x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    return rotate(q), rotate(k)


def _packed_ranges(seq_lens: Tensor, start_pos: Tensor):
    """(b, first token index in the packed tensors, length, first position) for each sequence."""
    offset = 0
    for b, (n, start) in enumerate(zip(seq_lens.tolist(), start_pos.tolist())):
        yield b, offset, n, start
        offset += n


def cache_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_rows: Tensor) -> None:
    written = cache_rows >= 0
    rows = cache_rows[written].to(k_cache.device)
    written = written.to(k.device)
    k_cache.flatten(0, 1)[rows] = k[written]
    v_cache.flatten(0, 1)[rows] = v[written]


def rope_cache_write(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, cache_rows: Tensor,
    theta: float,
) -> Tensor:
    q_rot, k_rot = rope(q, k, positions, theta)
    cache_write(k_rot, v, k_cache, v_cache, cache_rows)
    return q_rot


def window_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """[Tq, Tk] bool: query at position i sees key j iff i - window < j <= i."""
    i, j = q_pos[:, None], k_pos[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D], mask [Tq, Tk] -> [Tq, Hq, D]. KV heads are repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def attention_prefill(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, start_pos: Tensor,
    window: int | None,
) -> Tensor:
    slots = k_cache.shape[1]
    out = torch.empty_like(q)
    for b, offset, n, start in _packed_ranges(seq_lens, start_pos):
        chunk = slice(offset, offset + n)
        # Cached keys any query of this chunk can see: from the first query's window start up to start - 1.
        first = 0 if window is None else max(0, start - window + 1)
        past = torch.arange(first, start)
        k_all = torch.cat([k_cache[b, past % slots], k[chunk]])
        v_all = torch.cat([v_cache[b, past % slots], v[chunk]])
        q_pos = torch.arange(start, start + n)
        mask = window_mask(q_pos, torch.cat([past, q_pos]), window)
        out[chunk] = masked_attention(q[chunk], k_all, v_all, mask)
    return out


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, window: int | None) -> Tensor:
    slots = k_cache.shape[1]
    out = torch.empty_like(q)
    for b, p in enumerate(positions.tolist()):
        first = 0 if window is None else max(0, p - window + 1)
        seen = torch.arange(first, p + 1)
        mask = window_mask(torch.tensor([p]), seen, window)
        out[b : b + 1] = masked_attention(q[b : b + 1], k_cache[b, seen % slots], v_cache[b, seen % slots], mask)
    return out


def silu_mul(x: Tensor) -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def dense_linear(x: Tensor, weight: Tensor) -> Tensor:
    wide = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    return (x.to(wide) @ weight.to(wide).T).to(x.dtype)


def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None) -> Tensor:
    return x @ quant.dequantize(qweight, scales, mins, x.dtype).T


def quant_embedding(ids: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None, dtype: torch.dtype) -> Tensor:
    ids = ids.to(qweight.device)
    return quant.dequantize_rows(*(None if t is None else t[ids] for t in quant.deinterleave(qweight, scales, mins)), dtype)


def forward(weights: dict[str, Tensor], args: ModelArgs, tokens: Tensor) -> Tensor:
    """Logits [B, S, vocab] of equal-length sequences tokens [B, S], whole sequence at once.

    Weights use the mistral-inference names (``tok_embeddings.weight``, ``layers.{i}.attention.wq.weight``,
    ``layers.{i}.feed_forward.w1.weight``, ...), with Q/K rows in the half-split RoPE convention.
    """
    batch, seqlen = tokens.shape
    pos = torch.arange(seqlen)
    mask = window_mask(pos, pos, args.sliding_window)
    h = weights["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        w = {name[len(f"layers.{i}.") :]: t for name, t in weights.items() if name.startswith(f"layers.{i}.")}
        x, _ = rms_norm(h, None, w["attention_norm.weight"], args.norm_eps)
        q = (x @ w["attention.wq.weight"].T).view(batch, seqlen, args.n_heads, args.head_dim)
        k = (x @ w["attention.wk.weight"].T).view(batch, seqlen, args.n_kv_heads, args.head_dim)
        v = (x @ w["attention.wv.weight"].T).view(batch, seqlen, args.n_kv_heads, args.head_dim)
        attn = torch.empty_like(q)
        for b in range(batch):
            qb, kb = rope(q[b], k[b], pos, args.rope_theta)
            attn[b] = masked_attention(qb, kb, v[b], mask)
        h = h + attn.reshape(batch, seqlen, -1) @ w["attention.wo.weight"].T
        x, _ = rms_norm(h, None, w["ffn_norm.weight"], args.norm_eps)
        gate_up = torch.cat([x @ w["feed_forward.w1.weight"].T, x @ w["feed_forward.w3.weight"].T], dim=-1)
        h = h + silu_mul(gate_up) @ w["feed_forward.w2.weight"].T
    h, _ = rms_norm(h, None, weights["norm.weight"], args.norm_eps)
    output = weights["tok_embeddings.weight"] if args.tie_embeddings else weights["output.weight"]
    return h @ output.T
