"""generate / generate_tokens on a tiny random model with the real Mistral v1 tokenizer, and the tokenizer."""

import shutil

import pytest
import torch

import mistral_ext
from assets import mistral_v1_tokenizer
from mistral_ext.tokenizer import StreamDecoder, Tokenizer
from tiny import random_hf_model, save_hf, tiny_args

TEXTS = ["Hello world", "  leading spaces and\nnew lines", "naïve café — 東京 🚀🎉 ok", "[INST] What? [/INST]"]


@pytest.fixture(scope="module")
def tokenizer_path():
    return mistral_v1_tokenizer()


def make_model(tmp_path_factory, tokenizer_path, **overrides):
    args = tiny_args(vocab_size=32000, **overrides)
    folder = save_hf(random_hf_model(args, std=0.3), tmp_path_factory.mktemp("tiny"))
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return mistral_ext.load(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_path):
    return make_model(tmp_path_factory, tokenizer_path)


def test_tokenizer_is_mistral_v1(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (32000, 1, [2])
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1 and tok.encode(text, bos=False) == ids[1:]
        assert tok.decode(ids) == text


def test_stream_decoder_never_splits_a_character(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    for text in TEXTS:
        decoder = StreamDecoder(tok)
        pieces = [decoder.push(i) for i in tok.encode(text, bos=False)] + [decoder.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_str_and_list_prompts(model):
    one = mistral_ext.generate(model, "Hello", max_tokens=8)
    many = mistral_ext.generate(model, ["Hello", "A longer prompt than the other"], max_tokens=8)
    assert isinstance(one, str) and isinstance(many, list) and len(many) == 2
    assert many[0] == one  # the same alone or in a batch (greedy)
    assert mistral_ext.generate(model, "Hello", max_tokens=0) == ""


def test_stream_pieces_make_the_text(model):
    pieces = {0: [], 1: []}
    out = mistral_ext.generate(model, ["Hi", "Bonjour"], max_tokens=20, stream=lambda i, p: pieces[i].append(p))
    assert ["".join(pieces[0]), "".join(pieces[1])] == out
    assert all(p for ps in pieces.values() for p in ps)


def test_stop_string_ends_and_is_not_included(model):
    full = mistral_ext.generate(model, "Hello", max_tokens=30, details=True)
    assert full.finish_reason in ("length", "eos") and len(full.text) > 6
    stop = full.text[3:6]
    streamed = []
    cut = mistral_ext.generate(model, "Hello", max_tokens=30, stop=[stop, "never appears ~~~"], details=True,
                               stream=lambda i, p: streamed.append(p))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert "".join(streamed) == cut.text


def test_sampling_is_reproducible_with_a_seed(model):
    kw = dict(max_tokens=15, temperature=1.0, top_p=0.9, top_k=50)
    a = mistral_ext.generate(model, "Once", seed=7, **kw)
    assert a == mistral_ext.generate(model, "Once", seed=7, **kw)
    assert mistral_ext.generate(model, ["x", "Once"], seed=7, **kw)[1] == a
    others = {mistral_ext.generate(model, "Once", seed=s, **kw) for s in range(8, 12)}
    assert len(others | {a}) > 1


def test_greedy_is_deterministic_and_matches_generate_tokens(model):
    ids = model.tokenizer.encode("The")
    a = mistral_ext.generate_tokens(model, [ids], max_tokens=12)
    assert a == mistral_ext.generate_tokens(model, [ids], max_tokens=12)
    text = mistral_ext.generate(model, "The", max_tokens=12, details=True)
    assert text.tokens == a[0]


def test_windowed_model_generates_past_its_window(model, monkeypatch):
    monkeypatch.setattr(model.tokenizer, "eos_ids", [])  # a random model may emit EOS at any point
    c = mistral_ext.generate(model, "Go", max_tokens=5 * 16, details=True)
    assert c.finish_reason == "length" and len(c.tokens) == 80


def test_model_without_window_ends_at_the_context(tmp_path_factory, tokenizer_path):
    model = make_model(tmp_path_factory, tokenizer_path, sliding_window=None, max_seq_len=24)
    model.tokenizer.eos_ids = []
    prompt = model.tokenizer.encode("Tell me")
    c = mistral_ext.generate(model, "Tell me", max_tokens=100, details=True)
    assert c.finish_reason == "context"
    assert len(prompt) + len(c.tokens) == 24 + 1  # the last token is sampled from the full context
    with pytest.raises(ValueError, match="context length 24"):
        model.prefill([list(range(3, 30))], model.new_cache(1))


@pytest.mark.parametrize("call,error,words", [
    (lambda m: mistral_ext.generate(m, [], max_tokens=3), ValueError, "non-empty list"),
    (lambda m: mistral_ext.generate(m, "x", max_tokens=-1), ValueError, "max_tokens"),
    (lambda m: mistral_ext.generate(m, "x", top_p=0.0), ValueError, "top_p"),
    (lambda m: mistral_ext.generate(m, "x", top_p=1.5), ValueError, "top_p"),
    (lambda m: mistral_ext.generate(m, "x", temperature=-1), ValueError, "temperature"),
    (lambda m: mistral_ext.generate(m, "x", top_k=0), ValueError, "top_k"),
    (lambda m: mistral_ext.generate(m, "x", stop=[""]), ValueError, "stop"),
    (lambda m: mistral_ext.generate_tokens(m, [], max_tokens=3), ValueError, "non-empty list"),
    (lambda m: mistral_ext.generate_tokens(m, [[1, -5]], max_tokens=3), ValueError, "token id -5"),
    (lambda m: mistral_ext.generate_tokens(m, [[1, 32000]], max_tokens=3), ValueError, "token id 32000"),
    (lambda m: mistral_ext.generate_tokens(m, [[]], max_tokens=3), ValueError, "prompt 0 is empty"),
    (lambda m: m.decode(torch.tensor([40000]), m.new_cache(1)), ValueError, "token id 40000"),
    (lambda m: m.decode(torch.tensor([1, 2]), m.new_cache(1)), ValueError, "shape [1]"),
    (lambda m: m.forward(torch.zeros(2, 0, dtype=torch.long)), ValueError, "S >= 1"),
])
def test_bad_inputs(model, call, error, words):
    with pytest.raises(error) as info:
        call(model)
    assert words in str(info.value)
