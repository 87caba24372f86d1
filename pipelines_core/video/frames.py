"""The one check of a ComfyUI IMAGE batch, (frames, height, width, channels) floats in 0..1."""

from __future__ import annotations

from typing import Optional


def check_image_batch(frames, what: str = "images", channels: tuple = (3,), multiple_of: Optional[int] = None,
                      fix: str = "set Load Video's size to a multiple of 8", min_frames: int = 1) -> None:
    """Raise a one-line ValueError unless `frames` is an IMAGE batch of at least `min_frames` frames with `channels`
    channels (and, with `multiple_of`, a height and width that are multiples of it: the VAE's factor 8)."""
    import torch

    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"{what} must be a ComfyUI IMAGE batch (frames, height, width, 3), got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] not in channels or frames.shape[0] < min_frames:
        raise ValueError(f"{what} must be a ComfyUI IMAGE batch (frames, height, width, 3)"
                         + (f" with at least {min_frames} frame{'s' * (min_frames > 1)}" if min_frames else "")
                         + f", got {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    if multiple_of and (height % multiple_of or width % multiple_of):
        raise ValueError(f"frame size {width}x{height} is not a multiple of {multiple_of}; {fix}")
