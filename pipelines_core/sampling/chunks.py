"""Frames in chunks: which frames share one UNet call, and how overlapping chunks are blended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..attention.rules import get_rule


@dataclass(frozen=True)
class Chunk:
    """Frames denoised in one model call: `frames` in batch order; outputs of `keep` positions are used,
    each scaled by its entry in `weights` (a kept frame's weights over all chunks sum to 1)."""

    frames: tuple
    keep: tuple
    weights: tuple = ()  # one per `keep` position; empty: every kept output counts fully (weight 1)


def window_starts(frame_count: int, chunk_size: int, chunk_overlap: int = 0) -> list[int]:
    """First frame of each chunk's own frames.

    Overlap 0: back-to-back chunks, the last one possibly shorter (the anchor chunks the sampler always
    had, kept as they were so that existing edits do not change). Overlap > 0: windows of `chunk_size`
    frames every `chunk_size - chunk_overlap` frames, the last one moved back to end at the last frame,
    so that no window is short (a short window would see fewer neighbours than the ones it blends with).
    """
    if chunk_overlap == 0:
        return list(range(0, frame_count, chunk_size))
    last = max(frame_count - chunk_size, 0)
    return list(range(0, last, chunk_size - chunk_overlap)) + [last]


def blend_weights(windows: Sequence[range], frame_count: int, chunk_overlap: int) -> list[tuple]:
    """Per window, the weight of each of its own frames in the blend of the windows' noise predictions.

    MultiDiffusion's per-step solution is the average of the windows' predictions. Averaging uniformly
    would switch a frame from a half-and-half mix to one window alone where an overlap ends, which is
    itself a small jump; and a window's edge frames are the ones with neighbours on one side only, so
    their predictions are the least informed. So each window weighs its frames by a trapezoid: rising
    linearly over its first `chunk_overlap + 1` frames, falling over its last, flat between; then each
    frame's weights are divided by their sum. With the regular stride two overlapping windows cross-fade
    linearly (weights k/(overlap+1) and 1 - k/(overlap+1)); a frame in one window only gets exactly 1.
    """
    ramp = chunk_overlap + 1
    profiles = [[min(p + 1, len(w) - p, ramp) / ramp for p in range(len(w))] for w in windows]
    totals = [0.0] * frame_count
    for window, profile in zip(windows, profiles):
        for frame, weight in zip(window, profile):
            totals[frame] += weight
    return [tuple(weight / totals[frame] for frame, weight in zip(window, profile))
            for window, profile in zip(windows, profiles)]


def plan_chunks(frame_count: int, chunk_size: int, rule, chunk_overlap: int = 0) -> list[Chunk]:
    """Split frames into chunks; the anchor (frame 0) and, when the rule reads it, the frame before a
    chunk join every later chunk as context, so rules see the frames they expect at fixed positions.

    With `chunk_overlap` > 0 the chunks are overlapping windows (seamless chunks, MultiDiffusion-style):
    a frame in several windows gets the weighted average of their predictions at every step, so no
    frame pair is split between two separately denoised chunks. `rule`: a cross-frame Rule or its name.
    """
    rule = get_rule(rule)
    windows = [range(start, min(start + chunk_size, frame_count))
               for start in window_starts(frame_count, chunk_size, chunk_overlap)]
    chunks = []
    for own, weights in zip(windows, blend_weights(windows, frame_count, chunk_overlap)):
        start = own.start
        context = []
        if start > 0 and rule.needs_anchor:
            context.append(0)
        if start > 0 and rule.needs_previous and start - 1 not in context:
            context.append(start - 1)
        frames = tuple(context) + tuple(own)
        chunks.append(Chunk(frames, tuple(range(len(context), len(frames))), weights))
    return chunks


def batched(chunks: Sequence[Chunk], batch: int) -> list[tuple]:
    """The chunks as they go to the UNet: runs of up to `batch` consecutive chunks of equal frame count share
    one call (a call's rows must split into equal groups for the cross-frame rule); order is kept."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1 chunk per call (got {batch})")
    calls = []
    for chunk in chunks:
        if calls and len(calls[-1]) < batch and len(calls[-1][0].frames) == len(chunk.frames):
            calls[-1].append(chunk)
        else:
            calls.append([chunk])
    return [tuple(call) for call in calls]
