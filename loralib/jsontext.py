"""Parsing JSON that comes from files: whatever the text holds, a :class:`JSONTextError` or a value.

Python's ``json`` raises several unrelated exceptions on hostile text: ``JSONDecodeError`` for
bad syntax, a plain ``ValueError`` for an integer longer than the interpreter's limit (4,300
digits), ``RecursionError`` for deep nesting, ``UnicodeDecodeError`` for bytes that are not
UTF-8; and it accepts ``NaN``, ``Infinity`` and numbers such as ``1e400`` that become infinite.
:func:`loads` turns every one of these into a :class:`JSONTextError` (a ``ValueError``) whose
message says what is wrong, so callers catch one thing.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

# Values of safetensors metadata that lorareg parses as JSON for what they tell (tags, dataset
# folders, history). A larger value is kept and shown, but not parsed.
MAX_METADATA_JSON = 8 * 1024 * 1024
# Nesting deeper than this is refused in metadata values: such values are later written back
# (a file's history) or stored, and deeper structures could exhaust the interpreter's stack.
MAX_METADATA_DEPTH = 64

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JSONTextError(ValueError):
    """Text that is not JSON lorareg accepts; ``str()`` says why, in a few words."""


class DuplicateKeyError(JSONTextError):
    """A JSON object that names the same key twice."""


def _reject_constant(name: str) -> float:
    raise JSONTextError(f"it holds {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONTextError(f"it holds the number {text[:20]}, which is too large")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(f"it names the key {key[:80]!r} twice")
            seen.add(key)
    return result


def nesting_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON ``text`` nest (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(text: str | bytes, *, unique_keys: bool = False, max_depth: int | None = None) -> Any:
    """Parse ``text`` (bytes must be UTF-8), refusing NaN, infinities, with ``unique_keys`` objects
    that repeat a key, and with ``max_depth`` deeper nesting. Every problem is a :class:`JSONTextError`."""
    try:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        if max_depth is not None and nesting_depth(text) > max_depth:
            raise JSONTextError(f"it is nested more than {max_depth} levels deep")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_pairs if unique_keys else None)
    except JSONTextError:
        raise
    except UnicodeDecodeError as exc:
        raise JSONTextError("it is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise JSONTextError(f"it is not valid JSON ({exc.msg} at character {exc.pos})") from exc
    except RecursionError as exc:
        raise JSONTextError("it is nested too deeply") from exc
    except ValueError as exc:  # an integer over the interpreter's digit limit
        raise JSONTextError("it holds a number with too many digits") from exc


def loads_metadata(text: str | None, default: Any = None) -> Any:
    """A metadata value parsed as JSON for what it tells, or ``default`` when it is missing,
    larger than :data:`MAX_METADATA_JSON`, or not JSON lorareg accepts (never an error: such
    values are informative only)."""
    if not text or len(text) > MAX_METADATA_JSON:
        return default
    try:
        return loads(text, max_depth=MAX_METADATA_DEPTH)
    except JSONTextError:
        return default
