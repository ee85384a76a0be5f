"""Extract a LoRA from two models: ``extract(base, tuned, rank=32)``.

For every targeted layer present in both models the difference ``ΔW = W_tuned − W_base`` is
formed in float32, one layer at a time (memory stays at a few layers whatever the model size),
and replaced by its best rank-k approximation from an exact or randomized SVD (see
:func:`loralib.compose.lowrank.dense_svd`). Targets are what LoRA trainers adapt: attention,
feed-forward and projection layers of the UNet and the text encoders; other convolutions only
when a conv rank is given; in Flux.1/SD3 transformers also the blocks' modulation layers (the
layers sd-scripts' Flux LoRA adapts). Layers whose difference is at most ``min_diff`` (largest
absolute entry) are left out. Flux.1/SD3 models may be diffusers folders, transformer folders or
single files with original (BFL/MMDiT) names, whose fused layers are read one part at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..adapter import LoraAdapter, LoraModule, all_finite
from ..architectures import COMPONENTS, detect_architecture
from ..device import on_device, resolve_device
from ..dtypes import from_safetensors
from ..errors import CorruptFileError, InvalidArgumentError, MismatchError
from ..layers import PROJECTION, LayerShape, select_layers
from ..records import InputRecord, OperationRecord
from .inputs import Progress, module_from_factors
from .lowrank import SVD_METHODS
from .model_weights import ModelWeights
from .rank_rules import RankRule, rank_rule
from .reduce import reduce_dense
from .report import CompositionReport
from .result import Composition, storage_bytes


def extract(base: str | Path, tuned: str | Path, rank: int | None = None, *, dynamic: str | None = None,
            max_rank: int | None = None, conv_rank: int | None = None, components: Iterable[str] | None = None,
            min_diff: float = 0.0, svd: str = "auto", seed: int = 0, dtype: torch.dtype | None = None,
            progress: Progress | None = None, device: str | torch.device | None = "auto") -> Composition:
    """A LoRA approximating ``tuned − base`` layer by layer at ``rank`` (or a dynamic rule).

    ``base`` and ``tuned`` are diffusers folders or single-file checkpoints, in any mix.
    ``conv_rank`` also extracts 3×3 convolutions (LoCon) at that rank. ``components`` limits the
    work to some of ``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``. ``svd`` is ``auto`` (randomized
    when the rank is far below the layer's size, else exact), ``exact`` or ``randomized``; dynamic
    rules always use the exact SVD. ``dtype`` is the output's storage dtype (default: the tuned
    model's). ``device`` (``auto``, ``cpu``, ``cuda``) is where each layer's difference and SVD are
    computed (see :mod:`loralib.device`); the models are read one layer at a time on the CPU.
    """
    rule = rank_rule(rank, dynamic, max_rank)
    if rule is None:
        raise InvalidArgumentError("extract needs a rank or a dynamic rule", "Pass --rank N, e.g. --rank 32")
    if svd not in SVD_METHODS:
        raise InvalidArgumentError(f"unknown SVD method {svd!r}", f"Choose one of {', '.join(SVD_METHODS)}")
    device = resolve_device(device)
    conv_rule = _conv_rule(rule, conv_rank)
    wanted = _components(components)
    with ModelWeights.open(base) as base_model, ModelWeights.open(tuned) as tuned_model:
        targets = _targets(base_model, tuned_model, wanted, conv_rule is not None)
        family = tuned_model.family or base_model.family
        dtype = dtype or _stored_dtype(tuned_model, targets)
        report = CompositionReport("extract")
        modules: dict[str, LoraModule] = {}
        unchanged = 0
        for done, (key, shape) in enumerate(targets.items(), 1):
            difference = (on_device(tuned_model.read(key), device).to(torch.float32)
                          - on_device(base_model.read(key), device).to(torch.float32))
            difference = difference.reshape(shape.out_features, -1)
            tuned_model.release(key)  # one layer of each model in memory at a time, whatever their size
            base_model.release(key)
            if not all_finite(difference):
                raise CorruptFileError(f"{key} holds NaN or infinite values in {Path(tuned).name} or {Path(base).name}",
                                       "A model with such weights cannot be compared; check both files")
            if difference.numel() == 0 or float(difference.abs().max()) <= min_diff:
                unchanged += 1
            else:
                layer_rule = conv_rule if _is_spatial(shape) else rule
                up, down, entry = reduce_dense(difference, layer_rule, svd=svd, seed=seed)
                modules[key] = module_from_factors(up, down, shape, dtype)
                report.modules[key] = entry
            if progress:
                progress(done, len(targets))
    if unchanged:
        report.notes.append(f"left out {unchanged} layer(s) whose difference is at most {min_diff:g}")
    if not modules:
        raise InvalidArgumentError(f"{Path(tuned).name} does not differ from {Path(base).name} in any targeted layer",
                                   "Check that the second model is the fine-tuned one")
    architecture = detect_architecture({k: m.in_features for k, m in modules.items()}, family=family).name
    adapter = LoraAdapter(modules, architecture)
    report.parameters, report.bytes = adapter.parameter_count, storage_bytes(adapter)
    params = {**rule.params(), "conv_rank": conv_rank, "svd": svd, "min_diff": min_diff,
              "components": sorted(wanted)}
    inputs = [InputRecord(file=Path(p).name, path=str(Path(p).absolute()), role=role)
              for p, role in ((base, "base"), (tuned, "tuned"))]
    operation = OperationRecord("extract", inputs, {"rank": rank, "params": params})
    return Composition(adapter, report, operation)


def _conv_rule(rule: RankRule, conv_rank: int | None) -> RankRule | None:
    if conv_rank is None:
        return None
    if rule.is_dynamic:
        return RankRule(rule.kind, rule.value, conv_rank)
    return rank_rule(conv_rank)


def _components(components: Iterable[str] | None) -> set[str]:
    if components is None:
        return set(COMPONENTS)
    chosen = set(components)
    unknown = chosen - set(COMPONENTS)
    if unknown:
        raise InvalidArgumentError(f"unknown component(s) {', '.join(sorted(unknown))}",
                                   f"Choose among {', '.join(COMPONENTS)}")
    return chosen


def _is_spatial(shape: LayerShape) -> bool:
    return shape.is_conv and shape.kernel_size != (1, 1)


def _targets(base: ModelWeights, tuned: ModelWeights, components: set[str], conv: bool) -> dict[str, LayerShape]:
    """The layers to extract, after checking that both models have them with equal shapes."""
    base_shapes, tuned_shapes = base.shapes(), tuned.shapes()
    common = [k for k in tuned_shapes if k in base_shapes and k.split(".", 1)[0] in components]
    if not common:
        raise MismatchError(f"{tuned.path.name} and {base.path.name} have no layer in common",
                            "Give two models of the same architecture")
    different = [k for k in common if base_shapes[k] != tuned_shapes[k]]
    if different:
        key = different[0]
        raise MismatchError(f"{key} has shape {_dims(base_shapes[key])} in {base.path.name} but "
                            f"{_dims(tuned_shapes[key])} in {tuned.path.name} ({len(different)} layer(s) differ)",
                            "Give two models of the same architecture")
    shapes = {k: tuned_shapes[k] for k in common}
    chosen = select_layers(shapes, conv=conv)
    # 1×1 convolutions that act as projections (SD1's proj_in/proj_out) are ordinary LoRA targets.
    chosen.update({k: s for k, s in shapes.items() if s.is_conv and not _is_spatial(s) and PROJECTION.search(k)})
    return {k: shapes[k] for k in common if k in chosen}


def _dims(shape: LayerShape) -> list[int]:
    return [shape.out_features, shape.in_features, *(shape.kernel_size or ())]


def _stored_dtype(model: ModelWeights, targets: dict[str, LayerShape]) -> torch.dtype:
    first = next(iter(targets), None)
    return from_safetensors(model.slots[first].dtype) if first is not None else torch.float32

