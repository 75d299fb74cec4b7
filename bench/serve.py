"""Serving under load: 1, 4, 8 and 16 concurrent streaming chat clients against `python -m mistral_ext serve` and,
when llama-cpp-python is installed (with its server extra), `python -m llama_cpp.server` on the same GGUF, the
same prompts, max_tokens and thread count, the servers taking turns level by level in one run.

For each level: aggregate tok/s (streamed content chunks of all clients over the wall time of the wave), time to
first token and inter-token latency p50/p99, medians over --rounds waves. Then "late arrival": the time to first
token of one request sent once 7 streams are decoding, against the same request alone; and 200 requests of which
a third are closed by their client at random, with /metrics and the resident memory afterwards (ours).

    python bench/serve.py [--model FILE.gguf] [--threads 2] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DEFAULT_LLAMACPP_PYTHON = Path.home() / ".cache" / "llamacpp-venv" / "bin" / "python"
TOPICS = ["the sea", "a mountain village", "an old clock", "the first snow", "a lost letter", "a red bicycle",
          "the night train", "a lighthouse", "a small garden", "the last bakery", "a quiet library", "a storm",
          "an empty stadium", "a paper boat", "the city at dawn", "a friendly robot"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, ready: str, env: dict) -> subprocess.Popen:
    """Starts a server and waits until GET `ready` answers 200."""
    log = tempfile.TemporaryFile()  # a pipe left unread would fill up and stall a chatty server
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{command[:3]} exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{command[:3]} did not come up")


REQUESTS = itertools.count()


async def stream_one(client: httpx.AsyncClient, url: str, model: str, topic: str, max_tokens: int,
                     started: asyncio.Event | None = None) -> dict:
    # Each prompt opens with its own number, so a server's prompt reuse covers only the shared chat preamble.
    content = f"({next(REQUESTS)}) Write a long story about {topic}."
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
                if started is not None:
                    started.set()
    return {"start": t0, "stamps": stamps}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))] if values else float("nan")


async def wave(url: str, model: str, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream_one(client, url, model, TOPICS[i % len(TOPICS)], max_tokens)
                                      for i in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(len(r["stamps"]) for r in runs)
    ttft = [r["stamps"][0] - r["start"] for r in runs if r["stamps"]]
    itl = [b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"tok_s": tokens / wall, "ttft50": percentile(ttft, 0.5), "ttft99": percentile(ttft, 0.99),
            "itl50": percentile(itl, 0.5), "itl99": percentile(itl, 0.99), "tokens": tokens}


async def late_arrival(url: str, model: str, max_tokens: int) -> tuple[float, float]:
    """(TTFT of one request alone, TTFT of the same request sent once 7 streams have their first token)."""
    async with httpx.AsyncClient(timeout=600) as client:
        alone = await stream_one(client, url, model, TOPICS[8], 8)
        started = [asyncio.Event() for _ in range(7)]
        others = [asyncio.ensure_future(stream_one(client, url, model, TOPICS[i], max_tokens, started[i]))
                  for i in range(7)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 600)
        late = await stream_one(client, url, model, TOPICS[8], 8)
        await asyncio.gather(*others)
    return alone["stamps"][0] - alone["start"], late["stamps"][0] - late["start"]


async def cancellations(url: str, model: str, requests: int, concurrency: int, rng: random.Random) -> dict:
    """`requests` streams, `concurrency` at a time, each closed by its client after a random number of chunks (a
    third of them; the rest run to the end): how many ended as they should, and what /metrics says afterwards."""
    semaphore, outcomes = asyncio.Semaphore(concurrency), []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        cut = rng.randint(0, 6) if rng.random() < 1 / 3 else None
        body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % 16]}."}],
                "max_tokens": 16, "temperature": 0, "stream": True}
        async with semaphore:
            chunks, done = 0, False
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunks += 1
                        if cut is not None and chunks > cut:
                            break
            outcomes.append(done or cut is not None)

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(i, client) for i in range(requests)))
    return {"ended_right": sum(outcomes), "requests": requests}


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the default model's)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request asks for")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrent clients of each level")
    parser.add_argument("--rounds", type=int, default=3, help="waves per level (their medians are printed)")
    parser.add_argument("--cancellations", type=int, default=200,
                        help="requests of the cancellation run (a third closed by their client)")
    parser.add_argument("--llamacpp-python", type=Path,
                        default=DEFAULT_LLAMACPP_PYTHON if DEFAULT_LLAMACPP_PYTHON.is_file() else None,
                        help=f"the Python of an environment with llama-cpp-python[server] (default "
                             f"{DEFAULT_LLAMACPP_PYTHON} if it exists)")
    args = parser.parse_args()
    from mistral_ext.assets import default_model

    model_path = args.model or default_model()
    levels = [int(c) for c in args.clients.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    port = free_port()
    servers = {"ours": (port, "/health", [sys.executable, "-m", "mistral_ext", "serve", "--model", str(model_path),
                                          "--port", str(port), "--max-batch", str(max(levels)), "--threads",
                                          str(args.threads)])}
    if args.llamacpp_python is not None:
        port = free_port()
        # --interrupt_requests False: by default a new request ends the one running
        servers["llama-cpp-python"] = (port, "/v1/models", [
            str(args.llamacpp_python), "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port),
            "--n_threads", str(args.threads), "--n_ctx", "4096", "--interrupt_requests", "False"])
    running, unavailable = {}, {}
    try:
        for name, (port, ready, command) in servers.items():
            try:
                running[name] = (port, start(command, port, ready, env))
            except (RuntimeError, OSError) as e:
                if name == "ours":
                    raise
                unavailable[name] = str(e).splitlines()[-1][:200]  # e.g. llama-cpp-python without its server extra
        model_name = {name: httpx.get(f"http://127.0.0.1:{p}/v1/models").json()["data"][0]["id"]
                      for name, (p, _) in running.items()}
        results = {name: {n: [] for n in levels} for name in running}
        for name, (p, _) in running.items():  # warm-up
            asyncio.run(wave(f"http://127.0.0.1:{p}", model_name[name], 2, 8))
        for _ in range(args.rounds):
            for n in levels:
                for name, (p, _) in running.items():
                    results[name][n].append(asyncio.run(wave(f"http://127.0.0.1:{p}", model_name[name], n,
                                                             args.max_tokens)))
        late = {name: asyncio.run(late_arrival(f"http://127.0.0.1:{p}", model_name[name], args.max_tokens))
                for name, (p, _) in running.items()}
        ours_url, ours_proc = f"http://127.0.0.1:{running['ours'][0]}", running["ours"][1]
        idle_rss = rss_mb(ours_proc.pid)
        cancelled = asyncio.run(cancellations(ours_url, model_name["ours"], args.cancellations, 16,
                                              random.Random(0)))
        time.sleep(1.0)
        after = metrics(ours_url)
        after_rss = rss_mb(ours_proc.pid)
    finally:
        for _, proc in running.values():
            proc.terminate()
            proc.wait(timeout=60)
    print(f"model: {model_path.name}; {args.threads} threads; max_tokens {args.max_tokens}, greedy, streamed; "
          f"medians of {args.rounds} waves per level (servers alternating)")
    if "llama-cpp-python" not in running:
        print(f"llama-cpp-python: {unavailable.get('llama-cpp-python', 'not installed (--llamacpp-python)')}; "
              f"its rows are missing (it needs `pip install 'llama-cpp-python[server]'`)")
    print(f"{'server':<18} {'clients':>7} {'agg tok/s':>10} {'x 1 client':>10} {'TTFT p50 ms':>12} "
          f"{'TTFT p99 ms':>12} {'ITL p50 ms':>11} {'ITL p99 ms':>11}")
    agg = {}
    for name in running:
        one = statistics.median(r["tok_s"] for r in results[name][levels[0]])
        for n in levels:
            med = {k: statistics.median(r[k] for r in results[name][n]) for k in results[name][n][0]}
            agg[name, n] = med["tok_s"]
            print(f"{name:<18} {n:>7} {med['tok_s']:>10.1f} {med['tok_s'] / one:>10.2f} {med['ttft50'] * 1e3:>12.1f} "
                  f"{med['ttft99'] * 1e3:>12.1f} {med['itl50'] * 1e3:>11.1f} {med['itl99'] * 1e3:>11.1f}")
    if "llama-cpp-python" in running:
        for n in levels:
            print(f"ours / llama-cpp-python at {n} clients: {agg['ours', n] / agg['llama-cpp-python', n]:.2f}x")
    print(f"ours, {args.cancellations} requests (16 at a time), a third closed by their client at random: "
          f"{cancelled['ended_right']}/{args.cancellations} ended as they should; afterwards running "
          f"{after['mistral_ext_requests_running']:.0f}, waiting {after['mistral_ext_requests_waiting']:.0f}; "
          f"resident {idle_rss:.0f} MB before, {after_rss:.0f} MB after")
    for name, (alone, with_others) in late.items():
        print(f"{name}: TTFT alone {alone * 1e3:.1f} ms, arriving while 7 decode {with_others * 1e3:.1f} ms "
              f"({with_others / alone:.2f}x)")


if __name__ == "__main__":
    main()
