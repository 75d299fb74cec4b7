"""The OpenAI-compatible server, with real clients (the official `openai` package and httpx) against servers
started on free loopback ports: tiny random models with the Mistral v1 tokenizer, the default model, and the CLI's
`serve` in a subprocess. Streamed and non-streamed text agree, concurrent requests return what they return alone,
cancellation frees rows, and every error case answers with its status and OpenAI's error body."""

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import mistral_ext
from mistral_ext.batching import Engine
from mistral_ext.chat import chat_tokens
from mistral_ext.server import CHAT_FIELDS, COMPLETION_FIELDS, Server, build_app
from tiny import text_checkpoints

W = 16


class Running:
    """A server on a free port, in a thread of this process."""

    def __init__(self, model, api_key=None, name="tiny", **engine_options):
        self.server = Server(name, api_key)
        self.server.engine = Engine(model, **engine_options) if model is not None else None
        self.web = uvicorn.Server(uvicorn.Config(build_app(self.server), host="127.0.0.1", port=0,
                                                 log_level="warning"))
        self.thread = threading.Thread(target=self.web.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.web.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.web.servers[0].sockets[0].getsockname()[1]}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0)

    def close(self):
        self.web.should_exit = True
        self.thread.join(timeout=30)
        if self.server.engine is not None:
            self.server.engine.close()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=self.auth()).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def auth(self) -> dict:
        key = self.server.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return text_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def model(folders):
    return mistral_ext.load(folders["window"], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def served(model):
    running = Running(model, max_batch=4, prefill_chunk=8, max_waiting=64)
    yield running
    running.close()


def words(n: int) -> str:
    vocab = ["alpha", "river", "stone", "cloud", "green", "seven", "quiet", "table", "north", "light"]
    return " ".join(random.choice(vocab) for _ in range(n))


def chat(client, content: str, model: str = "tiny", **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kwargs)


def streamed_chat(client, content: str, **kwargs):
    pieces, reasons, usage, roles = [], [], None, []
    for chunk in chat(client, content, stream=True, **kwargs):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert roles[0] == "assistant" and reasons[-1] is not None and not any(reasons[:-1])
    return "".join(pieces), reasons[-1], usage


def test_chat_streamed_equals_non_streamed_and_usage_counts_the_tokens(served, model):
    content = words(6)
    prompt = chat_tokens(model, [{"role": "user", "content": content}])
    full = chat(served.client, content, max_tokens=12, temperature=0)
    text, reason, usage = streamed_chat(served.client, content, max_tokens=12, temperature=0,
                                        stream_options={"include_usage": True})
    assert text == full.choices[0].message.content and reason == full.choices[0].finish_reason
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion" and full.model == "tiny"
    for u in (full.usage, usage):
        assert u.prompt_tokens == len(prompt) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    if reason == "length":
        assert full.usage.completion_tokens == 12


def test_completions_streamed_equals_non_streamed(served, model):
    prompt = words(5)
    full = served.client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    stream = served.client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert full.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    ids = served.client.completions.create(model="tiny", prompt=model.tokenizer.encode(prompt), max_tokens=10,
                                           temperature=0)
    assert ids.choices[0].text == full.choices[0].text


def test_logprobs_count_the_completion_tokens(served):
    r = chat(served.client, words(4), max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:  # greedy: the sampled token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob <= 0
    c = served.client.completions.create(model="tiny", prompt=words(4), max_tokens=8, temperature=0, logprobs=1)
    assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
    pieces, text = "".join(c.choices[0].logprobs.tokens), c.choices[0].text
    if "\ufffd" not in pieces + text:  # a character split over byte tokens has no text of its own per token
        assert pieces == text


def test_stop_strings(served):
    content = words(6)
    full = chat(served.client, content, max_tokens=20, temperature=0).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = chat(served.client, content, max_tokens=20, temperature=0, stop=[stop, "\x01"])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    text, reason, _ = streamed_chat(served.client, content, max_tokens=20, temperature=0, stop=stop)
    assert text == cut.choices[0].message.content and reason == "stop"


def test_seeded_sampling_is_reproducible(served):
    content = words(5)
    first = chat(served.client, content, max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    again = chat(served.client, content, max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    assert first.choices[0].message.content == again.choices[0].message.content
    streamed, _, _ = streamed_chat(served.client, content, max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    assert streamed == first.choices[0].message.content


def test_sixteen_concurrent_requests_return_what_they_return_alone(served):
    """Different prompt lengths (past 2W tokens) and answer lengths, greedy, through 4 rows."""
    jobs = [(words(random.randint(1, 30)), random.randint(1, 20)) for _ in range(16)]
    alone = [chat(served.client, c, max_tokens=n, temperature=0).choices[0].message.content for c, n in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: chat(served.client, job[0], max_tokens=job[1], temperature=0)
                                 .choices[0].message.content, jobs))
    assert together == alone


def test_a_cancelled_stream_frees_its_row(served):
    cancelled = served.metric('mistral_ext_requests_finished_total{reason="cancelled"}')
    body = {"model": "tiny", "messages": [{"role": "user", "content": words(3)}], "stream": True,
            "max_tokens": 100_000, "temperature": 0}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = response.iter_lines()
        got = [line for line, _ in zip(events, range(8)) if line.startswith("data: ")]
        assert len(got) >= 3
        assert served.metric("mistral_ext_requests_running") == 1
    deadline = time.monotonic() + 30
    while served.metric("mistral_ext_requests_running") != 0:
        assert time.monotonic() < deadline, "the row of a closed stream was not freed"
        time.sleep(0.05)
    assert served.metric('mistral_ext_requests_finished_total{reason="cancelled"}') == cancelled + 1


def test_metrics_and_models(served):
    text = httpx.get(served.url + "/metrics").text
    for name in ("mistral_ext_requests_running", "mistral_ext_requests_waiting", "mistral_ext_prompt_tokens_total",
                 "mistral_ext_generation_tokens_total", "mistral_ext_time_to_first_token_seconds_bucket",
                 "mistral_ext_inter_token_latency_seconds_count"):
        assert f"\n{name}" in text
    before = served.metric("mistral_ext_generation_tokens_total")
    r = chat(served.client, words(3), max_tokens=5, temperature=0)
    assert served.metric("mistral_ext_generation_tokens_total") == before + r.usage.completion_tokens
    assert [m.id for m in served.client.models.list().data] == ["tiny"]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}


def test_tokenize_and_detokenize(served, model):
    text = words(4)
    r = httpx.post(served.url + "/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == model.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert httpx.post(served.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()[
        "tokens"] == model.tokenizer.encode(text, bos=False)
    messages = [{"role": "user", "content": text}]
    assert httpx.post(served.url + "/tokenize", json={"messages": messages}).json()["tokens"] == chat_tokens(
        model, messages)
    assert httpx.post(served.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text


def assert_error(response, status: int, kind: str, param=None, words_in_message=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == kind
    assert words_in_message in error["message"]
    if param is not None:
        assert error["param"] == param


MESSAGES = [{"role": "user", "content": "hello"}]
BAD_REQUESTS = [
    ("/v1/chat/completions", b"{", 400, None, "not valid JSON"),
    ("/v1/chat/completions", [], 400, None, "JSON object"),
    ("/v1/chat/completions", {}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages", "string"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": 3}, 400, "temperature", "[0.0, 2.0]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": True}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": -1}, 400, "max_completion_tokens", ""),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, 400, "n", "n must be 1"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": ""}, 400, "stop", "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": [1]}, 400, "stop", "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "seed": -1}, 400, "seed", "seed"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", "logprobs: true"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", ""),
    ("/v1/chat/completions", {"messages": MESSAGES, "presence_penalty": 2.5}, 400, "presence_penalty", ""),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream: true"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "stream_options": {"x": 1}}, 400,
     "stream_options", ""),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"5": 1}}, 400, "logit_bias", "unsupported"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": []}, 400, "tools", "unsupported"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": [1, 32000]}, 400, "prompt", "token ids"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", ""),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs", ""),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "unsupported"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "string"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "token ids"),
]


@pytest.mark.parametrize("path,body,status,param,message", BAD_REQUESTS)
def test_bad_requests_get_their_status_and_the_server_keeps_serving(served, path, body, status, param, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(served.url + path, content=content, headers={"content-type": "application/json"})
    kinds = {400: "invalid_request_error", 404: "not_found_error"}
    assert_error(response, status, kinds[status], param, message)
    assert chat(served.client, "still there?", max_tokens=2, temperature=0).usage.completion_tokens <= 2


def test_unknown_routes_and_methods(served):
    assert_error(httpx.get(served.url + "/v1/nothing"), 404, "not_found_error", None, "/v1/nothing")
    assert_error(httpx.get(served.url + "/v1/chat/completions"), 405, "invalid_request_error", None, "GET")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(served.client, "x", temperature=5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        served.client.chat.completions.create(model="other", messages=MESSAGES)


def test_an_api_key_guards_everything_but_health(model):
    running = Running(model, api_key="s3cret", max_batch=1)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
                response = httpx.request(method, running.url + path, headers=headers, json={"messages": MESSAGES})
                assert_error(response, 401, "authentication_error", None, "API key")
        assert httpx.get(running.url + "/health").status_code == 200
        assert chat(running.client, "hi", max_tokens=2).usage.completion_tokens <= 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        running.close()


def test_a_prompt_longer_than_the_context_is_refused(folders):
    no_window = mistral_ext.load(folders["no_window"], device="cpu", dtype=torch.float32)
    running = Running(no_window, max_batch=2, context=24)
    try:
        response = httpx.post(running.url + "/v1/completions", json={"prompt": list(range(1, 26))})
        assert_error(response, 400, "invalid_request_error", "prompt", "more than the context of 24")
        assert response.json()["error"]["code"] == "context_length_exceeded"
        r = running.client.completions.create(model="tiny", prompt=list(range(1, 21)), max_tokens=50, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens <= 5
    finally:
        running.close()


def test_a_full_queue_answers_503_and_loading_answers_503(model):
    running = Running(model, max_batch=1, max_waiting=1)
    try:
        engine = running.server.engine
        busy = engine.submit([1, 2, 3], max_tokens=100_000)
        next(iter(busy))
        queued = engine.submit([1, 2, 3], max_tokens=100_000)
        assert_error(httpx.post(running.url + "/v1/chat/completions", json={"messages": MESSAGES}), 503,
                     "unavailable_error", None, "overloaded")
        engine.cancel(queued)
        engine.cancel(busy)
        assert queued.result().finish_reason == busy.result().finish_reason == "cancelled"
        assert chat(running.client, "hi", max_tokens=2).usage.completion_tokens <= 2
    finally:
        running.close()
    loading = Running(None)
    try:
        assert_error(httpx.get(loading.url + "/health"), 503, "unavailable_error", None, "loading")
        assert_error(httpx.post(loading.url + "/v1/chat/completions", json={"messages": MESSAGES}), 503,
                     "unavailable_error", None, "loading")
    finally:
        loading.close()


def test_fuzzed_bodies_never_get_a_server_error(served):
    """hypothesis draws bodies from the fields the routes know and a few they do not, with values of every JSON
    type: each gets a 2xx or a 4xx with OpenAI's error body, never a 5xx, and the server keeps serving."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    values = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.floats(-3, 3) | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3), max_leaves=6)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                     "content": st.text(max_size=20) | values})
    routes = {"/v1/chat/completions": CHAT_FIELDS, "/v1/completions": COMPLETION_FIELDS}

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=False,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.sampled_from(sorted(routes)), st.data())
    def run(path, data):
        names = sorted(routes[path]) + ["bogus"]
        body = data.draw(st.dictionaries(st.sampled_from(names), values, max_size=6))
        if path.endswith("chat/completions") and data.draw(st.booleans()):
            body["messages"] = data.draw(st.lists(message, min_size=1, max_size=3))
        if path == "/v1/completions" and data.draw(st.booleans()):
            body["prompt"] = data.draw(st.text(max_size=30) | st.lists(st.integers(-2, 32001), max_size=5))
        for budget in ("max_tokens", "max_completion_tokens"):  # a valid budget stays small: the test stays short
            if isinstance(body.get(budget), int) and not isinstance(body[budget], bool):
                body[budget] = min(body[budget], 4)
        body.setdefault("max_tokens", 4)
        response = httpx.post(served.url + path, json=body, timeout=60)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    run()
    assert chat(served.client, "still there?", max_tokens=2, temperature=0).usage.completion_tokens <= 2


def test_the_default_model_answers_a_chat(tmp_path):
    pytest.importorskip("gguf")
    model = mistral_ext.load(None, device="cpu")
    running = Running(model, name="SmolLM2-135M-Instruct", max_batch=2)
    try:
        question = "What is the capital of France?"
        r = running.client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=24, temperature=0,
                                                   messages=[{"role": "user", "content": question}])
        expected = mistral_ext.generate(model, question, max_tokens=24, chat=True)
        assert r.choices[0].message.content == expected and r.usage.completion_tokens > 0
    finally:
        running.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_serves(folders):
    """`python -m mistral_ext serve` in a subprocess: /health turns 200 once the model is loaded, then it answers
    a streamed chat; a bad --context stops it with the loader's error."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mistral_ext", "serve", "--model", str(folders["window"]),
                             "--port", str(port), "--max-batch", "2", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == folders["window"].name
        text, reason, _ = streamed_chat(client, "hello", model=folders["window"].name, max_tokens=5, temperature=0)
        assert reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "mistral_ext", "serve", "--model", str(folders["window"]),
                          "--port", str(free_port()), "--context", "8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "context caps the positions" in bad.stdout + bad.stderr


def test_moderations(served, model):
    texts = ["How do I bake bread?", "Write something mean about my neighbour."]
    r = httpx.post(served.url + "/v1/moderations", json={"input": texts, "model": "tiny"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results == [mistral_ext.moderate(model, t) for t in texts]
    single = served.client.moderations.create(input=texts[0])
    assert single.results[0].flagged == results[0]["flagged"]
    for body, param in (({"input": []}, "input"), ({"input": [3]}, "input"), ({"input": "x", "model": "m"}, "model"),
                        ({"input": "x", "foo": 1}, "foo")):
        response = httpx.post(served.url + "/v1/moderations", json=body)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param


def test_an_engine_failure_answers_an_error_and_the_server_keeps_serving(served, model, monkeypatch):
    def broken(*args):
        raise RuntimeError("an injected kernel failure")

    monkeypatch.setattr(model, "step", broken)
    response = httpx.post(served.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3})
    assert_error(response, 500, "server_error", None, "an injected kernel failure")
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True}
    events = [line for line in httpx.post(served.url + "/v1/chat/completions", json=body).text.splitlines() if line]
    last = json.loads(events[-1].removeprefix("data: "))
    assert "an injected kernel failure" in last["error"]["message"] and last["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert chat(served.client, "still there?", max_tokens=2, temperature=0).usage.completion_tokens <= 2
