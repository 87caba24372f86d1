"""Masked editing: only where the mask is 1 does the edit change the clip; elsewhere the source is kept.

After every scheduler step the latents are blended with the source brought to the level the step moved to:
    x <- m * x + (1 - m) * source_at(t_next)
where source_at is the clean source latent noised with the run's own noise (an SDEdit or LATENT start:
`scheduler.add_noise(clean, noise, t_next)`), or the inversion's latent at t_next (an inversion start), and
after the last step the clean source itself. This is the latent blend diffusers' StableDiffusionInpaintPipeline
applies for a 4-channel UNet (and FateZero's LatentBlend with a user mask), written as an after_step hook so the
one denoising loop stays the only one.

Masks follow ComfyUI: a MASK is float (F, H, W), (1, H, W) or (H, W) in 0..1, 1 = edit; a LATENT's
"noise_mask" is (F, 1, H, W) or (1, 1, H, W). Any size is accepted and resized to the latent grid with
bilinear interpolation, as ComfyUI's `reshape_mask` does for a noise mask; soft values blend partially.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .hooks import Hook, StepState
from .schedulers import add_noise

SourceAt = Callable[[int], Tensor]  # index of the step just taken -> source latent at the level it moved to


def mask_on_latent_grid(mask: Tensor, frame_count: int, latent_size: tuple, name: str = "mask") -> Tensor:
    """A ComfyUI MASK (or a LATENT's noise_mask) as (frame_count, 1, h, w) float32 on the latent grid."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (ComfyUI MASK), got {type(mask).__name__}")
    m = mask.detach().float().cpu()
    if m.ndim == 2:  # (H, W): one mask for every frame
        m = m[None]
    elif m.ndim == 4 and m.shape[1] == 1:  # a noise_mask carries a channel axis
        m = m[:, 0]
    if m.ndim != 3 or min(m.shape) < 1:
        raise ValueError(f"{name} must be (frames, height, width) or (height, width), got shape {tuple(mask.shape)}")
    if m.shape[0] not in (1, frame_count):
        raise ValueError(f"{name} has {m.shape[0]} frames but the clip has {frame_count}: "
                         "give one mask per frame, or a single mask for all frames")
    if bool(m.isnan().any()) or float(m.min()) < 0.0 or float(m.max()) > 1.0:
        raise ValueError(f"{name} values must lie in 0..1 (1 = edit, 0 = keep), got "
                         f"{float(m.min()):g}..{float(m.max()):g}")
    if tuple(m.shape[-2:]) != tuple(latent_size):
        # ComfyUI's reshape_mask resizes noise masks the same way, so a mask means here what it means in KSampler.
        m = torch.nn.functional.interpolate(m[:, None], size=tuple(latent_size), mode="bilinear")[:, 0]
    return m[:, None].expand(frame_count, 1, *latent_size).contiguous()


def edit_mask(mask: Optional[Tensor], noise_mask: Optional[Tensor], frame_count: int,
              latent_size: tuple) -> Optional[Tensor]:
    """The mask the blend uses (F, 1, h, w), or None for no mask. With both a MASK and a LATENT's noise_mask,
    a cell is edited only as far as both allow (their product): each input limits the edit."""
    found = []
    if mask is not None:
        found.append(mask_on_latent_grid(mask, frame_count, latent_size, "mask"))
    if noise_mask is not None:
        found.append(mask_on_latent_grid(noise_mask, frame_count, latent_size, "the latent's noise_mask"))
    if not found:
        return None
    return found[0] if len(found) == 1 else found[0] * found[1]


def noised_source(scheduler, clean: Tensor, noise: Tensor, timesteps: Tensor) -> SourceAt:
    """SDEdit / LATENT start: the clean latent noised to the next step's level with the run's own noise.

    Uses the run's scheduler after its step, as diffusers' inpaint pipeline does: DDIM reads alphas_cumprod at
    the timestep; Euler and DPM++ read the sigma at their (already advanced) step index and their own
    x0/noise convention (VE: x0 + sigma * noise; VP: alpha * x0 + sigma * noise)."""

    def at(index: int) -> Tensor:
        if index + 1 >= len(timesteps):
            return clean
        t_next = timesteps[index + 1:index + 2].repeat(clean.shape[0])
        return add_noise(scheduler, clean, noise, t_next)

    return at


def inverted_source(latents: dict, timesteps: Tensor) -> SourceAt:
    """Inversion start: the inversion's own latent at the next timestep (it is what sampling from it would
    reproduce), and its clean latent (key 0) after the last step."""

    def at(index: int) -> Tensor:
        key = int(timesteps[index + 1]) if index + 1 < len(timesteps) else 0
        return latents[key]

    return at


def masked_blend_hook(mask: Tensor, source_at: SourceAt) -> Hook:
    """after_step: x <- m * x + (1 - m) * source_at(t_next). Put it last so nothing moves the kept region again."""

    def hook(state: StepState) -> Tensor:
        x = state.latents
        m = mask.to(x.device, x.dtype)
        source = source_at(state.index).to(x.device, x.dtype)
        # Same operand order as diffusers' inpaint pipeline, so the oracle comparison is exact to rounding.
        return (1 - m) * source + m * x

    return hook
