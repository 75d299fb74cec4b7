"""GGUF files written by the tests: every supported tensor type loads dense (dequantized by the gguf package) within
its quantization error bound of the original floats, F32 files give HF's logits, the tokenizer comes from the
metadata, and what is not supported is refused by name. The Q/K row permutation is checked against a table written
by hand and against transformers' GGUF loader. The quantized path: tests/test_quantized.py."""

import dataclasses

import pytest
import torch

pytest.importorskip("gguf")
import mistral_ext
from assets import mistral_v1_tokenizer
from gguf_files import error_bound, gguf_tensors, weights_of, write_gguf
from mistral_ext.checkpoint import CheckpointError, interleaved_to_half_split
from mistral_ext.gguf_checkpoint import gguf_to_consolidated_name
from mistral_ext.gguf_write import sentencepiece_fields
from mistral_ext.tokenizer import Tokenizer
from kquants import QUANTIZERS
from tiny import random_hf_model, tiny_args

def half_split_rows(n_heads: int, head_dim: int) -> list[int]:
    """The GGUF (interleaved RoPE) row each half-split row comes from: row i < D/2 of a head pairs with row
    i + D/2 in the kernels' rotation, and they were interleaved rows 2i and 2i + 1 of that head."""
    half = head_dim // 2
    return [h * head_dim + (2 * i if i < half else 2 * (i - half) + 1) for h in range(n_heads) for i in range(head_dim)]


def test_qk_permutation_against_a_written_table():
    table = [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]  # head_dim 8, 2 heads, by hand
    assert half_split_rows(2, 8) == table
    for heads, head_dim, rows in [(2, 8, table), (1, 2, [0, 1]), (4, 16, None), (3, 64, None)]:
        w = torch.arange(heads * head_dim * 3.0).reshape(-1, 3)  # row r holds 3r, 3r + 1, 3r + 2: it says where it was
        got = interleaved_to_half_split(w, heads)
        rows = rows or half_split_rows(heads, head_dim)
        assert torch.equal(got, w[rows]), f"{heads} heads of {head_dim}: rows {(got[:, 0] / 3).int().tolist()}"


def test_qk_permutation_is_transformers_gguf_one():
    """transformers' own GGUF loader (LlamaTensorProcessor) undoes llama.cpp's Q/K permutation the same way."""
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    processor = utils.LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, heads in [("blk.0.attn_q.weight", 4), ("blk.0.attn_k.weight", 2)]:
        w = torch.randn(heads * 16, 8)
        theirs = torch.from_numpy(processor.process(w.numpy(), name).weights)
        assert torch.equal(interleaved_to_half_split(w, heads), theirs), name


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantized_weights_within_the_types_error_bound(tiny, tiny256, qtype, tmp_path):
    args, hf, tensors = tiny256 if qtype in QUANTIZERS else tiny
    path = write_gguf(tmp_path / f"m.{qtype}.gguf", args, tensors, qtype)
    loaded = weights_of(mistral_ext.load(path, device="cpu", dtype=torch.float32))  # dense: dequantized

    checked = 0
    for gguf_name, original in tensors.items():
        name = gguf_to_consolidated_name(gguf_name)
        got = loaded[name].double()
        want = torch.from_numpy(original).double()
        kind = "F32" if original.ndim == 1 else qtype
        bound = error_bound(torch.from_numpy(original), kind)
        if name.endswith(("wq.weight", "wk.weight")):
            rows = half_split_rows(args.n_heads if name.endswith("wq.weight") else args.n_kv_heads, args.head_dim)
            want, bound = want[rows], bound[rows]
        excess = ((got - want).abs() - bound).max().item()
        assert excess <= 1e-12, f"{gguf_name} ({kind}): error exceeds its bound by {excess:.3g}"
        checked += 1
    assert checked == len(tensors)


def test_f32_gguf_gives_hf_logits(tiny, tmp_path):
    args, hf, tensors = tiny
    model = mistral_ext.load(write_gguf(tmp_path / "m.gguf", args, tensors), device="cpu", dtype=torch.float32)
    assert model.args == dataclasses.replace(args, norm_eps=model.args.norm_eps)  # GGUF stores eps as float32
    assert model.args.norm_eps == pytest.approx(args.norm_eps, rel=1e-6)
    tokens = torch.randint(0, args.vocab_size, (2, 3 * 16 + 1))
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(model.forward(tokens), theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_tied_embeddings_when_there_is_no_output_tensor(tmp_path):
    args = tiny_args(vocab_size=96, tie_embeddings=True, sliding_window=None)
    hf = random_hf_model(args)
    model = mistral_ext.load(write_gguf(tmp_path / "t.gguf", args, gguf_tensors(hf, args)), device="cpu")
    assert model.args.tie_embeddings and model.args.sliding_window is None
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model.forward(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_llama_vocabulary_tokenizes_like_sentencepiece(tmp_path):
    sp_path = mistral_v1_tokenizer()
    fields = sentencepiece_fields(sp_path)
    big = tiny_args(vocab_size=32000)
    tensors = gguf_tensors(random_hf_model(big), big)
    model = mistral_ext.load(write_gguf(tmp_path / "v.gguf", big, tensors, tokenizer=fields), device="cpu")
    original = Tokenizer(sp_path)
    assert (model.tokenizer.bos_id, model.tokenizer.eos_ids) == (1, [2])
    for text in ["Hello world", "  two spaces\nnew line", "naïve 東京 🚀", "[INST] hi [/INST]", "x" * 50]:
        assert model.tokenizer.encode(text) == original.encode(text), text
        assert model.tokenizer.decode(original.encode(text)) == text


def test_unsupported_type_is_refused_by_name(tiny, tmp_path):
    args, _, tensors = tiny
    with pytest.raises(CheckpointError, match="GGUF type Q5_0, which is not supported"):
        mistral_ext.load(write_gguf(tmp_path / "q5.gguf", args, tensors, "Q5_0"), device="cpu")


def test_corrupt_gguf_is_refused(tiny, tmp_path):
    args, _, tensors = tiny
    path = write_gguf(tmp_path / "c.gguf", args, tensors)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="c.gguf"):
        mistral_ext.load(path, device="cpu")
    path.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="c.gguf"):
        mistral_ext.load(path, device="cpu")
