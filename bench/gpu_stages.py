"""The stages of bench/gpu_check.sh that run in Python, one function each; the script limits, times and sums them
up. A stage prints its tables and writes its figures to OUT/<stage>.json.

    python bench/gpu_stages.py STAGE [--dry-run] [--out DIR]

Stages, at Mistral 7B's shapes in bfloat16 on CUDA (--dry-run: small shapes on the CPU, enough to run the code):
  kernels   every kernel against mistral_ext.reference: max error against float64, and the bound the op tests use
            (twice the error of the reference computed naively in bfloat16, plus one unit at the output's scale)
  graphs    CUDA-graph replay of the decode step against eager over 64 steps crossing the window, and its speed-up
  model     decode tok/s at each context and prefill ms on random weights, against the copy bandwidth measured
  profile   per-kernel microseconds of one decode step (torch.profiler); torch's bf16 matmul (cuBLAS) GB/s at the
            five projection shapes, one token
  quant     quant_linear (q4_0, q8_0) against torch's bf16 matmul at the projection shapes: decode and prefill
  parallel  tensor parallelism through NCCL (gloo in a dry run) on a world of one rank, at the small shapes: the
            machine has one GPU and NCCL takes one rank per GPU, so this runs the code path (process group, the
            rank's device, all-reduces, the token broadcast), not a split; the logits must be the plain model's
  sanitize  each kernel case at the small shapes, called once (what compute-sanitizer watches)
Exit status: 0 ok, 1 a check failed, 3 not applicable (the reason is the last line printed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import mistral_ext
from latency import Ours, random_model
from mistral_ext import ModelArgs, ops, quant, reference
from mistral_ext.model import step_layout

NOT_APPLICABLE = 3
DTYPE = torch.bfloat16
QUANT_FORMATS = ("q4_0", "q8_0")


class NotApplicable(Exception):
    """A stage with nothing to check yet; the message says why."""


@dataclass(frozen=True)
class Shapes:
    args: ModelArgs  # the model, and the kernels' dimensions
    contexts: tuple[int, ...]  # positions cached before the timed decode steps
    prefill: int  # prompt tokens of the prefill figure, and T of the kernels' prefill cases
    decode_steps: int
    repeats: int  # timed runs per figure; the median is shown


MISTRAL_7B = Shapes(ModelArgs.mistral_7b(), contexts=(16, 4096), prefill=2048, decode_steps=32, repeats=5)
SMALL = Shapes(ModelArgs(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=512,
                         sliding_window=64), contexts=(16, 64), prefill=32, decode_steps=4, repeats=1)


# ---------------- helpers ----------------


def time_ms(fn, device: torch.device, repeats: int, calls: int = 1, warmup: int = 1) -> float:
    """Median ms per call of fn(i) over `repeats` timed runs of `calls` calls each (i numbers the calls, for
    rotating through copies of a weight), after `warmup` untimed runs; CUDA events on a GPU."""

    def run():
        for i in range(calls):
            fn(i)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) / calls


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Bytes read + written per second by one device-to-device copy far larger than the caches (median of 5)."""
    src = torch.empty((1 << 30) if device.type == "cuda" else (1 << 26), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_ms(lambda _: dst.copy_(src), device, repeats=5) / 1e6


def rotation(make, nbytes: int, device: torch.device) -> list:
    """Copies of what make() returns, as many as take 4x the GPU's L2 cache together (one on the CPU), so that a
    timed run cycling through them reads memory, not the cache."""
    copies = 1
    if device.type == "cuda":
        copies = max(1, math.ceil(4 * torch.cuda.get_device_properties(device).L2_cache_size / nbytes))
    return [make() for _ in range(copies)]


def projections(a: ModelArgs) -> list[tuple[str, int, int]]:
    """(name, N, K) of the model's matrices: wqkv 6144x4096, wo 4096x4096, w13 28672x4096, w2 4096x14336 and
    output 32000x4096 at Mistral 7B."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return [("wqkv", q + 2 * kv, a.dim), ("wo", a.dim, q), ("w13", 2 * a.hidden_dim, a.dim),
            ("w2", a.dim, a.hidden_dim), ("output", a.vocab_size, a.dim)]


def table(columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """Prints rows under columns (key, header, format spec); None prints as n/a."""
    cells = [[h for _, h, _ in columns]]
    cells += [["n/a" if row[k] is None else format(row[k], f) for k, _, f in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def step_bytes(model: mistral_ext.Model, positions: float) -> float:
    """Bytes a batch-1 decode step must read: every weight but the embedding table (one row of it), and the K/V of
    the positions its attention sees (at most the window)."""
    a = model.args
    weights = sum(t.numel() * t.element_size() for t in model.transformer.parameters())
    if not a.tie_embeddings:
        weights -= a.vocab_size * a.dim * model.dtype.itemsize
    seen = min(positions, a.sliding_window or positions)
    return weights + seen * 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.dtype.itemsize


# ---------------- kernels ----------------


def kernel_cases(shapes: Shapes, device: torch.device):
    """(name, op, inputs, compared) for every kernel: op names a function of mistral_ext.ops and of reference,
    compared(result, inputs) the tensors checked (for a cache write: the caches). Index tensors are on the device, as
    a step's metadata is (RollingBufferCache.step). Prefill chunks and decode positions cross the window's length."""
    a = shapes.args
    hq, hkv, d, dim, window, t_prefill = a.n_heads, a.n_kv_heads, a.head_dim, a.dim, a.sliding_window, shapes.prefill
    r = lambda *s: torch.randn(*s, device=device, dtype=DTYPE)
    index = lambda values: torch.as_tensor(values, dtype=torch.long).to(device)
    outputs = lambda out, inputs: out if isinstance(out, tuple) else (out,)
    caches = lambda out, inputs: (inputs[2], inputs[3])
    start = window - t_prefill // 2
    for t in (1, t_prefill):
        yield f"rms_norm T={t}", "rms_norm", (r(t, dim), r(t, dim), r(dim), a.norm_eps), outputs
        yield f"silu_mul T={t}", "silu_mul", (r(t, 2 * a.hidden_dim),), outputs
        yield (f"rope T={t}", "rope", (r(t, hq, d), r(t, hkv, d), index(torch.arange(start, start + t)), a.rope_theta),
               outputs)
        yield (f"cache_write T={t}", "cache_write",
               (r(t, hkv, d), r(t, hkv, d), r(1, window, hkv, d), r(1, window, hkv, d),
                index(step_layout(torch.tensor([t]), torch.tensor([start]), window)[1])), caches)
    positions = torch.tensor([15, window - 1, window, 2 * window + 17])  # batch 4: before, at and past the window
    rows = step_layout(torch.ones(len(positions), dtype=torch.long), positions, window)[1]
    b = len(positions)
    ring = lambda: r(b, window, hkv, d)
    yield (f"rope_cache_write B={b}", "rope_cache_write",
           (r(b, hq, d), r(b, hkv, d), r(b, hkv, d), ring(), ring(), index(positions), index(rows), a.rope_theta),
           lambda out, inputs: (out, inputs[3], inputs[4]))
    yield f"attention_decode B={b}", "attention_decode", (r(b, hq, d), ring(), ring(), index(positions), window), outputs
    yield (f"attention_prefill T={t_prefill} at {start}", "attention_prefill",
           (r(t_prefill, hq, d), r(t_prefill, hkv, d), r(t_prefill, hkv, d), r(1, window, hkv, d),
            r(1, window, hkv, d), index([t_prefill]), index([start]), window), outputs)
    _, n, k = projections(a)[1]  # wo
    for t in (1, 8, 9):
        yield f"dense_linear T={t}", "dense_linear", (r(t, k), 0.02 * r(n, k)), outputs
    for fmt in quant.FORMATS:
        w = quant.QuantizedWeight.quantize(0.02 * torch.randn(n, k, device=device), fmt)
        for t in (1, t_prefill):
            yield f"quant_linear {fmt} T={t}", "quant_linear", (r(t, k), w.qweight, w.scales, w.mins), outputs
        ids = index(torch.randint(0, n, (8,)))
        yield f"quant_embedding {fmt}", "quant_embedding", (ids, w.qweight, w.scales, w.mins, DTYPE), outputs


def in_dtype(inputs: tuple, dtype: torch.dtype) -> tuple:
    """The inputs with every activation-dtype tensor copied in `dtype` (quantized weights, their fp16 scales and
    index tensors as they are), the others cloned: each call gets caches of its own."""
    return tuple((x.to(dtype) if x.dtype == DTYPE else x.clone()) if isinstance(x, torch.Tensor) else x
                 for x in inputs)


def kernels(shapes: Shapes, device: torch.device) -> dict:
    rows, failures = [], []
    for name, op, inputs, compared in kernel_cases(shapes, device):
        runs = {}
        for kind, namespace, dtype in (("kernel", ops, DTYPE), ("truth", reference, torch.float64),
                                       ("naive", reference, DTYPE)):
            args = in_dtype(inputs, dtype)
            runs[kind] = compared(getattr(namespace, op)(*args), args)
        checks = []  # (error, bound, finite) of each output
        for out, truth, naive in zip(runs["kernel"], runs["truth"], runs["naive"]):
            # quant_embedding is exact: its rows are quant.dequantize's floats
            bound = 0.0 if op == "quant_embedding" else (2 * (naive.double() - truth).abs().max().item()
                                                          + torch.finfo(DTYPE).eps * max(1.0, truth.abs().max().item()))
            checks.append(((out.double() - truth).abs().max().item(), bound, bool(out.isfinite().all())))
        err, bound, _ = max(checks, key=lambda c: c[0] - c[1])
        ok = all(finite and e <= b for e, b, finite in checks)
        rows.append({"case": name, "max_error": err, "bound": bound, "verdict": "ok" if ok else "FAILED"})
        if not ok:
            failures.append(name)
    print("every kernel against the float64 reference (bound: twice the naive bf16 reference's error + 1 ulp)")
    table([("case", "case", ""), ("max_error", "max error", ".3g"), ("bound", "bound", ".3g"),
           ("verdict", "verdict", "")], rows)
    return {"rows": rows, "failures": failures}


# ---------------- graphs ----------------


def graphs(shapes: Shapes, device: torch.device) -> dict:
    """From a prompt of window - 32 tokens, 64 greedy steps eager and the same 64 replayed from the graph captured
    on the first (graphs.DecodeGraph), crossing the window's length: the same tokens, and logits that differ by at
    most one bf16 unit at their scale (the same kernels on the same inputs; bit for bit is expected). Then batch-1
    decode ms/step eager and replayed, at that context."""
    a = shapes.args
    model = random_model(a, device, DTYPE)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, a.vocab_size, (a.sliding_window - 32,), generator=gen).tolist()
    runs = {}
    for graphed in (False, True):
        model.cuda_graphs = graphed
        cache = model.new_cache(1)
        logits = model.prefill([prompt], cache)
        steps = []
        for _ in range(64):
            logits = model.decode(logits.argmax(-1).cpu(), cache)
            steps.append(logits)
        runs[graphed] = (torch.stack(steps), int(cache.positions[0]))
    (eager, end), (replayed, _) = runs[False], runs[True]
    diff = (eager - replayed).abs().max().item()
    bound = 2.0**-8 * eager.abs().max().item()
    same_tokens = torch.equal(eager.argmax(-1), replayed.argmax(-1))
    timing = {}
    for graphed in (False, True):
        model.cuda_graphs = graphed
        engine = Ours(model, ops)
        timing[graphed] = statistics.median(engine.decode_ms([prompt], 32) for _ in range(1 + shapes.repeats)) / 32
    speedup = timing[False] / timing[True]
    print(f"64 greedy steps from position {len(prompt)} to {end} (window {a.sliding_window}): graph replay vs eager "
          f"max |logit diff| {diff:.3g} (bound {bound:.3g}), bit for bit: {diff == 0}, same tokens: {same_tokens}")
    print(f"batch-1 decode at context {len(prompt)}: eager {timing[False]:.4g} ms/step, replayed {timing[True]:.4g} "
          f"ms/step: {speedup:.3g}x")
    if not (same_tokens and diff <= bound):
        raise AssertionError(f"graph replay differs from eager: max |diff| {diff:.3g} > {bound:.3g} or tokens differ")
    return {"max_diff": diff, "bound": bound, "bit_for_bit": diff == 0, "from": len(prompt), "to": end,
            "eager_ms": timing[False], "graph_ms": timing[True], "speedup": speedup}


# ---------------- model ----------------


def model(shapes: Shapes, device: torch.device) -> dict:
    a, steps = shapes.args, shapes.decode_steps
    engine = Ours(random_model(a, device, DTYPE), ops)
    copy = copy_bandwidth_gbs(device)
    gen = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(3, a.vocab_size, (n,), generator=gen).tolist()
    decode = []
    for ctx in shapes.contexts:
        prompts = [prompt(ctx)]
        row = {"context": ctx}
        for graphed, key in ((False, ""), (True, "graphs_")):
            engine.model.cuda_graphs = graphed
            runs = [engine.decode_ms(prompts, steps) for _ in range(1 + shapes.repeats)][1:]  # after one warm-up
            ms = statistics.median(runs) / steps
            gbs = step_bytes(engine.model, ctx + steps / 2) / ms / 1e6
            row |= {f"{key}ms_per_step": ms, f"{key}tok_s": 1e3 / ms, f"{key}gbs": gbs,
                    f"{key}pct_of_copy": 100 * gbs / copy}
        decode.append(row)
    p = prompt(shapes.prefill)
    engine.prefill_ms(p)  # warm-up
    prefill_ms = statistics.median(engine.prefill_ms(p) for _ in range(shapes.repeats))
    print(f"{a.n_layers} layers, dim {a.dim}, random bf16 weights; copy bandwidth {copy:.4g} GB/s (read + written); "
          f"decode: batch 1, {steps} greedy steps after the context is cached, eager and replayed from a CUDA "
          f"graph; GB/s: the weights and K/V a step reads")
    table([("context", "context", "d"), ("ms_per_step", "ms/step", ".4g"), ("tok_s", "tok/s", ".4g"),
           ("pct_of_copy", "% of copy", ".3g"), ("graphs_ms_per_step", "ms/step graphs", ".4g"),
           ("graphs_tok_s", "tok/s graphs", ".4g"), ("graphs_pct_of_copy", "% of copy graphs", ".3g")], decode)
    print(f"\nprefill of {shapes.prefill} tokens from an empty cache: {prefill_ms:.4g} ms "
          f"({shapes.prefill * 1e3 / prefill_ms:.4g} tok/s), eager (prefill steps are not captured)")
    return {"copy_gbs": copy, "decode": decode, "prefill": {"tokens": shapes.prefill, "ms": prefill_ms}}


# ---------------- profile ----------------


def profile(shapes: Shapes, device: torch.device) -> dict:
    a, cuda = shapes.args, device.type == "cuda"
    m = random_model(a, device, DTYPE)
    ctx, steps = max(shapes.contexts), shapes.repeats
    gen = torch.Generator().manual_seed(0)
    cache = m.new_cache(1)
    logits = m.prefill([torch.randint(3, a.vocab_size, (ctx,), generator=gen).tolist()], cache)
    step = lambda _: m.decode(logits.argmax(-1), cache)
    step_ms = time_ms(step, device, repeats=steps, warmup=2)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
    # On a GPU the kernels' own time; on the CPU each op's time outside the ops it calls
    if cuda:
        events = [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        events = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(us for _, _, us in events)
    rows = [{"kernel": name, "calls": count / steps, "us": us / steps, "us_per_call": us / count,
             "share": 100 * us / total} for name, count, us in sorted(events, key=lambda e: -e[2])]
    print(f"one decode step at context {ctx} (batch 1, eager, mean of {steps}): {step_ms:.4g} ms wall, "
          f"{total / steps / 1e3:.4g} ms in {'kernels' if cuda else 'ops'}")
    table([("kernel", "kernel" if cuda else "op (self CPU time)", ""), ("calls", "calls/step", ".4g"),
           ("us", "us/step", ".4g"), ("us_per_call", "us/call", ".4g"), ("share", "%", ".3g")],
          [{**r, "kernel": r["kernel"][:90]} for r in rows])

    copy = copy_bandwidth_gbs(device)
    matmul = []
    for name, n, k in projections(a):
        ws = rotation(lambda: torch.randn(n, k, device=device, dtype=DTYPE), n * k * DTYPE.itemsize, device)
        x = torch.randn(1, k, device=device, dtype=DTYPE)
        ms = time_ms(lambda i: x @ ws[i % len(ws)].T, device, repeats=shapes.repeats, calls=len(ws) * 4)
        ours = time_ms(lambda i: ops.dense_linear(x, ws[i % len(ws)]), device, repeats=shapes.repeats,
                       calls=len(ws) * 4)
        gbs, ours_gbs = (n * k * DTYPE.itemsize / t / 1e6 for t in (ms, ours))
        matmul.append({"matrix": f"{name} {n}x{k}", "us": ms * 1e3, "gbs": gbs, "pct_of_copy": 100 * gbs / copy,
                       "ours_us": ours * 1e3, "ours_gbs": ours_gbs})
    print(f"\ntorch's bf16 matmul{' (cuBLAS)' if cuda else ''} and ops.dense_linear, one token, weights read from "
          f"memory (rotating copies past the L2); copy bandwidth {copy:.4g} GB/s")
    table([("matrix", "matrix", ""), ("us", "matmul us", ".4g"), ("gbs", "GB/s", ".4g"),
           ("pct_of_copy", "% of copy", ".3g"), ("ours_us", "dense_linear us", ".4g"), ("ours_gbs", "GB/s", ".4g")],
          matmul)
    return {"context": ctx, "step_ms": step_ms, "kernel_us_per_step": total / steps, "kernels": rows,
            "copy_gbs": copy, "matmul": matmul}


# ---------------- quant ----------------


def quant_stage(shapes: Shapes, device: torch.device) -> dict:
    rows = []
    for name, n, k in projections(shapes.args):
        w = 0.02 * torch.randn(n, k, device=device)
        dense = rotation(lambda: w.to(DTYPE), n * k * DTYPE.itemsize, device)
        for fmt in QUANT_FORMATS:
            qw = quant.QuantizedWeight.quantize(w, fmt)
            qws = rotation(lambda: [t if t is None else t.clone() for t in qw.tensors()], qw.nbytes(), device)
            for t in (1, shapes.prefill):
                x = torch.randn(t, k, device=device, dtype=DTYPE)
                calls = max(len(qws), len(dense)) if t == 1 else 1
                q_ms = time_ms(lambda i: ops.quant_linear(x, *qws[i % len(qws)]), device, shapes.repeats, calls)
                d_ms = time_ms(lambda i: x @ dense[i % len(dense)].T, device, shapes.repeats, calls)
                rate = qw.nbytes() / q_ms / 1e6 if t == 1 else 2 * t * n * k / q_ms / 1e9
                rows.append({"format": fmt, "matrix": f"{name} {n}x{k}", "tokens": t, "quant_ms": q_ms, "bf16_ms": d_ms,
                             "speed_up": d_ms / q_ms, "rate": rate, "unit": "GB/s" if t == 1 else "TFLOP/s"})
    print("quant_linear against torch's bf16 matmul on the same weights (bf16 activations); GB/s: quantized "
          "bytes read; speed-up above 1: quant_linear is faster")
    table([("format", "format", ""), ("matrix", "matrix", ""), ("tokens", "T", "d"), ("quant_ms", "quant ms", ".4g"),
           ("bf16_ms", "bf16 ms", ".4g"), ("speed_up", "bf16/quant", ".3g"), ("rate", "quant rate", ".4g"),
           ("unit", "", "")], rows)
    return {"rows": rows}


# ---------------- sanitize ----------------


def sanitize(shapes: Shapes, device: torch.device) -> dict:
    """Each kernel case once; then prefill layouts the host checks refuse (chunks past the packed tokens, negative
    positions): on a GPU, where index values are not checked, they must still read and write nothing outside the
    tensors; on the CPU (a dry run), they must be refused."""
    names = []
    for name, op, inputs, _ in kernel_cases(shapes, device):
        getattr(ops, op)(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        names.append(name)
        if op == "attention_prefill":
            q, k, v, k_cache, v_cache, seq_lens, start_pos, window = inputs
            wrong = lambda values: torch.tensor(values, device=device)
            for lens, starts in ((wrong([q.shape[0] + 9]), start_pos), (seq_lens, wrong([-3])), (wrong([-1]), start_pos)):
                try:
                    ops.attention_prefill(q, k, v, k_cache, v_cache, lens, starts, window)
                except (ValueError, IndexError):
                    if device.type == "cuda":
                        raise
                    continue
                if device.type != "cuda":
                    raise AssertionError(f"the host checks let seq_lens {lens.tolist()}, start_pos {starts.tolist()} by")
                torch.cuda.synchronize(device)
            names.append("attention_prefill with layouts the host refuses")
    print(f"called once each: {', '.join(names)}")
    return {"calls": names}


# ---------------- parallel ----------------


def parallel(shapes: Shapes, device: torch.device) -> dict:
    """16 greedy steps of the small model as one rank's shard in a world of one and as the plain model: the same
    logits bit for bit (an all-reduce over one rank sums nothing), the same generated tokens."""
    import socket

    import torch.distributed as dist

    from mistral_ext.parallel import ShardGroup

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # NCCL's rank 0 works on the current device
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        a = SMALL.args
        models = {"plain": random_model(a, device, DTYPE), "shard": random_model(a, device, DTYPE, group=ShardGroup())}
        prompt = torch.randint(3, a.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).tolist()
        runs = {}
        for name, m in models.items():
            cache = m.new_cache(1)
            logits = [m.prefill([prompt], cache)]
            for _ in range(16):
                logits.append(m.decode(logits[-1].argmax(-1).cpu(), cache))
            runs[name] = (torch.stack(logits), mistral_ext.generate_tokens(m, [prompt], max_tokens=16))
    finally:
        dist.destroy_process_group()
    diff = (runs["plain"][0] - runs["shard"][0]).abs().max().item()
    same_tokens = runs["plain"][1] == runs["shard"][1]
    print(f"{backend}, world of 1 on {device}: 16 decode steps, max |logit diff| against the plain model {diff:.3g} "
          f"(0 expected), generate_tokens the same: {same_tokens}")
    if diff != 0 or not same_tokens:
        raise AssertionError(f"a one-rank shard differs from the plain model: max |diff| {diff:.3g}, tokens "
                             f"{'same' if same_tokens else 'differ'}")
    return {"backend": backend, "max_diff": diff, "same_tokens": same_tokens}


STAGES = {"kernels": kernels, "graphs": graphs, "model": model, "profile": profile, "quant": quant_stage,
          "parallel": parallel, "sanitize": sanitize}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--dry-run", action="store_true", help="small shapes on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to OUT/<stage>.json")
    opts = parser.parse_args()
    device = torch.device("cpu" if opts.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_stages.py: no CUDA device (--dry-run runs on the CPU)")
    shapes = SMALL if opts.dry_run or opts.stage == "sanitize" else MISTRAL_7B
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{opts.stage}: {where} | torch {torch.__version__} | mistral_ext {mistral_ext.__version__} | "
          f"{'Mistral 7B' if shapes is MISTRAL_7B else 'small'} shapes, bfloat16")
    torch.manual_seed(0)
    record = {"stage": opts.stage, "device": where, "torch": torch.__version__, "dry_run": opts.dry_run}
    try:
        with torch.inference_mode():
            record |= STAGES[opts.stage](shapes, device)
        record["status"] = "FAILED" if record.get("failures") else "ok"
    except NotApplicable as e:
        record |= {"status": "n/a", "reason": str(e)}
        print(f"n/a: {e}")
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / f"{opts.stage}.json").write_text(json.dumps(record, indent=2))
    sys.exit({"ok": 0, "FAILED": 1, "n/a": NOT_APPLICABLE}[record["status"]])


if __name__ == "__main__":
    main()
