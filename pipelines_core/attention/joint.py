"""Cross-frame attention inside an MMDiT's joint attention (Flux): the image tokens of the frames a rule selects
join each frame's keys and values; its text tokens stay its own.

Flux attends over one sequence per frame, [text tokens, image tokens], in every block: the double-stream blocks
project the two streams separately and join them (`encoder_hidden_states` given), the single-stream blocks get
them already joined (the text length comes from the `text_tokens` keyword the network wrapper passes). Keys are
gathered after the rotary embedding, so a frame's query meets another frame's tokens at the positions that frame
has, which are its own (every frame has the same image ids): the image-model counterpart of extended attention.
With the `own_frame` rule, or without a layout, it computes what diffusers' `FluxAttnProcessor` computes.
"""

from __future__ import annotations

import torch

from .processor import FrameLayout, select_kv
from .rules import Rule, own_frame, placed_index


class JointVideoAttnProcessor:
    """Drop-in for diffusers' `FluxAttnProcessor` with a cross-frame rule on the image tokens."""

    edits = ()  # attention edits (probabilities, tokens) are written for UNet layers and not offered here

    def __init__(self, rule: Rule = own_frame, name: str = ""):
        self.rule = rule
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 layout: FrameLayout | None = None, text_tokens: int = 0):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text = text_tokens
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (t.unflatten(-1, (-1, attn.head_dim))
                                                         for t in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
            text = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if layout is not None and self.rule is not own_frame:
            index = placed_index(self.rule, layout.group_frames, key.device)
            tokens = key.shape[1] - text
            key, value = (torch.cat([t[:, :text], gather_image_tokens(t[:, text:], index, layout.group_frames)],
                                    dim=1) for t in (key, value))
            attention_mask = repeated_frames_mask(index, text, tokens, key.shape[0])

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(encoder_out.contiguous())
        return out


def repeated_frames_mask(index: torch.Tensor, text: int, tokens: int, batch: int) -> torch.Tensor | None:
    """Keys to keep (bool, (batch, 1, 1, keys)) when a rule lists a frame twice in a row (first+previous for
    frames 0 and 1: [0, 0]), else None. In a UNet's self-attention a frame's tokens listed twice leave the softmax
    as it was, every key being doubled; here the text keys are not doubled, so the image would outweigh the text:
    the second copy is masked out. (A token mask from the caller would not survive the gather; Flux passes none.)"""
    frames, k = index.shape
    repeated = torch.zeros(frames, k, dtype=torch.bool, device=index.device)
    for j in range(1, k):
        repeated[:, j] = (index[:, j:j + 1] == index[:, :j]).any(dim=1)
    if not repeated.any():
        return None
    keep = torch.cat([torch.ones(frames, text, dtype=torch.bool, device=index.device),
                      (~repeated).repeat_interleave(tokens, dim=1)], dim=1)
    return keep.repeat(batch // frames, 1)[:, None, None, :]


def gather_image_tokens(x: torch.Tensor, index: torch.Tensor, frames: int) -> torch.Tensor:
    """((chunk frame), tokens, heads, dim) -> ((chunk frame), (k tokens), heads, dim): each frame's row of `index`."""
    heads = x.shape[2]
    return select_kv(x.flatten(2), index, frames).unflatten(-1, (heads, -1))
