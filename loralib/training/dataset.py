"""Training images and captions: finding them, checking them, and turning them into batches.

Three layouts are read (see docs/training.md):

- tutorial: ``data/images/cat.png`` with its caption in ``data/texts/cat.txt``;
- kohya: ``cat.png`` beside ``cat.txt``, in the folder itself or in ``N_name`` subfolders whose
  images are repeated ``N`` times per epoch (with ``folder_class_tokens``, an image there without a
  caption file is captioned ``name``, kohya's class tokens);
- ``metadata.jsonl``: one JSON object per line with ``file_name`` and ``text`` (or ``caption``),
  as Hugging Face's image-folder datasets write it.

:func:`scan_dataset` decodes every image once and reports every problem — missing captions,
unreadable images, empty folders — in one :class:`DatasetError` before training starts.
Images of any size are scaled to cover their training size and cropped (center or random);
with aspect-ratio bucketing each image trains at the bucket shape closest to its own. Loss masks
(``masked_loss``) are cropped and flipped with their image.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputNotFoundError, InvalidArgumentError
from ..jsontext import JSONTextError, loads

if TYPE_CHECKING:
    from .config import TrainConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
MAX_REPEATS = 10_000  # repeats of one folder's images per epoch (kohya datasets use up to a few hundred)
_MAX_LISTED = 12


class DatasetError(InvalidArgumentError):
    """A dataset with missing captions, unreadable images or empty folders; ``problems`` lists each."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:_MAX_LISTED]
        more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"the dataset in {root} has {count}: " + "; ".join(shown) + more,
                         "Fix or remove those files and run again (nothing was trained)")


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where it is, its caption, how often an epoch repeats it, its size."""

    path: Path
    caption: str
    repeats: int
    folder: str
    size: tuple[int, int]  # (width, height) after EXIF rotation
    mask: Path | None = None  # the loss mask image (masked_loss with mask_dir)


@dataclass
class Dataset:
    """The checked images of a dataset folder."""

    root: Path
    layout: str
    records: list[ImageRecord]

    @property
    def images_per_epoch(self) -> int:
        """Images seen per epoch, repeats included."""
        return sum(r.repeats for r in self.records)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Comma-separated caption tags counted per folder (kohya's ``ss_tag_frequency``)."""
        counts: dict[str, Counter] = defaultdict(Counter)
        for record in self.records:
            tags = [t.strip() for t in record.caption.split(",") if t.strip()]
            counts[record.folder].update(tags)
        return {folder: dict(c.most_common()) for folder, c in counts.items()}

    def folders(self) -> dict[str, dict[str, int]]:
        """Images and repeats per folder (kohya's ``ss_dataset_dirs``)."""
        info: dict[str, dict[str, int]] = {}
        for record in self.records:
            entry = info.setdefault(record.folder, {"n_repeats": record.repeats, "img_count": 0})
            entry["img_count"] += 1
        return info

    def fingerprint(self) -> str:
        """SHA-256 over every image's relative path, size in bytes and caption: changes when the data does."""
        digest = hashlib.sha256()
        for record in sorted(self.records, key=lambda r: str(r.path)):
            rel = record.path.relative_to(self.root).as_posix()
            digest.update(f"{rel}\0{record.path.stat().st_size}\0{record.repeats}\0{record.caption}\0".encode())
        return digest.hexdigest()

    def summary(self, buckets: dict[tuple[int, int], int] | None = None) -> dict[str, Any]:
        """What the catalog and the adapter's history record about the data."""
        data = {"path": str(self.root), "layout": self.layout, "images": len(self.records),
                "images_per_epoch": self.images_per_epoch, "folders": self.folders(),
                "tag_frequency": self.tag_frequency(), "fingerprint": self.fingerprint()}
        if buckets:
            data["buckets"] = {f"{w}x{h}": n for (w, h), n in sorted(buckets.items())}
        return data


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _read_caption(path: Path, problems: list[str]) -> str | None:
    try:
        return " ".join(path.read_text(encoding="utf-8").split())
    except UnicodeDecodeError:
        problems.append(f"caption {path} is not UTF-8 text")
    except OSError as exc:
        problems.append(f"caption {path} cannot be read ({exc.strerror})")
    return None


def image_size(path: Path) -> tuple[int, int]:
    """Decode an image completely and return its (width, height) after EXIF rotation.

    Raises ``OSError``/``ValueError`` (from Pillow) when the file is not a readable image.
    """
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _tutorial_pairs(root: Path, extension: str, problems: list[str]) -> list[tuple[Path, Path, int, str]]:
    images_dir, texts_dir = root / "images", root / "texts"
    images = _images_in(images_dir)
    if not images:
        problems.append(f"empty folder {images_dir} (no PNG, JPEG or WebP images)")
    if not texts_dir.is_dir():
        problems.append(f"folder {texts_dir} with the captions does not exist")
        return []
    return [(image, texts_dir / (image.stem + extension), 1, root.name) for image in images]


def _kohya_pairs(root: Path, extension: str, problems: list[str]) -> list[tuple[Path, Path, int, str]]:
    pairs = [(image, image.with_suffix(extension), 1, root.name) for image in _images_in(root)]
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _REPEAT_FOLDER.match(folder.name)
        images = _images_in(folder)
        if not images:
            if match:  # a repeat folder must hold images; other folders may be anything
                problems.append(f"empty folder {folder} (no PNG, JPEG or WebP images)")
            continue
        repeats = _repeats(match.group(1)) if match else 1
        if not 1 <= repeats <= MAX_REPEATS:
            shown = match.group(1) if len(match.group(1)) <= 12 else match.group(1)[:12] + "…"
            problems.append(f"folder {folder.name} asks for {shown} repeats; use 1 to {MAX_REPEATS}")
        pairs += [(image, image.with_suffix(extension), max(repeats, 1), folder.name) for image in images]
    if not pairs and not problems:
        problems.append(f"empty folder {root} (no PNG, JPEG or WebP images, no images/ + texts/ folders, "
                        f"no N_name subfolders, no {METADATA_FILE})")
    return pairs


def _repeats(digits: str) -> int:
    """The repeat count of an ``N_name`` folder; a number too long to be sensible counts as too many."""
    return int(digits) if len(digits) <= 9 else MAX_REPEATS + 1


def _metadata_records(root: Path, problems: list[str]) -> list[tuple[Path, str | None, int, str]]:
    entries = []
    try:
        lines = (root / METADATA_FILE).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        problems.append(f"{METADATA_FILE} is not UTF-8 text (byte {exc.start})")
        return entries
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{METADATA_FILE} line {number}"
        try:
            item = loads(line)
        except JSONTextError as exc:
            problems.append(f"{where} cannot be read: {exc}")
            continue
        name = item.get("file_name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            problems.append(f"{where} has no \"file_name\"")
            continue
        path = root / name
        if not path.resolve().is_relative_to(root.resolve()):
            problems.append(f"{where} names {name}, which is outside the dataset folder")
            continue
        caption = next((item[k] for k in ("text", "caption", "prompt") if isinstance(item.get(k), str)), None)
        if not path.is_file():
            problems.append(f"{where}: image {path} does not exist")
            continue
        if caption is None:
            problems.append(f"missing caption for {path} ({where} has no \"text\")")
            continue
        entries.append((path, " ".join(caption.split()), 1, root.name))
    if not entries and not problems:
        problems.append(f"{root / METADATA_FILE} lists no images")
    return entries


def _class_tokens(root: Path, image: Path) -> str | None:
    """The class tokens of a kohya ``N_name`` folder (``name``), for an image directly inside one."""
    if image.parent == root:
        return None
    match = _REPEAT_FOLDER.match(image.parent.name)
    return " ".join(match.group(2).split()) if match else None


def find_mask(mask_dir: Path, root: Path, image: Path) -> Path | None:
    """The mask of ``image``: ``mask_dir`` mirrors the dataset's folders, or holds every mask flat, named
    like the image (any image extension; kohya's conditioning_data_dir convention)."""
    relative = image.relative_to(root).parent
    for folder in (mask_dir / relative, mask_dir):
        for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
            candidate = folder / (image.stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def _readable(path: Path, problems: list[str], what: str) -> bool:
    try:
        image_size(path)
        return True
    except Exception as exc:  # Pillow raises many kinds; any of them means "unreadable"
        reason = str(exc).split("\n")[0] or type(exc).__name__
        problems.append(f"unreadable {what} {path} ({reason})")
        return False


def split_validation(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(training, validation)``: ``fraction`` of the images (at least one) held out, chosen by ``seed``.

    The choice depends only on the images' relative paths and the seed, not on the order of the scan.
    """
    records = sorted(dataset.records, key=lambda r: r.path.relative_to(dataset.root).as_posix())
    held = max(1, round(len(records) * fraction))
    if held >= len(records):
        raise InvalidArgumentError(f"validation_split = {fraction} of {len(records)} image(s) leaves nothing to "
                                   "train on", "Lower validation_split, add images, or use validation_dir")
    chosen = set(random.Random(f"lorareg-validation:{seed}").sample(range(len(records)), held))
    validation = [r for i, r in enumerate(records) if i in chosen]
    held_paths = {r.path for r in validation}
    training = [r for r in dataset.records if r.path not in held_paths]
    return Dataset(dataset.root, dataset.layout, training), Dataset(dataset.root, dataset.layout, validation)


def detect_layout(root: Path) -> str:
    """``metadata``, ``tutorial`` or ``kohya``."""
    if (root / METADATA_FILE).is_file():
        return "metadata"
    if (root / "images").is_dir():
        return "tutorial"
    return "kohya"


def scan_dataset(root: str | Path, caption_extension: str = ".txt",
                 progress: Callable[[int, int], None] | None = None, *, class_tokens: bool = False,
                 mask_dir: str | Path | None = None) -> Dataset:
    """Find every image and caption under ``root``, decode every image, and report all problems at once.

    ``class_tokens``: an image without a caption file in a kohya ``N_name`` folder is captioned
    ``name``. ``mask_dir``: every image must have a loss mask there (see :func:`find_mask`).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise InputNotFoundError(f"dataset folder {root} does not exist", "Check data_dir (--data)")
    if not root.is_dir():
        raise InvalidArgumentError(f"{root} is a file, not a dataset folder", "Give the folder that holds the images")
    problems: list[str] = []
    layout = detect_layout(root)
    if layout == "metadata":
        found = _metadata_records(root, problems)
        candidates = [(path, caption, repeats, folder) for path, caption, repeats, folder in found]
    else:
        pairs = (_tutorial_pairs if layout == "tutorial" else _kohya_pairs)(root, caption_extension, problems)
        candidates = []
        for image, caption_file, repeats, folder in pairs:
            if not caption_file.is_file():
                tokens = _class_tokens(root, image) if class_tokens and layout == "kohya" else None
                if tokens is None:
                    problems.append(f"missing caption for {image} (expected {caption_file})")
                    continue
                candidates.append((image, tokens, repeats, folder))
                continue
            candidates.append((image, _read_caption(caption_file, problems), repeats, folder))
    records = []
    for done, (image, caption, repeats, folder) in enumerate(candidates, 1):
        try:
            size = image_size(image)
        except Exception as exc:  # Pillow raises many kinds; any of them means "unreadable"
            reason = str(exc).split("\n")[0] or type(exc).__name__
            problems.append(f"unreadable image {image} ({reason})")
            size = None
        mask = None
        if mask_dir is not None:
            mask = find_mask(Path(mask_dir), root, image)
            if mask is None:
                problems.append(f"missing mask for {image} (expected {Path(mask_dir) / image.stem}.png or another "
                                "image with that name in mask_dir)")
            elif not _readable(mask, problems, "mask"):
                mask = None
        if size is not None and caption is not None and (mask_dir is None or mask is not None):
            records.append(ImageRecord(image, caption, repeats, folder, size, mask))
        if progress:
            progress(done, len(candidates))
    if problems:
        raise DatasetError(root, problems)
    return Dataset(root, layout, records)


def scan_configured(config: TrainConfig, progress: Callable[[int, int], None] | None = None,
                    folder: str | Path | None = None) -> Dataset:
    """Scan ``data_dir`` (or another ``folder``, e.g. ``validation_dir``) with the configuration's options."""
    data = config.data
    return scan_dataset(folder if folder is not None else data.data_dir, data.caption_extension, progress,
                        class_tokens=data.folder_class_tokens, mask_dir=data.mask_dir if data.masked_loss else None)


def training_and_validation(config: TrainConfig, dataset: Dataset,
                            progress: Callable[[int, int], None] | None = None) -> tuple[Dataset, Dataset | None]:
    """The images trained on and the validation images: ``dataset`` split by ``validation_split``, or
    ``dataset`` and the scanned ``validation_dir``."""
    validation = config.validation
    if validation.validation_split > 0:
        return split_validation(dataset, validation.validation_split, config.validation_seed)
    if validation.validation_dir is not None:
        return dataset, scan_configured(config, progress, validation.validation_dir)
    return dataset, None


# --- sizes, buckets and crops -------------------------------------------------------------------------


def make_buckets(resolution: int, step: int, max_aspect_ratio: float) -> list[tuple[int, int]]:
    """Bucket shapes ``(width, height)``: sides multiples of ``step``, area at most ``resolution²``."""
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * max_aspect_ratio:
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect_ratio + 1e-9:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size``'s (in log scale; ties go to the larger area)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class Crop:
    """How one image becomes one training sample (SDXL conditions on these numbers)."""

    original_size: tuple[int, int]  # (height, width) of the source image
    resized: tuple[int, int]        # (width, height) after scaling
    top: int
    left: int
    flip: bool


def plan_crop(size: tuple[int, int], target: tuple[int, int], *, random_crop: bool, flip: bool,
              rng: random.Random) -> Crop:
    """Scale ``size`` (width, height) to cover ``target`` (width, height), then choose the crop."""
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    resized = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
    spare_x, spare_y = resized[0] - target[0], resized[1] - target[1]
    if random_crop:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return Crop((height, width), resized, top, left, flip and rng.random() < 0.5)


def load_image(path: Path, crop: Crop, target: tuple[int, int]):
    """The image as a ``[3, H, W]`` float tensor in ``[-1, 1]``, scaled, cropped and maybe flipped."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as source:
        image = ImageOps.exif_transpose(source)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels become white, not black
        else:
            image = image.convert("RGB")
    if image.size != crop.resized:
        if crop.resized[0] < image.size[0]:  # shrinking: Lanczos, after a fast integer reduction of large images
            image = image.resize(crop.resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
        else:  # enlarging: bicubic is as good and several times faster
            image = image.resize(crop.resized, Image.Resampling.BICUBIC)
    image = image.crop((crop.left, crop.top, crop.left + target[0], crop.top + target[1]))
    if crop.flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_mask(record: ImageRecord, crop: Crop, target: tuple[int, int]):
    """The loss mask of ``record`` as a ``[1, H, W]`` float tensor in ``[0, 1]``, cropped like its image.

    From the mask file's red channel (scaled to the image's size first when it differs), or from the
    image's alpha channel (all ones without one).
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(record.mask or record.path) as source:
        image = ImageOps.exif_transpose(source)
        if record.mask is not None:
            channel = image.convert("RGB").getchannel("R")
        elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            channel = image.convert("RGBA").getchannel("A")
        else:
            channel = Image.new("L", image.size, 255)
    if channel.size != record.size:
        channel = channel.resize(record.size, Image.Resampling.BILINEAR)
    if channel.size != crop.resized:
        channel = channel.resize(crop.resized, Image.Resampling.BILINEAR)
    channel = channel.crop((crop.left, crop.top, crop.left + target[0], crop.top + target[1]))
    if crop.flip:
        channel = ImageOps.mirror(channel)
    return torch.from_numpy(np.asarray(channel, dtype=np.uint8).copy()).float().div(255.0)[None]


# --- epochs and batches ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSpec:
    """One batch of an epoch: which records, at which size, with which per-image random seeds."""

    bucket: tuple[int, int]
    items: tuple[int, ...]
    seeds: tuple[int, ...]


@dataclass
class BatchPlan:
    """How records are grouped into buckets and batches; deterministic for a seed and an epoch."""

    records: list[ImageRecord]
    batch_size: int
    seed: int
    buckets: list[tuple[int, int]] = field(default_factory=list)
    assignment: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def create(cls, dataset: Dataset, *, resolution: int, batch_size: int, seed: int, bucketing: bool = False,
               bucket_step: int = 64, max_aspect_ratio: float = 2.0) -> BatchPlan:
        """Assign every record to its training size (one square size without bucketing)."""
        if bucketing:
            buckets = make_buckets(resolution, bucket_step, max_aspect_ratio)
            assignment = [nearest_bucket(r.size, buckets) for r in dataset.records]
        else:
            buckets = [(resolution, resolution)]
            assignment = [buckets[0]] * len(dataset.records)
        return cls(dataset.records, batch_size, seed, buckets, assignment)

    @classmethod
    def for_config(cls, dataset: Dataset, config: TrainConfig) -> BatchPlan:
        """The plan a :class:`~loralib.training.config.TrainConfig` asks for."""
        data = config.data
        return cls.create(dataset, resolution=data.resolution, batch_size=config.training.batch_size,
                          seed=config.training.seed, bucketing=data.enable_bucket, bucket_step=data.bucket_step,
                          max_aspect_ratio=data.max_aspect_ratio)

    def length(self, config: TrainConfig, processes: int = 1) -> tuple[int, int, int]:
        """``(optimizer steps per epoch, total steps, epochs)`` of a run over ``processes`` processes."""
        train = config.training
        batches = math.ceil(self.batches_per_epoch() / processes)
        per_epoch = math.ceil(batches / train.gradient_accumulation_steps)
        total = train.max_train_steps or train.num_epochs * per_epoch
        return per_epoch, total, math.ceil(total / per_epoch)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """How many images train at each size."""
        return dict(Counter(self.assignment))

    def batches_per_epoch(self) -> int:
        """Number of batches in every epoch (the last batch of a bucket may be smaller)."""
        per_bucket = Counter()
        for record, bucket in zip(self.records, self.assignment):
            per_bucket[bucket] += record.repeats
        return sum(math.ceil(n / self.batch_size) for n in per_bucket.values())

    def epoch(self, epoch: int) -> list[BatchSpec]:
        """The batches of ``epoch`` in training order: shuffled within buckets, then batch order shuffled."""
        rng = random.Random(f"lorareg-epoch:{self.seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, (record, bucket) in enumerate(zip(self.records, self.assignment)):
            by_bucket[bucket] += [index] * record.repeats
        batches = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            rng.shuffle(items)
            for start in range(0, len(items), self.batch_size):
                chunk = tuple(items[start:start + self.batch_size])
                batches.append(BatchSpec(bucket, chunk, tuple(rng.getrandbits(63) for _ in chunk)))
        rng.shuffle(batches)
        return batches


class BatchLoader:
    """A map-style torch dataset over a list of :class:`BatchSpec`: item ``i`` is batch ``i``.

    With ``pixels`` it decodes, crops and stacks the images; without, it returns only the record
    indices (the trainer then uses latents cached before training).
    """

    def __init__(self, records: list[ImageRecord], batches: list[BatchSpec], *, pixels: bool,
                 random_crop: bool, flip: bool, masks: bool = False) -> None:
        self.records, self.batches, self.pixels = records, batches, pixels
        self.random_crop, self.flip, self.masks = random_crop, flip, masks

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        spec = self.batches[index]
        batch: dict[str, Any] = {"items": list(spec.items), "bucket": spec.bucket,
                                 "captions": [self.records[i].caption for i in spec.items],
                                 "paths": [self.records[i].path for i in spec.items]}
        if not self.pixels:
            return batch
        images, originals, corners, masks = [], [], [], []
        for item, seed in zip(spec.items, spec.seeds):
            record = self.records[item]
            crop = plan_crop(record.size, spec.bucket, random_crop=self.random_crop, flip=self.flip,
                             rng=random.Random(seed))
            images.append(load_image(record.path, crop, spec.bucket))
            originals.append(crop.original_size)
            corners.append((crop.top, crop.left))
            if self.masks:
                masks.append(load_mask(record, crop, spec.bucket))
        batch.update(pixels=torch.stack(images), original_sizes=originals, crop_corners=corners)
        if masks:
            batch["masks"] = torch.stack(masks)
        return batch
