"""Every kernel against the plain-PyTorch spec (mistral_ext.reference), in float32 tightly and in bfloat16/float16
by flash-attention's rule (see conftest.assert_matches_reference). The `kernels` fixture runs each test on the CPU
kernels and on the CUDA kernel sources under the CPU emulator (and on the GPU when there is one)."""

from dataclasses import dataclass

import pytest
import torch

from mistral_ext import reference
from mistral_ext.model import step_layout
from conftest import DTYPES, assert_matches_reference, half_ulp, misaligned, ops_and_device

GQA = [(4, 4), (6, 2), (8, 2), (8, 1)]  # (query heads, KV heads): ratios 1, 3, 4, 8


def randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def nan_padded(t: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous view whose neighbouring rows in memory are NaN (catches reads past the ends)."""
    buf = torch.full((t.shape[0] + 2, *t.shape[1:]), float("nan"), dtype=t.dtype)
    buf[1:-1] = t
    return buf[1:-1]


def lengths(*n):
    return torch.tensor(n, dtype=torch.long)


# ---------------- rms_norm ----------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 4096), (3, 5, 100), (2, 1, 33)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm(kernels, dtype, shape, with_residual):
    x, w = randn(*shape), randn(shape[-1]) * 0.5 + 1
    res = randn(*shape) * 4 if with_residual else None
    eps = 1e-5
    cast = lambda t: None if t is None else t.to(dtype)
    out, h = kernels.rms_norm(cast(x), cast(res), cast(w), eps)
    ref_out, ref_h = reference.rms_norm(x, res, w, eps)
    low_out, low_h = reference.rms_norm(cast(x), cast(res), cast(w), eps)
    assert_matches_reference(h, ref_h, low_h, what="residual")
    assert_matches_reference(out, ref_out, low_out, what="normalised")
    # The output is the norm of the returned residual stream, exactly, as the next layer will see it.
    again, _ = kernels.rms_norm(h, None, cast(w), eps)
    assert torch.equal(again, out)


# ---------------- rope ----------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 6])
@pytest.mark.parametrize("heads", GQA)
def test_rope(kernels, dtype, head_dim, heads):
    tokens = 37
    q, k = randn(tokens, heads[0], head_dim), randn(tokens, heads[1], head_dim)
    positions = torch.randint(0, 70000, (tokens,))
    positions[:3] = torch.tensor([0, 1, 8191])
    q_out, k_out = kernels.rope(q.to(dtype), k.to(dtype), positions, 1e4)
    ref_q, ref_k = reference.rope(q, k, positions, 1e4)
    low_q, low_k = reference.rope(q.to(dtype), k.to(dtype), positions, 1e4)
    assert_matches_reference(q_out, ref_q, low_q, what="q")
    assert_matches_reference(k_out, ref_k, low_k, what="k")


def test_rope_is_a_rotation_of_half_split_pairs(kernels):
    """Pins the convention independently of the reference: position 0 is the identity, and the pair
    (x[i], x[i + D/2]) turns by pos * theta^(-2i/D)."""
    q, k = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    q_out, _ = kernels.rope(q, k, torch.tensor([0, 3]), 100.0)
    assert torch.equal(q_out[0], q[0])
    for i in range(4):
        angle = torch.tensor(3 * 100.0 ** (-2 * i / 8), dtype=torch.float64)
        a, b = q[1, 0, i].double(), q[1, 0, i + 4].double()
        expected = torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])
        torch.testing.assert_close(q_out[1, 0, [i, i + 4]].double(), expected, rtol=1e-6, atol=1e-6)


# ---------------- cache_write / rope_cache_write ----------------


def test_step_layout_is_writing_in_order():
    """The slot mapping against a plain loop that writes every token in order into a dict of slots: the same
    surviving token in every slot, no slot taken twice, -1 exactly for the overwritten ones."""
    assert [t.tolist() for t in step_layout(lengths(2, 0, 1), lengths(4, 9, 7), 4)] == [[4, 5, 7], [0, 1, 11]]
    for _ in range(20):
        batch, slots = int(torch.randint(1, 5, ())), int(torch.randint(1, 9, ()))
        seq_lens, start = torch.randint(0, 3 * slots, (batch,)), torch.randint(0, 100, (batch,))
        positions, rows = step_layout(seq_lens, start, slots)
        written, t = {}, 0
        for b in range(batch):
            for i in range(int(seq_lens[b])):
                assert positions[t] == start[b] + i
                written[b * slots + int(start[b] + i) % slots] = t
                t += 1
        assert {int(r): i for i, r in enumerate(rows.tolist()) if r >= 0} == written
        assert int((rows >= 0).sum()) == len(written)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "slots,seqs",  # seqs: (start_pos, length) per sequence
    [(8, [(0, 5), (6, 4), (13, 0)]), (8, [(3, 19), (64, 8), (9, 1)]), (5, [(100, 3)])],
)
def test_cache_write(kernels, dtype, slots, seqs):
    hkv, d = 3, 16
    seq_lens, start = lengths(*[n for _, n in seqs]), lengths(*[s for s, _ in seqs])
    _, rows = step_layout(seq_lens, start, slots)
    k, v = randn(int(seq_lens.sum()), hkv, d).to(dtype), randn(int(seq_lens.sum()), hkv, d).to(dtype)
    k_cache = randn(len(seqs), slots, hkv, d).to(dtype)
    v_cache = randn(len(seqs), slots, hkv, d).to(dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    kernels.cache_write(k, v, k_cache, v_cache, rows)
    reference.cache_write(k, v, ref_k, ref_v, rows)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    # Independent of the reference: the last token of each non-empty sequence sits in slot pos % S.
    offset = 0
    for b, (s, n) in enumerate(seqs):
        offset += n
        if n:
            assert torch.equal(k_cache[b, (s + n - 1) % slots], k[offset - 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", GQA)
def test_rope_cache_write(kernels, dtype, heads):
    d, slots = 64, 8
    positions, rows = step_layout(lengths(3, 1, 11), lengths(0, 77, 20), slots)
    tokens = positions.shape[0]
    q, k, v = randn(tokens, heads[0], d), randn(tokens, heads[1], d), randn(tokens, heads[1], d)
    caches64 = [randn(3, slots, heads[1], d) for _ in range(2)]
    caches = [c.to(dtype) for c in caches64]
    low_caches = [c.clone() for c in caches]
    q_out = kernels.rope_cache_write(q.to(dtype), k.to(dtype), v.to(dtype), *caches, positions, rows, 1e4)
    ref_q = reference.rope_cache_write(q, k, v, *caches64, positions, rows, 1e4)
    low_q = reference.rope_cache_write(q.to(dtype), k.to(dtype), v.to(dtype), *low_caches, positions, rows, 1e4)
    assert_matches_reference(q_out, ref_q, low_q, what="q")
    assert_matches_reference(caches[0], caches64[0], low_caches[0], what="k_cache")
    assert torch.equal(caches[1], low_caches[1])  # v is copied as is


# ---------------- attention ----------------


@dataclass
class Scenario:
    name: str
    window: int | None
    slots: int
    seqs: list  # (start_pos, chunk length) per sequence


PREFILL = [
    Scenario("window_below_seq", 8, 8, [(0, 19), (0, 7), (0, 1)]),
    Scenario("window_equal_seq", 16, 16, [(0, 16), (3, 13)]),
    Scenario("window_above_seq", 32, 40, [(0, 11), (5, 9)]),
    Scenario("wraps_ring_often", 12, 12, [(41, 7), (100, 12), (57, 1), (5, 0)]),
    Scenario("straddles_window_edge", 10, 10, [(7, 6), (10, 10), (25, 3)]),
    Scenario("ring_larger_than_window", 9, 16, [(40, 10), (9, 3)]),
    Scenario("no_window", None, 48, [(0, 17), (20, 9), (31, 17)]),
    # Longer than the kernels' key tiles (64) and query blocks (16): online softmax across tiles.
    Scenario("many_key_tiles", 100, 100, [(150, 40), (0, 130)]),
    Scenario("many_key_tiles_no_window", None, 200, [(0, 70), (101, 99)]),
]


def filled_ring(batch, slots, hkv, d, spans):
    """A ring whose slots hold random values for the positions in `spans` ((first, last) per sequence, inclusive)
    and NaN everywhere else, so a kernel that reads a slot it should not returns NaN."""
    ring = torch.full((batch, slots, hkv, d), float("nan"), dtype=torch.float64)
    for b, (first, last) in enumerate(spans):
        p = torch.arange(first, last + 1)[-slots:]  # of a span longer than the ring, its last positions stay
        ring[b, p % slots] = randn(len(p), hkv, d)
    return ring


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("sc", PREFILL, ids=lambda s: s.name)
def test_attention_prefill(kernels, dtype, head_dim, heads, sc):
    hq, hkv = heads
    seq_lens, start = lengths(*[n for _, n in sc.seqs]), lengths(*[s for s, _ in sc.seqs])
    tokens = int(seq_lens.sum())
    q, k, v = randn(tokens, hq, head_dim), randn(tokens, hkv, head_dim), randn(tokens, hkv, head_dim)
    # Only the cached positions inside the first query's window hold data; every other slot is NaN.
    spans = [(0 if sc.window is None else max(0, s - sc.window + 1), s - 1) for s, _ in sc.seqs]
    k_cache = filled_ring(len(sc.seqs), sc.slots, hkv, head_dim, spans)
    v_cache = filled_ring(len(sc.seqs), sc.slots, hkv, head_dim, spans)
    args64 = (q, k, v, k_cache, v_cache, seq_lens, start, sc.window)
    cast = [t.to(dtype) for t in (q, k, v, k_cache, v_cache)]
    out = kernels.attention_prefill(*[nan_padded(t) for t in cast[:3]], *cast[3:], seq_lens, start, sc.window)
    ref = reference.attention_prefill(*args64)
    low = reference.attention_prefill(*cast, seq_lens, start, sc.window)
    assert_matches_reference(out, ref, low, what=f"prefill {sc.name}")


DECODE = [
    Scenario("window_full_and_partial", 8, 8, [(0, 1), (5, 1), (7, 1), (8, 1), (37, 1)]),
    Scenario("window_of_one", 1, 4, [(0, 1), (6, 1)]),
    Scenario("ring_larger_than_window", 16, 20, [(3, 1), (15, 1), (16, 1), (99, 1)]),
    Scenario("no_window", None, 40, [(0, 1), (13, 1), (39, 1)]),
    Scenario("many_key_tiles", 150, 150, [(149, 1), (1000, 1), (70, 1)]),
    Scenario("many_key_tiles_no_window", None, 300, [(299, 1), (130, 1)]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("sc", DECODE, ids=lambda s: s.name)
def test_attention_decode(kernels, dtype, head_dim, heads, sc):
    hq, hkv = heads
    positions = lengths(*[s for s, _ in sc.seqs])
    spans = [(0 if sc.window is None else max(0, p - sc.window + 1), p) for p, _ in sc.seqs]
    k_cache = filled_ring(len(sc.seqs), sc.slots, hkv, head_dim, spans)
    v_cache = filled_ring(len(sc.seqs), sc.slots, hkv, head_dim, spans)
    q = randn(len(sc.seqs), hq, head_dim)
    out = kernels.attention_decode(nan_padded(q.to(dtype)), k_cache.to(dtype), v_cache.to(dtype), positions, sc.window)
    ref = reference.attention_decode(q, k_cache, v_cache, positions, sc.window)
    low = reference.attention_decode(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), positions, sc.window)
    assert_matches_reference(out, ref, low, what=f"decode {sc.name}")


@pytest.mark.parametrize("heads,batch", [((4, 1), 1), ((9, 3), 1), ((8, 2), 3), ((6, 6), 1)],
                         ids=["mqa4-b1", "gqa3-b1", "gqa4-b3", "gqa1-b1"])
def test_cpu_attention_decode_does_not_depend_on_the_thread_count(cpu_kernels, heads, batch):
    """The CPU decode splits a KV head's query heads into several work items when the (sequence, KV head) items do
    not spread evenly over the threads; a head's arithmetic is the same either way, so 1 to 4 threads (no split,
    splits of 2 or of 1 head per item) give the same output bit for bit."""
    hq, hkv = heads
    positions = lengths(*[37 + 11 * b for b in range(batch)])
    spans = [(0, int(p)) for p in positions]
    k_cache, v_cache = (filled_ring(batch, 64, hkv, 64, spans).float() for _ in range(2))
    q = randn(batch, hq, 64).float()
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            outs.append(cpu_kernels.attention_decode(q, k_cache, v_cache, positions, None))
    finally:
        torch.set_num_threads(threads)
    for n, out in zip((2, 3, 4), outs[1:]):
        assert torch.equal(out, outs[0]), f"{n} threads"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(16, 1), (10, 2), (4, 2), (40, 2), (32, 1)],
                         ids=["gqa16", "gqa5", "gqa2", "gqa20", "gqa32"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_other_group_sizes(kernels, dtype, heads, head_dim):
    """Group sizes the CUDA kernels split or pad: decode blocks of 2 heads (group 2), of 8 heads with 3 padded (5),
    two and four blocks of 8 (16, 32), two of 8 and one of 4 padded to 8 (20); prefill blocks of 3 tokens (group 20:
    60 of the 64 rows) and of 2 tokens (group 32)."""
    hq, hkv = heads
    window, slots = 24, 24
    positions = lengths(3, 50, 23)
    spans = [(max(0, p - window + 1), p) for p in positions.tolist()]
    k_cache = filled_ring(3, slots, hkv, head_dim, spans)
    v_cache = filled_ring(3, slots, hkv, head_dim, spans)
    q = randn(3, hq, head_dim)
    cast = [t.to(dtype) for t in (q, k_cache, v_cache)]
    out = kernels.attention_decode(nan_padded(cast[0]), *cast[1:], positions, window)
    assert_matches_reference(out, reference.attention_decode(q, k_cache, v_cache, positions, window),
                             reference.attention_decode(*cast, positions, window), what="decode")
    seq_lens, start = lengths(9, 30), lengths(40, 0)
    tokens = int(seq_lens.sum())
    qp, kp, vp = randn(tokens, hq, head_dim), randn(tokens, hkv, head_dim), randn(tokens, hkv, head_dim)
    spans = [(max(0, 40 - window + 1), 39), (0, -1)]
    k_cache = filled_ring(2, slots, hkv, head_dim, spans)
    v_cache = filled_ring(2, slots, hkv, head_dim, spans)
    args = (qp, kp, vp, k_cache, v_cache)
    cast = [t.to(dtype) for t in args]
    out = kernels.attention_prefill(*[nan_padded(t) for t in cast[:3]], *cast[3:], seq_lens, start, window)
    assert_matches_reference(out, reference.attention_prefill(*args, seq_lens, start, window),
                             reference.attention_prefill(*cast, seq_lens, start, window), what="prefill")


@dataclass
class LongDecode:
    name: str
    heads: tuple  # (query heads, KV heads)
    head_dim: int
    window: int | None
    slots: int
    positions: tuple
    # The split-KV plan attention_decode launches at 8 and 132 multiprocessors: sm_count -> (splits, split_len),
    # worked out by hand from attention_decode_splits; the test checks the emulated launches against it.
    plans: dict
    heads_per_block: int


LONG_DECODE = [
    # Mistral 7B: one ring that has wrapped (5330 > W) and one sequence inside its first window. 16 blocks per key
    # range: 8 SMs want 1 range of 4096 keys, capped at 512 -> 8; 132 SMs want ceil(264 / 16) = 17 ranges of 241
    # keys, rounded up to 256 -> 16.
    pytest.param(LongDecode("mistral_7b", (32, 8), 128, 4096, 4096, (5330, 700), {8: (8, 512), 132: (16, 256)}, 4),
                 marks=pytest.mark.slow_emu, id="mistral_7b"),
    # 2 blocks per range (16 heads, two blocks of 8): 8 SMs want 8 ranges of 150 -> 192 keys, 7 ranges; 132 SMs want
    # 132, at most one per 64 keys: 19.
    pytest.param(LongDecode("gqa16_no_window", (16, 1), 64, None, 1200, (1199,), {8: (7, 192), 132: (19, 64)}, 8),
                 id="gqa16_no_window"),
    # 2 heads per block, 4 blocks per range: 8 SMs want 4 ranges of 750 keys, capped at 512 -> 6; 132 SMs want 66,
    # at most ceil(3000 / 64) = 47.
    pytest.param(LongDecode("gqa2_capped", (4, 2), 64, 3000, 3000, (3999, 11), {8: (6, 512), 132: (47, 64)}, 2),
                 id="gqa2_capped"),
]


def test_long_decode_cases_reach_every_split_branch():
    """The plans above, which test_attention_decode_long checks against the launches, take every branch of the
    heuristic at both SM counts: ranges capped at 512 keys, ranges sized by the SM count, one range per 64 keys; more
    than 5 splits; 2 heads per block."""
    cases = [p.values[0] for p in LONG_DECODE]
    lens = {sm: {c.plans[sm][1] for c in cases} for sm in (8, 132)}
    assert 512 in lens[8] and 64 in lens[132]
    assert all(any(64 < n < 512 for n in lens[sm]) for sm in lens)
    assert all(any(c.plans[sm][0] > 5 for c in cases) for sm in lens)
    assert any(c.heads_per_block == 2 for c in cases)


@pytest.fixture
def emu_sm_count(request, kernels, fresh_seed):
    """Sets the emulator's multiprocessor count, and the default 8 again afterwards (None on other backends)."""
    if request.node.callspec.params["kernels"] != "emu":
        yield None
        return
    import mistral_ext._emu as emu

    def configure(sm_count):
        emu.configure(threads=False, shuffle_wake=True, seed=fresh_seed, sm_count=sm_count)
        emu.take_launches()

    yield configure
    configure(8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LONG_DECODE)
def test_attention_decode_long(kernels, emu_sm_count, dtype, case):
    """Thousands of keys: many split-KV ranges, ranges of 512 keys, and their log-sum-exp merge, on the emulator at
    8 and at 132 multiprocessors (an H200), whose launches must follow the stated plan."""
    hq, hkv = case.heads
    positions = lengths(*case.positions)
    spans = [(0 if case.window is None else max(0, p - case.window + 1), p) for p in case.positions]
    k_cache = filled_ring(len(spans), case.slots, hkv, case.head_dim, spans)
    v_cache = filled_ring(len(spans), case.slots, hkv, case.head_dim, spans)
    q = randn(len(spans), hq, case.head_dim)
    cast = [t.to(dtype) for t in (q, k_cache, v_cache)]
    ref = reference.attention_decode(q, k_cache, v_cache, positions, case.window)
    low = None if dtype == torch.float32 else reference.attention_decode(*cast, positions, case.window)
    for sm in case.plans if emu_sm_count else [None]:
        if sm:
            emu_sm_count(sm)
        out = kernels.attention_decode(*cast, positions, case.window)
        assert_matches_reference(out, ref, low, what=f"decode {case.name}" + (f" at {sm} SMs" if sm else ""))
        if sm:
            import mistral_ext._emu as emu

            splits, split_len = case.plans[sm]
            max_keys = case.window or case.slots  # the most a query can see in this cache, whatever the positions
            assert emu.decode_splits(max_keys, len(spans), hq, hkv, sm) == dict(
                splits=splits, split_len=split_len, heads_per_block=case.heads_per_block)
            gp = case.heads_per_block
            split, merge = emu.take_launches()
            assert split["kernel"].startswith("decode_split_kernel") and merge["kernel"].startswith("decode_merge")
            assert split["grid"] == (splits, hkv * -(-hq // hkv // gp), len(spans)), split
            # Shared memory: gp x split_len scores, 4 warps' gp x D partial outputs, 2 statistics per head.
            assert split["smem"] == 4 * (gp * split_len + 4 * gp * case.head_dim + 2 * gp), split
            # The same launch at the first positions (one key each): the ranges past a query's keys exit at once, so
            # one plan, and one captured CUDA graph, serves every context.
            first = torch.zeros_like(positions)
            assert_matches_reference(kernels.attention_decode(*cast, first, case.window),
                                     reference.attention_decode(q, k_cache, v_cache, first, case.window),
                                     None if low is None else reference.attention_decode(*cast, first, case.window),
                                     what=f"decode {case.name} at position 0")
            assert emu.take_launches()[0]["grid"] == split["grid"]


def test_window_boundary_is_exact(kernels):
    """Query i sees exactly keys i-W+1 .. i: a key of huge score at j = i-W must not move the output, and one at
    j = i-W+1 must dominate it."""
    window, slots, d, pos = 6, 6, 64, 20
    k_cache, v_cache = torch.randn(1, slots, 1, d), torch.randn(1, slots, 1, d)
    q = torch.randn(1, 1, d)
    positions = torch.tensor([pos])
    base = kernels.attention_decode(q, k_cache, v_cache, positions, window)
    oldest_inside = (pos - window + 1) % slots
    k_cache[0, oldest_inside, 0] = q[0, 0] * 100  # dominates the softmax if it is seen
    v_cache[0, oldest_inside, 0] = 7.0
    out = kernels.attention_decode(q, k_cache, v_cache, positions, window)
    torch.testing.assert_close(out, torch.full_like(out, 7.0), rtol=0, atol=1e-4)
    # Prefill with the cache read before the chunk: key i-W (in the ring) is outside, i-W+1 is inside.
    chunk_start, window = 10, 4
    k_cache, v_cache = torch.randn(1, window, 1, d), torch.randn(1, window, 1, d)
    q, k, v = torch.randn(1, 1, d), torch.randn(1, 1, d), torch.randn(1, 1, d)
    meta = (torch.tensor([1]), torch.tensor([chunk_start]), window)
    base = kernels.attention_prefill(q, k, v, k_cache, v_cache, *meta)
    k_cache[0, (chunk_start - window) % window, 0] = q[0, 0] * 100  # position i - W: must stay unseen
    assert torch.equal(kernels.attention_prefill(q, k, v, k_cache, v_cache, *meta), base)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,slots,decode_steps", [(8, 8, 10), (5, 7, 10), (None, 64, 10), (70, 70, 100)])
@pytest.mark.parametrize("schedule", [[8, 8, 8, 3], [1, 5, 8, 2, 7], [13, 6], [50]], ids=str)
def test_chunked_prefill_then_decode_equals_whole_sequence(kernels, dtype, window, slots, decode_steps, schedule):
    """Chunks (some longer than the ring) attend, then get written; then one token at a time is written and
    decoded. Every output equals masked attention over the whole sequence: no in-window key is lost."""
    hq, hkv, d = 8, 2, 64
    n_prefill = sum(schedule)
    total = n_prefill + decode_steps
    q, k, v = (torch.randn(total, h, d).to(dtype) for h in (hq, hkv, hkv))
    k_cache = torch.full((1, slots, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full((1, slots, hkv, d), float("nan"), dtype=dtype)
    outs, pos = [], 0
    for n in schedule:
        chunk = slice(pos, pos + n)
        meta = (torch.tensor([n]), torch.tensor([pos]))
        outs.append(kernels.attention_prefill(q[chunk], k[chunk], v[chunk], k_cache, v_cache, *meta, window))
        kernels.cache_write(k[chunk], v[chunk], k_cache, v_cache, step_layout(*meta, slots)[1])
        pos += n
    for p in range(n_prefill, total):
        kernels.cache_write(k[p : p + 1], v[p : p + 1], k_cache, v_cache, torch.tensor([p % slots]))
        outs.append(kernels.attention_decode(q[p : p + 1], k_cache, v_cache, torch.tensor([p]), window))
    positions = torch.arange(total)
    mask = reference.window_mask(positions, positions, window)
    whole = reference.masked_attention(q.double(), k.double(), v.double(), mask)
    assert_matches_reference(torch.cat(outs), whole, reference.masked_attention(q, k, v, mask), what="chunked vs whole")


# ---------------- silu_mul ----------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 2 * 14336), (3, 7, 2 * 37)])
def test_silu_mul(kernels, dtype, shape):
    x = randn(*shape, scale=3.0)
    out = kernels.silu_mul(x.to(dtype))
    assert_matches_reference(out, reference.silu_mul(x), reference.silu_mul(x.to(dtype)), what="silu_mul")


def test_silu_mul_extremes(kernels):
    x = torch.tensor([[-1000.0, 0.0, 1000.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(kernels.silu_mul(x), torch.tensor([[-0.0, 0.0, 2000.0]]), rtol=1e-6, atol=0)


# ---------------- dense_linear ----------------


def dense_linear_bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on |dense_linear - exact| for these (already rounded) inputs. The products are exact in fp32
    arithmetic up to one rounding each (none under FMA), and each output is a sum in which no term passes through
    more than n = ceil(K / 8) + 20 roundings: a lane sums at most K / 8 products in order (8 lanes is the narrowest
    vector path; the CUDA lanes take K / 32 each), the lanes then add in log2(lanes) <= 5 steps, and up to 15 tail
    terms follow. So |error| <= n u sum_k |x_k w_k| with u = 2^-24 (the standard gamma_n bound, n u << 1), plus half an
    ulp of the output dtype for the final rounding (at the output's magnitude |ref| + the accumulation bound; an
    output that is subnormal in float16 rounds to a fixed spacing instead), and n float32 subnormal spacings for
    partial sums that underflow."""
    k = x.shape[1]
    terms = x.abs().double() @ w.abs().double().T
    roundings = -(-k // 8) + 20
    accumulated = roundings * 2.0**-24 * terms + roundings * 2.0**-149
    return accumulated + half_ulp(out_dtype, ref.abs() + accumulated)


def assert_within_dense_linear_bound(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = x.double() @ w.double().T
    err = (out.double() - ref).abs()
    bound = dense_linear_bound(x, w, ref, out.dtype)
    assert (err <= bound).all(), f"max error / bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("tokens,n,k", [(1, 37, 100), (7, 45, 133), (9, 19, 64), (2, 8, 31), (3, 5, 1), (0, 4, 16),
                                        (4, 0, 16), (2, 3, 0)])
def test_dense_linear(kernels, dtype, weight_dtype, tokens, n, k):
    x, w = randn(tokens, k).to(dtype), randn(n, k, scale=max(k, 1) ** -0.5).to(weight_dtype)
    out = kernels.dense_linear(x, w)
    assert out.dtype == dtype and out.shape == (tokens, n)
    assert_within_dense_linear_bound(out, x, w)


@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 7, 8, 9, 64, 300])
def test_dense_linear_token_counts(kernels, weight_dtype, tokens):
    """Every tile and block boundary of the token loop (CPU: tiles of 2-6 tokens, blocks of 16-48; CUDA: tiles of 8),
    at shapes that are not multiples of any tile: against the exact product, and row t equal bit for bit to the
    call with token t alone (serving returns the same tokens for a request alone or among others)."""
    n, k = 29, 200
    x, w = randn(tokens, k).float(), randn(n, k, scale=k**-0.5).to(weight_dtype)
    out = kernels.dense_linear(x, w)
    assert_within_dense_linear_bound(out, x, w)
    rows = torch.randperm(tokens)[:5]
    for t in rows.tolist():
        assert torch.equal(kernels.dense_linear(x[t : t + 1], w), out[t : t + 1]), f"row {t} of {tokens}"
    assert torch.equal(kernels.dense_linear(x[rows], w), out[rows])


@pytest.mark.parametrize("weight_dtype", DTYPES)
def test_dense_linear_misaligned(kernels, weight_dtype):
    """Operands starting off a 16-byte boundary (CUDA reads such a row element by element) give the aligned call's
    output bit for bit."""
    namespace, device = ops_and_device(kernels)
    x = torch.randn(5, 72, device=device)
    w = (torch.randn(11, 72, device=device) / 8).to(weight_dtype)
    out = namespace.dense_linear(x, w)
    assert torch.equal(namespace.dense_linear(misaligned(x), misaligned(w)), out)
