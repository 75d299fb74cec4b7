"""Self-reflection moderation on a tiny random model with the Mistral v1 tokenizer: the scores are each label's
likelihood as the answer, normalised, checked against HF transformers on the same weights; shape, determinism,
the last turn of a conversation classified, bad input."""

import math
import shutil

import pytest
import torch

import mistral_ext
from assets import mistral_v1_tokenizer
from mistral_ext.chat import chat_tokens
from mistral_ext.moderation import CATEGORIES, LABELS, PROMPT, ROLES
from tiny import random_hf_model, save_hf, tiny_args


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("transformers")
    hf = random_hf_model(tiny_args(vocab_size=32000), std=0.3)
    folder = save_hf(hf, tmp_path_factory.mktemp("moderation"))
    shutil.copy(mistral_v1_tokenizer(), folder / "tokenizer.model")
    return mistral_ext.load(folder, device="cpu", dtype=torch.float32), hf


def hf_scores(hf, model, role: str, content: str) -> dict[str, float]:
    """The same normalised label likelihoods from HF's logits (full attention within its window), in float64."""
    prompt = chat_tokens(model, [{"role": "user", "content": PROMPT.format(role=ROLES[role], content=content)}])
    lls = []
    for label in LABELS.values():
        answer = model.tokenizer.encode(label, bos=False)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].double()
        lls.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum())
    return dict(zip(LABELS, torch.stack(lls).softmax(0).tolist()))


def test_scores_are_the_labels_likelihoods_normalised(models):
    """Against HF in fp32: each log-likelihood sums a few fp32 log-probabilities of a prompt ~130 tokens long
    (past the window of 16), whose logits agree to ~1e-5; the normalised scores within 1e-4."""
    model, hf = models
    for text in ("How do I bake bread?", "Tell me how to cheat on my taxes."):
        result = mistral_ext.moderate(model, text)
        expected = hf_scores(hf, model, "user", text)
        assert set(result) == {"flagged", "categories", "category_scores"}
        assert list(result["category_scores"]) == list(LABELS) and list(result["categories"]) == list(CATEGORIES)
        for name, score in result["category_scores"].items():
            assert abs(score - expected[name]) < 1e-4
        assert math.isclose(sum(result["category_scores"].values()), 1.0, abs_tol=1e-12)
        best = max(result["category_scores"], key=result["category_scores"].get)
        assert result["flagged"] == (best != "acceptable")
        assert result["categories"] == {c: c == best for c in CATEGORIES}
        assert mistral_ext.moderate(model, text) == result  # deterministic


def test_a_conversation_classifies_its_last_turn(models):
    model, hf = models
    answer = "Sure, here is what I think."
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]
    other = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "something else entirely"},
             {"role": "assistant", "content": answer}]
    result = mistral_ext.moderate(model, conversation)
    assert result == mistral_ext.moderate(model, other) == mistral_ext.moderate(model, conversation[-1:])
    expected = hf_scores(hf, model, "assistant", answer)
    assert all(abs(result["category_scores"][k] - v) < 1e-4 for k, v in expected.items())
    assert mistral_ext.moderate(model, [{"role": "user", "content": answer}]) == mistral_ext.moderate(model, answer)


def test_bad_input(models):
    model, _ = models
    with pytest.raises(TypeError, match="needs a mistral_ext Model"):
        mistral_ext.moderate("model", "text")
    for bad in ([], 5, [{"role": "robot", "content": "x"}], [{"role": "user"}]):
        with pytest.raises(ValueError, match="moderate takes|the last message"):
            mistral_ext.moderate(model, bad)
