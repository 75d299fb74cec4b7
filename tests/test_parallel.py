"""Tensor parallelism (mistral_ext.parallel) on the CPU with gloo: each rank's shard holds exactly its part of every
weight and 1/N of the sharded bytes (in-process: loading needs no process group); bad splits are refused by name
before any tensor is read; two ranks, each a process with torchrun's environment (tests/tp_worker.py), give the
logits of one process, sample one sequence, and fail rather than hang when one dies; `torchrun -m mistral_ext
generate` prints the text of one process.

Tolerance of the logits: the shards run the same fp32 kernels as one process, except that the products through wo
and w2 are summed in N partial sums (over K/N terms each) then all-reduced: a reordering of fp32 additions, which
changes each such output by at most about K * 2^-24 of the sum of its terms' magnitudes (K <= 128 here: ~1e-5
relative), carried through 2 layers to the logits. atol = rtol = 1e-4 is ten times that, the tolerance of the model
against its reference ops (same reordering kind); a wrong shard, a missing all-reduce or a wrong KV head is off by
O(1) (checked by hand: each breaks these tests). Where quantized matmuls round their activations to int8 (the GGUF
and int8 configs), a 1e-6 difference can move a value across a rounding boundary: those are held to twice the error
the rounding itself makes, measured on the same weights with float activations."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mistral_ext
from mistral_ext import reference
from mistral_ext.checkpoint import CheckpointError, StoredTensor, build_transformer, load_folder, parameter_slots
from mistral_ext.engine import weight_options
from mistral_ext.parallel import Shard, ShardGroup, shard_args, shard_ranges
from mistral_ext.quant import QuantizedWeight
from tiny import random_hf_model, save_consolidated, save_hf, tiny_args

ATOL = RTOL = 1e-4
WORKER = Path(__file__).with_name("tp_worker.py")
SHARDED = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")

# dim 64, 8 heads of 8: a rank's 32 columns of wo and 64 of w2 are whole 32-value blocks
GQA4_WINDOW = dict(n_heads=8, n_kv_heads=2, head_dim=8, hidden_dim=128, sliding_window=8)
KV1_TIED = dict(n_heads=4, n_kv_heads=1, head_dim=16, hidden_dim=96, sliding_window=None, max_seq_len=64,
                tie_embeddings=True)
MHA = dict(n_heads=4, n_kv_heads=4, head_dim=16, hidden_dim=128, sliding_window=16)
# a rank's 256 columns of wo and of w2 are whole 256-value super-blocks
KQUANT = dict(dim=256, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=512, vocab_size=96)


def load_shard(path: Path, shard: Shard | None, quantize: str | None = None):
    """One rank's part of a checkpoint, loaded without a process group (what load(tensor_parallel=True) reads)."""
    options = dataclasses.replace(weight_options("cpu", None, quantize), shard=shard)
    if path.suffix == ".gguf":
        from mistral_ext.gguf_checkpoint import load_gguf

        return load_gguf(path, options).transformer
    return load_folder(path, options).transformer


def dense_weights(transformer) -> dict[str, torch.Tensor]:
    return {name: slot.dequantize() if isinstance(slot, QuantizedWeight) else slot.float()
            for name, slot in parameter_slots(transformer).items()}


def sharded_bytes(transformer) -> dict[str, int]:
    """Bytes each sharded weight of each layer holds (a dense weight, a QuantizedWeight or a list of them)."""
    out = {}
    for i, layer in enumerate(transformer.layers):
        for attr in SHARDED:
            module, key = attr.split(".")
            weight = getattr(layer.get_submodule(module), key)
            tensors = [*weight.buffers()] if isinstance(weight, torch.nn.Module) else [weight]
            out[f"layers.{i}.{attr}"] = sum(t.numel() * t.element_size() for t in tensors)
    return out


def gguf_checkpoint(folder: Path, args, hf, mix: dict[str, str] | None = None) -> Path:
    """A GGUF file whose matrices take the types `mix` gives by part of their name, Q4_0 the rest."""
    pytest.importorskip("gguf")
    from gguf_files import gguf_tensors, write_gguf

    tensors = gguf_tensors(hf, args)
    mix = mix or {"Q4_0": "attn_q", "Q8_0": "attn_k", "Q4_1": "ffn_down"}  # formats side by side
    types = {name: next((t for t, part in mix.items() if part in name), "Q4_0") for name in tensors}
    return write_gguf(folder / "model.gguf", args, tensors, types=types)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (path, quantize, ModelArgs): an HF folder, a consolidated .pth (interleaved RoPE rows), a quantized
    GGUF file, and an HF folder quantized at load."""
    out = {}
    for name, overrides, kind in (("gqa4-window-hf", GQA4_WINDOW, "hf"), ("kv1-tied-pth", KV1_TIED, "pth"),
                                  ("mha-gguf", MHA, "gguf"), ("gqa4-int8", GQA4_WINDOW, "int8"),
                                  ("kquant-gguf", KQUANT, "kquant")):
        args = tiny_args(**overrides)
        hf = random_hf_model(args)
        folder = tmp_path_factory.mktemp(name)
        if kind == "pth":
            path = save_consolidated(hf, args, folder, fmt="pth")
        elif kind == "gguf":
            path = gguf_checkpoint(folder, args, hf)
        elif kind == "kquant":  # a Q4_K_M-like mix: K-quants split on whole 256-value super-blocks
            path = gguf_checkpoint(folder, args, hf, {"Q6_K": "attn_v", "Q5_K": "ffn_down", "Q4_K": "."})
        else:
            path = save_hf(hf, folder)
        out[name] = (path, "int8" if kind == "int8" else None, args)
    return out


CONFIGS = ["gqa4-window-hf", "kv1-tied-pth", "mha-gguf", "gqa4-int8"]


@pytest.mark.parametrize("name", CONFIGS + ["kquant-gguf"])
def test_each_rank_holds_its_part_and_its_share_of_the_bytes(checkpoints, name):
    path, quantize, args = checkpoints[name]
    world = 2
    full = load_shard(path, None, quantize)
    whole = dense_weights(full)
    whole_bytes = sharded_bytes(full)
    for rank in range(world):
        part = load_shard(path, Shard(rank, world), quantize)
        assert part.args == shard_args(full.args, world)
        ranges = shard_ranges(args, Shard(rank, world))
        got = dense_weights(part)
        assert got.keys() == whole.keys()
        for tensor, value in got.items():
            axis, start, stop = ranges.get(tensor, (0, 0, whole[tensor].shape[0]))
            assert torch.equal(value, whole[tensor].narrow(axis, start, stop - start)), f"rank {rank}: {tensor}"
        for weight, nbytes in sharded_bytes(part).items():
            want = whole_bytes[weight] / world
            if weight.endswith("wqkv") and args.n_kv_heads < world:  # each rank keeps a whole KV head
                q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
                want = whole_bytes[weight] * (q / world + 2 * kv) / (q + 2 * kv)
            assert nbytes == want, f"rank {rank}: {weight} holds {nbytes} bytes, want {want}"


def test_a_rank_reads_only_its_part_of_each_tensor(checkpoints, monkeypatch):
    """Every byte read from the safetensors file is a byte the rank keeps (float32 stored, float32 held): its parts
    of the sharded tensors are read alone, rows in one read, columns row by row."""
    from mistral_ext import checkpoint

    path, _, args = checkpoints["gqa4-window-hf"]
    read = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readinto(self, buf):
            n = self.f.readinto(buf)
            read.append(n)
            return n

        def __getattr__(self, name):
            return getattr(self.f, name)

    preadv = os.preadv
    monkeypatch.setattr(checkpoint, "open", lambda *a: Counting(open(*a)), raising=False)
    monkeypatch.setattr(checkpoint.os, "preadv", lambda *a: read.append(preadv(*a)) or read[-1])
    for rank in range(2):
        read.clear()
        part = load_shard(path, Shard(rank, 2))
        held = sum(t.numel() * t.element_size() for t in part.parameters())
        assert sum(read) == held, f"rank {rank} read {sum(read)} bytes for the {held} it holds"


def refusing(args) -> list[tuple[str, StoredTensor]]:
    """A checkpoint's tensors whose reads fail the test: a check that comes after a read is too late."""
    def boom():
        raise AssertionError("a tensor was read before the split was checked")

    with torch.device("meta"):
        from mistral_ext.model import Transformer

        slots = parameter_slots(Transformer(args))
    return [(name, StoredTensor(name, tuple(slot.shape), boom, dtype=torch.float32)) for name, slot in slots.items()]


@pytest.mark.parametrize("overrides, world, words", [
    (dict(n_heads=6, n_kv_heads=3), 2, ["n_kv_heads 3 is not divisible by 2"]),
    (dict(n_heads=6, n_kv_heads=3, hidden_dim=90), 4, ["n_heads 6 is not divisible by 4",
                                                       "4 ranks are not a multiple of n_kv_heads 3",
                                                       "hidden_dim 90 is not divisible by 4"]),
    (dict(n_heads=4, n_kv_heads=4, hidden_dim=97), 2, ["hidden_dim 97 is not divisible by 2"]),
], ids=["kv-heads", "three-at-once", "hidden"])
def test_a_bad_split_is_refused_by_name_before_any_read(overrides, world, words):
    args = tiny_args(**overrides)
    options = dataclasses.replace(weight_options("cpu", None, None), shard=Shard(0, world))
    with pytest.raises(CheckpointError) as e:
        build_transformer(args, refusing(args), options, "ckpt", interleaved_rope=False)
    for w in words:
        assert w in str(e.value)
    assert f"over {world} ranks" in str(e.value)


def test_quantized_columns_must_split_on_whole_blocks(tmp_path):
    args = tiny_args(n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=128)  # a rank's 16 columns of wo: half a block
    path = gguf_checkpoint(tmp_path, args, random_hf_model(args))
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_output\.weight' cannot be split over 2 ranks: a "
                                              r"rank's 16 columns are not whole quantized blocks of 32"):
        load_shard(path, Shard(1, 2))


def test_partial_sums_are_added_in_fp32_whatever_the_dtype(monkeypatch):
    """All-reduced as the bf16 activations are, each rank's rounding would add up; in fp32 only the sum rounds."""
    from mistral_ext import parallel

    seen = []
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda t: seen.append(t.dtype) or t.mul_(3))  # 3 ranks alike
    group = object.__new__(ShardGroup)
    x = torch.randn(4, 64).bfloat16()
    y = group.all_reduce(x)
    assert seen == [torch.float32] and y.dtype == torch.bfloat16
    assert torch.equal(y, (x.float() * 3).bfloat16())


def test_tensor_parallel_needs_a_process_group(checkpoints):
    path, _, _ = checkpoints["gqa4-window-hf"]
    with pytest.raises(ValueError, match="tensor_parallel=True needs an initialised torch.distributed process group"):
        mistral_ext.load(path, device="cpu", tensor_parallel=True)


def test_what_runs_in_one_process_refuses_a_shard(checkpoints, monkeypatch, capsys):
    """Serving and compile() are not tensor-parallel: a clear error, not ranks that wait on each other forever."""
    from types import SimpleNamespace

    from mistral_ext import cli
    from mistral_ext.batching import Engine

    path, _, _ = checkpoints["gqa4-window-hf"]
    shard = mistral_ext.Model(load_shard(path, Shard(0, 1)), group=SimpleNamespace(rank=0, world_size=1))
    with pytest.raises(ValueError, match="Engine serves a model held by one process"):
        Engine(shard)
    with pytest.raises(ValueError, match="compile.. does not support a tensor-parallel model"):
        shard.compile()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["serve", "--device", "cpu"]) == 2
    assert "serve runs in one process: under torchrun (WORLD_SIZE 2) only generate and chat" in capsys.readouterr().err


# ---------------- two processes ----------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int = 2, timeout: float = 300, env: dict | None = None) -> list:
    """Starts `world` ranks of `python argv...` with torchrun's environment, one thread each; waits for all of them
    (killing all at the timeout, which fails the test)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                                   **(env or {})})
             for r in range(world)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outputs)]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks did not finish within {timeout} s")


def read(path: str) -> dict[str, torch.Tensor]:
    from mistral_ext.checkpoint import read_safetensors

    return {t.name: t.read() for t in read_safetensors(Path(path))}


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory):
    """Every config's job run once by two ranks: config -> (job, each rank's output)."""
    out_dir = tmp_path_factory.mktemp("tp")
    jobs = {}
    for name in CONFIGS:
        path, quantize, args = checkpoints[name]
        lengths = [13, 5] if args.sliding_window else [9, 3]  # 13 > W = 8: chunked prefill, then the ring wraps
        jobs[name] = {"kind": "logits", "path": str(path), "quantize": quantize, "out": str(out_dir / name),
                      "prompts": [torch.randint(0, args.vocab_size, (n,)).tolist() for n in lengths],
                      "decode": torch.randint(0, args.vocab_size, (10, 2)).tolist()}
    path, _, args = checkpoints["gqa4-window-hf"]
    jobs["sample"] = {"kind": "sample", "path": str(path), "out": str(out_dir / "sample"), "max_tokens": 12,
                      "prompts": [torch.randint(0, args.vocab_size, (n,)).tolist() for n in (6, 2)]}
    spec = out_dir / "jobs.json"
    spec.write_text(json.dumps(list(jobs.values())))
    results = launch([str(WORKER), str(spec)])
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return {name: (job, [read(f"{job['out']}.rank{r}.safetensors") for r in range(2)]) for name, job in jobs.items()}


def logits_of(model, job: dict) -> dict[str, torch.Tensor]:
    """What tp_worker.py computes for a "logits" job, in this process."""
    cache = model.new_cache(len(job["prompts"]))
    out = {"prefill": model.prefill(job["prompts"], cache)}
    for i, row in enumerate(job["decode"]):
        out[f"decode{i}"] = model.decode(torch.tensor(row), cache)
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_two_ranks_give_the_logits_of_one_process(checkpoints, two_ranks, name):
    path, quantize, _ = checkpoints[name]
    job, ranks = two_ranks[name]
    model = mistral_ext.load(path, device="cpu", quantize=quantize)
    want = logits_of(model, job)
    atol, rtol = ATOL, RTOL
    if any(isinstance(m, QuantizedWeight) for m in model.transformer.modules()):
        # The int8 rounding of activations turns the shards' 1e-6 differences into whole int8 steps wherever a
        # value sits at a rounding boundary: held to twice the error that rounding makes (against the same
        # weights with float activations), the bound the quantized model tests use.
        floats = mistral_ext.load(path, device="cpu", quantize=quantize)
        floats.transformer.use_kernels(reference)
        rounding = max((want[k] - v).abs().max().item() for k, v in logits_of(floats, job).items())
        atol, rtol = 2 * rounding, 0
    for rank, got in enumerate(ranks):
        assert got.keys() == want.keys()
        for step, logits in want.items():
            torch.testing.assert_close(got[step], logits, atol=atol, rtol=rtol, msg=lambda m: f"rank {rank} {step}: {m}")


def test_every_rank_decodes_the_tokens_rank_0_sampled(two_ranks):
    """No seed: each rank's generator starts from its own random seed, so the ranks agree only through the
    broadcast; 12 tokens sampled at temperature 1 from 97 would otherwise agree by chance about never."""
    _, (rank0, rank1) = two_ranks["sample"]
    assert rank0.keys() == rank1.keys() == {"tokens0", "tokens1"}
    for b in range(2):
        assert len(rank0[f"tokens{b}"]) > 0
        assert torch.equal(rank0[f"tokens{b}"], rank1[f"tokens{b}"])


def test_a_rank_that_dies_makes_the_other_fail_not_hang(checkpoints, tmp_path):
    path, _, args = checkpoints["gqa4-window-hf"]
    job = {"kind": "die", "path": str(path), "out": str(tmp_path / "die"), "prompts": [[1, 2, 3]],
           "decode": [[4]]}
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps([job]))
    (code0, _, err0), (code1, _, _) = launch([str(WORKER), str(spec)], timeout=120, env={"TP_TIMEOUT": "30"})
    assert code1 == 3
    assert code0 != 0 and err0.strip(), "the surviving rank should fail, saying why"  # gloo: connection closed


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """An HF folder that reads and writes text (the Mistral v1 tokenizer), GQA 4 with a window of 8."""
    import shutil

    from assets import mistral_v1_tokenizer

    folder = save_hf(random_hf_model(tiny_args(vocab_size=32000, **GQA4_WINDOW), std=0.3),
                     tmp_path_factory.mktemp("text"))
    shutil.copy(mistral_v1_tokenizer(), folder / "tokenizer.model")
    return folder


def one_process_and_torchrun(argv: list[str], stdin: str | None = None):
    """`python -m mistral_ext argv` in one process and under `torchrun --nproc-per-node 2`."""
    single = subprocess.run([sys.executable, "-m", "mistral_ext", *argv], input=stdin, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "mistral_ext", *argv, "--tp-timeout", "60"],
        input=stdin, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    return single, torchrun


def test_torchrun_generate_prints_the_text_of_one_process(text_model):
    single, torchrun = one_process_and_torchrun(["generate", "--model", str(text_model), "--device", "cpu", "--raw",
                                                 "--max-tokens", "12", "Hello there"])
    assert single.stdout.strip()
    assert torchrun.stdout == single.stdout  # rank 0's text once: the other rank writes nothing
    assert torchrun.stderr.count("finish:") == 1


def test_torchrun_chat_reads_each_line_on_rank_0_for_every_rank(text_model):
    """Two turns (the second continues the first's cache on every rank), then the empty line that ends it: had a
    rank read stdin itself, or missed a line, the turns' text or the ranks' steps would part."""
    single, torchrun = one_process_and_torchrun(["chat", "--model", str(text_model), "--device", "cpu",
                                                 "--max-tokens", "8"], stdin="Hello there\nAnd then?\n\n")
    assert single.stdout.count("> ") == 3
    assert torchrun.stdout == single.stdout
    assert torchrun.stderr.count("finish:") == 2
