"""Frozen base weights stored as 8-bit floats and computed in a wider dtype.

Every frozen ``nn.Linear`` and ``nn.Conv2d`` weight of a model (the base layers under peft's LoRA
layers included; the LoRA factors, which require gradients, are left alone) is cast to
``float8_e4m3fn`` or ``float8_e5m2``. Its forward casts the weight to the compute dtype for one
operation, and the backward pass casts it again from the 8-bit copy, so no wide copy of a weight
outlives the operation that uses it: the base model takes half the memory of bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.shape, ctx.options = x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding, dilation,
                        groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        grad_x = torch.nn.grad.conv2d_input(ctx.shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


def _linear_forward(module: nn.Linear, dtype: torch.dtype):
    def forward(x):
        return _Fp8Linear.apply(x.to(dtype), module.weight, module.bias, dtype)

    return forward


def _conv_forward(module: nn.Conv2d, dtype: torch.dtype):
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError(f"fp8 storage supports zero-padded convolutions with numeric padding, not {module}")

    def forward(x):
        return _Fp8Conv2d.apply(x.to(dtype), module.weight, module.bias, dtype, module.stride, module.padding,
                                module.dilation, module.groups)

    return forward


def store_in_fp8(model: nn.Module, storage: torch.dtype, compute: torch.dtype) -> int:
    """Store the frozen Linear/Conv2d weights of ``model`` in ``storage`` (an fp8 dtype), computing in
    ``compute``; returns how many layers were converted. Layers with trainable weights are skipped."""
    converted = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, nn.Conv2d) or module.weight.requires_grad:
            continue
        if module.bias is not None and module.bias.requires_grad:
            continue
        forward = _linear_forward(module, compute) if isinstance(module, nn.Linear) else _conv_forward(module, compute)
        module.weight.data = module.weight.data.to(storage)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(compute)
        module.forward = forward
        converted += 1
    return converted
