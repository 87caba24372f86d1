"""One attention processor for video: plain scaled-dot-product attention whose self-attention keys
and values come from the frames a rule selects.

It owns no weights (it reads `attn.to_q/to_k/to_v/to_out`, so LoRA layers that wrap them keep
working) and learns the batch layout per call from the `layout` keyword, which the sampler passes
through the UNet's `cross_attention_kwargs`. Frames are gathered only within a CFG chunk: the batch
is laid out `(chunk, frame)`, chunks being [uncond, cond] (or one chunk without CFG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .rules import Rule, own_frame


@dataclass(frozen=True)
class FrameLayout:
    """What one UNet call holds: batch = chunks x frames, frame-minor.

    `frame_ids` are the clip's frame numbers in batch order; `roles` name the chunks
    (("uncond", "cond") with CFG, ("cond",) without, ("source", "uncond", "cond") with a live source
    branch); `timestep` and `step` say where in sampling this call is, so stores can key by timestep.
    """

    frames: int
    frame_ids: tuple = ()
    roles: tuple = ()
    timestep: Optional[int] = None
    step: Optional[int] = None

    def rows(self, role: str, batch: int) -> slice:
        """The batch rows of chunk `role` ("source", "uncond", "cond"), checked against the batch size."""
        if role not in self.roles:
            raise ValueError(f"the UNet batch has no {role!r} chunk (chunks: {', '.join(self.roles) or 'none'})")
        if batch != len(self.roles) * self.frames:
            raise ValueError(f"batch {batch} does not match the layout {self.roles} x {self.frames} frames")
        start = self.roles.index(role) * self.frames
        return slice(start, start + self.frames)


@dataclass(frozen=True)
class AttnCall:
    """What an attention edit learns about the call it acts on."""

    name: str  # the diffusers processor key, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    is_self: bool
    heads: int
    layout: Optional[FrameLayout]


class AttnEdit:
    """Base for edits that record or change attention; override only the points you need.

    qkv: after projection (and the cross-frame gather) -> (q, k, v), shaped (batch, heads, tokens, dim).
    probs: the attention probabilities (batch, heads, queries, keys) -> probs; overriding it makes the
           processor take the explicit softmax path instead of the fused kernel.
    out: the attention output before the output projection, (batch, tokens, channels) -> out.
    """

    def qkv(self, call: AttnCall, q, k, v):
        return q, k, v

    def probs(self, call: AttnCall, p):
        return p

    def out(self, call: AttnCall, h):
        return h

    @property
    def needs_probs(self) -> bool:
        return type(self).probs is not AttnEdit.probs


def select_kv(x: torch.Tensor, index: torch.Tensor, frames: int) -> torch.Tensor:
    """Gather, for every frame, the tokens of the frames listed in its row of `index`.

    x: ((chunk frame), tokens, channels) -> ((chunk frame), (k tokens), channels).
    """
    x = rearrange(x, "(b f) n c -> b f n c", f=frames)
    picked = x[:, index.to(x.device)]  # b f k n c
    return rearrange(picked, "b f k n c -> (b f) (k n) c")


def gathered_kv_bytes(rule, frames: int, rows: int, tokens: int, channels: int, itemsize: int) -> int:
    """Bytes of the keys plus values `select_kv` builds in one self-attention layer for a chunk of `frames`
    frames (`rows` = frames times the CFG/source copies in the batch): each row reads `k` frames' tokens,
    k being the width of the rule's index table. `all` grows with the square of the chunk; the others do not."""
    k = rule(frames).shape[1]
    return 2 * rows * k * tokens * channels * itemsize


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask): the explicit path, for edits that read or change probabilities."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


class VideoAttnProcessor:
    """Drop-in for diffusers' `AttnProcessor2_0` with a cross-frame key/value rule.

    With the `own_frame` rule (or no layout given) it computes exactly what `AttnProcessor2_0` does.
    Cross-attention calls (`encoder_hidden_states` given) are never changed by the rule.
    """

    def __init__(self, rule: Rule = own_frame, name: str = "", edits: Sequence[AttnEdit] = ()):
        self.rule = rule
        self.name = name
        self.edits = tuple(edits)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        layout: FrameLayout | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = None
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            spatial_shape = (b, c, h, w)
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_self = encoder_hidden_states is None
        query = attn.to_q(hidden_states)
        if is_self:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)

        if is_self and layout is not None and self.rule is not own_frame:
            index = self.rule(layout.frames)
            key = select_kv(key, index, layout.frames)
            value = select_kv(value, index, layout.frames)
            attention_mask = None  # a token mask does not survive frame gathering; SD self-attention has none

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (rearrange(t, "b n (h d) -> b h n d", h=attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        call = AttnCall(self.name, is_self, attn.heads, layout) if self.edits else None
        for edit in self.edits:
            query, key, value = edit.qkv(call, query, key, value)
        if any(edit.needs_probs for edit in self.edits):
            probs = attention_probs(query, key, attn.scale, attention_mask)
            for edit in self.edits:
                probs = edit.probs(call, probs)
            out = probs @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 scale=attn.scale)
        out = rearrange(out, "b h n d -> b n (h d)", d=head_dim).to(query.dtype)
        for edit in self.edits:
            out = edit.out(call, out)
        out = attn.to_out[1](attn.to_out[0](out))

        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
