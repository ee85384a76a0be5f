"""The trained LoRA layers: which layers get them, adding them with peft, reading them back.

Layers are chosen on lorareg's internal keys (the names every format is written from), so the
trained adapter's modules are exactly the chosen layers:

- ``attention``: q, k, v and out projections of every attention (UNet) / self-attention (CLIP);
- ``transformer``: attention plus feed-forward and the transformer blocks' ``proj_in``/``proj_out``
  (the layers kohya's LoRA trains);
- ``locon``: transformer plus the ResNet blocks' convolutions, time-embedding projections and the
  down/up-samplers (kohya's LoCon); 3×3 convs get ``conv_rank``/``conv_alpha``.

``network_type`` chooses the layers added: peft LoRA (or DoRA, peft's ``use_dora``) through
:func:`add_lora`, or LyCORIS' LoHa / LoKr through :mod:`.lycoris_layers`; :func:`add_network`
picks, :func:`trained_layers` finds them again and :func:`export_modules` reads either back.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapter import LoraModule
from ..base_model import adaptable_layers
from ..layers import ATTENTION, FEED_FORWARD, PROJECTION

if TYPE_CHECKING:
    from ..adapter import AdapterModule

ADAPTER_NAME = "default"
# A transformer's final output layer is a projection outside its blocks, which LoRA trainers leave alone.
_OUTPUT_LAYER = re.compile(r"^transformer\.proj_out$")
_RESNET = re.compile(r"\.(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$")


def _wanted(key: str, preset: str) -> bool:
    if _OUTPUT_LAYER.match(key):
        return False
    if ATTENTION.search(key):
        return True
    if preset in ("transformer", "locon") and (FEED_FORWARD.search(key) or PROJECTION.search(key)):
        return True
    return preset == "locon" and key.startswith("unet.") and bool(_RESNET.search(key))


def target_layers(component: str, model: nn.Module, preset: str, also=None) -> dict[str, str]:
    """``{module path in model: internal key}`` of the layers ``preset`` adapts in one component, and those
    whose internal key the predicate ``also`` accepts (Flux.1/SD3 modulation layers given a rank)."""
    keys = {id(module): key for key, module in adaptable_layers(component, model).items()}
    targets = {}
    for name, module in model.named_modules():
        key = keys.get(id(module))
        if key is not None and (_wanted(key, preset) or (also is not None and also(key))):
            targets[name] = key
    return targets


def is_wide_conv(module: nn.Module) -> bool:
    """True for a convolution with a kernel larger than 1×1 (it gets ``conv_rank``/``conv_alpha``)."""
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def layer_settings(model: nn.Module, targets: dict[str, str], *, rank: int, alpha: float, conv_rank: int,
                   conv_alpha: float, blocks=None) -> dict[str, tuple[int, float]]:
    """``{module path: (rank, alpha)}`` of every target; a :class:`~.blocks.BlockPlan` overrides them per
    UNet block (a rank of 0 there leaves the layer out)."""
    modules = dict(model.named_modules())
    settings = {}
    for name, key in targets.items():
        wide = is_wide_conv(modules[name])
        chosen = blocks.settings(key, wide) if blocks is not None else None
        settings[name] = chosen if chosen is not None else ((conv_rank, conv_alpha) if wide else (rank, alpha))
    return {name: value for name, value in settings.items() if value[0] > 0}


def add_lora(model: nn.Module, settings: dict[str, tuple[int, float]], *, dropout: float,
             use_dora: bool = False) -> None:
    """Add peft LoRA (or DoRA) layers with the given ``(rank, alpha)`` to the named modules of ``model``
    (only they will require gradients).

    Uses diffusers' / transformers' own ``add_adapter`` so the model stays loadable by their code.
    Layers that share a (rank, alpha) share one peft pattern, so peft's pattern matching stays fast.
    """
    from peft import LoraConfig

    groups: dict[tuple[int, float], list[str]] = {}
    for name, value in settings.items():
        groups.setdefault(value, []).append(name)
    default = max(groups, key=lambda value: len(groups[value]))
    patterns = {"|".join(re.escape(n) for n in sorted(names)): value for value, names in groups.items()
                if value != default}
    config = LoraConfig(r=default[0], lora_alpha=default[1], lora_dropout=dropout, target_modules=sorted(settings),
                        rank_pattern={p: r for p, (r, _) in patterns.items()},
                        alpha_pattern={p: a for p, (_, a) in patterns.items()}, init_lora_weights=True,
                        use_dora=use_dora)
    model.requires_grad_(False)
    model.add_adapter(config)


def add_network(model: nn.Module, settings: dict[str, tuple[int, float]], network_type: str, *, dropout: float,
                factor: int = -1, decompose_both: bool = False) -> None:
    """Add the trainable layers of ``network_type`` (``lora``, ``dora``, ``loha``, ``lokr``) with the given
    ``(rank, alpha)`` to the named modules of ``model``."""
    from .lycoris_layers import KINDS, add_lycoris

    if network_type in KINDS:
        add_lycoris(model, settings, network_type, factor=factor, decompose_both=decompose_both)
    else:
        add_lora(model, settings, dropout=dropout, use_dora=network_type == "dora")


def trained_layers(model: nn.Module, targets: dict[str, str]) -> dict[str, nn.Module]:
    """``{internal key: trained layer}``: peft LoRA layers, or LyCORIS layers after :func:`add_network`."""
    from .lycoris_layers import lycoris_layers

    return lora_layers(model, targets) or lycoris_layers(model, targets)


def layer_path(parameter_path: str) -> str:
    """The adapted layer's module path in a trainable parameter's path (``….to_q.lora_A.default.weight``,
    ``….to_q.lycoris.hada_w1_a`` -> ``….to_q``)."""
    from .lycoris_layers import CHILD

    return parameter_path.split(".lora_", 1)[0].split(f".{CHILD}.", 1)[0]


def lora_layers(model: nn.Module, targets: dict[str, str]) -> dict[str, nn.Module]:
    """``{internal key: peft LoRA layer}`` after :func:`add_lora`."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in targets:
            found[targets[name]] = module
    return found


def export_modules(layers: dict[str, nn.Module]) -> dict[str, AdapterModule]:
    """The trained factors as lorareg modules (kohya convention: ΔW = alpha / rank · up @ down); a layer
    trained with ``use_dora`` becomes a :class:`~loralib.lycoris.kinds.DoraModule` around them, with
    peft's magnitude (one per output feature, no epsilon); a LoHa/LoKr layer its LyCORIS module."""
    from ..lycoris.kinds import dora
    from .lycoris_layers import TrainedLycoris

    modules = {}
    for key, layer in layers.items():
        if isinstance(layer, TrainedLycoris):
            modules[key] = layer.export()
            continue
        down = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone()
        up = layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone()
        rank = layer.r[ADAPTER_NAME]
        alpha = float(layer.lora_alpha[ADAPTER_NAME])
        if layer.use_rslora.get(ADAPTER_NAME, False):  # rsLoRA scales by alpha / sqrt(r); restate as alpha' / r
            alpha *= rank ** 0.5
        module = LoraModule(down, up, alpha)
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if magnitude is not None and ADAPTER_NAME in magnitude:
            module = dora(module, magnitude[ADAPTER_NAME].weight.detach().float().cpu().clone(), "peft")
        modules[key] = module
    return modules


def trainable_parameters(model: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    """Every parameter that requires a gradient, named ``<prefix>.<parameter path>``."""
    return {f"{prefix}.{name}": p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(parameters: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into the live parameters (exactly; names and shapes must match)."""
    missing = sorted(set(parameters) - set(tensors))
    unexpected = sorted(set(tensors) - set(parameters))
    if missing or unexpected:
        from ..errors import MismatchError

        raise MismatchError(f"the checkpoint's LoRA layers do not match this configuration "
                            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. "
                            f"{(missing + unexpected)[0]})",
                            "Resume with the configuration the checkpoint was made with")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[name].to(parameter.dtype))
