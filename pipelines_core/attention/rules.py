"""Cross-frame attention rules: which frames' keys and values each frame's self-attention reads.

A rule is a pure function from the number of frames in a batch to an index tensor of shape
(frames, k): row i lists the k frames whose keys/values frame i attends to. Positions are batch
positions; the sampler arranges each chunk so that position 0 is the anchor (first) frame and the
frame before a chunk sits right before it, which is what `first` and `previous` read.
"""

from __future__ import annotations

from typing import Callable

import torch

Rule = Callable[[int], torch.Tensor]


def own_frame(frames: int) -> torch.Tensor:
    """Plain per-frame self-attention (the image model as trained)."""
    return torch.arange(frames)[:, None]


def first_frame(frames: int) -> torch.Tensor:
    """Every frame attends to frame 0 (Text2Video-Zero's cross-frame attention)."""
    return torch.zeros(frames, 1, dtype=torch.long)


def previous_frame(frames: int) -> torch.Tensor:
    """Every frame attends to the frame before it; frame 0 to itself."""
    return (torch.arange(frames) - 1).clamp(min=0)[:, None]


def first_and_previous(frames: int) -> torch.Tensor:
    """Sparse-causal attention (Tune-A-Video, FateZero): keys of [frame 0, frame i-1].

    Frame 0 reads [0, 0], which is exactly plain attention (duplicated keys leave softmax unchanged).
    """
    return torch.cat([first_frame(frames), previous_frame(frames)], dim=1)


def all_frames(frames: int) -> torch.Tensor:
    """Every frame attends to every frame (ControlVideo, vid2vid-zero, FLATTEN's dense attention)."""
    return torch.arange(frames).expand(frames, frames).clone()


RULES: dict[str, Rule] = {
    "none": own_frame,
    "first": first_frame,
    "previous": previous_frame,
    "first+previous": first_and_previous,
    "all": all_frames,
}

# What a rule needs the sampler to keep in every chunk besides the chunk's own frames.
NEEDS_ANCHOR = {"first", "first+previous", "all"}
NEEDS_PREVIOUS = {"previous", "first+previous"}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown cross-frame attention rule {name!r}; choose one of {', '.join(RULES)}") from None
