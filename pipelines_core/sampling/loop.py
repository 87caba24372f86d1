"""The one denoising loop of the pack, in the spirit of k-diffusion's samplers.

It takes a model callable, latents, a scheduler and its timesteps, and a progress callback. A method
changes it only through attention processors installed on the UNet for the run and through hooks at
three named points of every step (`Hooks`): before the model call, on the clean estimate x0, and after
the scheduler step. Every hook gets the step's `StepState`, which carries the run's scheduler and the
step's position in its tables, and returns the tensor the loop goes on with.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from .hooks import Hooks, StepState, fold
from ..progress import Progress, or_silent
from .schedulers import eps_from_x0, predicted_x0

Denoiser = Callable[[torch.Tensor, StepState], torch.Tensor]  # (model input, step) -> guided eps


def denoise_loop(
    denoise: Denoiser,
    latents: torch.Tensor,
    scheduler,
    scheduler_name: str,
    timesteps: torch.Tensor,
    hooks: Hooks = Hooks(),
    progress: Optional[Progress] = None,
    first_position: Optional[int] = None,
) -> torch.Tensor:
    """Run `scheduler` over `timesteps` from `latents`.

    `first_position`: where timesteps[0] stands in the scheduler's tables (default: the scheduler's begin
    index, which SDEdit's start sets, else 0); a start that runs a slice of the grid (Text2Video-Zero's)
    says where its slice begins.
    """
    progress = or_silent(progress)
    total = len(timesteps)
    if first_position is None:
        first_position = getattr(scheduler, "begin_index", None) or 0
    values = [int(v) for v in timesteps.tolist()]  # one read of the device's timesteps, not one per UNet call
    for i, t in enumerate(timesteps):
        position = first_position + i  # where Euler's sigma table stands at this step
        state = StepState(i, t, total, latents, scheduler=scheduler, position=position, t=values[i])
        latents = fold(hooks.before_model, state, "latents")
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        eps = denoise(model_input, replace(state, latents=latents))  # flow matching scales nothing
        if hooks.on_x0:
            x0 = predicted_x0(scheduler_name, scheduler, latents, eps, t, position)
            x0 = fold(hooks.on_x0, replace(state, latents=latents, eps=eps, x0=x0), "x0")
            eps = eps_from_x0(scheduler_name, scheduler, latents, x0, t, position)
        latents = scheduler.step(eps, t, latents).prev_sample
        latents = fold(hooks.after_step, replace(state, latents=latents, eps=eps), "latents")
        progress(i + 1, total)
    return latents
