"""Loading: sharded files, every kind of broken checkpoint gives a clear error, nothing pickled runs, and what it
allocates stays near the model size."""

import json
import os

import pytest
import torch

import mistral_ext
from conftest import allocation_peak
from mistral_ext.checkpoint import CheckpointError, read_safetensors, write_safetensors
from tiny import random_hf_model, save_consolidated, save_hf, tiny_args


@pytest.fixture
def hf_folder(tmp_path):
    args = tiny_args()
    return args, save_hf(random_hf_model(args), tmp_path / "hf")


def test_safetensors_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7, dtype=torch.float64).bfloat16(), "c": torch.randn(0, 4)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = {t.name: t.read() for t in read_safetensors(tmp_path / "x.safetensors")}
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
    tensors = {t.name: t.read() for t in read_safetensors(f)}
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


def test_loading_allocates_the_model_and_two_read_buffers_at_most(tmp_path):
    """What loading a sharded checkpoint allocates, counted by torch's CPU allocator: never a second copy of the
    weights. Live bytes while loading: the parameters (P, allocated once, up front) and the tensor being copied: its
    read buffer (at most the largest tensor, L, freed once copied) and, where rows are permuted (interleaved Q/K)
    or the dtype converted, one more copy of it (at most L again). Hence peak <= P + 2 L (this load, at the file's
    dtype, needs P + 1.00 L); a loader that holds every tensor before copying peaks at 2 P."""
    from torch.profiler import ProfilerActivity, profile

    args = tiny_args(dim=256, n_layers=8, head_dim=32, n_heads=8, n_kv_heads=2, hidden_dim=768, vocab_size=2048)
    folder = tmp_path / "sharded"
    random_hf_model(args).save_pretrained(folder, safe_serialization=True, max_shard_size="4MB")
    largest = max(t.read().nbytes for f in folder.glob("*.safetensors") for t in read_safetensors(f))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = mistral_ext.load(folder, device="cpu", dtype=torch.float32)
    params = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                  for p in model.transformer.parameters()}.values())
    peak = allocation_peak(prof)
    print(f"peak allocated {peak} B: parameters {params} B + {(peak - params) / largest:.2f} x the largest tensor")
    # Several files, and parameters far above 2 L: 2 P then exceeds the bound by more than P / 2.
    assert len(list(folder.glob("*.safetensors"))) > 2 and params > 4 * largest
    assert peak >= params, f"the profiler saw {peak} B allocated, less than the {params} B of parameters"
    assert peak <= params + 2 * largest, f"peak {peak} B > parameters {params} B + 2 x largest tensor {largest} B"


def dense_matrices(model) -> list[torch.Tensor]:
    return [p for p in model.transformer.parameters() if p.dim() == 2]


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
def test_dense_matrices_keep_the_stored_dtype_on_the_cpu(tmp_path, stored):
    """By default on the CPU a dense checkpoint's matrices stay in the file's dtype (a bf16 Mistral 7B takes 14.5 GB
    there, 29 GB in fp32), under float32 activations and norms, and the model's storage is the file's size. The
    logits are HF's float32 model's on the same weights: dense_linear widens the stored values exactly and
    accumulates in fp32, so the two differ in summation order alone, the tolerance of the fp32 path. An explicit
    dtype holds every weight in it."""
    import copy

    args = tiny_args()
    hf = random_hf_model(args)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(stored))  # the stored values, in float32 (the rotary buffers stay float32)
    folder = save_hf(copy.deepcopy(hf).to(stored), tmp_path / "hf")
    model = mistral_ext.load(folder, device="cpu")
    assert model.dtype == torch.float32 and model.transformer.norm.dtype == torch.float32
    assert all(m.dtype == stored for m in dense_matrices(model))
    storage = sum(p.numel() * p.element_size() for p in dense_matrices(model))
    file_bytes = sum(t.read().nbytes for t in read_safetensors(one_file(folder)) if len(t.shape) == 2)
    assert storage == file_bytes
    tokens = torch.randint(0, args.vocab_size, (2, 21))
    with torch.no_grad():
        theirs = hf(tokens).logits
    ours = model.forward(tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    dense = mistral_ext.load(folder, device="cpu", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in dense.transformer.parameters())
    torch.testing.assert_close(dense.forward(tokens), ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


def test_quantize_keeps_the_matrices_it_cannot_quantize_as_stored(tmp_path):
    """quantize="int8" on a bf16 checkpoint whose dim (40) is no multiple of 32: the matrices with K = 40 stay dense
    in bf16 (not inflated to fp32), the w2 with K = hidden = 64 is quantized."""
    from mistral_ext.quant import QuantizedWeight

    args = tiny_args(dim=40, n_heads=2, n_kv_heads=1, head_dim=20, hidden_dim=64)
    folder = save_hf(random_hf_model(args).to(torch.bfloat16), tmp_path / "hf")
    with pytest.warns(UserWarning, match="stay dense"):
        model = mistral_ext.load(folder, device="cpu", quantize="int8")
    layer = model.transformer.layers[0]
    assert isinstance(layer.feed_forward.w2, QuantizedWeight)
    assert layer.attention.wqkv.dtype == layer.feed_forward.w13.dtype == torch.bfloat16
