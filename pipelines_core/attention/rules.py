"""Cross-frame attention rules: which frames' keys and values each frame's self-attention reads.

A rule is a value: called with the number of frames in a batch it gives an index tensor of shape
(frames, k): row i lists the k frames whose keys/values frame i attends to. Positions are batch
positions; a rule says which context it reads besides a chunk's own frames (`needs_anchor`: the first
frame at position 0; `needs_previous`: the frame before the chunk right before it), and the sampler's
chunk planner puts exactly those frames into every later chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch


@dataclass(frozen=True)
class Rule:
    name: str
    index: Callable[[int], torch.Tensor]  # frames -> (frames, k) batch positions
    needs_anchor: bool = False
    needs_previous: bool = False

    def __call__(self, frames: int) -> torch.Tensor:
        return self.index(frames)


def _own(frames: int) -> torch.Tensor:
    return torch.arange(frames)[:, None]


def _first(frames: int) -> torch.Tensor:
    return torch.zeros(frames, 1, dtype=torch.long)


def _previous(frames: int) -> torch.Tensor:
    return (torch.arange(frames) - 1).clamp(min=0)[:, None]


def _first_and_previous(frames: int) -> torch.Tensor:
    # Frame 0 reads [0, 0], which is exactly plain attention (duplicated keys leave softmax unchanged).
    return torch.cat([_first(frames), _previous(frames)], dim=1)


def _all(frames: int) -> torch.Tensor:
    return torch.arange(frames).expand(frames, frames).clone()


# Plain per-frame self-attention (the image model as trained).
own_frame = Rule("none", _own)
# Every frame attends to frame 0 (Text2Video-Zero's cross-frame attention).
first_frame = Rule("first", _first, needs_anchor=True)
# Every frame attends to the frame before it; frame 0 to itself.
previous_frame = Rule("previous", _previous, needs_previous=True)
# Sparse-causal attention (Tune-A-Video, FateZero): keys of [frame 0, frame i-1].
first_and_previous = Rule("first+previous", _first_and_previous, needs_anchor=True, needs_previous=True)
# Every frame attends to every frame (ControlVideo, vid2vid-zero, FLATTEN's dense attention).
all_frames = Rule("all", _all, needs_anchor=True)

RULES: dict[str, Rule] = {rule.name: rule for rule in (own_frame, first_frame, previous_frame, first_and_previous,
                                                         all_frames)}


@lru_cache(maxsize=256)
def placed_index(rule: Rule, frames: int, device: torch.device) -> torch.Tensor:
    """`rule(frames)` on `device`, made once: every attention call of a run asks for the same few tables, and
    building and copying one per call would cost a host-to-device copy each time. Made outside inference mode:
    the table outlives the call that made it, and an inference tensor cannot be saved for backward, as null-text
    inversion's autograd under ComfyUI's inference_mode must do with it."""
    with torch.inference_mode(False):
        return rule(frames).to(device)


def get_rule(name) -> Rule:
    """The rule named `name` (a Rule is returned as it is)."""
    if isinstance(name, Rule):
        return name
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown cross-frame attention rule {name!r}; choose one of {', '.join(RULES)}") from None
