"""Plain quantizers for the K-quant formats (Q4_K, Q5_K, Q6_K), which the `gguf` package can read but not write.
Simple rounding, not llama.cpp's search: enough to make valid files whose error bound is known. The bit layouts
follow ggml's block_q4_K / block_q5_K / block_q6_K (super-blocks of 256 values)."""

import numpy as np

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], 2)


def _pack_scales_6bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit minimums per super-block into 12 bytes (ggml's get_scale_min_k4 layout)."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _scales_and_mins(x: np.ndarray, levels: int):
    """Per 32-value sub-block: value ~= d * sc * q - dmin * m, q in [0, levels], sc and m 6-bit."""
    sub = x.reshape(x.shape[0], 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / levels
    d = np.maximum(scale.max(-1), 1e-12) / 63
    dmin = np.maximum((-lo).max(-1), 1e-12) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.ceil(scale / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.ceil(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc
    offset = dmin[:, None] * m
    q = np.clip(np.rint((sub + offset[..., None]) / step[..., None]), 0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, QK_K).astype(np.float32)
    d, dmin, sc, m, q = _scales_and_mins(x, 15)
    q = q.reshape(-1, 4, 2, 32)  # value 64 g + 32 s + p is nibble s of byte 32 g + p
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16(d), _f16(dmin), _pack_scales_6bit(sc, m), qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, QK_K).astype(np.float32)
    d, dmin, sc, m, q = _scales_and_mins(x, 31)
    low, high = q & 0x0F, q >> 4
    low = low.reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = high.reshape(-1, 8, 32)  # bit k of byte p holds the high bit of value 32 k + p
    qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for k in range(8):
        qh |= (high[:, k] << k).astype(np.uint8)
    return np.concatenate([_f16(d), _f16(dmin), _pack_scales_6bit(sc, m), qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, QK_K).astype(np.float32)
    sub = x.reshape(x.shape[0], 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = (np.maximum(scale.max(-1), 1e-12) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.ceil(scale / d[:, None]), 1, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.clip(np.rint(sub / step[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, QK_K)
    low, high = q & 0x0F, q >> 4
    low = low.reshape(-1, 2, 2, 64)  # value 128 h + 64 s + p is nibble s of byte 64 h + p
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = high.reshape(-1, 2, 4, 32)  # value 128 h + 32 k + p is bits 2k, 2k+1 of byte 32 h + p
    qh = np.zeros((x.shape[0], 2, 32), dtype=np.uint8)
    for k in range(4):
        qh |= (high[:, :, k] << (2 * k)).astype(np.uint8)
    return np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), _f16(d)], axis=1)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def error_bound(x: np.ndarray, qtype: str) -> np.ndarray:
    """Per-value bound for the quantizers above: half a step of the sub-block, plus the rounding of the minimum."""
    rows = x.reshape(-1, QK_K).astype(np.float64)
    if qtype == "Q6_K":
        sub = rows.reshape(rows.shape[0], 16, 16)
        amax = np.abs(sub).max(-1)
        d = amax.max(-1) / 127 / 31
        bound = 0.5 * (amax / 31 + 1.01 * d[:, None]) * 1.01
        return np.repeat(bound, 16, axis=1).reshape(x.shape)
    levels = 15 if qtype == "Q4_K" else 31
    sub = rows.reshape(rows.shape[0], 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / levels
    d = scale.max(-1) / 63
    dmin = (-lo).max(-1) / 63
    bound = (0.5 * (scale + 1.01 * d[:, None]) + 1.01 * dmin[:, None]) * 1.01
    return np.repeat(bound, 32, axis=1).reshape(x.shape)
