"""An op set that rounds the activations of quantized matmuls the way the CPU kernel does and does nothing else
differently: mistral_ext.ops, except quant_linear, which rounds x per block of 32 to int8 (scale max|x| / 127,
to nearest even: csrc/cpu/quant.cpp) and multiplies by the dequantized weights in plain PyTorch. Against the same
model on mistral_ext.reference (float activations) it shows the error that rounding alone makes; the kernels'
error is held to twice that (the factor the op tests allow a low-precision kernel over a naive computation)."""

import types

import torch

from mistral_ext import ops, quant


def round_activations(x: torch.Tensor) -> torch.Tensor:
    blocks = x.float().reshape(*x.shape[:-1], -1, quant.BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape).to(x.dtype)


def quant_linear(x, qweight, scales, mins):
    return round_activations(x) @ quant.dequantize(qweight, scales, mins, x.dtype).T


INT8_ACTIVATIONS = types.SimpleNamespace(**{**{name: getattr(ops, name) for name in ops.__all__},
                                            "quant_linear": quant_linear})
