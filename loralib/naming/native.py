"""Translate a transformer's module paths between its original (native) names and diffusers' names.

Flux.1's BFL names and SD3's MMDiT names differ from diffusers' in three ways: blocks are
renamed (``double_blocks.N`` ↔ ``transformer_blocks.N``), some layers are fused (one ``qkv``
Linear holds diffusers' ``to_q``, ``to_k`` and ``to_v`` as consecutive blocks of rows) and the
final modulation stores its shift and scale halves in the opposite order. A :class:`NativeMap`
is a table of such rules; :mod:`loralib.naming.flux` and :mod:`loralib.naming.sd3` hold the
tables, and tests check them against diffusers' own single-file converters for every parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..architectures import TRANSFORMER
from . import Target


@dataclass(frozen=True)
class Rule:
    """One native module (a template with ``{i}`` for the block index) and the diffusers modules it holds.

    ``units`` are the parts' row counts in multiples of the layer's input width; ``swap`` says the
    two halves of its rows are exchanged; ``swap_when_narrow`` says so only when the layer's output
    is twice its input (SD3's last, pre-only context block).
    """

    native: str
    parts: tuple[str, ...]
    units: tuple[int, ...] = (1,)
    swap: bool = False
    swap_when_narrow: bool = False


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


class NativeMap:
    """The rules of one model family, looked up in both directions."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules

    @cached_property
    def _native(self) -> list[tuple[re.Pattern[str], Rule]]:
        return [(_pattern(rule.native), rule) for rule in self.rules]

    @cached_property
    def _diffusers(self) -> list[tuple[re.Pattern[str], Rule, int]]:
        return [(_pattern(part), rule, index) for rule in self.rules for index, part in enumerate(rule.parts)]

    def to_target(self, native: str, shape: tuple[int, int] | None = None) -> Target | None:
        """The internal modules a native module path stands for, or None if it names none.

        ``shape`` (``out, in`` of the stored layer) decides a conditional swap; without it a
        conditional swap is assumed absent.
        """
        for pattern, rule in self._native:
            if match := pattern.match(native):
                keys = tuple(f"{TRANSFORMER}.{part.format(**match.groupdict())}" for part in rule.parts)
                swap = rule.swap or (rule.swap_when_narrow and shape is not None and shape[0] == 2 * shape[1])
                return Target(keys, rule.units, swap)
        return None

    def is_conditional(self, native: str) -> bool:
        """True when whether the module's rows are swapped depends on its shape."""
        return any(pattern.match(native) and rule.swap_when_narrow for pattern, rule in self._native)

    def to_native(self, path: str) -> tuple[str, int, Rule] | None:
        """The native module path holding diffusers module ``path`` (without component), the part's
        index in it, and the rule; None if ``path`` has no native name."""
        for pattern, rule, index in self._diffusers:
            if match := pattern.match(path):
                return rule.native.format(**match.groupdict()), index, rule
        return None
