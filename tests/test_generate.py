"""generate / generate_tokens on a tiny random model with the real Mistral v1 tokenizer, and the tokenizer; the
sampler's distribution against the masked softmax; streaming and stop strings on scripted token sequences."""

import math
import shutil
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch

import mistral_ext
from assets import mistral_v1_tokenizer
from mistral_ext.engine import Model
from mistral_ext.generate import Sampling
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


class ScriptedModel(Model):
    """A model whose next token is scripted, for the real generate loop: prefill and decode return logits whose
    argmax is the script's next token, and decode checks it is fed the token just sampled. steps: logits given."""

    def __init__(self, tokenizer: Tokenizer, pieces: list[str]):
        self.tokenizer, self.device, self.group = tokenizer, torch.device("cpu"), None
        ids = {tokenizer.token_text(i): i for i in range(tokenizer.vocab_size)}
        self.script = [ids[p] for p in pieces] + tokenizer.eos_ids[:1]
        self.steps = 0

    def new_cache(self, batch_size):
        assert batch_size == 1
        return SimpleNamespace(max_positions=None)

    def _next(self):
        logits = torch.zeros(1, self.tokenizer.vocab_size)
        logits[0, self.script[self.steps]] = 1.0
        self.steps += 1
        return logits

    def prefill(self, prompt_tokens, cache):
        return self._next()

    def decode(self, tokens, cache):
        assert tokens.tolist() == [self.script[self.steps - 1]]
        return self._next()


E, I = "\u20ac", "\ufffd"  # the euro sign (bytes E2 82 AC) and the replacement character
THE_CAT_SAT = ["▁the", "▁cat", "▁sat", "▁on", "▁the", "▁mat"]


# streamed: (tokens sampled when the piece came, piece), worked out by hand. The stream holds back the last
# len(longest stop) - 1 characters (they may begin a stop string) and any incomplete UTF-8 character; sentencepiece
# decodes each byte that is not part of a complete character to one U+FFFD.
@pytest.mark.parametrize("pieces,stop,streamed,text,reason", [
    (["▁a", "<0xE2>", "<0x82>", "<0xAC>", "▁cat", "▁sat"], None,
     [(1, "a"), (4, E), (5, " cat"), (6, " sat")], f"a{E} cat sat", "eos"),
    (["▁the", "<0xE2>", "<0x82>", "<0xAC>"] + THE_CAT_SAT[1:], ["at on th", "mat"],  # across sat|on|the
     [(5, "t"), (6, f"he{E} "), (7, "cat"), (8, " s")], f"the{E} cat s", "stop"),
    (THE_CAT_SAT, ["on", "at on"],  # both complete at "on": the one that starts first wins
     [(2, "the"), (3, " cat"), (4, " s")], "the cat s", "stop"),
    (["▁a", "<0xFF>", "▁cat", "<0xE2>", "<0x82>", "▁sat", "<0xE2>"], None,  # invalid bytes
     [(1, "a"), (3, f"{I} cat"), (6, f"{I}{I} sat"), (8, I)], f"a{I} cat{I}{I} sat{I}", "eos"),  # 8: at EOS
], ids=["utf8-split", "stop-over-3-tokens", "earliest-stop", "invalid-bytes"])
def test_scripted_stream(tokenizer_path, pieces, stop, streamed, text, reason):
    model = ScriptedModel(Tokenizer(tokenizer_path), pieces)
    got = []
    c = mistral_ext.generate(model, "Hi", max_tokens=50, stop=stop, details=True,
                             stream=lambda i, piece: got.append((model.steps, piece)))
    assert got == streamed
    assert (c.text, c.finish_reason) == (text, reason)
    assert c.tokens == model.script[: model.steps - (reason == "eos")]  # EOS ends the text without joining it


def test_sampling_is_reproducible_with_a_seed(model):
    kw = dict(max_tokens=15, temperature=1.0, top_p=0.9, top_k=50)
    a = mistral_ext.generate(model, "Once", seed=7, **kw)
    assert a == mistral_ext.generate(model, "Once", seed=7, **kw)
    assert mistral_ext.generate(model, ["x", "Once"], seed=7, **kw)[1] == a
    others = {mistral_ext.generate(model, "Once", seed=s, **kw) for s in range(8, 12)}
    assert len(others | {a}) > 1


DRAWS = 20_000


def chi_square_critical(df: int, tail: float = 1e-6) -> float:
    """Wilson-Hilferty: df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3. For df <= 9 and tail 1e-6 it errs on the safe
    side (the exact tail beyond it is 1.6e-7 to 6.1e-7), so a correct sampler fails a check less than once in 1e6."""
    z = NormalDist().inv_cdf(1 - tail)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def draw(sampling: Sampling, logits: torch.Tensor) -> torch.Tensor:
    """DRAWS tokens from one row of logits through Sampling.sample (one batch row per draw, one shared generator
    seeded from torch's RNG, so the test's seed replays them); returns the count of each token."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    tokens = sampling.sample(logits.expand(DRAWS, -1), [g] * DRAWS)
    return torch.bincount(tokens, minlength=logits.numel())


LOGITS = [1.0, 2.6, -0.5, 0.2, 3.0, 1.8, -1.5, 0.6, 2.2, -0.1]  # by rank: tokens 4, 1, 8, 5, 0, 7, 3, 9, 2, 6


# kept: the tokens left after the masks, worked out by hand from softmax(LOGITS / T) (rounded):
#   T=2.0: ranks' cumulative mass .225 .409 .560 .683 .766 ...: top_p .72 is crossed by token 0 (rank 5).
#   T=0.8, top 6 renormalised: .429 .690 .848 .943 ...: top_p .9 is crossed by token 5 (rank 4); token 0 is dropped.
#   T=1.3: .298 .518 ...: top_p .35 is crossed by token 1 (rank 2).
@pytest.mark.parametrize("temperature,top_k,top_p,kept", [
    (1.0, None, 1.0, list(range(10))),
    (0.5, 4, 1.0, [4, 1, 8, 5]),
    (2.0, None, 0.72, [4, 1, 8, 5, 0]),
    (0.8, 6, 0.9, [4, 1, 8, 5]),
    (1.3, None, 0.35, [4, 1]),
])
def test_sampling_follows_the_masked_softmax(temperature, top_k, top_p, kept):
    logits = torch.tensor(LOGITS)
    pool = logits.double().topk(top_k or len(LOGITS)).indices.tolist()
    mass = (logits.double()[pool] / temperature).softmax(0).cumsum(0)[: len(kept)]
    if top_p < 1:  # the hand-worked crossing holds, with room to spare
        assert pool[: len(kept)] == kept and mass[-2] < top_p - 0.02 and mass[-1] > top_p + 0.02

    counts = draw(Sampling(temperature, top_p, top_k), logits)
    dropped = [t for t in range(len(LOGITS)) if t not in kept]
    assert counts[dropped].tolist() == [0] * len(dropped), f"masked tokens drawn: {counts.tolist()}"
    expected = DRAWS * (logits.double()[kept] / temperature).softmax(0)
    assert expected.min() >= 5  # the chi-square approximation holds
    chi2 = ((counts[kept].double() - expected) ** 2 / expected).sum().item()
    limit = chi_square_critical(len(kept) - 1)
    assert chi2 < limit, (f"chi2 {chi2:.1f} >= {limit:.1f} (df {len(kept) - 1}): counts {counts.tolist()}, expected "
                          f"{[round(e) for e in expected.tolist()]} for tokens {kept}")


@pytest.mark.parametrize("top_p,n_kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.8, 4)])
def test_top_p_keeps_the_smallest_set_that_reaches_it(top_p, n_kept):
    """Four equal logits: probabilities of exactly 1/4, so the cumulative mass meets 0.25, 0.5 and 0.75 exactly;
    HF, vLLM and llama.cpp then keep the tokens up to that one and no more."""
    counts = draw(Sampling(1.0, top_p), torch.zeros(4))
    assert int((counts > 0).sum()) == n_kept, counts.tolist()  # a kept token is missed with probability <= (3/4)^20000


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
