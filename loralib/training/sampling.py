"""Sample images rendered while training, with the adapter as it is at that step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..pipelines import BaseModel
from .config import TrainConfig


def render_samples(base: BaseModel, unet, text_encoders: list[Any], config: TrainConfig, step: int, folder: Path,
                   progress: Callable[[int, int], None] | None = None, *,
                   model_hash: str | None = None) -> list[tuple[Path, Any]]:
    """Render every ``sample_prompts`` entry with the live (LoRA-carrying) UNet and text encoders.

    Each PNG, ``<model_name>-step<step>-<index>.png`` in ``folder``, carries A1111 parameters (with the
    base model's ``model_hash``) plus the training step. Returns ``[(path, PIL image)]``. The caller puts
    the models in eval mode.
    """
    from ..generation import GenerationSettings, infotext, render, sampler_name, save_png

    sampling, name = config.sampling, config.model.model_name
    pipe = base.pipeline(unet=unet, text_encoders=text_encoders)
    written = []
    for index, prompt in enumerate(sampling.sample_prompts):
        settings = GenerationSettings(prompt, sampling.sample_negative_prompt, sampling.sample_steps,
                                      sampling.sample_guidance_scale, config.data.resolution, config.data.resolution,
                                      sampling.sample_seed, sampler_name(pipe.scheduler),
                                      distilled_guidance=base.family == "flux")
        image = render(pipe, settings, [sampling.sample_seed])[0]
        text = infotext(settings, model=Path(str(config.model.base_model)).name,
                        extra={"Lora": name, "Training step": step}, model_hash=model_hash)
        path = save_png(image, folder / f"{name}-step{step:08d}-{index:02d}.png", text,
                        {"prompt": prompt, "seed": sampling.sample_seed, "step": step, "adapter": name})
        written.append((path, image))
        if progress:
            progress(index + 1, len(sampling.sample_prompts))
    return written
