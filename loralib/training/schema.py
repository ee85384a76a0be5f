"""A small validator for configuration dataclasses (what the training configuration needs, no more).

A section is a dataclass whose fields are declared with :func:`setting`: a default, a description,
bounds (``ge``, ``gt``, ``le``, ``lt``), a minimum length and a pattern for text, and optional
checks that run before (on the raw value) or after (on the converted value) the type check.
Types come from the annotations: ``int``, ``float``, ``bool``, ``str``, ``Path``, ``Literal[...]``
(the choices), ``list[str]`` and ``X | None``.

:func:`validate` converts a section's raw values (TOML values, or text from the command line) and
returns every problem at once, each as ``"dotted.path: message"``; unknown keys are refused with a
suggestion. Numbers must be finite. The messages follow the wording users already know from the
earlier pydantic models (``input should be greater than 0 (got -1)``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

_NO_DEFAULT: Any = dataclasses.MISSING
#: The text pydantic's lax mode (and so earlier lorareg versions) took for true and false.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_INTEGRAL_TEXT = re.compile(r"[+-]?\d[\d_]*\.0*")  # "8.0" is the whole number 8


@dataclasses.dataclass(frozen=True)
class Rules:
    """The checks of one field beyond its type."""

    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = None
    pattern: str | None = None
    before: Callable[[Any], Any] | None = None
    after: Callable[[Any], Any] | None = None


def setting(default: Any = _NO_DEFAULT, *, description: str, default_factory: Callable[[], Any] = _NO_DEFAULT,
            ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
            min_length: int | None = None, pattern: str | None = None, before: Callable[[Any], Any] | None = None,
            after: Callable[[Any], Any] | None = None) -> Any:
    """Declare a configuration field (use as the dataclass field's default).

    ``before`` gets the raw value and returns the value to check (raise ``ValueError`` to refuse it);
    ``after`` gets the converted value once type and bounds passed.
    """
    rules = Rules(description, ge, gt, le, lt, min_length, pattern, before, after)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rules": rules})


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """What a section declares about one key: its type (annotation), default and rules."""

    name: str
    annotation: Any
    default: Any
    rules: Rules

    @property
    def description(self) -> str:
        """The key's meaning, as the docs and ``--help`` show it."""
        return self.rules.description

    @property
    def base(self) -> Any:
        """The annotation without ``| None``."""
        return base_type(self.annotation)

    @property
    def optional(self) -> bool:
        """True when the key may be unset (``None``)."""
        union = typing.get_origin(self.annotation) in (typing.Union, types.UnionType)
        return union and type(None) in typing.get_args(self.annotation)

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The allowed values of a ``Literal`` key."""
        return tuple(typing.get_args(self.base)) if typing.get_origin(self.base) is Literal else None


_FIELDS: dict[type, dict[str, FieldInfo]] = {}


def fields_of(cls: type) -> dict[str, FieldInfo]:
    """The declared fields of a section dataclass, in order (computed once per class)."""
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        table = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not _NO_DEFAULT else f.default
            table[f.name] = FieldInfo(f.name, hints[f.name], default, f.metadata["rules"])
        _FIELDS[cls] = table
    return _FIELDS[cls]


def base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean 'rank'?)`` for a misspelt key, or ``""`` when nothing is close."""
    suffix = [k for k in known if name.endswith("_" + k)]  # networ_rank -> rank
    close = (suffix + [k for k in difflib.get_close_matches(name, known, n=2, cutoff=0.6) if k not in suffix])[:2]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class _Invalid(Exception):
    """A value refused by a type or bound check; ``show`` adds the input to the message."""

    def __init__(self, message: str, show: bool = True, where: str = "") -> None:
        super().__init__(message)
        self.message, self.show, self.where = message, show, where


def validate(cls: type, data: Any, where: str) -> tuple[Any, list[str]]:
    """Build ``cls`` from ``data`` (a dict of raw values): ``(instance or None, problems)``."""
    if not isinstance(data, dict):
        return None, [f"{where}: input should be a valid dictionary (a [{where}] section)"]
    fields = fields_of(cls)
    values, problems = {}, []
    for name, info in fields.items():
        if name not in data:
            continue
        try:
            values[name] = _convert(info, data[name])
        except _Invalid as exc:
            shown = f" (got {json.dumps(data[name], default=str)})" if exc.show and not isinstance(data[name], dict) \
                else ""
            problems.append(f"{where}.{name}{exc.where}: {exc.message}{shown}")
    for name in data:
        if name not in fields:
            problems.append(f"{where}.{name}: unknown key{did_you_mean(str(name), list(fields))}")
    return (None if problems else cls(**values)), problems


def _convert(info: FieldInfo, value: Any) -> Any:
    rules = info.rules
    if rules.before is not None:
        value = _run(rules.before, value)
    if value is None and info.optional:
        return None
    value = _typed(info.base, value)
    _check_bounds(rules, value)
    if rules.after is not None:
        value = _run(rules.after, value)
    return value


def _run(check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise _Invalid(str(exc), show=False) from exc


def _typed(kind: Any, value: Any) -> Any:
    """``value`` converted to ``kind`` as the lax rules allow (text from the command line included)."""
    if kind is bool:
        return _boolean(value)
    if kind is int:
        return _integer(value)
    if kind is float:
        return _number(value)
    if kind is str:
        if not isinstance(value, str):
            raise _Invalid("input should be a valid string")
        return value
    if kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Invalid("input should be a path (text)")
    origin = typing.get_origin(kind)
    if origin is Literal:
        options = typing.get_args(kind)
        if isinstance(value, str) and value in options:
            return value
        shown = [repr(o) for o in options]
        raise _Invalid("input should be " + (", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0]))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Invalid("input should be a valid list")
        (item_kind,) = typing.get_args(kind)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_typed(item_kind, item))
            except _Invalid as exc:
                raise _Invalid(f"{exc.message} (got {json.dumps(item, default=str)})", show=False,
                               where=f".{index}") from exc
        return items
    raise TypeError(f"unsupported configuration type {kind!r}")  # a programming error, caught by the tests


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    elif isinstance(value, (int, float)):
        if value in (0, 1):
            return bool(value)
    else:
        raise _Invalid("input should be a valid boolean")
    raise _Invalid("input should be a valid boolean, unable to interpret input")


def _integer(value: Any) -> int:
    if isinstance(value, bool):  # true is not a count
        raise _Invalid("input should be a valid integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("input should be a finite number")
        if not value.is_integer():
            raise _Invalid("input should be a valid integer, got a number with a fractional part")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            if _INTEGRAL_TEXT.fullmatch(text):
                return int(text.partition(".")[0])
        raise _Invalid("input should be a valid integer, unable to parse string as an integer")
    raise _Invalid("input should be a valid integer")


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise _Invalid("input should be a valid number")
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError as exc:
            raise _Invalid("input should be a valid number") from exc
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError as exc:
            raise _Invalid("input should be a valid number, unable to parse string as a number") from exc
    else:
        raise _Invalid("input should be a valid number")
    if not math.isfinite(number):
        raise _Invalid("input should be a finite number")
    return number


def _bound(number: float) -> str:
    return str(int(number)) if float(number).is_integer() and abs(number) < 1e16 else repr(number)


def _check_bounds(rules: Rules, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for limit, fails, words in ((rules.gt, lambda b: value <= b, "greater than"),
                                    (rules.ge, lambda b: value < b, "greater than or equal to"),
                                    (rules.lt, lambda b: value >= b, "less than"),
                                    (rules.le, lambda b: value > b, "less than or equal to")):
            if limit is not None and fails(limit):
                raise _Invalid(f"input should be {words} {_bound(limit)}")
    if isinstance(value, str):
        if rules.min_length is not None and len(value) < rules.min_length:
            unit = "character" if rules.min_length == 1 else "characters"
            raise _Invalid(f"string should have at least {rules.min_length} {unit}")
        # The whole text must match (a pattern's $ does not let a trailing newline through).
        if rules.pattern is not None and not re.fullmatch(rules.pattern.removeprefix("^").removesuffix("$"), value):
            raise _Invalid(f"string should match pattern '{rules.pattern}'")


def dump(instance: Any, *, json_ready: bool = False) -> dict[str, Any]:
    """A section's values as a dict (paths as text and tuples as lists when ``json_ready``)."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}
    if json_ready:
        values = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, (list, tuple)) else v
                  for k, v in values.items()}
    else:
        values = {k: list(v) if isinstance(v, list) else v for k, v in values.items()}
    return values
