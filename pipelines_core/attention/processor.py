"""One attention processor for video: plain scaled-dot-product attention whose self-attention keys
and values come from the frames a rule selects.

It owns no weights (it reads `attn.to_q/to_k/to_v/to_out`, so LoRA layers that wrap them keep
working) and learns the batch layout per call from the `layout` keyword, which the sampler passes
through the UNet's `cross_attention_kwargs`. Frames are gathered only within a CFG chunk: the batch
is laid out `(chunk, frame)`, chunks being [uncond, cond] (or one chunk without CFG).
Methods change a call through `AttnEdit`s: which tokens it sees (merge/unmerge), q/k/v, probabilities, output.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .rules import Rule, own_frame, placed_index


@dataclass(frozen=True)
class FrameLayout:
    """What one UNet call holds: batch = chunks x frames, frame-minor.

    `frame_ids` are the clip's frame numbers in batch order; `roles` name the chunks
    (("uncond", "cond") with CFG, ("cond",) without, ("source", "uncond", "cond") with a live source
    branch); `timestep` and `step` say where in sampling this call is, so stores can key by timestep.
    `groups` > 1: the `frames` of each role are that many sampler chunks of `group_frames` frames side by side
    (chunks batched into one call; `frame_ids` lists them all), and cross-frame rules gather within a group only,
    so the call computes what one call per chunk would.
    """

    frames: int
    frame_ids: tuple = ()
    roles: tuple = ()
    timestep: Optional[int] = None
    step: Optional[int] = None
    groups: int = 1

    def __post_init__(self):
        if self.groups < 1 or self.frames % self.groups:
            raise ValueError(f"{self.frames} frames do not split into {self.groups} equal groups")

    @property
    def group_frames(self) -> int:
        """The frames one cross-frame rule sees: one sampler chunk."""
        return self.frames // self.groups

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
    # The diffusers `Attention` layer of the call (to_q/to_k/to_v/to_out, heads, scale, norms): an edit reads the
    # layer from here, never through module hooks. None only for calls built outside a processor.
    attn: Optional[torch.nn.Module] = field(default=None, repr=False, compare=False)
    has_mask: bool = False  # the caller passed an attention mask (SD's self-attention never does)


# Maps the attention output of a call with merged tokens back to the caller's tokens (an edit's unmerge).
TokenRestore = Callable[[torch.Tensor], torch.Tensor]


class AttnEdit:
    """Base for edits that record or change attention; override only the points you need.

    The points, in the order the processor reaches them:

    tokens(call, hidden_states) -> (hidden_states, call, restore): which tokens the call attends with.
        hidden_states: the caller's tokens, (batch, tokens, channels), after the 4-D -> 3-D reshape and
        before group_norm and the projections. An edit may return fewer or other rows or tokens (merge),
        and a `call` whose `layout` describes them (e.g. the keyframes only: `replace(call, layout=...)`);
        every later step of this call (the rule, the qkv/probs/out points of all edits) sees that layout.
        Only the layout may differ from the call it was given. `restore` maps the attention output after
        `to_out`, (merged batch, merged tokens, out channels), back to the caller's (batch, tokens, out
        channels) (unmerge), or is None when nothing was merged. Edits merge in list order and restore in
        reverse order. What restore needs (the caller's tokens, the layout) lives in its closure, for this
        call only. Cross-attention calls keep their text context, so there the rows must stay; calls with an
        attention mask (`call.has_mask`) must keep their tokens. The default changes nothing, and the processor
        skips the whole step unless some edit overrides `tokens`.
    qkv(call, q, k, v) -> (q, k, v): the projections' results after the cross-frame gather (and norm_q/norm_k),
        shaped (batch, heads, tokens, dim); an edit may replace any of them (PnP's source q/k, extended k/v).
    probs(call, p) -> p: the attention probabilities (batch, heads, queries, keys); the processor takes the
        explicit softmax path instead of the fused kernel for a call only where some edit's `wants_probs(call)`
        is true (by default, for every call of an edit that overrides `probs`).
    wants_probs(call) -> bool: whether `probs` reads or changes this call's probabilities. Answer False only
        where `probs` would return p unchanged and do nothing else: that call then runs the fused kernel,
        whose float rounding differs from the explicit path's (about 1e-6 a call, enough to change a
        workflow's output bits). When another edit wants the
        probabilities, `probs` is still called on every edit.
    out(call, h) -> h: the attention output before the output projection, (batch, tokens, channels).
    """

    def tokens(self, call: AttnCall,
               hidden_states: torch.Tensor) -> tuple[torch.Tensor, AttnCall, Optional[TokenRestore]]:
        return hidden_states, call, None

    def qkv(self, call: AttnCall, q, k, v):
        return q, k, v

    def probs(self, call: AttnCall, p):
        return p

    def out(self, call: AttnCall, h):
        return h

    def wants_probs(self, call: AttnCall) -> bool:
        return self.needs_probs

    @property
    def needs_probs(self) -> bool:
        """Whether the class overrides `probs` at all (the default answer of `wants_probs`)."""
        return type(self).probs is not AttnEdit.probs

    @property
    def changes_tokens(self) -> bool:
        return type(self).tokens is not AttnEdit.tokens


def merge_tokens(edits: Sequence[AttnEdit], call: AttnCall, hidden_states: torch.Tensor) -> tuple:
    """Run the edits' `tokens` points in order: (merged hidden states, the call they describe, restores in order)."""
    restores = []
    rows, tokens = hidden_states.shape[:2]
    for edit in edits:
        hidden_states, merged_call, restore = edit.tokens(call, hidden_states)
        if replace(merged_call, layout=call.layout) != call or merged_call.attn is not call.attn:
            raise ValueError(f"{type(edit).__name__}.tokens may change only the call's layout ({call.name})")
        call = merged_call
        if restore is not None:
            restores.append(restore)
    if not call.is_self and hidden_states.shape[0] != rows:
        raise ValueError(f"token edits changed the rows of cross-attention call {call.name}, "
                         "whose text context keeps the caller's rows")
    if call.has_mask and hidden_states.shape[:2] != (rows, tokens):
        raise ValueError(f"token edits changed the tokens of {call.name}, whose attention mask is for the caller's; "
                         "skip calls with call.has_mask")
    return hidden_states, call, restores


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
        is_self = encoder_hidden_states is None
        has_mask = attention_mask is not None
        call = AttnCall(self.name, is_self, attn.heads, layout, attn, has_mask) if self.edits else None
        token_edits = [edit for edit in self.edits if edit.changes_tokens]
        restores = ()
        if token_edits:  # skipped entirely otherwise, so calls without token edits compute exactly as before
            hidden_states, call, restores = merge_tokens(token_edits, call, hidden_states)
            layout = call.layout
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

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
            index = placed_index(self.rule, layout.group_frames, key.device)
            key = select_kv(key, index, layout.group_frames)
            value = select_kv(value, index, layout.group_frames)
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
        for edit in self.edits:
            query, key, value = edit.qkv(call, query, key, value)
        if any(edit.wants_probs(call) for edit in self.edits):
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
        for restore in reversed(restores):
            out = restore(out)

        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
