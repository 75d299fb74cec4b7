"""llama.cpp as an engine of bench/latency.py, through llama-cpp-python's low-level API. latency.py starts it with
the Python of the environment where llama-cpp-python is installed (it needs only that package and numpy) and
drives it over stdin/stdout, one JSON object a line, so llama.cpp runs the same prompts in the same loop of
configurations as the other engines, in a process of its own:

    python bench/llamacpp_engine.py '{"model": PATH, "threads": 2, "n_ctx": 2048, "n_batch": 2048,
                                      "n_seq_max": 4, "first_token_prompt": [...]}'

It loads the model with llama.cpp's defaults (the file mapped, tensors repacked for this CPU where it can) and
answers {"rss_load", "rss_first_token", "rss_file_first_token", "n_ctx", "version", "system_info"}: VmRSS after
the load, and after a context is made and has run the prompt and one decode step, with the file-backed part of the
latter. Then each request line is answered with the time of one run (latency.py takes the medians):

- {"op": "prefill", "prompt": ids} -> {"ms"}: one llama_decode of the prompt (logits of its last token) from an
  empty KV cache.
- {"op": "decode", "prompts": [ids, ...], "steps"} -> {"ms"}: the prompts prefilled (untimed) as sequences
  0..B-1 from an empty KV cache, then `steps` greedy steps, each one llama_decode of B tokens (one per sequence)
  and an argmax of each sequence's logits: exactly `steps` tokens whatever they are (EOS does not stop it).

A failure is answered {"error": message}.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp as lc
import numpy as np


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status: VmRSS (resident), RssFile (its file-backed part)."""
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024


class Engine:
    def __init__(self, cfg: dict):
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(cfg["model"].encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {cfg['model']}")
        self.rss_load = status_bytes("VmRSS")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = cfg["n_ctx"], cfg["n_batch"], cfg["n_seq_max"]
        params.n_threads = params.n_threads_batch = cfg["threads"]
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context")
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(cfg["n_batch"], 0, 1)

    def clear(self) -> None:
        lc.llama_memory_clear(self.memory, True)

    def decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
        b.n_tokens = len(tokens)
        self.outputs = [i for i, entry in enumerate(tokens) if entry[3]]
        status = lc.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode of {len(tokens)} tokens returned {status}")

    def prefill(self, prompts: list[list[int]]) -> None:
        """The prompts as sequences 0..B-1 in one llama_decode, with the logits of each one's last token."""
        self.decode([(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)])

    def greedy(self) -> list[int]:
        """The argmax of the logits of each entry of the last decode that wanted them (waits for the computation)."""
        return [int(np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())
                for i in self.outputs]

    def decode_steps(self, tokens: list[int], positions: list[int], steps: int) -> None:
        for step in range(steps):
            self.decode([(t, p + step, seq, True) for seq, (t, p) in enumerate(zip(tokens, positions))])
            tokens = self.greedy()


@lc.llama_log_callback
def errors_only(level: int, text: bytes, _) -> None:
    """llama.cpp logs every load step; only its errors (GGML_LOG_LEVEL_ERROR) are worth the reader's stderr."""
    if level == 4:
        sys.stderr.write(text.decode(errors="replace"))


def timed_ms(fn, setup) -> float:
    state = setup()
    t0 = time.perf_counter()
    fn(state)
    return (time.perf_counter() - t0) * 1e3


def answer(engine: Engine, request: dict) -> dict:
    if request["op"] == "prefill":
        def run(_):
            engine.prefill([request["prompt"]])
            lc.llama_synchronize(engine.ctx)

        return {"ms": timed_ms(run, engine.clear)}
    if request["op"] == "decode":
        prompts = request["prompts"]

        def setup():
            engine.clear()
            engine.prefill(prompts)
            return engine.greedy()

        return {"ms": timed_ms(lambda first: engine.decode_steps(first, [len(p) for p in prompts], request["steps"]),
                               setup)}
    raise ValueError(f"unknown request {request['op']!r}")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    lc.llama_log_set(errors_only, ctypes.c_void_p())
    engine = Engine(cfg)
    engine.prefill([cfg["first_token_prompt"]])
    engine.decode_steps(engine.greedy(), [len(cfg["first_token_prompt"])], 1)
    engine.clear()
    print(json.dumps({"rss_load": engine.rss_load, "rss_first_token": status_bytes("VmRSS"),
                      "rss_file_first_token": status_bytes("RssFile"), "n_ctx": lc.llama_n_ctx(engine.ctx),
                      "version": lc.__version__, "system_info": lc.llama_print_system_info().decode().strip()}),
          flush=True)
    for line in sys.stdin:
        try:
            reply = answer(engine, json.loads(line))
        except (RuntimeError, ValueError, KeyError) as e:
            reply = {"error": str(e)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
