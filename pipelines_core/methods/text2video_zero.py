"""Text2Video-Zero's motion-dynamics start (Khachatryan et al., ICCV 2023, §3.3.1).

`MotionStart` is the start the sampler calls (generating from noise, DDIM). One x_T for frame 0 is DDIM-denoised to t1 and on to t0; x_{t0} is copied to frames k >= 1, each
copy shifted by the global motion delta_k = lambda * k * (dx, dy); the copies are DDPM-noised from
t0 back to t1 with fresh noise. The caller then runs the pack's loop over the remaining timesteps
for all frames (frame 0 from its own x_{t1}).

t0 and t1 are the paper's indices counted from the end of a 50-step grid (defaults 44 and 47):
timesteps_50[-t-1], 881 and 941 with Stable Diffusion's schedule. For a run of N steps the start
uses the grid steps whose timesteps are nearest those values, i.e. the same fractions 0.881 and
0.941 of the noise schedule; with N = 50 that is exactly T2V-Zero's steps 2 and 5.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from ..flow.warp import motion_field, warp_latents_motion
from ..sampling.chunks import plan_chunks
from ..sampling.loop import Denoiser, denoise_loop
from ..progress import Progress
from ..sampling.starts import Begun, NoiseStart, StartContext

PAPER_STEPS = 50


def paper_timestep(scheduler, t: int, reference_steps: int = PAPER_STEPS) -> int:
    """T2V-Zero's index t as a timestep value: timesteps[-t-1] of a `reference_steps` grid of this scheduler."""
    if not 0 <= t < reference_steps:
        raise ValueError(f"motion t0/t1 must be in [0, {reference_steps}) (T2V-Zero: t0=44, t1=47), got {t}")
    reference = type(scheduler).from_config(scheduler.config)
    reference.set_timesteps(reference_steps)
    return int(reference.timesteps[-t - 1])


def nearest_step(timesteps: Tensor, value: int) -> int:
    """Index of the timestep nearest `value` (the noisier one on a tie)."""
    return int((timesteps.float().cpu() - value).abs().argmin())


def warp_first_frame(first: Tensor, frame_count: int, strength_x: float, strength_y: float) -> Tensor:
    """Frames 1..F-1 from frame 0's latent (1, C, h, w): frame k takes the content at x + k * delta."""
    field = motion_field(frame_count - 1, *first.shape[-2:], strength_x, strength_y, frame_ids=range(1, frame_count))
    return warp_latents_motion(first.expand(frame_count - 1, -1, -1, -1), field)


def ddpm_forward(x: Tensor, alpha_bar_from: Tensor, alpha_bar_to: Tensor, noise: Tensor) -> Tensor:
    """q(x_t1 | x_t0) = N(sqrt(a1 / a0) x_t0, (1 - a1 / a0) I) (DDPM marginal between two timesteps).

    T2V-Zero's code takes prod(alphas[t0:t1]) = a_{t1-1} / a_{t0-1}, one timestep early; the exact
    ratio is used here.
    """
    ratio = (alpha_bar_to / alpha_bar_from).to(x)
    return ratio.sqrt() * x + (1.0 - ratio).sqrt() * noise


def motion_dynamics_start(
    denoise_first: Denoiser,
    scheduler,
    first_noise: Tensor,
    frame_count: int,
    strength_x: float = 12.0,
    strength_y: float = 12.0,
    t0: int = 44,
    t1: int = 47,
    generator: Optional[torch.Generator] = None,
    shared_noise: bool = False,
    progress: Optional[Progress] = None,
) -> tuple[Tensor, Tensor]:
    """Latents of all frames at t1 and the timesteps still to run from there.

    denoise_first: the loop's denoiser (latents, StepState) -> eps, called with frame 0 only, (1, C, h, w);
    scheduler: a DDIM scheduler with set_timesteps done (the run's N steps); first_noise: x_T of frame
    0, (1, C, h, w), already scaled by init_noise_sigma; generator: for the fresh forward noise
    (shared_noise: one draw for every frame k >= 1). Strengths are in T2V-Zero's 512-pixel units.
    """
    if type(scheduler).__name__ != "DDIMScheduler":
        raise ValueError(f"motion dynamics needs the ddim scheduler (T2V-Zero's), not {type(scheduler).__name__}")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("motion dynamics: call scheduler.set_timesteps(steps) first")
    if not t0 < t1:
        raise ValueError(f"motion dynamics needs t0 < t1 (T2V-Zero: t0=44, t1=47), got t0={t0}, t1={t1}")
    if first_noise.ndim != 4 or first_noise.shape[0] != 1:
        raise ValueError(
            f"motion dynamics: first_noise must be frame 0's x_T (1, C, h, w), got {tuple(first_noise.shape)}"
        )
    timesteps = scheduler.timesteps
    step_t1 = nearest_step(timesteps, paper_timestep(scheduler, t1))
    step_t0 = max(nearest_step(timesteps, paper_timestep(scheduler, t0)), step_t1)

    # 1. Frame 0: DDIM from T to t1, then from t1 to t0 (the pack's loop, frame 0 alone)
    first_t1 = denoise_loop(denoise_first, first_noise, scheduler, "ddim", timesteps[:step_t1], progress=progress)
    first_t0 = denoise_loop(denoise_first, first_t1, scheduler, "ddim", timesteps[step_t1:step_t0], progress=progress,
                            first_position=step_t1)
    if frame_count == 1:
        return first_t1, timesteps[step_t1:]

    # 2. Frames k >= 1: x_t0 of frame 0 moved by k * delta, then DDPM-noised from t0 back to t1
    moved = warp_first_frame(first_t0, frame_count, strength_x, strength_y)
    shape = (1 if shared_noise else frame_count - 1, *moved.shape[1:])
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(moved.device, moved.dtype)
    alpha_bar = scheduler.alphas_cumprod
    others_t1 = ddpm_forward(moved, alpha_bar[int(timesteps[step_t0])], alpha_bar[int(timesteps[step_t1])],
                             noise.expand_as(moved))
    return torch.cat([first_t1, others_t1]), timesteps[step_t1:]


@dataclass(frozen=True)
class MotionStart(NoiseStart):
    """Text2Video-Zero's start for the sampler: noise for every frame, then frame 0 alone (with the run's prompts,
    control and processors) to t1 and t0, moved by (strength_x, strength_y) per frame (512-pixel units)."""

    strength_x: float = 12.0
    strength_y: float = 12.0

    def check(self, settings, model) -> None:
        super().check(settings, model)
        if settings.scheduler != "ddim":
            raise ValueError(f"motion dynamics needs the 'ddim' scheduler (Text2Video-Zero's), not {settings.scheduler!r}")

    def begin(self, context: StartContext) -> Begun:
        noise = super().begin(context).latents
        first = replace(context.denoiser, chunks=plan_chunks(1, 1, "none"))
        generator = torch.Generator("cpu").manual_seed(context.settings.seed + 1)
        latents, timesteps = motion_dynamics_start(first, context.scheduler, noise[:1], noise.shape[0], self.strength_x,
                                                   self.strength_y, generator=generator,
                                                   shared_noise=context.settings.noise == "shared")
        return Begun(latents, timesteps, first_position=len(context.timesteps) - len(timesteps))
