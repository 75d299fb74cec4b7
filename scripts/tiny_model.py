"""Writes a tiny random Mistral-architecture checkpoint (HF layout: config.json + model.safetensors) with the real
Mistral 7B v1 tokenizer, for trying the engine before real weights are at hand. Its text is random, by design.

    python scripts/tiny_model.py /tmp/mistral-tiny
    python -m mistral_ext generate --model /tmp/mistral-tiny "Hello"
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

from mistral_ext.assets import mistral_v1_tokenizer
from mistral_ext.checkpoint import write_safetensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write the checkpoint")
    parser.add_argument("--dim", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    parser.add_argument("--window", type=int, default=64, help="sliding window (default 64; 0 for none)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    dim, heads, kv_heads, head_dim, hidden, vocab = args.dim, 8, 2, args.dim // 8, 3 * args.dim, 32000
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": args.layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "sliding_window": args.window or None, "max_position_embeddings": 8192,
              "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    w = lambda *shape: 0.2 * torch.randn(*shape)
    tensors = {"model.embed_tokens.weight": w(vocab, dim), "model.norm.weight": torch.ones(dim),
               "lm_head.weight": w(vocab, dim)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": w(heads * head_dim, dim),
                    p + "self_attn.k_proj.weight": w(kv_heads * head_dim, dim),
                    p + "self_attn.v_proj.weight": w(kv_heads * head_dim, dim),
                    p + "self_attn.o_proj.weight": w(dim, heads * head_dim),
                    p + "mlp.gate_proj.weight": w(hidden, dim), p + "mlp.up_proj.weight": w(hidden, dim),
                    p + "mlp.down_proj.weight": w(dim, hidden),
                    p + "input_layernorm.weight": torch.ones(dim), p + "post_attention_layernorm.weight": torch.ones(dim)}
    args.folder.mkdir(parents=True, exist_ok=True)
    (args.folder / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(args.folder / "model.safetensors", tensors)
    shutil.copy(mistral_v1_tokenizer(), args.folder / "tokenizer.model")
    print(f"wrote a random {args.layers}-layer, dim-{dim} Mistral-architecture model to {args.folder}")


if __name__ == "__main__":
    main()
