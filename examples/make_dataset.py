"""Regenerate the bundled example dataset (examples/data): 8 small images of coloured shapes.

The images are drawn with Pillow in a flat "pixel" style — a coarse 16x16 drawing scaled up
without smoothing — and every caption starts with the trigger phrase "pxl style". Run from the
repository root: ``python examples/make_dataset.py``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = [
    ("circle", "red", (220, 40, 40), (250, 245, 230)),
    ("square", "blue", (40, 80, 220), (250, 245, 230)),
    ("triangle", "green", (40, 170, 70), (250, 245, 230)),
    ("circle", "yellow", (240, 200, 30), (30, 30, 60)),
    ("square", "orange", (240, 130, 30), (30, 30, 60)),
    ("triangle", "purple", (140, 50, 180), (250, 245, 230)),
    ("diamond", "cyan", (30, 190, 200), (30, 30, 60)),
    ("diamond", "pink", (235, 110, 170), (250, 245, 230)),
]
BACKGROUNDS = {(250, 245, 230): "a light background", (30, 30, 60): "a dark background"}


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int]) -> Image.Image:
    """A 16x16 drawing of one shape, scaled to 64x64 with hard pixel edges."""
    small = Image.new("RGB", (16, 16), background)
    pen = ImageDraw.Draw(small)
    if shape == "circle":
        pen.ellipse((3, 3, 12, 12), fill=colour)
    elif shape == "square":
        pen.rectangle((4, 4, 11, 11), fill=colour)
    elif shape == "triangle":
        pen.polygon([(8, 3), (13, 12), (2, 12)], fill=colour)
    else:
        pen.polygon([(8, 2), (13, 8), (8, 13), (3, 8)], fill=colour)
    return small.resize((64, 64), Image.Resampling.NEAREST)


def main(root: Path = Path(__file__).parent / "data") -> None:
    """Write images/NN_<colour>_<shape>.png and texts/NN_<colour>_<shape>.txt under ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for number, (shape, name, colour, background) in enumerate(SHAPES, 1):
        stem = f"{number:02d}_{name}_{shape}"
        draw(shape, colour, background).save(root / "images" / f"{stem}.png", optimize=True)
        caption = f"pxl style, a {name} {shape} on {BACKGROUNDS[background]}\n"
        (root / "texts" / f"{stem}.txt").write_text(caption)


if __name__ == "__main__":
    main()
