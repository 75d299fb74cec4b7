"""Checkpoints written by HF transformers (save_pretrained) and Mistral consolidated folders made from them load
with mistral_ext.load and give HF's logits (fp32) past the window, and HF's greedy continuations."""

import pytest
import torch

pytest.importorskip("transformers")
import mistral_ext
from conftest import GPU_KERNEL_SETS
from tiny import random_hf_model, save_consolidated, save_hf, tiny_args

CONFIGS = {  # GQA ratios 1, 3, 4, 8; head_dim 64 and 128; window and none; tied and untied
    "gqa1-hd64-window-untied": dict(n_heads=4, n_kv_heads=4, head_dim=64),
    "gqa3-hd128-nowindow-tied": dict(n_heads=6, n_kv_heads=2, head_dim=128, sliding_window=None, tie_embeddings=True),
    "gqa4-hd64-window-tied": dict(n_heads=8, n_kv_heads=2, head_dim=64, tie_embeddings=True),
    "gqa8-hd128-window-untied": dict(n_heads=8, n_kv_heads=1, head_dim=128),
}


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def assert_loads_to_hf_logits(folder, hf, tokens):
    """fp32 load of `folder` against HF fp32: within 1e-4 relative to the largest logit."""
    model = mistral_ext.load(folder, device="cpu", dtype=torch.float32)
    theirs = hf_logits(hf, tokens)
    torch.testing.assert_close(model.forward(tokens), theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    args = tiny_args(**CONFIGS[request.param])
    hf = random_hf_model(args)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return args, hf, folder


def test_logits_match_hf_past_the_window(pair):
    args, hf, folder = pair
    model = assert_loads_to_hf_logits(folder, hf, torch.randint(0, args.vocab_size, (2, 3 * 16 + 5)))
    assert model.args == args


def test_greedy_continuations_match_hf_for_unequal_prompts(pair):
    args, hf, folder = pair
    model = mistral_ext.load(folder, device="cpu", dtype=torch.float32)
    prompts = [torch.randint(0, args.vocab_size, (n,)).tolist() for n in (3, 21, 9)]
    steps = 40
    ours = mistral_ext.generate_tokens(model, prompts, max_tokens=steps)
    compared = 0
    for prompt, got in zip(prompts, ours):
        seq = list(prompt)
        for step in range(steps):
            last = hf_logits(hf, torch.tensor([seq]))[0, -1]
            top2 = last.topk(2).values
            if top2[0] - top2[1] < 1e-3:
                break  # a near-tie: either token is right, and what follows may differ
            expected = int(last.argmax())
            assert got[step] == expected, f"step {step} of prompt {prompt}: {got[step]} != HF {expected}"
            seq.append(expected)
            compared += 1
    assert compared >= steps  # the guard may cut a sequence short, but not the whole comparison


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_consolidated_folder_gives_hf_logits(pair, fmt, tmp_path):
    args, hf, _ = pair
    folder = save_consolidated(hf, args, tmp_path / "consolidated", fmt)
    assert_loads_to_hf_logits(folder, hf, torch.randint(0, args.vocab_size, (1, 2 * 16 + 3)))


def test_bf16_load_is_close_to_hf(pair):
    args, hf, folder = pair
    model = mistral_ext.load(folder, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    tokens = torch.randint(0, args.vocab_size, (1, 40))
    theirs = hf_logits(hf, tokens)
    err = (model.forward(tokens) - theirs).abs().max().item()
    assert err < 0.1 * theirs.abs().max().item(), err  # bf16 weights and activations: a loose sanity bound


@pytest.mark.parametrize("kernel_set", GPU_KERNEL_SETS)
def test_cuda_kernels_give_hf_logits(kernel_set, pair):
    """The CUDA kernels (emulated on the CPU, or on the GPU when there is one) against HF transformers, in every
    configuration above, past the sliding window, float32: within 1e-4 of the largest logit."""
    args, hf, folder = pair
    device = "cuda" if kernel_set == "cuda" else "cpu"
    model = mistral_ext.load(folder, device=device, dtype=torch.float32)
    if kernel_set == "emu":
        model.transformer.use_kernels(torch.ops.mistral_ext_emu)
    tokens = torch.randint(0, args.vocab_size, (2, 3 * 16 + 5))
    theirs = hf_logits(hf, tokens)
    ours = model.forward(tokens.to(device)).cpu()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
