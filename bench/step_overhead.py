"""Host time of one decode step, this checkout against another one side by side (issue 13's CPU target).

    python bench/step_overhead.py [--compare DIR] [--rounds 3] [--steps 300]

Two batch-1 decode loops on the CPU, float32, random weights: "host-bound", a model so small (dim 64, 2 layers, a
vocabulary of 97) that its arithmetic takes a few microseconds and the step's time is the host's work (Python, the
dispatcher, index metadata, thread fork/join), and "tiny", bench/latency.py's TINY config (dim 256, 4 layers,
vocabulary 32000). Each figure is the median microseconds per step of `--steps` steps after a warm-up. With
--compare DIR (a checkout of another commit with its extension built in place), each round runs both trees in
turn, each in its own process, and the table shows the medians over rounds and their ratio (other / this: above 1,
this tree is faster). Compare trees built the same way (a build with the CUDA kernels is not one without).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HOST_BOUND = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=1, vocab_size=97,
                  sliding_window=4096, max_seq_len=8192)
CONFIGS = ("host-bound", "tiny")


def measure(steps: int) -> dict:
    """us per decode step of each config, in this process (whichever mistral_ext it imports)."""
    import torch

    from latency import TINY, random_model
    from mistral_ext import ModelArgs

    out = {}
    for name, args in zip(CONFIGS, (ModelArgs(**HOST_BOUND), TINY)):
        model = random_model(args, torch.device("cpu"), torch.float32)
        cache = model.new_cache(1)
        logits = model.prefill([[1, 2, 3, 4]], cache)
        token = logits.argmax(-1)
        for _ in range(20):
            token = model.decode(token, cache).argmax(-1)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = model.decode(token, cache)
            times.append(time.perf_counter() - t0)
            token = logits.argmax(-1)
        out[name] = statistics.median(times) * 1e6
    return out


def run_tree(tree: Path, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); import json; from step_overhead import measure; " \
           f"print(json.dumps(measure({steps})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def git_commit(tree: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, default=None, help="another checkout, its extension built in place")
    parser.add_argument("--this", type=Path, default=None,
                        help="the tree measured as this one (default: this checkout), e.g. a copy built another way")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    opts = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    trees = {f"this ({git_commit(here)})": opts.this or here}
    if opts.compare:
        trees = {f"other ({git_commit(opts.compare)})": opts.compare.resolve(), **trees}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(opts.rounds):
        for name, tree in trees.items():
            runs[name].append(run_tree(tree, opts.steps))
    print(f"decode step, batch 1, CPU float32 | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | median of {opts.rounds} rounds of {opts.steps} steps")
    names = list(trees)
    header = ["config"] + [f"{n} us/step" for n in names] + (["ratio"] if len(names) == 2 else [])
    print(" | ".join(header))
    for config in CONFIGS:
        med = [statistics.median(r[config] for r in runs[n]) for n in names]
        cells = [config] + [f"{m:.1f}" for m in med] + ([f"{med[0] / med[1]:.2f}x"] if len(med) == 2 else [])
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
