"""The header reader: valid files are described exactly, every malformed one is a CorruptFileError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loralib.errors import CorruptFileError, InputNotFoundError
from loralib.files.header import MAX_HEADER_BYTES, read_header


def _raw_file(path, header: object, data: bytes = b"", *, length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.zeros(3, 4, dtype=torch.float16), "b": torch.ones(2, dtype=torch.bfloat16),
               "alpha": torch.tensor(8.0)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"ss_network_dim": "4"})
    header = read_header(path)
    assert {n: t.shape for n, t in header.tensors.items()} == {"a": (3, 4), "b": (2,), "alpha": ()}
    assert header.tensors["a"].dtype == "F16" and header.tensors["b"].dtype == "BF16"
    assert header.metadata == {"ss_network_dim": "4"}
    assert not header.is_truncated
    assert header.read_scalars(["alpha"]) == {"alpha": 8.0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_scalar_alpha_in_every_dtype(tmp_path, dtype):
    path = tmp_path / "a.safetensors"
    save_file({"alpha": torch.tensor(3.0, dtype=dtype)}, path)
    assert read_header(path).read_scalars(["alpha"])["alpha"] == 3.0


def test_missing_path(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        read_header(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"abc", "only 3 bytes"),
    (struct.pack("<Q", 2 ** 40) + b"{}", "header"),
    (struct.pack("<Q", 1000) + b"{}", "whole file"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (b"PK\x03\x04" + b"\x00" * 100, "safetensors"),  # a zip-based .ckpt renamed
])
def test_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError, match=message):
        read_header(path)


def test_header_length_bomb_is_refused_before_reading(tmp_path):
    path = _raw_file(tmp_path / "bomb.safetensors", {}, length=MAX_HEADER_BYTES + 1)
    with pytest.raises(CorruptFileError, match="declares a 100.0 MiB header"):
        read_header(path)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "non-negative"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8 bytes"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "increasing"),
    ({"dtype": "F32", "shape": [1]}, "data_offsets"),
    ("not a dict", "malformed"),
])
def test_malformed_entries(tmp_path, entry, message):
    path = _raw_file(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 8)
    with pytest.raises(CorruptFileError, match=message):
        read_header(path)


def test_overlapping_and_gapped_tensors(tmp_path):
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(CorruptFileError, match="overlaps"):
        read_header(_raw_file(tmp_path / "o.safetensors", overlap, b"\0" * 8))
    gap = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(CorruptFileError, match="gap"):
        read_header(_raw_file(tmp_path / "g.safetensors", gap, b"\0" * 8))


def test_bad_metadata(tmp_path):
    with pytest.raises(CorruptFileError, match="metadata"):
        read_header(_raw_file(tmp_path / "m.safetensors", {"__metadata__": {"a": 1}}))


def test_truncated_data_is_described_then_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    header = read_header(path)
    assert header.is_truncated and header.missing_bytes == 100
    with pytest.raises(CorruptFileError, match="truncated.*100 B of tensor data are missing"):
        header.require_complete()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_never_escape_as_other_errors(tmp_path, data):
    """Random damage to a real header: the reader either succeeds or raises CorruptFileError."""
    path = tmp_path / "f.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3), "lora_unet_x.alpha": torch.tensor(1.0)}, path,
              metadata={"ss_network_dim": "2"})
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    mutation = data.draw(st.sampled_from(["flip", "truncate", "length", "splice"]))
    if mutation == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, 8 + n - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif mutation == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif mutation == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2 ** 64 - 1)))
    else:
        junk = data.draw(st.binary(min_size=1, max_size=40))
        at = data.draw(st.integers(8, 8 + n))
        raw[at:at] = junk
    path.write_bytes(bytes(raw))
    try:
        header = read_header(path)
    except CorruptFileError as exc:
        assert "\n" not in str(exc)
        return
    # whatever was accepted is self-consistent: the tensors tile the data section exactly
    assert sum(t.nbytes for t in header.tensors.values()) == header.data_size


_JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.floats(allow_nan=True),
    st.text(max_size=8), st.just(10 ** 400), st.just(2 ** 64), st.just(-1))
_JSON_VALUES = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=12)
_NUMBER_TOKENS = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "9" * 5000, "-0", "1.5", "[" * 3000 + "]" * 3000])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_header_values_are_valid_or_one_clear_error(tmp_path, data):
    """Structured damage: any JSON value (huge integers, NaN, nesting, wrong types, repeated keys) in
    any place of a real header. The reader returns a self-consistent header or one CorruptFileError,
    and the adapter readers above it (inspect) never raise anything but LoraError."""
    import loralib
    from loralib.errors import LoraError

    header = {"__metadata__": {"ss_network_module": "networks.lora"},
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
                  {"dtype": "F32", "shape": [1, 320], "data_offsets": [0, 1280]},
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
                  {"dtype": "F32", "shape": [320, 1], "data_offsets": [1280, 2560]},
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha":
                  {"dtype": "F32", "shape": [], "data_offsets": [2560, 2564]}}
    text = json.dumps(header)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["value", "token", "duplicate"]))
        if where == "value":  # replace one entry, one field of an entry, or the metadata
            key = data.draw(st.sampled_from(sorted(header)))
            field = data.draw(st.sampled_from([None, "dtype", "shape", "data_offsets"]))
            value = data.draw(_JSON_VALUES)
            if field is None or not isinstance(header[key], dict) or key == "__metadata__":
                header[key] = value
            else:
                header[key] = {**header[key], field: value}
            try:
                text = json.dumps(header)
            except ValueError:
                continue
        elif where == "token":  # a raw token json.dumps would never write
            text = text.replace("1280", data.draw(_NUMBER_TOKENS), 1)
        else:
            text = text.replace('{"__metadata__"', '{"__metadata__": {}, "__metadata__"', 1)
    raw = text.encode("utf-8", "surrogatepass")
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 2564)
    try:
        parsed = read_header(path)
    except CorruptFileError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 2000
        return
    assert sum(t.nbytes for t in parsed.tensors.values()) == parsed.data_size
    assert all(isinstance(v, str) for v in parsed.metadata.values())
    try:
        loralib.inspect(path)
    except LoraError as exc:
        assert "\n" not in str(exc)
