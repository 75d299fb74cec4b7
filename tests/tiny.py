"""Tiny random models for tests: HF MistralForCausalLM folders (save_pretrained) and Mistral consolidated folders
made from them, with weights of standard deviation ~0.15 so attention is far from uniform."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mistral_ext.args import ModelArgs
from mistral_ext.checkpoint import HF_LAYER_NAMES, HF_TOP_NAMES, write_safetensors


def hf_config(args: ModelArgs):
    from transformers import MistralConfig  # imported here: the GPU check machine may lack transformers

    return MistralConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, sliding_window=args.sliding_window, tie_word_embeddings=args.tie_embeddings,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager")


def random_hf_model(args: ModelArgs, std: float = 0.15):
    from transformers import MistralForCausalLM

    model = MistralForCausalLM(hf_config(args)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else std * torch.randn_like(p))
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The documented inverse of HF's permutation: reshape(n_heads, 2, hd/2, dim).transpose(1, 2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def renamed_interleaved(model, args: ModelArgs, top: dict[str, str], layer: dict[str, str],
                        layer_name: str) -> dict[str, torch.Tensor]:
    """The HF model's tensors under another naming (top: HF name -> name; layer: HF name inside a layer -> name,
    placed by layer_name.format(i=..., name=...)), with Q/K rows in the interleaved RoPE order (the documented
    inverse of HF's permutation), as Mistral consolidated files and GGUF files hold them."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    out = {ours: sd[hf] for hf, ours in top.items() if not (hf == "lm_head.weight" and args.tie_embeddings)}
    for i in range(args.n_layers):
        for hf, ours in layer.items():
            w = sd[f"model.layers.{i}.{hf}"]
            if hf == "self_attn.q_proj.weight":
                w = half_split_to_interleaved(w, args.n_heads)
            elif hf == "self_attn.k_proj.weight":
                w = half_split_to_interleaved(w, args.n_kv_heads)
            out[layer_name.format(i=i, name=ours)] = w.contiguous()
    return out


def save_consolidated(model, args: ModelArgs, folder: Path, fmt: str = "safetensors") -> Path:
    """A Mistral consolidated folder (params.json + consolidated weights, interleaved RoPE rows) from an HF model."""
    folder.mkdir(parents=True, exist_ok=True)
    out = renamed_interleaved(model, args, HF_TOP_NAMES, HF_LAYER_NAMES, "layers.{i}.{name}")
    params = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim, "hidden_dim": args.hidden_dim,
              "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
              "vocab_size": args.vocab_size, "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len,
              "tied_embeddings": args.tie_embeddings}
    if args.sliding_window is not None:
        params["sliding_window"] = args.sliding_window
    (folder / "params.json").write_text(json.dumps(params))
    if fmt == "safetensors":
        write_safetensors(folder / "consolidated.safetensors", out)
    else:
        torch.save(out, folder / "consolidated.00.pth")
    return folder


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=1, vocab_size=97,
                sliding_window=16, max_seq_len=512)
    return ModelArgs(**{**base, **overrides})


def text_checkpoints(tmp_path_factory) -> dict:
    """HF folders of two tiny random models that read and write text (vocabulary 32000, the Mistral v1 tokenizer,
    weights std 0.3): "window" (W = 16, GQA 4) and "no_window" (a context of 64, GQA 1)."""
    import shutil

    from assets import mistral_v1_tokenizer

    out = {}
    for name, overrides in (("window", {}), ("no_window", dict(sliding_window=None, max_seq_len=64, n_kv_heads=4))):
        folder = save_hf(random_hf_model(tiny_args(vocab_size=32000, **overrides), std=0.3),
                         tmp_path_factory.mktemp(name))
        shutil.copy(mistral_v1_tokenizer(), folder / "tokenizer.model")
        out[name] = folder
    return out
