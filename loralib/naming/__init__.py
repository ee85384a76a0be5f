"""Module names: lorareg's internal keys, kohya's flattened names and Stability's SGM block names.

Inside lorareg every adapted module is keyed ``<component>.<module path>``, where the component
is ``unet``, ``text_encoder`` or ``text_encoder_2`` and the path is the module's dotted path in
the diffusers/transformers model. Text-encoder paths always start with ``text_model.`` (the
spelling every LoRA tool writes, whether or not the installed transformers nests its CLIP
model that way).
"""

from ..architectures import UNET

TE_ROOT = "text_model"


def internal_key(component: str, path: str) -> str:
    """The internal key of a component's module path: ``unet.<path>``, and for text encoders
    ``text_encoder.text_model.<path>`` whether or not ``path`` already starts with ``text_model.``."""
    if component != UNET and not path.startswith(TE_ROOT + ".") and path != "text_projection":
        path = f"{TE_ROOT}.{path}"
    return f"{component}.{path}"
