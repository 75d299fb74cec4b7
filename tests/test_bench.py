"""The benchmark scripts run (small shapes), print every row they promise with well-formed figures (exact where
they are deterministic; no timing is compared, as timings depend on the machine) and explain their options, so they
cannot rot between runs."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_PYTHON = Path.home() / ".cache" / "llamacpp-venv" / "bin" / "python"  # bench/latency.py's default
# scripts/mistral_7b_gguf.py's shape options for a small file of the same architecture
SMALL_SHAPE = ["--dim", "128", "--layers", "2", "--head-dim", "32", "--hidden-dim", "256", "--heads", "4",
               "--kv-heads", "2", "--window", "64"]


def run(script, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          check=True, timeout=600, env=env).stdout


def write_mistral_shaped_gguf(path: Path, fmt: str) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "mistral_7b_gguf.py"), str(path), "--type", fmt,
                    *SMALL_SHAPE], capture_output=True, text=True, check=True, timeout=600)
    return path


def rows_under(out: str, header: str, fields: int = 0) -> list[list[str]]:
    """The whitespace-separated fields of each row under the first line containing `header`, up to a blank line
    (rules of dashes skipped); with `fields`, only the last fields - 1 are split off (names with spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        if set(line.strip()) != {"-"}:
            rows.append(line.rsplit(None, fields - 1))
    return rows


def number(field: str) -> float:
    """A printed figure, ratios ("2.00x") and shares ("41%") included."""
    return float(field.removesuffix("x").removesuffix("%"))


def positive(fields) -> bool:
    """Finite and > 0. The scripts print times and rates with significant digits, never rounding one to 0."""
    return all(math.isfinite(number(f)) and number(f) > 0 for f in fields)


def test_ops_benchmark_quick_run_times_every_op():
    out = run("ops.py", "--quick")
    # --quick shapes (bench/ops.py cases): window 256, prefill T = 64
    expected = [f"{op} T={t}" for t in (1, 64) for op in ("rms_norm", "silu_mul", "rope", "rope_cache_write")]
    expected += [f"dense_linear {dtype} T={t}" for dtype in ("float32", "bfloat16") for t in (1, 4, 64)]
    expected += [f"quant_linear {fmt} T={t}" for fmt in ("q4_0", "q4_1", "q8_0") for t in (1, 4)]
    expected += ["attention_decode ring=256", "attention_prefill T=64 after 128"]
    rows = rows_under(out, "kernel ms", fields=6)  # name, kernel ms, reference ms, speed-up, rate, unit
    assert [r[0] for r in rows] == expected, out
    for name, kernel_ms, reference_ms, speed_up, rate, unit in rows:
        assert positive([kernel_ms, reference_ms, rate]) and math.isfinite(number(speed_up)), f"{name}:\n{out}"
        prefill = name.startswith("attention_prefill") or name.endswith("T=64") and name.startswith("dense_linear")
        assert unit == ("GFLOP/s" if prefill else "GB/s"), f"{name}:\n{out}"


def check_latency_rows(out: str, engines: list[str], memory_engines: list[str]) -> None:
    """--quick rows: prompts of 8 tokens; decode at context 8 for batches 1 and 2; each engine in order, ours first
    (time/ours of ours is 1 exactly); a memory row per engine measured in a process of its own."""
    columns, *first_token = rows_under(out, "time to first token")
    assert " ".join(columns) == "prompt engine ms time/ours", out
    assert [r[:2] for r in first_token] == [["8", e] for e in engines], out
    assert all(len(r) == 4 and positive([r[0], *r[2:]]) for r in first_token), out
    columns, *decode = rows_under(out, "decode (")
    assert " ".join(columns) == "batch context engine ms/step tok/s time/ours GB/s % of read % of best", out
    assert [r[:3] for r in decode] == [[b, "8", e] for b in ("1", "2") for e in engines], out
    assert all(len(r) == 9 and positive([*r[:2], *r[3:]]) for r in decode), out
    assert {r[3] for r in first_token if r[1] == "ours"} | {r[5] for r in decode if r[2] == "ours"} == {"1x"}, out
    columns, *memory = rows_under(out, "resident memory")
    assert " ".join(columns) == "engine load MB first token MB file-backed MB weights MB KV positions KV MB", out
    assert [r[0] for r in memory] == memory_engines and all(len(r) == 7 and positive(r[1:]) for r in memory), out


def test_latency_compares_every_engine_and_says_which_are_unavailable():
    out = run("latency.py", "--quick", "--engines", "ours,dense,reference,hf,llamacpp", "--generate", "8,5")
    check_latency_rows(out, ["ours", "dense", "reference", "hf"], ["ours", "dense"])
    assert "llamacpp: unavailable: it needs a GGUF file" in out, out
    columns, *generate = rows_under(out, "generate end to end (batch 1, from an empty cache: a 8-token prompt")
    assert columns == ["engine", "tokens", "ms", "time/ours"], out
    assert [r[0] for r in generate] == ["ours", "dense", "reference", "hf"], out
    made = {r[1] for r in generate}  # the others make as many as ours: 5, or fewer if it met EOS
    assert len(made) == 1 and 1 <= int(made.pop()) <= 5 and all(positive(r[1:]) for r in generate), out
    assert generate[0][3] == "1x", out


def test_latency_without_transformers_leaves_hf_out_with_a_note(tmp_path):
    hidden = tmp_path / "transformers"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError('hidden by the test', name='transformers')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    out = run("latency.py", "--quick", "--engines", "ours,hf", env=env)
    check_latency_rows(out, ["ours"], ["ours"])
    assert "hf: unavailable: transformers is not installed" in out, out


def test_latency_tensor_parallel_times_ours_over_two_ranks_and_the_all_reduce():
    out = run("latency.py", "--quick", "--tensor-parallel", "2", "--engines", "ours,hf")
    check_latency_rows(out, ["ours"], [])
    assert "tensor parallel over 2 ranks (gloo): ours alone (hf and the memory rows need one process)" in out, out
    columns, *rows = rows_under(out, "all-reduce (gloo, 2 ranks) of one decode step's activations [batch, 256]")
    assert columns == ["batch", "us", "ms/step"] and [r[0] for r in rows] == ["1", "2"], out
    assert all(len(r) == 3 and positive(r) for r in rows), out


def test_latency_without_llamacpp_python_says_so(tmp_path):
    gguf = write_mistral_shaped_gguf(tmp_path / "m.gguf", "q8_0")
    out = run("latency.py", "--quick", "--model", str(gguf), "--engines", "llamacpp",
              "--llamacpp-python", str(tmp_path / "no-such-python"))
    check_latency_rows(out, ["ours"], ["ours"])
    assert f"llamacpp: unavailable: no Python at {tmp_path / 'no-such-python'}" in out, out


@pytest.mark.skipif(not LLAMACPP_PYTHON.is_file(), reason=f"llama-cpp-python is not installed at {LLAMACPP_PYTHON}")
def test_latency_runs_llamacpp_on_the_same_gguf(tmp_path):
    """Where llama-cpp-python is installed (latency.py's default place; not in CI): llama.cpp runs the file
    scripts/mistral_7b_gguf.py writes, at every batch size."""
    gguf = write_mistral_shaped_gguf(tmp_path / "m.gguf", "q4_0")
    out = run("latency.py", "--quick", "--model", str(gguf), "--engines", "ours,llamacpp")
    check_latency_rows(out, ["ours", "llamacpp"], ["ours", "llamacpp"])


def test_attention_benchmark_prints_window_full_and_sdpa_rows():
    out = run("attention.py", "--quick")
    # --quick: N = 96 and 200, W = 64. Prefill: N, window ms, full ms, full/window, window TFLOP/s, full TFLOP/s,
    # sdpa full ms, sdpa/window. Decode: ring, ours ms, ours GB/s, sdpa ms, sdpa GB/s.
    prefill = rows_under(out, "full/window")
    assert [r[0] for r in prefill] == ["96", "200"] and all(len(r) == 8 and positive(r) for r in prefill), out
    decode = rows_under(out, "ours GB/s")
    assert [r[0] for r in decode] == ["64"] and all(len(r) == 5 and positive(r) for r in decode), out


def test_memory_benchmark_rolling_cache_storage_stays_at_w_slots():
    """From the cache tensors' storage: the rolling cache holds W slots at every N, the full cache N, so
    full/rolling = N / W exactly. The resident-memory columns move with the machine: only their form is checked."""
    out = run("memory.py", "--quick")
    head = re.search(r"(\d+) layer\(s\), bfloat16, W = (\d+)", out)
    layers, window = int(head[1]), int(head[2])
    slot_bytes = 2 * layers * 8 * 128 * 2  # K and V of one position: 8 KV heads x head_dim 128, bfloat16
    rows = rows_under(out, "full/rolling")
    assert [int(r[0]) for r in rows] == [256, 512], out  # the --quick lengths, both > W
    for n, rolling, full, ratio, flat, *resident in rows:
        assert int(rolling) == window * slot_bytes and int(full) == int(n) * slot_bytes, out
        assert ratio == f"{int(n) / window:.2f}x" and flat == "yes", out
        assert len(resident) == 4 and all(math.isfinite(number(f)) for f in resident), out


def test_serve_benchmark_streams_cancels_and_says_what_is_missing(tmp_path):
    """bench/serve.py against our server alone (no llama-cpp-python here): one row per level, every request of the
    cancellation run ended as it should, nothing left running or waiting."""
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    out = run("serve.py", "--clients", "1,3", "--rounds", "1", "--max-tokens", "4", "--cancellations", "12",
              "--llamacpp-python", str(tmp_path / "no-such-python"))
    rows = rows_under(out, "agg tok/s")
    assert [r[:2] for r in rows[:2]] == [["ours", "1"], ["ours", "3"]], out
    assert all(len(r) == 8 and positive(r[2:]) for r in rows[:2]), out
    assert "12/12 ended as they should; afterwards running 0, waiting 0" in out, out
    assert "llama-cpp-python: " in out and "its rows are missing" in out, out
    assert re.search(r"ours: TTFT alone [\d.]+ ms, arriving while 7 decode [\d.]+ ms", out), out


@pytest.mark.parametrize("script", ["bench/ops.py", "bench/latency.py", "bench/attention.py", "bench/memory.py",
                                    "bench/results.py", "bench/serve.py", "bench/gpu_stages.py",
                                    "scripts/mistral_7b_gguf.py"])
def test_every_option_is_explained(script):
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
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


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_mistral_shaped_gguf_loads_with_its_shape_vocabulary_and_finite_logits(tmp_path, fmt):
    """scripts/mistral_7b_gguf.py at a small shape: every matrix in the format asked, norms F32; mistral_ext reads
    the shape, the window and the Mistral vocabulary back and gives finite logits of order 1."""
    import gguf
    import torch

    import mistral_ext
    from assets import mistral_v1_tokenizer
    from mistral_ext.tokenizer import Tokenizer

    path = write_mistral_shaped_gguf(tmp_path / "m.gguf", fmt)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}, types
    assert {types[n] for n in types if not n.endswith("norm.weight")} == {fmt.upper()}, types
    model = mistral_ext.load(path, device="cpu")
    assert model.args == mistral_ext.ModelArgs(dim=128, n_layers=2, head_dim=32, hidden_dim=256, n_heads=4,
                                               n_kv_heads=2, vocab_size=32000, norm_eps=model.args.norm_eps,
                                               sliding_window=64, max_seq_len=8192)
    assert model.args.norm_eps == pytest.approx(1e-5)
    ids = model.tokenizer.encode("The capital of France is")
    assert ids == Tokenizer(mistral_v1_tokenizer()).encode("The capital of France is")
    logits = model.forward(torch.tensor([ids]))
    assert logits.isfinite().all() and 0.1 < float(logits.std()) < 10, logits.std()


def test_gpu_check_runs_no_pip():
    """The GPU machine has no package index: bench/gpu_check.sh installs nothing. (.ci/run runs its dry run.)"""
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert not re.search(r"\bpip3?\b", script), "gpu_check.sh must not run pip: the GPU machine has no package index"


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
    for kernel in ("rms_norm_kernel", "rope_cache_kernel", "silu_mul_kernel", "dense_linear_kernel",
                   "decode_split_kernel", "decode_merge_kernel", "prefill_kernel", "quant_linear_kernel",
                   "quant_embedding_kernel"):
        assert f"`{kernel}<" in table, kernel


def test_step_overhead_against_another_tree():
    """Both configs, both trees (here the same checkout twice), positive figures and their ratio."""
    out = run("step_overhead.py", "--compare", str(ROOT), "--rounds", "1", "--steps", "5")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("host-bound", "tiny"))]
    assert [r[0] for r in rows] == ["host-bound", "tiny"], out
    for r in rows:
        assert len(r) == 4 and all(number(f) > 0 for f in r[1:]), out
        assert math.isclose(number(r[1]) / number(r[2]), number(r[3]), rel_tol=0.01, abs_tol=0.006), out
