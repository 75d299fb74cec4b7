"""The Mistral/Llama transformer on mistral_ext's ops, with a rolling-buffer cache and chunked prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops
from .args import ModelArgs
from .quant import QuantizedWeight
from .tracked import TrackedModule


def linear(kernels, x: Tensor, w: Tensor | QuantizedWeight | nn.ModuleList) -> Tensor:
    """``x @ w.T`` on the op set ``kernels``, for a dense weight, a QuantizedWeight, or the parts of a fused weight
    kept in different quantized formats (an nn.ModuleList of QuantizedWeight, rows in order). Dense weights on the
    CPU go through dense_linear, which beat MKL's GEMV and GEMM at every measured shape (bench/ops.py); on CUDA
    through cuBLAS until the GPU check has measured dense_linear there."""
    if isinstance(w, nn.ModuleList):
        return torch.cat([linear(kernels, x, part) for part in w], dim=-1)
    if isinstance(w, Tensor) and w.is_cuda:
        return x @ w.T
    if x.dim() != 2:
        out = linear(kernels, x.reshape(-1, x.shape[-1]), w)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    if isinstance(w, QuantizedWeight):
        return kernels.quant_linear(x, w.qweight, w.scales, w.mins)
    return kernels.dense_linear(x, w)


def step_layout(seq_lens: Tensor, start_pos: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """The position and the ring row of each packed token of a step where sequence b brings seq_lens[b] tokens from
    position start_pos[b] into rings of `slots` slots (host int64 tensors in, out): token t of sequence b sits at
    p = start_pos[b] + t and goes to row b * slots + p % slots of the flattened ring, or nowhere (-1) when a later
    token of its own chunk takes that slot (a chunk longer than the ring). With slots 4, seq_lens [2, 0, 1] and
    start_pos [4, 9, 7]: positions [4, 5, 7], rows [0 * 4 + 0, 0 * 4 + 1, 2 * 4 + 3] = [0, 1, 11]."""
    row = torch.repeat_interleave(torch.arange(seq_lens.shape[0]), seq_lens)
    first = torch.cumsum(seq_lens, 0) - seq_lens  # index of each sequence's first token in the packed tensors
    t = torch.arange(row.shape[0]) - first[row]
    positions = start_pos[row] + t
    rows = ring_rows(row * slots, positions, slots)
    rows[t < seq_lens[row] - slots] = -1
    return positions, rows


def ring_rows(row_base: Tensor, positions: Tensor, slots: int) -> Tensor:
    """Where each token's key and value go in rings of `slots` slots: row_base (its sequence's b * slots) plus the
    slot of its position. Decode steps (one token per sequence, row_base = arange(B) * slots) need only this."""
    return row_base + positions % slots


@dataclass(frozen=True)
class StepMetadata:
    """What every layer of one step needs to know about where its tokens go, built once before the layer loop
    (RollingBufferCache.step). A decode step brings one token per sequence; a prefill step a chunk per sequence
    (possibly empty), packed in sequence order."""

    decode: bool
    seq_lens: Tensor | None  # [B] on the host: tokens each sequence brings this step
    start_pos: Tensor | None  # [B] on the host: the position of each sequence's first token this step
    positions: Tensor  # [T] on the model's device: the position of each packed token
    cache_rows: Tensor  # [T] on the model's device: the ring row each token's key and value go to (step_layout)
    rows: Tensor | None = None  # [T] on the host, a decode step's: the cache row of each token (the others idle)
    chunks: Tensor | None = None  # [2, B] on the model's device, a prefill step's seq_lens and start_pos (attention)


class RollingBufferCache:
    """K/V of every layer for a batch: ``k[layer]``/``v[layer]`` are ``[B, S, Hkv, D]``, with ``S = W`` slots when the
    model has a sliding window and ``S = max_seq_len`` (the context) when it has none. Position ``p`` of sequence
    ``b`` lives in slot ``p % S``; ``positions[b]`` counts the tokens sequence ``b`` has seen.

    A worked example, W = S = 4, two sequences with prompts of 6 and 2 tokens, prefilled in chunks of at most W:

    - Round 1 packs 4 + 2 = 6 tokens with ``seq_lens = [4, 2]``, ``start_pos = [0, 0]``. Attention reads no cached
      key yet (the cache is read before the chunk is written). Query 3 of sequence 0 sees keys 0..3 (3 - 4 < j <= 3).
      Then slots 0..3 of sequence 0 get positions 0..3, slots 0..1 of sequence 1 get positions 0..1.
    - Round 2 packs sequence 0's last 2 tokens: ``seq_lens = [2, 0]``, ``start_pos = [4, 2]``. Query 4 sees keys
      1..4: positions 1, 2, 3 from slots 1, 2, 3 and itself from the chunk; query 5 sees keys 2..5. Only then are
      positions 4, 5 written to slots 0, 1, overwriting positions 0, 1, which no later query needs.
    - A decode step at positions ``[6, 2]`` first writes position 6 to slot 2 (sequence 0) and position 2 to slot 2
      (sequence 1), then attends: sequence 0's query sees positions 3..6 in slots 3, 0, 1, 2; sequence 1's sees
      positions 0..2 in slots 0..2. Memory stays at W slots however long the sequence grows.
    """

    def __init__(self, args: ModelArgs, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.window = args.sliding_window
        self.max_positions = None if self.window is not None else args.max_seq_len
        self.slots = self.window if self.window is not None else args.max_seq_len
        shape = (batch_size, self.slots, args.n_kv_heads, args.head_dim)
        # Uninitialised: the kernels never read a slot before it is written (the op tests fill unused slots with
        # NaN to prove it), and untouched pages cost no memory until a sequence grows into them.
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        # On the host whatever the device: a step's metadata is made and checked there, then uploaded at once.
        self.positions = torch.zeros(batch_size, dtype=torch.long)
        self.row_base = torch.arange(batch_size) * self.slots  # each row's first ring row, for decode steps
        self.device = torch.device(device)
        self.decode_graph = None  # the graphs.DecodeGraph of its decode step, made by Model.decode on first use

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def step(self, seq_lens: Tensor, decode: bool) -> StepMetadata:
        """The metadata of a step that brings seq_lens[b] tokens to sequence b, from the positions cached so far.
        In the class docstring's example, round 2 (seq_lens [2, 0], positions [4, 2]) gives start_pos [4, 2], the
        packed positions [4, 5] and ring rows [0, 1]; the decode step after it, positions [6, 2] and rows [2, 6]. A
        decode step may leave rows idle (seq_lens 0): seq_lens [0, 1] there would bring row 1's token alone, at
        position 2, to ring row 6."""
        start = self.positions.clone()
        if decode:  # one token for each row that brings any
            decoding = torch.nonzero(seq_lens).flatten()
            positions = start[decoding]
            rows = ring_rows(self.row_base[decoding], positions, self.slots)
            chunks = None
        else:
            decoding = None
            positions, rows = step_layout(seq_lens, start, self.slots)
            chunks = torch.stack([seq_lens, start])
        if self.device.type == "cuda":  # one asynchronous upload per step
            host = [positions, rows] + ([] if chunks is None else [chunks.flatten()])
            staged = torch.cat(host).pin_memory().to(self.device, non_blocking=True)
            t = positions.shape[0]
            positions, rows = staged[:t], staged[t:2 * t]
            chunks = None if chunks is None else staged[2 * t:].view(2, -1)
        return StepMetadata(decode, seq_lens, start, positions, rows, decoding, chunks)

    def advance(self, step: StepMetadata) -> None:
        """After the step: its tokens are cached."""
        self.positions += step.seq_lens

    def can_rewind(self, row: int, position: int) -> bool:
        """Whether row `row` can go back to hold positions 0 .. position - 1 only (prompt reuse). The next query,
        at `position`, needs keys max(0, position - W + 1) .. position - 1; the ring still holds positions
        end - S .. end - 1, where end = positions[row]. So with a window a row that has not yet wrapped (end <= S)
        rewinds anywhere, one that has only to 0 (a fresh start) or by one position (the slot of end - 1 is the
        one the next token takes); with no window every position is kept. Example, W = S = 4, end = 6 (slots hold
        2..5): rewinding to 5 needs keys 2..4, all there; rewinding to 3 needs 0..2, whose slots 0 and 1 now hold 4
        and 5."""
        end = int(self.positions[row])
        if not 0 <= position <= end:
            return False
        if position == 0 or self.window is None or end <= self.slots:
            return True
        return max(0, position - self.window + 1) >= end - self.slots

    def rewind(self, row: int, position: int) -> None:
        if not self.can_rewind(row, position):
            raise ValueError(f"row {row} cannot rewind from position {int(self.positions[row])} to {position}: the "
                             f"ring no longer holds the keys it needs")
        self.positions[row] = position

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(TrackedModule):
    kernels = ops  # the op set: mistral_ext.ops, or mistral_ext.reference (Transformer.use_kernels)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.theta = args.rope_theta
        self.window = args.sliding_window
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = nn.Parameter(torch.empty(q_size + 2 * kv_size, args.dim), requires_grad=False)  # wq | wk | wv
        self.wo = nn.Parameter(torch.empty(args.dim, q_size), requires_grad=False)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, step: StepMetadata) -> Tensor:
        """x [T, dim] packed."""
        q, k, v = self.project(x)
        path = self.decode if step.decode else self.prefill
        out = path(q, k, v, k_cache, v_cache, step)
        return linear(self.kernels, out.reshape(x.shape[0], -1), self.wo)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D]: column slices of one fused projection, contiguous already for a single
        token, copied otherwise."""
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = linear(self.kernels, x, self.wqkv).split([q_size, kv_size, kv_size], dim=-1)
        return (q.reshape(x.shape[0], self.n_heads, self.head_dim).contiguous(),
                k.reshape(x.shape[0], self.n_kv_heads, self.head_dim).contiguous(),
                v.reshape(x.shape[0], self.n_kv_heads, self.head_dim).contiguous())

    def decode(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, step: StepMetadata) -> Tensor:
        """One token per sequence: its key and value go into the ring first (fused with RoPE), then it attends."""
        q = self.kernels.rope_cache_write(q, k, v, k_cache, v_cache, step.positions, step.cache_rows, self.theta)
        return self.kernels.attention_decode(q, k_cache, v_cache, step.positions, self.window)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, step: StepMetadata) -> Tensor:
        """A chunk per sequence attends to the ring and to itself; the ring is written after it is read, since a
        chunk as long as the window overwrites slots its own first queries still see."""
        kernels = self.kernels
        q, k = kernels.rope(q, k, step.positions, self.theta)
        seq_lens, start_pos = step.chunks
        out = kernels.attention_prefill(q, k, v, k_cache, v_cache, seq_lens, start_pos, self.window)
        kernels.cache_write(k, v, k_cache, v_cache, step.cache_rows)
        return out


class FeedForward(TrackedModule):
    kernels = ops

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * args.hidden_dim, args.dim), requires_grad=False)  # w1 | w3
        self.w2 = nn.Parameter(torch.empty(args.dim, args.hidden_dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        kernels = self.kernels
        return linear(kernels, kernels.silu_mul(linear(kernels, x, self.w13)), self.w2)


class TransformerBlock(TrackedModule):
    kernels = ops
    group = None  # a parallel.ShardGroup when the weights are one rank's shard: it sums the ranks' partial outputs

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.norm_eps
        self.attention_norm = nn.Parameter(torch.empty(args.dim), requires_grad=False)
        self.attention = Attention(args)
        self.ffn_norm = nn.Parameter(torch.empty(args.dim), requires_grad=False)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, residual: Tensor, next_norm: Tensor, k_cache: Tensor, v_cache: Tensor,
                step: StepMetadata) -> tuple[Tensor, Tensor]:
        """x: the residual stream normed by this block's attention_norm; returns the stream after the block and its
        norm by next_norm (the next block's attention_norm, or the final norm): each residual add is fused with the
        norm that follows it. (A CPU decode step runs the whole stack as one ops.decode_layers instead, the same
        arithmetic in one parallel region: Transformer.hidden_states.)"""
        rms_norm, group = self.kernels.rms_norm, self.group
        h = self.attention(x, k_cache, v_cache, step)
        x, residual = rms_norm(h if group is None else group.all_reduce(h), residual, self.ffn_norm, self.eps)
        h = self.feed_forward(x)
        return rms_norm(h if group is None else group.all_reduce(h), residual, next_norm, self.eps)

    def matrices(self) -> tuple[Tensor | QuantizedWeight | nn.ModuleList, ...]:
        return self.attention.wqkv, self.attention.wo, self.feed_forward.w13, self.feed_forward.w2


@dataclass(frozen=True)
class DecodePlan:
    """What ops.decode_layers takes of a Transformer's blocks, gathered once: read through nn.Module attributes
    they cost about 25 us a block, a fifth of a small model's decode step. Made again after any assignment on the
    model's modules (TrackedModule.edits): a weight replaced, an op set or a flag changed."""

    norms: list[Tensor]  # per block its ffn_norm, then the norm after it
    weights: list[Tensor | None]  # per part of a matrix (weight, scales, mins); (weight, None, None) when dense
    parts: list[int]  # per block the parts of wqkv, wo, w13 and w2
    eps: float
    n_heads: int
    theta: float
    window: int | None

    @staticmethod
    def of(transformer: "Transformer") -> "DecodePlan":
        layers = list(transformer.layers)
        next_norms = [layer.attention_norm for layer in layers[1:]] + [transformer.norm]
        norms, weights, parts = [], [], []
        for layer, next_norm in zip(layers, next_norms):
            norms += [layer.ffn_norm, next_norm]
            for w in layer.matrices():
                pieces = list(w) if isinstance(w, nn.ModuleList) else [w]
                parts.append(len(pieces))
                for p in pieces:
                    weights += p.tensors() if isinstance(p, QuantizedWeight) else (p, None, None)
        attention = layers[0].attention
        return DecodePlan(norms, weights, parts, layers[0].eps, attention.n_heads, attention.theta, attention.window)


class Transformer(TrackedModule):
    """Weights are created dense and empty; ``mistral_ext.checkpoint.new_transformer`` puts a QuantizedWeight where
    one is to be held quantized, or a dense weight of another dtype (as stored), and the loaders fill them tensor by
    tensor. Norms stay dense, in the activation dtype (``dtype``)."""

    kernels = ops
    fused_decode = True  # CPU decode steps as one ops.decode_layers; False runs each block's ops from Python

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self._decode_plans: dict[int, DecodePlan] = {}  # at most one, keyed by the TrackedModule.edits it was made at
        self.tok_embeddings = nn.Parameter(torch.empty(args.vocab_size, args.dim), requires_grad=False)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = nn.Parameter(torch.empty(args.dim), requires_grad=False)
        self.output = None if args.tie_embeddings else nn.Parameter(torch.empty(args.vocab_size, args.dim),
                                                                    requires_grad=False)

    def hidden_states(self, tokens: Tensor, k_caches: list[Tensor], v_caches: list[Tensor],
                      step: StepMetadata) -> Tensor:
        """Runs packed tokens [T] through every layer, writing their K/V into the caches (a RollingBufferCache's k
        and v); returns the final-normed hidden states [T, dim]. Chunks must be at most W tokens long per sequence
        (the caller chunks). A decode step on the CPU with mistral_ext's ops runs the blocks as one
        ops.decode_layers (the same arithmetic as the blocks' forward, in one parallel region); the rest run each
        block's forward: prefill, CUDA, where a graph replays the step, and a step torch.compile traces (into the
        blocks' ops: the plan is host state it would guard on)."""
        layers = self.layers
        x, residual = self.kernels.rms_norm(self.embed(tokens), None, layers[0].attention_norm, self.args.norm_eps)
        plan = self.decode_plan() if step.decode and x.is_cpu and not torch.compiler.is_compiling() else None
        if plan is not None:
            x, _ = ops.decode_layers(x, residual, plan.norms, plan.eps, plan.weights, plan.parts, k_caches, v_caches,
                                     step.rows, step.positions, step.cache_rows, plan.n_heads, plan.theta, plan.window)
            return x
        next_norms = [layer.attention_norm for layer in layers[1:]] + [self.norm]
        for layer, next_norm, k_cache, v_cache in zip(layers, next_norms, k_caches, v_caches):
            x, residual = layer(x, residual, next_norm, k_cache, v_cache, step)
        return x

    def decode_plan(self) -> DecodePlan | None:
        """The blocks' tensors as ops.decode_layers takes them, or None when a decode step must run each block's
        forward: fused_decode off, another op set than mistral_ext.ops (reference), or a tensor-parallel shard."""
        if not self.fused_decode or self.kernels is not ops:
            return None
        plan = self._decode_plans.get(TrackedModule.edits)
        if plan is None:
            if any(layer.group is not None or any(m.kernels is not ops for m in (layer, layer.attention,
                                                                                 layer.feed_forward))
                   for layer in self.layers):
                return None
            self._decode_plans.clear()
            plan = self._decode_plans[TrackedModule.edits] = DecodePlan.of(self)
        return plan

    def use_kernels(self, kernels) -> "Transformer":
        """Runs the same model on another op set with the signatures of mistral_ext.ops: mistral_ext.reference
        makes the naive baseline of the benchmarks, in the same cached loop."""
        for module in self.modules():
            if isinstance(module, (Transformer, TransformerBlock, Attention, FeedForward)):
                module.kernels = kernels
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    def embed(self, tokens: Tensor) -> Tensor:
        table = self.tok_embeddings
        if isinstance(table, QuantizedWeight):
            return self.kernels.quant_embedding(tokens, table.qweight, table.scales, table.mins, self.dtype)
        return table[tokens].to(self.dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        output = self.tok_embeddings if self.output is None else self.output  # tied: the same (quantized) table
        return linear(self.kernels, hidden, output).float()
