"""Text generation: the cached decode loop, sampling, stop strings and streaming."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .chat import chat_tokens, conversation
from .engine import Model
from .model import RollingBufferCache
from .tokenizer import StreamDecoder

@dataclass
class Completion:
    text: str | None  # None from generate_tokens
    tokens: list[int]  # new tokens only, without EOS
    finish_reason: str  # eos | stop (a stop string) | length (max_tokens) | context (full context, no window)
    prompt_tokens: int
    prefill_ms: float  # for the whole batch
    decode_tokens_per_s: float  # new tokens of the whole batch per second of decoding


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")

    def generators(self, batch: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
        """One generator per sequence on the device of the logits, all from the same seed: a sequence samples the
        same alone or in a batch."""
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)))
        return [torch.Generator(device=device).manual_seed(seed) for _ in range(batch)]

    def sample(self, logits: Tensor, generators: list[torch.Generator]) -> Tensor:
        """The next token of each row of logits [B, vocab], on their device: reading them back is the caller's one
        synchronisation."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # the smallest set whose mass reaches top_p (HF, vLLM, llama.cpp): a token goes once the mass before it
            # has reached top_p, so the token that crosses top_p stays
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def _check_common(model: Model, max_tokens: int) -> None:
    if not isinstance(model, Model):
        raise TypeError(f"expected a mistral_ext Model (from mistral_ext.load), got {type(model).__name__}")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")


def _sync(model: Model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _run(model: Model, prompts: list[list[int]], max_tokens: int, sampling: Sampling,
         on_token: Callable[[int, int], bool] | None, cache: RollingBufferCache | None = None) -> list[Completion]:
    """The decode loop. on_token(index, token) returns True to end that sequence (a stop string). Given a cache,
    the prompts continue what it holds (a chat turn); the last sampled token is not fed to it."""
    batch = len(prompts)
    cache = cache if cache is not None else model.new_cache(batch)
    generators = sampling.generators(batch, model.device)
    eos = set(model.tokenizer.eos_ids) if model.tokenizer is not None else set()
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons: list[str | None] = ["length" if max_tokens == 0 else None for _ in range(batch)]

    t0 = time.perf_counter()
    logits = model.prefill(prompts, cache)
    _sync(model)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    while any(r is None for r in reasons):
        next_tokens = sampling.sample(logits, generators)
        if model.group is not None:  # every rank decodes rank 0's tokens
            next_tokens = model.group.broadcast(next_tokens.to(model.group.device))
        next_tokens = next_tokens.cpu()
        for b, tok in enumerate(next_tokens.tolist()):
            if reasons[b] is not None:
                continue
            if tok in eos:
                reasons[b] = "eos"
                continue
            tokens[b].append(tok)
            if on_token is not None and on_token(b, tok):
                reasons[b] = "stop"
            elif len(tokens[b]) >= max_tokens:
                reasons[b] = "length"
        if cache.max_positions is not None:
            for b in range(batch):
                if reasons[b] is None and int(cache.positions[b]) >= cache.max_positions:
                    reasons[b] = "context"
        if all(r is not None for r in reasons):
            break
        if cache.max_positions is not None:
            for b in range(batch):
                if reasons[b] is not None:
                    cache.positions[b] = 0  # finished rows keep decoding harmlessly, never past the context
        logits = model.decode(next_tokens, cache)
    _sync(model)
    decode_s = time.perf_counter() - t1
    rate = sum(len(t) for t in tokens) / decode_s if decode_s > 0 else 0.0
    return [Completion(None, t, r, len(p), prefill_ms, rate) for t, r, p in zip(tokens, reasons, prompts)]


def generate_tokens(model: Model, prompt_tokens: list[list[int]], max_tokens: int = 256, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int | None = None, seed: int | None = None) -> list[list[int]]:
    """New token ids (EOS excluded) for each prompt of token ids."""
    _check_common(model, max_tokens)
    if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
        raise ValueError("generate_tokens: prompt_tokens must be a non-empty list of token lists")
    sampling = Sampling(temperature, top_p, top_k, seed)
    return [c.tokens for c in _run(model, [list(p) for p in prompt_tokens], max_tokens, sampling, None)]


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """A stop argument (a string, a list of them or None) as a checked list."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop strings must be non-empty str, got {stop!r}")
    return stops


class TextStream:
    """Detokenizes one sequence, cuts it at the first stop string (not included) and releases only text that can no
    longer become part of a stop string. `text` is the text so far."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.emitted, self.stopped = "", 0, False

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece

    def _add(self, piece: str, final: bool) -> str:
        self.text += piece
        search_from = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) if final else len(self.text) - self.hold)

    def push(self, token: int) -> tuple[str, bool]:
        """The text this token releases, and whether a stop string has now ended the sequence."""
        return self._add(self.decoder.push(token), final=False), self.stopped

    def finish(self) -> str:
        """What is left to release once no token follows."""
        return "" if self.stopped else self._add(self.decoder.flush(), final=True)


def generate(model: Model, prompt: str | list[str], max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int | None = None, seed: int | None = None,
             stop: str | list[str] | None = None, stream: Callable[[int, str], None] | None = None,
             details: bool = False, chat: bool = False, system: str | None = None, safe_prompt: bool = False):
    """Generates text for one prompt (returns a str) or a list of prompts (returns a list).

    Each sequence ends at its own EOS, at a stop string (not included in the text), after max_tokens, or, for a
    model without sliding window, when its context is full. stream(index, piece) receives text as it is made,
    never a split UTF-8 character. temperature 0 is greedy; sampling is reproducible with a seed. With
    details=True the result holds Completion objects (text, tokens, finish_reason, timing) instead of strings.
    chat=True sends each prompt as a user message in the model's chat format (system: a system prompt;
    safe_prompt: the Mistral 7B paper's guardrail prompt before it).
    """
    _check_common(model, max_tokens)
    if model.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer: use generate_tokens with token ids")
    single = isinstance(prompt, str)
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a str or a non-empty list of str")
    if chat:
        encoded = [chat_tokens(model, conversation(p, system, safe_prompt)) for p in prompts]
    elif system is not None or safe_prompt:
        raise ValueError("system and safe_prompt apply to chat=True")
    else:
        encoded = [model.tokenizer.encode(p) for p in prompts]
    completions = generate_text(model, encoded, max_tokens, Sampling(temperature, top_p, top_k, seed), stop, stream)
    result = completions if details else [c.text for c in completions]
    return result[0] if single else result


def generate_text(model: Model, encoded: list[list[int]], max_tokens: int, sampling: Sampling,
                  stop: str | list[str] | None, stream: Callable[[int, str], None] | None,
                  cache: RollingBufferCache | None = None) -> list[Completion]:
    """generate() on token-id prompts, continuing `cache` when given (chat turns)."""
    _check_common(model, max_tokens)
    stops = stop_strings(stop)
    texts = [TextStream(model.tokenizer, stops) for _ in encoded]

    def emit(b: int, piece: str) -> None:
        if piece and stream is not None:
            stream(b, piece)

    def on_token(b: int, token: int) -> bool:
        piece, stopped = texts[b].push(token)
        emit(b, piece)
        return stopped

    completions = _run(model, encoded, max_tokens, sampling, on_token, cache)
    for b, (c, t) in enumerate(zip(completions, texts)):
        emit(b, t.finish())
        c.text = t.text
    return completions
