"""Quantized weights in the model and the loaders: GGUF blocks repacked to the bit, K-quants converted within their
format's bound, the tensor storage no larger than the file's, the file's mapping closed, HF checkpoints quantized
at load, the kernels against the reference ops on the same quantized model, and bad input refused by name."""

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("gguf")
import mistral_ext
from conftest import KERNEL_BACKENDS, allocation_peak
from gguf_files import error_bound, file_tensor_bytes, gguf_tensors, tensor_storage, weights_of, write_gguf
from int8_activations import INT8_ACTIVATIONS
from mistral_ext import ops, reference
from mistral_ext.checkpoint import CheckpointError, parameter_slots
from mistral_ext.quant import QuantizedWeight
from tiny import random_hf_model, save_consolidated, save_hf, tiny_args

REPACKED = ["Q8_0", "Q4_0", "Q4_1"]
CONVERTED = {"Q4_K": "q4_1", "Q5_K": "q8_0", "Q6_K": "q8_0"}


def load_both(path):
    """The default CPU load (quantized) and the weights of the dense fp32 load of one file: the file's floats."""
    dense = mistral_ext.load(path, device="cpu", dtype=torch.float32)
    assert not any(isinstance(m, QuantizedWeight) for m in dense.transformer.modules()), "dtype= must load dense"
    return mistral_ext.load(path, device="cpu"), weights_of(dense)


@pytest.mark.parametrize("qtype", REPACKED)
def test_repacked_blocks_dequantize_to_the_dense_loaders_floats_bit_for_bit(tiny, qtype, tmp_path):
    """The dense loader dequantizes with the gguf package; the repacked blocks, dequantized by mistral_ext.quant,
    give the very same floats: the repack is lossless (and its nibble order is GGUF's)."""
    args, _, tensors = tiny
    model, dense = load_both(write_gguf(tmp_path / f"m.{qtype}.gguf", args, tensors, qtype))
    assert isinstance(model.transformer.layers[0].attention.wqkv, QuantizedWeight)  # fused: one format
    for name, slot in parameter_slots(model.transformer).items():
        if dense[name].dim() == 1:
            assert torch.equal(slot, dense[name]), name
        else:
            assert isinstance(slot, QuantizedWeight) and slot.format == qtype.lower(), name
            assert torch.equal(slot.dequantize(), dense[name]), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qtype", REPACKED)
def test_tensor_storage_is_the_files_tensor_bytes_and_the_file_is_closed(qtype, tied, tmp_path):
    """Our blocks hold the bytes of GGUF's (q8_0 34, q4_0 18, q4_1 20 per 32 weights) and norms stay float32 as the
    file has them, so the storage is the file's tensor bytes; 1.05x leaves room for nothing else (a dense float32
    copy of the embedding alone adds 60% here). Once loaded, no mapping of the file is left."""
    args = tiny_args(vocab_size=96, tie_embeddings=tied)
    path = write_gguf(tmp_path / f"m.{qtype}.gguf", args, gguf_tensors(random_hf_model(args), args), qtype)
    model = mistral_ext.load(path, device="cpu")
    gc.collect()
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path.resolve()) not in maps.read_text(), "the GGUF file is still mapped"
    storage, file_bytes = tensor_storage(model), file_tensor_bytes(path)
    print(f"{qtype} {'tied' if tied else 'untied'}: tensor storage {storage} B, file tensors {file_bytes} B")
    assert storage <= 1.05 * file_bytes
    assert isinstance(model.transformer.tok_embeddings, QuantizedWeight)
    assert (model.transformer.output is None) == tied


@pytest.mark.parametrize("qtype", CONVERTED)
def test_kquants_convert_to_the_nearest_format_within_its_bound(tiny256, qtype, tmp_path):
    """Q4_K -> q4_1, Q5_K/Q6_K -> q8_0, requantized from the file's own floats (the dense loader's): every weight
    within the target format's rounding bound of them (half a step plus the fp16 rounding of scale and minimum).
    The figures printed are the extra error the README states."""
    args, _, tensors = tiny256
    model, dense = load_both(write_gguf(tmp_path / f"m.{qtype}.gguf", args, tensors, qtype))
    converted = weights_of(model)
    worst = rms = 0.0
    for name, slot in parameter_slots(model.transformer).items():
        if dense[name].dim() == 1:
            continue
        assert isinstance(slot, QuantizedWeight) and slot.format == CONVERTED[qtype], name
        err = (converted[name].double() - dense[name].double()).abs()
        excess = (err - error_bound(dense[name], slot.format.upper())).max().item()
        assert excess <= 1e-12, f"{name}: conversion error exceeds the {slot.format} bound by {excess:.3g}"
        worst = max(worst, (err.max() / dense[name].abs().max()).item())
        rms = max(rms, (err.pow(2).mean().sqrt() / dense[name].double().pow(2).mean().sqrt()).item())
    print(f"{qtype} -> {CONVERTED[qtype]}: extra error at most {worst:.4f} of a matrix's max |w|, "
          f"RMS at most {rms:.4f} of its RMS")


def test_fused_parts_in_different_formats(tiny256, tmp_path):
    """wq/wk in Q4_K and wv in Q6_K (as Q4_K_M files mix them): wqkv stays three matrices, each in its own format.
    A part the file stores dense makes its fused weight dense: the quantized parts then take the file's floats."""
    args, _, tensors = tiny256
    types = {f"blk.{i}.attn_v.weight": "Q6_K" for i in range(args.n_layers)} | {"blk.0.ffn_up.weight": "F16"}
    model, dense = load_both(write_gguf(tmp_path / "mixed.gguf", args, tensors, "Q4_K", types=types))
    wqkv = model.transformer.layers[0].attention.wqkv
    assert isinstance(wqkv, nn.ModuleList) and [w.format for w in wqkv] == ["q4_1", "q4_1", "q8_0"]
    assert isinstance(model.transformer.layers[1].feed_forward.w13, QuantizedWeight)
    w13 = model.transformer.layers[0].feed_forward.w13
    assert isinstance(w13, nn.Parameter) and w13.dtype == torch.float32
    ours = weights_of(model)
    for name in ("layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight"):
        assert torch.equal(ours[name], dense[name]), name


def test_fused_parts_that_split_a_row_group_stay_parts(tmp_path):
    """wk and wv of 12 rows each: wqkv's parts would split the layout's groups of 8 rows, so it is held as its three
    parts (same format, no extra bytes), and the model matches its dequantized fp32 twin."""
    args = tiny_args(n_heads=8, n_kv_heads=1, head_dim=12, vocab_size=96)
    hf = random_hf_model(args)
    model, dense = load_both(write_gguf(tmp_path / "odd.gguf", args, gguf_tensors(hf, args), "Q8_0"))
    wqkv = model.transformer.layers[0].attention.wqkv
    assert isinstance(wqkv, nn.ModuleList) and [w.shape[0] for w in wqkv] == [96, 12, 12]
    assert isinstance(model.transformer.layers[0].feed_forward.w13, QuantizedWeight)  # 96 + 96 rows: fused
    ours = weights_of(model)
    for name in ("layers.0.attention.wk.weight", "layers.0.attention.wv.weight"):
        assert torch.equal(ours[name], dense[name]), name


# ---- the kernels and the formats on whole models ----


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Weights of std 0.05: at tiny.py's 0.15 the random network amplifies any perturbation (int4 alone moves the
    logits by 50-90% of their scale), which would say nothing about the formats."""
    args = tiny_args(n_heads=8, n_kv_heads=2, head_dim=16, dim=128, tie_embeddings=True)
    hf = random_hf_model(args, std=0.05)
    return args, hf, save_hf(hf, tmp_path_factory.mktemp("hf"))


def spec_logits(model, tokens):
    """reference.forward in float64 on the model's weights as held (quantized ones dequantized)."""
    weights = {name: w.double() for name, w in weights_of(model).items()}
    return reference.forward(weights, model.args, tokens)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def forward_on(model, kernels, tokens):
    model.transformer.use_kernels(kernels)
    try:
        return model.forward(tokens)
    finally:
        model.transformer.use_kernels(ops)


@pytest.mark.parametrize("quantize,fmt,fraction", [("int8", "q8_0", 0.05), ("int4", "q4_1", 0.6)])
def test_hf_checkpoint_quantized_at_load_against_its_fp32_logits(hf_pair, quantize, fmt, fraction):
    """Every matrix in the chosen format, norms dense. The error against HF's fp32 logits splits into the format's
    own (the quantized weights run exactly: float64 reference.forward) and the kernels' int8 rounding of activations
    (at most twice what the rounding alone makes, as test_reference_kernels_on_quantized_weights holds it): their
    sum bounds it. Per format, over 12 seeds: int8 at most 2.5% of the largest logit (the format alone 1.9%), int4
    32% (the format alone as much); `fraction` is about twice that."""
    args, hf, folder = hf_pair
    model = mistral_ext.load(folder, device="cpu", quantize=quantize)
    for name, slot in parameter_slots(model.transformer).items():
        if name.endswith("norm.weight"):
            assert isinstance(slot, torch.Tensor) and slot.dtype == torch.float32, name
        else:
            assert isinstance(slot, QuantizedWeight) and slot.format == fmt, name
    tokens = torch.randint(0, args.vocab_size, (2, 3 * 16 + 5))
    with torch.no_grad():
        theirs = hf(tokens).logits
    exact = spec_logits(model, tokens)
    ours, rounded = model.forward(tokens), forward_on(model, INT8_ACTIVATIONS, tokens)
    err, scale = max_err(ours, theirs), theirs.abs().max().item()
    print(f"{quantize}: {err / scale:.4f} of the largest logit {scale:.3g}; the format alone "
          f"{max_err(exact, theirs) / scale:.4f}, int8 rounding alone {max_err(rounded, exact) / scale:.4f}")
    assert err <= max_err(exact, theirs) + 2 * max_err(rounded, exact)
    assert err <= fraction * scale


def test_consolidated_checkpoint_quantizes_to_the_hf_checkpoints_blocks(hf_pair, tmp_path):
    """Blocks run along rows, so quantizing a consolidated checkpoint's interleaved Q/K rows and then permuting
    them gives the very blocks of the HF checkpoint, whose rows come permuted already."""
    args, hf, folder = hf_pair
    ours = mistral_ext.load(save_consolidated(hf, args, tmp_path / "c"), device="cpu", quantize="int4")
    theirs = parameter_slots(mistral_ext.load(folder, device="cpu", quantize="int4").transformer)
    for name, slot in parameter_slots(ours.transformer).items():
        if isinstance(slot, QuantizedWeight):
            assert all(torch.equal(a, b) for a, b in zip(slot.tensors(), theirs[name].tensors())), name
        else:
            assert torch.equal(slot, theirs[name]), name


@pytest.fixture(params=["int8", "int4", "gguf-mixed"])
def quantized_model(request, hf_pair, tiny256, tmp_path):
    if request.param == "gguf-mixed":  # q4_1 and q8_0 parts in wqkv (nn.ModuleList), untied
        args, _, tensors = tiny256
        types = {f"blk.{i}.attn_v.weight": "Q6_K" for i in range(args.n_layers)}
        return mistral_ext.load(write_gguf(tmp_path / "mixed.gguf", args, tensors, "Q4_K", types=types), device="cpu")
    return mistral_ext.load(hf_pair[2], device="cpu", quantize=request.param)  # tied: the head is the table


def test_reference_kernels_on_quantized_weights(quantized_model):
    """use_kernels(reference) swaps the quantized ops too: the float64 spec on the dequantized weights, within the
    float32 engine bound of tests/test_model.py (1e-4 of the largest logit); a model still rounding activations
    to int8 would be far outside it. The kernels differ from it only by that rounding: at most twice the error the
    rounding alone makes (tests/int8_activations.py)."""
    model = quantized_model
    tokens = torch.randint(0, model.args.vocab_size, (2, 3 * 16 + 5))
    exact = spec_logits(model, tokens)
    logits = {name: forward_on(model, kernels, tokens)
              for name, kernels in [("reference", reference), ("int8 activations", INT8_ACTIVATIONS), ("ops", ops)]}
    scale = max(1.0, exact.abs().max().item())
    assert max_err(logits["reference"], exact) <= 1e-4 * scale
    rounding = max_err(logits["int8 activations"], exact)
    print(f"ops {max_err(logits['ops'], exact) / scale:.4f}, int8 rounding alone {rounding / scale:.4f} of {scale:.3g}")
    assert 0 < max_err(logits["ops"], exact) <= 2 * rounding


@pytest.mark.skipif("emu" not in KERNEL_BACKENDS, reason="needs mistral_ext._emu")
def test_emulated_cuda_kernels_keep_a_quantized_models_activations_in_float(tiny256, tmp_path):
    """A model of q4_1 and q8_0 matrices (from a GGUF file: the loader holds quantized weights on the CPU only, so
    the CUDA kernels run here emulated) is within the float32 engine bound of tests/test_model.py (1e-4 of the
    largest logit) of the float64 spec on its dequantized weights: the CUDA quant_linear keeps activations in float.
    The CPU kernels, which round them to int8, are outside that bound on the same model."""
    args, _, tensors = tiny256
    types = {f"blk.{i}.attn_v.weight": "Q6_K" for i in range(args.n_layers)}
    model = mistral_ext.load(write_gguf(tmp_path / "mixed.gguf", args, tensors, "Q4_K", types=types), device="cpu")
    tokens = torch.randint(0, model.args.vocab_size, (2, 3 * 16 + 5))
    exact = spec_logits(model, tokens)
    scale = max(1.0, exact.abs().max().item())
    assert max_err(forward_on(model, torch.ops.mistral_ext_emu, tokens), exact) <= 1e-4 * scale
    assert max_err(model.forward(tokens), exact) > 1e-4 * scale


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantizing_at_load_allocates_the_quantized_model_and_one_tensors_work(tmp_path, quantize):
    """What quantize= allocates, counted by torch's CPU allocator (as tests/test_checkpoint.py does for the dense
    load): the quantized model (Q, allocated up front) and the work on the tensor being read: its read buffer (at
    most the largest tensor, L) and at most three float32 temporaries of quantize() at once (L each). Hence peak
    <= Q + 4 L; a loader that reads every tensor, or allocates the dense model, before quantizing, holds P (the dense
    size, here > Q + 5 L) at least."""
    from torch.profiler import ProfilerActivity, profile

    args = tiny_args(dim=256, n_layers=8, head_dim=32, n_heads=8, n_kv_heads=2, hidden_dim=768, vocab_size=2048)
    folder = tmp_path / "sharded"
    random_hf_model(args).save_pretrained(folder, safe_serialization=True, max_shard_size="4MB")
    tensors = [t for f in folder.glob("*.safetensors") for t in mistral_ext.checkpoint.read_safetensors(f)]
    largest, dense = max(t.read().nbytes for t in tensors), sum(t.read().nbytes for t in tensors)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = mistral_ext.load(folder, device="cpu", quantize=quantize)
    stored, peak = tensor_storage(model), allocation_peak(prof)
    print(f"{quantize}: peak allocated {peak} B: the quantized model {stored} B + {(peak - stored) / largest:.2f} x the "
          f"largest tensor; dense {dense} B")
    assert dense > stored + 5 * largest
    assert stored <= peak <= stored + 4 * largest


def test_matrices_whose_rows_are_not_whole_blocks_stay_dense(tmp_path):
    """quantize= leaves a matrix with K % 32 != 0 dense, and says so once for the whole load."""
    args = tiny_args(hidden_dim=80)  # w2 is [64, 80]
    folder = save_hf(random_hf_model(args), tmp_path / "hf")
    with pytest.warns(UserWarning) as record:
        model = mistral_ext.load(folder, device="cpu", quantize="int8")
    assert len(record) == 1
    assert "2 matrices stay dense" in str(record[0].message) and "layers.0.feed_forward.w2.weight" in str(record[0].message)
    ff = model.transformer.layers[0].feed_forward
    assert isinstance(ff.w2, nn.Parameter) and isinstance(ff.w13, QuantizedWeight)
    assert torch.isfinite(model.forward(torch.randint(0, args.vocab_size, (1, 20)))).all()


# ---- bad input ----


def test_unknown_quantize_value_lists_the_choices(hf_pair):
    with pytest.raises(ValueError, match="quantize must be one of 'int8', 'int4' or None, got 'int3'"):
        mistral_ext.load(hf_pair[2], device="cpu", quantize="int3")
    with pytest.raises(ValueError, match="quantize='int8' needs device 'cpu' or 'cuda'"):
        mistral_ext.load(hf_pair[2], device="meta", quantize="int8")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_how_each_device_holds_the_weights(device):
    """What load() decides before reading a tensor (no GPU needed): quantized tensors stay quantized on both devices
    unless a dtype is given; dense matrices keep the file's dtype on the CPU only (CUDA's cuBLAS wants the
    activations' dtype); quantize= works on both."""
    from mistral_ext.engine import weight_options

    default = weight_options(device, None, None)
    assert default.keep_quantized and default.dense_as_stored == (device == "cpu") and default.quantize is None
    assert default.dtype == (torch.float32 if device == "cpu" else torch.bfloat16)
    dense = weight_options(device, torch.float16, None)
    assert not dense.keep_quantized and not dense.dense_as_stored and dense.dtype == torch.float16
    quantized = weight_options(device, torch.float16, "int4")
    assert quantized.keep_quantized and quantized.quantize == "q4_1" and quantized.dtype == torch.float16


def test_tensor_whose_shape_needs_more_bytes_than_it_has(tiny, tmp_path):
    """blk.0.attn_q.weight's header claims twice its rows: its bytes would run into the next tensor's."""
    args, _, tensors = tiny
    path = write_gguf(tmp_path / "m.gguf", args, tensors, "Q8_0")
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)  # then: n_dims u32, dims u64...
    rows = at + 4 + 8  # GGUF lists dimensions innermost first: [K, N]
    assert int.from_bytes(data[rows : rows + 8], "little") == args.dim
    data[rows : rows + 8] = (2 * args.dim).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_q.weight' \(Q8_0, shape \(128, 64\)\) needs "
                                              r"8704 bytes, but only 4352 lie before the next tensor"):
        mistral_ext.load(path, device="cpu")


def test_gguf_truncated_inside_its_last_tensor(tiny, tmp_path):
    args, _, tensors = tiny
    path = write_gguf(tmp_path / "cut.gguf", args, tensors, "Q4_0")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"cut.gguf: not a readable GGUF file \(truncated or corrupt\)"):
        mistral_ext.load(path, device="cpu")


def test_importing_mistral_ext_does_not_import_gguf():
    code = "import sys, mistral_ext; sys.exit('gguf' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
