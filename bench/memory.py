"""KV-cache memory against sequence length: the rolling buffer (W slots) against a full cache (one slot per
position), at Mistral 7B's cache dimensions (8 KV heads x head_dim 128 per layer, bf16), measured, not computed.

Each configuration runs in a fresh process: it allocates the cache, then generates a sequence of N tokens (prefill
in pieces of W tokens, then a few decode steps), sampling after every piece two figures:

- "KV bytes": the bytes of tensor storage the cache's K/V tensors hold (each storage counted once). Deterministic:
  "full/rolling" is their ratio (N/W once N > W), and "flat" says whether the rolling cache's storage stayed the
  same at every sample once the ring was full, and the same as at the first N: it does not grow with N.
- the process's memory (CPU: resident set, "RSS"; CUDA: memory allocated, "alloc"): "rise" over the whole
  generation and "peak" rise. These move with allocator arenas, thread pools and the machine: for reading, not
  for checking. Both configurations run the same pieces, so activations weigh the same in both.

The paper claims 8x less cache memory at 32K tokens (W = 4096). Only the cache dimensions are Mistral 7B's: the
model has few query heads and a narrow MLP, so the run is short.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from mistral_ext import ModelArgs
from mistral_ext.checkpoint import new_transformer, parameter_slots
from mistral_ext.engine import from_weights

cfg = json.loads(sys.argv[1])
device = torch.device(cfg["device"])
window = cfg["window"] if cfg["rolling"] else None
args = ModelArgs(dim=1024, n_layers=cfg["layers"], head_dim=128, hidden_dim=1024, n_heads=8, n_kv_heads=8,
                 vocab_size=256, sliding_window=window, max_seq_len=cfg["length"])
g = torch.Generator().manual_seed(0)
weights = {}
meta = new_transformer(args, torch.device("meta"), torch.float32)
for name, view in parameter_slots(meta).items():
    shape = view.shape
    weights[name] = (torch.randn(shape, generator=g) * 0.05) if len(shape) == 2 else torch.ones(shape)
model = from_weights(args, weights, device=device, dtype=getattr(torch, cfg["dtype"]))
del weights

def used():
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

def kv_bytes(cache):
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.k + cache.v}.values())

base = used()
cache = model.new_cache(1)
samples, kv_samples, peak = [], [], used()
tokens = torch.randint(0, 256, (cfg["length"],), generator=g).tolist()
piece = cfg["window"]
for start in range(0, cfg["length"] - 8, piece):
    logits = model.prefill([tokens[start : min(start + piece, cfg["length"] - 8)]], cache)
    samples.append(used() - base)
    kv_samples.append(kv_bytes(cache))
    peak = max(peak, used())
for _ in range(8):
    logits = model.decode(logits.argmax(-1), cache)
samples.append(used() - base)
kv_samples.append(kv_bytes(cache))
if device.type == "cuda":
    peak = torch.cuda.max_memory_allocated(device)
peak = max(peak, used())
print(json.dumps({"end": samples[-1], "peak": peak - base, "kv_samples": kv_samples}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="cache dtype (default bfloat16)")
    parser.add_argument("--lengths", default="4096,8192,16384,32768", help="sequence lengths N (comma list)")
    parser.add_argument("--window", type=int, default=4096, help="sliding window W (default 4096)")
    parser.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run for tests)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        lengths, args.window, args.layers = [256, 512], 128, 1
    print(f"KV cache at 8 KV heads x 128, {args.layers} layer(s), {args.dtype}, W = {args.window}, on {args.device}")
    used = "alloc" if args.device.startswith("cuda") else "RSS"
    print(f"{'N':>7}{'rolling KV bytes':>18}{'full KV bytes':>15}{'full/rolling':>14}{'rolling flat':>14}"
          f"{'rolling ' + used + ' MB':>16}{'full ' + used + ' MB':>13}{'rolling peak MB':>17}{'full peak MB':>14}")
    first_roll_kv = None
    for n in lengths:
        row = {}
        for rolling in (True, False):
            cfg = {"device": args.device, "dtype": args.dtype, "window": args.window, "layers": args.layers,
                   "length": n, "rolling": rolling}
            # A fixed mmap threshold: freed temporaries go back to the OS at once, so the resident set is live memory.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                                 env=env)
            if out.returncode != 0:
                sys.exit(f"memory.py: the measurement failed:\n{out.stderr}")
            row[rolling] = json.loads(out.stdout.strip().splitlines()[-1])
        roll, full = row[True], row[False]
        roll_kv, full_kv = roll["kv_samples"][-1], full["kv_samples"][-1]
        first_roll_kv = first_roll_kv or roll_kv
        flat = set(roll["kv_samples"][1:]) == {first_roll_kv}  # after the first piece of W tokens the ring is full
        mb = lambda b: b / 1e6
        print(f"{n:>7}{roll_kv:>18}{full_kv:>15}{full_kv / roll_kv:>13.2f}x{'yes' if flat else 'NO':>14}"
              f"{mb(roll['end']):>16.1f}{mb(full['end']):>13.1f}{mb(roll['peak']):>17.1f}{mb(full['peak']):>14.1f}")


if __name__ == "__main__":
    main()
