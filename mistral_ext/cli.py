"""Command line: `python -m mistral_ext generate --model PATH "prompt"` (also installed as `mistral-ext`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _generate(args: argparse.Namespace) -> int:
    from . import generate, load

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None)

    def stream(_index: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    completion = generate(model, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop or None,
                          stream=stream, details=True)
    sys.stdout.write("\n")
    print(f"prefill {completion.prefill_ms:.1f} ms | decode {completion.decode_tokens_per_s:.1f} tok/s | "
          f"{len(completion.tokens)} tokens | finish: {completion.finish_reason}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mistral-ext", description="mistral_ext: Mistral 7B-architecture inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt, streaming it as it is made")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", required=True, help="checkpoint folder (HF: config.json; consolidated: params.json)")
    gen.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable), not printed")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="default: bfloat16 on CUDA, float32 on CPU")
    gen.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    sub.add_parser("info", help="print what this build of mistral_ext compiled")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            from . import build_info

            print(json.dumps(build_info(), indent=2))
            return 0
        return _generate(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"mistral-ext: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
