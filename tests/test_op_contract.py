"""The ops as torch sees them (opcheck: schema, fake/meta kernels, torch.compile) and as a careless caller sees
them: every bad input gets a Python exception naming the argument, never a crash or a silent wrong answer."""

import pytest
import torch

from conftest import KERNEL_BACKENDS, assert_matches_reference, misaligned, ops_and_device
from mistral_ext import ops, quant, reference
from mistral_ext.model import step_layout

OPS = torch.ops.mistral_ext


def valid_calls():
    """One valid call of each op: name -> (op, args). Small odd sizes, GQA 3, a ring that has wrapped."""
    t, hq, hkv, d, b, s = 7, 6, 2, 16, 2, 8
    f = lambda *shape: torch.randn(*shape)
    seq_lens, start = torch.tensor([4, 3]), torch.tensor([0, 21])
    positions, rows = step_layout(seq_lens, start, s)
    return {
        "rms_norm": (OPS.rms_norm.default, (f(t, 40), f(t, 40), f(40), 1e-5)),
        "rope": (OPS.rope.default, (f(t, hq, d), f(t, hkv, d), torch.arange(t) * 5, 1e4)),
        "cache_write": (OPS.cache_write.default, (f(t, hkv, d), f(t, hkv, d), f(b, s, hkv, d), f(b, s, hkv, d),
                                                  rows)),
        "rope_cache_write": (OPS.rope_cache_write.default, (f(t, hq, d), f(t, hkv, d), f(t, hkv, d),
                                                            f(b, s, hkv, d), f(b, s, hkv, d), positions, rows, 1e4)),
        "attention_prefill": (OPS.attention_prefill.default, (f(t, hq, d), f(t, hkv, d), f(t, hkv, d),
                                                              f(b, s, hkv, d), f(b, s, hkv, d), seq_lens, start, 5)),
        "attention_decode": (OPS.attention_decode.default, (f(b, hq, d), f(b, s, hkv, d), f(b, s, hkv, d),
                                                            torch.tensor([3, 40]), s)),
        "silu_mul": (OPS.silu_mul.default, (f(t, 2 * 37),)),
        "dense_linear": (OPS.dense_linear.default, (f(t, 40), f(24, 40).bfloat16())),
        "quant_linear": (OPS.quant_linear.default, (f(t, 64), *quant.quantize(f(24, 64), "q4_1"))),
        "quant_embedding": (OPS.quant_embedding.default, (torch.tensor([3, 0, 23]), *quant.quantize(f(24, 64), "q8_0"),
                                                          torch.float32)),
        "decode_layers": (OPS.decode_layers.default, (  # rows 2 and 0 of 3 decode, row 1 idles
            f(b, 64), f(b, 64), [f(64) for _ in range(4)], 1e-5,
            [*quant.quantize(f(hq * d, 64), "q4_1"), *quant.quantize(f(2 * hkv * d, 64), "q8_0"),  # wqkv in 2 parts
             f(64, hq * d).bfloat16(), None, None, *quant.quantize(f(2 * 48, 64), "q8_0"), f(64, 48), None, None,
             *quant.quantize(f((hq + 2 * hkv) * d, 64), "q4_0"), *quant.quantize(f(64, hq * d), "q4_1"),
             f(2 * 48, 64).half(), None, None, f(64, 48).bfloat16(), None, None],
            [2, 1, 1, 1, 1, 1, 1, 1], [f(b + 1, s, hkv, d) for _ in range(2)], [f(b + 1, s, hkv, d) for _ in range(2)],
            torch.tensor([2, 0]), torch.tensor([3, 40]), torch.tensor([2 * s + 3, 40 % s]), hq, 1e4, s)),
    }


@pytest.mark.parametrize("name", list(valid_calls()))
def test_opcheck(name):
    op, args = valid_calls()[name]
    torch.library.opcheck(op, args)


# The emulated ops have no fake kernels (ops.py registers those for mistral_ext), so opcheck runs its schema and
# autograd-registration checks on them; the CUDA attention kernels take head_dim 64 or 128, not these calls' 16.
CPU_ONLY = {"decode_layers"}  # no CUDA kernel, so none in the emulator's namespace
EMULATED_OPCHECK = [name for name in valid_calls() if not name.startswith("attention") and name not in CPU_ONLY]


@pytest.mark.skipif("emu" not in KERNEL_BACKENDS, reason="needs mistral_ext._emu")
@pytest.mark.parametrize("name", EMULATED_OPCHECK)
def test_opcheck_emulated(name):
    _, args = valid_calls()[name]
    torch.library.opcheck(getattr(torch.ops.mistral_ext_emu, name).default, args,
                          test_utils=("test_schema", "test_autograd_registration"))


def test_ops_compile_fullgraph():
    """The fake kernels let a decode step trace into one graph."""

    def step(x, w, gate_up, q, k, v, k_cache, v_cache, pos):
        h, res = ops.rms_norm(x, None, w, 1e-5)
        q = ops.rope_cache_write(q, k, v, k_cache, v_cache, pos, torch.arange(2) * 4 + pos % 4, 1e4)
        return h + res, ops.attention_decode(q, k_cache, v_cache, pos, 4), ops.silu_mul(gate_up)

    args = (torch.randn(2, 32), torch.randn(32), torch.randn(2, 10), torch.randn(2, 4, 8), torch.randn(2, 2, 8),
            torch.randn(2, 2, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), torch.tensor([5, 9]))
    eager_caches = [args[6].clone(), args[7].clone()]
    eager = step(*args[:6], *eager_caches, args[8])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(eager_caches[0], args[6], rtol=0, atol=0)


def to_meta(a):
    """An argument on the meta device: a tensor, or each tensor of a list; anything else as it is."""
    if isinstance(a, list):
        return [to_meta(t) for t in a]
    return a.to("meta") if isinstance(a, torch.Tensor) else a


def replace(args, indices, value):
    args = list(args)
    for i in indices if isinstance(indices, tuple) else (indices,):
        args[i] = value(args[i]) if callable(value) else value
    return args


def non_contiguous(t):
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t.repeat(2)[::2]


# (op, argument index, replacement, exception type, words the message must contain)
BAD = [
    ("rms_norm", 0, lambda t: t.int(), TypeError, "`x` must be float32"),
    ("rms_norm", 0, lambda t: t.double(), TypeError, "`x` must be float32"),
    ("rms_norm", 2, lambda t: t.half(), TypeError, "`weight` has dtype"),
    ("rms_norm", 2, lambda t: t[:-1].clone(), ValueError, "`weight` has 39 entries"),
    ("rms_norm", 1, lambda t: t[:-1].clone(), ValueError, "`residual` shape"),
    ("rms_norm", 0, non_contiguous, ValueError, "`x` must be contiguous"),
    ("rms_norm", 2, lambda t: t.to("meta"), ValueError, "one device"),
    ("rms_norm", 3, 0.0, ValueError, "`eps`"),
    ("rope", 0, lambda t: t.bfloat16(), TypeError, "`k` has dtype"),
    ("rope", 1, lambda t: t[:-1].clone(), ValueError, "must agree on tokens"),
    ("rope", 0, lambda t: t[..., :-1].clone(), ValueError, "must agree on tokens and head_dim"),
    ("rope", 0, lambda t: t[0].clone(), ValueError, "`q` must have 3 dimensions"),
    ("rope", 1, non_contiguous, ValueError, "`k` must be contiguous"),
    ("rope", 2, lambda t: t - 10, IndexError, "positions[0] = -10"),
    ("rope", 2, lambda t: t.int(), TypeError, "`positions` must be int64"),
    ("rope", 2, lambda t: t[:-1].clone(), ValueError, "`positions` must have shape [7]"),
    ("rope", 2, lambda t: t.to("meta"), ValueError, "one device"),
    ("cache_write", 2, lambda t: t.half(), TypeError, "`k_cache` has dtype"),
    ("cache_write", 1, lambda t: t[:, :1].clone(), ValueError, "`v` shape"),
    ("cache_write", 3, lambda t: t[:, :-1].clone(), ValueError, "`v_cache` shape"),
    ("cache_write", 2, non_contiguous, ValueError, "`k_cache` must be contiguous"),
    ("cache_write", 4, torch.tensor([0, 1, 2, 3, 4, 5, 16]), IndexError, "cache_rows[6] = 16 is outside [-1, 16)"),
    ("cache_write", 4, torch.tensor([0, 1, 2, 3, -2, 5, 6]), IndexError, "cache_rows[4] = -2"),
    ("cache_write", 4, torch.tensor([0, 1, 2, 3, 4, 5, 3]), ValueError, "takes ring row 3 twice"),
    ("cache_write", 4, torch.tensor([0, 1]), ValueError, "`cache_rows` must have shape [7]"),
    ("cache_write", 4, lambda t: t.int(), TypeError, "`cache_rows` must be int64"),
    ("cache_write", 3, lambda t: t.to("meta"), ValueError, "one device"),
    ("rope_cache_write", 2, lambda t: t.bfloat16(), TypeError, "`v` has dtype BFloat16 but `k` has Float"),
    ("rope_cache_write", 5, torch.tensor([4, 4]), ValueError, "`positions` must have shape [7]"),
    ("rope_cache_write", 5, lambda t: t - 30, IndexError, "positions[0] = -30"),
    ("rope_cache_write", 6, lambda t: t + 9, IndexError, "is outside [-1, 16)"),
    ("rope_cache_write", 6, lambda t: t * 0, ValueError, "takes ring row 0 twice"),
    ("rope_cache_write", (3, 4), lambda t: t[..., :-2].clone(), ValueError, "does not match `k`"),
    ("rope_cache_write", 3, lambda t: t[..., :-2].clone(), ValueError, "`v_cache` shape"),
    ("rope_cache_write", 0, lambda t: t.half(), TypeError, "`k` has dtype"),
    ("cache_write", (2, 3), lambda t: t[:, :, :1].clone(), ValueError, "does not match `k`"),
    ("attention_prefill", 0, lambda t: t[:, :5].clone(), ValueError, "not a multiple of 2 KV heads"),
    ("attention_prefill", 1, lambda t: t.half(), TypeError, "`v` has dtype Float but `k` has Half"),
    ("attention_prefill", (1, 2), lambda t: t.half(), TypeError, "`k` has dtype Half but `q` has Float"),
    ("attention_prefill", 2, lambda t: t[:-1].clone(), ValueError, "`v` shape"),
    ("attention_prefill", (1, 2), lambda t: t[:-1].clone(), ValueError, "`k` and `v` must be [T, Hkv, D]"),
    ("attention_prefill", 3, lambda t: t[..., :-2].clone(), ValueError, "`v_cache` shape"),
    ("attention_prefill", 0, non_contiguous, ValueError, "`q` must be contiguous"),
    ("attention_prefill", 7, 9, ValueError, "`window` 9 exceeds the 8 cache slots"),
    ("attention_prefill", 7, 0, ValueError, "`window` must be >= 1"),
    ("attention_prefill", 7, None, IndexError, "start_pos[1] = 21 but a cache without window holds only 8"),
    ("attention_prefill", 6, torch.tensor([-5, 0]), IndexError, "start_pos[0] = -5"),
    ("attention_prefill", 5, torch.tensor([3, 3]), ValueError, "seq_lens sum to 6"),
    ("attention_prefill", 5, lambda t: t.float(), TypeError, "`seq_lens` must be int64"),
    ("attention_prefill", 0, lambda t: t.to("meta"), ValueError, "one device"),
    ("attention_decode", 0, lambda t: t[:1].clone(), ValueError, "one token per sequence"),
    ("attention_decode", 0, lambda t: t.int(), TypeError, "`q` must be float32"),
    ("attention_decode", 1, non_contiguous, ValueError, "`k_cache` must be contiguous"),
    ("attention_decode", 3, torch.tensor([3, -1]), IndexError, "positions[1] = -1"),
    ("attention_decode", 4, None, IndexError, "positions[1] = 40 but a cache without window holds only 8"),
    ("attention_decode", 4, 100, ValueError, "exceeds the 8 cache slots"),
    ("attention_decode", 3, lambda t: t.to("meta"), ValueError, "one device"),
    ("silu_mul", 0, lambda t: t[:, :-1].clone(), ValueError, "must be even"),
    ("silu_mul", 0, lambda t: t.long(), TypeError, "`x` must be float32"),
    ("silu_mul", 0, non_contiguous, ValueError, "`x` must be contiguous"),
    ("dense_linear", 1, lambda t: t[:, :-1].clone(), ValueError, "`x` has 40 features but `weight` [24, 39] has K = 39"),
    ("dense_linear", 1, lambda t: t.int(), TypeError, "`weight` must be float32, bfloat16 or float16"),
    ("dense_linear", 0, lambda t: t.double(), TypeError, "`x` must be float32"),
    ("dense_linear", 0, lambda t: t[None], ValueError, "`x` must have 2 dimensions"),
    ("dense_linear", 1, non_contiguous, ValueError, "`weight` must be contiguous"),
    ("dense_linear", 1, lambda t: t.to("meta"), ValueError, "one device"),
    ("quant_linear", 0, lambda t: t.double(), TypeError, "`x` must be float32"),
    ("quant_linear", 0, lambda t: t[:, :-32].clone(), ValueError, "`x` has 32 features but the weight has K = 64"),
    ("quant_linear", 1, torch.zeros(24, 64, dtype=torch.int8), ValueError, "`mins` belong to the 4-bit q4_1 format"),
    ("quant_linear", 1, lambda t: t.short(), TypeError, "`qweight` must be int8 (q8_0) or uint8 (4-bit)"),
    ("quant_linear", 1, lambda t: t[:, :-1].clone(), ValueError, "does not match `scales`"),
    ("quant_linear", 2, lambda t: t.float(), TypeError, "`scales` must be float16"),
    ("quant_linear", 3, lambda t: t[:-1].clone(), ValueError, "`mins` must be contiguous with the shape of `scales`"),
    ("quant_linear", 1, non_contiguous, ValueError, "must be contiguous"),
    ("quant_linear", 2, lambda t: t.to("meta"), ValueError, "one device"),
    ("quant_embedding", 0, torch.tensor([3, 24]), ValueError, "token id 24 (at 1) is outside the vocabulary [0, 24)"),
    ("quant_embedding", 0, lambda t: t.int(), TypeError, "`ids` must be int64"),
    ("quant_embedding", 0, lambda t: t[None], ValueError, "`ids` must be 1-D"),
    ("quant_embedding", 4, torch.int32, TypeError, "`dtype` must be float32, bfloat16 or float16"),
    ("quant_embedding", 3, torch.ones(24, 2, dtype=torch.float16), ValueError, "`mins` belong to the 4-bit"),
    ("quant_embedding", 2, lambda t: t.to("meta"), ValueError, "one device"),
    ("decode_layers", 11, 5, ValueError, "`wqkv` has 160 rows; 5 query heads and the cache's 2 KV heads"),
    ("decode_layers", 11, 0, ValueError, "`n_heads` must be >= 1"),
    ("decode_layers", 4, lambda w: w[:1] + [None] + w[2:], ValueError, "entry 0 has mins but no scales"),
    ("decode_layers", 4, lambda w: [None] + w[1:], ValueError, "entry 0 is None"),
    ("decode_layers", 4, lambda w: w[:-3], ValueError, "`weights` has 24 entries; `parts` needs 27"),
    ("decode_layers", 5, lambda p: p[:-1], ValueError, "`parts` has 7 entries; 2 layers need 8"),
    ("decode_layers", 5, lambda p: [2, 0] + p[2:], ValueError, "`wo` of layer 0 has 0 parts"),
    ("decode_layers", 2, lambda n: n[:-1], ValueError, "`norms` has 3 tensors; 2 layers need 4"),
    ("decode_layers", 7, lambda v: v[:-1], ValueError, "1 `v_caches` for 2 `k_caches`"),
    ("decode_layers", (6, 7), [], ValueError, "no layers"),
    ("decode_layers", 0, lambda t: t[None], ValueError, "`x` must have 2 dimensions"),
    ("decode_layers", 6, lambda k: [k[0][0], k[1]], ValueError, "`k_caches` must have 4 dimensions"),
    ("decode_layers", (0, 1), lambda t: torch.cat([t, t]), ValueError, "`x` has 4 tokens but the caches have 3 rows"),
    ("decode_layers", 8, torch.tensor([3, 0]), IndexError, "rows[0] = 3 is outside the caches' 3 rows"),
    ("decode_layers", 8, torch.tensor([0, 0]), ValueError, "rows takes cache row 0 twice"),
    ("decode_layers", 8, torch.tensor([2]), ValueError, "`rows` must have shape [2]"),
    ("decode_layers", 10, torch.tensor([3, 40 % 8]), IndexError, "cache_rows[0] = 3 is not in the ring of its row 2"),
]


# The same checks guard the CPU kernels and the CUDA launchers, which the emulated build runs here. Device
# mismatches on the emulated ops are refused by the dispatcher before any check, so those cases run on the CPU only.
CASES = [("cpu", *b) for b in BAD] + [("emu", *b) for b in BAD
                                      if "device" not in b[4] and b[0] not in CPU_ONLY and "emu" in KERNEL_BACKENDS]


@pytest.mark.parametrize("backend,name,index,value,error,words", CASES, ids=[f"{c[0]}-{c[1]}-{c[5]}" for c in CASES])
def test_bad_input_is_refused(backend, name, index, value, error, words):
    op, args = valid_calls()[name]
    if backend == "emu":
        op = getattr(torch.ops.mistral_ext_emu, name).default
    with pytest.raises(error, match=None) as info:
        op(*replace(args, index, value))
    assert words in str(info.value), f"message does not say {words!r}: {info.value}"
    if error is not ValueError or "device" not in words:
        assert f"mistral_ext.{name}" in str(info.value), f"message does not name the op: {info.value}"


# Cases refused for the values an index tensor or a window holds (positions, lengths, ring rows, token ids): a fake
# tensor has no values, so only the kernels check them.
VALUE_CASES = {(name, words) for name, _, _, error, words in BAD
               if error is IndexError or any(w in words for w in ("sum to", "seq_lens[", "twice", "token id"))}
FAKE_CASES = [b for b in BAD if "device" not in b[4]]


@pytest.mark.parametrize("name,index,value,error,words", FAKE_CASES, ids=[f"{c[0]}-{c[4]}" for c in FAKE_CASES])
def test_fake_kernels_refuse_what_the_kernels_refuse(name, index, value, error, words):
    """The same bad call on meta tensors (the fake kernels torch.compile traces with) raises the kernels' exception
    type, naming the op; a bad index value, which a fake tensor cannot hold, passes there (the kernels refuse it).
    Device mismatches are the dispatcher's (test_bad_input_is_refused)."""
    op, args = valid_calls()[name]
    meta = [to_meta(a) for a in replace(args, index, value)]
    if (name, words) in VALUE_CASES:
        op(*meta)
        return
    with pytest.raises(error) as info:
        op(*meta)
    assert f"mistral_ext.{name}" in str(info.value), f"message does not name the op: {info.value}"


def test_a_compiled_call_fails_as_the_eager_one():
    """torch.compile traces the fake kernels: a bad shape fails at compile time with the eager message inside
    dynamo's error, the kernels' exception type named."""
    step = lambda x, w, gate_up: ops.silu_mul(gate_up) + ops.rms_norm(x, None, w, 1e-5)[0]
    bad = (torch.randn(2, 8), torch.randn(7), torch.randn(2, 16))
    with pytest.raises(ValueError) as eager:
        step(*bad)
    with pytest.raises(RuntimeError) as compiled:
        torch.compile(step, backend="aot_eager", fullgraph=True)(*bad)
    assert f"ValueError('{eager.value}')" in str(compiled.value), str(compiled.value)


def test_every_op_is_covered_by_bad_input_cases():
    assert {b[0] for b in BAD} == set(valid_calls())


def test_index_tensors_may_stay_on_the_host():
    """Activations on another device (meta here, CUDA in use) with seq_lens/start_pos/positions on the CPU are
    accepted: the engine keeps index tensors on the host so that checking them costs a GPU step nothing."""
    for name, (op, args) in valid_calls().items():
        moved = [a if isinstance(a, torch.Tensor) and a.dtype == torch.long and name != "quant_embedding"
                 else to_meta(a) for a in args]
        out = op(*moved)
        for t in out if isinstance(out, tuple) else (out,):
            assert t is None or t.device.type == "meta", name


# ---------------- misaligned tensors ----------------
# A contiguous view need not start on a 16-byte boundary (buf[1:].view(shape)). The CUDA kernels that read rows with
# 16-byte loads take a scalar path for such a tensor, except attention, which has none: its launchers refuse it.


def vector_sized_calls():
    """A float64 call of every op, sized so that each CUDA kernel takes its 16-byte path when all is aligned (rows of
    a multiple of 8 elements, head_dim 64 for attention): name -> (args, indices of the tensors it writes)."""
    t, hq, hkv, d, b, s = 5, 4, 2, 64, 2, 8
    f = lambda *shape, scale=1.0: torch.randn(*shape, dtype=torch.float64) * scale
    seq_lens, start = torch.tensor([3, 2]), torch.tensor([0, 9])
    positions, rows = step_layout(seq_lens, start, s)
    kv = lambda: (f(t, hkv, d), f(t, hkv, d))
    rings = lambda: (f(b, s, hkv, d), f(b, s, hkv, d))
    return {
        "rms_norm": ((f(t, 40), f(t, 40), f(40, scale=0.5) + 1, 1e-5), ()),
        "rope": ((f(t, hq, d), f(t, hkv, d), torch.arange(t) * 3, 1e4), ()),
        "cache_write": ((*kv(), *rings(), rows), (2, 3)),
        "rope_cache_write": ((f(t, hq, d), *kv(), *rings(), positions, rows, 1e4), (3, 4)),
        "silu_mul": ((f(t, 2 * 40, scale=3.0),), ()),
        "dense_linear": ((f(t, 40), f(24, 40, scale=40**-0.5)), ()),
        "attention_prefill": ((f(t, hq, d), *kv(), *rings(), seq_lens, start, 6), ()),
        "attention_decode": ((f(b, hq, d), *rings(), torch.tensor([3, 12]), s), ()),
    }


# The names of each op's tensor arguments, from its schema.
ARG_NAMES = {name: [a.name for a in getattr(OPS, name).default._schema.arguments] for name in valid_calls()}
FLOAT_ARGS = [(name, i) for name, (args, _) in vector_sized_calls().items() for i, a in enumerate(args)
              if isinstance(a, torch.Tensor) and a.is_floating_point()]


def results(out, args, written):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None] + [args[i] for i in written]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,index", FLOAT_ARGS, ids=[f"{n}-{ARG_NAMES[n][i]}" for n, i in FLOAT_ARGS])
def test_misaligned_tensor(kernels, dtype, name, index):
    """One tensor at a time starts 2 or 4 bytes past a 16-byte boundary. The CPU kernels and the CUDA kernels'
    scalar paths give the reference's answer (a 16-byte load would fault on the GPU and abort the emulator); the
    CUDA attention launchers refuse the tensor by name."""
    ops_ns, device = ops_and_device(kernels)
    args64, written = vector_sized_calls()[name]
    cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args64]
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in cast]
    on_device[index] = misaligned(on_device[index])
    op = getattr(ops_ns, name)
    if name.startswith("attention") and ops_ns is not ops:
        with pytest.raises(ValueError) as info:
            op(*on_device)
        words = f"mistral_ext.{name}: `{ARG_NAMES[name][index]}` must start at a 16-byte aligned address"
        assert words in str(info.value), str(info.value)
        return
    got = results(op(*on_device), on_device, written)
    ref64 = [a.clone() if isinstance(a, torch.Tensor) else a for a in args64]
    low = [a.clone() if isinstance(a, torch.Tensor) else a for a in cast]
    ref = results(getattr(reference, name)(*ref64), ref64, written)
    ref_low = results(getattr(reference, name)(*low), low, written)
    assert len(got) == len(ref)
    for g, r, lo in zip(got, ref, ref_low):
        assert_matches_reference(g.cpu(), r, lo, what=f"{name} with `{ARG_NAMES[name][index]}` misaligned")
