"""The decode step of one cache as a CUDA graph, captured once and replayed every step (as gpt-fast, vLLM and
SGLang do): a replay launches the step's few hundred kernels with one call and runs no Python."""

from __future__ import annotations

import torch
from torch import Tensor

from .model import RollingBufferCache, StepMetadata, ring_rows


class DecodeGraph:
    """The decode step (every row of `cache` brings one token) of `model`. Its inputs live in a static device
    buffer [2, B], the tokens and the positions, filled from the host by one asynchronous copy per step, so the
    rows may rewind or prefill between steps; the slot mapping is computed inside the graph from those positions,
    and the decode attention's launch is planned for the cache's size, not for the positions (ops.attention_decode),
    so one capture serves every context. The logits come out in a static buffer, copied for the caller.

    On CUDA the step is captured on the first call (after two eager runs of the same step, which write the same
    keys and values the replay then writes again); on another device the same step runs eagerly through the same
    buffers, which is how the CPU tests check what the graph is given. Holds the cache's tensors, not the cache."""

    def __init__(self, model, cache: RollingBufferCache):
        self.step_fn = model._decode_step
        self.k, self.v, self.slots = cache.k, cache.v, cache.slots
        device = model.device
        self.capture = device.type == "cuda"
        self.staging = torch.zeros(2, cache.batch_size, dtype=torch.long, pin_memory=self.capture)
        self.inputs = torch.zeros(2, cache.batch_size, dtype=torch.long, device=device)
        self.row_base = cache.row_base.to(device)
        self.rows = torch.arange(cache.batch_size)  # every row decodes
        self.copied = torch.cuda.Event() if self.capture else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None

    def _run(self) -> Tensor:
        tokens, positions = self.inputs[0], self.inputs[1]
        step = StepMetadata(True, None, None, positions, ring_rows(self.row_base, positions, self.slots), self.rows)
        return self.step_fn(tokens, self.k, self.v, step)

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens and positions [B] (host, checked by Model.decode): logits [B, vocab] (float32)."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has finished reading the staging buffer
        self.staging[0].copy_(tokens)
        self.staging[1].copy_(positions)
        self.inputs.copy_(self.staging, non_blocking=True)
        if not self.capture:
            return self._run()
        self.copied.record()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.inputs.device)
        stream.wait_stream(torch.cuda.current_stream(self.inputs.device))
        with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles, workspaces, the allocator
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(self.inputs.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self.graph = graph
