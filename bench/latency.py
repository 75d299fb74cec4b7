"""Time to first token and decode throughput of mistral_ext, side by side with the naive reference ops in the same
cached generation loop and with HF transformers, on the same weights, prompts and token counts, in one run.

Every figure is the median of --repeats runs after --warmup runs. Decode rows also give the bytes a step must read
(weights + the K/V of every cached position of every sequence) per second, as a share of the read bandwidth this
machine shows in the same run (summing a tensor far larger than the caches).

Models (--model): tiny (random weights), smollm2 (the default SmolLM2-135M-Instruct GGUF), mistral-7b (the paper's
shape, random bf16 weights: GPU only), or a checkpoint path (GGUF file, HF folder, consolidated folder). The
reference engine is the same model with its ops swapped for mistral_ext.reference; HF's model gets a copy of the
very same weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

import mistral_ext  # noqa: E402
from mistral_ext import ModelArgs, reference  # noqa: E402

TINY = ModelArgs(dim=256, n_layers=4, head_dim=32, hidden_dim=768, n_heads=8, n_kv_heads=2, vocab_size=32000,
                 sliding_window=4096, max_seq_len=8192)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------- timing ----------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, setup, device: torch.device, repeats: int, warmup: int) -> float:
    """fn(state) timed after setup() (untimed) for each run; CUDA events on GPU."""
    times = []
    for i in range(warmup + repeats):
        state = setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            sync(device)
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(state)
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def read_bandwidth_gbs(device: torch.device, gib: float = 1.0) -> float:
    """Bytes per second of summing a tensor larger than any cache on this machine (median of 5)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    ms = median_ms(lambda _: x.sum(), lambda: None, device, repeats=5, warmup=1)
    return gib * 2**30 / ms / 1e6


# ---------------- models ----------------


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> mistral_ext.Model:
    """Random weights (std 0.2), made on the device one tensor at a time."""
    from mistral_ext.checkpoint import new_transformer, parameter_slots
    from mistral_ext.engine import Model

    torch.manual_seed(0)
    transformer = new_transformer(args, device, dtype)
    with torch.no_grad():
        for target in parameter_slots(transformer).values():
            target.copy_(torch.ones_like(target) if target.dim() == 1 else 0.2 * torch.randn_like(target))
    return Model(transformer.eval())


def load_model(model: str, device: torch.device, dtype: torch.dtype) -> mistral_ext.Model:
    if model == "tiny":
        return random_model(TINY, device, dtype)
    if model == "mistral-7b":
        return random_model(ModelArgs.mistral_7b(), device, dtype)
    return mistral_ext.load(None if model == "smollm2" else model, device=device, dtype=dtype)


def hf_copy(model: mistral_ext.Model):
    """The same weights in HF transformers' MistralForCausalLM (a Llama checkpoint is one without window)."""
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_ext.checkpoint import HF_LAYER_NAMES, HF_TOP_NAMES, parameter_slots

    a = model.args
    config = MistralConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
        max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
        sliding_window=a.sliding_window, tie_word_embeddings=a.tie_embeddings)
    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            hf = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    ours = parameter_slots(model.transformer)
    theirs = {v: k for k, v in HF_TOP_NAMES.items()}
    for i in range(a.n_layers):
        theirs |= {f"layers.{i}.{v}": f"model.layers.{i}.{k}" for k, v in HF_LAYER_NAMES.items()}
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, tensor in ours.items():
            params[theirs[name]].copy_(tensor)
    return hf.eval()


# ---------------- engines ----------------


class Ours:
    """mistral_ext's cached loop on an op set: its kernels, or the naive reference ops (the same model)."""

    def __init__(self, model: mistral_ext.Model, kernels):
        self.model, self.kernels = model, kernels

    def prefill(self, prompts: list[list[int]]):
        self.model.transformer.use_kernels(self.kernels)
        cache = self.model.new_cache(len(prompts))
        return self.model.prefill(prompts, cache), cache

    def decode_steps(self, state, steps: int) -> None:
        self.model.transformer.use_kernels(self.kernels)
        logits, cache = state
        for _ in range(steps):
            logits = self.model.decode(logits.argmax(-1), cache)


class HF:
    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]):
        device = next(self.model.parameters()).device
        out = self.model(torch.tensor(prompts, device=device), use_cache=True)
        return out.logits[:, -1], out.cache

    @torch.inference_mode()
    def decode_steps(self, state, steps: int) -> None:
        logits, cache = state
        for _ in range(steps):
            out = self.model(logits.argmax(-1)[:, None], cache=cache, use_cache=True)
            logits, cache = out.logits[:, -1], out.cache


def weight_bytes(model: mistral_ext.Model) -> int:
    return sum(p.numel() * p.element_size() for p in model.transformer.parameters())


def kv_bytes_per_position(model: mistral_ext.Model) -> int:
    a = model.args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.dtype.itemsize


# ---------------- main ----------------


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | mistral-7b | PATH (default tiny)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="compute dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--engines", default="ours,reference,hf",
                        help="comma list of ours, reference (naive ops, same loop), hf (transformers)")
    parser.add_argument("--prompt-lengths", type=csv_ints, default=[16, 128, 512],
                        help="prompt lengths for time to first token (default 16,128,512)")
    parser.add_argument("--contexts", type=csv_ints, default=[16, 512],
                        help="cached positions before the timed decode steps (default 16,512)")
    parser.add_argument("--batch-sizes", type=csv_ints, default=[1, 4], help="decode batch sizes (default 1,4)")
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per run (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is shown")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run for tests")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.prompt_lengths, args.contexts, args.batch_sizes = [8], [8], [1, 2]
        args.decode_steps, args.repeats, args.warmup = 4, 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.model == "mistral-7b" and device.type != "cuda":
        sys.exit("latency.py: the mistral-7b shape needs a GPU (--device cuda)")
    engines = args.engines.split(",")

    ours = load_model(args.model, device, dtype)
    runners = {"ours": Ours(ours, mistral_ext.ops)}
    if "reference" in engines:
        runners["reference"] = Ours(ours, reference)
    if "hf" in engines:
        runners["hf"] = HF(hf_copy(ours))
    bandwidth = read_bandwidth_gbs(device)
    wbytes, kvbytes = weight_bytes(ours), kv_bytes_per_position(ours)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                       text=True).stdout.strip() or platform.machine())
    print(f"model {args.model} | {ours.args.n_layers} layers, dim {ours.args.dim}, vocab {ours.args.vocab_size} | "
          f"{str(dtype).removeprefix('torch.')} on {machine} | {torch.get_num_threads()} threads | "
          f"weights {wbytes / 1e6:.1f} MB | read bandwidth {bandwidth:.1f} GB/s | median of {args.repeats}")
    vocab = ours.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()
    results = {"model": args.model, "machine": machine, "dtype": str(dtype), "threads": torch.get_num_threads(),
               "read_bandwidth_gbs": bandwidth, "prefill": [], "decode": []}

    others = [e for e in runners if e != "ours"]
    print(f"\ntime to first token (batch 1)\n{'prompt':>7} " + "".join(f"{e + ' ms':>14}" for e in runners) +
          "".join(f"{'vs ' + e:>14}" for e in others))
    with torch.inference_mode():
        for n in args.prompt_lengths:
            p = prompt(n)
            ms = {e: median_ms(lambda _, r=r: r.prefill([p]), lambda: None, device, args.repeats, args.warmup)
                  for e, r in runners.items()}
            results["prefill"].append({"prompt": n, **{f"{e}_ms": v for e, v in ms.items()}})
            print(f"{n:>7} " + "".join(f"{ms[e]:>14.4g}" for e in runners) +
                  "".join(f"{ms[e] / ms['ours']:>13.3g}x" for e in others))

        print(f"\ndecode ({args.decode_steps} steps after the context is cached; GB/s = weights + K/V read per step)"
              f"\n{'batch':>5} {'context':>7} " + "".join(f"{e + ' ms/step':>19}{e + ' tok/s':>17}" for e in runners)
              + "".join(f"{'vs ' + e:>14}" for e in others) + f"{'ours GB/s':>11}{'% of read':>10}")
        for batch in args.batch_sizes:
            for ctx in args.contexts:
                prompts = [prompt(ctx) for _ in range(batch)]
                ms = {e: median_ms(lambda s, r=r: r.decode_steps(s, args.decode_steps),
                                   lambda r=r: r.prefill(prompts), device, args.repeats, args.warmup)
                      / args.decode_steps for e, r in runners.items()}
                step_bytes = wbytes + batch * (ctx + args.decode_steps / 2) * kvbytes
                gbs = step_bytes / ms["ours"] / 1e6
                results["decode"].append({"batch": batch, "context": ctx, "ours_gbs": gbs,
                                          **{f"{e}_ms_per_step": v for e, v in ms.items()}})
                print(f"{batch:>5} {ctx:>7} " + "".join(f"{ms[e]:>19.4g}{batch * 1e3 / ms[e]:>17.4g}" for e in runners)
                      + "".join(f"{ms[e] / ms['ours']:>13.3g}x" for e in others)
                      + f"{gbs:>11.4g}{100 * gbs / bandwidth:>9.3g}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
