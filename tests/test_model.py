"""The engine against the spec (reference.forward, float64): whole-sequence forward, explicit prefill chunks and
token-by-token decode, well past the sliding window, for batches of unequal prompts."""

import pytest
import torch
from torch import nn

import mistral_ext
from mistral_ext import ModelArgs, ops, reference
from mistral_ext.engine import from_weights
from mistral_ext.quant import QuantizedWeight
from conftest import CPU_PATHS, GPU_KERNEL_SETS, LOW_PRECISION
from tiny import tiny_args

W = 16


def random_weights(args: ModelArgs, std: float = 0.15) -> dict:
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    for i in range(args.n_layers):
        shapes |= {f"layers.{i}.attention.wq.weight": (q, args.dim), f"layers.{i}.attention.wk.weight": (kv, args.dim),
                   f"layers.{i}.attention.wv.weight": (kv, args.dim), f"layers.{i}.attention.wo.weight": (args.dim, q),
                   f"layers.{i}.feed_forward.w1.weight": (args.hidden_dim, args.dim),
                   f"layers.{i}.feed_forward.w3.weight": (args.hidden_dim, args.dim),
                   f"layers.{i}.feed_forward.w2.weight": (args.dim, args.hidden_dim),
                   f"layers.{i}.attention_norm.weight": (args.dim,), f"layers.{i}.ffn_norm.weight": (args.dim,)}
    return {n: (1 + 0.1 * torch.randn(s, dtype=torch.float64)) if len(s) == 1 else std * torch.randn(s, dtype=torch.float64)
            for n, s in shapes.items()}


def assert_logits_close(ours, ref64, what):
    """float32 engine against the float64 spec: max error <= 1e-4 x max(1, |logit|max)."""
    err = (ours.double() - ref64).abs().max().item()
    bound = 1e-4 * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: max logit error {err:.3g} > {bound:.3g}"


@pytest.fixture(params=[dict(n_heads=4, n_kv_heads=1), dict(n_heads=6, n_kv_heads=2, sliding_window=None),
                        dict(n_heads=4, n_kv_heads=4, tie_embeddings=True)],
                ids=["gqa4-window", "gqa3-nowindow", "gqa1-tied"])
def setup(request):
    args = tiny_args(**request.param)
    weights = random_weights(args)
    return args, weights, from_weights(args, weights, device="cpu", dtype=torch.float32)


def test_forward_matches_reference_past_the_window(setup):
    args, weights, model = setup
    tokens = torch.randint(0, args.vocab_size, (2, 5 * W + 3))
    assert_logits_close(model.forward(tokens), reference.forward(weights, args, tokens), "forward")


def test_prefill_chunks_and_decode_match_reference(setup):
    """Two prompts of unequal length in one batch: explicit chunks shorter than and equal to W, then decode."""
    args, weights, model = setup
    seqs = [torch.randint(0, args.vocab_size, (6 * W,)) for _ in range(2)]
    ref = [reference.forward(weights, args, s[None])[0] for s in seqs]
    cache = model.new_cache(2)
    cuts = [(0, 5, 0, W), (5, 5 + W, W, W + 7), (5 + W, 5 + 2 * W, W + 7, W + 8)]  # (a0, a1, b0, b1) per call
    for a0, a1, b0, b1 in cuts:
        logits = model.prefill([seqs[0][a0:a1].tolist(), seqs[1][b0:b1].tolist()], cache)
        assert_logits_close(logits, torch.stack([ref[0][a1 - 1], ref[1][b1 - 1]]), f"prefill up to {a1}, {b1}")
    assert cache.positions.tolist() == [5 + 2 * W, W + 8]
    # Token by token until both sequences are past 4W: sequence 1 runs W - 3 positions behind sequence 0.
    a, b = 5 + 2 * W, W + 8
    while a < 6 * W:
        logits = model.decode(torch.tensor([int(seqs[0][a]), int(seqs[1][b])]), cache)
        assert_logits_close(logits, torch.stack([ref[0][a], ref[1][b]]), f"decode at {a}, {b}")
        a, b = a + 1, b + 1


def test_long_generation_stays_exact():
    """After 10 W generated tokens the decode logits at positions >= 9 W equal the spec's whole-sequence forward."""
    args = tiny_args(n_heads=8, n_kv_heads=2)
    weights = random_weights(args)
    model = from_weights(args, weights, device="cpu", dtype=torch.float32)
    tokens = torch.randint(0, args.vocab_size, (5,)).tolist()
    cache = model.new_cache(1)
    logits = model.prefill([tokens], cache)
    seen = []
    for _ in range(10 * W):
        tokens.append(int(logits[0].argmax()))
        seen.append(logits[0])
        logits = model.decode(torch.tensor(tokens[-1:]), cache)
    ref = reference.forward(weights, args, torch.tensor([tokens]))[0]
    start = 9 * W
    assert_logits_close(torch.stack(seen[start - 4 :]), ref[start : 5 + 10 * W - 1], "logits past 9W")
    assert cache.k[0].shape[1] == W  # the ring never grew


def test_cache_memory_is_w_slots_with_window_and_context_without():
    assert tiny_args().sliding_window == W
    model = from_weights(tiny_args(), random_weights(tiny_args()), device="cpu")
    assert model.new_cache(3).k[0].shape == (3, W, 1, 16)
    args = tiny_args(sliding_window=None, max_seq_len=40)
    model = from_weights(args, random_weights(args), device="cpu")
    assert model.new_cache(2).v[1].shape == (2, 40, 1, 16)


def test_mistral_7b_cache_shape_is_the_papers():
    from mistral_ext.model import RollingBufferCache

    cache = RollingBufferCache(ModelArgs.mistral_7b(), 1, "meta", torch.bfloat16)
    assert len(cache.k) == 32 and cache.k[0].shape == (1, 4096, 8, 128)


def test_step_metadata_is_the_docstrings_worked_example():
    """RollingBufferCache's example, W = S = 4, prompts of 6 and 2 tokens: round 2 and the decode step after it."""
    from mistral_ext.model import RollingBufferCache

    cache = RollingBufferCache(tiny_args(sliding_window=4), 2, "cpu", torch.float32)
    cache.advance(cache.step(torch.tensor([4, 2]), decode=False))
    step = cache.step(torch.tensor([2, 0]), decode=False)
    assert step.start_pos.tolist() == [4, 2] and step.positions.tolist() == [4, 5]
    assert step.cache_rows.tolist() == [0, 1] and step.chunks.tolist() == [[2, 0], [4, 2]]
    cache.advance(step)
    step = cache.step(torch.tensor([1, 1]), decode=True)
    assert step.chunks is None and step.positions.tolist() == [6, 2] and step.cache_rows.tolist() == [2, 6]
    idle = cache.step(torch.tensor([0, 1]), decode=True)
    assert idle.rows.tolist() == [1] and idle.positions.tolist() == [2] and idle.cache_rows.tolist() == [6]


def test_reference_kernels_run_the_same_cached_loop():
    """use_kernels(reference) swaps every op: the naive baseline of the benchmarks gives the same logits."""
    args = tiny_args()
    weights = random_weights(args)
    fast = from_weights(args, weights, device="cpu", dtype=torch.float32)
    naive = from_weights(args, weights, device="cpu", dtype=torch.float32)
    naive.transformer.use_kernels(reference)
    tokens = torch.randint(0, args.vocab_size, (2, 3 * W))
    assert naive.transformer.layers[0].attention.kernels is reference
    torch.testing.assert_close(naive.forward(tokens), fast.forward(tokens), rtol=1e-4, atol=1e-4)


def test_unwritten_cache_slots_are_never_read(setup):
    """Fill every cache slot with NaN before use: a read of a slot that was never written would show up."""
    args, weights, model = setup
    tokens = torch.randint(0, args.vocab_size, (2, 3 * W + 1))
    cache = model.new_cache(2)
    for t in cache.k + cache.v:
        t.fill_(float("nan"))
    logits = model.prefill(tokens[:, :W + 3].tolist(), cache)
    for i in range(W + 3, 3 * W + 1):
        assert torch.isfinite(logits).all()
        logits = model.decode(tokens[:, i], cache)
    ref = reference.forward(weights, args, tokens)[:, -1]
    assert_logits_close(logits, ref, "after NaN-filled cache")


@pytest.mark.parametrize("kernel_set", GPU_KERNEL_SETS)
@pytest.mark.parametrize("heads", [dict(n_heads=4, n_kv_heads=1), dict(n_heads=6, n_kv_heads=2, sliding_window=None)],
                         ids=["gqa4-window", "gqa3-nowindow"])
def test_cuda_kernels_run_the_model(kernel_set, heads):
    """The whole model on the CUDA kernels (head_dim 64): emulated on the CPU, or on the GPU when there is one.
    Unequal prompts in chunks past the window, then decode, against the float64 spec."""
    args = tiny_args(dim=256, head_dim=64, **heads)
    weights = random_weights(args)
    device = "cuda" if kernel_set == "cuda" else "cpu"
    model = from_weights(args, weights, device=device, dtype=torch.float32)
    if kernel_set == "emu":
        model.transformer.use_kernels(torch.ops.mistral_ext_emu)
    seqs = [torch.randint(0, args.vocab_size, (4 * W,)) for _ in range(2)]
    ref = [reference.forward(weights, args, s[None])[0] for s in seqs]
    cache = model.new_cache(2)
    for a0, a1, b0, b1 in [(0, 5, 0, W), (5, 5 + W, W, W + 7)]:
        logits = model.prefill([seqs[0][a0:a1].tolist(), seqs[1][b0:b1].tolist()], cache)
        assert_logits_close(logits.cpu(), torch.stack([ref[0][a1 - 1], ref[1][b1 - 1]]), f"prefill up to {a1}, {b1}")
    a, b = 5 + W, W + 7
    while a < 3 * W:
        logits = model.decode(torch.tensor([int(seqs[0][a]), int(seqs[1][b])], device=device), cache)
        assert_logits_close(logits.cpu(), torch.stack([ref[0][a], ref[1][b]]), f"decode at {a}, {b}")
        a, b = a + 1, b + 1


@pytest.mark.parametrize("kernel_set", ["cpu"] + GPU_KERNEL_SETS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_model_matches_reference(kernel_set, dtype, fresh_seed):
    """The whole model in bfloat16/float16: a prompt of 2W + 5 tokens (three prefill chunks) beside one of 3, then 4W
    decode steps, so sequence 1 decodes inside its first window while sequence 0's ring wraps.

    Truth is reference.forward in float64 on the same (rounded) weights, so only the computation's rounding counts.
    Bound: twice the error of reference.forward run naively in `dtype` on those weights, over all compared logits,
    plus one unit of `dtype` at the logits' scale (the final rounding of a logit). The naive forward rounds every
    intermediate (scores, softmax, rope's cos/sin, the norms' mean of squares) to `dtype` where the kernels keep
    fp32, and both round the matmul outputs and the residual stream alike, so 2x is fair and loose: the kernels'
    error measured 0.3-0.7 (bf16) and 0.05-0.07 (fp16) against bounds of 1.3-2.3 and 0.18-0.32. A decode window
    widened by one key or a rope position off by one in decode still exceeds the bound (errors of 4-7)."""
    args = tiny_args(dim=256, head_dim=64, n_heads=4, n_kv_heads=1)
    weights = {n: t.to(dtype) for n, t in random_weights(args).items()}
    device = "cuda" if kernel_set == "cuda" else "cpu"
    model = from_weights(args, weights, device=device, dtype=dtype)
    if kernel_set == "emu":
        import mistral_ext._emu as emu

        emu.configure(seed=fresh_seed)
        model.transformer.use_kernels(torch.ops.mistral_ext_emu)
    prompts, steps = [2 * W + 5, 3], 4 * W
    seqs = [torch.randint(0, args.vocab_size, (n + steps,)) for n in prompts]
    truth = [reference.forward({n: t.double() for n, t in weights.items()}, args, s[None])[0] for s in seqs]
    naive = [reference.forward(weights, args, s[None])[0] for s in seqs]
    cache = model.new_cache(2)
    rows = [model.prefill([s[:n].tolist() for s, n in zip(seqs, prompts)], cache).cpu()]
    for i in range(steps):
        rows.append(model.decode(torch.tensor([int(s[n + i]) for s, n in zip(seqs, prompts)]), cache).cpu())
    ours = torch.stack(rows, dim=1)  # [2, steps + 1, vocab]: positions n - 1 .. n + steps - 1 of each sequence
    ref = torch.stack([t[n - 1 : n + steps] for t, n in zip(truth, prompts)])
    low = torch.stack([t[n - 1 : n + steps] for t, n in zip(naive, prompts)]).double()
    err = (ours.double() - ref).abs()
    bound = 2 * (low - ref).abs().max().item() + torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
    worst = divmod(int(err.amax(-1).argmax()), steps + 1)
    assert err.max().item() <= bound, (f"max logit error {err.max().item():.3g} (sequence {worst[0]}, step "
                                       f"{worst[1]}) exceeds {bound:.3g}")


def test_compiled_decode_gives_the_eager_logits():
    """Model.compile() traces the whole decode step into one graph (fullgraph: a graph break or a branch on a
    tensor's value in the step would raise) and, with the cache written inside the graph, gives the eager
    logits bit for bit over steps crossing the window, at two batch sizes; bad token ids are still refused."""
    args = tiny_args(n_heads=4, n_kv_heads=2)
    weights = random_weights(args)
    eager, compiled = (from_weights(args, weights, device="cpu", dtype=torch.float32) for _ in range(2))
    compiled.compile()
    for batch in (1, 3):
        prompts = [torch.randint(0, args.vocab_size, (n,)).tolist() for n in (5, 9, 2)[:batch]]
        caches = [m.new_cache(batch) for m in (eager, compiled)]
        tokens = eager.prefill(prompts, caches[0]).argmax(-1)
        assert torch.equal(compiled.prefill(prompts, caches[1]).argmax(-1), tokens)
        for _ in range(W + 3):
            ours, theirs = compiled.decode(tokens, caches[1]), eager.decode(tokens, caches[0])
            assert torch.equal(ours, theirs)
            tokens = theirs.argmax(-1)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            compiled.decode(torch.full((batch,), args.vocab_size), caches[1])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_decode_graph_inputs_give_the_eager_logits(compiled):
    """The decode step as graphs.DecodeGraph runs it (static token/position buffer, slot mapping computed from the
    positions inside the step; on the CPU the step runs eagerly through those buffers, on CUDA it is captured)
    gives Model.decode's logits bit for bit over steps crossing the ring's wrap, after a row rewinds and prefills
    between steps, with unequal rows; one DecodeGraph serves the cache throughout; bad ids are refused first."""
    args = tiny_args(n_heads=8, n_kv_heads=2)
    weights = random_weights(args)
    plain, graphed = (from_weights(args, weights, device="cpu", dtype=torch.float32) for _ in range(2))
    graphed.cuda_graphs = True
    if compiled:
        graphed.compile()
    prompts = [torch.randint(0, args.vocab_size, (n,)).tolist() for n in (3, W + 5)]
    caches = [m.new_cache(2) for m in (plain, graphed)]
    tokens = plain.prefill(prompts, caches[0]).argmax(-1)
    graphed.prefill(prompts, caches[1])
    graph = None
    for step in range(W + 4):
        if step == 6:  # row 0 goes back to 2 positions (its ring has not wrapped) and prefills a new turn
            turn = torch.randint(0, args.vocab_size, (4,)).tolist()
            for m, c in zip((plain, graphed), caches):
                c.rewind(0, 2)
                m.step([turn, []], c)
        ours, theirs = graphed.decode(tokens, caches[1]), plain.decode(tokens, caches[0])
        assert torch.equal(ours, theirs), step
        assert torch.equal(caches[1].positions, caches[0].positions)
        graph = graph or caches[1].decode_graph
        assert caches[1].decode_graph is graph and caches[0].decode_graph is None
        tokens = theirs.argmax(-1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        graphed.decode(torch.tensor([0, args.vocab_size]), caches[1])
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        graphed.decode(torch.tensor([0, 1, 2]), caches[1])


@pytest.mark.parametrize("window", [4, 16, None], ids=["window-below", "window-crossed", "no-window"])
@pytest.mark.parametrize("heads", [dict(n_heads=4, n_kv_heads=4), dict(n_heads=4, n_kv_heads=1),
                                   dict(n_heads=8, n_kv_heads=1)], ids=["gqa1", "gqa4", "gqa8"])
def mixed_parts(model, weights) -> None:
    """Each block's wqkv held as row blocks in different formats (wq in q4_1, wk | wv in q8_0; as a Q4_K_M file's
    Q4_K and Q6_K parts load), an nn.ModuleList of QuantizedWeight, as the loaders keep it."""
    for i, layer in enumerate(model.transformer.layers):
        wq = weights[f"layers.{i}.attention.wq.weight"].float()
        wkv = torch.cat([weights[f"layers.{i}.attention.{n}.weight"].float() for n in ("wk", "wv")])
        layer.attention.wqkv = nn.ModuleList([QuantizedWeight.quantize(wq, "q4_1"), QuantizedWeight.quantize(wkv, "q8_0")])


def decode_both_ways(model, prompts, fed) -> dict:
    """Logits of `fed` decoded after `prompts`, with the blocks as one ops.decode_layers (True) and each block's
    forward from Python (False), each from a new cache."""
    logits = {}
    for fused in (True, False):
        model.transformer.fused_decode = fused
        cache = model.new_cache(len(prompts))
        model.prefill(prompts, cache)
        logits[fused] = torch.stack([model.decode(tokens, cache) for tokens in fed])
    return logits


# weights as held -> (weights' dtype, quantize=, activations' dtype)
WEIGHTS_AS = {"float32": (torch.float64, None, None), "bfloat16": (torch.bfloat16, None, None),
              "int8": (torch.float64, "int8", None), "int4": (torch.float64, "int4", None),
              "mixed-parts": (torch.float64, "int4", None), "bfloat16-activations": (torch.float64, None, torch.bfloat16),
              "int4-float16-activations": (torch.float64, "int4", torch.float16)}


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request):
    """Each CPU code path this CPU runs, as the default for the test."""
    missing = mistral_ext.cpu_paths()[request.param]["missing_features"]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)} for the {request.param} path")
    before = mistral_ext.cpu_path()
    mistral_ext.set_cpu_path(request.param)
    yield request.param
    mistral_ext.set_cpu_path(before)


def fused_and_python(args, weights_as, monkeypatch, threads=None):
    """A model of `args` with its weights held as `weights_as`, decoded both ways (decode_both_ways) from unequal
    prompts over 12 steps, with `threads` threads; checks the Python path really ran its blocks."""
    dtype, quantize, activations = WEIGHTS_AS[weights_as]
    weights = {n: t.to(dtype) for n, t in random_weights(args).items()}
    model = from_weights(args, weights, device="cpu", quantize=quantize, dtype=activations)
    if weights_as == "mixed-parts":
        mixed_parts(model, weights)
    python_calls = []
    monkeypatch.setattr(ops, "attention_decode",
                        lambda *a: python_calls.append(1) or torch.ops.mistral_ext.attention_decode(*a))
    prompts = [torch.randint(0, args.vocab_size, (n,)).tolist() for n in (3, 11)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        logits = decode_both_ways(model, prompts, torch.randint(0, args.vocab_size, (12, 2)))
    finally:
        torch.set_num_threads(before)
    assert len(python_calls) == 12 * args.n_layers
    return logits


@pytest.mark.parametrize("window", [4, 16, None], ids=["window-below", "window-crossed", "no-window"])
@pytest.mark.parametrize("heads", [dict(n_heads=4, n_kv_heads=4), dict(n_heads=4, n_kv_heads=1),
                                   dict(n_heads=8, n_kv_heads=1)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("weights_as", list(WEIGHTS_AS))
def test_decode_layers_is_the_python_blocks(weights_as, heads, window, cpu_path, monkeypatch):
    """ops.decode_layers, the CPU's default decode step of the blocks (one parallel region running the pieces of
    their ops), against the ops called one by one from Python (Transformer.fused_decode False): the logits of
    unequal rows over decode steps that cross the window, bit for bit (the same arithmetic on the same values: no
    tolerance applies), on every CPU code path. The Python path's attention_decode calls are counted, so a fused
    step that fell back to Python fails."""
    logits = fused_and_python(tiny_args(**heads, sliding_window=window), weights_as, monkeypatch)
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_layers_at_any_thread_count(threads, monkeypatch):
    """The threads share each phase's work (rows of a matrix, attention's items, sequences) and wait at barriers:
    with one thread, or more threads than sequences, KV heads or cores, the step is still the Python blocks'."""
    logits = fused_and_python(tiny_args(n_heads=6, n_kv_heads=3, sliding_window=4), "mixed-parts", monkeypatch,
                              threads)
    assert torch.equal(logits[True], logits[False])


def test_decode_plan_follows_replaced_weights():
    """The tensors ops.decode_layers takes are gathered once (Transformer.decode_plan) and gathered again after any
    assignment on the model's modules: a replaced dense matrix, a matrix replaced by a quantized one, a quantized
    matrix's scales replaced. A stale plan would decode with the old weights, unlike the Python blocks."""
    args = tiny_args()
    model = from_weights(args, random_weights(args), device="cpu")
    prompts, fed = [[1, 2, 3]], torch.randint(0, args.vocab_size, (4, 1))
    before = decode_both_ways(model, prompts, fed)
    first, second = model.transformer.layers
    first.attention.wo = nn.Parameter(torch.randn_like(first.attention.wo) * 0.15, requires_grad=False)
    del second.feed_forward.w13  # nn.Module replaces a parameter by a module only once it is gone
    second.feed_forward.w13 = QuantizedWeight.quantize(torch.randn(2 * args.hidden_dim, args.dim) * 0.15, "q8_0")
    after = decode_both_ways(model, prompts, fed)
    assert torch.equal(after[True], after[False]) and not torch.equal(after[True], before[True])
    w13 = second.feed_forward.w13
    w13.scales = w13.scales * 2
    rescaled = decode_both_ways(model, prompts, fed)
    assert torch.equal(rescaled[True], rescaled[False]) and not torch.equal(rescaled[True], after[True])
