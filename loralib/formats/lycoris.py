"""LyCORIS and DoRA files with kohya-style module names: what ComfyUI, A1111 and Forge load.

Keys are ``<kohya module name>.<suffix>``: LoHa ``hada_w1_a/b``, ``hada_w2_a/b`` (+ ``hada_t1/t2``
for Tucker convs), LoKr ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` (+ ``lokr_t2``),
full-rank differences ``diff`` / ``diff_b``, norm layers ``w_norm`` / ``b_norm``, DoRA's
``dora_scale`` beside any of the low-rank kinds, and the plain kohya suffixes (``lora_down``,
``lora_up``, ``lora_mid``, ``alpha``) for LoCon modules. A file whose keys are all plain kohya
spellings is read by the kohya format (it comes first in the table); one with any LyCORIS key
comes here. Module names resolve through :func:`loralib.naming.kohya.parse_module_name`.

Writing is the kohya format's: :func:`module_tensors` gives the keys of a non-plain module.

Flux.1: the same suffixes behind kohya names (``lora_unet_double_blocks_0_img_attn_qkv``,
OneTrainer's ``lora_transformer_…``) or BFL paths as ComfyUI spells them
(``diffusion_model.double_blocks.0.img_attn.qkv``). SD3/SD3.5 likewise: kohya names as sd-scripts'
SD3 LoRA and LyCORIS write them (``lora_unet_joint_blocks_0_x_block_attn_qkv``) and MMDiT paths as
ComfyUI spells them (``diffusion_model.joint_blocks.0.x_block.attn.qkv``). Names resolve with
:func:`loralib.naming.kohya.resolve_module_name` / :func:`loralib.formats.original.native_target`.
A fused layer (Flux's ``qkv``, ``linear1``; SD3's ``x_block.attn.qkv``, ``x_block.attn2.qkv``,
``context_block.attn.qkv``) becomes one entry per diffusers layer it holds, each with its
``rows`` of the stored module (``swap`` for a final modulation's exchanged halves, and SD3's last
pre-only context block); the parts are built by :func:`loralib.lycoris.rows.take_rows`, exactly.
A split that cannot be exact (a LoKr whose right factor's rows do not divide the part boundaries,
a per-input DoRA magnitude) is refused in one line naming the module.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..architectures import FLUX_FAMILY, SD, SD3_FAMILY
from ..errors import CorruptFileError
from ..lycoris import KIND_TITLES
from ..lycoris.shapes import full_shape, loha_shape, lokr_shape, spatial_kernel
from ..naming.flux import ROOTS as FLUX_ROOTS
from ..naming.kohya import parse_module_name, resolve_module_name
from ..naming.sd3 import ROOTS as SD3_ROOTS
from ..naming.sgm import UNetLayout
from .base import AdapterIndex, Format, Inputs, Kind, ModuleEntry
from .kohya import BUNDLE_KEY, alpha_tensor, file_family, refuse_unplaced
from .source import TensorSource

if TYPE_CHECKING:
    import torch

    from ..adapter import AdapterModule

# kohya-style names (SD, Flux.1 and SD3 in original or diffusers names), and BFL / MMDiT paths as ComfyUI spells them
MODULE_NAME = (r"(?:lora_(?:unet|te|te1|te2|te3|transformer)_\w+|"
               rf"diffusion_model\.(?:{'|'.join(sorted({*FLUX_ROOTS, *SD3_ROOTS}))})"
               r"[\w.]*?)")
DENOISER_PREFIX = "diffusion_model."

# suffix -> (kind, role); kind None: a part any low-rank kind may have
SUFFIXES: dict[str, tuple[str | None, str]] = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"), "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1_a"), "hada_w1_b": ("loha", "w1_b"), "hada_w2_a": ("loha", "w2_a"),
    "hada_w2_b": ("loha", "w2_b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1_a"), "lokr_w1_b": ("lokr", "w1_b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2_a"), "lokr_w2_b": ("lokr", "w2_b"), "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"), "diff_b": ("full", "diff_b"),
    "w_norm": ("norm", "diff"), "b_norm": ("norm", "diff_b"),
    "alpha": (None, "alpha"), "dora_scale": (None, "magnitude"),
}
SPELLING = {(kind, role): suffix for suffix, (kind, role) in SUFFIXES.items() if kind is not None}
SPELLING.update({(kind, "bias"): "diff_b" for kind in ("lora", "loha", "lokr")})  # a bias beside low-rank factors
LYCORIS_KEY = re.compile(rf"^({MODULE_NAME})\.({'|'.join(re.escape(s) for s in SUFFIXES)})$")

LOHA = Kind("lycoris-loha", "LyCORIS LoHa", False)
LOKR = Kind("lycoris-lokr", "LyCORIS LoKr", False)
FULL = Kind("lycoris-full", "LyCORIS full-rank difference", False)
NORM = Kind("lycoris-norm", "LyCORIS norm-layer difference", False)
DORA = Kind("lycoris-dora", "DoRA (weight-decomposed LoRA)", False)
LOCON = Kind("lycoris-locon", "LyCORIS LoCon", False)
FILE_KINDS = {"loha": LOHA, "lokr": LOKR, "full": FULL, "norm": NORM, "dora": DORA, "lora": LOCON}
_CROSS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_.*_attn2_to_[kv]$")


@dataclass
class LycorisEntry(ModuleEntry):
    """A LoHa, LoKr, full-rank or norm module: its tensors by role, and the layer it adapts."""

    family: str = "loha"  # loha, lokr, full or norm
    roles: dict[str, str] = field(default_factory=dict)
    layer: tuple[int, ...] = ()
    nominal_rank: int | None = None

    @property
    def kind(self) -> str:
        """The module kind (``dora`` when a magnitude decomposes it)."""
        return self.family if self.magnitude is None else "dora"

    @property
    def rank(self) -> int | None:
        """LyCORIS' rank ("dim"); None for full and norm differences and for a LoKr of two full factors."""
        return self.nominal_rank

    @property
    def in_features(self) -> int:
        """Input width of the adapted layer."""
        return int(self.layer[1]) if len(self.layer) > 1 else int(self.layer[0])

    @property
    def shares_factors(self) -> bool:
        """LyCORIS parts of a fused layer are built one at a time (:mod:`loralib.lycoris.rows`)."""
        return False

    @property
    def stored_out(self) -> int:
        """Output width of the stored (possibly fused) layer."""
        return int(self.layer[0])

    @property
    def out_features(self) -> int:
        """Output width of the adapted layer (its rows of a fused layer)."""
        return self.rows[1] - self.rows[0] if self.rows else int(self.layer[0])

    @property
    def is_conv(self) -> bool:
        """True for a conv layer."""
        return len(self.layer) == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the adapted layer's weight."""
        return (self.out_features, *self.layer[1:])

    @property
    def effective_alpha(self) -> float | None:
        """Alpha as LyCORIS applies it (0 or none: the rank); None where no alpha applies."""
        if self.nominal_rank is None:
            return None
        return float(self.nominal_rank) if not self.alpha else float(self.alpha)

    @property
    def dtype(self) -> str:
        """Stored dtype of the first factor."""
        return self.source.dtypes[next(iter(self.roles.values()))]

    def check_shapes(self) -> None:
        """Shapes were checked when the entry was made."""

    def tensor_names(self) -> list[str]:
        """Every tensor the module is built from."""
        return [*self.roles.values(), *([self.magnitude] if self.magnitude else [])]

    def build(self, tensors: Mapping[str, torch.Tensor]) -> AdapterModule:
        """The module, from its loaded tensors."""
        from ..lycoris import kinds

        parts = {role: tensors[name] for role, name in self.roles.items()}
        kernel = spatial_kernel(self.key)
        if self.family == "loha":
            module = kinds.LohaModule(alpha=self.alpha, kernel_size_hint=kernel, **parts)
        elif self.family == "lokr":
            module = kinds.LokrModule(alpha=self.alpha, kernel_size_hint=kernel, **parts)
        elif self.family == "full":
            module = kinds.FullModule(**parts)
        else:
            module = kinds.NormModule(**parts)
        if self.magnitude is not None:
            module = kinds.dora(module, tensors[self.magnitude], "lycoris")
        if self.rows is None and not self.swap:
            return module
        from ..lycoris.rows import take_rows

        return take_rows(module, self.row_blocks(self.stored_out))


def read(inputs: Inputs) -> AdapterIndex:
    """Index a LyCORIS file from its header."""
    return parse(inputs.sources[0])


def _family(name: str, parts: dict[str, str], source: TensorSource) -> str:
    families = {SUFFIXES[suffix][0] for suffix in parts if suffix != "diff_b"} - {None}
    if not families and "diff_b" in parts:
        families = {"full"}
    if "diff_b" in parts and families & {"norm"}:
        families.add("full")
    if len(families) > 1:
        titles = " and ".join(KIND_TITLES[f] for f in sorted(families))
        raise CorruptFileError(f"{source.path.name}: module {name} mixes {titles} factors",
                               "The file is damaged or was written by a broken converter")
    if not families:
        raise CorruptFileError(f"{source.path.name}: module {name} has only {' and '.join(sorted(parts))}, no weights",
                               "The file is incomplete")
    return families.pop()


def _roles(parts: dict[str, str], family: str) -> dict[str, str]:
    """Tensor names by role; a ``diff_b`` beside low-rank factors is their ``bias``."""
    roles = {SUFFIXES[suffix][1]: name for suffix, name in parts.items() if SUFFIXES[suffix][0] is not None}
    if family in ("lora", "loha", "lokr") and "diff_b" in roles:
        roles["bias"] = roles.pop("diff_b")
    return roles


def _shape(family: str, roles: dict[str, str], source: TensorSource, kernel) -> tuple[tuple[int, ...], int | None]:
    shapes = {role: tuple(source.shapes[name]) for role, name in roles.items() if role != "bias"}
    if family == "loha":
        missing = {"w1_a", "w1_b", "w2_a", "w2_b"} - set(shapes)
        if missing:
            raise CorruptFileError(f"a LoHa module lacks hada_{', hada_'.join(sorted(missing))}", "The file is incomplete")
        return loha_shape(shapes["w1_a"], shapes["w1_b"], shapes["w2_a"], shapes["w2_b"], shapes.get("t1"),
                          shapes.get("t2"), kernel)
    if family == "lokr":
        get = shapes.get
        return lokr_shape(get("w1"), get("w1_a"), get("w1_b"), get("w2"), get("w2_a"), get("w2_b"), get("t2"), kernel)
    return full_shape(shapes.get("diff"), shapes.get("diff_b")), None


def _sgm_layout(source: TensorSource, modules: dict[str, dict[str, str]]) -> UNetLayout:
    """SD1/SD2 and SDXL number SGM blocks differently; the cross-attention width tells them apart."""
    from ..architectures import SD1, SDXL

    widths = set()
    for name, parts in modules.items():
        if not _CROSS.match(name):
            continue
        family = _family(name, parts, source)
        if family in ("lora", "loha", "lokr", "full"):
            roles = _roles(parts, family)
            layer = (source.shapes[roles["down"]][:2] if family == "lora" else _shape(family, roles, source, None)[0])
            widths.add(int(layer[1]))
    if widths & {768, 1024} and 2048 not in widths:
        return UNetLayout.from_config(SD1.unet_config)
    return UNetLayout.from_config(SDXL.unet_config)


def parse(source: TensorSource) -> AdapterIndex:
    """Index a LyCORIS (or kohya DoRA) file from its header."""
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    embeddings: dict[str, tuple[TensorSource, str]] = {}
    unrecognised: list[str] = []
    for name in source.names:
        if match := LYCORIS_KEY.match(name):
            modules[match.group(1)][match.group(2)] = name
        elif match := BUNDLE_KEY.match(name):
            token, part = match.groups()
            embeddings[token if part in ("string_to_param.*", "emb_params") else f"{token}/{part}"] = (source, name)
        else:
            unrecognised.append(name)
    family, certain = _names_family(source, modules)
    layout = _sgm_layout(source, modules) if family == SD else None
    alphas = source.scalars([parts["alpha"] for parts in modules.values() if "alpha" in parts])
    entries: dict[str, ModuleEntry] = {}
    for name, parts in modules.items():
        if family == SD:
            key = parse_module_name(name, layout)
            new = {key: _entry(key, name, parts, source, alphas)} if key is not None else None
        else:
            new = _native_entries(name, parts, source, alphas, family)
        if new is None:
            unrecognised.extend(parts.values())
            continue
        for key, entry in new.items():
            if key in entries:
                raise CorruptFileError(f"{source.path.name} adapts {key} twice (under two different names)")
            entries[key] = entry
    refuse_unplaced(source, unrecognised, family)
    return AdapterIndex(file_kind(Counter(e.kind for e in entries.values())), [source], entries,
                        dict(source.metadata), embeddings, family=family if certain and family != SD else None)


def _names_family(source: TensorSource, modules: dict[str, dict[str, str]]) -> tuple[str, bool]:
    """The model family the module names are of (BFL paths are Flux.1's, MMDiT paths SD3's), and whether
    the names say so (a final layer alone does not: both families name it alike)."""
    roots = {name.removeprefix(DENOISER_PREFIX).split(".", 1)[0] for name in modules if name.startswith(DENOISER_PREFIX)}
    if roots:
        if roots & (set(SD3_ROOTS) - set(FLUX_ROOTS)):
            return SD3_FAMILY, True
        return FLUX_FAMILY, bool(roots & (set(FLUX_ROOTS) - set(SD3_ROOTS)))
    return file_family(source, modules)


def _native_entries(name: str, parts: dict[str, str], source: TensorSource, alphas: dict[str, float],
                    family: str) -> dict[str, ModuleEntry] | None:
    """The entries of one Flux.1 or SD3 module: one per layer a fused layer holds (its rows), None for an unknown name."""
    from .original import native_target

    def resolve(shape: tuple[int, int] | None):
        if name.startswith(DENOISER_PREFIX):
            return native_target(family, name.removeprefix(DENOISER_PREFIX), shape, None)
        return resolve_module_name(name, None, family=family, shape=shape)

    target = resolve(None)
    if target is None:
        return None
    entry = _entry(target.keys[0], name, parts, source, alphas)
    if len(entry.weight_shape) == 2:  # SD3's last context block stores its modulation's halves exchanged
        target = resolve((entry.stored_out, entry.in_features))
    if not target.fused and not target.swap:
        return {entry.key: entry}
    family = entry.family if isinstance(entry, LycorisEntry) else "lora"
    roles = entry.roles if isinstance(entry, LycorisEntry) else {}
    shapes = {role: tuple(source.shapes[tensor]) for role, tensor in roles.items()}
    axis = None
    if entry.magnitude is not None:
        from ..lycoris.shapes import magnitude_axis

        stored = (entry.stored_out, *entry.weight_shape[1:])
        axis = magnitude_axis(source.shapes[entry.magnitude], stored, entry.magnitude_style)
    if not target.fused:
        parts_rows = {entry.key: replace(entry, swap=True)}
    else:
        ranges = target.rows(entry.stored_out, entry.in_features) if len(entry.weight_shape) == 2 else None
        if ranges is None:
            raise CorruptFileError(
                f"{source.path.name}: the fused layer {name} adapts a {list(entry.weight_shape)} weight, but it holds "
                f"{len(target.keys)} layers of {' + '.join(f'{u}×' for u in target.units)}its input width",
                "The file is damaged or was written for another model")
        parts_rows = {key: replace(entry, key=key, rows=rows) for key, rows in zip(target.keys, ranges)}
    for part in parts_rows.values():
        part.check_rows(family, shapes, axis)
    return parts_rows


def _entry(key: str, name: str, parts: dict[str, str], source: TensorSource, alphas: dict[str, float]) -> ModuleEntry:
    family = _family(name, parts, source)
    roles = _roles(parts, family)
    alpha = alphas[parts["alpha"]] if "alpha" in parts else None
    magnitude = parts.get("dora_scale")
    if magnitude is not None and family in ("full", "norm"):
        raise CorruptFileError(f"{source.path.name}: module {name} has a dora_scale but no low-rank factors")
    if family == "lora":
        if "down" not in roles or "up" not in roles:
            missing = "lora_up" if "down" in roles else "lora_down"
            raise CorruptFileError(f"{source.path.name}: module {name} has no {missing} weight", "The file is incomplete")
        entry = ModuleEntry(key, source, roles["down"], roles["up"], alpha, roles.get("mid"), magnitude, "lycoris",
                            roles.get("bias"))
        entry.check_shapes()
        return entry
    try:
        layer, rank = _shape(family, roles, source, spatial_kernel(key))
    except CorruptFileError as exc:
        raise CorruptFileError(f"{source.path.name}: module {name}: {exc.message}",
                               "The file is damaged or was written by a broken converter") from exc
    entry = LycorisEntry(key, source, "", "", alpha, magnitude=magnitude, magnitude_style="lycoris", family=family,
                         roles=roles, layer=layer, nominal_rank=rank)
    if magnitude is not None:
        from ..lycoris.shapes import magnitude_axis

        try:
            magnitude_axis(source.shapes[magnitude], layer, "lycoris")
        except CorruptFileError as exc:
            raise CorruptFileError(f"{source.path.name}: module {name}: {exc.message}") from exc
    return entry


def full_entry(key: str, name: str, parts: dict[str, str], source: TensorSource) -> LycorisEntry:
    """The entry of a full-rank difference stored as ``diff`` / ``diff_b`` (by any format's key names)."""
    roles = {suffix: tensor for suffix, tensor in parts.items() if suffix in ("diff", "diff_b")}
    try:
        layer, _ = _shape("full", roles, source, None)
    except CorruptFileError as exc:
        raise CorruptFileError(f"{source.path.name}: module {name}: {exc.message}") from exc
    return LycorisEntry(key, source, "", "", family="full", roles=roles, layer=layer)


def file_kind(kinds: Counter) -> Kind:
    """What a file holding modules of these kinds is called: its most common non-plain kind, the others named."""
    special = [kind for kind, _ in kinds.most_common() if kind != "lora"]
    if not special:
        return LOCON
    main = FILE_KINDS[special[0]]
    if len(special) == 1:
        return main
    others = ", ".join(KIND_TITLES[k] for k in special[1:])
    return Kind(main.format, f"{main.title} (with {others})", False)


def module_tensors(name: str, module: AdapterModule) -> dict[str, torch.Tensor]:
    """The kohya-style LyCORIS tensors of one non-plain module named ``name`` (alpha as float32)."""

    from ..lycoris import kinds

    tensors: dict[str, torch.Tensor] = {}
    inner = module.inner if isinstance(module, kinds.DoraModule) else module
    if isinstance(module, kinds.DoraModule):
        tensors[f"{name}.dora_scale"] = kinds.stored_magnitude(module, "lycoris")
    if inner.kind == "lora":
        tensors[f"{name}.lora_down.weight"] = inner.down
        tensors[f"{name}.lora_up.weight"] = inner.up
        if inner.mid is not None:
            tensors[f"{name}.lora_mid.weight"] = inner.mid
        if inner.bias is not None:
            tensors[f"{name}.diff_b"] = inner.bias
    else:
        for role, tensor in inner.tensors().items():
            if tensor is not None:
                tensors[f"{name}.{SPELLING[inner.kind, role]}"] = tensor.contiguous()
    if inner.kind in ("lora", "loha", "lokr"):  # LyCORIS writes alpha even where it ignores it (LoKr, both full)
        tensors[f"{name}.alpha"] = alpha_tensor(float(inner.alpha))
    return tensors


_M = MODULE_NAME
FORMAT = Format(
    "lycoris", "LyCORIS / DoRA in kohya-style names (ComfyUI, A1111, Forge)",
    ((LOHA, re.compile(rf"^{_M}\.hada_(w[12]_[ab]|t[12])$")),
     (LOKR, re.compile(rf"^{_M}\.lokr_(w[12](_[ab])?|t2)$")),
     (FULL, re.compile(rf"^{_M}\.(diff|diff_b)$")),
     (NORM, re.compile(rf"^{_M}\.(w_norm|b_norm)$")),
     (DORA, re.compile(rf"^{_M}\.dora_scale$")),
     (LOCON, re.compile(rf"^{_M}\.(lora_(down|up|mid)\.weight|alpha)$")),
     (LOCON, BUNDLE_KEY)),
    read, holds_embeddings=True, holds_cp_mid=True, holds_kinds=frozenset({*KIND_TITLES, "bias"}))
