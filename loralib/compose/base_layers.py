"""The base model's weights for modules whose ``ΔW`` depends on them (DoRA), read one layer at a time.

Merging, resizing and converting never need the base model, except for DoRA modules: their
``ΔW = m · (W + ΔW₀) / ‖W + ΔW₀‖ − W`` depends on the layer's weight ``W``. :class:`BaseLayers`
gives those weights from a diffusers folder or a single-file checkpoint (or a mapping of
tensors), checks up front that a base is given when one is needed, and can be shared by the
threads that work on modules side by side.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import InvalidArgumentError, MismatchError
from .model_weights import ModelWeights


class BaseLayers:
    """Layer weights of a base model by internal key (None: no base given)."""

    def __init__(self, base: str | Path | Mapping[str, torch.Tensor] | None) -> None:
        self._lock = threading.Lock()
        self._model: ModelWeights | None = None
        self._tensors: Mapping[str, torch.Tensor] | None = None
        self.name: str | None = None
        if isinstance(base, Mapping):
            self._tensors, self.name = base, "the given weights"
        elif base is not None:
            self._model, self.name = ModelWeights.open(base), Path(base).name

    @classmethod
    def open(cls, base: str | Path | Mapping[str, torch.Tensor] | None,
             needing: Iterable[tuple[str, str, tuple[int, ...]]] = ()) -> BaseLayers:
        """The base weights, after checking that they are given when ``needing`` (``(input name, key,
        weight shape)`` of modules that need them) is not empty, and that they have those layers."""
        needing = list(needing)
        if needing and base is None:
            owner = needing[0][0]
            raise InvalidArgumentError(
                f"{owner} has {sum(1 for o, _, _ in needing if o == owner)} DoRA module(s), whose ΔW depends on the "
                "base model's weights", "Pass the base model the adapter was trained on with --base MODEL "
                "(a diffusers folder or a single-file checkpoint)")
        layers = cls(base if needing else None)
        missing = [(owner, key) for owner, key, _ in needing if not layers.has(key)]
        wrong = [(owner, key, shape) for owner, key, shape in needing
                 if layers.has(key) and _flat(layers.shape(key)) != _flat(shape)]
        if missing or wrong:
            layers.close()
        if missing:
            owner, key = missing[0]
            raise MismatchError(f"{len(missing)} layer(s) of DoRA modules are not in {layers.name}, e.g. {key} "
                                f"(from {owner})", "Give the base model the adapter was made for")
        if wrong:
            owner, key, shape = wrong[0]
            raise MismatchError(f"{key} is {list(layers.shape(key))} in {layers.name} but {owner}'s DoRA module adapts "
                                f"a {list(shape)} weight", "Give the base model the adapter was made for")
        return layers

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of a layer's weight in the base."""
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._model.slots[key].shape)

    def has(self, key: str) -> bool:
        """True when the base has the layer."""
        if self._tensors is not None:
            return key in self._tensors
        return self._model is not None and key in self._model.slots

    def weight(self, key: str, module) -> torch.Tensor | None:
        """The weight of layer ``key`` if ``module`` needs it, else None."""
        if not getattr(module, "needs_base", False):
            return None
        if self._tensors is not None:
            return self._tensors[key]
        with self._lock:  # safetensors handles are opened lazily and cached: one reader at a time
            return self._model.read(key)

    def close(self) -> None:
        """Release the model's files."""
        if self._model is not None:
            self._model.close()

    def __enter__(self) -> BaseLayers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def needing_base(items: Iterable[tuple[str, Mapping[str, object]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(input name, key, weight shape)`` of every module that needs the base weights, over ``(name, modules)``."""
    return [(name, key, tuple(m.weight_shape)) for name, modules in items for key, m in modules.items()
            if getattr(m, "needs_base", False)]


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    rest = 1
    for n in shape[1:]:
        rest *= n
    return shape[0], rest
