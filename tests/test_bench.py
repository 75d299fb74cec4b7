"""The benchmark scripts run (small shapes) and explain their options, so they cannot rot between runs."""

import os
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
    for op in ("rms_norm", "silu_mul", "rope", "rope_cache_write", "mlp_decode", "attention_decode",
               "attention_prefill"):
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


def test_latency_compares_the_same_weights():
    """The HF model that latency.py times holds exactly our weights: same logits."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("latency", ROOT / "bench" / "latency.py")
    latency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(latency)
    for tied in (False, True):
        args = latency.ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
                                 vocab_size=101, sliding_window=8, tie_embeddings=tied)
        ours = latency.random_model(args, torch.device("cpu"), torch.float32)
        hf = latency.hf_copy(ours)
        tokens = torch.randint(0, 101, (2, 30))
        with torch.no_grad():
            torch.testing.assert_close(ours.forward(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh in its CPU dry-run mode: every stage runs or says why it is skipped."""
    import os

    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path))
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in ("build: ok", "tests: ok", "sanitizer: skipped", "latency: ok", "attention: ok", "memory: ok",
                  "summary"):
        assert f"== {stage}" in out.stdout, stage


def test_kernel_resources_no_spills(tmp_path):
    """Every CUDA kernel compiles for sm_80 and sm_90 with ptxas -v, and none spills registers."""
    import shutil

    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        if os.environ.get("MISTRAL_EXT_CUDA") == "1":
            pytest.fail("MISTRAL_EXT_CUDA=1 but nvcc is missing")
        pytest.skip("needs nvcc")
    out = tmp_path / "resources.md"
    result = subprocess.run([sys.executable, ROOT / "bench" / "kernel_resources.py", "--out", out],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    table = out.read_text()
    for kernel in ("rms_norm_kernel", "rope_cache_kernel", "silu_mul_kernel", "mlp_up_kernel", "mlp_down_kernel",
                   "decode_split_kernel", "decode_merge_kernel", "prefill_kernel"):
        assert f"`{kernel}<" in table, kernel
