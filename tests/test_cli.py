"""The command line streams text and ends with its timing line; errors are one clear line and exit code 2."""

import re
import shutil
import subprocess
import sys

import pytest
import torch

import mistral_ext
from mistral_ext import cli
from assets import mistral_v1_tokenizer
from tiny import random_hf_model, save_hf, tiny_args


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = save_hf(random_hf_model(tiny_args(vocab_size=32000), std=0.3), tmp_path_factory.mktemp("cli"))
    shutil.copy(mistral_v1_tokenizer(), folder / "tokenizer.model")
    return folder


def run(*args):
    return subprocess.run([sys.executable, "-m", "mistral_ext", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("weights", [[], ["--quantize", "int4"]], ids=["dense", "int4"])
def test_generate_prints_text_and_timing(folder, weights):
    r = run("generate", "--model", str(folder), "--max-tokens", "12", *weights, "Hello there")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "no text"
    assert re.search(r"prefill [\d.]+ ms \| decode [\d.]+ tok/s \| \d+ tokens \| finish: (length|eos)", r.stderr)


def test_console_script_is_installed(folder):
    exe = shutil.which("mistral-ext", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "mistral-ext console script not installed"
    r = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '"version"' in r.stdout


@pytest.mark.parametrize("args,words", [
    (["generate", "--model", "/nonexistent/model", "hi"], "checkpoint not found"),
    (["generate", "--model", "FOLDER", "--top-p", "2", "hi"], "top_p"),
    (["generate", "--model", "FOLDER", "--max-tokens", "-3", "hi"], "max_tokens"),
    (["generate", "--model", "FOLDER", "--quantize", "int3", "hi"], "invalid choice: 'int3'"),
    (["generate", "--model", "FOLDER", "--quantize", "int8", "--dequantize", "hi"], "not allowed with"),
])
def test_errors_are_one_line(folder, args, words):
    r = run(*[str(folder) if a == "FOLDER" else a for a in args])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags,dtype,quantize", [
    ([], None, None),  # the loader's default: a GGUF's quantized tensors stay quantized on the CPU
    (["--dequantize"], torch.float32, None),  # the dense path at the CPU's default dtype
    (["--dequantize", "--dtype", "bfloat16"], torch.bfloat16, None),
    (["--quantize", "int8"], None, "int8"),
])
def test_weight_options_reach_load(monkeypatch, flags, dtype, quantize):
    seen = {}

    def load(path, device, dtype, quantize, tensor_parallel):
        seen.update(dtype=dtype, quantize=quantize, tensor_parallel=tensor_parallel)
        raise ValueError("loaded")

    monkeypatch.setattr(mistral_ext, "load", load)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["generate", "--device", "cpu", *flags, "hi"]) == 2
    assert seen == {"dtype": dtype, "quantize": quantize, "tensor_parallel": False}


def test_compile_flag_compiles_the_loaded_model(monkeypatch):
    calls = []

    class Loaded:
        def compile(self):
            calls.append("compile")
            raise ValueError("compiled")

    monkeypatch.setattr(mistral_ext, "load", lambda *args, **kwargs: Loaded())
    assert cli.main(["generate", "--device", "cpu", "--compile", "hi"]) == 2
    assert calls == ["compile"]
