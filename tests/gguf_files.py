"""GGUF files the tests write themselves with the `gguf` package's writer, from tiny HF models, the way llama.cpp's
converter lays them out (Q/K rows permuted back to the interleaved RoPE order)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from kquants import QUANTIZERS
from mistral_ext.args import ModelArgs
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
               tokenizer: dict | None = None) -> Path:
    """Matrices in `qtype` (vectors stay F32, as llama.cpp keeps norms). tokenizer: GGUF tokenizer fields."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if args.sliding_window is not None:
        w.add_sliding_window(args.sliding_window)
    for key, value in (tokenizer or {}).items():
        getattr(w, f"add_{key}")(value)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, t in tensors.items():
        if t.ndim == 1 or qtype == "F32":
            w.add_tensor(name, t.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, t.astype(np.float16))
        elif qtype in QUANTIZERS:
            w.add_tensor(name, QUANTIZERS[qtype](t).reshape(t.shape[0], -1), raw_dtype=kind)
        else:
            w.add_tensor(name, gguf.quants.quantize(t.astype(np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sentencepiece_fields(model_path: Path) -> dict:
    """The GGUF `llama` tokenizer fields of a sentencepiece model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_path.read_bytes())
    return {"tokenizer_model": "llama", "token_list": [p.piece for p in m.pieces],
            "token_scores": [p.score for p in m.pieces], "token_types": [int(p.type) for p in m.pieces],
            "bos_token_id": m.trainer_spec.bos_id, "eos_token_id": m.trainer_spec.eos_id,
            "unk_token_id": m.trainer_spec.unk_id}


def weights_of(model) -> dict[str, torch.Tensor]:
    """A loaded Model's parameters, unfused, in mistral-inference names (to compare with originals)."""
    from mistral_ext.checkpoint import parameter_slots

    return {name: view.detach() for name, view in parameter_slots(model.transformer).items()}
