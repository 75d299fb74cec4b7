"""Regenerates the CPU part of bench/RESULTS.md: runs every CPU benchmark on this machine and writes its output,
with the command, commit, machine and date of each. The GPU figures and the reading of the figures against the
issues' targets live in sections of their own, kept as they are.
The Mistral-7B-shaped run needs its GGUF file (scripts/mistral_7b_gguf.py --type q4_0 writes it) and the llama.cpp
rows llama-cpp-python (bench/latency.py says where); without them those rows say they are unavailable.

    python bench/results.py            # about 15 minutes on 2 cores, on a quiet machine
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path

from mistral_ext.assets import cache_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
GPU_MARK = "## GPU"
TARGETS_MARK = "## Against the targets"  # written by hand from the figures above; kept, like the GPU section
MISTRAL_7B_GGUF = cache_dir() / "mistral-7b-random-q4_0.gguf"

RUNS = [
    ("Per-op CPU kernels against the plain-PyTorch reference (one Mistral 7B layer's shapes)",
     ["bench/ops.py"]),
    ("Per-op CPU kernels, bfloat16", ["bench/ops.py", "--dtype", "bfloat16"]),
    ("Latency and memory: the default model (SmolLM2-135M-Instruct, its Q4_1 GGUF) as load() holds it, eager and "
     "compiled, against llama.cpp on the same file and our dense float32 path",
     ["bench/latency.py", "--model", "smollm2", "--engines", "ours,compiled,dense,llamacpp", "--threads", "2",
      "--prompt-lengths", "16,128,512", "--contexts", "16", "--batch-sizes", "1,4", "--decode-steps", "32",
      "--repeats", "3"]),
    ("Latency and memory: a Mistral-7B-shaped Q4_0 GGUF (random weights, 4.07 GB) against llama.cpp",
     ["bench/latency.py", "--model", str(MISTRAL_7B_GGUF), "--engines", "ours,compiled,llamacpp", "--threads", "2",
      "--prompt-lengths", "16,128", "--contexts", "16", "--batch-sizes", "1,4", "--decode-steps", "8", "--warmup", "2",
      "--repeats", "3"]),
    ("Latency and memory: Mistral 7B's shape with dense bfloat16 weights held as stored (random, 14.5 GB), float32 "
     "activations",
     ["bench/latency.py", "--model", "mistral-7b", "--engines", "ours", "--threads", "2", "--prompt-lengths", "16",
      "--contexts", "16", "--batch-sizes", "1,4", "--decode-steps", "8", "--repeats", "3"]),
    ("Tensor parallelism: the Mistral-7B-shaped Q4_0 GGUF over 2 processes (gloo, one thread each), with the cost of "
     "one all-reduce",
     ["bench/latency.py", "--model", str(MISTRAL_7B_GGUF), "--tensor-parallel", "2", "--threads", "1",
      "--prompt-lengths", "16", "--contexts", "16", "--batch-sizes", "1,4", "--decode-steps", "8", "--warmup", "1",
      "--repeats", "3"]),
    ("Latency: the default model dense in float32 against the reference ops and HF transformers on the same weights, "
     "step by step and generate end to end",
     ["bench/latency.py", "--model", "smollm2", "--dtype", "float32", "--engines", "ours,reference,hf",
      "--generate", "128,64"]),
    ("Latency: the tiny config (random weights, 4 layers, dim 256, vocab 32000)", ["bench/latency.py", "--model", "tiny"]),
    ("Host time of a decode step: a host-bound model and the tiny config, batch 1 (run with --compare DIR for a "
     "side-by-side figure against another commit)", ["bench/step_overhead.py"]),
    ("Sliding-window against full causal attention (8 query heads, 2 KV heads on CPU)", ["bench/attention.py"]),
    ("KV-cache memory: rolling buffer against full cache", ["bench/memory.py"]),
    ("Serving: concurrent streaming clients on the default model against llama-cpp-python's server",
     ["bench/serve.py", "--threads", "2", "--max-tokens", "64", "--rounds", "3"]),
]


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    cpu = sh("sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip() or platform.processor()
    cores = sh("nproc")
    commit = sh("git", "rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if sh("git", "status",
                                                                                               "--porcelain") else "")
    date = datetime.date.today().isoformat()
    sections = []
    for title, cmd in RUNS:
        if str(MISTRAL_7B_GGUF) in cmd and not MISTRAL_7B_GGUF.exists():
            sections.append(f"### {title}\n\nNot run: {MISTRAL_7B_GGUF} is missing "
                            f"(`python scripts/mistral_7b_gguf.py --type q4_0` writes it).\n")
            continue
        print(f"running {' '.join(cmd)} ...", file=sys.stderr)
        out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
        sections.append(f"### {title}\n\n`python {' '.join(cmd)}`\n\n```\n{out.stdout.strip()}\n```\n")
    old = RESULTS.read_text() if RESULTS.exists() else ""
    kept = next((old[old.index(mark):] for mark in (TARGETS_MARK, GPU_MARK) if mark in old),
                f"{GPU_MARK}\n\nNo GPU run has happened yet: there are no GPU figures.\n")
    RESULTS.write_text(
        "# Measured results\n\n"
        "Every figure comes with its command; each comparison was measured side by side in the same run. Times are\n"
        "medians of repeated runs after warm-up. Physical limits to read them against: Mistral 7B bf16 decode reads\n"
        "14.22 GB of weights plus 131,072 B of K/V per cached position per token; on the CPU the limit is the weight\n"
        "bytes per token over the read bandwidth measured in the same run, sampled just before and just after each\n"
        "timed run (printed in each latency table). Working sets smaller than the machine's L3 cache stay\n"
        "cache-resident, so their GB/s can exceed the DRAM bandwidth.\n\n"
        f"## CPU\n\nMachine: {cpu}, {cores} cores. Commit: {commit}. Date: {date}.\n"
        f"Regenerate with `python bench/results.py`.\n\n" + "\n".join(sections) + f"\n{kept}")
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
