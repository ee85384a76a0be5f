"""Fuse LoRAs into a base model: ``bake(base, [(a, 0.8), (b, 0.4)], output)``.

Every adapted weight becomes ``W + Σ w_i · ΔW_i``, computed and added in float32 and then cast
back to the weight's stored dtype (adding in fp16/bf16 would drift). Any module kind is fused:
LoRA, LoHa and LoKr through their exact low-rank forms, full-rank differences as they are, DoRA
from the base weight itself (``ΔW = m · (W + ΔW₀)/‖W + ΔW₀‖ − W``), and the bias and norm-layer
differences of full and norm modules into those vectors. A diffusers folder is baked
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

from ..device import on_device, resolve_device
from ..errors import InvalidArgumentError, MismatchError, OutputExistsError
from ..files.atomic import atomic_dir, check_output, refuse_overwrite, same_file
from ..files.header import read_header
from ..files.writer import write_safetensors
from ..formats import input_files
from ..formats.fusing import swap_halves
from ..metadata import HISTORY_KEY, history, input_record
from ..records import OperationRecord
from ..version import TOOL
from .inputs import AdapterLike, Progress, WeightedAdapter, check_compatible, load_weighted
from .lowrank import concatenate
from .model_weights import (
    ModelWeights,
    Slot,
    checkpoint_slots,
    component_folders,
    diffusers_slots,
    vector_key,
    weight_files,
)


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
         force: bool = False, progress: Progress | None = None,
         device: str | torch.device | None = "auto") -> BakeResult:
    """Fuse weighted adapters into the model at ``base`` and write the result to ``output``.

    ``base`` is a diffusers folder (the output is a folder) or a single-file ``.safetensors``
    checkpoint (the output is a ``.safetensors`` file with the same keys). ``device`` (``auto``,
    ``cpu``, ``cuda``) is where each weight's ``W + Σ w·ΔW`` is computed (see :mod:`loralib.device`).
    """
    device = resolve_device(device)
    items = load_weighted(adapters)
    check_compatible(items)
    base, output = Path(base), Path(output)
    with ModelWeights.open(base, vectors=True) as model:
        sources = (model.path, *input_files(i.adapter.source_path for i in items if i.adapter.source_path))
        _check_output(model, output, force, sources)
        deltas = _fused_modules(items)
        _check_fits(model, deltas, items)
    operation = OperationRecord("bake", [input_record(i.adapter, i.weight) for i in items], {"base": base.name})
    written = {"tool": TOOL, "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")}
    record = operation.completed(written).to_dict(with_paths=False)
    if model.kind == "checkpoint":
        plan = {base: checkpoint_slots(read_header(base), vectors=True)}
    else:
        plan = {f: diffusers_slots(component, read_header(f), vectors=True)
                for component, folder in component_folders(base) for f in weight_files(folder)}
    plan = {f: {k: s for k, s in slots.items() if k in deltas} for f, slots in plan.items()}
    total = sum(len(s) for s in plan.values())
    counter = _Counter(total, progress)
    if model.kind == "checkpoint":
        _rewrite(base, output, plan[base], deltas, record, counter, device)
        files = [output]
    else:
        files = _bake_folder(base, output, plan, deltas, record, counter, device)
    layers = len({(s.file, s.name) for slots in plan.values() for s in slots.values()})
    modules = len({key.split(":", 1)[0] for key in deltas})
    return BakeResult(output, model.kind, files, layers, modules)


class _Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def step(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)


def _check_output(model: ModelWeights, output: Path, force: bool, inputs: tuple[Path, ...]) -> None:
    if model.kind == "checkpoint":
        if output.suffix.lower() != ".safetensors":
            raise InvalidArgumentError(f"the base {model.path.name} is a single-file checkpoint, so the output must be "
                                       f"a .safetensors file, not {output}", "Give -o NAME.safetensors")
        check_output(output, force, inputs=inputs)
        return
    if output.suffix.lower() == ".safetensors":
        raise InvalidArgumentError(f"the base {model.path.name} is a diffusers folder, so the output is a folder too",
                                   "Give a folder path with -o (writing a single-file checkpoint needs a single-file base)")
    if same_file(output, model.path):
        raise OutputExistsError(f"{output} is the base model", "Write the baked model to another folder")
    if not output.parent.exists():
        check_output(output, force)
    refuse_overwrite(output, force, inputs)


def _fused_modules(items: list[WeightedAdapter]) -> dict[str, list[tuple[object, float]]]:
    """For each base tensor to change, the (module, weight) pairs to add: a layer's weight matrix by
    its key, a bias or a norm layer's weight by :func:`vector_key`."""
    deltas: dict[str, list] = defaultdict(list)
    for item in items:
        if item.weight == 0:
            continue
        for key, module in item.adapter.modules.items():
            if module.is_matrix:
                deltas[key].append((module, item.weight))
            elif module.delta() is not None:
                deltas[vector_key(key, "weight")].append((module, item.weight))
            if module.bias_delta() is not None:
                deltas[vector_key(key, "bias")].append((module, item.weight))
    return dict(deltas)


def _check_fits(model: ModelWeights, deltas: dict, items: list[WeightedAdapter]) -> None:
    missing = [k for k in deltas if k not in model.slots]
    if missing:
        layer = missing[0].split(":", 1)[0]
        owner = next(i.name for i in items if layer in i.adapter.modules)
        raise MismatchError(f"{len(missing)} layer(s) adapted by the LoRAs are not in {model.path.name}, "
                            f"e.g. {missing[0]} (from {owner})",
                            "The adapter was made for a different base model architecture")
    for key, parts in deltas.items():
        module = parts[0][0]
        slot = model.slots[key]
        if ":" in key:
            width = module.bias_delta().numel() if key.endswith(":bias") else module.delta().numel()
            if _flat(slot.shape) != (width, 1):
                raise MismatchError(f"{key} has {list(slot.shape)} values in {model.path.name} but the adapter changes "
                                    f"{width}", "The adapter was made for a different base model")
        elif _flat(slot.shape) != _flat(module.weight_shape):
            raise MismatchError(f"{key} is {list(slot.shape)} in {model.path.name} but the adapter changes a "
                                f"{list(module.weight_shape)} weight", "The adapter was made for a different base model")


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    rest = 1
    for n in shape[1:]:
        rest *= n
    return shape[0], rest


def layer_delta(parts: list[tuple[object, float]], base: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ w_i · ΔW_i`` in float32 as a matrix ``[out, in·kh·kw]``: the modules with an exact low-rank
    form in one product, the others (full differences; DoRA, from ``base``, the layer's weight) added densely."""
    factors = []
    total = None
    for module, weight in parts:
        form = module.low_rank(torch.float32)
        if form is not None:
            up, down, coefficient = form
            factors.append((up, down, weight * coefficient))
        else:
            dense = weight * module.delta(torch.float32, base).reshape(module.out_features, -1)
            total = dense if total is None else total + dense
    if factors:
        up, down = concatenate(factors, torch.float32)
        total = up @ down if total is None else total + up @ down
    return total


def vector_delta(key: str, parts: list[tuple[object, float]]) -> torch.Tensor:
    """``Σ w_i · Δb_i`` (``key`` ends in ``:bias``) or ``Σ w_i · Δw_i`` of a norm layer's weight, in float32."""
    pick = (lambda m: m.bias_delta(torch.float32)) if key.endswith(":bias") else (lambda m: m.delta(torch.float32))
    return sum(weight * pick(module) for module, weight in parts)


def _fuse(tensors: dict[str, torch.Tensor], slots: dict[str, Slot], deltas: dict, counter: _Counter,
          device: torch.device) -> None:
    by_tensor: dict[str, list[tuple[str, Slot]]] = defaultdict(list)
    for key, slot in slots.items():
        by_tensor[slot.name].append((key, slot))
    for name, entries in by_tensor.items():
        stored = tensors[name]
        changes = []  # every delta of this tensor is computed against the unchanged weight (DoRA reads it)
        for key, slot in entries:
            parts = [(on_device(module, device), weight) for module, weight in deltas[key]]
            if ":" in key:
                delta = vector_delta(key, parts)
            else:
                base = stored if slot.rows is None else stored[slot.rows[0]: slot.rows[1]]
                base = on_device(base, device)
                delta = layer_delta(parts, swap_halves(base) if slot.swap else base)
            if slot.swap:  # the file keeps this layer's halves in the original model's order
                delta = swap_halves(delta)
            changes.append((slot, delta))
        weight = on_device(stored, device).to(torch.float32)
        for slot, delta in changes:
            if slot.rows is None:
                weight += delta.reshape(weight.shape)
            else:
                weight[slot.rows[0]: slot.rows[1]] += delta.reshape(slot.shape)
            counter.step()
        tensors[name] = weight.to("cpu", stored.dtype)


def _load_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    return load_file(path), dict(read_header(path).metadata)


def _rewrite(source: Path, target: Path, slots: dict[str, Slot], deltas: dict, record: dict, counter: _Counter,
             device: torch.device) -> None:
    tensors, metadata = _load_all(source)
    _fuse(tensors, slots, deltas, counter, device)
    metadata[HISTORY_KEY] = json.dumps(history(metadata) + [record])
    write_safetensors(target, tensors, metadata)


def _bake_folder(base: Path, output: Path, plan: dict[Path, dict[str, Slot]], deltas: dict, record: dict,
                 counter: _Counter, device: torch.device) -> list[Path]:
    written = []
    with atomic_dir(output) as tmp:
        for source in sorted(base.rglob("*")):
            if not source.is_file():
                continue
            relative = source.relative_to(base)
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if plan.get(source):
                _rewrite(source, target, plan[source], deltas, record, counter, device)
            else:
                shutil.copy2(source, target)
            written.append(output / relative)
    return written
