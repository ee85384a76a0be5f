"""PEFT's ``LoraConfig`` semantics, shared by the PEFT and diffusers formats.

A PEFT config gives a default rank ``r`` and ``lora_alpha`` and per-module overrides in
``rank_pattern`` and ``alpha_pattern``, whose keys PEFT matches as regular expressions against
the end of a module's name. The scale is ``lora_alpha / r``, or ``lora_alpha / √r`` with
``use_rslora``. Here those rules are applied exactly as PEFT applies them, so the alpha
lorareg reads is the one PEFT would use, and the config lorareg writes makes PEFT use ours.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping

from ..naming import TE_ROOT


def config_path(key: str) -> str:
    """The module name a config refers to: the internal path without component, and for text
    encoders without ``text_model.``, so that it matches every transformers version's CLIP."""
    path = key.split(".", 1)[1]
    return path.removeprefix(TE_ROOT + ".")


_PLAIN_KEY = re.compile(r"[\w.]+")


class PatternTable:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key (in order) that matches the
    end of a module name at a ``.`` boundary wins.

    PEFT matches keys as regular expressions; plain keys (letters, digits, ``_`` and ``.``) are
    looked up by suffix in a dictionary, which gives the same answer for real module names in
    time independent of the number of patterns. Other keys are matched as regular expressions.
    """

    def __init__(self, patterns: Mapping[str, object] | None) -> None:
        patterns = dict(patterns or {})
        self._order = {key: i for i, key in enumerate(patterns)}
        self._literal = {k: v for k, v in patterns.items() if _PLAIN_KEY.fullmatch(k)}
        self._regex = []
        for i, (key, value) in enumerate(patterns.items()):
            if key not in self._literal:
                try:
                    self._regex.append((i, re.compile(rf"(.*\.)?({key})$"), value))
                except re.error:
                    continue

    def lookup(self, name: str) -> tuple[bool, object]:
        """``(True, value)`` of the first pattern matching ``name``, or ``(False, None)``."""
        best: tuple[int, object] | None = None
        parts = name.split(".")
        for start in range(len(parts)):
            suffix = ".".join(parts[start:])
            if suffix in self._literal and (best is None or self._order[suffix] < best[0]):
                best = (self._order[suffix], self._literal[suffix])
        for index, pattern, value in self._regex:
            if best is not None and index > best[0]:
                break
            if pattern.match(name):
                best = (index, value)
                break
        return (True, best[1]) if best is not None else (False, None)


class PeftScales:
    """Resolves each module's rank and kohya-convention alpha under one PEFT ``LoraConfig``."""

    def __init__(self, config: Mapping) -> None:
        self.config = config
        self.ranks = PatternTable(config.get("rank_pattern"))
        self.alphas = PatternTable(config.get("alpha_pattern"))

    def rank(self, name: str) -> int:
        """The rank PEFT would give module ``name``."""
        found, value = self.ranks.lookup(name)
        return int(value if found else self.config.get("r", 8))

    def alpha(self, name: str, rank: int) -> float:
        """The kohya-convention alpha (``scale · rank``) of module ``name`` of rank ``rank``."""
        found, value = self.alphas.lookup(name)
        alpha = float(value if found else self.config.get("lora_alpha", 8))
        if self.config.get("use_rslora"):
            return alpha * rank / math.sqrt(rank)
        return alpha


def build_config(ranks_alphas: Mapping[str, tuple[int, float]]) -> dict:
    """A ``LoraConfig`` dict reproducing each module's (rank, alpha), keyed by config path.

    The most common rank and alpha become ``r`` and ``lora_alpha``; the rest go into the
    patterns, keyed by each module's full path.
    """
    r = Counter(rank for rank, _ in ranks_alphas.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in ranks_alphas.values()).most_common(1)[0][0]
    keys = _pattern_keys(ranks_alphas)
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": _number(alpha), "target_modules": sorted(ranks_alphas),
        "rank_pattern": {keys[n]: rank for n, (rank, _) in sorted(ranks_alphas.items()) if rank != r},
        "alpha_pattern": {keys[n]: _number(a) for n, (_, a) in sorted(ranks_alphas.items()) if a != alpha},
        "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
        "init_lora_weights": True, "fan_in_fan_out": False,
    }
    scales = PeftScales(config)
    wrong = [n for n, (rank, a) in ranks_alphas.items() if scales.rank(n) != rank or scales.alpha(n, rank) != a]
    if wrong:  # only if one module's path were the suffix of another's
        raise AssertionError(f"PEFT patterns cannot tell these modules apart: {wrong[:3]}")
    return config


def _pattern_keys(names) -> dict[str, str]:
    """The pattern key of each module path: the path itself, or ``^path`` when it is also the end of
    another module's path (Flux's root ``proj_out`` and ``single_transformer_blocks.0.proj_out``),
    which PEFT's ``(.*\\.)?(key)$`` match then applies to the root module only."""
    ends = {".".join(parts[i:]) for n in names if len(parts := n.split(".")) > 1 for i in range(1, len(parts))}
    return {n: f"^{n}" if n in ends else n for n in names}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)
