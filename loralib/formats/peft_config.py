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
import time
from collections import Counter
from collections.abc import Callable, Mapping

from ..errors import CorruptFileError
from ..naming import TE_ROOT


def config_path(key: str) -> str:
    """The module name a config refers to: the internal path without component, and for text
    encoders without ``text_model.``, so that it matches every transformers version's CLIP."""
    path = key.split(".", 1)[1]
    return path.removeprefix(TE_ROOT + ".")


_PLAIN_KEY = re.compile(r"[\w.]+")
# Bounds on what a config may ask of the pattern matcher. Real patterns are module paths or
# short expressions; a hostile one can make a backtracking matcher run for hours on one name.
MAX_PATTERN_LENGTH = 4096
MAX_PATTERNS = 100_000
PATTERN_TIME_BUDGET = 1.0  # seconds of regular-expression matching per config, all modules together


class TimeBudget:
    """Seconds of pattern matching left to one config (shared by its rank and alpha patterns)."""

    def __init__(self, seconds: float = PATTERN_TIME_BUDGET) -> None:
        self.seconds = seconds


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: object, what: str, where: str) -> float:
    if not _is_number(value):
        raise CorruptFileError(f"{where}: {what} must be a number, not {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise CorruptFileError(f"{where}: {what} is {_shown(value)}, which is not a usable scale")
    return number


def _positive_int(value: object, what: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2 ** 31:
        raise CorruptFileError(f"{where}: {what} must be a positive whole number, not {_shown(value)}")
    return value


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a number too large to use"
    return text if len(text) <= 60 else text[:57] + "..."


class PatternTable:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key (in order) that matches the
    end of a module name at a ``.`` boundary wins.

    PEFT matches keys as regular expressions; plain keys (letters, digits, ``_`` and ``.``) are
    looked up by suffix in a dictionary, which gives the same answer for real module names in
    time independent of the number of patterns. Other keys are matched as the same regular
    expressions PEFT uses, by the ``regex`` engine under a time budget shared by all lookups:
    a pattern whose matching would not end (catastrophic backtracking) makes the config
    unusable, reported as a :class:`CorruptFileError`, instead of hanging.
    """

    def __init__(self, patterns: Mapping[str, object] | None, value: Callable[[object, str], object] = lambda v, k: v,
                 *, where: str = "the PEFT config", field: str = "pattern", budget: TimeBudget | None = None) -> None:
        self.where, self.field = where, field
        self._budget = budget or TimeBudget()
        if patterns is None:
            patterns = {}
        if not isinstance(patterns, Mapping):
            raise CorruptFileError(f"{where}: {field} must map module names to values, not {_shown(patterns)}")
        if len(patterns) > MAX_PATTERNS:
            raise CorruptFileError(f"{where}: {field} has {len(patterns)} entries (the limit is {MAX_PATTERNS})")
        self._order = {key: i for i, key in enumerate(patterns)}
        self._literal: dict[str, object] = {}
        self._regex: list[tuple[int, object, object, str]] = []
        for i, (key, raw) in enumerate(patterns.items()):
            checked = value(raw, f"{field}[{key[:60]!r}]")
            if _PLAIN_KEY.fullmatch(key):
                self._literal[key] = checked
            else:
                self._regex.append((i, self._compile(key), checked, key))

    def _compile(self, key: str):
        import regex

        if len(key) > MAX_PATTERN_LENGTH:
            raise CorruptFileError(f"{self.where}: a key of {self.field} is {len(key)} characters long "
                                   f"(the limit is {MAX_PATTERN_LENGTH})")
        pattern = rf"(.*\.)?({key})$"
        try:
            re.compile(pattern)  # what PEFT itself accepts
            return regex.compile(pattern, regex.VERSION0)
        except (re.error, regex.error, RecursionError, OverflowError, ValueError) as exc:
            raise CorruptFileError(f"{self.where}: the {self.field} key {key[:60]!r} is not a valid regular "
                                   f"expression", "PEFT could not load this config either") from exc

    def _matches(self, pattern, name: str, key: str) -> bool:
        started = time.perf_counter()
        try:
            found = pattern.match(name, timeout=max(self._budget.seconds, 1e-3)) is not None
        except TimeoutError as exc:
            raise CorruptFileError(f"{self.where}: matching the {self.field} key {key[:60]!r} against module names "
                                   f"takes too long (over {PATTERN_TIME_BUDGET:g} s)",
                                   "The pattern backtracks catastrophically; the config is damaged or crafted") from exc
        self._budget.seconds -= time.perf_counter() - started
        if self._budget.seconds <= 0:
            raise CorruptFileError(f"{self.where}: matching the {self.field} patterns against module names takes "
                                   f"too long (over {PATTERN_TIME_BUDGET:g} s)",
                                   "The patterns backtrack catastrophically; the config is damaged or crafted")
        return found

    def lookup(self, name: str) -> tuple[bool, object]:
        """``(True, value)`` of the first pattern matching ``name``, or ``(False, None)``."""
        best: tuple[int, object] | None = None
        parts = name.split(".")
        for start in range(len(parts)):
            suffix = ".".join(parts[start:])
            if suffix in self._literal and (best is None or self._order[suffix] < best[0]):
                best = (self._order[suffix], self._literal[suffix])
        for index, pattern, value, key in self._regex:
            if best is not None and index > best[0]:
                break
            if self._matches(pattern, name, key):
                best = (index, value)
                break
        return (True, best[1]) if best is not None else (False, None)


class PeftScales:
    """Resolves each module's rank and kohya-convention alpha under one PEFT ``LoraConfig``.

    The config is checked first (``where`` names it in messages): ``r`` a positive whole
    number, ``lora_alpha`` and every ``alpha_pattern`` value a finite number, ``rank_pattern``
    values positive whole numbers, the patterns mappings, ``use_rslora`` true or false.
    Anything else is a :class:`CorruptFileError`, as PEFT could not use it either.
    """

    def __init__(self, config: Mapping, where: str = "the PEFT config") -> None:
        if not isinstance(config, Mapping):
            raise CorruptFileError(f"{where} must be a JSON object, not {_shown(config)}")
        self.config = config
        self.where = where
        self.default_rank = _positive_int(config.get("r", 8), "r", where)
        self.default_alpha = _finite(config.get("lora_alpha", 8), "lora_alpha", where)
        rslora = config.get("use_rslora", False)
        if rslora is not None and not isinstance(rslora, bool):
            raise CorruptFileError(f"{where}: use_rslora must be true or false, not {_shown(rslora)}")
        self.rslora = bool(rslora)
        budget = TimeBudget()
        self.ranks = PatternTable(config.get("rank_pattern"), lambda v, what: _positive_int(v, what, where),
                                  where=where, field="rank_pattern", budget=budget)
        self.alphas = PatternTable(config.get("alpha_pattern"), lambda v, what: _finite(v, what, where),
                                   where=where, field="alpha_pattern", budget=budget)

    def rank(self, name: str) -> int:
        """The rank PEFT would give module ``name``."""
        found, value = self.ranks.lookup(name)
        return int(value) if found else self.default_rank

    def alpha(self, name: str, rank: int) -> float:
        """The kohya-convention alpha (``scale · rank``) of module ``name`` of rank ``rank``."""
        found, value = self.alphas.lookup(name)
        alpha = float(value) if found else self.default_alpha
        if self.rslora:
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
