"""Tensor parallelism over torch.distributed (gloo on CPUs, NCCL on GPUs), Megatron's layout as vLLM and gpt-fast
shard it: each rank holds the query heads h with h // (n_heads / N) == rank, the KV heads they read, the matching
columns of wo, rows of w1/w3 and columns of w2. A layer's two partial sums (after wo, after w2) are all-reduced in
fp32; embedding, norms and the output head are replicated, so every rank computes the same logits (the head is
about 4% of the bytes a Mistral 7B step reads per rank at N = 2, 7% at N = 4: a vocabulary-parallel head would
save that for a gather per step); rank 0's sampled tokens are broadcast, so every rank decodes the same sequence.
When n_kv_heads < N each KV head is replicated on the N / n_kv_heads ranks whose query heads read it (as vLLM does).

Worked example, N = 2, Mistral 7B (head_dim 128, 32 query heads, 8 KV heads, hidden 14336): rank 1 holds query
heads 16..31 (rows 2048:4096 of wq, columns 2048:4096 of wo), KV heads 4..7 (rows 512:1024 of wk and wv) and
rows 7168:14336 of w1 and w3 (columns 7168:14336 of w2); its cache holds KV heads 4..7 of every position.

`shard_args` and `shard_ranges` are pure (the loaders use them, with no process group); `ShardGroup` is the
communication, which mistral_ext.engine attaches to the loaded model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .args import ModelArgs


@dataclass(frozen=True)
class Shard:
    """Which part of the model a rank loads."""

    rank: int
    world_size: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")


def shard_args(args: ModelArgs, world_size: int) -> ModelArgs:
    """The hyper-parameters of one rank's part: its query heads, KV heads and hidden units. Raises ValueError naming
    every size that does not split over world_size."""
    problems = []
    if args.n_heads % world_size:
        problems.append(f"n_heads {args.n_heads} is not divisible by {world_size}")
    kv = args.n_kv_heads
    if kv >= world_size and kv % world_size:
        problems.append(f"n_kv_heads {kv} is not divisible by {world_size}")
    if kv < world_size and world_size % kv:
        problems.append(f"{world_size} ranks are not a multiple of n_kv_heads {kv} (each KV head is replicated on "
                        f"a whole number of ranks)")
    if args.hidden_dim % world_size:
        problems.append(f"hidden_dim {args.hidden_dim} is not divisible by {world_size}")
    if problems:
        raise ValueError(f"tensor parallelism over {world_size} ranks: {'; '.join(problems)}")
    return replace(args, n_heads=args.n_heads // world_size, n_kv_heads=max(kv // world_size, 1),
                   hidden_dim=args.hidden_dim // world_size)


def shard_ranges(args: ModelArgs, shard: Shard) -> dict[str, tuple[int, int, int]]:
    """mistral-inference tensor name -> (axis, start, stop) of the rank's part (axis 0: rows, 1: columns), for every
    sharded tensor; the others are replicated. args are the whole model's (checked by shard_args)."""
    local = shard_args(args, shard.world_size)
    d, r = args.head_dim, shard.rank
    q = (r * local.n_heads * d, (r + 1) * local.n_heads * d)
    # rank r's query heads read KV head (first query head) // (n_heads / n_kv_heads), replicated or not
    first_kv = r * local.n_heads // (args.n_heads // args.n_kv_heads)
    kv = (first_kv * d, (first_kv + local.n_kv_heads) * d)
    hidden = (r * local.hidden_dim, (r + 1) * local.hidden_dim)
    ranges = {}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        ranges |= {p + "attention.wq.weight": (0, *q), p + "attention.wk.weight": (0, *kv),
                   p + "attention.wv.weight": (0, *kv), p + "attention.wo.weight": (1, *q),
                   p + "feed_forward.w1.weight": (0, *hidden), p + "feed_forward.w3.weight": (0, *hidden),
                   p + "feed_forward.w2.weight": (1, *hidden)}
    return ranges


def init_process_group(device: torch.device, timeout: timedelta | None = None) -> torch.device:
    """Under torchrun: joins the process group, unless this process has already (NCCL for a CUDA device, with rank
    r on GPU LOCAL_RANK, gloo otherwise; timeout: torch's default when None). Returns this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return device


class ShardGroup:
    """The ranks of torch.distributed's default process group, one model shard each. Every rank must make the
    same calls in the same order (generate and the CLI do): a rank that dies or stalls makes the others fail when
    the process group's timeout passes, or at once where the backend sees its connection close (gloo)."""

    def __init__(self):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("tensor_parallel=True needs an initialised torch.distributed process group (run under "
                             "torchrun and call torch.distributed.init_process_group first; the CLI does both)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # where the collectives' own tensors live: NCCL moves GPU memory only
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum over ranks of x (in x itself when it is float32), added in fp32 whatever x's dtype."""
        total = x if x.dtype == torch.float32 else x.float()
        dist.all_reduce(total)
        return total if total.dtype == x.dtype else total.to(x.dtype)

    def broadcast(self, x: Tensor) -> Tensor:
        """Rank 0's x (each rank passes a tensor of the same shape and dtype), in a new tensor."""
        out = x.clone()
        dist.broadcast(out, src=0)
        return out

    def broadcast_text(self, text: str) -> str:
        """Rank 0's text (the others pass anything): the lines the CLI's chat reads on rank 0 alone."""
        data = list(text.encode()) if self.rank == 0 else []
        size = int(self.broadcast(torch.tensor([len(data)], device=self.device)))
        buf = torch.tensor(data, dtype=torch.uint8) if self.rank == 0 else torch.empty(size, dtype=torch.uint8)
        return bytes(self.broadcast(buf.to(self.device)).tolist()).decode()
