"""Module names spelled as a denoiser's diffusers path with its dots as underscores, behind ``lycoris_``.

This is the LyCORIS library's own naming (``LycorisNetwork.LORA_PREFIX`` is ``lycoris``; a network
made by ``create_lycoris`` on a diffusers model names each module ``lycoris_`` + its path with dots
replaced), which SimpleTuner writes for the UNet or transformer it trains:
``lycoris_transformer_blocks_0_attn_to_q`` (Flux.1, SD3/SD3.5), ``lycoris_down_blocks_1_attentions_0_…``
(SD1.x/SD2.x/SDXL). ComfyUI loads these names for the denoiser only (``lycoris_`` + the diffusers
path in its UNet, MMDiT and Flux key maps), and so does lorareg.

Underscores are never split by guessing: every name is looked up among the flattened paths of the
full-size denoisers, built on the ``meta`` device from the published configs (:func:`meta_layers`).
Their layer lists ship as ``denoiser_layers.json.gz`` so that reading a header stays torch-free and
fast; ``python -m loralib.naming.flat`` rewrites it and tests/test_lycoris_names.py checks it equals the
meta-device models. A name that is no layer of any of them, or that two layers of one model flatten
to, is refused naming it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..architectures import ARCHITECTURES, FLUX_FAMILY, SD, SD3_FAMILY

PREFIX = "lycoris_"
TABLES = Path(__file__).with_name("denoiser_layers.json.gz")
# Architectures whose denoiser a name is looked up in, by family (the UNet or transformer of each).
_CANDIDATES = {SD: ("sd1", "sd2", "sdxl"), FLUX_FAMILY: ("flux",), SD3_FAMILY: ("sd3", "sd35-medium", "sd35-large")}
_UNET_ROOTS = ("down_blocks_", "up_blocks_", "mid_block_", "conv_in", "conv_out", "conv_norm_out", "time_embedding_",
               "add_embedding_")


class FlatNameError(ValueError):
    """A flattened name that names no layer of a known denoiser, or several (str() is one line)."""


@dataclass(frozen=True)
class Resolved:
    """The family a file's flattened names belong to, and each name's internal key."""

    family: str
    keys: dict[str, str]


def meta_layers(architecture: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every adaptable layer (norm layers too) of ``architecture``'s full-size denoiser, built on the
    meta device: (module path, weight shape; ``()`` for a norm layer without weights), in model order."""
    import diffusers
    import torch

    from ..base_model import adaptable_layers

    arch = ARCHITECTURES[architecture]
    with torch.device("meta"):
        denoiser = getattr(diffusers, arch.denoiser_class)(**arch.denoiser_config)
    layers = []
    for key, module in adaptable_layers(arch.denoiser, denoiser, norms=True).items():
        weight = getattr(module, "weight", None)
        layers.append((key.split(".", 1)[1], tuple(weight.shape) if weight is not None else ()))
    return layers


def write_tables(path: Path = TABLES) -> None:
    """Write the layer lists of every candidate architecture's meta-device denoiser to ``path``."""
    data = {a: [[p, list(shape)] for p, shape in meta_layers(a)] for archs in _CANDIDATES.values() for a in archs}
    path.write_bytes(gzip.compress(json.dumps(data, separators=(",", ":")).encode(), mtime=0))


@cache
def shipped_layers() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """The layer lists shipped with lorareg, by architecture (what :func:`write_tables` wrote)."""
    data = json.loads(gzip.decompress(TABLES.read_bytes()))
    return {arch: [(p, tuple(shape)) for p, shape in layers] for arch, layers in data.items()}


@cache
def flat_table(architecture: str) -> dict[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    """``architecture``'s denoiser layers by flattened path: each flattened name -> the (internal key,
    weight shape) of every layer that flattens to it."""
    component = ARCHITECTURES[architecture].denoiser
    table: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for path, shape in shipped_layers()[architecture]:
        table.setdefault(path.replace(".", "_"), []).append((f"{component}.{path}", shape))
    return {flat: tuple(found) for flat, found in table.items()}


def is_flat_name(name: str) -> bool:
    """True for a module name in this spelling (``lycoris_`` + a flattened path)."""
    return name.startswith(PREFIX)


def _matrix(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A weight shape as (out, in · kernel): a conv's factors may store its kernel flattened into the input."""
    if len(shape) < 2:
        return tuple(shape)
    inputs = 1
    for d in shape[1:]:
        inputs *= int(d)
    return int(shape[0]), inputs


def _fits(shape: tuple[int, ...], wanted: tuple[int, ...] | None) -> bool:
    """Whether a layer's weight shape fits the shape the factors make (None: unknown)."""
    return wanted is None or not shape or _matrix(shape) == _matrix(wanted)


def resolve_flat_names(names: list[str], shapes: Mapping[str, tuple[int, ...] | None]) -> Resolved:
    """Each ``lycoris_`` name's internal key, and the family of the denoiser all of them are layers of.

    ``shapes`` gives the ``(out, in, …)`` a module's factors make (None where unknown); it decides
    between families whose layers share a name (Flux.1's and SD3's ``transformer_blocks``).
    Raises :class:`FlatNameError` naming a name that is no layer of any candidate model, or that
    two of a model's layers flatten to.
    """
    flats = {name: name[len(PREFIX):] for name in names}
    unet = any(flat.startswith(_UNET_ROOTS) for flat in flats.values())
    families = (SD,) if unet else (FLUX_FAMILY, SD3_FAMILY)
    fitting: dict[str, dict[str, str]] = {}
    best: tuple[int, str, str] | None = None  # (names placed, architecture, first name not placed)
    for family in families:
        for architecture in _CANDIDATES[family]:
            table = flat_table(architecture)
            keys: dict[str, str] = {}
            missing = None
            for name, flat in flats.items():
                found = [key for key, shape in table.get(flat, ()) if _fits(shape, shapes.get(name))]
                if len(found) > 1:
                    raise FlatNameError(f"module name {name} stands for {len(found)} layers of "
                                        f"{ARCHITECTURES[architecture].title} ({', '.join(found)})")
                if not found:
                    missing = missing or name
                    continue
                keys[name] = found[0]
            if missing is None:
                fitting.setdefault(family, keys)
            elif best is None or len(keys) > best[0]:
                best = (len(keys), architecture, missing)
    if len(fitting) == 1:
        family, keys = fitting.popitem()
        return Resolved(family, keys)
    if len(fitting) > 1:
        raise FlatNameError(f"module names like {names[0]} fit both Flux.1 and SD3 transformers; "
                            "the file does not say which model it is for")
    assert best is not None
    titles = " or ".join(ARCHITECTURES[a].title for f in families for a in _CANDIDATES[f])
    raise FlatNameError(f"module name {best[2]} is no layer of a {titles} "
                        f"{'UNet' if unet else 'transformer'} (or its factors do not fit that layer's shape)")


if __name__ == "__main__":
    write_tables()
    print(f"wrote {TABLES}")
