"""Compiles every CUDA kernel source with nvcc -Xptxas -v for each architecture and writes the registers, shared
memory, stack and spills of each kernel to bench/kernel_resources.md. Exits non-zero if a hot kernel spills: the
bf16/fp16 instantiations, which the engine runs (the fp32 ones exist for tight tests against the reference).

    python bench/kernel_resources.py [--out FILE] [--archs 80,90]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernel_sources() -> list[Path]:
    """The kernel list of CMakeLists.txt (MISTRAL_EXT_CUDA_KERNELS), so this script cannot drift from the build."""
    text = (ROOT / "CMakeLists.txt").read_text()
    block = re.search(r"set\(MISTRAL_EXT_CUDA_KERNELS(.*?)\)", text, re.S).group(1)
    return [ROOT / s for s in block.split()]


def nvcc() -> str:
    for candidate in (os.environ.get("CUDA_HOME", "") + "/bin/nvcc", "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("kernel_resources: nvcc not found (set CUDA_HOME)")


def without_parameters(name: str) -> str:
    """`void kernel<args>(parameters)` -> `kernel<args>`. The parameters are the last parenthesised group: template
    arguments may hold parentheses too (an enum's `(QuantFormat)2`)."""
    name = name.removeprefix("void ")
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i] if name.endswith(")") else name
    return name


def demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    short = [re.sub(r"mistral_ext::cuda::(\(anonymous namespace\)::)?", "", o) for o in out[: len(names)]]
    return [without_parameters(s) for s in short]  # the kernel and its template arguments


def ptxas_report(source: Path, archs: list[str]) -> list[dict]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc(), "-std=c++20", "-O3", f"-I{ROOT / 'csrc'}", "--expt-relaxed-constexpr", "-Xptxas=-v",
               *gencode, "-c", str(source), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": m.group(2), "spill_stores": 0, "spill_loads": 0, "stack": 0,
                       "line": ""}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers.*", line)
        if m:
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
            current["line"] = m.group(0)
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        row["kernel"] = name
        row["source"] = source.name
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "kernel_resources.md")
    parser.add_argument("--archs", default="80,90")
    args = parser.parse_args()
    archs = args.archs.split(",")
    rows = [r for src in kernel_sources() for r in ptxas_report(src, archs)]
    version = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    lines = [
        "# CUDA kernel resources (ptxas -v)",
        "",
        f"Written by `python bench/kernel_resources.py` with {version}. Static shared memory only: the attention "
        "kernels also take dynamic shared memory at launch (see their launchers). Spills must be 0 in the bf16/fp16 "
        "kernels the engine runs.",
        "",
        "| source | kernel | arch | registers | static smem (B) | stack (B) | spill stores (B) | spill loads (B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernel = r["kernel"].replace("|", "\\|")
        lines.append(f"| {r['source']} | `{kernel}` | {r['arch']} | {r['registers']} | {r['smem']} | {r['stack']} | "
                     f"{r['spill_stores']} | {r['spill_loads']} |")
    args.out.write_text("\n".join(lines) + "\n")
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"kernel_resources: {len(rows)} kernel builds from {len(kernel_sources())} sources -> {args.out}")
    hot_spills = 0
    for r in spilling:
        hot = not re.search(r"<float[,>]", r["kernel"])
        hot_spills += hot
        print(f"{'SPILL' if hot else 'spill (fp32, test-only)'}: {r['kernel']} {r['arch']}: {r['spill_stores']} B "
              f"stores, {r['spill_loads']} B loads")
    return 1 if hot_spills else 0


if __name__ == "__main__":
    sys.exit(main())
