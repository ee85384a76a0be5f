"""Fuse LoRAs into a base model: ``bake(base, [(a, 0.8), (b, 0.4)], output)``.

Every adapted weight becomes ``W + Σ w_i · ΔW_i``, computed and added in float32 and then cast
back to the weight's stored dtype (adding in fp16/bf16 would drift). A diffusers folder is baked
into a diffusers folder (every weight file of every variant is rewritten, everything else is
copied), a diffusers transformer folder into a transformer folder, and a single-file checkpoint
(SD's original layout, or Flux.1's/SD3's with fused ``qkv`` layers) into a single file with the
same keys. All checks — adapters
fit each other and the base, the output may be written — run before anything is written, and
the output appears atomically.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from .. import __version__
from ..errors import InvalidArgumentError, MismatchError, OutputExistsError
from ..files.atomic import atomic_dir, check_output, refuse_overwrite
from ..files.header import read_header
from ..files.writer import write_safetensors
from ..formats.fusing import swap_halves
from ..metadata import HISTORY_KEY, history, input_record
from ..records import OperationRecord
from .inputs import AdapterLike, Progress, WeightedAdapter, check_compatible, load_weighted
from .lowrank import concatenate
from .model_weights import ModelWeights, Slot, checkpoint_slots, component_folders, diffusers_slots, weight_files


@dataclass
class BakeResult:
    """What :func:`bake` wrote."""

    path: Path
    kind: str  # "diffusers" or "checkpoint"
    files: list[Path]
    layers: int  # base weights changed
    modules: int  # adapter modules fused
    notes: list[str] = field(default_factory=list)


def bake(base: str | Path, adapters: Iterable[AdapterLike | tuple[AdapterLike, float]], output: str | Path, *,
         force: bool = False, progress: Progress | None = None) -> BakeResult:
    """Fuse weighted adapters into the model at ``base`` and write the result to ``output``.

    ``base`` is a diffusers folder (the output is a folder) or a single-file ``.safetensors``
    checkpoint (the output is a ``.safetensors`` file with the same keys).
    """
    items = load_weighted(adapters)
    check_compatible(items)
    base, output = Path(base), Path(output)
    with ModelWeights.open(base) as model:
        _check_output(model, output, force)
        deltas = _fused_modules(items)
        _check_fits(model, deltas, items)
    operation = OperationRecord("bake", [input_record(i.adapter, i.weight) for i in items], {"base": base.name})
    written = {"tool": f"lorareg {__version__}", "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")}
    record = operation.completed(written).to_dict(with_paths=False)
    if model.kind == "checkpoint":
        plan = {base: checkpoint_slots(read_header(base))}
    else:
        plan = {f: diffusers_slots(component, read_header(f))
                for component, folder in component_folders(base) for f in weight_files(folder)}
    plan = {f: {k: s for k, s in slots.items() if k in deltas} for f, slots in plan.items()}
    total = sum(len(s) for s in plan.values())
    counter = _Counter(total, progress)
    if model.kind == "checkpoint":
        _rewrite(base, output, plan[base], deltas, record, counter)
        files = [output]
    else:
        files = _bake_folder(base, output, plan, deltas, record, counter)
    layers = len({(s.file, s.name) for slots in plan.values() for s in slots.values()})
    return BakeResult(output, model.kind, files, layers, len(deltas))


class _Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def step(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)


def _check_output(model: ModelWeights, output: Path, force: bool) -> None:
    if model.kind == "checkpoint":
        if output.suffix.lower() != ".safetensors":
            raise InvalidArgumentError(f"the base {model.path.name} is a single-file checkpoint, so the output must be "
                                       f"a .safetensors file, not {output}", "Give -o NAME.safetensors")
        check_output(output, force, inputs=(model.path,))
        return
    if output.suffix.lower() == ".safetensors":
        raise InvalidArgumentError(f"the base {model.path.name} is a diffusers folder, so the output is a folder too",
                                   "Give a folder path with -o (writing a single-file checkpoint needs a single-file base)")
    if output.resolve() == model.path.resolve():
        raise OutputExistsError(f"{output} is the base model", "Write the baked model to another folder")
    if not output.parent.exists():
        check_output(output, force)
    refuse_overwrite(output, force)


def _fused_modules(items: list[WeightedAdapter]) -> dict[str, list[tuple[object, float]]]:
    """For each adapted layer, the (module, weight) pairs to add."""
    deltas: dict[str, list] = defaultdict(list)
    for item in items:
        if item.weight == 0:
            continue
        for key, module in item.adapter.modules.items():
            deltas[key].append((module, item.weight))
    return dict(deltas)


def _check_fits(model: ModelWeights, deltas: dict, items: list[WeightedAdapter]) -> None:
    missing = [k for k in deltas if k not in model.slots]
    if missing:
        owner = next(i.name for i in items if missing[0] in i.adapter.modules)
        raise MismatchError(f"{len(missing)} layer(s) adapted by the LoRAs are not in {model.path.name}, "
                            f"e.g. {missing[0]} (from {owner})",
                            "The adapter was made for a different base model architecture")
    for key, parts in deltas.items():
        module = parts[0][0]
        slot = model.slots[key]
        if _flat(slot.shape) != _flat(module.weight_shape):
            raise MismatchError(f"{key} is {list(slot.shape)} in {model.path.name} but the adapter changes a "
                                f"{list(module.weight_shape)} weight", "The adapter was made for a different base model")


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    rest = 1
    for n in shape[1:]:
        rest *= n
    return shape[0], rest


def layer_delta(parts: list[tuple[object, float]]) -> torch.Tensor:
    """``Σ w_i · scale_i · up_i @ down_i`` in float32 as a matrix ``[out, in·kh·kw]`` (one product)."""
    factors = [(*module.factors(torch.float32), weight * module.scale) for module, weight in parts]
    up, down = concatenate(factors, torch.float32)
    return up @ down


def _fuse(tensors: dict[str, torch.Tensor], slots: dict[str, Slot], deltas: dict, counter: _Counter) -> None:
    by_tensor: dict[str, list[tuple[str, Slot]]] = defaultdict(list)
    for key, slot in slots.items():
        by_tensor[slot.name].append((key, slot))
    for name, entries in by_tensor.items():
        stored = tensors[name]
        weight = stored.to(torch.float32)
        for key, slot in entries:
            delta = layer_delta(deltas[key])
            if slot.swap:  # the file keeps this layer's halves in the original model's order
                delta = swap_halves(delta)
            if slot.rows is None:
                weight += delta.reshape(weight.shape)
            else:
                weight[slot.rows[0]: slot.rows[1]] += delta.reshape(slot.shape)
            counter.step()
        tensors[name] = weight.to(stored.dtype)


def _load_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    return load_file(path), dict(read_header(path).metadata)


def _rewrite(source: Path, target: Path, slots: dict[str, Slot], deltas: dict, record: dict, counter: _Counter) -> None:
    tensors, metadata = _load_all(source)
    _fuse(tensors, slots, deltas, counter)
    metadata[HISTORY_KEY] = json.dumps(history(metadata) + [record])
    write_safetensors(target, tensors, metadata)


def _bake_folder(base: Path, output: Path, plan: dict[Path, dict[str, Slot]], deltas: dict, record: dict,
                 counter: _Counter) -> list[Path]:
    written = []
    with atomic_dir(output) as tmp:
        for source in sorted(base.rglob("*")):
            if not source.is_file():
                continue
            relative = source.relative_to(base)
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if plan.get(source):
                _rewrite(source, target, plan[source], deltas, record, counter)
            else:
                shutil.copy2(source, target)
            written.append(output / relative)
    return written
