"""A corpus of hostile and broken adapter inputs, generated in code, and the checks every command must pass.

Each :class:`Case` writes one input (a file, a PEFT folder, a special file) into an empty folder.
:func:`check_case` runs it through every command that reads adapters (inspect, convert, merge,
resize, add, scan, verify, show) in-process with a timeout, and returns what went wrong:

- the command ends within the timeout (no hang);
- it exits 0 with a correct result (an output lorareg itself reads back, with finite factors),
  or non-zero with exactly one line on stderr;
- never a traceback, an "internal error" or a stray library warning;
- nothing is left behind in the output folder after a failure (no partial or temporary file),
  and the input folder's files are unchanged (same bytes before and after).

Used by ``tests/test_broken_inputs.py`` and ``benchmarks/broken_inputs.py`` (which prints
"inputs tried / failures"). Nothing here is committed as a binary file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (kohya module name, in_features, out_features): two SD1.5 UNet attention layers.
MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320),
]
PEFT_PATHS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
RANK = 2
# A pattern whose match against a module name backtracks exponentially in a backtracking engine.
CATASTROPHIC = "(a|aa)*(b|bb)*(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*x$"
EVIL = "(x+x+)+y"


# -- building safetensors bytes ------------------------------------------------------------------- #

@dataclass
class Tensor:
    """One tensor to write: dtype, shape and raw bytes (``None``: random bytes of the right size)."""

    dtype: str
    shape: list[Any]
    data: bytes | None = None


def f32(values: list[float]) -> bytes:
    """Little-endian float32 bytes."""
    return struct.pack(f"<{len(values)}f", *values)


def random_f32(count: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return f32([rnd.uniform(-0.05, 0.05) for _ in range(count)])


def kohya_tensors(seed: int = 0, *, alpha: float | None = float(RANK), rank: int = RANK) -> dict[str, Tensor]:
    """The tensors of a small valid kohya adapter (F32 factors, F32 alphas)."""
    tensors: dict[str, Tensor] = {}
    for i, (name, n_in, n_out) in enumerate(MODULES):
        tensors[f"{name}.lora_down.weight"] = Tensor("F32", [rank, n_in], random_f32(rank * n_in, seed * 10 + i))
        tensors[f"{name}.lora_up.weight"] = Tensor("F32", [n_out, rank], random_f32(n_out * rank, seed * 10 + i + 5))
        if alpha is not None:
            tensors[f"{name}.alpha"] = Tensor("F32", [], f32([alpha]))
    return tensors


def header_and_data(tensors: dict[str, Tensor], metadata: dict[str, Any] | None) -> tuple[dict, bytes]:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name, t in tensors.items():
        data = t.data
        if data is None:
            data = b"\0" * (4 * math.prod(t.shape))
        header[name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    return header, b"".join(blobs)


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, Any] | None = None, *,
                      header_text: str | None = None, trailing: bytes = b"") -> bytes:
    """A safetensors file; ``header_text`` replaces the JSON header (the data stays as built)."""
    header, data = header_and_data(tensors, metadata)
    raw = (header_text if header_text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data + trailing


def good_kohya(seed: int = 0, metadata: dict[str, str] | None = None) -> bytes:
    """A small valid kohya adapter."""
    return safetensors_bytes(kohya_tensors(seed), {"ss_network_module": "networks.lora", **(metadata or {})})


def with_header_edit(edit: Callable[[str], str], seed: int = 0) -> bytes:
    """A valid adapter whose JSON header text is rewritten by ``edit`` (offsets stay valid when ``edit`` keeps them)."""
    header, _ = header_and_data(kohya_tensors(seed), {"ss_network_module": "networks.lora"})
    return safetensors_bytes(kohya_tensors(seed), header_text=edit(json.dumps(header)))


def peft_folder(folder: Path, config: Any, *, config_text: str | None = None, tensors: bool = True) -> Path:
    """A PEFT folder (UNet adapter) with ``config`` as its adapter_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if tensors:
        items = {}
        for i, path in enumerate(PEFT_PATHS):
            n_in = MODULES[i][1]
            items[f"base_model.model.{path}.lora_A.weight"] = Tensor("F32", [RANK, n_in], random_f32(RANK * n_in, i))
            items[f"base_model.model.{path}.lora_B.weight"] = Tensor("F32", [320, RANK], random_f32(320 * RANK, i + 9))
        (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes(items, {"format": "pt"}))
    text = config_text if config_text is not None else json.dumps(config)
    (folder / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    return folder


def good_peft_config(**changes: Any) -> dict:
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 4, "target_modules": ["to_q", "to_k"],
              "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    config.update(changes)
    return config


def deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    """A JSON value nested ``depth`` levels deep."""
    return opener * depth + closer * depth


# -- the corpus ----------------------------------------------------------------------------------- #

@dataclass
class Case:
    """One input: ``build(folder)`` writes it and returns the path given to commands.

    ``valid`` inputs are odd but legitimate: every command (or those listed) must succeed on them.
    """

    name: str
    category: str
    build: Callable[[Path], Path]
    valid: bool | tuple[str, ...] = False
    commands: tuple[str, ...] | None = None  # None: every command

    def must_succeed(self, command: str) -> bool:
        """True when ``command`` has to succeed on this input."""
        return self.valid is True or (isinstance(self.valid, tuple) and command in self.valid)


CASES: list[Case] = []


def case(category: str, *, valid: bool | tuple[str, ...] = False, commands: tuple[str, ...] | None = None):
    def register(function: Callable[[Path], Path]) -> Callable[[Path], Path]:
        CASES.append(Case(function.__name__.removeprefix("case_"), category, function, valid, commands))
        return function
    return register


def file_case(name: str, category: str, content: Callable[[], bytes], *, valid: bool | tuple[str, ...] = False,
              filename: str = "x.safetensors") -> None:
    def build(folder: Path) -> Path:
        path = folder / filename
        path.write_bytes(content())
        return path
    CASES.append(Case(name, category, build, valid))


def _tensor_edit(name: str, category: str, change: Callable[[dict[str, Tensor]], None], *,
                 metadata: dict | None = None, valid: bool = False) -> None:
    def content() -> bytes:
        tensors = kohya_tensors()
        change(tensors)
        return safetensors_bytes(tensors, {"ss_network_module": "networks.lora"} if metadata is None else metadata)
    file_case(name, category, content, valid=valid)


def _meta(name: str, category: str, metadata: dict[str, str], valid: bool = True) -> None:
    file_case(name, category, lambda: good_kohya(metadata=metadata), valid=valid)


def _first(tensors: dict[str, Tensor], suffix: str) -> str:
    return next(n for n in tensors if n.endswith(suffix))


BIG_INT = "9" * 5000  # over Python's 4,300-digit limit for int <-> str
HUGE = str(10 ** 400)

# header damage
file_case("empty", "header", lambda: b"")
file_case("seven_bytes", "header", lambda: b"\0" * 7)
file_case("length_bomb", "header", lambda: struct.pack("<Q", 2 ** 63) + b"{}")
file_case("length_past_end", "header", lambda: struct.pack("<Q", 4096) + b"{}")
file_case("not_json", "header", lambda: struct.pack("<Q", 8) + b"not json")
file_case("json_list", "header", lambda: struct.pack("<Q", 8) + b"[1,2,3] ")
file_case("not_utf8", "header", lambda: struct.pack("<Q", 8) + b"{\"\xff\xfe\":1}")
file_case("random_bytes", "header", lambda: random.Random(1).randbytes(4096))
file_case("header_big_int_shape", "huge numbers",
          lambda: with_header_edit(lambda h: h.replace('"shape": [2, 320]', f'"shape": [{BIG_INT}, 320]', 1)))
file_case("header_big_int_offset", "huge numbers",
          lambda: with_header_edit(lambda h: h.replace('"data_offsets": [0,', f'"data_offsets": [{BIG_INT},', 1)))
file_case("header_shape_10e400", "huge numbers",
          lambda: with_header_edit(lambda h: h.replace('"shape": [2, 320]', f'"shape": [{HUGE}]', 1)))
file_case("header_shape_2e62", "huge numbers",
          lambda: with_header_edit(lambda h: h.replace('"shape": [2, 320]', f'"shape": [{2 ** 62}, {2 ** 62}]', 1)))
file_case("header_offsets_2e64", "huge numbers",
          lambda: with_header_edit(lambda h: h.replace('"data_offsets": [0, 2560]', f'"data_offsets": [0, {2 ** 64 + 5}]', 1)))
file_case("header_nan_shape", "non-finite", lambda: with_header_edit(lambda h: h.replace('"shape": [2, 320]', '"shape": [NaN, 320]', 1)))
file_case("header_infinity", "non-finite", lambda: with_header_edit(lambda h: h.replace('"shape": [2, 320]', '"shape": [Infinity]', 1)))
file_case("header_deep_nesting", "deep nesting", lambda: with_header_edit(lambda h: h.replace('"shape": [2, 320]', f'"shape": {deep(100000)}', 1)))
file_case("header_nesting_900", "deep nesting", lambda: with_header_edit(lambda h: h.replace('"shape": [2, 320]', f'"shape": {deep(900)}', 1)))
file_case("metadata_not_strings", "header", lambda: with_header_edit(lambda h: h.replace('"networks.lora"', '{"a": [1]}', 1)))
file_case("metadata_big_int", "huge numbers", lambda: with_header_edit(lambda h: h.replace('"networks.lora"', BIG_INT, 1)))
file_case("duplicate_metadata", "accepted then refused",
          lambda: with_header_edit(lambda h: h.replace('{"__metadata__"', '{"__metadata__": {"a": "b"}, "__metadata__"', 1)))
file_case("duplicate_tensor_key", "accepted then refused",
          lambda: with_header_edit(lambda h: h.replace(
              '{"__metadata__": {"ss_network_module": "networks.lora"}, ',
              '{"__metadata__": {"ss_network_module": "networks.lora"}, '
              f'"{MODULES[0][0]}.alpha": {{"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, ', 1)))
file_case("trailing_garbage", "accepted then refused", lambda: good_kohya() + b"GARBAGE!" * 100)
file_case("truncated", "header", lambda: good_kohya()[:-100])
file_case("unknown_dtype", "header", lambda: with_header_edit(lambda h: h.replace('"F32"', '"F33"', 1)))
file_case("overlapping_tensors", "header", lambda: with_header_edit(lambda h: h.replace('"data_offsets": [0, 2560]', '"data_offsets": [4, 2564]', 1)))

# tensor values and shapes
_tensor_edit("nan_alpha", "non-finite", lambda t: t.__setitem__(_first(t, ".alpha"), Tensor("F32", [], f32([math.nan]))))
_tensor_edit("inf_alpha", "non-finite", lambda t: t.__setitem__(_first(t, ".alpha"), Tensor("F32", [], f32([math.inf]))))
_tensor_edit("alpha_1e300", "huge numbers",
             lambda t: t.__setitem__(_first(t, ".alpha"), Tensor("F64", [], struct.pack("<d", 1e300))))
_tensor_edit("alpha_vector", "shapes", lambda t: t.__setitem__(_first(t, ".alpha"), Tensor("F32", [2], f32([1, 2]))))
_tensor_edit("alpha_bool_dtype", "shapes", lambda t: t.__setitem__(_first(t, ".alpha"), Tensor("BOOL", [], b"\x01")))
_tensor_edit("nan_factors", "non-finite", lambda t: t.__setitem__(
    _first(t, "lora_down.weight"), Tensor("F32", [RANK, 320], f32([math.nan] * (RANK * 320)))))
_tensor_edit("inf_factors", "non-finite", lambda t: t.__setitem__(
    _first(t, "lora_up.weight"), Tensor("F32", [320, RANK], f32([math.inf, -math.inf] * RANK * 160))))
_tensor_edit("huge_factors", "huge numbers", lambda t: t.__setitem__(
    _first(t, "lora_up.weight"), Tensor("F32", [320, RANK], f32([3e38] * (RANK * 320)))))
_tensor_edit("zero_width_factor", "shapes", lambda t: (
    t.__setitem__(_first(t, "lora_down.weight"), Tensor("F32", [RANK, 0], b"")),
    t.__setitem__(_first(t, "lora_up.weight"), Tensor("F32", [320, RANK], random_f32(640, 3)))))
_tensor_edit("zero_rank", "shapes", lambda t: (
    t.__setitem__(_first(t, "lora_down.weight"), Tensor("F32", [0, 320], b"")),
    t.__setitem__(_first(t, "lora_up.weight"), Tensor("F32", [320, 0], b""))))
_tensor_edit("mismatched_factors", "shapes", lambda t: t.__setitem__(
    _first(t, "lora_up.weight"), Tensor("F32", [320, 3], random_f32(960, 4))))
_tensor_edit("three_d_factor", "shapes", lambda t: t.__setitem__(
    _first(t, "lora_down.weight"), Tensor("F32", [RANK, 320, 1], random_f32(RANK * 320, 5))))
_tensor_edit("missing_up", "shapes", lambda t: t.pop(_first(t, "lora_up.weight")))
_tensor_edit("unknown_keys", "keys", lambda t: t.__setitem__("model.diffusion_model.x.weight", Tensor("F32", [1], f32([1]))))
_tensor_edit("broken_key_spelling", "keys", lambda t: t.__setitem__("lora_unet_unet_x.lora_down.weight", Tensor("F32", [1, 1], f32([1]))))
file_case("no_tensors", "keys", lambda: safetensors_bytes({}, {"a": "b"}))
file_case("not_a_lora", "keys", lambda: safetensors_bytes({"weight": Tensor("F32", [2, 2], f32([1, 2, 3, 4]))}))
file_case("pickle_named", "pickle", lambda: b"\x80\x04\x95" + b"\0" * 64, filename="x.ckpt")

# metadata JSON that lorareg parses (accepted adapters: the metadata is only informative)
_meta("tag_frequency_nan", "metadata JSON", {"ss_tag_frequency": '{"10_x": {"a": NaN, "b": Infinity, "c": -Infinity}}'})
_meta("tag_frequency_big_int", "huge numbers", {"ss_tag_frequency": f'{{"10_x": {{"a": {BIG_INT}}}}}'})
_meta("tag_frequency_1e400", "huge numbers", {"ss_tag_frequency": '{"10_x": {"a": 1e400, "b": 1e308}}'})
_meta("tag_frequency_deep", "deep nesting", {"ss_tag_frequency": deep(200000, "{\"a\":", "}").replace("}}", "1}}", 1)})
_meta("tag_frequency_deep_list", "deep nesting", {"ss_tag_frequency": deep(100000)})
_meta("tag_frequency_types", "metadata JSON", {"ss_tag_frequency": '{"a": [1, 2], "b": "c", "d": {"e": "f", "g": null, "h": true}}'})
_meta("tag_frequency_list", "metadata JSON", {"ss_tag_frequency": "[1, 2, 3]"})
_meta("dataset_dirs_deep", "deep nesting", {"ss_dataset_dirs": deep(100000, "{\"a\":", "}")})
_meta("dataset_dirs_big_int", "huge numbers", {"ss_dataset_dirs": f'{{"a": {{"n_repeats": {BIG_INT}}}}}'})
_meta("history_big_int", "huge numbers", {"lorareg.history": f'[{{"operation": "merge", "inputs": [{{"weight": {BIG_INT}}}]}}]'})
_meta("history_nan", "non-finite", {"lorareg.history": '[{"operation": "merge", "inputs": [{"weight": NaN, "file": 5}]}]'})
_meta("history_deep", "deep nesting", {"lorareg.history": deep(100000)})
_meta("history_types", "metadata JSON", {"lorareg.history": '[1, "a", {"operation": 3}, {"operation": "x", "inputs": "y"}]'})
_meta("network_args_deep", "deep nesting", {"ss_network_args": deep(100000, "{\"a\":", "}")})
_meta("network_args_big_int", "huge numbers", {"ss_network_args": f'{{"conv_dim": {BIG_INT}}}'})
_meta("rich_markup_title", "terminal", {"modelspec.title": "[/]", "ss_output_name": "[bold red]x[/] [link=file:///etc]y"})
_meta("escape_sequences", "terminal", {"modelspec.title": "\x1b]0;pwned\x07\x1b[2J\x1b[31mred", "ss_tag_frequency":
                                      '{"1_x": {"\\u001b[2Jtag": 3}}'})
_meta("control_characters", "terminal", {"modelspec.title": "a\rb\bc\x00d\x7fe\u202eevil", "modelspec.description": "line1\nline2"})
_meta("huge_metadata_value", "size", {"modelspec.description": "x" * 2_000_000})
_meta("lone_surrogate_escape", "terminal", {"modelspec.title": "\\ud800"})

# diffusers files with a PEFT config in their metadata
_DIFFUSERS_NAMES = [f"unet.{p}" for p in PEFT_PATHS]


def diffusers_bytes(config: Any, raw: str | None = None) -> bytes:
    tensors = {}
    for i, path in enumerate(_DIFFUSERS_NAMES):
        n_in = MODULES[i][1]
        tensors[f"{path}.lora_A.weight"] = Tensor("F32", [RANK, n_in], random_f32(RANK * n_in, i))
        tensors[f"{path}.lora_B.weight"] = Tensor("F32", [320, RANK], random_f32(320 * RANK, i + 3))
    flat = raw if raw is not None else json.dumps({f"unet.{k}": v for k, v in config.items()})
    return safetensors_bytes(tensors, {"format": "pt", "lora_adapter_metadata": flat})


file_case("diffusers_catastrophic_alpha_pattern", "catastrophic regex",
          lambda: diffusers_bytes({"r": RANK, "lora_alpha": 4, "alpha_pattern": {CATASTROPHIC: 8}}))
file_case("diffusers_alpha_string", "PEFT types", lambda: diffusers_bytes({"r": RANK, "lora_alpha": "four"}))
file_case("diffusers_alpha_huge", "huge numbers", lambda: diffusers_bytes({}, raw=f'{{"unet.r": 2, "unet.lora_alpha": {HUGE}}}'))
file_case("diffusers_metadata_big_int", "huge numbers", lambda: diffusers_bytes({}, raw=f'{{"unet.r": {BIG_INT}}}'))
file_case("diffusers_metadata_deep", "deep nesting", lambda: diffusers_bytes({}, raw=deep(100000)))
file_case("diffusers_metadata_nan", "non-finite", lambda: diffusers_bytes({}, raw='{"unet.r": 2, "unet.lora_alpha": NaN}'))
file_case("diffusers_patterns_list", "PEFT types", lambda: diffusers_bytes({"r": RANK, "alpha_pattern": ["a", "b"]}))

# cloneofsimo targets metadata
file_case("cloneofsimo_targets_int", "metadata JSON", lambda: safetensors_bytes(
    {f"unet:{i}:{f}": Tensor("F32", [1, 1], f32([0.0])) for i in range(1) for f in ("up", "down")},
    {"unet": "5"}))
file_case("cloneofsimo_targets_big_int", "huge numbers", lambda: safetensors_bytes(
    {f"unet:0:{f}": Tensor("F32", [1, 1], f32([0.0])) for f in ("up", "down")}, {"unet": BIG_INT}))

# PEFT folders: configs of wrong types, catastrophic patterns
_PEFT_CONFIGS: dict[str, tuple[str, Any]] = {
    "peft_alpha_string": ("PEFT types", good_peft_config(lora_alpha="eight")),
    "peft_alpha_list": ("PEFT types", good_peft_config(lora_alpha=[8])),
    "peft_alpha_null": ("PEFT types", good_peft_config(lora_alpha=None)),
    "peft_alpha_bool": ("PEFT types", good_peft_config(lora_alpha=True)),
    "peft_alpha_zero": ("PEFT types", good_peft_config(lora_alpha=0)),
    "peft_r_string": ("PEFT types", good_peft_config(r="2")),
    "peft_r_zero": ("PEFT types", good_peft_config(r=0)),
    "peft_r_float": ("PEFT types", good_peft_config(r=2.5)),
    "peft_alpha_pattern_list": ("PEFT types", good_peft_config(alpha_pattern=["to_q", 8])),
    "peft_alpha_pattern_string": ("PEFT types", good_peft_config(alpha_pattern="to_q")),
    "peft_rank_pattern_list": ("PEFT types", good_peft_config(rank_pattern=[1, 2])),
    "peft_rank_pattern_string": ("PEFT types", good_peft_config(rank_pattern="to_q")),
    "peft_alpha_pattern_values": ("PEFT types", good_peft_config(alpha_pattern={"to_q": "x", "to_k": [1]})),
    "peft_rank_pattern_values": ("PEFT types", good_peft_config(rank_pattern={"to_q": None})),
    "peft_use_rslora_string": ("PEFT types", good_peft_config(use_rslora="yes")),
    "peft_config_list": ("PEFT types", [1, 2, 3]),
    "peft_config_string": ("PEFT types", "LORA"),
    "peft_type_number": ("PEFT types", good_peft_config(peft_type=5)),
    "peft_catastrophic_alpha_pattern": ("catastrophic regex", good_peft_config(alpha_pattern={CATASTROPHIC: 8})),
    "peft_catastrophic_rank_pattern": ("catastrophic regex", good_peft_config(rank_pattern={EVIL * 3 + ".*to_q": 1})),
    "peft_catastrophic_target_modules": ("catastrophic regex", good_peft_config(target_modules=CATASTROPHIC)),
    "peft_many_catastrophic_patterns": ("catastrophic regex",
                                        good_peft_config(alpha_pattern={f"{CATASTROPHIC}{i}": 8 for i in range(50)})),
    "peft_long_pattern": ("catastrophic regex", good_peft_config(alpha_pattern={"a?" * 50000 + "a" * 50000: 8})),
    "peft_invalid_regex": ("PEFT types", good_peft_config(alpha_pattern={"([": 8})),
    "peft_pattern_backreference": ("catastrophic regex", good_peft_config(alpha_pattern={r"(.*)*\1\1\1x": 8})),
}


def _peft_case(name: str, category: str, config: Any) -> None:
    CASES.append(Case(name, category, lambda folder: peft_folder(folder / "peft", config)))


for _name, (_category, _config) in _PEFT_CONFIGS.items():
    _peft_case(_name, _category, _config)


@case("huge numbers")
def case_peft_alpha_10e400(folder: Path) -> Path:
    return peft_folder(folder / "peft", None, config_text=json.dumps(good_peft_config()).replace('"lora_alpha": 4', f'"lora_alpha": {HUGE}'))


@case("huge numbers")
def case_peft_r_big_int(folder: Path) -> Path:
    return peft_folder(folder / "peft", None, config_text=json.dumps(good_peft_config()).replace('"r": 2', f'"r": {BIG_INT}'))


@case("non-finite")
def case_peft_alpha_nan(folder: Path) -> Path:
    return peft_folder(folder / "peft", None, config_text=json.dumps(good_peft_config()).replace('"lora_alpha": 4', '"lora_alpha": NaN'))


@case("non-finite")
def case_peft_alpha_pattern_infinity(folder: Path) -> Path:
    return peft_folder(folder / "peft", None, config_text=json.dumps(good_peft_config(alpha_pattern={"to_q": 1})).replace(
        '"to_q": 1', '"to_q": Infinity'))


@case("deep nesting")
def case_peft_config_deep(folder: Path) -> Path:
    return peft_folder(folder / "peft", None, config_text='{"r": 2, "lora_alpha": 4, "alpha_pattern": ' + deep(100000) + "}")


@case("deep nesting")
def case_peft_config_nesting_500(folder: Path) -> Path:
    return peft_folder(folder / "peft", None, config_text='{"r": 2, "lora_alpha": 4, "alpha_pattern": {"to_q": ' + deep(500) + "}}")


@case("PEFT types")
def case_peft_config_not_json(folder: Path) -> Path:
    return peft_folder(folder / "peft", None, config_text="{r: 2")


@case("encoding")
def case_peft_config_not_utf8(folder: Path) -> Path:
    return peft_folder(folder / "peft", None, config_text='{"r": 2, "x": "\udcff\udcfe"}')


@case("PEFT types")
def case_peft_config_is_a_folder(folder: Path) -> Path:
    peft = peft_folder(folder / "peft", good_peft_config())
    (peft / "adapter_config.json").unlink()
    (peft / "adapter_config.json").mkdir()
    return peft


@case("PEFT types")
def case_peft_without_config(folder: Path) -> Path:
    peft = peft_folder(folder / "peft", good_peft_config())
    (peft / "adapter_config.json").unlink()
    return peft / "adapter_model.safetensors"


@case("PEFT types")
def case_peft_dora(folder: Path) -> Path:
    return peft_folder(folder / "peft", good_peft_config(use_dora=True))


@case("catastrophic regex")
def case_peft_crafted_names_and_pattern(folder: Path) -> Path:
    """Module names chosen with the pattern, so that even a careful regex engine backtracks exponentially."""
    peft = folder / "peft"
    peft.mkdir()
    path = "a" * 48 + "x.to_q"
    items = {f"base_model.model.{path}.lora_A.weight": Tensor("F32", [RANK, 320], random_f32(RANK * 320, 1)),
             f"base_model.model.{path}.lora_B.weight": Tensor("F32", [320, RANK], random_f32(320 * RANK, 2))}
    (peft / "adapter_model.safetensors").write_bytes(safetensors_bytes(items, {"format": "pt"}))
    (peft / "adapter_config.json").write_text(json.dumps(good_peft_config(alpha_pattern={r"(a|a)*\.to_q": 8})))
    return peft


_tensor_edit("one_d_factor", "shapes", lambda t: t.__setitem__(
    _first(t, "lora_down.weight"), Tensor("F32", [RANK * 320], random_f32(RANK * 320, 7))))
_tensor_edit("scalar_factor", "shapes", lambda t: t.__setitem__(_first(t, "lora_up.weight"), Tensor("F32", [], f32([1]))))
file_case("cloneofsimo_gap", "keys", lambda: safetensors_bytes(
    {f"unet:{i}:{f}": Tensor("F32", [1, 320], random_f32(320, i)) for i in (0, 5) for f in ("up", "down")}))
file_case("cloneofsimo_huge_index", "huge numbers", lambda: safetensors_bytes(
    {f"unet:{'9' * 5000}:{f}": Tensor("F32", [1, 1], f32([0.0])) for f in ("up", "down")}))
file_case("diffusers_one_d", "shapes", lambda: safetensors_bytes(
    {f"unet.{PEFT_PATHS[0]}.lora_A.weight": Tensor("F32", [640], random_f32(640, 1)),
     f"unet.{PEFT_PATHS[0]}.lora_B.weight": Tensor("F32", [320, RANK], random_f32(640, 2))}))


@case("shapes")
def case_peft_one_d(folder: Path) -> Path:
    peft = folder / "peft"
    peft.mkdir()
    items = {f"base_model.model.{PEFT_PATHS[0]}.lora_A.weight": Tensor("F32", [640], random_f32(640, 1)),
             f"base_model.model.{PEFT_PATHS[0]}.lora_B.weight": Tensor("F32", [320, RANK], random_f32(640, 2))}
    (peft / "adapter_model.safetensors").write_bytes(safetensors_bytes(items, {"format": "pt"}))
    (peft / "adapter_config.json").write_text(json.dumps(good_peft_config()))
    return peft


@case("names", valid=True)
def case_unicode_names(folder: Path) -> Path:
    path = folder / "ピクセル アート ✨ (v2) 'q' \"dq\".safetensors"
    path.write_bytes(good_kohya(8, {"modelspec.title": "ピクセル ✨", "ss_tag_frequency": '{"1_x": {"猫": 3, "a, b": 2}}'}))
    return path


# special files: FIFOs, sockets, devices
@case("special files", commands=("inspect", "convert", "merge", "resize", "add"))
def case_fifo(folder: Path) -> Path:
    path = folder / "fifo.safetensors"
    os.mkfifo(path)
    return path


@case("special files")
def case_fifo_config(folder: Path) -> Path:
    peft = peft_folder(folder / "peft", good_peft_config())
    (peft / "adapter_config.json").unlink()
    os.mkfifo(peft / "adapter_config.json")
    return peft


@case("special files", commands=("inspect", "convert", "merge", "resize", "add"))
def case_socket(folder: Path) -> Path:
    path = folder / "s.safetensors"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


@case("special files", commands=("inspect", "convert", "merge", "resize", "add"))
def case_device(folder: Path) -> Path:
    return Path("/dev/zero")


@case("special files")
def case_link_to_device(folder: Path) -> Path:
    path = folder / "zero.safetensors"
    path.symlink_to("/dev/zero")
    return path


@case("special files")
def case_link_to_fifo(folder: Path) -> Path:
    os.mkfifo(folder / ".pipe")
    path = folder / "p.safetensors"
    path.symlink_to(folder / ".pipe")
    return path


# odd but legitimate names and places
@case("terminal", valid=True)
def case_markup_folder(folder: Path) -> Path:
    inner = folder / "[/x]" / "[bold]"
    inner.mkdir(parents=True)
    path = inner / "[red]a[i].safetensors"
    path.write_bytes(good_kohya(3))
    return path


@case("terminal", valid=True)
def case_escape_in_file_name(folder: Path) -> Path:
    path = folder / "a\x1b]0;title\x07\x1b[2J.safetensors"
    path.write_bytes(good_kohya(4))
    return path


@case("encoding", valid=("inspect", "convert", "merge", "resize", "scan"))  # the catalog stores text: add refuses
def case_non_utf8_name(folder: Path) -> Path:
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9-\xff.safetensors")))
    path.write_bytes(good_kohya(5))
    return path


@case("names", valid=True)
def case_long_name(folder: Path) -> Path:
    path = folder / ("n" * 240 + ".safetensors")
    path.write_bytes(good_kohya(6))
    return path


# -- running the corpus ---------------------------------------------------------------------------- #

@dataclass
class RunResult:
    """What one command did."""

    code: int
    out: str
    err: str


Runner = Callable[..., RunResult]


class Timeout(BaseException):
    """A command ran past its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Timeout` in the main thread after ``seconds``."""
    def handler(signum, frame):
        raise Timeout

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``folder`` (links not followed), by relative path."""
    found = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[os.path.relpath(path, folder)] = f"special {stat.S_IFMT(mode)}"
    return found


@dataclass
class Failure:
    """One check that did not hold."""

    case: str
    command: str
    problem: str

    def __str__(self) -> str:
        return f"{self.case} / {self.command}: {self.problem}"


@dataclass
class CorpusReport:
    """Runs and failures over the corpus."""

    runs: int = 0
    cases: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0


STRAY = ("Traceback", "internal error", "Warning:", "UserWarning", "warnings.warn", "was not found. Setting")


def _check_run(result: RunResult | None, seconds: float, limit: float, valid: bool, what: str) -> str | None:
    if result is None:
        return f"did not end within {limit:.0f} s"
    for text in (result.out, result.err):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "printed text that is not UTF-8 (writing it to a terminal fails)"
        if "\x1b" in text:
            return "printed a raw terminal escape sequence"
    for marker in STRAY:
        if marker in result.err or marker in result.out:
            return f"printed {marker!r}: {result.err.strip()[-300:]}"
    if result.code == 0:
        return None
    if valid:
        return f"failed on a valid input (exit {result.code}): {result.err.strip()}"
    lines = result.err.splitlines()
    if what == "verify" and result.code == 1 and not lines:
        return None  # verify reports problems on stdout
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"exit {result.code} with {len(lines)} stderr lines: {result.err.strip()[:300]!r}"
    return None


def _check_output(out: Path, produced: bool) -> str | None:
    files = sorted(p.name for p in out.iterdir())
    leftovers = [n for n in files if n.startswith(".") or n.endswith((".partial", ".tmp", ".incomplete"))]
    if leftovers:
        return f"left {leftovers} in the output folder"
    if not produced and files:
        return f"failed but left {files} in the output folder"
    if produced:
        if not files:
            return "succeeded but wrote nothing"
        import loralib

        target = out / files[0]
        try:
            adapter = loralib.load(target)
        except Exception as exc:
            return f"wrote an output lorareg cannot read back: {exc}"
        bad = adapter.nonfinite_modules() if hasattr(adapter, "nonfinite_modules") else []
        if bad:
            return f"wrote non-finite factors in {bad[:3]}"
    return None


COMMANDS = ("inspect", "convert", "merge", "resize", "add", "scan", "verify", "show")


def check_case(item: Case, run: Runner, work: Path, *, limit: float = 10.0,
               commands: tuple[str, ...] = COMMANDS) -> tuple[int, list[Failure]]:
    """Run ``item`` through ``commands``; returns (runs, failures)."""
    folder = work / "input"
    folder.mkdir(parents=True)
    good = work / "good.safetensors"
    good.write_bytes(good_kohya(9))
    target = item.build(folder)
    before = snapshot(folder)
    home = work / "home"
    wanted = [c for c in commands if item.commands is None or c in item.commands]
    failures: list[Failure] = []
    runs = 0
    added = False
    for command in wanted:
        out = work / f"out-{command}"
        out.mkdir()
        args: list[Any] = {
            "inspect": ["inspect", target],
            "convert": ["convert", target, "-o", out / "converted.safetensors"],
            "merge": ["merge", f"{good}:0.5", f"{target}:0.5", "-o", out / "merged.safetensors"],
            "resize": ["resize", target, "--rank", "1", "-o", out / "resized.safetensors"],
            "add": ["add", target],
            "scan": ["scan", folder],
            "verify": ["verify"],
            "show": ["show", target],
        }[command]
        if command in ("show",) and not added:
            continue
        started = time.perf_counter()
        result = None
        try:
            with time_limit(limit):
                result = run("--home", home, *args)
        except Timeout:
            result = None
        runs += 1
        seconds = time.perf_counter() - started
        problem = _check_run(result, seconds, limit, item.must_succeed(command), command)
        if problem is None and command in ("convert", "merge", "resize"):
            problem = _check_output(out, produced=result.code == 0)
        if problem is None and command not in ("convert", "merge", "resize") and any(out.iterdir()):
            problem = "wrote into the output folder"
        if problem is not None:
            failures.append(Failure(item.name, command, problem))
        if command == "add" and result is not None and result.code == 0:
            added = True
        after = snapshot(folder)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            failures.append(Failure(item.name, command, f"changed the input folder: {changed[:3]}"))
            before = after
    return runs, failures


def warm_up() -> None:
    """Import what the commands import, so that time limits measure the commands, not first imports
    (an import cut short by a time limit would leave torch half-initialised)."""
    import importlib

    for module in ("torch", "safetensors.torch", "regex", "rich.console", "rich.table", "rich.progress",
                   "sqlite_utils", "loralib.compose", "loralib.inspection", "lorareg.cli.adapters",
                   "lorareg.cli.compose", "lorareg.cli.catalog", "lorareg.registry.scan", "lorareg.registry.verify",
                   "lorareg.registry.lineage"):
        importlib.import_module(module)


def run_corpus(run: Runner, work: Path, cases: list[Case] | None = None, *, limit: float = 10.0,
               progress: Callable[[Case, list[Failure]], None] | None = None) -> CorpusReport:
    """Every case through every command; see the module docstring."""
    warm_up()
    report = CorpusReport()
    started = time.perf_counter()
    for number, item in enumerate(cases if cases is not None else CASES):
        runs, failures = check_case(item, run, work / f"{number:03d}-{item.name}", limit=limit)
        report.runs += runs
        report.cases += 1
        report.failures += failures
        if progress is not None:
            progress(item, failures)
    report.seconds = time.perf_counter() - started
    return report


def in_process_runner() -> Runner:
    """Run the ``lorareg`` entry point in this process, capturing stdout and stderr."""
    import contextlib
    import io

    from lorareg.cli.main import main

    def run(*args: Any) -> RunResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return RunResult(code, out.getvalue(), err.getvalue())

    return run


# every spelling and family (issues 11 and 12): readers of ComfyUI, OneTrainer, OMI, XLabs, Flux.1 kohya and
# Flux.1 LyCORIS names get damaged files too
def _lora_pair(prefix: str, down: list[int], up: list[int], *, suffixes=("lora_down.weight", "lora_up.weight"),
               alpha: bool = True, seed: int = 30) -> dict[str, Tensor]:
    tensors = {f"{prefix}.{suffixes[0]}": Tensor("F32", down, random_f32(math.prod(down), seed)),
               f"{prefix}.{suffixes[1]}": Tensor("F32", up, random_f32(math.prod(up), seed + 1))}
    if alpha:
        tensors[f"{prefix}.alpha"] = Tensor("F32", [], f32([1.0]))
    return tensors


FLUX_QKV = "lora_unet_double_blocks_0_img_attn_qkv"
# valid, but merged with the corpus' SD1 file it is (rightly) refused: another model family
file_case("flux_kohya_qkv", "families", lambda: safetensors_bytes(_lora_pair(FLUX_QKV, [1, 3072], [9216, 1])),
          valid=("inspect", "convert", "resize", "add", "scan", "verify", "show"))
file_case("flux_kohya_qkv_rows_not_three_parts", "families",
          lambda: safetensors_bytes(_lora_pair(FLUX_QKV, [1, 3072], [9000, 1])))
file_case("flux_kohya_block_99", "families",
          lambda: safetensors_bytes(_lora_pair("lora_unet_double_blocks_99_img_attn_qkv", [1, 3072], [9216, 1])))
file_case("flux_lokr_split_not_exact", "families", lambda: safetensors_bytes({
    f"{FLUX_QKV}.lokr_w1": Tensor("F32", [4, 3], random_f32(12, 40)),
    f"{FLUX_QKV}.lokr_w2_a": Tensor("F32", [2304, 1], random_f32(2304, 41)),
    f"{FLUX_QKV}.lokr_w2_b": Tensor("F32", [1, 1024], random_f32(1024, 42)),
    f"{FLUX_QKV}.alpha": Tensor("F32", [], f32([1.0]))}))
SD3_QKV = "lora_unet_joint_blocks_0_x_block_attn_qkv"
# SD3 LyCORIS (kohya and MMDiT names): a LoKr whose right factor (2304 rows) does not divide the part boundary at
# 1536 would need a guessed split; LoHa factors whose rows disagree are no module at all
file_case("sd3_lokr_split_not_exact", "families", lambda: safetensors_bytes({
    f"{SD3_QKV}.lokr_w1": Tensor("F32", [2, 96], random_f32(192, 60)),
    f"{SD3_QKV}.lokr_w2_a": Tensor("F32", [2304, 1], random_f32(2304, 61)),
    f"{SD3_QKV}.lokr_w2_b": Tensor("F32", [1, 16], random_f32(16, 62)),
    f"{SD3_QKV}.alpha": Tensor("F32", [], f32([1.0]))}))
file_case("sd3_mmdit_loha_shape_mismatch", "families", lambda: safetensors_bytes({
    f"diffusion_model.joint_blocks.0.x_block.attn.qkv.{role}": Tensor("F32", shape, random_f32(shape[0] * shape[1], 63))
    for role, shape in (("hada_w1_a", [4608, 1]), ("hada_w1_b", [1, 1536]), ("hada_w2_a", [4600, 1]),
                        ("hada_w2_b", [1, 1536]))}))
file_case("comfyui_missing_down", "families", lambda: safetensors_bytes({
    "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": Tensor("F32", [320, 1], random_f32(320, 50))}))
file_case("comfyui_mismatched_factors", "families", lambda: safetensors_bytes(
    _lora_pair("diffusion_model.input_blocks.1.1.proj_in", [1, 320], [320, 2])))
file_case("omi_unknown_block", "families", lambda: safetensors_bytes(
    _lora_pair("unet.input_blocks.99.1.proj_in", [1, 320], [320, 1])))
file_case("onetrainer_original_wrong_width", "families", lambda: safetensors_bytes(
    _lora_pair("input_blocks.4.1.proj_in", [1, 7], [640, 1], suffixes=("lora_A.weight", "lora_B.weight"))))
file_case("xlabs_mismatched_rank", "families", lambda: safetensors_bytes(
    _lora_pair("double_blocks.0.processor.qkv_lora1", [1, 3072], [3072, 2], suffixes=("down.weight", "up.weight"),
               alpha=False)))
