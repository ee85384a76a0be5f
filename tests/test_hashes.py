"""Hashes match their definitions (A1111, kohya, Civitai) and are computed on the bytes written."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loralib.files.hashes import Deferred, FileHashes, hash_file
from loralib.files.header import read_header
from loralib.files.writer import write_safetensors
from loralib.metadata import SELF_HASHES


def _a1111_legacy(path) -> str:
    """A1111's old model hash, written out from its definition."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _big_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.lora_down.weight": torch.randn(8, 40000, generator=g), "a.lora_up.weight": torch.randn(300, 8, generator=g)}


def test_hashes_follow_their_definitions(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_big_tensors(), path, metadata={"ss_network_dim": "8"})
    raw = path.read_bytes()
    start = read_header(path).data_start
    hashes = hash_file(path)
    assert hashes.sha256 == hashlib.sha256(raw).hexdigest()
    assert hashes.autov2 == hashes.sha256[:10]
    assert hashes.tensor_sha256 == hashlib.sha256(raw[start:]).hexdigest() == hashes.autov3
    assert hashes.a1111 == hashes.tensor_sha256[:12]
    assert hashes.legacy == _a1111_legacy(path)


def test_small_file_legacy_hash_is_of_nothing(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file({"w": torch.zeros(4)}, path)
    assert hash_file(path).legacy == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_tensor_hash_ignores_metadata(tmp_path):
    tensors = _big_tensors()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, a, metadata={"title": "one"})
    save_file(tensors, b, metadata={"title": "two, a longer title"})
    ha, hb = hash_file(a), hash_file(b)
    assert ha.sha256 != hb.sha256
    assert ha.tensor_sha256 == hb.tensor_sha256


def test_writer_stores_hashes_of_the_written_bytes(tmp_path):
    path = tmp_path / "w.safetensors"
    returned = write_safetensors(path, _big_tensors(), {"ss_network_dim": "8"}, SELF_HASHES).hashes()
    recomputed = hash_file(path)
    assert returned == recomputed  # every hash, identity included, as reading the file back gives
    assert returned.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    metadata = read_header(path).metadata
    assert metadata["sshs_model_hash"] == recomputed.tensor_sha256
    assert metadata["modelspec.hash_sha256"] == "0x" + recomputed.tensor_sha256
    assert metadata["sshs_legacy_hash"] == recomputed.legacy == _a1111_legacy(path)
    with safe_open(str(path), "pt") as f:  # the safetensors library reads what we wrote
        assert torch.equal(f.get_tensor("a.lora_up.weight"), _big_tensors()["a.lora_up.weight"])


def test_writer_leaves_out_the_legacy_hash_when_the_header_covers_it(tmp_path):
    path = tmp_path / "h.safetensors"
    tensors = {f"t{i:05d}.lora_down.weight": torch.zeros(1) for i in range(30000)}  # a header over 1 MiB
    returned = write_safetensors(path, tensors, {}, SELF_HASHES).hashes()
    header = read_header(path)
    assert header.data_start > 0x100000
    assert "sshs_legacy_hash" not in header.metadata
    assert header.metadata["sshs_model_hash"] == hash_file(path).tensor_sha256
    assert returned == hash_file(path)  # the legacy hash of the bytes, header included


def test_writer_round_trips_every_dtype(tmp_path):
    tensors = {f"t{i}": torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dt) for i, dt in
               enumerate([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.uint8])}
    path = tmp_path / "d.safetensors"
    write_safetensors(path, tensors)
    with safe_open(str(path), "pt") as f:
        for name, tensor in tensors.items():
            loaded = f.get_tensor(name)
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)


@pytest.mark.parametrize("finish", ["before the write", "during the write"])
def test_an_input_hash_is_written_even_after_its_adapter_is_gone(tmp_path, finish):
    """A merge drops its loaded inputs before the output is written (the playground's merge jobs do):
    the input's hash, still being computed or already known, must reach the file's history and the
    returned record — never a stand-in value (the old placeholder table lost it in exactly this case)."""
    import gc
    import threading

    import loralib
    from loralib.metadata import history
    from loralib.records import InputRecord, OperationRecord
    from loralib.synthetic import random_adapter
    from tests.helpers.small_loras import sd1_attention_layers

    release = threading.Event()
    if finish == "before the write":
        release.set()
    hashes = FileHashes("cd" * 32, "ab" * 32, "12345678", identity="ef" * 32)
    deferred = Deferred(lambda: (release.wait(10), hashes)[1])
    record = OperationRecord("merge", [InputRecord(file="a.safetensors", weight=0.5, pending_hashes=deferred)])
    del deferred
    gc.collect()
    if finish == "during the write":
        threading.Timer(0.2, release.set).start()
    adapter = random_adapter(sd1_attention_layers(2), rank=2, seed=1, architecture="sd1")
    result = loralib.save(adapter, tmp_path / "merged.safetensors", operation=record)
    written = history(read_header(result.path).metadata)[-1]["inputs"][0]
    assert written == {"file": "a.safetensors", "identity": "ef" * 32, "tensor_sha256": "ab" * 32, "sha256": "cd" * 32,
                       "weight": 0.5}
    assert result.operation.inputs[0].tensor_sha256 == "ab" * 32 and result.operation.inputs[0].identity == "ef" * 32


def test_loaded_tensors_view_the_mapped_file_and_stay_valid_once_released(tmp_path):
    """Adapters load as views of the memory-mapped file; releasing a module drops its pages from
    this process only: its values are read again from the file when touched."""
    import loralib
    from loralib.synthetic import random_adapter
    from tests.helpers.small_loras import sd1_attention_layers

    path = tmp_path / "a.safetensors"
    original = random_adapter(sd1_attention_layers(), 64, seed=3, dtype=torch.float16)
    loralib.save(original, path)
    loaded = loralib.load(path)
    key = next(iter(loaded.modules))
    before = loaded.modules[key].up.clone()
    for name in loaded.modules:
        loaded.release(name)
    assert torch.equal(loaded.modules[key].up, before)
    assert all(torch.equal(loaded.modules[k].down, m.down) and torch.equal(loaded.modules[k].up, m.up)
               for k, m in original.modules.items())
    assert path.read_bytes()  # the file is untouched and readable


def test_a_written_file_changed_afterwards_is_hashed_as_it_is_now(tmp_path):
    """The whole-file hash of an output is computed when first asked for: if the file was replaced
    in between, every hash must describe what is there, never mix the two."""
    path = tmp_path / "w.safetensors"
    written = write_safetensors(path, _big_tensors(), {}, SELF_HASHES)
    other = {k: v + 1 for k, v in _big_tensors().items()}
    save_file(other, path, metadata={"title": "someone else's, written later"})
    os.utime(path, ns=(1, 1))  # another time even on a file system with a coarse clock
    assert written.hashes() == hash_file(path)
    assert written.hashes().sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert written.hashes().tensor_sha256 != written.tensor_sha256


def test_the_data_pass_hashes_in_order_and_hands_failures_to_the_writer():
    from loralib.files.writer import DataPass

    chunks = [os.urandom(n) for n in (0, 1, 4096, 3 << 20, 17)]
    with DataPass() as data:
        for chunk in chunks:
            data.add(memoryview(chunk))
        assert data.finish() == hashlib.sha256(b"".join(chunks)).hexdigest()
    with pytest.raises(TypeError), DataPass() as data:
        data.add(12345)  # not bytes: hashlib fails on the helper thread
        data.finish()


def test_a_write_that_fails_midway_leaves_nothing_and_stops_the_hashing(tmp_path, monkeypatch):
    import threading

    from loralib.files import writer

    written = []

    class FullDisk(OSError):
        pass

    real_open = open

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def write(self, data):
            written.append(len(data))
            if len(written) > 3:
                raise FullDisk("No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(writer, "open", lambda *a, **k: Failing(real_open(*a, **k)), raising=False)
    path = tmp_path / "w.safetensors"
    with pytest.raises(FullDisk):
        write_safetensors(path, _big_tensors() | {"b.alpha": torch.tensor(8.0)}, {}, SELF_HASHES)
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "lorareg-hash"]
