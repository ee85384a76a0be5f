"""diffusers as the outside oracle: load a LoRA file with its own ``load_lora_weights`` and fuse it."""

from __future__ import annotations

import logging
from pathlib import Path

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def pipeline_class(architecture: str):
    """The diffusers pipeline class of a tiny model."""
    import diffusers

    from loralib.architectures import ARCHITECTURES

    return getattr(diffusers, ARCHITECTURES[architecture].pipeline_class)


class WarningCatcher(logging.Handler):
    """Collects WARNING-and-above records of the libraries under test."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_with_diffusers(architecture: str, base: Path, lora_file: Path, weight: float = 1.0):
    """Load ``lora_file`` with diffusers' own ``load_lora_weights`` and fuse it.

    Returns ``(pipeline with fused weights, warnings logged while loading, LoRA layers injected,
    adapters listed by get_list_adapters)``.
    """
    from diffusers.utils import logging as diffusers_logging

    pipe = pipeline_class(architecture).from_pretrained(base)
    diffusers_logging.set_verbosity_warning()  # another test may have quietened it
    catcher = WarningCatcher()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(catcher)
    try:
        pipe.load_lora_weights(str(lora_file), adapter_name="trained")
    finally:
        for logger in loggers:
            logger.removeHandler(catcher)
    injected = sum(1 for c in COMPONENTS if getattr(pipe, c, None) is not None
                   for _, m in getattr(pipe, c).named_modules() if hasattr(m, "lora_A") and "trained" in m.lora_A)
    listed = pipe.get_list_adapters()
    # every component the pipeline loads LoRA into (Flux's and SD3's default is the transformer only)
    loadable = [c for c in pipe._lora_loadable_modules if getattr(pipe, c, None) is not None]
    pipe.fuse_lora(components=loadable, lora_scale=weight)
    pipe.unload_lora_weights()
    # diffusers notes each text encoder the file does not adapt; that is not a problem with the file
    trained = {c for c, names in listed.items() if "trained" in names}
    messages = [m for m in catcher.messages
                if not any(f"prefix='{c}'" in m and m.startswith("No LoRA keys") for c in COMPONENTS if c not in trained)]
    return pipe, messages, injected, listed


def component_weights(pipe) -> dict[str, dict]:
    """Every weight of the pipeline's UNet and text encoders, copied, by component."""
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in COMPONENTS if getattr(pipe, c, None) is not None}
