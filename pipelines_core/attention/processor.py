"""One attention processor for video: plain scaled-dot-product attention whose self-attention keys
and values come from the frames a rule selects.

It owns no weights (it reads `attn.to_q/to_k/to_v/to_out`, so LoRA layers that wrap them keep
working) and learns the batch layout per call from the `layout` keyword, which the sampler passes
through the UNet's `cross_attention_kwargs`. Frames are gathered only within a CFG chunk: the batch
is laid out `(chunk, frame)`, chunks being [uncond, cond] (or one chunk without CFG).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from .rules import Rule, own_frame


@dataclass(frozen=True)
class FrameLayout:
    """How frames are folded into the batch: batch = chunks x frames, frame-minor."""

    frames: int


def select_kv(x: torch.Tensor, index: torch.Tensor, frames: int) -> torch.Tensor:
    """Gather, for every frame, the tokens of the frames listed in its row of `index`.

    x: ((chunk frame), tokens, channels) -> ((chunk frame), (k tokens), channels).
    """
    x = rearrange(x, "(b f) n c -> b f n c", f=frames)
    picked = x[:, index.to(x.device)]  # b f k n c
    return rearrange(picked, "b f k n c -> (b f) (k n) c")


class VideoAttnProcessor:
    """Drop-in for diffusers' `AttnProcessor2_0` with a cross-frame key/value rule.

    With the `own_frame` rule (or no layout given) it computes exactly what `AttnProcessor2_0` does.
    Cross-attention calls (`encoder_hidden_states` given) are never changed by the rule.
    """

    def __init__(self, rule: Rule = own_frame):
        self.rule = rule

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
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = rearrange(out, "b h n d -> b n (h d)", d=head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))

        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
