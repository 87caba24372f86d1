"""The sampler's settings: every widget of the Cross-Frame Sampler as one frozen value, checked before any step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..attention.rules import get_rule
from .schedulers import SCHEDULERS

NOISE_MODES = ("per_frame", "shared")
ATTENTION_LAYERS = {"all": "", "decoder": "up_blocks."}  # processor-name prefix the cross-frame rule applies to


@dataclass(frozen=True)
class SamplerSettings:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.5
    scheduler: str = "ddim"
    strength: float = 0.6  # used when starting from images or a latent (SDEdit): fraction of the schedule re-run
    noise: str = "per_frame"  # "per_frame": frame f uses seed + f; "shared": every frame the same noise
    attention: str = "first+previous"
    attention_layers: str = "all"  # "all" self-attention layers, or only the "decoder" (up blocks; Rerender)
    chunk_size: int = 8  # frames denoised together; the anchor frame joins every chunk
    chunk_overlap: int = 0  # > 0: overlapping windows whose noise predictions are blended (seamless chunks)

    def check(self, frame_count: int, from_images: bool) -> None:
        """Every setting checked before the first step; messages say what to change."""
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"unknown noise mode {self.noise!r}; choose one of {', '.join(NOISE_MODES)}")
        get_rule(self.attention)
        if self.attention_layers not in ATTENTION_LAYERS:
            raise ValueError(f"unknown attention_layers {self.attention_layers!r}; choose one of {', '.join(ATTENTION_LAYERS)}")
        if not math.isfinite(self.cfg):  # ComfyUI's own validation lets NaN through (every comparison is False)
            raise ValueError(f"cfg must be a finite number (got {self.cfg})")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {self.chunk_size})")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(f"chunk_overlap must be from 0 to chunk_size - 1 = {self.chunk_size - 1} "
                             f"(got {self.chunk_overlap}); lower chunk_overlap or raise chunk_size")
        if frame_count < 1:
            raise ValueError("no frames to sample")
        if from_images:
            if not 0.0 < self.strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1] (got {self.strength})")
            if int(self.steps * self.strength) < 1:
                raise ValueError(
                    f"strength {self.strength} with {self.steps} steps runs no step; raise strength or steps"
                )
