"""Time to first token, decode throughput and resident memory of mistral_ext, side by side with other engines on the
same weights, the same prompt token ids, thread count and token counts, in one run.

Engines (--engines; ours always runs, as every ratio is against it):
  ours       mistral_ext as load() holds the checkpoint by default (a GGUF file's quantized tensors quantized, where
             the loader keeps them so), through Model.prefill / Model.decode
  compiled   ours' model after Model.compile(): the decode step compiled whole by torch.compile (on the CPU with
             inductor's C++ wrapper); each batch size compiles in its warm-up run
  dense      mistral_ext with every weight dense in float32: load(path, dtype=torch.float32)
  reference  ours' model with its ops swapped for mistral_ext.reference (the naive ops), in the same loop
  hf         HF transformers' MistralForCausalLM holding ours' weights (dequantized)
  llamacpp   llama.cpp through llama-cpp-python (bench/llamacpp_engine.py), in a process of the Python given by
             --llamacpp-python, with as many threads as ours: GGUF files only, CPU only
An engine that cannot run here (not installed, not this kind of model, not enough memory) is reported as
unavailable, with the reason, and the others run. llama-cpp-python is no dependency of mistral_ext: it goes in an
environment of its own, where pip builds llama.cpp for this CPU (about 15 minutes on 2 cores):
  python3 -m venv ~/.cache/llamacpp-venv && ~/.cache/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36

Figures, each the median of --repeats runs after --warmup runs, the engines taking turns run by run:
- time to first token: a prefill of N prompt tokens at batch 1 from an empty cache, to the logits of the last.
- decode: ms per step of --decode-steps greedy steps (exactly that many: EOS does not stop them) after the
  prompts of --contexts tokens are cached, at each batch size; GB/s is the bytes a step must read (all weights +
  the K/V of every cached position of every sequence) per second, and "% of read" its share of the read bandwidth
  (summing a tensor far larger than the caches) sampled just before and just after each run, the median over runs:
  on a shared machine the bandwidth drifts 2x within minutes; "% of best" is its share of the best sample of the
  whole run, the hardest reading.
- resident memory: VmRSS of a fresh process per engine (torch or llama.cpp included) after the load, and after a
  16-token prompt and one decode step, with the file-backed part of the latter (mapped files: shared libraries,
  and llama.cpp's mapping of the GGUF file, pages the kernel can drop and read again); with the weights' bytes and
  the KV cache each engine allocates (ours: for batch 1, the window, or the context without one, in the compute
  dtype; llama.cpp: its context, f16). reference and hf run on copies inside the benchmark process: no row.

--tensor-parallel N runs ours alone over N processes (torchrun, started by this script; gloo on the CPU, NCCL on
CUDA, one GPU per rank), each holding its shard (mistral_ext.parallel): ms are rank 0's, GB/s what one rank reads
(its shard and its part of the caches), and an extra table gives what one all-reduce of a decode step's
activations costs. The other engines and the memory rows need one process: run without it for them.

Models (--model): tiny (random float32 weights), smollm2 (the default SmolLM2-135M-Instruct GGUF), mistral-7b (the
paper's shape, random bfloat16 weights: 14.5 GB, held in bf16 under float32 activations on the CPU), or a checkpoint
path (GGUF file, HF folder, consolidated folder). A GGUF file of Mistral 7B's shape that both mistral_ext and
llama.cpp load: scripts/mistral_7b_gguf.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

import mistral_ext  # noqa: E402
from mistral_ext import ModelArgs, reference  # noqa: E402
from mistral_ext.quant import QuantizedWeight  # noqa: E402

BENCH = Path(__file__).resolve().parent
TINY = ModelArgs(dim=256, n_layers=4, head_dim=32, hidden_dim=768, n_heads=8, n_kv_heads=2, vocab_size=32000,
                 sliding_window=4096, max_seq_len=8192)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENGINES = ("ours", "compiled", "dense", "reference", "hf", "llamacpp")
DEFAULT_LLAMACPP_PYTHON = Path.home() / ".cache" / "llamacpp-venv" / "bin" / "python"
FIRST_TOKEN_PROMPT_LENGTH = 16  # the prompt run before the "first token" memory figure


class Unavailable(Exception):
    """An engine that cannot run here; the message says why."""


# ---------------- timing ----------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, setup, device: torch.device) -> float:
    """fn(state) timed after setup() (untimed); CUDA events on GPU."""
    state = setup()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        sync(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(state)
    return (time.perf_counter() - t0) * 1e3


def read_bandwidth_gbs(device: torch.device, gib: float = 1.0) -> float:
    """Bytes per second of summing a tensor larger than any cache on this machine (median of 5)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    ms = statistics.median([timed_ms(lambda _: x.sum(), lambda: None, device) for _ in range(6)][1:])
    return gib * 2**30 / ms / 1e6


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status: VmRSS (resident), RssFile (its file-backed part)."""
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) * 1024


def mem_available() -> int:
    return int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024


def device_memory_available(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else mem_available()


# ---------------- models ----------------


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype,
                 weight_dtype: torch.dtype | None = None, group=None) -> mistral_ext.Model:
    """Random weights (std 0.2), made on the device one tensor at a time: norms in dtype (the activations'), the
    matrices in weight_dtype (default: dtype); with a parallel.ShardGroup, this rank's shard of such a model."""
    from mistral_ext.checkpoint import new_transformer, parameter_slots, weight_parts
    from mistral_ext.engine import Model
    from mistral_ext.parallel import shard_args

    torch.manual_seed(0)
    if group is not None:
        args = shard_args(args, group.world_size)
    matrices = {name: weight_dtype for parts in weight_parts(args).values() for name, _ in parts
                if weight_dtype is not None and not name.endswith("norm.weight")}
    transformer = new_transformer(args, device, dtype, matrices)
    with torch.no_grad():
        for target in parameter_slots(transformer).values():
            target.copy_(torch.ones_like(target) if target.dim() == 1 else 0.2 * torch.randn_like(target))
    return Model(transformer.eval(), group=group)


def load_model(model: str, device: torch.device, dtype: torch.dtype | None, group=None) -> mistral_ext.Model:
    """dtype None: load()'s default way of holding the weights. The random models stand for checkpoints stored in
    float32 (tiny) and bfloat16 (mistral-7b, as its HF checkpoint is): on the CPU that dtype is kept, under float32
    activations. group: load this rank's shard (--tensor-parallel)."""
    if model in ("tiny", "mistral-7b"):
        from mistral_ext.engine import resolve_device_dtype

        args = TINY if model == "tiny" else ModelArgs.mistral_7b()
        stored = torch.float32 if model == "tiny" else torch.bfloat16
        device, compute = resolve_device_dtype(device, dtype)
        return random_model(args, device, compute, stored if dtype is None and device.type == "cpu" else None, group)
    return mistral_ext.load(None if model == "smollm2" else model, device=device, dtype=dtype,
                            tensor_parallel=group is not None)


def load_engine_model(engine: str, model: str, device: torch.device, dtype: torch.dtype | None) -> mistral_ext.Model:
    return load_model(model, device, torch.float32 if engine == "dense" else dtype)


def gguf_path(model: str) -> Path | None:
    if model == "smollm2":
        from mistral_ext.assets import default_model

        return default_model()
    path = Path(model)
    return path if path.is_file() and path.suffix == ".gguf" else None


def parameter_count(a: ModelArgs) -> int:
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    layer = a.dim * (q + 2 * kv) + q * a.dim + 3 * a.dim * a.hidden_dim + 2 * a.dim
    return a.n_layers * layer + a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors a module holds (quantized weights are buffers), each storage counted once."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def weight_formats(model: mistral_ext.Model) -> str:
    """How the matrices are held: quantized formats and dense dtypes, e.g. "q4_1" or "float32"."""
    quantized = {m.format for m in model.transformer.modules() if isinstance(m, QuantizedWeight)}
    dense = {str(p.dtype).removeprefix("torch.") for p in model.transformer.parameters() if p.dim() == 2}
    return "+".join(sorted(quantized) + sorted(dense))


def kv_bytes_per_position(args: ModelArgs, itemsize: int) -> int:
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * itemsize


def hf_copy(model: mistral_ext.Model):
    """The same weights in HF transformers' MistralForCausalLM (a Llama checkpoint is one without window);
    quantized ones dequantized."""
    try:
        from transformers import MistralConfig, MistralForCausalLM
    except ImportError:
        raise Unavailable("transformers is not installed") from None

    from mistral_ext.checkpoint import HF_LAYER_NAMES, HF_TOP_NAMES, parameter_slots

    a = model.args
    needed = parameter_count(a) * model.dtype.itemsize
    if device_memory_available(model.device) < needed:
        raise Unavailable(f"its {str(model.dtype).removeprefix('torch.')} copy of the weights takes "
                          f"{needed / 1e9:.1f} GB, more than is available")
    config = MistralConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
        max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
        sliding_window=a.sliding_window, tie_word_embeddings=a.tie_embeddings)
    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            hf = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    ours = parameter_slots(model.transformer)
    theirs = {v: k for k, v in HF_TOP_NAMES.items()}
    for i in range(a.n_layers):
        theirs |= {f"layers.{i}.{v}": f"model.layers.{i}.{k}" for k, v in HF_LAYER_NAMES.items()}
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, slot in ours.items():
            params[theirs[name]].copy_(slot.dequantize(model.dtype) if isinstance(slot, QuantizedWeight) else slot)
    return hf.eval()


# ---------------- engines ----------------


class InProcess:
    """An engine timed in this process: subclasses give prefill (returns the decode state) and decode_steps. Each
    engine's *_ms is one timed run, from a new cache."""

    device: torch.device
    weight_bytes: int
    kv_bytes_per_position: int

    def prefill_ms(self, prompt: list[int]) -> float:
        return timed_ms(lambda _: self.prefill([prompt]), lambda: None, self.device)

    def decode_ms(self, prompts: list[list[int]], steps: int) -> float:
        return timed_ms(lambda state: self.decode_steps(state, steps), lambda: self.prefill(prompts), self.device)


class Ours(InProcess):
    """mistral_ext's cached loop on an op set: its kernels, or the naive reference ops (the same model)."""

    def __init__(self, model: mistral_ext.Model, kernels):
        self.model, self.kernels, self.device = model, kernels, model.device
        self.weight_bytes = weight_bytes(model.transformer)
        self.kv_bytes_per_position = kv_bytes_per_position(model.args, model.dtype.itemsize)

    def prefill(self, prompts: list[list[int]]):
        self.model.transformer.use_kernels(self.kernels)
        cache = self.model.new_cache(len(prompts))
        return self.model.prefill(prompts, cache), cache

    def decode_ms(self, prompts: list[list[int]], steps: int) -> float:
        return timed_ms(lambda state: self.decode_steps(state, steps), lambda: self.decode_state(prompts), self.device)

    def decode_state(self, prompts: list[list[int]]):
        """The prefill and one decode step, untimed: a CUDA graph is captured in that step."""
        logits, cache = self.prefill(prompts)
        return self.model.decode(logits.argmax(-1).cpu(), cache), cache

    def decode_steps(self, state, steps: int) -> None:
        self.model.transformer.use_kernels(self.kernels)
        logits, cache = state
        for _ in range(steps):  # the token read back each step, as generate does
            logits = self.model.decode(logits.argmax(-1).cpu(), cache)

    def generate_ms(self, prompt: list[int], tokens: int) -> tuple[float, int]:
        """mistral_ext.generate_tokens, greedy, up to `tokens` (it stops at EOS): ms and the tokens it made."""
        self.model.transformer.use_kernels(self.kernels)
        made = []
        ms = timed_ms(lambda _: made.extend(mistral_ext.generate_tokens(self.model, [prompt], tokens)[0]),
                      lambda: None, self.device)
        return ms, len(made)


class HF(InProcess):
    def __init__(self, model, args: ModelArgs):
        self.model, self.device = model, model.device
        self.weight_bytes = weight_bytes(model)
        self.kv_bytes_per_position = kv_bytes_per_position(args, model.dtype.itemsize)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]):
        out = self.model(torch.tensor(prompts, device=self.device), use_cache=True)
        return out.logits[:, -1], out.past_key_values

    @torch.inference_mode()
    def decode_steps(self, state, steps: int) -> None:
        logits, cache = state
        for _ in range(steps):
            out = self.model(logits.argmax(-1)[:, None], past_key_values=cache, use_cache=True)
            logits, cache = out.logits[:, -1], out.past_key_values

    @torch.inference_mode()
    def generate_ms(self, prompt: list[int], tokens: int) -> tuple[float, int]:
        """HF's generate, greedy, exactly `tokens` new tokens (EOS held off until then)."""
        ids = torch.tensor([prompt], device=self.device)
        made = []
        ms = timed_ms(lambda _: made.append(self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            pad_token_id=self.model.config.eos_token_id).shape[1] - ids.shape[1]), lambda: None, self.device)
        return ms, made[0]


class LlamaCpp:
    """bench/llamacpp_engine.py in a child process, one JSON request and reply a line (its docstring)."""

    def __init__(self, python: Path, gguf: Path, args: ModelArgs, threads: int, n_ctx: int, n_batch: int,
                 n_seq_max: int, first_token_prompt: list[int]):
        from gguf import GGUFReader

        cfg = {"model": str(gguf), "threads": threads, "n_ctx": n_ctx, "n_batch": n_batch, "n_seq_max": n_seq_max,
               "first_token_prompt": first_token_prompt}
        self.process = subprocess.Popen([str(python), str(BENCH / "llamacpp_engine.py"), json.dumps(cfg)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        ready = self._reply()
        self.memory = {k: ready[k] for k in ("rss_load", "rss_first_token", "rss_file_first_token")}
        self.n_ctx, self.version, self.system_info = ready["n_ctx"], ready["version"], ready["system_info"]
        self.weight_bytes = sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors)
        self.kv_bytes_per_position = kv_bytes_per_position(args, 2)  # llama.cpp's default K/V type: f16

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            err = self.process.stderr.read().strip().splitlines()
            raise Unavailable(err[-1] if err else f"its process exited with status {self.process.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise Unavailable(reply["error"])
        return reply

    def _ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def prefill_ms(self, prompt: list[int]) -> float:
        return self._ask(op="prefill", prompt=prompt)["ms"]

    def decode_ms(self, prompts: list[list[int]], steps: int) -> float:
        return self._ask(op="decode", prompts=prompts, steps=steps)["ms"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def start_llamacpp(opts, ours: mistral_ext.Model, threads: int, first_token_prompt: list[int]) -> LlamaCpp:
    if opts.device != "cpu":
        raise Unavailable("it runs on the CPU only here (--device cpu)")
    gguf = gguf_path(opts.model)
    if gguf is None:
        raise Unavailable("it needs a GGUF file (--model smollm2 or a .gguf path)")
    python = opts.llamacpp_python
    if python is None or not python.is_file():
        raise Unavailable(f"no Python at {python or DEFAULT_LLAMACPP_PYTHON} (--llamacpp-python: the Python of an "
                          f"environment with llama-cpp-python)")
    # Each sequence gets n_ctx / n_seq_max cells of llama.cpp's KV cache: room for the longest run of one.
    batch = max(opts.batch_sizes)
    per_sequence = max([*opts.prompt_lengths, max(opts.contexts) + opts.decode_steps, FIRST_TOKEN_PROMPT_LENGTH + 1]) + 1
    n_ctx = batch * (-(-per_sequence // 256) * 256)
    n_batch = max([*opts.prompt_lengths, batch * max(opts.contexts), FIRST_TOKEN_PROMPT_LENGTH])
    return LlamaCpp(python, gguf, ours.args, threads, n_ctx, n_batch, batch, first_token_prompt)


RSS_CHILD = r"""
import json, sys
cfg = json.loads(sys.argv[1])
sys.path[0] = cfg["bench"]  # for `python -c` it is the working directory: import as latency.py itself does
import torch, latency
torch.set_num_threads(cfg["threads"])
dtype = cfg["dtype"] and getattr(torch, cfg["dtype"])
model = latency.load_engine_model(cfg["engine"], cfg["model"], torch.device(cfg["device"]), dtype)
load = latency.status_bytes("VmRSS")
cache = model.new_cache(1)
model.decode(model.prefill([cfg["prompt"]], cache).argmax(-1), cache)
print(json.dumps({"rss_load": load, "rss_first_token": latency.status_bytes("VmRSS"),
                  "rss_file_first_token": latency.status_bytes("RssFile"),
                  "weight_bytes": latency.weight_bytes(model.transformer), "kv_positions": cache.slots,
                  "kv_bytes": cache.nbytes()}))
"""


def resident_memory(engine: str, opts, dtype: torch.dtype | None, threads: int, prompt: list[int]) -> dict:
    """An engine of ours loaded in a fresh process: RSS after load and after the first token."""
    cfg = {"bench": str(BENCH), "engine": engine, "model": opts.model, "device": opts.device, "threads": threads,
           "dtype": dtype and str(dtype).removeprefix("torch."), "prompt": prompt}
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode != 0:
        raise Unavailable(f"its memory measurement failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------- main ----------------


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def csv_engines(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    return ["ours"] + [n for n in dict.fromkeys(names) if n != "ours"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | mistral-7b | PATH (default tiny)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="ours' dtype, every weight dense in it (default: load()'s default: quantized weights "
                             "as the checkpoint has them, float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every engine (default: torch's choice)")
    parser.add_argument("--engines", type=csv_engines, default=["ours", "reference", "hf"],
                        help=f"comma list of {', '.join(ENGINES)} (default ours,reference,hf); see above")
    parser.add_argument("--llamacpp-python", type=Path,
                        default=DEFAULT_LLAMACPP_PYTHON if DEFAULT_LLAMACPP_PYTHON.is_file() else None,
                        help=f"the Python of an environment with llama-cpp-python, for the llamacpp engine "
                             f"(default {DEFAULT_LLAMACPP_PYTHON} if it exists)")
    parser.add_argument("--prompt-lengths", type=csv_ints, default=[16, 128, 512],
                        help="prompt lengths for time to first token (default 16,128,512)")
    parser.add_argument("--contexts", type=csv_ints, default=[16, 512],
                        help="cached positions before the timed decode steps (default 16,512)")
    parser.add_argument("--batch-sizes", type=csv_ints, default=[1, 4], help="decode batch sizes (default 1,4)")
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per run (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is shown")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and one repeat (prompts of 8, context 8, batches 1 and 2, 4 steps): a "
                             "smoke run for tests")
    parser.add_argument("--generate", type=csv_ints, default=None, metavar="P,N",
                        help="also time each engine's generate end to end at batch 1: a P-token prompt, then N "
                             "greedy tokens (ours' engines stop at EOS, the others then make as many)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="ours over N processes, one shard each, started with torchrun (see above; default 1)")
    opts = parser.parse_args()
    if opts.quick:
        opts.prompt_lengths, opts.contexts, opts.batch_sizes = [8], [8], [1, 2]
        opts.decode_steps, opts.repeats, opts.warmup = 4, 1, 0
    if opts.generate is not None and (len(opts.generate) != 2 or min(opts.generate) < 1):
        parser.error("--generate takes P,N: a prompt length and a token count, each at least 1")
    return opts


def end_to_end(opts, engines: dict, prompt: list[int], timed_runs, results: dict) -> None:
    """--generate: the generate of each engine that runs in this process (not llama.cpp), from the prompt to the
    last token, timed whole. Ours runs first in each round; the engines after it make as many tokens as it made in
    that round (fewer than asked if it met EOS; at least one: the tokens column shows it)."""
    among = {name: engine for name, engine in engines.items() if hasattr(engine, "generate_ms")}
    if "ours" not in among:
        return
    made = {}

    def run(engine) -> float:
        asked = opts.generate[1] if engine is among["ours"] else max(1, made[among["ours"]])
        ms, made[engine] = engine.generate_ms(prompt, asked)
        return ms

    runs = timed_runs(run, among=among)
    ms = {name: statistics.median(t) for name, t in runs.items()}
    print(f"\ngenerate end to end (batch 1, from an empty cache: a {len(prompt)}-token prompt, then greedy tokens up to "
          f"{opts.generate[1]}; ours: mistral_ext.generate_tokens, stopping at EOS; hf: model.generate, as many tokens "
          f"as ours made)")
    print(f"{'engine':<10}{'tokens':>8}{'ms':>12}{'time/ours':>11}")
    for name, v in ms.items():
        results.setdefault("generate", []).append({"engine": name, "tokens": made[among[name]], "ms": v,
                                                   "runs_ms": runs[name]})
        print(f"{name:<10}{made[among[name]]:>8}{v:>12.4g}{v / ms['ours']:>10.3g}x")


def relaunch_under_torchrun(n: int) -> None:
    """This script again, as n ranks of torchrun (one thread each unless --threads says otherwise)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sys.exit(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                             "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, *sys.argv[1:]]).returncode)


def start_rank(opts, device: torch.device):
    """This process's rank of --tensor-parallel: the process group (gloo or NCCL), the device, a quiet stdout
    on every rank but 0. Returns the parallel.ShardGroup and the device."""
    from mistral_ext.parallel import ShardGroup, init_process_group

    device = init_process_group(device)
    group = ShardGroup()
    if group.world_size != opts.tensor_parallel:
        raise SystemExit(f"--tensor-parallel {opts.tensor_parallel} under a process group of {group.world_size}")
    if group.rank != 0:
        sys.stdout = open(os.devnull, "w")
    return group, device


def all_reduce_us(group, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, calls: int = 200) -> float:
    """Median µs of one all-reduce of an activation of `shape` (as the model makes it: fp32 sums). Zeros: summed in
    place call after call, other values would grow to inf."""
    x = torch.zeros(shape, device=device, dtype=dtype)
    times = []
    for _ in range(calls + 10):
        sync(device)
        t0 = time.perf_counter()
        group.all_reduce(x)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times[10:])


def main() -> None:
    opts = parse_args()
    if opts.tensor_parallel > 1 and "WORLD_SIZE" not in os.environ:
        relaunch_under_torchrun(opts.tensor_parallel)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    device = torch.device(opts.device)
    dtype = DTYPES[opts.dtype] if opts.dtype else None
    group, notes = None, []
    if opts.tensor_parallel > 1:
        group, device = start_rank(opts, device)
        notes.append(f"tensor parallel over {group.world_size} ranks ({torch.distributed.get_backend()}): ours alone "
                     f"({', '.join(e for e in opts.engines if e != 'ours') or 'no other engine'} and the memory "
                     f"rows need one process); GB/s: what one rank reads")
        opts.engines = ["ours"]

    ours = load_model(opts.model, device, dtype, group)
    vocab = ours.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()
    first_token_prompt = prompt(FIRST_TOKEN_PROMPT_LENGTH)
    ttft_prompts = {n: prompt(n) for n in opts.prompt_lengths}
    decode_prompts = {(b, c): [prompt(c) for _ in range(b)] for b in opts.batch_sizes for c in opts.contexts}

    memory = {}
    dense_bytes, available = parameter_count(ours.args) * 4, mem_available()
    # dense is loaded twice: in its memory measurement's process, then in this one beside ours (at most as big)
    if "dense" in opts.engines and 2 * dense_bytes > available:
        notes.append(f"dense: unavailable: its float32 weights take {dense_bytes / 1e9:.1f} GB, and twice that is "
                     f"more than the {available / 1e9:.1f} GB available")
        opts.engines.remove("dense")
    measured = [name for name in ("ours", "dense") if name in opts.engines and group is None]
    if (ours_bytes := weight_bytes(ours.transformer)) > available:
        notes.append(f"ours: no memory row: a second copy of its {ours_bytes / 1e9:.1f} GB of weights, in the "
                     f"measuring process, does not fit the {available / 1e9:.1f} GB available")
        measured.remove("ours")
    for name in measured:
        try:
            memory[name] = resident_memory(name, opts, dtype, threads, first_token_prompt)
        except Unavailable as e:
            notes.append(f"{name}: no memory row: {e}")

    engines = {"ours": Ours(ours, mistral_ext.ops)}
    if "dense" in opts.engines:
        engines["dense"] = Ours(load_engine_model("dense", opts.model, device, None), mistral_ext.ops)
    if "compiled" in opts.engines:  # the same weights, its own compiled step
        engines["compiled"] = Ours(mistral_ext.Model(ours.transformer, ours.tokenizer).compile(), mistral_ext.ops)
    if "reference" in opts.engines:
        engines["reference"] = Ours(ours, reference)
    if "hf" in opts.engines:
        try:
            engines["hf"] = HF(hf_copy(ours), ours.args)
        except Unavailable as e:
            notes.append(f"hf: unavailable: {e}")
    if "llamacpp" in opts.engines:
        try:
            engines["llamacpp"] = llama = start_llamacpp(opts, ours, threads, first_token_prompt)
            memory["llamacpp"] = {**llama.memory, "weight_bytes": llama.weight_bytes, "kv_positions": llama.n_ctx,
                                  "kv_bytes": llama.n_ctx * llama.kv_bytes_per_position}
            notes.append(f"llamacpp: llama-cpp-python {llama.version}, {llama.system_info} n_ctx {llama.n_ctx} for "
                         f"{max(opts.batch_sizes)} sequences; a decode step at batch B is one llama_decode of one "
                         f"token for each of the sequences 0..B-1")
        except Unavailable as e:
            notes.append(f"llamacpp: unavailable: {e}")

    # The read bandwidth of a shared machine drifts (25-58 GB/s within minutes on one): it is sampled between the
    # runs too, each decode run's roofline the samples around it.
    bandwidth_samples = [read_bandwidth_gbs(device)]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                       text=True).stdout.strip() or platform.machine())
    a = ours.args
    print(f"model {opts.model} | {a.n_layers} layers, dim {a.dim}, vocab {a.vocab_size} | ours: {weight_formats(ours)} "
          f"weights, {str(ours.dtype).removeprefix('torch.')} activations | {machine} | {threads} threads | "
          f"median of {opts.repeats} after {opts.warmup} warm-up")
    results = {"model": opts.model, "machine": machine, "threads": threads, "read_bandwidth_samples_gbs": bandwidth_samples,
               "engines": list(engines), "prefill": [], "decode": [], "memory": [], "notes": notes}

    def timed_runs(fn, around=None, among=None) -> dict[str, list[float]]:
        """fn(engine) --repeats times per engine (of `among`, default all), after --warmup untimed runs. The engines
        take turns, run by run, so that a burst of load from elsewhere on the machine falls on all of them alike.
        With a dict `around`, the read bandwidth is sampled between every two runs, and around[engine] gets, per
        timed run, the mean of the samples just before and just after it: what the memory gave while it ran. An
        engine that fails leaves the benchmark (or `among`), with a note."""
        pool = engines if among is None else among
        times = {name: [] for name in pool}
        before = bandwidth_samples[-1]
        for run in range(opts.warmup + opts.repeats):
            for name, engine in list(pool.items()):
                try:
                    ms = fn(engine)
                except Unavailable as e:
                    notes.append(f"{name}: stopped: {e}")
                    del pool[name], times[name]
                    continue
                if run >= opts.warmup:
                    times[name].append(ms)
                if around is not None:
                    bandwidth_samples.append(read_bandwidth_gbs(device))
                    if run >= opts.warmup:
                        around.setdefault(name, []).append((before + bandwidth_samples[-1]) / 2)
                    before = bandwidth_samples[-1]
            if around is None:
                bandwidth_samples.append(read_bandwidth_gbs(device))
                before = bandwidth_samples[-1]
        return times

    print("\ntime to first token (batch 1, from an empty cache; time/ours above 1: ours is faster)")
    print(f"{'prompt':>7} {'engine':<10}{'ms':>12}{'time/ours':>11}")
    with torch.inference_mode():
        for n, p in ttft_prompts.items():
            runs = timed_runs(lambda e: e.prefill_ms(p))
            ms = {name: statistics.median(t) for name, t in runs.items()}
            for name, v in ms.items():
                results["prefill"].append({"prompt": n, "engine": name, "ms": v, "runs_ms": runs[name]})
                print(f"{n:>7} {name:<10}{v:>12.4g}{v / ms['ours']:>10.3g}x")

        rows = []
        for (batch, ctx), prompts in decode_prompts.items():
            around: dict[str, list[float]] = {}
            runs = timed_runs(lambda e: e.decode_ms(prompts, opts.decode_steps), around)
            for name, t in runs.items():
                engine = engines[name]
                step_bytes = engine.weight_bytes + batch * (ctx + opts.decode_steps / 2) * engine.kv_bytes_per_position
                v = statistics.median(t) / opts.decode_steps
                # per run: its GB/s over the bandwidth sampled around it, then the median of those shares
                share = statistics.median(step_bytes * opts.decode_steps / ms / 1e6 / bw
                                          for ms, bw in zip(t, around[name]))
                rows.append((batch, ctx, name, v, step_bytes / v / 1e6, share))
                results["decode"].append({"batch": batch, "context": ctx, "engine": name, "ms_per_step": v,
                                          "gbs": rows[-1][4], "share_of_read_around": share, "runs_ms": t,
                                          "read_gbs_around_runs": around[name]})
        bandwidth = max(bandwidth_samples)
        print(f"\ndecode ({opts.decode_steps} greedy steps after the context is cached; GB/s = weights + K/V read "
              f"per step; % of read: of the read bandwidth sampled just before and just after each run, the median "
              f"over runs; % of best: of {bandwidth:.1f} GB/s, the best of {len(bandwidth_samples)} samples in this "
              f"run, the worst {min(bandwidth_samples):.1f})")
        print(f"{'batch':>5} {'context':>7} {'engine':<10}{'ms/step':>10}{'tok/s':>10}{'time/ours':>11}{'GB/s':>9}"
              f"{'% of read':>11}{'% of best':>11}")
        ours_ms = {(batch, ctx): v for batch, ctx, name, v, _, _ in rows if name == "ours"}
        for batch, ctx, name, v, gbs, share in rows:
            print(f"{batch:>5} {ctx:>7} {name:<10}{v:>10.4g}{batch * 1e3 / v:>10.4g}{v / ours_ms[batch, ctx]:>10.3g}x"
                  f"{gbs:>9.4g}{100 * share:>10.3g}%{100 * gbs / bandwidth:>10.3g}%")
        if opts.generate:
            end_to_end(opts, engines, prompt(opts.generate[0]), timed_runs, results)
    if group is not None:
        print(f"\nall-reduce ({torch.distributed.get_backend()}, {group.world_size} ranks) of one decode step's "
              f"activations [batch, {a.dim}], 2 per layer: {2 * a.n_layers} per step")
        print(f"{'batch':>5}{'us':>10}{'ms/step':>10}")
        for batch in opts.batch_sizes:
            us = all_reduce_us(group, (batch, a.dim), ours.dtype, device)
            results.setdefault("all_reduce", []).append({"batch": batch, "us": us})
            print(f"{batch:>5}{us:>10.4g}{2 * a.n_layers * us / 1e3:>10.4g}")
    if "llamacpp" in engines:
        engines["llamacpp"].close()

    print(f"\nresident memory (VmRSS of a fresh process per engine: after the load, and after a {FIRST_TOKEN_PROMPT_LENGTH}-"
          f"token prompt and one decode step; KV: the cache it allocates, ours for batch 1, llama.cpp its context's)")
    print(f"{'engine':<10}{'load MB':>10}{'first token MB':>16}{'file-backed MB':>16}{'weights MB':>12}"
          f"{'KV positions':>14}{'KV MB':>9}")
    for name, m in memory.items():
        results["memory"].append({"engine": name, **m})
        print(f"{name:<10}{m['rss_load'] / 1e6:>10.1f}{m['rss_first_token'] / 1e6:>16.1f}"
              f"{m['rss_file_first_token'] / 1e6:>16.1f}"
              f"{m['weight_bytes'] / 1e6:>12.1f}{m['kv_positions']:>14}{m['kv_bytes'] / 1e6:>9.1f}")
    if notes:
        print("\n" + "\n".join(notes))
    if opts.json and (group is None or group.rank == 0):
        opts.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
