"""Chat formats: the Mistral instruct format equals mistral_common's v1 tokenizer token for token; the CLI chats
by default when the checkpoint has a template, keeps its KV cache across turns, and takes --raw/--system/--safe-prompt."""

import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import mistral_ext
from assets import mistral_v1_tokenizer
from mistral_ext.chat import SAFE_PROMPT, chat_tokens
from tiny import random_hf_model, save_hf, tiny_args

CONVERSATIONS = [
    [("user", "Hi")],
    [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "What is 2+2?")],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e  f\n")],
    [("system", "S"), ("user", "Tell me about Paris."), ("assistant", "It is the capital."), ("user", "And Rome?")],
    [("system", SAFE_PROMPT), ("user", "naïve 東京 🚀")],
]


@pytest.fixture(scope="module")
def mistral_tiny(tmp_path_factory):
    folder = save_hf(random_hf_model(tiny_args(vocab_size=32000), std=0.3), tmp_path_factory.mktemp("m"))
    shutil.copy(mistral_v1_tokenizer(), folder / "tokenizer.model")
    return folder


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_mistral_instruct_ids_equal_mistral_common(mistral_tiny, turns):
    model = mistral_ext.load(mistral_tiny, device="cpu")
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    expected = MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in turns])).tokens
    assert chat_tokens(model, [{"role": r, "content": c} for r, c in turns]) == expected


def test_bad_conversations(mistral_tiny):
    model = mistral_ext.load(mistral_tiny, device="cpu")
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "system", "content": "x"}]):
        with pytest.raises(ValueError):
            chat_tokens(model, bad)


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mistral_ext", *args], input=stdin, capture_output=True, text=True,
                          timeout=600)


# The default model dense (--dequantize): quantized (the CPU default), int8 rounding of the activations flips the
# first token of the answer, a near-tie in the dense logits ("The" 25.33, "L" 25.24), and the answer goes French.
def test_cli_chat_keeps_the_cache_across_turns():
    r = cli("chat", "--dequantize", "--max-tokens", "30", "--verbose",
            stdin="What is the capital of France?\nAnd of Italy?\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Rome" in r.stdout
    counts = [(int(w[2]), int(w[-1])) for w in (line.split() for line in r.stderr.splitlines() if "prefilling" in line)]
    assert len(counts) == 2 and counts[0][0] == counts[0][1], counts  # "prefilling N new tokens of M"
    assert counts[1][0] < counts[1][1] - counts[0][1], counts  # the second turn reads only what it added


def test_cli_generate_default_model_chats_and_raw_does_not():
    r = cli("generate", "--dequantize", "What is the capital of France?", "--max-tokens", "30")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    assert "prefill" in r.stderr and "tok/s" in r.stderr
    raw = cli("generate", "--raw", "What is the capital of France?", "--max-tokens", "5")
    assert raw.returncode == 0 and "finish: eos" in raw.stderr and "| 0 tokens |" in raw.stderr
    both = cli("generate", "--raw", "--system", "x", "Hi")
    assert both.returncode == 2 and "--system" in both.stderr
    safe = cli("generate", "--safe-prompt", "--system", "Answer in one word.", "Capital of France?", "--max-tokens", "10")
    assert safe.returncode == 0, safe.stderr
