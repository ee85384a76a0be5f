"""The flow-matching objective of Flux.1 and SD3/SD3.5 (rectified flow).

A latent ``x0`` and noise ``ε`` are mixed at a noise level ``σ`` in ``(0, 1]`` as
``x_σ = (1 − σ)·x0 + σ·ε``, and the transformer's prediction is regressed onto the velocity
``ε − x0``. As in diffusers' DreamBooth LoRA scripts for Flux and SD3:

- ``σ`` is drawn by ``weighting_scheme`` — uniform (``none``, ``cosmap``, ``sigma_sqrt``),
  logit-normal (``logit_normal``: ``sigmoid(N(logit_mean, logit_std))``) or ``mode`` (with
  ``mode_scale``) — and looked up in the base model's flow-matching schedule, which applies its
  ``shift`` (SD3's 3.0; Flux.1's schedule shifts per resolution at inference only, so training
  uses the unshifted levels). ``cosmap`` and ``sigma_sqrt`` also weight the loss;
  ``auto`` is ``none`` for Flux.1 and ``logit_normal`` for SD3, the scripts' defaults.
- Flux.1's transformer takes 2×2-packed latents with their position ids, the T5 hidden states
  with (zero) text ids, the pooled CLIP-L embedding, the timestep as ``σ`` and, for dev, the
  guidance input (``guidance_scale``).
- SD3's takes the latents as they are, the joint text states (CLIP-L and CLIP-G penultimate states
  side by side, zero-padded to T5's width, then T5's states), the two pooled CLIP embeddings and
  the timestep ``1000·σ``.

Text states come from the pipeline's own ``encode_prompt`` so training sees exactly what
generation feeds the transformer; they are cached like SD's when the text encoders are frozen.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .objective import Objective

#: The loss-weighting / timestep-sampling schemes of diffusers' training scripts.
WEIGHTING_SCHEMES = ("auto", "none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
#: The maximum T5 sequence length each family's pipeline uses (capped by the tokenizer's own maximum).
MAX_SEQUENCE_LENGTH = {"flux": 512, "sd3": 256}


class FlowObjective(Objective):
    """:class:`~.objective.Objective` for the flow-matching transformers (see the module docstring)."""

    def _set_up_schedule(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        train = self.config.training
        refused = [name for name, on in (("snr_gamma", train.snr_gamma is not None),
                                         ("debiased_estimation", train.debiased_estimation),
                                         ("prediction_type", train.prediction_type != "auto")) if on]
        if refused:
            raise InvalidArgumentError(f"{', '.join(refused)} {'applies' if len(refused) == 1 else 'apply'} to noise-"
                                       f"prediction models; {self.base.architecture} is trained by flow matching",
                                       "Remove it (weighting_scheme sets how flow-matching timesteps are weighted)")
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.base.scheduler.config)
        self.prediction_type = "flow"
        scheme = train.weighting_scheme
        self.weighting_scheme = ("none" if self.base.family == "flux" else "logit_normal") if scheme == "auto" else scheme

    @property
    def num_train_timesteps(self) -> int:
        """Timesteps of the schedule (1000): a timestep ``t`` is noise level ``t / 1000``."""
        return int(self.noise_scheduler.config.num_train_timesteps)

    def _draw_timesteps(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps ``1000·σ`` (floats) drawn by the weighting scheme from the schedule's noise levels."""
        train = self.config.training
        if self.weighting_scheme == "logit_normal":
            u = torch.sigmoid(torch.normal(train.logit_mean, train.logit_std, (size,), generator=generator))
        else:
            u = torch.rand(size, generator=generator)
            if self.weighting_scheme == "mode":
                u = 1 - u - train.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.noise_scheduler.timesteps[indices].float()

    def sigmas(self, timesteps: torch.Tensor, fixed: bool) -> torch.Tensor:
        """Noise levels of ``timesteps``; ``fixed`` ones (evaluation: whole numbers in ``[0, 1000]``) go through
        the schedule's shift like the drawn ones did."""
        sigmas = timesteps.float() / self.num_train_timesteps
        config = self.noise_scheduler.config
        if fixed and not config.get("use_dynamic_shifting"):
            shift = float(config.shift)
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        return sigmas

    def huber_threshold(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sd-scripts' Huber schedules, with the flow's noise-to-signal ratio ``σ / (1 − σ)`` for ``snr``."""
        train = self.config.training
        if train.huber_schedule != "snr":
            return super().huber_threshold(timesteps)
        sigmas = (timesteps.float() / self.num_train_timesteps).clamp(max=1 - 1e-4)
        return (1 - train.huber_c) / (1 + sigmas / (1 - sigmas)) ** 2 + train.huber_c

    # --- text ------------------------------------------------------------------------------------------------

    def _pipeline(self):
        """A pipeline over the live text encoders (for its ``encode_prompt``), without transformer and VAE."""
        return self.base.pipeline(unet=None, text_encoders=self.text_encoders)

    def _run_text_encoders(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        pipe = self._pipeline()
        length = min(MAX_SEQUENCE_LENGTH[self.base.family], int(self.base.tokenizers[-1].model_max_length))
        if self.base.family == "flux":
            hidden, pooled, _ = pipe.encode_prompt(captions, None, device=self.device, max_sequence_length=length)
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=self.device,
                                                      do_classifier_free_guidance=False, max_sequence_length=length)
        return hidden, pooled

    # --- the loss --------------------------------------------------------------------------------------------

    def _predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity prediction, in the latents' layout."""
        dtype = self.weight_dtype
        hidden, pooled = hidden.to(dtype), pooled.to(dtype)
        if self.base.family != "flux":
            return self.unet(hidden_states=noisy, timestep=sigmas * self.num_train_timesteps,
                             encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=dtype)
        config = self._denoiser_config()
        guidance = torch.full((batch,), self.config.training.guidance_scale, device=noisy.device, dtype=torch.float32) \
            if config.get("guidance_embeds") else None
        prediction = self.unet(hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
                               img_ids=image_ids, return_dict=False)[0]
        # FluxPipeline._unpack_latents takes pixel sizes and the VAE's scale factor
        return FluxPipeline._unpack_latents(prediction, height * self.vae_scale_factor, width * self.vae_scale_factor,
                                            self.vae_scale_factor)

    def _denoiser_config(self) -> Any:
        return self.base.denoiser.config

    def loss(self, batch: dict[str, Any], generator: torch.Generator, timesteps: torch.Tensor | None = None,
             dropout: bool = True) -> torch.Tensor:
        """The mean (weighted) flow-matching loss of ``batch``; ``timesteps`` (0–1000) fixes the noise levels."""
        entries = self.entries(batch)
        draws = self.draws(batch, generator, entries)
        latents, mask = self.latents(batch, draws["latent"], entries)
        noise = draws["noise"].to(latents.dtype)
        fixed = timesteps is not None
        steps = draws["timesteps"] if timesteps is None else timesteps.to(self.device)
        sigmas = self.sigmas(steps, fixed).to(self.device)
        captions = self._captions(batch, draws, dropout)
        model_noise = noise + draws["perturbation"].to(latents.dtype) if "perturbation" in draws else noise
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * model_noise
        hidden, pooled = self.encode_text(captions)
        prediction = self._predict(noisy, sigmas, hidden, pooled)
        target = noise - latents
        loss = self._elementwise(prediction.float(), target.float(), sigmas * self.num_train_timesteps)
        if mask is not None:
            loss = loss * mask
        loss = loss.mean(dim=list(range(1, latents.ndim)))
        if self.weighting_scheme == "sigma_sqrt":
            loss = loss * sigmas.float() ** -2.0
        elif self.weighting_scheme == "cosmap":
            loss = loss * 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
        return loss.mean()
