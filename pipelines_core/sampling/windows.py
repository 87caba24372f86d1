"""Step windows: which steps of a run a method acts on, as fractions of the run, with one convention.

A window (start, end) is active at step `index` (0-based) of a run of `total` steps when
start <= index / total < end: (0, 0) never fires, (0, 1) always does, (1, 1) is off, and (0, f) is
"the first f of the steps" (PnP's and TokenFlow's injection fractions, Pix2Video's guidance). `total`
is the number of steps the run takes (after SDEdit's strength).

The ControlNet's start/end is the one exception, on purpose: it follows diffusers' `controlnet_keep`
(the whole step [index, index + 1] / total inside [start, end]) so that our ControlNet equals
diffusers' pipelines (`models.controlnet.ControlUnit.active`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepWindow:
    start: float = 0.0
    end: float = 1.0
    name: str = field(default="window", compare=False)  # what the window is for, in messages

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end:
            raise ValueError(f"{self.name}: window ({self.start}, {self.end}) must satisfy 0 <= start <= end "
                             "(fractions of the steps)")

    def active(self, index, total: int) -> bool:
        """start <= index / total < end; False for a call outside any step (index None)."""
        return index is not None and total > 0 and self.start <= index / total < self.end

    def of(self, total: int) -> "RunWindow":
        """This window over a run of `total` steps, for `step in window`."""
        return RunWindow(self, total)


@dataclass(frozen=True)
class RunWindow:
    window: StepWindow
    total: int

    def __contains__(self, step) -> bool:
        return self.window.active(step, self.total)


def first(fraction: float, name: str = "window") -> StepWindow:
    """The first `fraction` of the steps: (0, fraction)."""
    return StepWindow(0.0, fraction, name)
