"""Training objectives: what noise goes onto the latents, and what the denoiser must predict from them.

A family picks its objective (`Family.objective`); the loop only calls it. Randomness comes from the
generator the loop passes, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr


class Objective(Protocol):
    prediction_type: str  # what the denoiser predicts, as its scheduler names it

    def timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor: ...

    def evaluation_timesteps(self, count: int, device: torch.device) -> torch.Tensor: ...

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...


@dataclass
class NoisePrediction:
    """Stable Diffusion's: noise added along the base's DDPM schedule at a uniformly drawn timestep, and
    the noise itself (epsilon) or the velocity (v-prediction, SD 2's 768 px models) as the target."""

    scheduler: DDPMScheduler
    snr_gamma: float = 0.0  # min-SNR weighting (0 = plain mean squared error)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        steps = self.scheduler.config.num_train_timesteps
        return torch.randint(0, steps, (count,), generator=generator, device=generator.device)

    def evaluation_timesteps(self, count: int, device: torch.device) -> torch.Tensor:
        """`count` fixed timesteps spread evenly over the schedule (each in the middle of its share), for a
        validation loss that weighs every noise level alike at every measurement."""
        steps = self.scheduler.config.num_train_timesteps
        return ((torch.arange(count, device=device) + 0.5) * steps / count).long()

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(prediction, target, timesteps, self.scheduler, self.snr_gamma)


@dataclass
class FlowMatching:
    """Rectified flow, as Flux is trained and as diffusers' Flux LoRA script trains it: the picture moves in a
    straight line to the noise, noisy = (1 - sigma) * latents + sigma * noise, at a sigma drawn uniformly from the
    base's own schedule (its training timesteps are sigma * 1000, shifted where its scheduler shifts them at
    training time), and the target is that line's velocity, noise - latents, with a plain mean squared error."""

    scheduler: FlowMatchEulerDiscreteScheduler
    prediction_type: str = "flow"

    def timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        schedule = self.scheduler.timesteps.to(generator.device)
        drawn = torch.rand(count, generator=generator, device=generator.device)
        return schedule[(drawn * len(schedule)).long()]

    def evaluation_timesteps(self, count: int, device: torch.device) -> torch.Tensor:
        """`count` fixed timesteps of the base's own schedule, spread evenly over it (each in the middle of its
        share), for a validation loss that weighs every noise level alike at every measurement."""
        schedule = self.scheduler.timesteps.to(device)
        return schedule[((torch.arange(count, device=device) + 0.5) * len(schedule) / count).long()]

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self._sigmas(timesteps, latents.ndim)
        return (1.0 - sigmas) * latents + sigmas * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction.float(), target.float())

    def _sigmas(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        sigmas = timesteps.float() / self.scheduler.config.num_train_timesteps
        return sigmas.view(-1, *[1] * (ndim - 1))


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    snr_gamma: float,
) -> torch.Tensor:
    """Mean squared error, optionally min-SNR-gamma weighted per image (Hang et al. 2023)."""
    if not snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weights).mean()
