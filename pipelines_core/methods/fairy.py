"""Fairy (Wu et al., CVPR'24): anchor-based cross-frame attention, so chunks of frames run in parallel.

Fairy's zero-shot part: a few anchor frames are denoised first; the keys and values of their
self-attention are cached, per layer, for this step; then every other frame's self-attention takes its
query from the frame itself and its keys and values from the cached anchors only. Given the anchors, the
other frames no longer depend on one another, so they run in independent chunks of any size.

At every denoising step (`AnchorDenoiser`, the denoiser the loop calls):
  1. anchor pass: the k anchors go through the UNet in one call (the run's CFG layout: uncond and cond
     rows). In every UNet self-attention layer each anchor attends to the keys/values of all k anchors
     of its own CFG row group (extended attention among the anchors), and those k frames' K/V are cached
     for (layer, role);
  2. chunk pass: the other frames, `chunk_size` at a time, with no context frames: in every UNet
     self-attention layer a frame's keys/values are the cached anchor K/V of its own role (uncond rows
     read the uncond anchors, cond rows the cond anchors);
  3. the cache is emptied. It holds k frames x self-attention layers x CFG roles of K/V at most, for one
     step only (`AnchorCache.peak_bytes` records the largest it held).

A frame does NOT attend to its own keys/values besides the anchors'. Fairy has no public code and we read
its abstract and project page only (methods.md §2.6): there the anchors' attention features are cached and
the other frames' features are refined as an attention-weighted sum of similar regions of the anchor
frames, with no own-frame term. It is also what makes k = all frames exactly the dense `all` rule
(methods.md F4): adding a frame's own tokens again would count them twice in the softmax.

Where the pack differs from the paper (or cannot check it):
  * Anchors are k frames evenly spaced over the clip, first and last included, the same at every step;
    k = 3 by default (the pack's choice). How the paper picks its anchors is not in what we could read.
  * Fairy runs an instruct-pix2pix model fine-tuned for affine equivariance; that fine-tuning is out of
    scope. Here the anchor attention drives SD-1.5-class text-to-image models, starting from images
    (SDEdit strength) or from a DDIM inversion when one is given.
  * The anchors replace the sampler's cross-frame rule on every UNet self-attention layer (the sampler's
    rule and layer choice still apply inside a ControlNet, per call). The anchor call holds all k anchors
    whatever the chunk size; chunk_size sets the chunks of the other frames. Fairy's speed comes from
    running chunks in parallel; here they run one after another (or batched by the denoiser), same result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
from einops import rearrange

from ..attention.attach import is_self_attention
from ..attention.processor import AttnCall, AttnEdit
from ..attention.rules import own_frame
from ..sampling.chunks import Chunk
from ..sampling.hooks import StepState
from ..sampling.injection import Injection, InjectionPlan, PlanContext

if TYPE_CHECKING:
    from ..sampling.denoiser import VideoDenoiser

NODE = "Attention Injector (Fairy)"


@dataclass(frozen=True)
class FairyParams:
    anchors: int = 3  # anchor frames, evenly spaced over the clip

    def check(self) -> None:
        if self.anchors < 1:
            raise ValueError(f"{NODE}: anchors must be at least 1 (got {self.anchors}); set it to 3, the default")


def anchor_frames(frame_count: int, k: int) -> tuple:
    """k frames evenly spaced over frame_count, first and last included (every frame when k >= frame_count)."""
    if k >= frame_count:
        return tuple(range(frame_count))
    if k == 1:
        return (0,)
    # round(i (F-1) / (k-1)) in integers; consecutive values are >= 1 apart, so all k are distinct
    return tuple((2 * i * (frame_count - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k))


class AnchorCache:
    """The anchors' self-attention keys and values of one step, keyed by (layer, role): (heads, k tokens, dim)."""

    def __init__(self):
        self.kv: dict = {}
        self.peak_bytes = 0  # the most the cache held at once in this run

    def put(self, layer: str, role: str, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv[(layer, role)] = (k, v)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def get(self, layer: str, role: str):
        found = self.kv.get((layer, role))
        if found is None:
            raise RuntimeError(f"{NODE}: no anchor keys/values cached for {layer} ({role}) at this step: the "
                               "anchor pass must run before the chunks (use the plan's wrap_denoiser)")
        return found

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv.values() for t in pair)

    def clear(self) -> None:
        self.kv.clear()


class FairyRun:
    """The state of one sampling run: the anchors, the cache, and which pass the UNet is in (None: neither)."""

    ANCHORS, CHUNKS = "anchors", "chunks"

    def __init__(self, anchors: tuple):
        self.anchors = anchors
        self.cache = AnchorCache()
        self.phase: Optional[str] = None


def joint(x: torch.Tensor) -> torch.Tensor:
    """The keys (or values) of all frames of one role as one sequence: (f, h, n, d) -> (h, (f n), d)."""
    return rearrange(x, "f h n d -> h (f n) d")


class AnchorAttention(AttnEdit):
    """Self-attention keys/values from the anchors: recorded in the anchor call, read from the cache in chunk calls.

    Acts on UNet self-attention calls (its processors' rule is `own_frame`, so k/v arrive per frame);
    cross-attention passes unchanged, and so do calls outside the two passes (a start's own UNet calls, e.g.
    Text2Video-Zero's motion start on frame 0): there each frame attends to itself."""

    def __init__(self, run: FairyRun):
        self.run = run

    def qkv(self, call: AttnCall, q, k, v):
        if not call.is_self or call.layout is None or self.run.phase is None:
            return q, k, v
        if call.has_mask:
            raise ValueError(f"{NODE}: self-attention call {call.name} has an attention mask, which anchor "
                             "keys/values cannot keep")
        layout, batch, run = call.layout, q.shape[0], self.run
        if run.phase == FairyRun.ANCHORS:
            if tuple(layout.frame_ids) != run.anchors:
                raise RuntimeError(f"{NODE}: the anchor call holds frames {layout.frame_ids}, not the anchors "
                                   f"{run.anchors}")
            for role in layout.roles:
                rows = layout.rows(role, batch)
                run.cache.put(call.name, role, joint(k[rows]), joint(v[rows]))
        # every row reads its own role's anchors: uncond rows the uncond anchors, cond rows the cond anchors
        pairs = [run.cache.get(call.name, role) for role in layout.roles]
        k = torch.cat([kk.expand(layout.frames, -1, -1, -1) for kk, _ in pairs])
        v = torch.cat([vv.expand(layout.frames, -1, -1, -1) for _, vv in pairs])
        return q, k, v


def whole(frames) -> Chunk:
    """A chunk of `frames` with no context frames: every output is kept."""
    return Chunk(tuple(frames), tuple(range(len(frames))))


class AnchorDenoiser:
    """The denoiser the loop calls: per step, the anchor pass (which fills the cache), then the other frames
    in chunks that read it, then the cache is emptied. Wraps the run's `VideoDenoiser` through its public
    fields: copies of it with other chunks."""

    def __init__(self, denoiser: "VideoDenoiser", run: FairyRun, frame_count: int, chunk_size: int):
        self.denoiser = denoiser
        self.run = run
        anchors = run.anchors
        others = [f for f in range(frame_count) if f not in anchors]
        self.frame_count = frame_count
        self.anchor_chunks = [whole(anchors)]
        self.other_chunks = [whole(others[s:s + chunk_size]) for s in range(0, len(others), chunk_size)]
        self.others = others

    def __call__(self, latents: torch.Tensor, state: StepState) -> torch.Tensor:
        if latents.shape[0] != self.frame_count:
            raise RuntimeError(f"{NODE}: planned for {self.frame_count} frames, called with {latents.shape[0]}")
        # Copies made at call time, so they see the denoiser as the sampler left it (a start may set uncond).
        try:
            self.run.phase = FairyRun.ANCHORS
            eps = replace(self.denoiser, chunks=self.anchor_chunks)(latents, state)
            if self.others:
                self.run.phase = FairyRun.CHUNKS
                rest = replace(self.denoiser, chunks=self.other_chunks)(latents, state)
                eps[self.others] = rest[self.others]
        finally:
            self.run.phase = None
            self.run.cache.clear()  # K/V of one step only: the next step's anchors are computed afresh
        return eps


def fairy_planner(injection: Injection, context: PlanContext) -> InjectionPlan:
    params: FairyParams = injection.params
    run = FairyRun(anchor_frames(context.frame_count, params.anchors))
    edit = AnchorAttention(run)

    def edits_for(name: str) -> tuple:
        return (edit,) if is_self_attention(name) else ()

    def rule_for(name: str):
        return own_frame if is_self_attention(name) else None  # keys/values come from the edit instead

    return InjectionPlan(edits_for=edits_for, rule_for=rule_for,
                         wrap_denoiser=lambda d: AnchorDenoiser(d, run, context.frame_count, context.chunk_size))


def fairy_injection(inversion=None, params: FairyParams = FairyParams()) -> Injection:
    """VE_INJECTION for Fairy's anchor attention; with an inversion sampling starts from it, without one from the
    images (SDEdit) or noise the sampler is given."""
    params.check()
    return Injection("fairy", inversion, params, fairy_planner)
