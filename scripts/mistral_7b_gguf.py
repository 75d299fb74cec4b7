"""Writes a GGUF file of Mistral 7B's shape (arXiv 2310.06825: dim 4096, 32 layers, head_dim 128, hidden 14336,
32 heads, 8 KV heads, vocab 32000, sliding window 4096, context 8192, rope theta 1e4, RMS eps 1e-5) with random
weights in Q4_0 or Q8_0 and the Mistral 7B v1 sentencepiece vocabulary, for benchmarks: mistral_ext and llama.cpp
both load it. Its text is random, by design.

    python scripts/mistral_7b_gguf.py --type q4_0          # ~3.9 GB into ~/.cache/mistral_ext
    python bench/latency.py --model ~/.cache/mistral_ext/mistral-7b-random-q4_0.gguf --engines ours,llamacpp

Tensors are generated and written one at a time (memory stays at the largest tensor, the 32000 x 4096
embedding), and the file appears under its name only once complete. The quantized blocks are random bytes with
fp16 scales of random sign and of a magnitude that gives each matrix a weight std of 1/sqrt(columns), so
activations stay of order 1 through the layers. Every matrix is in --type (llama.cpp's Q4_0 files keep the output
matrix in Q6_K: here it is Q4_0 too); norms are F32 ones. The window is written as llama.attention.sliding_window,
which mistral_ext reads; llama.cpp ignores that key for the llama architecture and attends to the whole context,
which is the same for sequences up to the window. Shape options give smaller files of the same architecture.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import gguf
import numpy as np

from mistral_ext.args import ModelArgs
from mistral_ext.assets import cache_dir, mistral_v1_tokenizer
from mistral_ext.gguf_write import add_model_metadata, add_tokenizer, sentencepiece_fields

BLOCK = 32
# Bytes per block of 32 weights, and the std of a block's integer values when its bytes are uniformly random
# (Q4_0: q - 8 for q uniform in 0..15; Q8_0: int8 uniform in -128..127).
FORMATS = {"q4_0": (gguf.GGMLQuantizationType.Q4_0, 2 + BLOCK // 2, np.sqrt((16**2 - 1) / 12)),
           "q8_0": (gguf.GGMLQuantizationType.Q8_0, 2 + BLOCK, np.sqrt((256**2 - 1) / 12))}
FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> (rows, columns) of a matrix, (n,) of a norm, in llama.cpp's order."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"token_embd.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (args.dim,), p + "attn_q.weight": (q, args.dim),
                   p + "attn_k.weight": (kv, args.dim), p + "attn_v.weight": (kv, args.dim),
                   p + "attn_output.weight": (args.dim, q), p + "ffn_norm.weight": (args.dim,),
                   p + "ffn_gate.weight": (args.hidden_dim, args.dim), p + "ffn_up.weight": (args.hidden_dim, args.dim),
                   p + "ffn_down.weight": (args.dim, args.hidden_dim)}
    return shapes | {"output_norm.weight": (args.dim,), "output.weight": (args.vocab_size, args.dim)}


def random_blocks(rng: np.random.Generator, rows: int, columns: int, fmt: str) -> np.ndarray:
    """uint8 [rows, columns / 32 * block bytes]: random values, each block's first two bytes its fp16 scale. The
    scales' random signs cancel Q4_0's value mean of -0.5 across blocks."""
    _, block_bytes, value_std = FORMATS[fmt]
    blocks = rng.integers(0, 256, size=(rows, columns // BLOCK, block_bytes), dtype=np.uint8)
    magnitude = 1 / (value_std * np.sqrt(columns)) * rng.uniform(0.5, 1.5, size=(rows, columns // BLOCK))
    scales = (magnitude * rng.choice([-1.0, 1.0], size=magnitude.shape)).astype(np.float16)
    blocks[:, :, :2] = scales.view(np.uint8).reshape(rows, columns // BLOCK, 2)
    return blocks.reshape(rows, -1)


def write(path: Path, args: ModelArgs, fmt: str, seed: int) -> None:
    kind, block_bytes, _ = FORMATS[fmt]
    shapes = tensor_shapes(args)
    for name, shape in shapes.items():
        if len(shape) == 2 and shape[1] % BLOCK:
            sys.exit(f"mistral_7b_gguf.py: {name} has {shape[1]} columns, not a multiple of {BLOCK}")
    part = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(part), "llama")
    writer.add_name(f"mistral-7b-shaped random {fmt}")
    writer.add_file_type(FILE_TYPES[fmt])
    add_model_metadata(writer, args)
    add_tokenizer(writer, sentencepiece_fields(mistral_v1_tokenizer()) | {"add_bos_token": True,
                                                                          "add_eos_token": False})
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            rows, columns = shape
            byte_shape = (rows, columns // BLOCK * block_bytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), rows * byte_shape[1], raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for shape in shapes.values():  # in the order of the tensor infos, as write_tensor_data requires
        writer.write_tensor_data(np.ones(shape, dtype=np.float32) if len(shape) == 1 else random_blocks(rng, *shape, fmt))
    writer.close()
    part.replace(path)


def main() -> None:
    base = ModelArgs.mistral_7b()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, nargs="?", default=None,
                        help="file to write (default ~/.cache/mistral_ext/mistral-7b-random-TYPE.gguf, "
                             "or under $MISTRAL_EXT_CACHE)")
    parser.add_argument("--type", choices=sorted(FORMATS), default="q4_0", help="weight format (default q4_0)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--dim", type=int, default=base.dim, help=f"model width (default {base.dim})")
    parser.add_argument("--layers", type=int, default=base.n_layers, help=f"layers (default {base.n_layers})")
    parser.add_argument("--head-dim", type=int, default=base.head_dim, help=f"head size (default {base.head_dim})")
    parser.add_argument("--hidden-dim", type=int, default=base.hidden_dim,
                        help=f"MLP width (default {base.hidden_dim})")
    parser.add_argument("--heads", type=int, default=base.n_heads, help=f"query heads (default {base.n_heads})")
    parser.add_argument("--kv-heads", type=int, default=base.n_kv_heads,
                        help=f"key/value heads (default {base.n_kv_heads})")
    parser.add_argument("--window", type=int, default=base.sliding_window,
                        help=f"sliding window (default {base.sliding_window}; 0 for none)")
    parser.add_argument("--context", type=int, default=base.max_seq_len,
                        help=f"context length (default {base.max_seq_len})")
    opts = parser.parse_args()
    args = dataclasses.replace(base, dim=opts.dim, n_layers=opts.layers, head_dim=opts.head_dim,
                               hidden_dim=opts.hidden_dim, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                               sliding_window=opts.window or None, max_seq_len=opts.context)
    path = opts.path or cache_dir() / f"mistral-7b-random-{opts.type}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write(path, args, opts.type, opts.seed)
    print(f"wrote {path}: {args.n_layers} layers, dim {args.dim}, {opts.type}, {path.stat().st_size / 1e9:.2f} GB "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
