"""The spec itself, checked against an independent implementation: reference.forward equals HF transformers'
MistralForCausalLM in float64, beyond the sliding window, for GQA 1, 4 and 8, with and without tied embeddings."""

import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import MistralConfig, MistralForCausalLM

from mistral_ext import reference
from mistral_ext.args import ModelArgs

HF_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_model(args: ModelArgs, window) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, sliding_window=window, tie_word_embeddings=args.tie_embeddings,
        attn_implementation="eager")
    return MistralForCausalLM(config).double().eval()


def randomise(model: MistralForCausalLM) -> None:
    """Weights of unit-scale activations (HF's 0.02 init makes attention almost uniform, hiding window errors)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1] if "embed" not in name else 1))


def our_weights(model: MistralForCausalLM, args: ModelArgs) -> dict:
    sd = model.state_dict()
    weights = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not args.tie_embeddings:
        weights["output.weight"] = sd["lm_head.weight"]
    for i in range(args.n_layers):
        for ours, theirs in HF_NAMES.items():
            weights[f"layers.{i}.{ours}"] = sd[f"model.layers.{i}.{theirs}"]
    return weights


@pytest.mark.parametrize(
    "heads,window,seqlen,tied",
    [((4, 4), 5, 23, False), ((8, 2), 8, 29, True), ((8, 1), 16, 21, False), ((4, 1), None, 19, False),
     ((4, 4), 1, 9, False)],
)
def test_reference_forward_matches_hf_mistral(heads, window, seqlen, tied):
    args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=heads[0], n_kv_heads=heads[1],
                     vocab_size=101, sliding_window=window, max_seq_len=64, tie_embeddings=tied)
    model = hf_model(args, window)
    randomise(model)
    weights = our_weights(model, args)
    tokens = torch.randint(0, args.vocab_size, (2, seqlen))
    ours = reference.forward(weights, args, tokens)
    with torch.no_grad():
        theirs = model(tokens).logits
    # Both float64, except that HF forms RoPE angles in float32 (~1e-7 relative): hence 1e-5, not 1e-12.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if window is not None and window < seqlen:
        # The comparison can see a window that is off by one: W + 1 changes the logits past position W.
        wider = reference.forward(weights, ModelArgs(**{**args.__dict__, "sliding_window": window + 1}), tokens)
        assert (wider[:, window:] - theirs[:, window:]).abs().max() > 1e-3
        torch.testing.assert_close(wider[:, :window], theirs[:, :window], rtol=1e-5, atol=1e-5)


def test_window_mask_counts_w_keys_itself_included():
    pos = torch.arange(12)
    mask = reference.window_mask(pos, pos, 4)
    assert mask.sum(-1).tolist() == [1, 2, 3, 4] + [4] * 8
    assert mask[9, 9] and mask[9, 6] and not mask[9, 5] and not mask[9, 10]


def test_mistral_7b_args_are_the_papers():
    a = ModelArgs.mistral_7b()
    assert (a.dim, a.n_layers, a.head_dim, a.hidden_dim, a.n_heads, a.n_kv_heads) == (4096, 32, 128, 14336, 32, 8)
    assert (a.sliding_window, a.max_seq_len, a.vocab_size, a.rope_theta, a.norm_eps) == (4096, 8192, 32000, 1e4, 1e-5)


@pytest.mark.parametrize("bad", [{"n_heads": 6, "n_kv_heads": 4}, {"head_dim": 7}, {"sliding_window": 0}, {"dim": 0}])
def test_model_args_reject_bad_configs(bad):
    base = dict(dim=8, n_layers=1, head_dim=4, hidden_dim=8, n_heads=2, n_kv_heads=1, vocab_size=5)
    with pytest.raises(ValueError, match="ModelArgs"):
        ModelArgs(**{**base, **bad})
