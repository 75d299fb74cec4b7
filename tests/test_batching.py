"""The continuous-batching Engine and its step runner (Model.step) on tiny random models with the Mistral v1
tokenizer: a request returns alone what it returns among others, running streams get a token every step while a
long prompt prefills, rows are freed and reused (with the longest reusable prompt prefix), cancellation, the
penalties and log-probabilities against a plain loop over Model.prefill/decode, and bad input."""

import random

import pytest
import torch

import mistral_ext
from mistral_ext.batching import Engine, Penalties, QueueFull
from mistral_ext.generate import Sampling
from tiny import text_checkpoints

W = 16  # tiny_args' window


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return text_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def model(folders):
    return mistral_ext.load(folders["window"], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def no_window(folders):
    return mistral_ext.load(folders["no_window"], device="cpu", dtype=torch.float32)


def random_prompts(n: int, lo: int = 1, hi: int = 2 * W + 7) -> list[list[int]]:
    return [[1] + [random.randrange(3, 32000) for _ in range(random.randint(lo, hi) - 1)] for _ in range(n)]


@pytest.mark.parametrize("fused", [True, False], ids=["decode-layers", "python-blocks"])
def test_step_runner_rows_match_the_decode_path(model, fused, monkeypatch):
    """Model.step with idle rows gives decode's logits bit for bit: the engine relies on it, since a decoding row
    takes one path or another depending on what the other rows do. On the CPU such a step decodes only its rows
    through ops.decode_layers; without it (Transformer.fused_decode off, as for the reference ops, a shard or CUDA)
    it takes the packed prefill path, whose one-token rows compute what decode does. Which path ran is counted."""
    from mistral_ext import ops

    prefills = []
    monkeypatch.setattr(ops, "attention_prefill",
                        lambda *a: prefills.append(1) or torch.ops.mistral_ext.attention_prefill(*a))
    model.transformer.fused_decode = fused
    try:
        prompts = random_prompts(3)
        a, b = model.new_cache(3), model.new_cache(3)
        model.prefill(prompts, a)
        model.prefill(prompts, b)
        prefills.clear()
        for _ in range(W + 3):  # across the ring's wrap
            tokens = [random.randrange(32000) for _ in range(3)]
            decoded = model.decode(torch.tensor(tokens), a)
            stepped = torch.cat([model.step([[tokens[0]], [], [tokens[2]]], b), model.step([[], [tokens[1]], []], b)])
            assert torch.equal(decoded, stepped[[0, 2, 1]])
        assert torch.equal(a.positions, b.positions)
        assert bool(prefills) == (not fused)
    finally:
        model.transformer.fused_decode = True


def test_step_runner_refuses_bad_steps(model):
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="one per cache row"):
        model.step([[1]], cache)
    with pytest.raises(ValueError, match="no row brings a token"):
        model.step([[], []], cache)
    with pytest.raises(ValueError, match="more than the window"):
        model.step([[1] * (W + 1), []], cache)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.step([[1, 32000], [5]], cache)


def test_rewind_keeps_only_what_the_ring_still_holds(model):
    """W = S = 16. A row that has not wrapped rewinds anywhere; one at end = 20 (slots hold 4..19) only to 20, 19
    (the next query needs 4..18) or 0: rewinding to 18 would need position 3, whose slot now holds 19."""
    cache = model.new_cache(1)
    cache.positions[0] = W
    assert all(cache.can_rewind(0, p) for p in range(W + 1))
    assert not cache.can_rewind(0, W + 1)
    cache.positions[0] = 20
    assert [p for p in range(21) if cache.can_rewind(0, p)] == [0, 19, 20]
    with pytest.raises(ValueError, match="cannot rewind"):
        cache.rewind(0, 18)


def mixed_requests(n: int, rng: random.Random):
    """(prompt, Sampling, max_tokens) for n requests: greedy and seeded sampling, prompts from 1 token to past 2W."""
    out = []
    for prompt in random_prompts(n):
        sampling = Sampling() if rng.random() < 0.5 else Sampling(temperature=0.9, top_k=50, seed=rng.randrange(99))
        out.append((prompt, sampling, rng.randint(1, 24)))
    return out


@pytest.mark.parametrize("which", ["window", "no_window", "window-int8", "window-graphs"])
def test_requests_return_alone_what_they_return_together(folders, which):
    """16 requests through 4 rows at once (rows freed and reused, prompts chunked between decode tokens) give each
    the tokens the same request gives alone, bit for bit: no row reads another's. With "graphs" the batched run's
    decode steps go through the cache's DecodeGraph (run eagerly on the CPU), the lone ones through Model.decode."""
    name, _, variant = which.partition("-")
    quantize = "int8" if variant == "int8" else None
    model = mistral_ext.load(folders[name], device="cpu", dtype=None if quantize else torch.float32,
                             quantize=quantize)
    requests = mixed_requests(16, random.Random(random.randrange(1 << 30)))
    with Engine(model, max_batch=4, prefill_chunk=8) as engine:
        alone = [engine.submit(p, s, max_tokens=m).result() for p, s, m in requests]
        model.cuda_graphs = variant == "graphs"
        handles = [engine.submit(p, s, max_tokens=m) for p, s, m in requests]
        together = [h.result() for h in handles]
        assert engine.stats.running == 0 and engine.stats.waiting == 0
        assert (engine.cache.decode_graph is not None) == (variant == "graphs")
    for a, t, (prompt, _, max_tokens) in zip(alone, together, requests):
        assert t.tokens == a.tokens and t.finish_reason == a.finish_reason and t.text == a.text
        assert t.prompt_tokens == len(prompt) and (t.finish_reason != "length" or len(t.tokens) == max_tokens)


def test_one_request_gives_what_generate_gives(model):
    """With chunks of W tokens the engine prefills as generate does: the same tokens, greedy and seeded."""
    prompt = random_prompts(1, 2 * W + 3, 2 * W + 9)[0]
    with Engine(model, max_batch=2, prefill_chunk=W) as engine:
        for sampling in (Sampling(), Sampling(temperature=0.8, top_p=0.9, seed=7)):
            expected = mistral_ext.generate_tokens(model, [prompt], max_tokens=20, temperature=sampling.temperature,
                                                   top_p=sampling.top_p, seed=sampling.seed)[0]
            assert engine.submit(prompt, sampling, max_tokens=20).result().tokens == expected


def test_running_streams_get_a_token_every_step_while_a_long_prompt_prefills(model):
    """Three streams decode; a prompt of 2W + 5 tokens arrives and prefills in chunks of 8 over 5 steps. Every
    request's tokens come from consecutive steps (no step passes a running stream by), and the streams already
    running are given tokens during the long prefill."""
    with Engine(model, max_batch=4, prefill_chunk=8) as engine:
        streams = [engine.submit(p, max_tokens=40) for p in random_prompts(3, 2, 6)]
        iterators = [iter(s) for s in streams]
        first = [next(it) for it in iterators]
        long = engine.submit(random_prompts(1, 2 * W + 5, 2 * W + 5)[0], max_tokens=5)
        long_steps = [d.step for d in long if d.token is not None]
        stream_steps = [[f.step] + [d.step for d in it if d.token is not None] for f, it in zip(first, iterators)]
    assert long_steps == list(range(long_steps[0], long_steps[0] + len(long_steps)))
    for steps in stream_steps:
        assert steps == list(range(steps[0], steps[0] + len(steps)))
        assert steps[0] < long_steps[0] - 4 and steps[-1] >= long_steps[0]  # they ran through its 5 prefill steps


def test_a_request_arriving_while_others_decode_finishes_first(model):
    with Engine(model, max_batch=4, prefill_chunk=8) as engine:
        long = [engine.submit(p, max_tokens=60) for p in random_prompts(3, 2, 9)]
        for h in long:
            next(iter(h))
        short = engine.submit(random_prompts(1, 5, 5)[0], max_tokens=3).result()
        assert short.finish_reason == "length" and not any(h.done for h in long)
        for h in long:
            engine.cancel(h)


def test_cancelling_ends_the_request_and_frees_its_row(model):
    with Engine(model, max_batch=1, prefill_chunk=8) as engine:
        running = engine.submit(random_prompts(1)[0], max_tokens=10_000)
        waiting = engine.submit(random_prompts(1)[0], max_tokens=10_000)
        it = iter(running)
        deltas = [next(it) for _ in range(3)]
        engine.cancel(waiting)
        assert waiting.result().finish_reason == "cancelled" and waiting.result().tokens == []
        engine.cancel(running)
        result = running.result()
        assert result.finish_reason == "cancelled" and result.tokens[:3] == [d.token for d in deltas]
        assert engine.stats.running == 0 and engine.stats.waiting == 0
        after = engine.submit(random_prompts(1)[0], max_tokens=4).result()  # the row is reused
        assert after.finish_reason == "length" and len(after.tokens) == 4


def test_random_cancellations_lose_and_mix_up_nothing(model):
    """60 requests through 4 rows, a third of them cancelled at random moments (waiting or running): every other
    request returns its tokens alone, and the engine ends idle."""
    rng = random.Random(random.randrange(1 << 30))
    requests = mixed_requests(60, rng)
    with Engine(model, max_batch=4, prefill_chunk=8) as engine:
        alone = [engine.submit(p, s, max_tokens=m).result() for p, s, m in requests]
        handles = [engine.submit(p, s, max_tokens=m) for p, s, m in requests]
        doomed = set(rng.sample(range(len(handles)), 20))
        for i in sorted(doomed, key=lambda _: rng.random()):
            if rng.random() < 0.5:
                next(iter(handles[i]), None)
            engine.cancel(handles[i])
        results = [h.result(timeout=120) for h in handles]
        assert engine.stats.running == 0 and engine.stats.waiting == 0
        assert not any(r.request for r in engine.rows)
    for i, (a, r) in enumerate(zip(alone, results)):
        if i in doomed and r.finish_reason == "cancelled":
            assert r.tokens == a.tokens[: len(r.tokens)]
        else:
            assert r.tokens == a.tokens and r.finish_reason == a.finish_reason


def test_prompt_reuse_prefills_from_the_first_differing_token(no_window, model):
    """A chat turn re-sends the history: a free row that holds a prefix of the prompt prefills only the rest, and
    the next token's log-probability is a fresh prefill's (fp32, a few roundings apart: within 1e-4)."""
    prompt = random_prompts(1, 10, 10)[0]
    with Engine(no_window, max_batch=2, prefill_chunk=8) as engine:
        first = engine.submit(prompt, max_tokens=6).result()
        history = prompt + first.tokens[:-1]  # the last token sampled was never fed
        follow = prompt + first.tokens + random_prompts(1, 5, 5)[0][1:]
        diverged = prompt[:7] + random_prompts(1, 6, 6)[0][1:]
        for new, cached in ((follow, len(history)), (diverged, 7)):
            reused = engine.submit(new, max_tokens=3, top_logprobs=0)
            with Engine(no_window, max_batch=1) as fresh:
                again = fresh.submit(new, max_tokens=3, top_logprobs=0)
                r, a = list(reused)[0], list(again)[0]
            assert reused.result().cached_tokens == cached and again.result().cached_tokens == 0
            assert r.token == a.token and abs(r.logprob - a.logprob) < 1e-4
    with Engine(model, max_batch=1, prefill_chunk=8) as engine:  # W = 16: only while the ring has not wrapped
        short = random_prompts(1, 5, 5)[0]
        done = engine.submit(short, max_tokens=4).result()
        assert engine.submit(short + done.tokens + [7], max_tokens=1).result().cached_tokens == 8
        wrapped = engine.submit(random_prompts(1, 12, 12)[0], max_tokens=10).result()  # the row holds 21 positions
        assert wrapped.cached_tokens == 1  # BOS, from the 9 positions the row held
        assert engine.submit(short, max_tokens=1).result().cached_tokens == 0  # its BOS slot now holds position 16


def reference_loop(model, prompt, n, penalties: Penalties):
    """Greedy tokens with OpenAI's penalties, from Model.prefill/decode: logit[t] -= presence * (count[t] > 0) +
    frequency * count[t] over the tokens generated so far; and each token's log-probability under the model (the
    logits before the penalties)."""
    cache = model.new_cache(1)
    logits = model.prefill([prompt], cache)[0]
    tokens, logprobs, counts = [], [], {}
    for _ in range(n):
        adjusted = logits.clone()
        for t, c in counts.items():
            adjusted[t] -= penalties.presence * (c > 0) + penalties.frequency * c
        token = int(adjusted.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        counts[token] = counts.get(token, 0) + 1
        logits = model.decode(torch.tensor([token]), cache)[0]
    return tokens, logprobs


def test_penalties_and_logprobs_follow_a_plain_loop(model):
    prompt = random_prompts(1, 6, 6)[0]
    with Engine(model, max_batch=2, prefill_chunk=W) as engine:
        for penalties in (Penalties(), Penalties(presence=0.5, frequency=1.5), Penalties(frequency=-0.5)):
            tokens, logprobs = reference_loop(model, prompt, 12, penalties)
            request = engine.submit(prompt, max_tokens=12, penalties=penalties, top_logprobs=3)
            deltas = [d for d in request if d.token is not None]
            assert [d.token for d in deltas] == tokens
            assert all(abs(d.logprob - lp) < 1e-5 for d, lp in zip(deltas, logprobs))
            for d in deltas:
                (best, best_lp), *_ = d.top_logprobs
                assert len(d.top_logprobs) == 3 and best_lp >= d.logprob
                if penalties == Penalties():
                    assert best == d.token and best_lp == d.logprob
                assert [lp for _, lp in d.top_logprobs] == sorted((lp for _, lp in d.top_logprobs), reverse=True)


def test_stop_strings_end_the_text(model):
    prompt = random_prompts(1, 6, 6)[0]
    with Engine(model, max_batch=2) as engine:
        full = engine.submit(prompt, max_tokens=20).result()
        stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
        cut = engine.submit(prompt, max_tokens=20, stop=[stop, "\x00never"]).result()
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
        pieces = "".join(d.text for d in engine.submit(prompt, max_tokens=20, stop=stop))
        assert pieces == cut.text


def test_no_window_rows_end_at_the_context(no_window):
    with Engine(no_window, max_batch=2, context=32) as engine:
        result = engine.submit(random_prompts(1, 30, 30)[0], max_tokens=100).result()
        assert result.finish_reason == "context" and len(result.tokens) == 3  # positions 30, 31 fed, then full
        with pytest.raises(ValueError, match="more than the context of 32"):
            engine.submit(random_prompts(1, 33, 33)[0])


def test_bad_input_is_refused(model, no_window):
    with pytest.raises(TypeError, match="Engine needs a mistral_ext Model"):
        Engine(object())
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        Engine(model, max_batch=0)
    with pytest.raises(ValueError, match="context caps the positions of a model without sliding window"):
        Engine(model, context=8)
    with pytest.raises(ValueError, match=r"context must be an int in \[1, 64\]"):
        Engine(no_window, context=65)
    with Engine(model, max_batch=1, max_waiting=1) as engine:
        for kwargs, message in ((dict(prompt=[]), "non-empty list of token ids"),
                                (dict(prompt=[1, 32000]), "token id 32000 is outside the vocabulary"),
                                (dict(prompt=[1, -1]), "token id -1 is outside"),
                                (dict(prompt=[1], max_tokens=0), "max_tokens must be an int >= 1"),
                                (dict(prompt=[1], stop=[""]), "stop strings must be non-empty str"),
                                (dict(prompt=[1], top_logprobs=21), r"top_logprobs must be an int in \[0, 20\]")):
            with pytest.raises(ValueError, match=message):
                engine.submit(**kwargs)
        with pytest.raises(ValueError, match="presence_penalty must be a number in"):
            Penalties(presence=3)
        running = engine.submit([1, 2, 3], max_tokens=10_000)
        next(iter(running))
        waiting = engine.submit([1, 2, 3], max_tokens=10_000)
        with pytest.raises(QueueFull, match="already waiting"):
            engine.submit([1, 2, 3])
        engine.cancel(waiting)
    assert running.result().finish_reason == "cancelled"  # close() ends what is left
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1, 2, 3])


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(model, monkeypatch):
    with Engine(model, max_batch=2) as engine:
        monkeypatch.setattr(model, "step", lambda *args: 1 / 0)
        request = engine.submit(random_prompts(1)[0], max_tokens=3)
        with pytest.raises(RuntimeError, match="the engine failed this request: division by zero"):
            request.result()
        with pytest.raises(RuntimeError, match="failed"):
            list(request)
        monkeypatch.undo()
        assert engine.stats.running == 0 and engine.stats.finished["error"] == 1
        assert engine.submit(random_prompts(1)[0], max_tokens=3).result().finish_reason in ("length", "eos")
