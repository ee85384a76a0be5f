"""Datasets: the three layouts, every problem reported before training, sizes, crops, buckets, batches."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from loralib.errors import InputNotFoundError
from loralib.training.dataset import (
    BatchPlan,
    DatasetError,
    load_image,
    make_buckets,
    nearest_bucket,
    plan_crop,
    scan_dataset,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def _image(path: Path, size=(40, 24), colour=(200, 30, 30), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    return path


def _caption(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_bundled_example_is_a_tutorial_layout_dataset():
    dataset = scan_dataset(EXAMPLES)
    assert dataset.layout == "tutorial" and len(dataset.records) == 8
    assert all(r.caption.startswith("pxl style, ") and r.size == (64, 64) for r in dataset.records)
    assert dataset.tag_frequency()["data"]["pxl style"] == 8


def test_kohya_layout_with_repeat_folders(tmp_path):
    _image(tmp_path / "10_pxl" / "a.png")
    _caption(tmp_path / "10_pxl" / "a.txt", "pxl style,  red\nsquare ")
    _image(tmp_path / "3_other" / "b.jpg", format="JPEG")
    _caption(tmp_path / "3_other" / "b.txt", "pxl style, blue")
    _image(tmp_path / "c.webp", format="WEBP")
    _caption(tmp_path / "c.txt", "plain")
    (tmp_path / "notes").mkdir()  # a folder without images that is not a repeat folder is ignored
    dataset = scan_dataset(tmp_path)
    assert dataset.layout == "kohya"
    by_name = {r.path.name: r for r in dataset.records}
    assert by_name["a.png"].repeats == 10 and by_name["a.png"].caption == "pxl style, red square"
    assert by_name["b.jpg"].repeats == 3 and by_name["b.jpg"].folder == "3_other"
    assert by_name["c.webp"].repeats == 1
    assert dataset.images_per_epoch == 14
    assert dataset.folders() == {"10_pxl": {"n_repeats": 10, "img_count": 1}, "3_other": {"n_repeats": 3, "img_count": 1},
                                 tmp_path.name: {"n_repeats": 1, "img_count": 1}}
    assert dataset.tag_frequency()["10_pxl"] == {"pxl style": 1, "red square": 1}


def test_metadata_jsonl_layout(tmp_path):
    _image(tmp_path / "pics" / "one.png")
    _image(tmp_path / "two.webp", format="WEBP")
    lines = [{"file_name": "pics/one.png", "text": "first"}, {"file_name": "two.webp", "caption": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dataset = scan_dataset(tmp_path)
    assert dataset.layout == "metadata"
    assert [(r.path.name, r.caption) for r in dataset.records] == [("one.png", "first"), ("two.webp", "second")]


def test_every_problem_is_listed_with_file_names(tmp_path):
    _image(tmp_path / "images" / "good.png")
    _caption(tmp_path / "texts" / "good.txt", "fine")
    _image(tmp_path / "images" / "nocap.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _caption(tmp_path / "texts" / "broken.txt", "x")
    full = _image(tmp_path / "images" / "cut.jpg", size=(64, 64), format="JPEG")
    full.write_bytes(full.read_bytes()[:200])  # truncated
    _caption(tmp_path / "texts" / "cut.txt", "y")
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path)
    text = str(caught.value)
    assert len(caught.value.problems) == 3
    assert f"missing caption for {tmp_path / 'images' / 'nocap.png'} (expected {tmp_path / 'texts' / 'nocap.txt'})" in text
    assert f"unreadable image {tmp_path / 'images' / 'broken.png'}" in text
    assert f"unreadable image {tmp_path / 'images' / 'cut.jpg'}" in text
    assert "nothing was trained" in text and "\n" not in text


def test_empty_folders_and_bad_metadata_are_reported(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="empty folder"):
        scan_dataset(tmp_path / "a")
    (tmp_path / "b" / "5_cats").mkdir(parents=True)
    _image(tmp_path / "b" / "x.png")
    _caption(tmp_path / "b" / "x.txt", "x")
    with pytest.raises(DatasetError, match=f"empty folder {tmp_path / 'b' / '5_cats'}"):
        scan_dataset(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "t"}\nnot json\n'
                                                   '{"file_name": "../escape.png", "text": "t"}\n')
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path / "c")
    assert [p.split(" ")[:3] for p in caught.value.problems] == [
        ["metadata.jsonl", "line", "1:"], ["metadata.jsonl", "line", "2"], ["metadata.jsonl", "line", "3"]]
    with pytest.raises(InputNotFoundError, match="does not exist"):
        scan_dataset(tmp_path / "missing")


def test_cli_reports_a_bad_dataset_before_loading_any_model(tmp_path, lorareg):
    _image(tmp_path / "data" / "images" / "cat.png")
    (tmp_path / "data" / "texts").mkdir()
    res = lorareg("train", "--data", tmp_path / "data", "--base", tmp_path / "no-such-model", "-o", tmp_path / "out")
    assert res.code == 1
    assert f"missing caption for {tmp_path / 'data' / 'images' / 'cat.png'}" in res.err
    assert "no-such-model" not in res.err and "Traceback" not in res.err
    assert not (tmp_path / "out").exists()


def test_exif_rotation_and_transparency(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90°: shown 20 wide, 40 high
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    _caption(tmp_path / "r.txt", "rotated")
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    clear.save(tmp_path / "t.png")
    _caption(tmp_path / "t.txt", "transparent")
    records = {r.path.name: r for r in scan_dataset(tmp_path).records}
    assert records["r.jpg"].size == (20, 40)
    crop = plan_crop((20, 40), (16, 32), random_crop=False, flip=False, rng=random.Random(0))
    assert load_image(tmp_path / "r.jpg", crop, (16, 32)).shape == (3, 32, 16)
    white = load_image(tmp_path / "t.png", plan_crop((16, 16), (16, 16), random_crop=False, flip=False,
                                                     rng=random.Random(0)), (16, 16))
    assert torch.allclose(white, torch.ones_like(white))  # transparent pixels become white, not black


def test_resize_then_center_or_random_crop(tmp_path):
    source = Image.new("RGB", (64, 32), (0, 0, 0))
    source.paste((255, 255, 255), (32, 0, 64, 32))  # left half black, right half white
    source.save(tmp_path / "half.png")
    crop = plan_crop((64, 32), (16, 16), random_crop=False, flip=False, rng=random.Random(0))
    assert crop.resized == (32, 16) and (crop.left, crop.top) == (8, 0) and crop.original_size == (32, 64)
    pixels = load_image(tmp_path / "half.png", crop, (16, 16))
    assert pixels.shape == (3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, :7].mean() < -0.9 and pixels[:, :, 9:].mean() > 0.9  # the center holds both halves
    lefts = {plan_crop((64, 32), (16, 16), random_crop=True, flip=False, rng=random.Random(s)).left for s in range(50)}
    assert lefts <= set(range(17)) and len(lefts) > 5
    flipped = plan_crop((64, 32), (16, 16), random_crop=False, flip=True, rng=random.Random(1))
    if flipped.flip:
        mirrored = load_image(tmp_path / "half.png", flipped, (16, 16))
        assert torch.equal(mirrored, pixels.flip(-1))


def test_buckets_keep_area_and_aspect_ratio():
    buckets = make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 512 * 512
        assert max(width, height) / min(width, height) <= 2.0
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert nearest_bucket((1200, 600), buckets) == max(buckets, key=lambda b: b[0] / b[1])
    assert nearest_bucket((600, 900), buckets) == (384, 640)  # ratio 0.6 is closest to 0.667


def test_batches_cover_every_repeat_once_per_epoch_and_are_reproducible(tmp_path):
    for index, size in enumerate([(64, 64), (64, 64), (128, 64), (128, 64), (64, 128)]):
        folder = tmp_path / ("2_a" if index < 2 else "b")
        _image(folder / f"{index}.png", size=size)
        _caption(folder / f"{index}.txt", f"image {index}")
    dataset = scan_dataset(tmp_path)
    plan = BatchPlan.create(dataset, resolution=64, batch_size=2, seed=5, bucketing=True, bucket_step=16)
    assert len(plan.bucket_counts()) == 3
    first = plan.epoch(0)
    assert len(first) == plan.batches_per_epoch()
    counts = Counter(i for batch in first for i in batch.items)
    assert counts == Counter({i: dataset.records[i].repeats for i in range(len(dataset.records))})
    for batch in first:
        assert {plan.assignment[i] for i in batch.items} == {batch.bucket}
    assert plan.epoch(0) == first
    assert plan.epoch(1) != first
    assert BatchPlan.create(dataset, resolution=64, batch_size=2, seed=6, bucketing=True, bucket_step=16).epoch(0) != first


def test_folder_class_tokens_caption_images_without_a_caption_file(tmp_path):
    _image(tmp_path / "10_sks dog" / "a.png")
    _image(tmp_path / "10_sks dog" / "b.png")
    _caption(tmp_path / "10_sks dog" / "b.txt", "sks dog, running")
    _image(tmp_path / "loose.png")  # outside a repeat folder: no class tokens to fall back on
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path)
    assert len(caught.value.problems) == 2  # without folder_class_tokens both missing captions are problems
    (tmp_path / "loose.txt").write_text("loose")
    records = {r.path.name: r for r in scan_dataset(tmp_path, class_tokens=True).records}
    assert records["a.png"].caption == "sks dog" and records["a.png"].repeats == 10
    assert records["b.png"].caption == "sks dog, running"  # a caption file still wins


def test_masks_are_found_beside_or_flat_and_cropped_with_their_image(tmp_path):
    from loralib.training.dataset import load_mask

    _image(tmp_path / "data" / "10_x" / "a.png", size=(64, 32))
    _caption(tmp_path / "data" / "10_x" / "a.txt", "a")
    _image(tmp_path / "data" / "10_x" / "b.png")
    _caption(tmp_path / "data" / "10_x" / "b.txt", "b")
    masks = tmp_path / "masks"
    half = Image.new("L", (64, 32), 0)
    half.paste(255, (32, 0, 64, 32))  # right half trains
    _image(masks / "10_x" / "a.png").unlink()
    half.save(masks / "10_x" / "a.png")  # mirrors the dataset's folders
    with pytest.raises(DatasetError, match=r"missing mask for .*b\.png"):
        scan_dataset(tmp_path / "data", mask_dir=masks)
    _image(masks / "b.webp", format="WEBP")  # or flat, any image extension (kohya's convention)
    records = {r.path.name: r for r in scan_dataset(tmp_path / "data", mask_dir=masks).records}
    assert records["a.png"].mask == masks / "10_x" / "a.png" and records["b.png"].mask == masks / "b.webp"
    record = records["a.png"]
    crop = plan_crop(record.size, (16, 16), random_crop=False, flip=False, rng=random.Random(0))
    mask = load_mask(record, crop, (16, 16))
    assert mask.shape == (1, 16, 16) and mask[:, :, :7].max() == 0 and mask[:, :, 9:].min() == 1
    flipped = plan_crop(record.size, (16, 16), random_crop=False, flip=True, rng=random.Random(1))
    assert flipped.flip and torch.equal(load_mask(record, flipped, (16, 16)), mask.flip(-1))
    # without mask files, the alpha channel is the mask; an opaque image trains everywhere
    clear = Image.new("RGBA", (16, 16), (9, 9, 9, 0))
    clear.paste((9, 9, 9, 255), (0, 0, 8, 16))
    clear.save(tmp_path / "alpha.png")
    square = plan_crop((16, 16), (16, 16), random_crop=False, flip=False, rng=random.Random(0))
    from loralib.training.dataset import ImageRecord

    alpha = load_mask(ImageRecord(tmp_path / "alpha.png", "", 1, "", (16, 16)), square, (16, 16))
    assert alpha[:, :, :8].min() == 1 and alpha[:, :, 8:].max() == 0
    opaque = load_mask(ImageRecord(masks / "b.webp", "", 1, "", (40, 24)), square, (16, 16))
    assert opaque.min() == 1


def test_validation_split_is_disjoint_and_fixed_by_its_seed():
    from loralib.training.dataset import split_validation

    dataset = scan_dataset(EXAMPLES)
    train, held = split_validation(dataset, 0.25, seed=3)
    assert len(held.records) == 2 and len(train.records) == 6
    assert not {r.path for r in held.records} & {r.path for r in train.records}
    reordered = type(dataset)(dataset.root, dataset.layout, list(reversed(dataset.records)))
    assert [r.path for r in split_validation(reordered, 0.25, seed=3)[1].records] == [r.path for r in held.records]
    others = {tuple(r.path for r in split_validation(dataset, 0.25, seed=s)[1].records) for s in range(8)}
    assert len(others) > 1
    assert len(split_validation(dataset, 0.01, seed=3)[1].records) == 1  # at least one image is held out
    with pytest.raises(Exception, match="leaves nothing to train on"):
        split_validation(type(dataset)(dataset.root, dataset.layout, dataset.records[:1]), 0.5, seed=0)


def test_caption_shuffle_keep_tokens_and_tag_dropout():
    from loralib.training.captions import process_caption

    caption = "pxl style, a, b, c, d, e"
    seen = set()
    for seed in range(30):
        text = process_caption(caption, random.Random(seed), shuffle=True, keep_tokens=1, tag_dropout=0.0)
        tags = text.split(", ")
        assert tags[0] == "pxl style" and sorted(tags[1:]) == ["a", "b", "c", "d", "e"]
        seen.add(text)
    assert len(seen) > 10
    kept = [len(process_caption(caption, random.Random(s), shuffle=False, keep_tokens=2, tag_dropout=0.5).split(", "))
            for s in range(400)]
    assert min(kept) >= 2 and abs(sum(k - 2 for k in kept) / len(kept) - 2.0) < 0.25  # 4 free tags, half dropped
    assert process_caption(caption, random.Random(0), shuffle=False, keep_tokens=0, tag_dropout=0.0) == caption
