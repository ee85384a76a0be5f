"""Resumable training checkpoints: ``<output_dir>/checkpoints/step-00000010/``.

A checkpoint holds the trainable LoRA tensors (``trainable.safetensors``), their moving average
with ``ema_decay`` (``ema.safetensors``), the optimizer, learning-rate scheduler and gradient-scaler
states, the step counter and the losses so far (``training_state.pt``, read back with
``weights_only=True``), and the configuration it was made with (``config.json``). Every random
draw of step N is derived from the seed and N, so restoring these states continues a run exactly:
a resumed run ends with the same adapter as an uninterrupted one.

A checkpoint folder is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint that ``--resume latest`` would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, InputNotFoundError, MismatchError
from ..files.atomic import sweep_stale, temp_name

FOLDER = "checkpoints"
STATE_FILE = "training_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
_NAME = re.compile(r"^step-(\d+)$")
# Keys whose change makes a checkpoint unusable: they decide which parameters exist and what they mean.
STRUCTURAL_KEYS = ("base_model", "rank", "alpha", "target_modules", "conv_rank", "conv_alpha",
                   "train_text_encoder", "optimizer", "network_type", "block_dims", "block_alphas", "conv_block_dims",
                   "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "loraplus_lr_ratio",
                   "train_blocks", "train_double_block_indices", "train_single_block_indices", "factor",
                   "decompose_both", "img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim",
                   "txt_mod_dim", "single_dim", "single_mod_dim", "x_attn_dim", "context_attn_dim", "x_mlp_dim",
                   "context_mlp_dim", "x_mod_dim", "context_mod_dim", "in_dims")


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    state: dict[str, Any]
    config: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def checkpoints_dir(output_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(output_dir) / FOLDER


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as ``(step, folder)``."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file() and (path / TRAINABLE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(output_dir: Path, resume: str | Path) -> Path:
    """The checkpoint folder that ``--resume`` names: ``latest`` or a path."""
    if str(resume) == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise InputNotFoundError(f"there is no checkpoint in {checkpoints_dir(output_dir)} to resume from",
                                     "Start without --resume, or give the output_dir of the earlier run")
        return found[-1][1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise InputNotFoundError(f"{path} is not a lorareg checkpoint folder (it has no {STATE_FILE})",
                                 "Pass --resume latest, or a folder under checkpoints/")
    return path


def save_checkpoint(output_dir: Path, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any],
                    config: dict[str, Any], keep: int | None = None,
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint for ``step`` atomically; keep only the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    parent = checkpoints_dir(output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step-{step:08d}"
    sweep_stale(parent)  # folders of a run killed while writing its checkpoint
    tmp = parent / temp_name(final.name)
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / TRAINABLE_FILE)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, tmp / EMA_FILE)
        torch.save({**state, "step": step}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (no pickle code runs: ``weights_only=True``)."""
    from safetensors.torch import load_file

    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        trainable = load_file(path / TRAINABLE_FILE)
        ema = load_file(path / EMA_FILE) if (path / EMA_FILE).is_file() else None
        config = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    except Exception as exc:
        raise CorruptFileError(f"the checkpoint {path} cannot be read ({type(exc).__name__})",
                               "Resume from an older checkpoint (pass its folder to --resume)") from exc
    return Checkpoint(path, int(state["step"]), trainable, state, config, ema)


def check_compatible(checkpoint: Checkpoint, config: dict[str, Any]) -> None:
    """Refuse to resume with a configuration that changes which parameters are trained."""
    changed = [f"{key} ({checkpoint.config[key]!r} -> {config.get(key)!r})" for key in STRUCTURAL_KEYS
               if key in checkpoint.config and checkpoint.config[key] != config.get(key)]
    if changed:
        raise MismatchError(f"the checkpoint {checkpoint.path.name} was made with a different {', '.join(changed)}",
                            "Resume with the same settings, or start a new run with --force")
