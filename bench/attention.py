"""Sliding-window attention against full causal attention, measured side by side in one run.

Prefill: one sequence of N tokens attends causally to itself, with window W (our kernel), without a window (our
kernel, window=None), and with torch's scaled_dot_product_attention (is_causal, GQA). Throughput counts only the
pairs each kernel must compute (window-aware: sum over queries of min(i + 1, W)), so the windowed and full rows
are comparable; the paper claims a 2x speed-up of windowed over full attention at 16K tokens.

Decode: one query per sequence against a full ring of W slots (ours: GQA-packed, each K/V row read once per group)
and against the same keys with scaled_dot_product_attention; GB/s = K/V bytes read per step / time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mistral_ext import ops


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pairs(n: int, window: int | None) -> int:
    return sum(min(i + 1, window or n) for i in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="prefill lengths N (comma list)")
    parser.add_argument("--window", type=int, default=4096, help="sliding window W (default 4096, Mistral 7B's)")
    parser.add_argument("--heads", type=int, default=None,
                        help="query heads (default 32 on CUDA as Mistral 7B; 8 on CPU to keep runs short)")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (default heads / 4, GQA as Mistral 7B)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is shown (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--no-sdpa", action="store_true", help="skip torch's scaled_dot_product_attention rows")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run for tests)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    heads = args.heads or (32 if device.type == "cuda" else 8)
    kv_heads = args.kv_heads or max(1, heads // 4)
    d, window = args.head_dim, args.window
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        lengths, window, args.repeats, args.warmup = [96, 200], 64, 1, 0
    print(f"{str(dtype).removeprefix('torch.')} on {device} | {torch.get_num_threads()} threads | {heads} query heads, "
          f"{kv_heads} KV heads, head_dim {d} | W = {window} | median of {args.repeats}")

    print(f"\nprefill{'N':>8}{'window ms':>12}{'full ms':>12}{'full/window':>13}{'window TFLOP/s':>16}"
          f"{'full TFLOP/s':>14}" + ("" if args.no_sdpa else f"{'sdpa full ms':>14}{'sdpa/window':>13}"))
    for n in lengths:
        q = torch.randn(n, heads, d, dtype=dtype, device=device)
        k = torch.randn(n, kv_heads, d, dtype=dtype, device=device)
        v = torch.randn(n, kv_heads, d, dtype=dtype, device=device)
        ring = torch.zeros(1, window, kv_heads, d, dtype=dtype, device=device)
        meta = (torch.tensor([n], device=device), torch.tensor([0], device=device))
        w_ms = median_ms(lambda: ops.attention_prefill(q, k, v, ring, ring, *meta, window), device, args.repeats,
                         args.warmup)
        f_ms = median_ms(lambda: ops.attention_prefill(q, k, v, ring, ring, *meta, None), device, args.repeats,
                         args.warmup)
        flop = 4 * d * heads
        row = (f"{n:>15}{w_ms:>12.4g}{f_ms:>12.4g}{f_ms / w_ms:>12.3g}x{flop * pairs(n, window) / w_ms / 1e9:>16.4g}"
               f"{flop * pairs(n, None) / f_ms / 1e9:>14.4g}")
        if not args.no_sdpa:
            qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))
            s_ms = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
                             device, args.repeats, args.warmup)
            row += f"{s_ms:>14.4g}{s_ms / w_ms:>12.3g}x"
        print(row)

    print(f"\ndecode{'ring':>9}{'ours ms':>12}{'ours GB/s':>12}" + ("" if args.no_sdpa else f"{'sdpa ms':>12}{'sdpa GB/s':>12}"))
    dec_heads, dec_kv = (32, 8) if not args.quick else (8, 2)
    ring_k = torch.randn(1, window, dec_kv, d, dtype=dtype, device=device)
    ring_v = torch.randn(1, window, dec_kv, d, dtype=dtype, device=device)
    q = torch.randn(1, dec_heads, d, dtype=dtype, device=device)
    pos = torch.tensor([3 * window + 5], device=device)
    kv_bytes = 2 * ring_k.numel() * ring_k.element_size()
    o_ms = median_ms(lambda: ops.attention_decode(q, ring_k, ring_v, pos, window), device, 5 * args.repeats,
                     args.warmup)
    row = f"{window:>15}{o_ms:>12.4g}{kv_bytes / o_ms / 1e6:>12.4g}"
    if not args.no_sdpa:
        qt, kt, vt = q[:, :, None], ring_k[0].transpose(0, 1)[None], ring_v[0].transpose(0, 1)[None]
        s_ms = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), device,
                         5 * args.repeats, args.warmup)
        row += f"{s_ms:>12.4g}{kv_bytes / s_ms / 1e6:>12.4g}"
    print(row)


if __name__ == "__main__":
    main()
