"""Per-op timing: each mistral_ext kernel against its plain-PyTorch reference, at Mistral-7B layer shapes.

Prints the median of repeated runs after warm-up, both measured in this run on this machine, and the kernel's rate:
GB/s (bytes its inputs and outputs occupy / time) for memory-bound ops, GFLOP/s for prefill attention and prefill
GEMMs. The dense_linear and quant_linear rows compare against torch's dense matmul on the same weights in the
activation dtype, the baseline they replace, and count the weight bytes as stored.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import mistral_ext
from mistral_ext import ops, quant, reference
from mistral_ext.model import step_layout


def median_ms(fn, repeats: int, warmup: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(dtype: torch.dtype, quick: bool, device: torch.device):
    """(name, kernel call, reference call, work, unit): work is bytes touched (GB/s) or flops (GFLOP/s).
    Shapes: Mistral 7B, one layer. Index tensors stay on the host, as the engine keeps them."""
    hq, hkv, d, dim, hidden, window = 32, 8, 128, 4096, 14336, 4096
    if quick:
        dim, hidden, window = 512, 1024, 256
    r = lambda *s: torch.randn(*s, dtype=dtype, device=device)
    prefill_t = 64 if quick else 256

    for t in (1, prefill_t):
        x, res, w = r(t, dim), r(t, dim), r(dim)
        yield (f"rms_norm T={t}", lambda: ops.rms_norm(x, res, w, 1e-5),
               lambda: reference.rms_norm(x, res, w, 1e-5), nbytes(x, res, w) + 2 * nbytes(x), "GB/s")
        gu = r(t, 2 * hidden)
        yield (f"silu_mul T={t}", lambda: ops.silu_mul(gu), lambda: reference.silu_mul(gu), nbytes(gu) * 3 // 2, "GB/s")
        q, k = r(t, hq, d), r(t, hkv, d)
        pos = torch.arange(5000, 5000 + t)
        yield (f"rope T={t}", lambda: ops.rope(q, k, pos, 1e4), lambda: reference.rope(q, k, pos, 1e4),
               2 * nbytes(q, k), "GB/s")
        v = r(t, hkv, d)
        kc, vc = r(1, window, hkv, d), r(1, window, hkv, d)
        meta = step_layout(torch.tensor([t]), torch.tensor([5000]), window)
        yield (f"rope_cache_write T={t}", lambda: ops.rope_cache_write(q, k, v, kc, vc, *meta, 1e4),
               lambda: reference.rope_cache_write(q, k, v, kc, vc, *meta, 1e4), 2 * nbytes(q) + 2 * nbytes(k, v), "GB/s")

    w1 = torch.randn(hidden, dim) * 0.02  # the baseline is torch's dense matmul
    dense = w1.to(device, dtype)
    for stored_dtype in (torch.float32, torch.bfloat16):
        stored = w1.to(device, stored_dtype)
        for t in (1, 4, prefill_t):
            xd = r(t, dim)
            work, unit = (nbytes(stored), "GB/s") if t < prefill_t else (2 * t * hidden * dim, "GFLOP/s")
            yield (f"dense_linear {str(stored_dtype).removeprefix('torch.')} T={t}",
                   lambda: ops.dense_linear(xd, stored), lambda: xd @ dense.T, work, unit)
    for fmt in ("q4_0", "q4_1", "q8_0"):
        qw = quant.QuantizedWeight.quantize(w1, fmt).to(device)
        for t in (1, 4):
            xq = r(t, dim)
            yield (f"quant_linear {fmt} T={t}",
                   lambda: ops.quant_linear(xq, qw.qweight, qw.scales, qw.mins), lambda: xq @ dense.T,
                   qw.nbytes(), "GB/s")
    kc, vc = r(1, window, hkv, d), r(1, window, hkv, d)
    q = r(1, hq, d)
    pos = torch.tensor([3 * window + 17])
    yield (f"attention_decode ring={window}", lambda: ops.attention_decode(q, kc, vc, pos, window),
           lambda: reference.attention_decode(q, kc, vc, pos, window), nbytes(kc, vc) + 2 * nbytes(q), "GB/s")
    q, k, v = r(prefill_t, hq, d), r(prefill_t, hkv, d), r(prefill_t, hkv, d)
    meta = (torch.tensor([prefill_t]), torch.tensor([window // 2]))
    yield (f"attention_prefill T={prefill_t} after {window // 2}",
           lambda: ops.attention_prefill(q, k, v, kc, vc, *meta, window),
           lambda: reference.attention_prefill(q, k, v, kc, vc, *meta, window),
           4 * hq * d * sum(window // 2 + t + 1 for t in range(prefill_t)), "GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="activation dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per op; the median is printed")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run for tests)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)

    info = mistral_ext.build_info()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"mistral_ext {info['version']} | torch {torch.__version__} | {where}"
          f" | {torch.get_num_threads()} threads | {args.dtype} | median of {args.repeats} after {args.warmup} warm-up")
    header = f"{'op':<36} {'kernel ms':>10} {'reference ms':>13} {'speed-up':>9} {'kernel rate':>16}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for name, kernel, ref, work, unit in cases(dtype, args.quick, device):
            k_ms = median_ms(kernel, args.repeats, args.warmup, device)
            r_ms = median_ms(ref, args.repeats, args.warmup, device)
            rate = f"{work / k_ms / 1e6:.4g} {unit}"
            print(f"{name:<36} {k_ms:>10.4g} {r_ms:>13.4g} {r_ms / k_ms:>8.3g}x {rate:>16}")


if __name__ == "__main__":
    main()
