"""Loading: sharded files, every kind of broken checkpoint gives a clear error, nothing pickled runs, and peak
memory stays near the model size."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mistral_ext
from mistral_ext.checkpoint import CheckpointError, read_safetensors, write_safetensors
from tiny import random_hf_model, save_consolidated, save_hf, tiny_args


@pytest.fixture
def hf_folder(tmp_path):
    args = tiny_args()
    return args, save_hf(random_hf_model(args), tmp_path / "hf")


def test_safetensors_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7, dtype=torch.float64).bfloat16(), "c": torch.randn(0, 4)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = {name: t.clone() for name, t in read_safetensors(tmp_path / "x.safetensors")}
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_sharded_hf_checkpoint_loads(tmp_path):
    args = tiny_args()
    hf = random_hf_model(args)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(mistral_ext.load(tmp_path, device="cpu").forward(tokens), theirs, rtol=1e-4, atol=1e-4)


def one_file(folder):
    (f,) = folder.glob("*.safetensors")
    return f


def test_truncated_safetensors(hf_folder):
    _, folder = hf_folder
    f = one_file(folder)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mistral_ext.load(folder, device="cpu")


def test_corrupt_safetensors_header(hf_folder):
    _, folder = hf_folder
    f = one_file(folder)
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        mistral_ext.load(folder, device="cpu")
    f.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        mistral_ext.load(folder, device="cpu")


def test_config_that_does_not_match_the_tensors(hf_folder):
    _, folder = hf_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.\d.mlp.(gate|up|down)_proj.weight' has shape "
                                              r"\((96, 64|64, 96)\) but the config expects \((128, 64|64, 128)\)"):
        mistral_ext.load(folder, device="cpu")


def test_missing_and_extra_tensors(hf_folder, tmp_path):
    args, folder = hf_folder
    f = one_file(folder)
    tensors = {name: t.clone() for name, t in read_safetensors(f)}
    extra = dict(tensors, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    write_safetensors(f, extra)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
        mistral_ext.load(folder, device="cpu")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    write_safetensors(f, tensors)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): layers.1.feed_forward.w2.weight \(64, 96\)"):
        mistral_ext.load(folder, device="cpu")


@pytest.mark.parametrize("change,words", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"model_type": "qwen2"}, "model_type 'qwen2'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple of n_kv_heads"),
])
def test_unsupported_config_is_refused_by_name(hf_folder, change, words):
    _, folder = hf_folder
    cfg = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=words):
        mistral_ext.load(folder, device="cpu")


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        mistral_ext.load(tmp_path / "nope", device="cpu")
    with pytest.raises(CheckpointError, match="neither config.json"):
        mistral_ext.load(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        mistral_ext.load(tmp_path / "model.gguf", device="cpu")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EXPLOIT_MARK', '/tmp/mistral_ext_exploit')}",))


def test_pickled_code_never_runs(tmp_path, monkeypatch):
    args = tiny_args()
    folder = save_consolidated(random_hf_model(args), args, tmp_path / "c", fmt="pth")
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARK", str(mark))
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["evil"] = Exploit()
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        mistral_ext.load(folder, device="cpu")
    assert not mark.exists()


def test_loading_peak_memory_stays_near_model_size(tmp_path):
    """A ~1 GB float32 checkpoint raises peak RSS by at most 1.3x its size (measured in a fresh process)."""
    args = tiny_args(dim=1024, n_layers=16, head_dim=64, n_heads=16, n_kv_heads=4, hidden_dim=4096, vocab_size=32000)
    folder = tmp_path / "big"
    folder.mkdir()
    weights = {"model.embed_tokens.weight": torch.randn(32000, 1024), "model.norm.weight": torch.ones(1024),
               "lm_head.weight": torch.randn(32000, 1024)}
    shards = [weights]
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": torch.randn(1024, 1024),
                       p + "self_attn.k_proj.weight": torch.randn(256, 1024),
                       p + "self_attn.v_proj.weight": torch.randn(256, 1024),
                       p + "self_attn.o_proj.weight": torch.randn(1024, 1024),
                       p + "mlp.gate_proj.weight": torch.randn(4096, 1024),
                       p + "mlp.up_proj.weight": torch.randn(4096, 1024),
                       p + "mlp.down_proj.weight": torch.randn(1024, 4096),
                       p + "input_layernorm.weight": torch.ones(1024), p + "post_attention_layernorm.weight": torch.ones(1024)})
    for n, shard in enumerate(shards):
        write_safetensors(folder / f"model-{n:05d}.safetensors", shard)
    del shards, weights
    from tiny import hf_config

    hf_config(args).save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size > 0.9e9
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would include this pytest process.
    script = textwrap.dedent(f"""
        import mistral_ext, torch
        def status_kb(field):
            return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
        before = status_kb("VmRSS")
        model = mistral_ext.load({str(folder)!r}, device="cpu", dtype=torch.float32)
        print(before, status_kb("VmHWM"))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600)
    before_kb, peak_kb = map(int, out.stdout.split())
    print(f"peak RSS rise {(peak_kb - before_kb) * 1024 / 1e9:.3f} GB loading {size / 1e9:.3f} GB")
    assert (peak_kb - before_kb) * 1024 <= 1.3 * size, f"peak rise {(peak_kb - before_kb) / 1e6:.2f} GB for {size / 1e9:.2f} GB"
