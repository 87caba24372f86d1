"""Temporal guidance: the flow-driven hooks of Rerender-A-Video, ControlVideo and Text2Video-Zero as
one declarative value (the VE_TEMPORAL socket) and the recipe that applies it around the sampler.

  * x̂0 warp fusion (Rerender's shape-aware fusion) and AdaIN to frame 0's colours: on_x0 hooks;
  * ControlVideo's interleaved-frame smoother: an on_x0 hook that decodes, interpolates, re-encodes;
  * the model's noise is kept when x̂0 changes (`keep_model_eps_hook`), as those methods step;
  * Rerender's pixel-aware fusion: a second pass re-noised toward flow-fused pixel targets;
  * Text2Video-Zero's motion dynamics: a start (frame 0 denoised to t0, translated, re-noised to t1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..flow.warp import FlowField
from ..models.model import VEModel, decode_latents, encode_frames
from ..sampling.hooks import Hooks
from ..sampling.sampler import edit_video, resolve_start
from ..sampling.settings import SamplerSettings
from ..sampling.windows import StepWindow
from .controlvideo import interleaved_smoother_hook
from .rerender import (
    KEEPS_MODEL_EPS, adain_hook, keep_model_eps_hook, latent_renoise_mask, pixel_fusion_targets, renoise_blend_hook,
    target_latents, x0_warp_fusion_hook,
)
from .text2video_zero import MotionStart

Window = Optional[tuple]  # (start, end) as fractions of the run, or None = off


@dataclass(frozen=True, eq=False)
class TemporalGuidance:
    flow: Optional[FlowField] = None  # the SOURCE clip's flow (Flow Warp)
    x0_warp: Window = None  # Rerender warp_period, default (0, 0.1)
    adain: Window = None  # Rerender ada_period, e.g. (0.8, 1.0)
    pixel_fusion: Window = None  # Rerender mask_period, default (0.5, 0.8)
    pixel_strength: float = 0.5  # Rerender mask_strength
    smoother: bool = False  # ControlVideo interleaved-frame smoother
    motion: bool = False  # Text2Video-Zero motion dynamics start, following the flow's mean motion

    def __post_init__(self) -> None:
        """Checked when made (the Temporal Guidance node), not first at sampling."""
        for name in ("x0_warp", "adain", "pixel_fusion"):
            window = getattr(self, name)
            if window is not None:
                StepWindow(*window, name=f"Temporal Guidance: {name}")
                if window[1] > 1.0:
                    raise ValueError(f"Temporal Guidance: {name} window must end by 1 (got {window[1]})")
        if (self.x0_warp or self.pixel_fusion or self.motion) and self.flow is None:
            raise ValueError("Temporal Guidance: warp fusion, pixel fusion and motion need a flow; connect Flow Warp")

    def check(self, frame_count: int, size: tuple) -> None:
        """The flow against the clip being sampled (what the guidance needs was checked when it was made)."""
        if self.flow is not None and (self.flow.frame_count != frame_count or tuple(self.flow.size) != tuple(size)):
            raise ValueError(
                f"Temporal Guidance: the flow is for {self.flow.frame_count} frames of {self.flow.size[1]}x"
                f"{self.flow.size[0]} but the sampler has {frame_count} of {size[1]}x{size[0]}; "
                "run Flow Warp on the same frames")

    def __repr__(self) -> str:
        parts = [name for name in ("x0_warp", "adain", "pixel_fusion", "smoother", "motion") if getattr(self, name)]
        return f"TemporalGuidance({', '.join(parts) or 'off'})"


def motion_strengths(flow: FlowField) -> tuple:
    """The flow's mean per-frame motion in Text2Video-Zero's 512-pixel units (positive = content moves to -x)."""
    mean = flow.fwd.mean(dim=(0, 2, 3)) if flow.pairs else torch.zeros(2)
    height, width = flow.size
    return (-float(mean[0]) * 512 / width, -float(mean[1]) * 512 / height)


def guidance_hooks(model: VEModel, settings: SamplerSettings, guidance: TemporalGuidance) -> Hooks:
    """The single-pass hooks: AdaIN, then x̂0 warp fusion, then the smoother, then keep the model's eps."""
    on_x0 = []
    if guidance.adain:
        on_x0.append(adain_hook(*guidance.adain))
    if guidance.x0_warp:
        on_x0.append(x0_warp_fusion_hook(guidance.flow, *guidance.x0_warp))
    if guidance.smoother:
        on_x0.append(interleaved_smoother_hook(lambda z: decode_latents(model, z),
                                               lambda img: encode_frames(model, img)))
    if on_x0 and settings.scheduler in KEEPS_MODEL_EPS:
        on_x0.append(keep_model_eps_hook())  # marked to run last, after any other x̂0 hook
    return Hooks(on_x0=on_x0)


def guided_edit(model: VEModel, settings: SamplerSettings, guidance: Optional[TemporalGuidance] = None,
                images: Optional[torch.Tensor] = None, frame_count: Optional[int] = None, size: Optional[tuple] = None,
                progress=None, **sampler_inputs) -> torch.Tensor:
    """`edit_video` with temporal guidance: one pass, plus Rerender's pixel-fusion pass when asked.
    `sampler_inputs` go to both passes (control, inversion, injection, latent, mask)."""
    if guidance is None:
        return edit_video(model, settings, images, frame_count, size, progress=progress, **sampler_inputs)
    start = resolve_start(None, images, sampler_inputs.pop("latent", None), sampler_inputs.pop("inversion", None),
                          sampler_inputs.get("injection"), frame_count, size, sampler_inputs.get("control"))
    if guidance.motion:
        if start.has_source:
            raise ValueError("motion dynamics starts from noise: disconnect the images (or the latent or the "
                             "inversion) or turn motion off")
        start = MotionStart(*start.extent(), *motion_strengths(guidance.flow))
    guidance.check(*start.extent())
    hooks = guidance_hooks(model, settings, guidance)
    latents = edit_video(model, settings, hooks=hooks, progress=progress, start=start, **sampler_inputs)
    if not guidance.pixel_fusion:
        return latents

    # Rerender's pixel-aware fusion: fuse the first pass's frames along the flow in pixel space, then sample
    # again from the same start, re-noising toward those targets inside mask_period.
    targets, masks = pixel_fusion_targets(decode_latents(model, latents), guidance.flow)
    target = target_latents(lambda img: encode_frames(model, img), lambda z: decode_latents(model, z), targets)
    blend = renoise_blend_hook(target, latent_renoise_mask(masks), *guidance.pixel_fusion,
                               strength=guidance.pixel_strength, seed=settings.seed)
    return edit_video(model, settings, hooks=hooks + Hooks(after_step=[blend]), progress=progress, start=start,
                      **sampler_inputs)
