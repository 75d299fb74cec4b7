"""GGUF files the tests write themselves with the `gguf` package's writer, from tiny HF models, the way llama.cpp's
converter lays them out (Q/K rows permuted back to the interleaved RoPE order)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from kquants import QUANTIZERS, error_bound as kquant_error_bound
from mistral_ext.args import ModelArgs
from mistral_ext.gguf_write import add_model_metadata, add_tokenizer
from mistral_ext.quant import BLOCK
from tiny import renamed_interleaved

HF_TO_GGUF = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gguf_tensors(hf_model, args: ModelArgs) -> dict[str, np.ndarray]:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    out = renamed_interleaved(hf_model, args, top, HF_TO_GGUF, "blk.{i}.{name}")
    return {k: v.numpy() for k, v in out.items()}


def write_gguf(path: Path, args: ModelArgs, tensors: dict[str, np.ndarray], qtype: str = "F32",
               tokenizer: dict | None = None, types: dict[str, str] | None = None) -> Path:
    """Matrices in `qtype`, or the type `types` gives by tensor name (vectors stay F32, as llama.cpp keeps norms).
    tokenizer: GGUF tokenizer fields."""
    w = gguf.GGUFWriter(str(path), "llama")
    add_model_metadata(w, args)
    add_tokenizer(w, tokenizer or {})
    for name, t in tensors.items():
        kind = (types or {}).get(name, qtype)
        ggml_type = gguf.GGMLQuantizationType[kind]
        if t.ndim == 1 or kind == "F32":
            w.add_tensor(name, t.astype(np.float32))
        elif kind == "F16":
            w.add_tensor(name, t.astype(np.float16))
        elif kind in QUANTIZERS:
            w.add_tensor(name, QUANTIZERS[kind](t).reshape(t.shape[0], -1), raw_dtype=ggml_type)
        else:
            w.add_tensor(name, gguf.quants.quantize(t.astype(np.float32), ggml_type), raw_dtype=ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def weights_of(model) -> dict[str, torch.Tensor]:
    """A loaded Model's weights, unfused, in mistral-inference names, quantized ones dequantized (float32)."""
    from mistral_ext.checkpoint import parameter_slots
    from mistral_ext.quant import QuantizedWeight

    return {name: slot.dequantize() if isinstance(slot, QuantizedWeight) else slot.detach()
            for name, slot in parameter_slots(model.transformer).items()}


def block_view(x: torch.Tensor) -> torch.Tensor:
    return x.double().reshape(-1, BLOCK)


def error_bound(original: torch.Tensor, qtype: str) -> torch.Tensor:
    """Largest error each element may have after quantization to qtype (fp16 block scales included)."""
    x = original.double()
    if qtype in QUANTIZERS:
        return torch.from_numpy(kquant_error_bound(original.numpy(), qtype))
    if qtype == "F32":
        return torch.zeros_like(x)
    if qtype == "F16":
        return x.abs() * 2**-11 + 6e-8
    if qtype == "BF16":
        return x.abs() * 2**-8
    b = block_view(x)
    amax, lo, hi = b.abs().amax(-1, keepdim=True), b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    if qtype == "Q8_0":  # step amax/127, half a step, plus the fp16 rounding of the scale
        bound = 0.5 * amax / 127 + amax * 2**-10
    elif qtype == "Q4_0":  # step amax/8; the far end of the range is clamped by one step (7 steps of fp16 scale)
        bound = amax / 8 * (1 + 7 * 2**-11)
    else:  # Q4_1: step (max - min)/15, half a step, plus fp16 rounding of scale and minimum
        bound = 0.5 * (hi - lo) / 15 + 2**-10 * (lo.abs() + hi - lo)
    return bound.expand_as(b).reshape(x.shape)


def tensor_storage(model) -> int:
    """Bytes of a Model's tensor storage (parameters and buffers), each storage counted once."""
    tensors = list(model.transformer.parameters()) + list(model.transformer.buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def file_tensor_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensor data."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
