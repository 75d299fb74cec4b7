"""An OpenAI-compatible HTTP server over the continuous-batching Engine: Starlette on uvicorn.

`python -m mistral_ext serve [--model M] [--port 8000] ...`. Every request field is honoured or refused with a 400
naming it; every non-2xx response carries OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .batching import Engine, Penalties, QueueFull, Stats
from .batching import Request as EngineRequest
from .chat import chat_tokens
from .generate import Sampling
from .moderation import moderate

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "unavailable_error"}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
MAX_STOPS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class Fields:
    """Reads a JSON request body: every field it holds must be read by name, or the request is refused."""

    def __init__(self, body: object, allowed: set[str]):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unsupported field {unknown[0]!r}: this server honours {', '.join(sorted(allowed))}",
                           unknown[0])
        self.body = body

    def get(self, name: str, default=None):
        value = self.body.get(name)
        return default if value is None else value

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
            interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise ApiError(400, f"{name} must be a number in {interval}, got {v!r}", name)
        return float(v)

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        v = self.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}], got {v!r}", name)
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise ApiError(400, f"{name} must be true or false, got {v!r}", name)
        return v

    def string(self, name: str) -> str | None:
        v = self.get(name)
        if v is not None and not isinstance(v, str):
            raise ApiError(400, f"{name} must be a string, got {v!r}", name)
        return v


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
                 "n", "logprobs", "presence_penalty", "frequency_penalty", "user"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}


@dataclass
class Job:
    """A parsed completion request."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    penalties: Penalties
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs


class Server:
    """The app's state: the engine once the model is loaded."""

    def __init__(self, model_name: str, api_key: str | None, max_tokens_default: int = 256):
        self.model_name, self.api_key, self.max_tokens_default = model_name, api_key, max_tokens_default
        self.engine: Engine | None = None
        self.load_error: BaseException | None = None
        self.created = int(time.time())

    # ---- request parsing ----

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def ready(self, request: Request) -> Engine:
        self.authorize(request)
        if self.engine is None:
            raise ApiError(503, "the model is still loading")
        return self.engine

    async def body(self, request: Request) -> object:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def check_model(self, fields: Fields) -> None:
        name = fields.string("model")
        if name is not None and name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}", "model",
                           "model_not_found")

    def job(self, fields: Fields, prompt: list[int], chat: bool) -> Job:
        engine = self.engine
        self.check_model(fields)
        if fields.integer("n", 1, 1, 1_000_000) != 1:
            raise ApiError(400, "n must be 1: one choice per request", "n")
        budget = "max_completion_tokens" if chat and fields.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = fields.integer(budget, self.max_tokens_default, 1, 1 << 30)
        temperature = fields.number("temperature", 1.0, 0.0, 2.0)
        top_p = fields.number("top_p", 1.0, 0.0, 1.0, lo_open=True)
        top_k = fields.integer("top_k", None, 1, 1 << 30)
        seed = fields.integer("seed", None, 0, 2**63 - 1)
        stop = fields.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
        penalties = Penalties(fields.number("presence_penalty", 0.0, -2.0, 2.0),
                              fields.number("frequency_penalty", 0.0, -2.0, 2.0))
        stream = fields.boolean("stream", False)
        options = fields.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream:
                raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
            if not isinstance(options, dict) or set(options) - {"include_usage"}:
                raise ApiError(400, "stream_options must be {\"include_usage\": true|false}", "stream_options")
            include_usage = Fields(options, {"include_usage"}).boolean("include_usage", False)
        if chat:
            top_logprobs = fields.integer("top_logprobs", None, 0, 20)
            if fields.boolean("logprobs", False):
                top_logprobs = top_logprobs or 0
            elif top_logprobs is not None:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        else:
            top_logprobs = fields.integer("logprobs", None, 0, 5)
        fields.string("user")  # metadata only, as OpenAI's: it never changes the output
        if engine.context is not None and len(prompt) > engine.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens, more than the context of {engine.context}",
                           "messages" if chat else "prompt", "context_length_exceeded")
        return Job(prompt, max_tokens, Sampling(temperature, top_p, top_k, seed), stop, penalties, stream,
                   include_usage, top_logprobs)

    def submit(self, job: Job) -> EngineRequest:
        try:
            return self.engine.submit(job.prompt, job.sampling, job.stop, job.max_tokens, job.penalties,
                                      job.top_logprobs)
        except QueueFull as e:
            raise ApiError(503, f"the server is overloaded: {e}; retry later") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def token_texts(self, deltas, context: list[int]) -> list[tuple[str, list[tuple[str, float]]]]:
        """Each delta's token as text, and its alternatives': the text it adds after `context` (the tokens generated
        before the first delta) and the deltas before it. Decoded after the 4 tokens before it, since a token
        decoded alone loses sentencepiece's leading space, as only the completion's first token does."""
        decode, out, before = self.engine.model.tokenizer.decode, [], context[-4:]
        for d in deltas:
            prefix = len(decode(before))
            texts = [decode(before + [t])[prefix:] for t in [d.token] + [t for t, _ in d.top_logprobs or []]]
            out.append((texts[0], list(zip(texts[1:], [lp for _, lp in d.top_logprobs or []]))))
            before = (before + [d.token])[-4:]
        return out

    # ---- responses ----

    def chat_logprobs(self, deltas, context: list[int]) -> dict:
        def entry(text, logprob):
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(text, d.logprob), "top_logprobs": [entry(t, lp) for t, lp in alternatives]}
                            for d, (text, alternatives) in zip(deltas, self.token_texts(deltas, context))]}

    def completion_logprobs(self, deltas, context: list[int], offset: int = 0) -> dict:
        texts = self.token_texts(deltas, context)
        offsets = []
        for text, _ in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": [text for text, _ in texts], "token_logprobs": [d.logprob for d in deltas],
                "top_logprobs": [dict(alternatives) for _, alternatives in texts], "text_offset": offsets}

    @staticmethod
    def usage(job: Job, result) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": len(result.tokens),
                "total_tokens": len(job.prompt) + len(result.tokens),
                "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}

    async def respond(self, request: Request, job: Job, chat: bool) -> Response:
        engine_request = self.submit(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if job.stream:
            return StreamingResponse(self.stream(request, job, engine_request, chat, ident),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        deltas = []
        async with cancel_on_disconnect(request, self.engine, engine_request):
            async for d in engine_request:
                if d.token is not None:
                    deltas.append(d)
            result = engine_request.result()
        if result.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled: the server is shutting down")
        reason = FINISH_REASONS[result.finish_reason]
        logprobs = None
        if job.top_logprobs is not None:
            logprobs = self.chat_logprobs(deltas, []) if chat else self.completion_logprobs(deltas, [])
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": logprobs,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": logprobs, "finish_reason": reason}
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": self.usage(job, result)})

    async def stream(self, request: Request, job: Job, engine_request: EngineRequest, chat: bool,
                     ident: str) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **extra) -> str:
            body = {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": choices}
            return f"data: {json.dumps({**body, **extra})}\n\n"

        def choice(text: str | None, reason: str | None, logprob_deltas, first: bool = False) -> dict:
            logprobs = None
            if job.top_logprobs is not None and logprob_deltas:
                context = generated[: len(generated) - len(logprob_deltas)]
                logprobs = (self.chat_logprobs(logprob_deltas, context) if chat
                            else self.completion_logprobs(logprob_deltas, context, offset))
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | (
                    {"content": text} if text else {})
                return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

        offset = 0
        async with cancel_on_disconnect(request, self.engine, engine_request):
            if chat:
                yield chunk([choice(None, None, [], first=True)])
            held, generated = [], []  # tokens whose text is not released yet (a stop string may still match)
            try:
                async for d in engine_request:
                    if d.token is not None:
                        held.append(d)
                        generated.append(d.token)
                    if d.text:
                        yield chunk([choice(d.text, None, held)])
                        offset += len(d.text)
                        held = []
                result = engine_request.result()
            except RuntimeError as e:  # the engine failed the request: the stream ends with OpenAI's error event
                error = {"message": str(e), "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            if result.finish_reason == "cancelled":
                return
            yield chunk([choice(None, FINISH_REASONS[result.finish_reason], held)])
            if job.include_usage:
                yield chunk([], usage=self.usage(job, result))
            yield "data: [DONE]\n\n"


class cancel_on_disconnect:
    """While the body runs, a task waits for the client's http.disconnect and cancels the engine request (as vLLM
    races the handler against the disconnect); on leaving, the request is cancelled if it is still running."""

    def __init__(self, request: Request, engine: Engine, engine_request: EngineRequest):
        self.request, self.engine, self.engine_request = request, engine, engine_request

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.engine.cancel(self.engine_request)
                return

    async def __aenter__(self):
        self.task = asyncio.ensure_future(self._watch())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        self.engine.cancel(self.engine_request)


def _messages(fields: Fields) -> list[dict]:
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must have a role of system, user or assistant", "messages")
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise ApiError(400, f"messages[{i}]: unsupported field {sorted(unknown)[0]!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(server: Server, fields: Fields) -> list[int]:
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if server.engine.model.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer: send the prompt as token ids", "prompt")
        ids = server.engine.model.tokenizer.encode(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids
    vocab = server.engine.model.args.vocab_size
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt)):
        return prompt
    raise ApiError(400, f"prompt must be a non-empty string or one list of token ids in [0, {vocab})", "prompt")


def build_app(server: Server) -> Starlette:
    def handler(fn: Callable) -> Callable:
        async def run(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as e:
                return error_response(e.status, e.message, e.param, e.code)
        return run

    @handler
    async def chat_completions(request: Request) -> Response:
        server.ready(request)
        fields = Fields(await server.body(request), CHAT_FIELDS)
        try:
            prompt = chat_tokens(server.engine.model, _messages(fields))
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        return await server.respond(request, server.job(fields, prompt, chat=True), chat=True)

    @handler
    async def completions(request: Request) -> Response:
        server.ready(request)
        fields = Fields(await server.body(request), COMPLETION_FIELDS)
        return await server.respond(request, server.job(fields, _prompt(server, fields), chat=False), chat=False)

    @handler
    async def moderations(request: Request) -> Response:
        engine = server.ready(request)
        fields = Fields(await server.body(request), {"input", "model"})
        server.check_model(fields)
        texts = fields.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input must be a string or a non-empty list of strings", "input")
        if engine.model.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer")
        results = [await run_in_threadpool(moderate, engine.model, t) for t in texts]
        return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": server.model_name, "results": results})

    @handler
    async def models(request: Request) -> Response:
        server.authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                         "created": server.created, "owned_by": "mistral_ext"}]})

    @handler
    async def health(request: Request) -> Response:
        if server.engine is None:
            raise ApiError(503, "the model is still loading" if server.load_error is None
                           else f"the model failed to load: {server.load_error}")
        return JSONResponse({"status": "ok"})

    @handler
    async def metrics(request: Request) -> Response:
        server.authorize(request)
        stats = server.engine.stats if server.engine is not None else Stats()
        return PlainTextResponse(prometheus_text(stats), media_type="text/plain; version=0.0.4")

    @handler
    async def tokenize(request: Request) -> Response:
        engine = server.ready(request)
        fields = Fields(await server.body(request), {"prompt", "messages", "add_special_tokens", "model"})
        if engine.model.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer")
        if fields.get("messages") is not None:
            try:
                ids = chat_tokens(engine.model, _messages(fields))
            except ValueError as e:
                raise ApiError(400, str(e), "messages") from None
        else:
            text = fields.string("prompt")
            if text is None:
                raise ApiError(400, "give a prompt (a string) or messages", "prompt")
            special = fields.boolean("add_special_tokens", True)  # True: BOS as the checkpoint adds it
            ids = engine.model.tokenizer.encode(text, bos=None if special else False)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.context})

    @handler
    async def detokenize(request: Request) -> Response:
        engine = server.ready(request)
        fields = Fields(await server.body(request), {"tokens", "model"})
        ids, vocab = fields.get("tokens"), engine.model.args.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise ApiError(400, f"tokens must be a list of token ids in [0, {vocab})", "tokens")
        if engine.model.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer")
        return JSONResponse({"prompt": engine.model.tokenizer.decode(ids)})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/moderations", moderations, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]),
              Route("/tokenize", tokenize, methods=["POST"]),
              Route("/detokenize", detokenize, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def prometheus_text(stats: Stats) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("mistral_ext_requests_running", "gauge", "Requests holding a cache row.", [("", stats.running)])
    metric("mistral_ext_requests_waiting", "gauge", "Requests waiting for a cache row.", [("", stats.waiting)])
    metric("mistral_ext_prompt_tokens_total", "counter", "Prompt tokens prefilled (reused ones not counted).",
           [("", stats.prompt_tokens)])
    metric("mistral_ext_generation_tokens_total", "counter", "Tokens generated.", [("", stats.generated_tokens)])
    metric("mistral_ext_requests_finished_total", "counter", "Requests ended, by reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(stats.finished.items())])
    for name, help_, h in (("mistral_ext_time_to_first_token_seconds", "From submission to the first token.",
                            stats.time_to_first_token),
                           ("mistral_ext_inter_token_latency_seconds", "Between consecutive tokens of a request.",
                            stats.inter_token_latency)):
        samples = [(f'_bucket{{le="{b}"}}', c) for b, c in zip(h.bounds, h.counts)]
        samples += [('_bucket{le="+Inf"}', h.count), ("_sum", h.sum), ("_count", h.count)]
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram"])
        lines.extend(f"{name}{suffix} {value}" for suffix, value in samples)
    return "\n".join(lines) + "\n"


def serve(load_model: Callable[[], object], model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info", **engine_options) -> int:
    """Starts answering at once (/health says 503 while the model loads), loads it on a thread, then serves until
    interrupted. engine_options go to Engine."""
    import uvicorn

    server = Server(model_name, api_key)
    config = uvicorn.Config(build_app(server), host=host, port=port, log_level=log_level)
    web = uvicorn.Server(config)

    def load() -> None:
        try:
            server.engine = Engine(load_model(), **engine_options)
        except Exception as e:  # reported by /health and on stderr; the server stops
            server.load_error = e
            print(f"mistral-ext serve: the model failed to load: {e}", flush=True)
            web.should_exit = True

    threading.Thread(target=load, name="mistral_ext-load", daemon=True).start()
    web.run()
    if server.engine is not None:
        server.engine.close()
    return 0 if server.load_error is None else 2
