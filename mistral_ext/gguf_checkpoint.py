"""GGUF checkpoints (llama.cpp's format) of the `llama` architecture, which Mistral GGUFs use too, read with the
`gguf` package (imported only here, so `import mistral_ext` does not need it).

Quantized tensors stay quantized when the loader keeps them so (WeightOptions.keep_quantized): Q8_0, Q4_0 and Q4_1
are repacked as they are (mistral_ext.quant holds the same blocks, so the weights are the file's to the bit); the
K-quants are dequantized by the `gguf` package and quantized again to the nearest of our formats: Q4_K -> q4_1
(each 32-value sub-block of Q4_K is d * sc * q - dmin * m, a q4_1 block), Q5_K and Q6_K -> q8_0 (fewer than 8 bits
each). Otherwise every tensor is dequantized by the `gguf` package. F32, F16 and BF16 tensors stay dense. Every
tensor is copied out of the file's mapping, which is closed once the model is built. llama.cpp stores Q/K rows in
the interleaved RoPE order, so they are permuted to the half-split order of the kernels. The tokenizer comes from
the metadata: a sentencepiece-style `llama` vocabulary or a `gpt2` BPE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from .args import ModelArgs
from .checkpoint import CheckpointError, Loaded, StoredTensor, WeightOptions, build_transformer
from .quant import GGUF_BLOCK_BYTES, QuantizedWeight, from_gguf_blocks

DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
QUANTIZED_AS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_1", "Q5_K": "q8_0", "Q6_K": "q8_0"}

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


def _shape(t) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first


def _stored(t, source: str) -> StoredTensor:
    """One tensor of the reader as a StoredTensor; its reads copy out of the file's mapping."""
    type_name = t.tensor_type.name
    if type_name not in DENSE_TYPES and type_name not in QUANTIZED_AS:
        raise CheckpointError(f"{source}: tensor {t.name!r} has GGUF type {type_name}, which is not supported "
                              f"(supported: {', '.join([*DENSE_TYPES, *QUANTIZED_AS])})")
    return _entry(t.name, t.data, t.tensor_type, _shape(t))


def _entry(name: str, data: np.ndarray, qtype, shape: tuple[int, ...]) -> StoredTensor:
    """A tensor whose bytes are `data` (a view of the mapping: rows of values, or of blocks' bytes for a quantized
    type); its parts are views of those rows or of whole blocks of each row."""
    type_name = qtype.name
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    unit = 1 if type_name in DENSE_TYPES else block_bytes  # what one block takes along data's last axis

    def read() -> torch.Tensor:
        values = gguf_dequantize(data, qtype)
        if np.may_share_memory(values, data):  # F32: a view of the read-only mapping, not to outlive the load
            values = values.copy()
        return torch.from_numpy(values).reshape(shape)

    def read_blocks() -> QuantizedWeight:
        return QuantizedWeight(*from_gguf_blocks(torch.from_numpy(np.array(data)), type_name, shape))

    def read_part(axis: int, start: int, stop: int) -> StoredTensor:
        if axis == 0:
            return _entry(name, data[start:stop], qtype, (stop - start, *shape[1:]))
        return _entry(name, data[:, start // block * unit : stop // block * unit], qtype, (shape[0], stop - start))

    return StoredTensor(name, shape, read, QUANTIZED_AS.get(type_name),
                        read_blocks if type_name in GGUF_BLOCK_BYTES else None, DENSE_TYPES.get(type_name), block,
                        read_part)


def _check_extents(reader: GGUFReader, source: str) -> None:
    """The reader takes each tensor's byte count from its type and shape; those bytes must end before the next
    tensor begins (the reader itself refuses a last tensor that runs past the end of the file)."""
    ordered = sorted(reader.tensors, key=lambda t: t.data_offset)
    for t, after in zip(ordered, ordered[1:]):
        room = after.data_offset - t.data_offset
        if t.n_bytes > room:
            raise CheckpointError(f"{source}: tensor {t.name!r} ({t.tensor_type.name}, shape {_shape(t)}) needs "
                                  f"{t.n_bytes} bytes, but only {room} lie before the next tensor (corrupt)")


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


def load_gguf(path: Path, options: WeightOptions) -> Loaded:
    source = str(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{source}: not a readable GGUF file (truncated or corrupt): {e}") from None
    _check_extents(reader, source)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    args = args_from_gguf(reader, source, has_output)
    tensors = [(gguf_to_consolidated_name(t.name), _stored(t, source)) for t in reader.tensors]
    transformer = build_transformer(args, tensors, options, source, interleaved_rope=True)
    return Loaded(transformer, tokenizer_from_gguf(reader, source), _field(reader, "tokenizer.chat_template"))
