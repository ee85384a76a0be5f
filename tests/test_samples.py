"""Sample images: the A1111 parameters lorareg writes are read back; only images are accepted."""

from __future__ import annotations

import json
import os

from loralib.generation import AdapterUse, GenerationSettings, infotext
from lorareg.registry.samples import image_kind, lora_hashes, parse_parameters, sample_record
from tests.helpers.small_loras import small_lora_bytes


def test_the_parameters_lorareg_writes_are_read_back():
    settings = GenerationSettings("a castle, at night", "blurry, dark", 20, 7.5, 512, 768, 42, "Euler a")
    uses = [AdapterUse("pixel", 0.8, a1111_hash="0123456789ab"), AdapterUse("other", -0.3, a1111_hash="ba9876543210")]
    parsed = parse_parameters(infotext(settings, uses, model="base", model_hash="abcdef0123"))
    assert parsed["prompt"] == "a castle, at night <lora:pixel:0.8> <lora:other:-0.3>"
    assert parsed["negative_prompt"] == "blurry, dark"
    assert parsed["loras"] == {"pixel": 0.8, "other": -0.3}
    fields = parsed["settings"]
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"]) == (
        "20", "Euler a", "7.5", "42", "512x768")
    assert (fields["Model hash"], fields["Model"]) == ("abcdef0123", "base")
    assert lora_hashes(fields) == {"pixel": "0123456789ab", "other": "ba9876543210"}


def test_a_sample_records_prompt_seed_weight_and_settings(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    settings = GenerationSettings("a tower", "", 4, 7.0, 32, 32, 9, "DDIM")
    uses = [AdapterUse("pixel", 0.6, a1111_hash="0123456789ab"), AdapterUse("other", 0.2, a1111_hash="ba9876543210")]
    info = PngInfo()
    info.add_text("parameters", infotext(settings, uses))
    image = tmp_path / "00000-9.png"
    Image.new("RGB", (4, 4)).save(image, pnginfo=info)
    record = sample_record(image, a1111_hash="ba9876543210" + "f" * 52, source="generate")
    assert (record["prompt"], record["seed"], record["weight"], record["source"]) == ("a tower", 9, 0.2, "generate")
    assert record["parameters"]["Sampler"] == "DDIM" and "Seed" not in record["parameters"]
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (4, 4)).save(jpeg)
    assert image_kind(jpeg) == "jpeg" and sample_record(jpeg) == {"path": str(jpeg), "prompt": None}


def test_add_sample_accepts_only_images(lorareg, tmp_path):
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(small_lora_bytes(1))
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not pixels")
    res = lorareg("add", lora, "--sample", fake)
    assert res.code == 1 and res.err.strip() == (f"error: {fake} is not an image (PNG, JPEG, WebP or GIF). "
                                                 "Give an image rendered with the adapter.")
    assert json.loads(lorareg("list", "--json").out) == []  # nothing was added
    for kind, head in (("webp", b"RIFF\x10\x00\x00\x00WEBPVP8 "), ("gif", b"GIF89a" + b"\x00" * 6)):
        image = tmp_path / f"x.{kind}"
        image.write_bytes(head)
        assert image_kind(image) == kind
    assert image_kind(lora) is None
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert image_kind(fifo) is None  # never opened: opening a FIFO waits for a writer forever
