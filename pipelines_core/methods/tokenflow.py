"""TokenFlow (Geyer et al., ICLR'24): PnP plus keyframe editing and feature propagation by nearest neighbours.

At every denoising step:
  1. keyframes: one random frame out of every `kf_every` frames, drawn anew each step from the plan's own
     generator (seeded by the sampler's seed);
  2. the keyframes' self-attention is *extended*: in the uncond and cond chunks each keyframe attends to the
     keys and values of all keyframes; the source chunk keeps per-frame attention (it must stay the
     inversion's features); PnP's Q/K injection still applies first;
  3. every frame's self-attention output is propagated from the two nearest keyframes: token n of frame i
     takes the output of the keyframe token most cosine-similar to it in the SOURCE chunk's attn1 input
     (norm1 tokens), mixing the keyframe at or before i and the one after it with weights w, 1-w.

What we run differs from the official two-pass schedule (a pivotal UNet pass on the keyframes, then one
pass per batch of 8 reading the stored keyframe outputs): here both happen inside one UNet call. On every
self-attention layer (attn1, whose input is norm1's tokens), a token edit (`AttnEdit.tokens`) hands attention
only the keyframes' tokens and propagates their outputs to all frames. With the default linear weights a
keyframe's propagated output is its own (nearest neighbour of itself, w = 1), so every keyframe row evolves
exactly as in a keyframe-only pass and the result equals the two-pass schedule with the same keyframes.
With the sigmoid option keyframes keep their own output too (the official batch pass would mix even a
keyframe), so the pivots stay clean. Pairing also follows the paper, not the code: the code mixes the
keyframe of a frame's batch of 8 with the previous batch's, with distances to the batch midpoints; we take
the nearest keyframes before and after the frame and distances to those keyframes. Frames are propagated
within one sampler chunk (its UNet call).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from ..sampling.injection import Injection, InjectionPlan, PlanContext
from ..attention.attach import is_self_attention
from .plug_and_play import PnPParams, check_inversion, pnp_plan_for
from ..attention.processor import AttnCall, AttnEdit, FrameLayout
from ..attention.rules import own_frame

BLENDS = ("linear", "sigmoid")
NN_BLOCK = 2**26  # similarity entries computed at once in the nearest-neighbour search


@dataclass(frozen=True)
class TokenFlowParams:
    pnp_f_t: float = 0.8  # TokenFlow config_pnp.yaml
    pnp_attn_t: float = 0.5  # TokenFlow config_pnp.yaml
    kf_every: int = 8  # TokenFlow batch_size 8: one keyframe per 8 frames
    blend: str = "linear"  # the paper's linear weights; "sigmoid" = the official code's sigmoid(d2 / (d1 + d2))

    @property
    def pnp(self) -> PnPParams:
        return PnPParams(self.pnp_f_t, self.pnp_attn_t)

    def check(self) -> None:
        self.pnp.check()
        if self.kf_every < 1:
            raise ValueError(f"kf_every must be at least 1 (got {self.kf_every})")
        if self.blend not in BLENDS:
            raise ValueError(f"unknown blend {self.blend!r}; choose one of {', '.join(BLENDS)}")


# --- keyframes and the nearest-neighbour field (pure functions) ---------------------------------

def draw_keyframes(frames: int, every: int, generator: torch.Generator) -> tuple:
    """One random frame out of each run of `every` frames (TokenFlow: randint(8) + arange(0, F, 8))."""
    return tuple(start + int(torch.randint(min(every, frames - start), (1,), generator=generator))
                 for start in range(0, frames, every))


def keyframe_pairs(frames: int, keyframes: tuple, blend: str = "linear"):
    """For every frame i: the slot of the nearest keyframe at or before i, of the nearest one after i,
    and the weight w of the first, from distances d1 = i - k_before, d2 = k_after - i.

    linear (paper): w = d2 / (d1 + d2), in [0, 1]; 1 on a keyframe.
    sigmoid (official code): w = sigmoid(d2 / (d1 + d2)), in [0.5, 0.73].
    A frame before the first or after the last keyframe has one keyframe on both sides, with w = 1.
    """
    kf = torch.tensor(keyframes)
    i = torch.arange(frames)
    before = (kf[None, :] <= i[:, None]).sum(1) - 1  # -1 where no keyframe is at or before i
    after = before + 1  # len(kf) where no keyframe is after i
    before = torch.where(before < 0, after, before)
    after = torch.where(after >= len(kf), before, after)
    d1, d2 = (i - kf[before]).abs().double(), (kf[after] - i).abs().double()
    ratio = d2 / (d1 + d2)
    w = ratio if blend == "linear" else torch.sigmoid(ratio)
    return before, after, torch.where(before == after, torch.ones_like(w), w)


def nearest_tokens(queries: torch.Tensor, keys: torch.Tensor, block: int = NN_BLOCK) -> torch.Tensor:
    """For every token of every query frame, the index of the most cosine-similar token of its key frame.

    queries, keys: (frames, tokens, channels) -> (frames, tokens) indices into the key frame's tokens.
    """
    q, k = F.normalize(queries.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    n = q.shape[1]
    group = max(1, block // (n * k.shape[1]))  # frames per batched matmul, bounding its memory
    return torch.cat([(q[s:s + group] @ k[s:s + group].transpose(1, 2)).argmax(-1) for s in range(0, len(q), group)])


def propagate(keyframe_out: torch.Tensor, before, after, weight, nn_before, nn_after) -> torch.Tensor:
    """out[c, i, n] = w_i * T[c, before_i, nn_before[i, n]] + (1 - w_i) * T[c, after_i, nn_after[i, n]].

    keyframe_out T: (chunks, keyframes, tokens, channels); before/after/weight: (frames,);
    nn_before/nn_after: (frames, tokens). Returns (chunks, frames, tokens, channels).
    """
    def gather(slots, index):
        rows = keyframe_out[:, slots]  # c f n d
        return rows.gather(2, index[None, :, :, None].expand(rows.shape[0], -1, -1, rows.shape[-1]))

    w = weight.to(keyframe_out)[None, :, None, None]
    return w * gather(before, nn_before) + (1 - w) * gather(after, nn_after)


def propagate_from_keyframes(tokens: torch.Tensor, layout: FrameLayout, keyframes: tuple,
                             keyframe_out: torch.Tensor, blend: str) -> torch.Tensor:
    """attn1 outputs for every frame of a call from the keyframes' outputs (TokenFlow's propagation).

    tokens: the call's attn1 input ((chunk frame), n, d); keyframe_out: ((chunk keyframe), n, d').
    Correspondences come from the source chunk's tokens; keyframes keep their own output.
    """
    x = rearrange(tokens, "(c f) n d -> c f n d", f=layout.frames)
    out_kf = rearrange(keyframe_out, "(c k) n d -> c k n d", k=len(keyframes))
    source = x[layout.roles.index("source")]
    before, after, w = keyframe_pairs(layout.frames, keyframes, blend)
    positions = torch.tensor(keyframes)
    nn_before = nearest_tokens(source, source[positions[before]])
    nn_after = nearest_tokens(source, source[positions[after]])
    out = propagate(out_kf, before.to(x.device), after.to(x.device), w, nn_before, nn_after)
    out[:, positions] = out_kf  # the pivots are the keyframes' own edits
    return rearrange(out, "c f n d -> (c f) n d")


# --- the keyframe call --------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyframeLayout(FrameLayout):
    """The layout of an attn1 call on the keyframes only; `keyframes` are their positions in the full call."""

    keyframes: tuple = ()


def select_frames(x: torch.Tensor, layout: FrameLayout, positions: tuple) -> torch.Tensor:
    """((chunk frame), ...) -> ((chunk k), ...): the listed frame positions of every chunk."""
    chunks = rearrange(x, "(c f) ... -> c f ...", f=layout.frames)
    return rearrange(chunks[:, list(positions)], "c k ... -> (c k) ...")


def extend_to_keyframes(x: torch.Tensor, layout: FrameLayout) -> torch.Tensor:
    """Keys or values (b h n d) of a keyframe call: every frame of an edit chunk reads all its chunk's frames;
    the source chunk reads its own frame, repeated to the same length (duplicated keys leave softmax unchanged)."""
    frames = layout.frames
    x = rearrange(x, "(c f) h n d -> c f h n d", f=frames)
    joint = repeat(rearrange(x, "c f h n d -> c h (f n) d"), "c h m d -> c f h m d", f=frames)
    own = repeat(x, "c f h n d -> c f h (r n) d", r=frames)
    source = layout.roles.index("source")
    chunks = [own[c] if c == source else joint[c] for c in range(x.shape[0])]
    return rearrange(torch.stack(chunks), "c f h n d -> (c f) h n d")


class ExtendedAttention(AttnEdit):
    """TokenFlow's extended attention among the keyframes (only in the keyframe calls `KeyframeCall` makes)."""

    def qkv(self, call: AttnCall, q, k, v):
        if call.is_self and isinstance(call.layout, KeyframeLayout):
            return q, extend_to_keyframes(k, call.layout), extend_to_keyframes(v, call.layout)
        return q, k, v


class TokenFlowRun:
    """The state of one sampling run: the keyframe generator and the keyframes of every UNet call."""

    def __init__(self, params: TokenFlowParams, seed: int):
        self.params = params
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.keyframes: dict = {}  # (step, frame ids) -> keyframe positions

    def keyframes_for(self, layout: FrameLayout) -> tuple:
        """The keyframes of a UNet call: drawn at its first attn1 and kept for all its blocks."""
        key = (layout.step, tuple(layout.frame_ids))
        if key not in self.keyframes:
            self.keyframes[key] = draw_keyframes(layout.frames, self.params.kf_every, self.generator)
        return self.keyframes[key]


class KeyframeCall(AttnEdit):
    """TokenFlow's keyframe call as a token edit on attn1: attention runs on the keyframes' tokens only (merge),
    then every frame's output is propagated from the keyframes' outputs by nearest neighbours (unmerge).

    Acts on self-attention calls with a source chunk and no attention mask; the others pass unchanged.
    """

    def __init__(self, run: TokenFlowRun):
        self.run = run

    def tokens(self, call: AttnCall, hidden_states: torch.Tensor):
        layout = call.layout
        if not call.is_self or call.has_mask or layout is None or "source" not in layout.roles:
            return hidden_states, call, None
        keyframes = self.run.keyframes_for(layout)
        pivot = KeyframeLayout(len(keyframes), tuple(layout.frame_ids[p] for p in keyframes), layout.roles,
                               layout.timestep, layout.step, keyframes=keyframes)

        def from_keyframes(keyframe_out: torch.Tensor) -> torch.Tensor:
            return propagate_from_keyframes(hidden_states, layout, keyframes, keyframe_out, self.run.params.blend)

        return select_frames(hidden_states, layout, keyframes), replace(call, layout=pivot), from_keyframes


# --- the plan --------------------------------------------------------------------------------------

def tokenflow_planner(injection: Injection, context: PlanContext) -> InjectionPlan:
    params: TokenFlowParams = injection.params
    pnp = pnp_plan_for(params.pnp, context)
    keyframe_call = KeyframeCall(TokenFlowRun(params, context.seed))
    extended = ExtendedAttention()

    def edits_for(name: str) -> tuple:
        # every attn1 of the UNet (one per transformer block); the keyframe call's token point runs before any qkv
        return tuple(pnp.edits_for(name)) + ((keyframe_call, extended) if is_self_attention(name) else ())

    def rule_for(name: str) -> Optional[object]:
        return own_frame if is_self_attention(name) else None  # keyframes are extended by the edit instead

    return InjectionPlan(edits_for=edits_for, rule_for=rule_for, patches=pnp.patches, source_branch=True)


def tokenflow_injection(inversion, params: TokenFlowParams = TokenFlowParams()) -> Injection:
    """VE_INJECTION for TokenFlow on `inversion` (sample with DDIM Invert's steps, strength 1.0)."""
    check_inversion(inversion, "TokenFlow")
    params.check()
    return Injection("tokenflow", inversion, params, tokenflow_planner)
