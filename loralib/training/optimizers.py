"""The optimizer: parameter groups (text encoders, UNet blocks, LoRA+), the optimizer itself, and the
fused backward pass.

Parameter groups, in a fixed order so that checkpoints restore onto the same groups:

- one group per learning rate: the UNet's ``learning_rate`` times each block's ``*_lr_weight``
  factor, the text encoders' ``text_encoder_lr``;
- with ``loraplus_lr_ratio`` (LoRA+), each group's up factors (peft's ``lora_B``) in a group of
  their own at the learning rate times the ratio.

The fused backward pass (``fused_backward_pass``, sd-scripts' ``--fused_backward_pass``) steps the
optimizer on each tensor from a post-accumulate-grad hook, as soon as its gradient is complete,
and frees the gradient at once: gradients of all layers never exist at the same time. The step of
one tensor is the optimizer's own ``step()`` over a group holding only that tensor, so a fused run
makes exactly the updates of an ordinary one (clipping, when on, is per tensor).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .config import TrainConfig, parse_optimizer_args

#: Optimizers that take a ``weight_decay`` argument.
_DECAYING = ("adamw", "sgd", "adamw8bit", "prodigy", "adafactor")


def parameter_groups(trainable: dict[str, dict[str, torch.nn.Parameter]], config: TrainConfig,
                     lr_weight=None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups.

    ``trainable`` is ``{component: {parameter path: parameter}}``; ``lr_weight(component, path)``
    gives a parameter's learning-rate factor (block-wise learning rates; default 1).
    """
    train = config.training
    ratio = train.loraplus_lr_ratio
    groups: dict[tuple[str, float, bool], list[torch.nn.Parameter]] = {}
    for component, parameters in trainable.items():
        base = train.learning_rate if component in ("unet", "transformer") else config.text_encoder_lr
        for path, parameter in parameters.items():
            factor = lr_weight(component, path) if lr_weight is not None else 1.0
            plus = ratio is not None and ".lora_B." in f".{path}"
            groups.setdefault((component, base * factor, plus), []).append(parameter)
    return [{"params": params, "lr": lr * ratio if plus else lr} for (_, lr, plus), params in groups.items()]


def _optimizer_class(name: str):
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adam":
        return torch.optim.Adam
    if name == "sgd":
        return torch.optim.SGD
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    from transformers.optimization import Adafactor

    return Adafactor


def _defaults(name: str, config: TrainConfig, device: torch.device | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if name in _DECAYING:
        settings["weight_decay"] = config.training.weight_decay
    if name in ("adamw", "adam") and device is not None and device.type in ("cpu", "cuda"):
        settings["fused"] = True  # one kernel for all tensors: several times faster than the per-tensor loop
    if name == "adafactor":  # a fixed learning rate from the schedule, as sd-scripts sets it up
        settings.update(scale_parameter=False, relative_step=False, warmup_init=False)
    return settings


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig,
                    device: torch.device | None = None) -> tuple[torch.optim.Optimizer, str]:
    """The configured optimizer over ``groups`` (on ``device``) and its description for ``ss_optimizer``."""
    name = config.training.optimizer
    if name == "prodigy" and len({group["lr"] for group in groups}) > 1:
        raise InvalidArgumentError("prodigy takes one learning rate for every layer (it finds the step size itself)",
                                   "Remove loraplus_lr_ratio, the *_lr_weight factors and a text_encoder_lr that "
                                   "differs from learning_rate, or use another optimizer")
    cls = _optimizer_class(name)
    arguments = {**_defaults(name, config, device), **parse_optimizer_args(config.training.optimizer_args)}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [key for key in arguments if key not in accepted]
    if unknown:
        raise InvalidArgumentError(f"optimizer {name} has no argument {unknown[0]!r} (optimizer_args)",
                                   f"It takes: {', '.join(k for k in accepted if k not in ('self', 'params'))}")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # prodigy prints notes; stdout may carry --json output
            optimizer = cls(groups, **arguments)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"optimizer {name} refused its settings: {exc}",
                                   "Check learning_rate, weight_decay and optimizer_args") from exc
    shown = ", ".join(f"{key}={value}" for key, value in arguments.items())
    return optimizer, f"{cls.__module__}.{cls.__name__}({shown})"


def _step_one(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, group: dict[str, Any]) -> None:
    """The optimizer's own step over ``parameter`` alone (its state is shared with the full optimizer)."""
    groups = optimizer.param_groups
    optimizer.param_groups = [{**group, "params": [parameter]}]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


def install_fused_backward(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> list[Any]:
    """Step ``optimizer`` on each parameter as soon as its gradient is accumulated; returns the hook handles."""
    handles = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            def hook(tensor: torch.Tensor, group: dict[str, Any] = group) -> None:
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([tensor], max_grad_norm)
                _step_one(optimizer, tensor, group)
                tensor.grad = None

            handles.append(parameter.register_post_accumulate_grad_hook(hook))
    return handles
