"""GGUF checkpoints (llama.cpp's format) of the `llama` architecture, which Mistral GGUFs use too.

F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are dequantized here; the K-quants (Q4_K, Q5_K, Q6_K) by the `gguf`
package. llama.cpp stores Q/K rows in the interleaved RoPE order, so they are permuted to the half-split order of
the kernels. The tokenizer comes from the metadata: a sentencepiece-style `llama` vocabulary or a `gpt2` BPE.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .args import ModelArgs
from .checkpoint import CheckpointError, fill_parameters, new_transformer

BLOCK = 32  # elements per block of Q8_0, Q4_0, Q4_1

GGUF_LAYER_NAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}


def gguf_to_consolidated_name(name: str) -> str:
    if name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
        return f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}"
    return name  # reported as unexpected by the loader


def _fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: the low nibbles are elements 0..15, the high nibbles 16..31."""
    return torch.cat([q & 0x0F, q >> 4], dim=-1).float()


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """One tensor's bytes (as the gguf reader maps them) -> float32 of `shape` (rows, columns)."""
    data = torch.tensor(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))  # a copy: the mapping is read-only
    numel = torch.Size(shape).numel()
    plain = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    blocks = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2, "Q4_1": 4 + BLOCK // 2}
    if type_name in plain:
        return data.view(plain[type_name]).float().reshape(shape)
    if type_name in blocks:
        if numel % BLOCK:
            raise CheckpointError(f"tensor {name!r} ({type_name}) has {numel} elements, not a multiple of {BLOCK}")
        b = data.reshape(numel // BLOCK, blocks[type_name])
        if type_name == "Q8_0":  # fp16 scale, 32 x int8
            values = _fp16(b[:, :2]) * b[:, 2:].view(torch.int8).float()
        elif type_name == "Q4_0":  # fp16 scale, 16 bytes of nibbles; value = d * (q - 8)
            values = _fp16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)
        else:  # Q4_1: fp16 scale, fp16 minimum, 16 bytes of nibbles; value = d * q + m
            values = _fp16(b[:, :2]) * _nibbles(b[:, 4:]) + _fp16(b[:, 2:4])
        return values.reshape(shape)
    if type_name in ("Q4_K", "Q5_K", "Q6_K"):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        values = gguf_dequantize(np.ascontiguousarray(raw), GGMLQuantizationType[type_name])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
    raise CheckpointError(f"tensor {name!r} has GGUF type {type_name}, which is not supported "
                          f"(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def args_from_gguf(reader, source: str, has_output: bool) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported (supported: llama)")
    p = f"{arch}."
    scaling = _field(reader, p + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{source}: rope scaling {scaling!r} is not supported")
    if _field(reader, p + "expert_count"):
        raise CheckpointError(f"{source}: mixture of experts is not supported")
    try:
        dim, heads = int(_field(reader, p + "embedding_length")), int(_field(reader, p + "attention.head_count"))
        vocab = _field(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        window = _field(reader, p + "attention.sliding_window")
        return ModelArgs(
            dim=dim, n_layers=int(_field(reader, p + "block_count")),
            head_dim=int(_field(reader, p + "attention.key_length") or dim // heads),
            hidden_dim=int(_field(reader, p + "feed_forward_length")), n_heads=heads,
            n_kv_heads=int(_field(reader, p + "attention.head_count_kv") or heads), vocab_size=int(vocab),
            norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_field(reader, p + "rope.freq_base", 1e4)),
            sliding_window=int(window) if window else None,
            max_seq_len=int(_field(reader, p + "context_length", 8192)), tie_embeddings=not has_output)
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: incomplete GGUF metadata ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _tensors(reader, source: str) -> Iterator[tuple[str | None, str, torch.Tensor]]:
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        name = gguf_to_consolidated_name(t.name)
        try:
            values = dequantize(t.data, t.tensor_type.name, shape, t.name)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{source}: tensor {t.name!r} ({t.tensor_type.name}, {shape}) is corrupt: {e}") from None
        yield name, t.name, values


def tokenizer_from_gguf(reader, source: str):
    from .tokenizer import BPETokenizer, Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        return None
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    eos_ids = [int(eos)] if eos is not None else None
    if kind == "llama":
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
        return Tokenizer.from_pieces(tokens, scores, types, add_bos=True if add_bos is None else bool(add_bos),
                                     eos_ids=eos_ids, bos_id=bos, add_space_prefix=True if prefix is None else bool(prefix))
    if kind == "gpt2":
        merges = _field(reader, "tokenizer.ggml.merges") or []
        return BPETokenizer.from_vocab(tokens, merges, types, add_bos=bool(add_bos), bos_id=bos, eos_ids=eos_ids)
    raise CheckpointError(f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: llama, gpt2)")


def load_gguf(path: Path, device: torch.device, dtype: torch.dtype):
    from gguf import GGUFReader

    from .engine import Model

    source = str(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise CheckpointError(f"{source}: not a readable GGUF file: {e}") from None
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    args = args_from_gguf(reader, source, has_output)
    transformer = new_transformer(args, device, dtype)
    fill_parameters(transformer, _tensors(reader, source), source, interleaved_rope=True)
    model = Model(transformer.eval(), tokenizer_from_gguf(reader, source))
    model.chat_template = _field(reader, "tokenizer.chat_template")
    return model
