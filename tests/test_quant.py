"""Quantized weights: the formats (mistral_ext.quant) and the ops quant_linear / quant_embedding on every CPU code
path and on the CUDA kernels (emulated, and on a GPU when present), against the spec (dequantize, then multiply in
float64) with bounds derived from what the kernels round. The CPU kernels round the activations to int8, the CUDA
ones keep them in float: each has its own bound."""

import math

import pytest
import torch

from mistral_ext import ops, quant, reference
from conftest import DTYPES, LOW_PRECISION, half_ulp, misaligned, ops_and_device

SHAPES = [(37, 96), (130, 544), (1, 32), (300, 64)]  # (N, K): N off every row tile, K = 1..17 blocks
TOKENS = [1, 2, 7, 8, 9, 64, 300]
U = 2.0**-24  # float32 unit roundoff


def random_weight(n, k, fmt):
    """A quantized matrix whose rows and blocks have different scales (so a mixed-up scale shows)."""
    w = torch.randn(n, k) * (torch.rand(n, 1) + 0.1) * (torch.rand(1, k // 32) + 0.1).repeat_interleave(32, 1) * 3
    return quant.QuantizedWeight.quantize(w, fmt)


def quantized_activations(x):
    """The kernels' int8 activations in float64: per block of 32, d = max|x| / 127 and q = round-half-even(x / d)."""
    t, k = x.shape
    xb = x.float().reshape(t, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # a tensor divided by a tensor: a scalar / tensor is computed as scalar * reciprocal, rounded twice
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros(()))
    q = torch.round(xb * inv)  # torch.round rounds half to even, like the kernels' nearbyint
    return q.double(), (amax / 127.0).double()


def bounds(x, qw):
    """Per output element: (the error int8 activations may cause, the float32 accumulation slack).

    Each activation is off by at most d_x / 2 after rounding, so |y - y_exact| <= sum |w| d_x / 2. The kernel sums
    each block exactly in integers (q4_0's offset -8 sum x included) and then accumulates blocks in float32: a
    relative error of at most (blocks + 4) u per term, bounded by (blocks + 4) u sum |w| |x^|; q4_1 adds its
    minimum term m d_x sum q_x apart from d q x, whose magnitudes are at most |m| |x^| and (|w| + |m|) |x^|."""
    w = qw.dequantize(torch.float64)
    q, d = quantized_activations(x)
    t, k = x.shape
    half_step = (d / 2).expand(t, k // 32, 32).reshape(t, k)
    x_hat = (q * d).reshape(t, k)
    blocks = k // 32
    return half_step @ w.abs().T, (blocks + 4) * U * 2 * (x_hat.abs() @ term_magnitudes(qw).T)


def term_magnitudes(qw):
    """Per weight, what a product's terms in the kernels can reach per unit of |x|: |w|, and for q4_1, whose d q
    and m terms are summed apart, |w| + 2 |m| (as |d q| <= |w| + |m|)."""
    terms = qw.dequantize(torch.float64).abs()
    if qw.format == "q4_1":
        mins = quant.deinterleave(*qw.tensors())[2]
        terms = terms + 2 * mins.double().abs().repeat_interleave(32, 1)
    return terms


def random_call(kernels, fmt, shape, tokens):
    """quant_linear on a random weight and activations of unequal scales per token: (weight, x, y, the exact
    product of x with the dequantized weight, in float64)."""
    n, k = shape
    qw = random_weight(n, k, fmt)
    x = torch.randn(tokens, k) * torch.rand(tokens, 1) * 4
    y = kernels.quant_linear(x, qw.qweight, qw.scales, qw.mins)
    assert y.shape == (tokens, n) and y.dtype == torch.float32
    return qw, x, y, reference.quant_linear(x.double(), qw.qweight, qw.scales, qw.mins)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tokens", TOKENS)
def test_quant_linear(cpu_kernels, fmt, shape, tokens):
    qw, x, y, exact = random_call(cpu_kernels, fmt, shape, tokens)
    rounding, slack = bounds(x, qw)
    err = (y.double() - exact).abs()
    assert (err <= rounding + slack).all(), f"max excess {(err - rounding - slack).max():.3g}"
    # The integer part exactly: against the same products with the kernels' own int8 activations.
    q, d = quantized_activations(x)
    same_inputs = reference.quant_linear((q * d).reshape(x.shape), qw.qweight, qw.scales, qw.mins)
    err = (y.double() - same_inputs).abs()
    assert (err <= slack).all(), f"{fmt}: {err.max():.3g} off the int8-activation result (slack {slack.max():.3g})"


def float_activation_bound(x, qw):
    """Per output element, the error the CUDA kernel may make: it keeps x in float (no int8 rounding) and accumulates
    in float32, so it differs from the exact product of the dequantized weights by rounding alone.

    A block of 128 threads serves a group of 8 rows. Each thread reads one 4-byte chunk of 4 rows per block of 32
    weights (4 values of a row in q8_0, 8 in q4), in every 8th (q8_0) or 16th (q4) block. Each rounding moves a sum by
    at most u times its magnitude, at most the sum of the |terms| it holds, the terms being |d q x| and, for q4_1,
    |m x|; as |d q| <= |w| + |m|, both are within (|w| + 2 |m|) |x|. A term goes through at most
    - 8 roundings in its chunk's dot product p (one product, then one fmaf per value; q4_1's sum of x: 7 adds),
    - 2 per block that the thread adds after it (fmaf(d, p, acc), and fmaf(m, sum x, acc) for q4_1), over at most
      ceil(blocks / 8) blocks,
    - 6 in the tree that adds the 64 partials of a row (those of the threads reading its 4 rows),
    - 1 in the reference itself for q4_1, whose weight d q + m is rounded to float32 (q8_0's and q4_0's d q are
      exact in float32: 11 bits of fp16 mantissa times at most 8 bits),
    and 1 covers the second-order terms: |y - exact| <= (16 + 2 ceil(blocks / 8)) u sum (|w| + 2 |m|) |x|."""
    roundings = 16 + 2 * math.ceil(x.shape[1] / 32 / 8)
    return roundings * U * (x.double().abs() @ term_magnitudes(qw).T)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tokens", TOKENS)
def test_quant_linear_float_activations(gpu_kernels, fmt, shape, tokens):
    qw, x, y, exact = random_call(gpu_kernels, fmt, shape, tokens)
    bound = float_activation_bound(x, qw)
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g} (bound up to {bound.max():.3g})"


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_quant_linear_float_activations_low_precision(gpu_kernels, dtype, fmt, tokens):
    """bf16/fp16 activations convert to float exactly: the same bound plus the output's rounding to that dtype (half
    an ulp of |y|, at most u_dtype (|exact| + bound))."""
    qw = random_weight(70, 544, fmt)
    x = (torch.randn(tokens, 544) * 3).to(dtype)
    y = gpu_kernels.quant_linear(x, qw.qweight, qw.scales, qw.mins)
    assert y.shape == (tokens, 70) and y.dtype == dtype
    exact = reference.quant_linear(x.double(), qw.qweight, qw.scales, qw.mins)
    bound = float_activation_bound(x, qw)
    bound = bound + half_ulp(dtype, exact.abs() + bound)
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quant_linear_low_precision_activations(cpu_kernels, dtype, fmt):
    """bf16/fp16 activations: the same bound plus the output's rounding to that dtype (half an ulp of |y|)."""
    qw = random_weight(70, 160, fmt)
    x = (torch.randn(9, 160) * 3).to(dtype)
    y = cpu_kernels.quant_linear(x, qw.qweight, qw.scales, qw.mins)
    assert y.dtype == dtype
    exact = reference.quant_linear(x.double(), qw.qweight, qw.scales, qw.mins)
    rounding, slack = bounds(x.float(), qw)
    out_rounding = half_ulp(dtype, exact.abs() + rounding + slack)
    assert ((y.double() - exact).abs() <= rounding + slack + out_rounding).all()


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_a_row_does_not_depend_on_the_call(kernels, fmt):
    """Row t of a 300-token call equals a 1-token call of that row, and a permutation of the rows permutes the
    output, bit for bit (serving returns the same tokens for a request alone or among others)."""
    qw = random_weight(130, 544, fmt)
    x = torch.randn(300, 544)
    y = kernels.quant_linear(x, qw.qweight, qw.scales, qw.mins)
    for t in (0, 1, 150, 299):
        assert torch.equal(kernels.quant_linear(x[t : t + 1], qw.qweight, qw.scales, qw.mins), y[t : t + 1])
    order = torch.randperm(300)
    assert torch.equal(kernels.quant_linear(x[order], qw.qweight, qw.scales, qw.mins), y[order])
    assert torch.equal(kernels.quant_linear(x[:7], qw.qweight, qw.scales, qw.mins), y[:7])


def test_empty_calls(kernels):
    qw = random_weight(5, 64, "q4_1")
    assert kernels.quant_linear(torch.randn(0, 64), qw.qweight, qw.scales, qw.mins).shape == (0, 5)
    ids = torch.zeros(0, dtype=torch.long)
    assert kernels.quant_embedding(ids, qw.qweight, qw.scales, qw.mins, torch.float32).shape == (0, 64)
    no_k = torch.zeros(5, 0, dtype=torch.int8), torch.zeros(5, 0, dtype=torch.float16), None
    assert torch.equal(kernels.quant_linear(torch.randn(3, 0), *no_k), torch.zeros(3, 5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quant_embedding_is_the_dequantized_rows(kernels, fmt, dtype):
    qw = random_weight(300, 96, fmt)
    ids = torch.randint(0, 300, (50,))
    ids[:2] = torch.tensor([0, 299])
    out = kernels.quant_embedding(ids, qw.qweight, qw.scales, qw.mins, dtype)
    assert torch.equal(out, qw.dequantize(torch.float32)[ids].to(dtype))
    with pytest.raises(ValueError, match=r"token id 300 \(at 1\) is outside the vocabulary \[0, 300\)"):
        kernels.quant_embedding(torch.tensor([4, 300]), qw.qweight, qw.scales, qw.mins, dtype)
    with pytest.raises(ValueError, match="token id -1"):
        kernels.quant_embedding(torch.tensor([-1]), qw.qweight, qw.scales, qw.mins, dtype)


# ---------------- the formats ----------------


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_error_is_within_half_a_step(fmt):
    """Each weight is within half a quantization step of its value, plus what the fp16 scale (and minimum) rounding
    moves it: a step d is stored to 11 bits, so a value q d (|q| <= 127, or <= 15) moves by <= |q| d 2^-11.
    q4_0 maps the largest magnitude to -8, so its other end (+8 d) is clamped to 7 d: up to one whole step there."""
    w = torch.randn(64, 256) * torch.rand(64, 1) * 5
    qw = quant.QuantizedWeight.quantize(w, fmt)
    err = (qw.dequantize(torch.float64) - w.double()).abs().reshape(64, 8, 32)
    _, scales, mins = quant.deinterleave(*qw.tensors())
    d = scales.double().abs()[:, :, None]  # q4_0 scales carry the sign of the extreme
    levels = {"q8_0": 127, "q4_0": 8, "q4_1": 15}[fmt]
    step = {"q8_0": 0.5, "q4_0": 1.0, "q4_1": 0.5}[fmt]
    allowed = d * (step + levels * 2.0**-11) + 1e-6 * w.abs().max()
    if fmt == "q4_1":
        allowed = allowed + mins.double().abs()[:, :, None] * 2.0**-11
    assert (err <= allowed).all(), f"max excess {(err - allowed).max():.3g}"


def test_quantize_keeps_gguf_rules():
    """Hand-worked blocks: q8_0 maps the largest magnitude to +-127; q4_0 maps it to -8 keeping its sign; q4_1 maps
    the minimum to 0 and the maximum to 15."""
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([2.0, -4.0, 1.0, 0.5])
    q8, d8, _ = quant.quantize(x, "q8_0")
    assert d8.item() == pytest.approx(4 / 127, rel=1e-3) and q8[0, :4].tolist() == [64, -127, 32, 16]
    q4, d4, _ = quant.quantize(x, "q4_0")
    assert d4.item() == 0.5  # -4 / -8
    values = quant._unpack_nibbles(q4)[0, :4].tolist()
    assert values == [12, 0, 10, 9]  # round(x / 0.5) + 8: 12, 0, 10, 9
    q41, d41, m41 = quant.quantize(x, "q4_1")
    assert m41.item() == -4.0 and d41.item() == pytest.approx(6 / 15, rel=1e-3)
    assert quant._unpack_nibbles(q41)[0, :2].tolist() == [15, 0]


def test_nibble_order_is_ggufs():
    """Element j < 16 of a block is the low nibble of byte j, element j >= 16 the high nibble of byte j - 16."""
    values = torch.arange(32).remainder(16).reshape(1, 32)
    packed = quant._pack_nibbles(values)
    assert packed[0, 0].item() == 0 | (0 << 4) and packed[0, 1].item() == 1 | (1 << 4)
    values = torch.tensor([[j % 16 if j < 16 else 15 - j % 16 for j in range(32)]])
    packed = quant._pack_nibbles(values)
    assert [b & 0xF for b in packed[0].tolist()] == list(range(16))
    assert [b >> 4 for b in packed[0].tolist()] == [15 - j for j in range(16)]
    assert torch.equal(quant._unpack_nibbles(packed), values.to(torch.uint8))


def test_layout_interleaves_rows_as_documented():
    """mistral_ext.quant's worked example (N = 3, K = 64, q4_0: one group of 3 rows, 2 blocks of 4 chunks), by
    hand: qweight holds row 0's bytes 0-3, row 1's, row 2's, then row 0's bytes 4-7, ...; scales block by block."""
    rows = torch.arange(3 * 32, dtype=torch.uint8).reshape(3, 32)  # byte j of row r is 32 r + j
    scales = torch.arange(6, dtype=torch.float16).reshape(3, 2)
    qweight, grouped, _ = quant.interleave(rows, scales, None)
    expected = [32 * r + 4 * chunk + i for chunk in range(8) for r in range(3) for i in range(4)]
    assert qweight.flatten().tolist() == expected
    assert grouped.flatten().tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 24])
def test_interleave_round_trips_and_groups_are_weights_of_their_own(fmt, n):
    """deinterleave inverts interleave; whole groups of the layout (rows 8g..) sliced with rows() are the weight of
    those rows: the same dequantized floats and, through the kernel, the same outputs bit for bit. A slice that
    splits a group is refused."""
    w = torch.randn(n, 96)
    qw = quant.QuantizedWeight.quantize(w, fmt)
    rows = quant._quantize_rows(w, fmt)
    for mine, theirs in zip(quant.deinterleave(*qw.tensors()), rows):
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)
    assert torch.equal(qw.dequantize(), quant.dequantize_rows(*rows))
    x = torch.randn(3, 96)
    y = ops.quant_linear(x, *qw.tensors())
    for start in range(0, n, 8):
        stop = min(n, start + 8)
        part = qw.rows(start, stop)
        assert torch.equal(part.dequantize(), qw.dequantize()[start:stop])
        assert torch.equal(ops.quant_linear(x, *part.tensors()), y[:, start:stop])
    if n > 8:
        with pytest.raises(ValueError, match="not whole groups of 8 rows"):
            qw.rows(1, n)


def test_unknown_format_and_bad_k():
    with pytest.raises(ValueError, match="one of q8_0, q4_0, q4_1, got 'q3'"):
        quant.quantize(torch.randn(4, 32), "q3")
    with pytest.raises(ValueError, match="K = 40 is not a multiple of 32"):
        quant.quantize(torch.randn(4, 40), "q8_0")


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_misaligned_inputs_give_the_same_result(kernels, fmt):
    """Every tensor of a call starting one element past its allocation gives the aligned call's output bit for bit.
    The CPU kernels load unaligned; the CUDA quant_linear reads qweight with 16-byte loads only when it is aligned and
    otherwise takes a scalar path with the same arithmetic (the emulator's launch record shows which one ran)."""
    ops_ns, device = ops_and_device(kernels)
    qw = random_weight(43, 96, fmt)  # 5 whole groups and 3 rows
    x, ids = torch.randn(5, 96), torch.tensor([42, 0, 17])
    aligned = [None if t is None else t.to(device) for t in (x, *qw.tensors())]
    shifted = [None if t is None else misaligned(t) for t in aligned]
    emulated = ops_ns is torch.ops.mistral_ext_emu
    if emulated:
        import mistral_ext._emu as emu

        emu.take_launches()
    expected = ops_ns.quant_linear(*aligned)
    got = ops_ns.quant_linear(*shifted)
    if emulated:
        assert [launch["kernel"] for launch in emu.take_launches()] == [
            "quant_linear_kernel<T, F, true>", "quant_linear_kernel<T, F, false>"]
    assert torch.equal(got, expected)
    rows = ops_ns.quant_embedding(misaligned(ids.to(device)), *shifted[1:], torch.float32)
    assert torch.equal(rows.cpu(), qw.dequantize(torch.float32)[ids])
