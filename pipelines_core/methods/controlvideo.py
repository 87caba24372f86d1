"""ControlVideo's interleaved-frame smoother (Zhang et al. 2023) as an on_x0 hook.

At two consecutive steps the clean estimate x̂0 is decoded, every other frame is replaced by an
interpolation of its two neighbours (odd frames on the first step, even frames on the second), and
the result is encoded back. ControlVideo then recomputes x_{t-1} with DDIM from the smoothed x̂0 and
the model's eps; in this pack add `rerender.keep_model_eps_hook()` (it runs last) to get that step
(without it the loop re-derives eps from the new x̂0, a much smaller move).

Where it departs from ControlVideo's code (pipeline_controlvideo.py, 4eac95f):
* it interpolates with optical flow (`flow_interpolator`: DIS flow both ways between the decoded
  neighbours, then `flow.interpolate_midframe`) instead of RIFE, which cannot be downloaded here;
* the end frames are never replaced: ControlVideo replaces frame 0 (and the last frame of an odd
  clip) by an interpolation between itself and its one neighbour, a half-step shift in time;
* only the replaced frames are re-encoded; the others keep their x̂0 exactly instead of going through
  a VAE round trip.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..flow.warp import image_to_nchw, interpolate_midframe
from ..flow.estimate import estimate_pair_flow
from ..sampling.hooks import Hook, StepState

Interpolator = Callable[[Tensor, Tensor], Tensor]  # (previous IMAGE (N,H,W,3), next IMAGE) -> the frames between

# ControlVideo smooths where num_steps - i is in {20, 19}: steps 30 and 31 of 50, i.e. from 0.6 of the run.
CONTROLVIDEO_AT = 0.6


def smoothing_steps(total: int, at: float = CONTROLVIDEO_AT) -> tuple[int, int]:
    """The two consecutive step indices the smoother acts on: round(at * total) and the next one
    (30 and 31 of 50, ControlVideo's default; 12 and 13 of 20), kept inside the run."""
    first = max(min(round(at * total), total - 2), 0)
    return first, first + 1


def replaced_frames(frame_count: int, parity: int) -> list[int]:
    """Frames of the given parity (1: odd, 0: even) that have a neighbour on both sides."""
    return [k for k in range(parity, frame_count, 2) if 0 < k < frame_count - 1]


def average_interpolator(previous: Tensor, following: Tensor) -> Tensor:
    """The plain mean of the two neighbours (no motion model)."""
    return (previous + following) / 2


def flow_interpolator(method: str = "dis", raft_weights=None) -> Interpolator:
    """Middle frames from optical flow estimated both ways between the two neighbours (pixel space)."""

    def interpolate(previous: Tensor, following: Tensor) -> Tensor:
        count = previous.shape[0]
        both = estimate_pair_flow(torch.cat([previous, following]), torch.cat([following, previous]), method,
                                  raft_weights)
        to_next, to_previous = both.split(count)
        middle = interpolate_midframe(image_to_nchw(previous).float(), image_to_nchw(following).float(),
                                      to_next.float(), to_previous.float())
        return middle.permute(0, 2, 3, 1).clamp(0.0, 1.0).to(previous.dtype)

    return interpolate


def smooth_frames(x0: Tensor, parity: int, decode: Callable[[Tensor], Tensor], encode: Callable[[Tensor], Tensor],
                  interpolate: Interpolator) -> Tensor:
    """x̂0 with the frames of `parity` replaced by encode(interpolate(decoded neighbours))."""
    targets = replaced_frames(x0.shape[0], parity)
    if not targets:
        return x0
    neighbours = sorted({k - 1 for k in targets} | {k + 1 for k in targets})
    decoded = dict(zip(neighbours, decode(x0[neighbours])))
    previous = torch.stack([decoded[k - 1] for k in targets])
    following = torch.stack([decoded[k + 1] for k in targets])
    smoothed = x0.clone()
    smoothed[targets] = encode(interpolate(previous, following)).to(x0.device, x0.dtype)
    return smoothed


def interleaved_smoother_hook(
    decode: Callable[[Tensor], Tensor],
    encode: Callable[[Tensor], Tensor],
    steps: Optional[Sequence[int]] = None,
    interpolate: Optional[Interpolator] = None,
    at: float = CONTROLVIDEO_AT,
) -> Hook:
    """on_x0: ControlVideo's interleaved-frame smoother.

    decode: scaled latents -> IMAGE (F, H, W, 3); encode: IMAGE -> scaled latents (e.g. wrappers of
    models.decode_latents / encode_frames). steps: the two step indices (odd frames are replaced on the
    first, even frames on the second); None = `smoothing_steps(total, at)`, ControlVideo's 30 and 31
    of 50 scaled to the run. interpolate: default `flow_interpolator()` (DIS).
    """
    if steps is not None and len(steps) != 2:
        raise ValueError(f"smoother steps must be two step indices, got {tuple(steps)}")
    interpolate = interpolate or flow_interpolator()

    def hook(state: StepState) -> Tensor:
        chosen = tuple(steps) if steps is not None else smoothing_steps(state.total, at)
        if state.index not in chosen:
            return state.x0
        parity = 1 if state.index == chosen[0] else 0
        return smooth_frames(state.x0, parity, decode, encode, interpolate)

    return hook
