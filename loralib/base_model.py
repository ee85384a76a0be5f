"""The layers of a real base model that an adapter can target, under lorareg's internal keys.

Used wherever an adapter meets a model: fusing (bake), training, checking that an adapter fits
a model, and building full-size module tables on the ``meta`` device.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import ARCHITECTURES, COMPONENTS, T5
from .layers import LayerShape
from .naming import internal_key

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)  # what LyCORIS' norm modules (and ComfyUI's 1-D .diff) change


def adaptable_layers(component: str, model: nn.Module, *, norms: bool = False) -> dict[str, nn.Module]:
    """Every Linear and Conv2d layer of one component (and LayerNorm/GroupNorm with ``norms``), by internal key.

    Text encoders' embeddings are not LoRA targets and are left out.
    """
    kinds = (nn.Linear, nn.Conv2d, *NORM_LAYERS) if norms else (nn.Linear, nn.Conv2d)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            layers[internal_key(component, name)] = module
    return layers


def pipeline_layers(pipe, *, norms: bool = False) -> dict[str, nn.Module]:
    """Every adaptable layer of a diffusers pipeline's denoiser (UNet or transformer) and text encoders
    (norm layers too with ``norms``)."""
    layers = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None:
            layers.update(adaptable_layers(component, model, norms=norms))
    return layers


def layer_shape(module: nn.Module) -> LayerShape:
    """The shape of a Linear or Conv2d layer."""
    if isinstance(module, nn.Conv2d):
        return LayerShape(module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size))
    return LayerShape(module.out_features, module.in_features, None)


def full_size_layers(architecture: str, components: tuple[str, ...] = COMPONENTS) -> dict[str, LayerShape]:
    """The adaptable layers of a full-size model of ``architecture`` (its denoiser and text encoders),
    built on the meta device from the published configs (no weights, no download)."""
    import diffusers
    import transformers

    arch = ARCHITECTURES[architecture]
    shapes: dict[str, LayerShape] = {}
    with torch.device("meta"):
        if arch.denoiser in components:
            denoiser = getattr(diffusers, arch.denoiser_class)(**arch.denoiser_config)
            shapes.update({k: layer_shape(m) for k, m in adaptable_layers(arch.denoiser, denoiser).items()})
        for component, config in arch.text_encoders.items():
            if component in components:
                cls_name = arch.text_encoder_class(component)
                config_cls = transformers.T5Config if cls_name == T5 else transformers.CLIPTextConfig
                model = getattr(transformers, cls_name)(config_cls(**config))
                shapes.update({k: layer_shape(m) for k, m in adaptable_layers(component, model).items()})
    return shapes
