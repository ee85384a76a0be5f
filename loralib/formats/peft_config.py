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

from ..naming.kohya import TE_ROOT


def config_path(key: str) -> str:
    """The module name a config refers to: the internal path without component, and for text
    encoders without ``text_model.``, so that it matches every transformers version's CLIP."""
    path = key.split(".", 1)[1]
    return path.removeprefix(TE_ROOT + ".")


def _pattern_key(patterns: Mapping[str, object], name: str) -> str | None:
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", name):
                return pattern
        except re.error:
            continue
    return None


def resolve_alpha(config: Mapping, name: str, rank: int) -> float:
    """The kohya-convention alpha (``scale · rank``) PEFT would use for module ``name`` of rank ``rank``."""
    alpha_patterns = config.get("alpha_pattern") or {}
    key = _pattern_key(alpha_patterns, name)
    alpha = float(alpha_patterns[key] if key is not None else config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha * rank / math.sqrt(rank)
    return alpha


def resolve_rank(config: Mapping, name: str) -> int:
    """The rank PEFT would give module ``name``."""
    rank_patterns = config.get("rank_pattern") or {}
    key = _pattern_key(rank_patterns, name)
    return int(rank_patterns[key] if key is not None else config.get("r", 8))


def build_config(ranks_alphas: Mapping[str, tuple[int, float]]) -> dict:
    """A ``LoraConfig`` dict reproducing each module's (rank, alpha), keyed by config path.

    The most common rank and alpha become ``r`` and ``lora_alpha``; the rest go into the
    patterns. Pattern keys are escaped only if PEFT's regex matching would otherwise pick the
    wrong entry for some module.
    """
    r = Counter(rank for rank, _ in ranks_alphas.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in ranks_alphas.values()).most_common(1)[0][0]
    for escape in (False, True):
        quote = re.escape if escape else str
        config = {
            "peft_type": "LORA", "r": r, "lora_alpha": _number(alpha),
            "target_modules": sorted(ranks_alphas),
            "rank_pattern": {quote(n): rank for n, (rank, _) in sorted(ranks_alphas.items()) if rank != r},
            "alpha_pattern": {quote(n): _number(a) for n, (_, a) in sorted(ranks_alphas.items()) if a != alpha},
            "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
            "init_lora_weights": True, "fan_in_fan_out": False,
        }
        if all(resolve_rank(config, n) == rank and resolve_alpha(config, n, rank) == a
               for n, (rank, a) in ranks_alphas.items()):
            return config
    raise AssertionError("could not express the module alphas as a PEFT config")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)
