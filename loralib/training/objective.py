"""The training objective: how a batch of images and captions becomes a loss.

Noise a latent at a random timestep and regress the UNet's prediction onto the noise
(``epsilon``) or the velocity (``v_prediction``), optionally weighted by Min-SNR. Latents are drawn
from each image's VAE distribution (mean + std · ε), so caching the distribution instead of one
sample keeps the regularising randomness. SDXL is conditioned on both text encoders (penultimate
hidden states concatenated, pooled embedding of the second) and on each image's original size,
crop corner and target size.

Every random number of a step comes from one generator in a fixed order (see :meth:`Objective.draws`),
which is what makes resumed runs exact.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..pipelines import BaseModel
from .config import TrainConfig
from .dataset import BatchPlan, Dataset, load_image, plan_crop

PREDICTION_TYPES = ("epsilon", "v_prediction")


class Objective:
    """The loss of a batch, and the latent and caption caches that make it cheap.

    ``unet`` and ``text_encoders`` start as the base model's and are replaced by the trainer with the
    modules accelerate wrapped.
    """

    def __init__(self, base: BaseModel, config: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> None:
        from diffusers import DDPMScheduler

        self.base, self.config, self.device, self.weight_dtype = base, config, device, weight_dtype
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        wanted = config.training.prediction_type
        self.prediction_type = self.noise_scheduler.config.prediction_type if wanted == "auto" else wanted
        if self.prediction_type not in PREDICTION_TYPES:
            raise InvalidArgumentError(f"the base model predicts {self.prediction_type!r}, which lorareg cannot train",
                                       "Set prediction_type to epsilon or v_prediction")
        self.noise_scheduler.register_to_config(prediction_type=self.prediction_type)
        vae = base.vae.config
        self.latent_channels = int(vae.latent_channels)
        self.vae_scale_factor = base.vae_scale_factor
        self.latent_scale, self.latent_shift = float(vae.scaling_factor), float(vae.get("shift_factor") or 0.0)
        self.unet = base.unet
        self.text_encoders = list(base.text_encoders)
        self.latent_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.crops: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # --- caches -------------------------------------------------------------------------------------------

    @property
    def caches_latents(self) -> bool:
        """Latents are cached when every step would see the same crop of every image."""
        data = self.config.data
        return data.cache_latents and data.crop == "center" and not data.random_flip

    @property
    def caches_text(self) -> bool:
        """Caption embeddings are cached when the text encoders are frozen."""
        return self.config.data.cache_text_embeddings and not self.config.network.train_text_encoder

    def fill_caches(self, dataset: Dataset, plan: BatchPlan, on_phase: Callable[[str, int, int], None]) -> None:
        """Encode every image and caption once (as configured), then release the models no step needs."""
        if self.caches_latents:
            self._cache_latents(dataset, plan, on_phase)
        if self.caches_text:
            self._cache_text(sorted({r.caption for r in dataset.records} | {""}), on_phase)
        samples = bool(self.config.sampling.sample_prompts)  # sampling needs the VAE and the text encoders
        if self.caches_latents and not samples:
            self.base.vae = None
        if self.caches_text and not samples:
            self.base.text_encoders = self.text_encoders = [None] * len(self.text_encoders)

    def _cache_latents(self, dataset: Dataset, plan: BatchPlan, on_phase: Callable[[str, int, int], None]) -> None:
        records, buckets = dataset.records, plan.assignment
        order = sorted(range(len(records)), key=lambda i: buckets[i])
        chunk = max(1, min(8, self.config.training.batch_size))
        done = 0
        with torch.no_grad():
            while done < len(order):
                bucket = buckets[order[done]]
                group = [i for i in order[done:done + chunk] if buckets[i] == bucket]
                images = []
                for index in group:
                    crop = plan_crop(records[index].size, bucket, random_crop=False, flip=False, rng=random.Random(0))
                    images.append(load_image(records[index].path, crop, bucket))
                    self.crops[index] = (crop.original_size, (crop.top, crop.left))
                dist = self.base.vae.encode(torch.stack(images).to(self.device, self.base.vae.dtype)).latent_dist
                for j, index in enumerate(group):
                    self.latent_cache[index] = (dist.mean[j].float().cpu(), dist.std[j].float().cpu())
                done += len(group)
                on_phase("caching latents", done, len(order))

    def _cache_text(self, captions: list[str], on_phase: Callable[[str, int, int], None]) -> None:
        with torch.no_grad():
            for start in range(0, len(captions), 16):
                part = captions[start:start + 16]
                hidden, pooled = self.encode_text(part)
                for j, caption in enumerate(part):
                    self.text_cache[caption] = (hidden[j].cpu(), None if pooled is None else pooled[j].cpu())
                on_phase("caching captions", min(start + 16, len(captions)), len(captions))

    # --- the pieces of a step -------------------------------------------------------------------------------

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's text conditioning: hidden states ``[B, 77, D]`` and (SDXL) the pooled embedding."""
        if self.text_cache and all(c in self.text_cache for c in captions):
            hidden = torch.stack([self.text_cache[c][0] for c in captions]).to(self.device)
            if not self.base.is_sdxl:
                return hidden, None
            return hidden, torch.stack([self.text_cache[c][1] for c in captions]).to(self.device)
        states, pooled = [], None
        for tokenizer, encoder in zip(self.base.tokenizers, self.text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            if not self.base.is_sdxl:
                states.append(encoder(ids, return_dict=False)[0])
                continue
            output = encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = output[0]  # CLIPTextModelWithProjection: the projected pooled embedding
        return torch.cat(states, dim=-1), pooled

    def draws(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every random number a step needs, drawn on the CPU in a fixed order and moved to the device
        before any model runs (a copy after the VAE would make the CPU wait for it)."""
        width, height = batch["bucket"]
        size, factor = len(batch["captions"]), self.vae_scale_factor
        shape = (size, self.latent_channels, height // factor, width // factor)
        draws = {"latent": torch.randn(shape, generator=generator), "noise": torch.randn(shape, generator=generator)}
        if self.config.training.noise_offset:
            offset = torch.randn((size, shape[1], 1, 1), generator=generator)
            draws["noise"] = draws["noise"] + self.config.training.noise_offset * offset
        draws["timesteps"] = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,),
                                           generator=generator)
        drop = torch.rand(size, generator=generator)  # stays on the CPU: it picks captions
        if self.base.is_sdxl:  # SDXL's size conditioning: original size, crop corner, target size
            if "pixels" in batch:
                originals, corners = batch["original_sizes"], batch["crop_corners"]
            else:
                originals, corners = zip(*(self.crops[i] for i in batch["items"]))
            draws["time_ids"] = torch.tensor([[*o, *c, height, width] for o, c in zip(originals, corners)],
                                             dtype=torch.float32)
        return {"drop": drop, **{name: value.to(self.device) for name, value in draws.items()}}

    def latents(self, batch: dict[str, Any], sample: torch.Tensor) -> torch.Tensor:
        """A latent drawn from each image's VAE distribution (``sample``: standard normal draws)."""
        if "pixels" in batch:
            pixels = batch["pixels"].to(self.device, self.base.vae.dtype)
            with torch.no_grad():
                dist = self.base.vae.encode(pixels).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        else:
            items = batch["items"]
            mean = torch.stack([self.latent_cache[i][0] for i in items]).to(self.device)
            std = torch.stack([self.latent_cache[i][1] for i in items]).to(self.device)
        latents = (mean + std * sample - self.latent_shift) * self.latent_scale
        return latents.to(self.weight_dtype)

    def loss(self, batch: dict[str, Any], generator: torch.Generator, timesteps: torch.Tensor | None = None,
             dropout: bool = True) -> torch.Tensor:
        """The mean (Min-SNR weighted) denoising loss of ``batch``; ``timesteps`` fixes the timesteps."""
        train = self.config.training
        draws = self.draws(batch, generator)
        latents = self.latents(batch, draws["latent"])
        noise = draws["noise"].to(latents.dtype)
        timesteps = (draws["timesteps"] if timesteps is None else timesteps.to(self.device)).long()
        rate = self.config.data.caption_dropout if dropout else 0.0
        captions = ["" if d < rate else c for c, d in zip(batch["captions"], draws["drop"].tolist())]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden, pooled = self.encode_text(captions)
        extra = None
        if self.base.is_sdxl:
            extra = {"text_embeds": pooled.to(self.weight_dtype), "time_ids": draws["time_ids"].to(self.weight_dtype)}
        prediction = self.unet(noisy, timesteps, hidden.to(self.weight_dtype), added_cond_kwargs=extra,
                               return_dict=False)[0]
        target = noise if self.prediction_type == "epsilon" else \
            self.noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=list(range(1, latents.ndim)))
        if train.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=train.snr_gamma)
            weights = weights / snr if self.prediction_type == "epsilon" else weights / (snr + 1)
            loss = loss * weights
        return loss.mean()

    def evaluation_batch(self, dataset: Dataset, plan: BatchPlan, index: int) -> dict[str, Any]:
        """A one-image batch of record ``index``, center-cropped (for :meth:`Trainer.evaluation_loss`)."""
        record, bucket = dataset.records[index], plan.assignment[index]
        batch: dict[str, Any] = {"items": [index], "bucket": bucket, "captions": [record.caption]}
        if not self.latent_cache:
            crop = plan_crop(record.size, bucket, random_crop=False, flip=False, rng=random.Random(0))
            batch.update(pixels=load_image(record.path, crop, bucket)[None], original_sizes=[crop.original_size],
                         crop_corners=[(crop.top, crop.left)])
        return batch
