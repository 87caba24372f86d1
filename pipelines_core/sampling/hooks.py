"""Sampler hooks: named points of every denoising step where a method changes what the loop does.

A hook is a plain callable `hook(state) -> Tensor`; its effect is its return value, which the loop goes
on with. Hooks at one point are folded in the order given, except that hooks marked `last(...)` run
after all others (in their own order): a hook that must see every other hook's result (keeping the
model's eps after x̂0 edits, a masked blend that nothing may move) says so in data, where it is made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class StepState:
    """What a hook sees: the step, the current latents, (at on_x0) the model's estimates, and the run's
    scheduler with this step's position in its tables (`scheduler.timesteps[position]` is `timestep`;
    Euler's `sigmas[position]` its sigma), so a hook never builds a twin scheduler or looks a step up by value."""

    index: int  # 0-based step of this run
    timestep: torch.Tensor
    total: int  # steps this run takes
    latents: torch.Tensor
    eps: Optional[torch.Tensor] = None
    x0: Optional[torch.Tensor] = None
    scheduler: Any = None  # the run's diffusers scheduler, timesteps set (None outside a sampling loop)
    position: Optional[int] = None  # index of this step in the scheduler's timestep/sigma tables
    t: Optional[int] = None  # the timestep as a Python int, read once per run: no step waits on the device to learn it

    @property
    def timestep_value(self) -> int:
        """The timestep as a Python int (`t`; a StepState made by hand without it reads the tensor)."""
        return self.t if self.t is not None else int(self.timestep)


Hook = Callable[[StepState], torch.Tensor]


class LastHook:
    """A hook that runs after every unmarked hook at its point (see `last`)."""

    def __init__(self, hook: Hook):
        self.hook = hook

    def __call__(self, state: StepState) -> torch.Tensor:
        return self.hook(state)


def last(hook: Hook) -> LastHook:
    """Mark `hook` to run after all other hooks at its point, wherever it is added."""
    return hook if isinstance(hook, LastHook) else LastHook(hook)


def in_order(hooks: Sequence[Hook]) -> list:
    """The hooks as they run: unmarked ones in the order given, then the `last` ones in the order given."""
    return [h for h in hooks if not isinstance(h, LastHook)] + [h for h in hooks if isinstance(h, LastHook)]


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
    for hook in in_order(hooks):
        state = replace(state, **{attr: hook(state)})
    return getattr(state, attr)
