"""Pix2Video (Ceylan et al., ICCV'23) as an injection: anchor + previous-frame attention in the decoder and
x0 guidance toward the previous frame.

  * Self-attention of the decoder (every up-block attn1; the code's COND_LAYER=7 counts SD's 6 encoder and
    1 middle transformer blocks first, so it selects exactly these 9 layers) takes its keys and values from
    the anchor (first) frame and the previous frame: the rule `first+previous`. Encoder and middle
    self-attention stay per frame.
  * Guided latent update: after each step i < until * steps (the paper: weight 100 for the first half of 50
    steps; the code's `i > 25` test runs one step more), frame i's latent moves by
        x <- x - grad_{x0_i} [ w * MSE(x0_{i-1}, x0_i) ],
    where x0_j are the model's clean estimates at this step (before any update) and MSE is the mean over
    one frame's latent, as the code computes it for one frame at a time. Frame 0 is not moved. The update
    is taken where the code takes it, on the latent after the scheduler step: an on_x0 hook keeps the
    step's estimates and an after_step hook applies the update.

Sequential = batched with causal attention. Pix2Video edits frame i after frame i-1: at step s it reads
the anchor's and frame i-1's decoder features at step s and frame i-1's x0 at step s. Our run denoises all
frames in one UNet call per step with the rule [first, previous] on the same layers; everything else in the
UNet (convolutions, GroupNorm, cross-attention, per-frame self-attention) acts on each frame alone, so frame
i's features at step s depend only on frames <= i at step s, computed exactly as the sequential run computes
them (by induction over i). The guidance reads only frames i and i-1 of the same step. So each frame follows
its sequential trajectory, all frames at once; frame 0 never depends on later frames. This is exact when all
frames share one sampler chunk; with smaller chunks the sampler recomputes the frame before a chunk inside
it as context, where it reads the anchor as its previous frame (an approximation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..attention.attach import is_self_attention
from ..attention.layers import decoder_self_attention
from ..attention.processor import AttnCall, AttnEdit
from ..attention.rules import first_and_previous, own_frame
from ..sampling.hooks import Hooks, StepState
from ..sampling.injection import Injection, InjectionPlan, PlanContext
from ..sampling.windows import RunWindow, first


@dataclass(frozen=True)
class Pix2VideoParams:
    guidance_weight: float = 100.0  # pix2video code: per_step_weight = 100 (tuned on 64x64 SD latents)
    guidance_until: float = 0.5  # guided for steps i < until * steps (code: i <= 25 of 50)

    def check(self) -> None:
        if self.guidance_weight < 0:
            raise ValueError(f"guidance_weight must be at least 0 (got {self.guidance_weight})")
        if not 0.0 <= self.guidance_until <= 1.0:
            raise ValueError(f"guidance_until must be a fraction of the steps in [0, 1] (got {self.guidance_until})")


def x0_guidance(x0: torch.Tensor, weight: float) -> torch.Tensor:
    """The latent update -grad_{x0_i} [w * MSE(x0_{i-1}, x0_i)] for every frame (0 for frame 0).

    x0: (frames, c, h, w); MSE is the mean over one frame, so its gradient is 2 w (x0_i - x0_{i-1}) / (c h w).
    """
    pull = -2.0 * weight * (x0[1:] - x0[:-1]) / x0[0].numel()
    return torch.cat([torch.zeros_like(x0[:1]), pull])


class PreviousFrameGuidance:
    """The x0 guidance as two hooks sharing one step's estimates (fresh per plan)."""

    def __init__(self, weight: float, window: RunWindow):
        self.weight = weight
        self.window = window
        self._x0: Optional[torch.Tensor] = None

    def keep_x0(self, state: StepState) -> torch.Tensor:
        self._x0 = state.x0
        return state.x0

    def pull(self, state: StepState) -> torch.Tensor:
        if state.index not in self.window or self._x0 is None:
            return state.latents
        return state.latents + x0_guidance(self._x0, self.weight).to(state.latents)

    @property
    def hooks(self) -> Hooks:
        return Hooks(on_x0=[self.keep_x0], after_step=[self.pull])


class AnchorInEveryChunk(AttnEdit):
    """Refuses calls whose frames do not start with the anchor followed by consecutive frames, where the
    rule's positions 0 and i-1 would not be the first and the previous frame."""

    def qkv(self, call: AttnCall, q, k, v):
        ids = tuple(call.layout.frame_ids) if call.layout is not None else ()
        if ids and (ids[0] != 0 or any(b != a + 1 for a, b in zip(ids[1:], ids[2:]))):
            raise ValueError("Pix2Video reads the first frame in every chunk: set the sampler's attention to "
                             "first+previous, or its chunk_size to at least the frame count")
        return q, k, v


def pix2video_planner(injection: Injection, context: PlanContext) -> InjectionPlan:
    params: Pix2VideoParams = injection.params
    decoder = frozenset(decoder_self_attention(context.model.unet.attn_processors))
    guard = AnchorInEveryChunk()

    def rule_for(name: str):
        if name in decoder:
            return first_and_previous
        return own_frame if is_self_attention(name) else None

    hooks = Hooks()
    if params.guidance_weight > 0 and params.guidance_until > 0:
        hooks = PreviousFrameGuidance(params.guidance_weight, first(params.guidance_until, "guidance_until").of(context.steps)).hooks
    return InjectionPlan(edits_for=lambda name: (guard,) if name in decoder else (), rule_for=rule_for, hooks=hooks)


def pix2video_injection(inversion=None, params: Pix2VideoParams = Pix2VideoParams()) -> Injection:
    """VE_INJECTION for Pix2Video; with an inversion (the paper: per-frame DDIM, strength 1.0) sampling starts
    from it, without one from the images the sampler is given."""
    params.check()
    return Injection("pix2video", inversion, params, pix2video_planner)
