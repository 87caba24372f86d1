"""Sampler hooks: named points of every denoising step where a method changes what the loop does.

A hook is a plain callable `hook(state) -> Tensor`; its effect is its return value, which the loop goes
on with. Hooks at one point are folded in order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class StepState:
    """What a hook sees: the step, the current latents, and (at on_x0) the model's estimates."""

    index: int
    timestep: torch.Tensor
    total: int
    latents: torch.Tensor
    eps: Optional[torch.Tensor] = None
    x0: Optional[torch.Tensor] = None


Hook = Callable[[StepState], torch.Tensor]


@dataclass(frozen=True)
class Hooks:
    before_model: Sequence[Hook] = ()  # -> latents fed to the model
    on_x0: Sequence[Hook] = ()  # -> clean estimate the step moves toward
    after_step: Sequence[Hook] = ()  # -> latents after the scheduler step

    def __add__(self, other: "Hooks") -> "Hooks":
        return Hooks(
            tuple(self.before_model) + tuple(other.before_model),
            tuple(self.on_x0) + tuple(other.on_x0),
            tuple(self.after_step) + tuple(other.after_step),
        )


def fold(hooks: Sequence[Hook], state: StepState, attr: str) -> torch.Tensor:
    for hook in hooks:
        state = replace(state, **{attr: hook(state)})
    return getattr(state, attr)
