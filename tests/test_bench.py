"""The benchmark scripts run (small shapes) and explain their options, so they cannot rot between runs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          check=True, timeout=600).stdout


def test_ops_benchmark_quick_run_prints_every_op():
    out = run("ops.py", "--quick")
    for op in ("rms_norm", "silu_mul", "rope", "rope_cache_write", "attention_decode", "attention_prefill"):
        assert f"\n{op} " in out, f"{op} missing from:\n{out}"


def test_latency_compares_three_engines():
    out = run("latency.py", "--quick")
    assert "time to first token" in out and "decode" in out
    for column in ("ours ms", "reference ms", "hf ms", "vs reference", "vs hf", "% of read"):
        assert column in out, column


def test_attention_and_memory_benchmarks_run():
    assert "full/window" in run("attention.py", "--quick")
    out = run("memory.py", "--quick")
    assert "full/rolling" in out and "NO" not in out


@pytest.mark.parametrize("script", ["ops.py", "latency.py", "attention.py", "memory.py", "results.py"])
def test_every_option_is_explained(script):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout
