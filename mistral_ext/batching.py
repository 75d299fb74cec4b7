"""Continuous batching: one thread owns the model and runs one step at a time for every request it holds.

Each step decodes one token for every running request and fills the rest of a token budget with prompt chunks of
requests still prefilling (chunked prefill mixed with decode, as llama-server's slots and vLLM's scheduler do), so
a request starts while others decode and a long prompt never stalls them. A request needs one cache row whatever
its length (the rolling buffer), so admission is a free row, and a finished row is reused at once.

A request's prompt is cut into chunks of `prefill_chunk` tokens whatever else is in the step, and every kernel
computes a row without reading the others (quantized and dense linear rows are bit-identical whatever the token
count; attention is per sequence): a request returns the same tokens alone or among others.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace

import torch

from .engine import Model
from .generate import Sampling, TextStream, stop_strings
from .model import RollingBufferCache


class QueueFull(RuntimeError):
    """submit() while max_waiting requests already wait."""


@dataclass
class Delta:
    """What one step added to a request: text that can no longer become part of a stop string (may be empty),
    the sampled token (None for the last flush), and when asked its log-probability and the top alternatives under
    the model's distribution (before temperature and penalties, as vLLM's default)."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    step: int = 0  # the engine step that made it (Engine.steps counts them)


@dataclass
class Result:
    text: str
    tokens: list[int]  # generated, without EOS
    finish_reason: str  # eos | stop (a stop string) | length (max_tokens) | context (no room left) | cancelled
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused from what the row held (not prefilled again)


@dataclass(frozen=True)
class Penalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far, applied to the logits."""

    presence: float = 0.0
    frequency: float = 0.0

    def __post_init__(self):
        for name, v in (("presence_penalty", self.presence), ("frequency_penalty", self.frequency)):
            if not (isinstance(v, (int, float)) and -2 <= v <= 2):
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")


class Request:
    """A submitted request: iterate it (or `async for`) for its Deltas as they are made; result() waits for the
    end. Iteration raises RuntimeError if the engine failed the request."""

    def __init__(self, prompt: list[int], sampling: Sampling, stops: list[str], max_tokens: int,
                 penalties: Penalties, top_logprobs: int | None, device: torch.device):
        self.prompt, self.sampling, self.stops, self.max_tokens = prompt, sampling, stops, max_tokens
        self.penalties, self.top_logprobs = penalties, top_logprobs
        self.generator = sampling.generators(1, device)[0]
        self.submitted = time.perf_counter()
        self._events: list[Delta] = []
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, event in self._waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._events.append(delta)
            self._notify()

    def _finish(self, result: Result | None, error: BaseException | None = None) -> None:
        with self._cond:
            self._result, self._error = result, error
            self._notify()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine failed this request: {self._error}") from self._error

    def _take(self, index: int) -> tuple[Delta | None, bool]:
        """(the event at index, or None) and whether the request has ended; caller holds the lock."""
        if index < len(self._events):
            return self._events[index], False
        self._raise_if_failed()
        return None, self._result is not None

    def __iter__(self) -> Iterator[Delta]:
        index = 0
        while True:
            with self._cond:
                event, ended = self._take(index)
                while event is None and not ended:
                    self._cond.wait()
                    event, ended = self._take(index)
            if event is None:
                return
            index += 1
            yield event

    async def __aiter__(self) -> AsyncIterator[Delta]:
        loop, index = asyncio.get_running_loop(), 0
        while True:
            with self._cond:
                event, ended = self._take(index)
                if event is None and not ended:
                    wake = asyncio.Event()
                    self._waiters.append((loop, wake))
            if event is not None:
                index += 1
                yield event
            elif ended:
                return
            else:
                try:
                    await wake.wait()
                finally:
                    with self._cond:
                        self._waiters.remove((loop, wake))

    def result(self, timeout: float | None = None) -> Result:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the request has not finished")
            self._raise_if_failed()
            return self._result


class Histogram:
    """Cumulative Prometheus buckets (seconds)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        for j in range(i, len(self.bounds)):
            self.counts[j] += 1
        self.sum += value
        self.count += 1


LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0  # prefilled (reused tokens not counted)
    generated_tokens: int = 0
    finished: Counter = field(default_factory=Counter)  # requests by finish reason
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))


class _Row:
    """A cache row: the ids whose K/V it holds (positions 0 .. len - 1), and the request it serves."""

    def __init__(self):
        self.history: list[int] = []
        self.request: Request | None = None
        self.pending: list[int] = []  # prompt ids still to prefill
        self.next_token: int | None = None  # sampled, to be fed at the next step
        self.stream: TextStream | None = None
        self.tokens: list[int] = []
        self.counts: dict[int, int] = {}
        self.cached = 0
        self.last_time = 0.0
        self.freed = 0  # a clock value: the least recently freed row is reused first


def reusable_prefix(cache: RollingBufferCache, row: int, history: list[int], prompt: list[int]) -> int:
    """How many leading ids of `prompt` row `row` can keep (it holds `history`): the longest common prefix, less
    one so the last prompt token is run for its logits, provided the ring still holds what that needs."""
    n = 0
    limit = min(len(history), len(prompt) - 1)
    while n < limit and history[n] == prompt[n]:
        n += 1
    return n if cache.can_rewind(row, n) else 0


class Engine:
    """Serves requests on `model` from one thread. max_batch cache rows (each a ring of W slots, or `context`
    positions for a model without window, default its max_seq_len); prefill_chunk: prompt tokens a request
    prefills per step (at most W); step_tokens: prompt tokens per step in all (at least prefill_chunk);
    max_waiting: requests queued before submit() raises QueueFull.

    Steps run fastest when the engine's thread is the only one that has run torch's CPU ops: each thread that has
    keeps its own OpenMP team, and libgomp stops its workers' spinning once it manages more threads than there are
    cores, which makes every op's fork/join a sleep and wake (measured here: 2 cores, a step 3x slower; the blocks
    of a CPU decode step, ops.decode_layers, wait at barriers of their own and are spared). The server loads the
    model on a thread that starts the engine and ends."""

    def __init__(self, model: Model, max_batch: int = 8, prefill_chunk: int = 256, step_tokens: int | None = None,
                 max_waiting: int = 256, context: int | None = None):
        if not isinstance(model, Model):
            raise TypeError(f"Engine needs a mistral_ext Model, got {type(model).__name__}")
        if model.group is not None:
            raise ValueError("Engine serves a model held by one process, not a tensor-parallel shard")
        for name, v in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk), ("max_waiting", max_waiting)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        args = model.args
        if context is not None:
            if args.sliding_window is not None:
                raise ValueError("context caps the positions of a model without sliding window; this model has a "
                                 f"window of {args.sliding_window} and a rolling cache of that size")
            if not isinstance(context, int) or not 1 <= context <= args.max_seq_len:
                raise ValueError(f"context must be an int in [1, {args.max_seq_len}], got {context!r}")
            args = replace(args, max_seq_len=context)
        self.model = model
        self.context = None if args.sliding_window is not None else args.max_seq_len
        self.prefill_chunk = min(prefill_chunk, args.sliding_window or prefill_chunk)
        self.step_tokens = max(step_tokens or self.prefill_chunk, self.prefill_chunk)
        self.max_waiting = max_waiting
        self.cache = RollingBufferCache(args, max_batch, model.device, model.dtype)
        self.rows = [_Row() for _ in range(max_batch)]
        self.eos = set(model.tokenizer.eos_ids) if model.tokenizer is not None else set()
        self.stats = Stats()
        self._waiting: deque[Request] = deque()
        self._cancelled: set[Request] = set()
        self._lock = threading.Condition()
        self._closed = False
        self._clock = 0
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="mistral_ext-engine", daemon=True)
        self._thread.start()

    @property
    def max_batch(self) -> int:
        return len(self.rows)

    # ---- the caller's side (any thread) ----

    def submit(self, prompt: list[int], sampling: Sampling | None = None, stop: str | list[str] | None = None,
               max_tokens: int = 256, penalties: Penalties | None = None, top_logprobs: int | None = None) -> Request:
        """Queues a request for the prompt's token ids. max_tokens >= 1; stop: strings that end the text (not
        included); top_logprobs: None for no log-probabilities, k >= 0 for the sampled token's and the k most
        likely ones'."""
        vocab = self.model.args.vocab_size
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt must be a non-empty list of token ids")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            bad = next(t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab))
            raise ValueError(f"prompt: token id {bad!r} is outside the vocabulary [0, {vocab})")
        if self.context is not None and len(prompt) > self.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens, more than the context of {self.context}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        stops = stop_strings(stop)
        if stops and self.model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none")
        if top_logprobs is not None and not (isinstance(top_logprobs, int) and 0 <= top_logprobs <= 20):
            raise ValueError(f"top_logprobs must be an int in [0, 20], got {top_logprobs!r}")
        request = Request(list(prompt), sampling or Sampling(), stops, max_tokens, penalties or Penalties(),
                          top_logprobs, self.model.device)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_waiting)")
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Ends a request (finish_reason "cancelled") and frees its row; nothing if it has ended already."""
        with self._lock:
            if not request.done:
                self._cancelled.add(request)
                self._lock.notify()

    def close(self) -> None:
        """Cancels what is left and stops the engine thread."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._cancelled and not self._waiting and not self._busy():
                    self._lock.wait()
                if self._closed:
                    self._shut_down()
                    return
                cancelled, self._cancelled = self._cancelled, set()
                self._drop_cancelled(cancelled)
                self._admit()
            if self._busy():
                try:
                    self._step()
                except Exception as e:  # a bug in sampling or detokenizing ends the step's requests, not the engine
                    for b, row in enumerate(self.rows):
                        if row.request is not None:
                            self._fail(b, e)

    def _busy(self) -> bool:
        return any(r.request is not None for r in self.rows)

    def _shut_down(self) -> None:
        for request in list(self._waiting):
            self._end_waiting(request)
        self._waiting.clear()
        for b, row in enumerate(self.rows):
            if row.request is not None:
                self._end(b, "cancelled")

    def _end_waiting(self, request: Request) -> None:
        request._finish(Result("", [], "cancelled", len(request.prompt), 0))
        self.stats.finished["cancelled"] += 1

    def _drop_cancelled(self, cancelled: set[Request]) -> None:
        for request in cancelled:
            if request in self._waiting:
                self._waiting.remove(request)
                self._end_waiting(request)
        for b, row in enumerate(self.rows):
            if row.request in cancelled:
                self._end(b, "cancelled")
        self.stats.waiting = len(self._waiting)

    def _admit(self) -> None:
        """Gives waiting requests free rows, each the row that keeps the longest prefix of its prompt (else the
        least recently freed one)."""
        while self._waiting:
            free = [b for b, r in enumerate(self.rows) if r.request is None]
            if not free:
                break
            request = self._waiting.popleft()
            reuse = {b: reusable_prefix(self.cache, b, self.rows[b].history, request.prompt) for b in free}
            b = max(free, key=lambda i: (reuse[i], -self.rows[i].freed))
            row = self.rows[b]
            self.cache.rewind(b, reuse[b])
            del row.history[reuse[b]:]
            row.request, row.pending, row.next_token = request, request.prompt[reuse[b]:], None
            row.tokens, row.counts, row.cached = [], {}, reuse[b]
            row.stream = TextStream(self.model.tokenizer, request.stops) if self.model.tokenizer else None
        self.stats.waiting = len(self._waiting)
        self.stats.running = sum(r.request is not None for r in self.rows)

    def _plan(self) -> list[list[int]]:
        """The ids each row brings this step: every decoding row its sampled token, then prompt chunks of the
        prefilling rows in row order while the step's prompt budget lasts."""
        plan: list[list[int]] = [[] for _ in self.rows]
        budget = self.step_tokens
        for b, row in enumerate(self.rows):
            if row.request is not None and row.next_token is not None:
                plan[b] = [row.next_token]
        for b, row in enumerate(self.rows):
            if row.request is not None and row.pending:
                chunk = row.pending[: self.prefill_chunk]
                if len(chunk) <= budget:
                    plan[b] = chunk
                    budget -= len(chunk)
        return plan

    def _step(self) -> None:
        plan = self._plan()
        self.steps += 1
        try:
            logits = self.model.step(plan, self.cache)
        except Exception as e:  # a failed step ends its requests, never the engine
            for b, ids in enumerate(plan):
                if ids:
                    self._fail(b, e)
            return
        active = [b for b, ids in enumerate(plan) if ids]
        ready = []  # the rows whose prompt is all in: they sample this step, from these logits
        for i, b in enumerate(active):
            row = self.rows[b]
            row.history += plan[b]
            if row.pending:
                del row.pending[: len(plan[b])]
                self.stats.prompt_tokens += len(plan[b])
                if row.pending:
                    continue
            ready.append((b, logits[i]))
        for (b, raw), token in zip(ready, self._sample(ready)):
            self._take(b, token, raw)

    def _sample(self, ready: list[tuple[int, torch.Tensor]]) -> list[int]:
        """The next token of each (row, logits), sampled on the logits' device, rows of the same sampling settings
        together (each with its own generator, so a row samples as it would alone), and read back at once: one
        synchronisation per step, not one per row."""
        if not ready:
            return []
        groups: dict[tuple, list[int]] = {}
        for i, (b, _) in enumerate(ready):
            s = self.rows[b].request.sampling
            groups.setdefault((s.temperature, s.top_p, s.top_k), []).append(i)
        penalized = [self._penalized(b, logits) for b, logits in ready]
        tokens = torch.empty(len(ready), dtype=torch.long, device=ready[0][1].device)
        for members in groups.values():
            requests = [self.rows[ready[i][0]].request for i in members]
            tokens[members] = requests[0].sampling.sample(torch.stack([penalized[i] for i in members]),
                                                          [r.generator for r in requests])
        return tokens.tolist()

    def _penalized(self, b: int, logits: torch.Tensor) -> torch.Tensor:
        """Row b's logits less its request's presence and frequency penalties over the tokens it generated."""
        row, penalties = self.rows[b], self.rows[b].request.penalties
        if not (row.counts and (penalties.presence or penalties.frequency)):
            return logits
        ids = torch.tensor(list(row.counts), device=logits.device)
        counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.clone()
        logits[ids] -= penalties.presence + penalties.frequency * counts
        return logits

    def _take(self, b: int, token: int, raw: torch.Tensor) -> None:
        """Row b's sampled token (raw: the logits it came from, before penalties): streamed, or the end."""
        row, request = self.rows[b], self.rows[b].request
        now = time.perf_counter()
        if row.tokens:
            self.stats.inter_token_latency.observe(now - row.last_time)
        else:
            self.stats.time_to_first_token.observe(now - request.submitted)
        row.last_time = now
        if token in self.eos:
            self._end(b, "eos")
            return
        row.tokens.append(token)
        row.counts[token] = row.counts.get(token, 0) + 1
        self.stats.generated_tokens += 1
        delta = Delta("", token, step=self.steps)
        if request.top_logprobs is not None:
            logprobs = torch.log_softmax(raw.float(), dim=-1)
            delta.logprob = float(logprobs[token])
            if request.top_logprobs:
                top = logprobs.topk(request.top_logprobs)
                delta.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        stopped = False
        if row.stream is not None:
            delta.text, stopped = row.stream.push(token)
        request._push(delta)
        if stopped:
            self._end(b, "stop")
        elif len(row.tokens) >= request.max_tokens:
            self._end(b, "length")
        elif self.context is not None and len(row.history) >= self.context:
            self._end(b, "context")
        else:
            row.next_token = token

    def _release(self, b: int) -> Request:
        row = self.rows[b]
        request, row.request, row.pending, row.next_token = row.request, None, [], None
        self._clock += 1
        row.freed = self._clock
        self.stats.running = sum(r.request is not None for r in self.rows)
        return request

    def _end(self, b: int, reason: str) -> None:
        row = self.rows[b]
        text = ""
        if row.stream is not None:
            tail = row.stream.finish()
            if tail:
                row.request._push(Delta(tail, step=self.steps))
            text = row.stream.text
        result = Result(text, row.tokens, reason, len(row.request.prompt), row.cached)
        self._release(b)._finish(result)
        self.stats.finished[reason] += 1

    def _fail(self, b: int, error: BaseException) -> None:
        self.cache.positions[b] = 0
        self.rows[b].history = []
        self._release(b)._finish(None, error)
        self.stats.finished["error"] += 1
