"""loralib — read, write, convert, merge and resize LoRA adapters for Stable Diffusion.

The core API::

    import loralib
    info = loralib.inspect("my_lora.safetensors")      # header only, no tensors loaded
    adapter = loralib.load("my_lora.safetensors")      # any supported format -> LoraAdapter
    loralib.save(adapter, "out_dir", format="peft")    # kohya (default), peft or diffusers

Importing ``loralib`` is cheap: torch is imported only by the functions that need it.
"""

from __future__ import annotations

from .version import __version__

__all__ = ["LoraAdapter", "LoraModule", "__version__", "convert", "inspect", "load", "save", "LoraError",
           "merge", "resize", "bake", "extract", "to_lora"]

from .errors import LoraError


def __getattr__(name: str):
    if name in ("LoraAdapter", "LoraModule"):
        from . import adapter

        return getattr(adapter, name)
    if name in ("load", "save", "convert"):
        from . import formats

        return getattr(formats, {"load": "load_adapter", "save": "save_adapter", "convert": "convert"}[name])
    if name == "inspect":
        from .inspection import inspect

        return inspect
    if name in ("merge", "resize", "bake", "extract", "to_lora"):
        from . import compose

        return getattr(compose, name)
    raise AttributeError(f"module 'loralib' has no attribute {name!r}")
