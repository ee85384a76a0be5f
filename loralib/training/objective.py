"""The training objective: how a batch of images and captions becomes a loss.

Noise a latent at a random timestep and regress the UNet's prediction onto the noise
(``epsilon``) or the velocity (``v_prediction``). Latents are drawn from each image's VAE
distribution (mean + std · ε), so caching the distribution instead of one sample keeps the
regularising randomness. SDXL is conditioned on both text encoders (penultimate hidden states
concatenated, pooled embedding of the second) and on each image's original size, crop corner and
target size.

Options, with sd-scripts' definitions: noise offset, multi-resolution (pyramid) noise,
input-perturbation noise, L2/L1/Huber/smooth-L1 losses with a timestep-dependent Huber threshold,
per-pixel loss masks, Min-SNR weighting and debiased estimation, shuffled and dropped caption tags.

Every random number of a step comes from one generator in a fixed order (see :meth:`Objective.draws`),
which is what makes resumed runs exact.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..pipelines import BaseModel
from .caches import LatentEntry, LatentStore, TextStore, fingerprint
from .captions import process_caption
from .config import TrainConfig
from .dataset import BatchPlan, Dataset, load_image, load_mask, plan_crop

PREDICTION_TYPES = ("epsilon", "v_prediction")


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (sd-scripts' ``pyramid_noise_like``): add upscaled coarser noise, level ``i``
    weighted ``discount**i`` at a random 2-4× smaller scale per level, then rescale to unit variance."""
    batch, channels, height, width = noise.shape
    for level in range(iterations):
        ratio = float(torch.rand((), generator=generator)) * 2 + 2
        small = (max(1, int(height / ratio ** level)), max(1, int(width / ratio ** level)))
        coarse = torch.randn((batch, channels, *small), generator=generator)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount ** level
        if 1 in small:
            break
    return noise / noise.std()


class Objective:
    """The loss of a batch, and the latent and caption caches that make it cheap.

    ``unet`` and ``text_encoders`` start as the base model's and are replaced by the trainer with the
    modules accelerate wrapped.
    """

    def __init__(self, base: BaseModel, config: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.base, self.config, self.device, self.weight_dtype = base, config, device, weight_dtype
        self._set_up_schedule()
        vae = base.vae.config
        self.latent_channels = int(vae.latent_channels)
        self.vae_scale_factor = base.vae_scale_factor
        self.latent_scale, self.latent_shift = float(vae.scaling_factor), float(vae.get("shift_factor") or 0.0)
        self.unet = base.unet
        self.text_encoders = list(base.text_encoders)
        # read once: diffusers' ModelMixin.dtype walks every submodule at each call
        self.vae_dtype = next(base.vae.parameters()).dtype
        self.latent_store = LatentStore(masked=config.data.masked_loss)
        self.text_store = TextStore()
        self.masked = config.data.masked_loss

    def _set_up_schedule(self) -> None:
        """The noise schedule (DDPM's, from the base model's scheduler config) and what the UNet predicts."""
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.base.scheduler.config)
        wanted = self.config.training.prediction_type
        self.prediction_type = self.noise_scheduler.config.prediction_type if wanted == "auto" else wanted
        if self.prediction_type not in PREDICTION_TYPES:
            raise InvalidArgumentError(f"the base model predicts {self.prediction_type!r}, which lorareg cannot train",
                                       "Set prediction_type to epsilon or v_prediction")
        self.noise_scheduler.register_to_config(prediction_type=self.prediction_type)

    def _draw_timesteps(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """One training timestep per sample, uniform over the schedule."""
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,), generator=generator)

    # --- caches -------------------------------------------------------------------------------------------

    @property
    def caches_latents(self) -> bool:
        """Latents are cached when every step would see the same crop of every image."""
        data = self.config.data
        return data.cache_latents and data.crop == "center" and not data.random_flip

    @property
    def caches_text(self) -> bool:
        """Caption embeddings are cached when the text encoders are frozen and captions do not change."""
        config = self.config
        return config.data.cache_text_embeddings and not config.network.train_text_encoder \
            and not config.randomizes_captions

    def fill_caches(self, sources: list[tuple[Dataset, BatchPlan]],
                    on_phase: Callable[[str, int, int], None]) -> None:
        """Encode every image and caption of ``sources`` (training, then validation) once, as configured,
        then release the models no step needs."""
        disk = self.config.data.cache_to_disk
        folder = self.config.cache_dir if disk else None
        if self.caches_latents:
            vae = self.base.vae
            encoding = [m for m in (vae.encoder, vae.quant_conv) if m is not None]  # what a latent depends on
            stamp = fingerprint(*encoding, extra={"dtype": str(self.vae_dtype)}) if disk else ""
            self.latent_store = LatentStore(folder, stamp, masked=self.masked)
            jobs = [(r, plan.assignment[i]) for dataset, plan in sources for i, r in enumerate(dataset.records)]
            self._cache_latents(jobs, on_phase)
        if self.caches_text:
            stamp = ""
            if disk:
                tokenizers = [(type(t).__name__, len(t), t.model_max_length) for t in self.base.tokenizers]
                stamp = fingerprint(*self.text_encoders, extra={"tokenizers": tokenizers, "sdxl": self.base.is_sdxl})
            self.text_store = TextStore(folder, stamp)
            captions = {r.caption for dataset, _ in sources for r in dataset.records} | {""}
            self._cache_text(sorted(captions), on_phase)
        samples = bool(self.config.sampling.sample_prompts)  # sampling needs the VAE and the text encoders
        if self.caches_latents and not samples:
            self.base.vae = None
        if self.caches_text and not samples:
            self.base.text_encoders = self.text_encoders = [None] * len(self.text_encoders)

    def _cache_latents(self, jobs: list[tuple[Any, tuple[int, int]]], on_phase: Callable[[str, int, int], None]) -> None:
        store = self.latent_store
        todo = sorted((job for job in jobs if store.missing(job[0].path, job[1], job[0].mask)),
                      key=lambda job: job[1])
        chunk = max(1, min(8, self.config.training.batch_size))
        done = 0
        on_phase("caching latents", 0, len(todo))
        with torch.no_grad():
            while done < len(todo):
                bucket = todo[done][1]
                group = [job for job in todo[done:done + chunk] if job[1] == bucket]
                images, crops = [], []
                for record, _ in group:
                    crop = plan_crop(record.size, bucket, random_crop=False, flip=False, rng=random.Random(0))
                    images.append(load_image(record.path, crop, bucket))
                    crops.append(crop)
                dist = self.base.vae.encode(torch.stack(images).to(self.device, self.vae_dtype)).latent_dist
                for j, ((record, _), crop) in enumerate(zip(group, crops)):
                    mean = dist.mean[j].float().cpu()
                    mask = self._latent_mask(load_mask(record, crop, bucket)[None], mean.shape[-2:])[0] \
                        if self.masked else None
                    entry = LatentEntry(mean, dist.std[j].float().cpu(), mask, crop.original_size, (crop.top, crop.left))
                    store.put(record.path, bucket, record.mask, entry)
                done += len(group)
                on_phase("caching latents", done, len(todo))

    def _cache_text(self, captions: list[str], on_phase: Callable[[str, int, int], None]) -> None:
        todo = [c for c in captions if self.text_store.missing(c)]
        on_phase("caching captions", 0, len(todo))
        with torch.no_grad():
            for start in range(0, len(todo), 16):
                part = todo[start:start + 16]
                hidden, pooled = self.encode_text(part)
                for j, caption in enumerate(part):
                    self.text_store.put(caption, hidden[j].cpu(), None if pooled is None else pooled[j].cpu())
                on_phase("caching captions", min(start + 16, len(todo)), len(todo))

    @staticmethod
    def _latent_mask(masks: torch.Tensor, size) -> torch.Tensor:
        """Pixel masks ``[B, 1, H, W]`` averaged down to latent cells (sd-scripts' ``area`` interpolation)."""
        return F.interpolate(masks, size=tuple(size), mode="area")

    # --- the pieces of a step -------------------------------------------------------------------------------

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's text conditioning: hidden states ``[B, 77, D]`` and (SDXL) the pooled embedding."""
        store = self.text_store
        if store and all(c in store for c in captions):
            entries = [store.get(c) for c in captions]
            hidden = torch.stack([e[0] for e in entries]).to(self.device)
            if entries[0][1] is None:  # no pooled embedding: SD1/SD2
                return hidden, None
            return hidden, torch.stack([e[1] for e in entries]).to(self.device)
        frozen = not self.config.network.train_text_encoder
        with torch.no_grad() if frozen else contextlib.nullcontext():  # no autograd bookkeeping for frozen encoders
            return self._run_text_encoders(captions)

    def _run_text_encoders(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def draws(self, batch: dict[str, Any], generator: torch.Generator,
              entries: list[LatentEntry] | None = None) -> dict[str, Any]:
        """Every random number a step needs, drawn on the CPU in a fixed order and moved to the device
        before any model runs (a copy after the VAE would make the CPU wait for it)."""
        train = self.config.training
        width, height = batch["bucket"]
        size, factor = len(batch["captions"]), self.vae_scale_factor
        shape = (size, self.latent_channels, height // factor, width // factor)
        draws = {"latent": torch.randn(shape, generator=generator), "noise": torch.randn(shape, generator=generator)}
        if train.noise_offset:
            offset = torch.randn((size, shape[1], 1, 1), generator=generator)
            draws["noise"] = draws["noise"] + train.noise_offset * offset
        draws["timesteps"] = self._draw_timesteps(size, generator)
        drop = torch.rand(size, generator=generator)  # stays on the CPU: it picks captions
        if train.multires_noise_iterations:
            draws["noise"] = pyramid_noise(draws["noise"], generator, train.multires_noise_iterations,
                                           train.multires_noise_discount)
        if train.ip_noise_gamma:
            draws["perturbation"] = train.ip_noise_gamma * torch.randn(shape, generator=generator)
        captions = int(torch.randint(0, 2**62, (), generator=generator)) if self.config.randomizes_captions else None
        if self.base.is_sdxl:  # SDXL's size conditioning: original size, crop corner, target size
            if "pixels" in batch:
                originals, corners = batch["original_sizes"], batch["crop_corners"]
            else:
                originals, corners = [e.original_size for e in entries], [e.crop_corner for e in entries]
            draws["time_ids"] = torch.tensor([[*o, *c, height, width] for o, c in zip(originals, corners)],
                                             dtype=torch.float32)
        return {"drop": drop, "captions": captions, **{name: value.to(self.device) for name, value in draws.items()}}

    def entries(self, batch: dict[str, Any]) -> list[LatentEntry] | None:
        """The cached encodings of a batch without pixels (None for a batch with pixels)."""
        if "pixels" in batch:
            return None
        return [self.latent_store.get(path, batch["bucket"]) for path in batch["paths"]]

    def latents(self, batch: dict[str, Any], sample: torch.Tensor,
                entries: list[LatentEntry] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A latent drawn from each image's VAE distribution (``sample``: standard normal draws), and the
        loss mask at latent resolution (None without masked_loss)."""
        mask = None
        if entries is None:
            pixels = batch["pixels"].to(self.device, self.vae_dtype)
            with torch.no_grad():
                dist = self.base.vae.encode(pixels).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
            if self.masked:
                mask = self._latent_mask(batch["masks"].to(self.device), mean.shape[-2:])
        else:
            mean = torch.stack([e.mean for e in entries]).to(self.device)
            std = torch.stack([e.std for e in entries]).to(self.device)
            if self.masked:
                mask = torch.stack([e.mask for e in entries]).to(self.device)
        latents = (mean + std * sample - self.latent_shift) * self.latent_scale
        return latents.to(self.weight_dtype), mask

    def _captions(self, batch: dict[str, Any], draws: dict[str, Any], dropout: bool) -> list[str]:
        data = self.config.data
        captions = batch["captions"]
        if dropout and draws["captions"] is not None:
            rng = random.Random(draws["captions"])
            captions = [process_caption(c, rng, shuffle=data.shuffle_caption, keep_tokens=data.keep_tokens,
                                        tag_dropout=data.caption_tag_dropout) for c in captions]
        rate = data.caption_dropout if dropout else 0.0
        return ["" if d < rate else c for c, d in zip(captions, draws["drop"].tolist())]

    def huber_threshold(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The Huber threshold c of each sample's timestep (sd-scripts' ``huber_schedule``)."""
        train = self.config.training
        if train.huber_schedule == "constant":
            return torch.full(timesteps.shape, train.huber_c * train.huber_scale, device=timesteps.device)
        if train.huber_schedule == "exponential":
            rate = -math.log(train.huber_c) / self.noise_scheduler.config.num_train_timesteps
            return torch.exp(-rate * timesteps.float()) * train.huber_scale
        alphas = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1 - train.huber_c) / (1 + sigmas) ** 2 + train.huber_c

    def _elementwise(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.config.training.loss_type
        if kind == "l2":
            return F.mse_loss(prediction, target, reduction="none")
        if kind == "l1":
            return F.l1_loss(prediction, target, reduction="none")
        c = self.huber_threshold(timesteps).view(-1, *[1] * (prediction.ndim - 1))
        smooth = 2 * (torch.sqrt((prediction - target) ** 2 + c ** 2) - c)
        return c * smooth if kind == "huber" else smooth

    def loss(self, batch: dict[str, Any], generator: torch.Generator, timesteps: torch.Tensor | None = None,
             dropout: bool = True) -> torch.Tensor:
        """The mean (weighted) denoising loss of ``batch``; ``timesteps`` fixes the timesteps.

        ``dropout`` off (evaluation): captions as written, no caption or tag dropout, no shuffling.
        """
        train = self.config.training
        entries = self.entries(batch)
        draws = self.draws(batch, generator, entries)
        latents, mask = self.latents(batch, draws["latent"], entries)
        noise = draws["noise"].to(latents.dtype)
        timesteps = (draws["timesteps"] if timesteps is None else timesteps.to(self.device)).long()
        captions = self._captions(batch, draws, dropout)
        model_noise = noise + draws["perturbation"].to(latents.dtype) if "perturbation" in draws else noise
        noisy = self.noise_scheduler.add_noise(latents, model_noise, timesteps)
        hidden, pooled = self.encode_text(captions)
        extra = None
        if self.base.is_sdxl:
            extra = {"text_embeds": pooled.to(self.weight_dtype), "time_ids": draws["time_ids"].to(self.weight_dtype)}
        prediction = self.unet(noisy, timesteps, hidden.to(self.weight_dtype), added_cond_kwargs=extra,
                               return_dict=False)[0]
        target = noise if self.prediction_type == "epsilon" else \
            self.noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = self._elementwise(prediction.float(), target.float(), timesteps)
        if mask is not None:
            loss = loss * mask
        loss = loss.mean(dim=list(range(1, latents.ndim)))
        if train.snr_gamma is not None or train.debiased_estimation:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            if train.snr_gamma is not None:
                weights = torch.clamp(snr, max=train.snr_gamma)
                loss = loss * (weights / snr if self.prediction_type == "epsilon" else weights / (snr + 1))
            if train.debiased_estimation:
                snr = torch.clamp(snr, max=1000)  # at t = 0 the SNR is huge
                loss = loss * (1 / snr.sqrt() if self.prediction_type == "epsilon" else 1 / (snr + 1))
        return loss.mean()

    def evaluation_batch(self, dataset: Dataset, plan: BatchPlan, index: int) -> dict[str, Any]:
        """A one-image batch of record ``index``, center-cropped (evaluation and validation losses)."""
        record, bucket = dataset.records[index], plan.assignment[index]
        batch: dict[str, Any] = {"items": [index], "bucket": bucket, "captions": [record.caption],
                                 "paths": [record.path]}
        if not self.caches_latents:
            crop = plan_crop(record.size, bucket, random_crop=False, flip=False, rng=random.Random(0))
            batch.update(pixels=load_image(record.path, crop, bucket)[None], original_sizes=[crop.original_size],
                         crop_corners=[(crop.top, crop.left)])
            if self.masked:
                batch["masks"] = load_mask(record, crop, bucket)[None]
        return batch


def make_objective(base: BaseModel, config: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> Objective:
    """The objective of ``base``'s family: noise prediction for SD, flow matching for Flux.1 and SD3."""
    if base.is_flow:
        from .flow import FlowObjective

        return FlowObjective(base, config, device, weight_dtype)
    return Objective(base, config, device, weight_dtype)
