"""Layer selectors: which attention layers and feature modules a method acts on, by diffusers name.

Attention layers are named by their `attn_processors` key
("up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"); feature modules by module path
("up_blocks.1.resnets.1"). The papers number SD's decoder like the original LDM code: output block
k is `up_blocks[k // 3]` position `k % 3` (3 = layers_per_block + 1), so SD-1.5's attention-bearing
decoder layers are 3..11 (up_blocks.0 has no attention).

On a UNet shaped like SD (4 up blocks of 3 layers) the selectors name the papers' layers exactly.
On other UNets they fall back to the same layers by resolution level: "decoder layers 4-11" is
every decoder self-attention layer except the first one of the lowest-resolution block that has
attention, which is exactly SD's 4-11 (up_blocks.1.attentions.0 is SD's layer 3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

_ATTN = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn[12])\.processor$")
SD_DECODER_BLOCKS, SD_DECODER_PER_BLOCK = 4, 3  # SD-1.x/2.x: 4 up blocks x (layers_per_block 2 + 1)


@dataclass(frozen=True)
class AttnLayerName:
    """The parts of an attention processor key: block kind and index, position in it, attn1/attn2."""

    blocks: str  # "down_blocks" | "up_blocks" | "mid_block"
    block: int
    position: int
    transformer: int
    kind: str  # "attn1" (self) | "attn2" (cross)


def parse_layer(name: str) -> Optional[AttnLayerName]:
    """Split a UNet attention processor key; None for keys of another shape (mid block handled)."""
    if name.startswith("mid_block.attentions."):
        parts = name.split(".")
        return AttnLayerName("mid_block", 0, int(parts[2]), int(parts[4]), parts[5])
    match = _ATTN.match(name)
    if match is None:
        return None
    blocks, block, position, transformer, kind = match.groups()
    return AttnLayerName(blocks, int(block), int(position), int(transformer), kind)


def _decoder_self_attention(names: Iterable[str]) -> list[tuple[str, AttnLayerName]]:
    parsed = [(n, parse_layer(n)) for n in names]
    return [(n, p) for n, p in parsed if p is not None and p.blocks == "up_blocks" and p.kind == "attn1"]


def decoder_self_attention(names: Iterable[str]) -> list[str]:
    """Every self-attention layer of the decoder (the up blocks). Pix2Video's COND_LAYER=7 selects exactly
    these on SD (its counter runs over the 6 encoder and 1 middle transformer blocks first)."""
    return [n for n, _ in _decoder_self_attention(names)]


def is_sd_decoder(names: Iterable[str]) -> bool:
    """Whether the decoder has SD's shape: attention in up_blocks 1..3, three layers each."""
    placed = {(p.block, p.position) for _, p in _decoder_self_attention(names)}
    return placed == {(b, j) for b in range(1, SD_DECODER_BLOCKS) for j in range(SD_DECODER_PER_BLOCK)}


def ldm_decoder_layers(names: Iterable[str], first: int, last: int) -> list[str]:
    """Decoder self-attention layers numbered as in the LDM code (output block 3*i + j), first..last inclusive."""
    return [n for n, p in _decoder_self_attention(names) if first <= SD_DECODER_PER_BLOCK * p.block + p.position <= last]


def pnp_attention_layers(names: Iterable[str]) -> list[str]:
    """PnP/TokenFlow's Q/K injection layers: SD's decoder layers 4-11 (8 layers).

    Other UNets: every decoder self-attention layer but the first of the lowest-resolution block
    with attention (the same rule gives SD's 4-11).
    """
    names = list(names)
    if is_sd_decoder(names):
        return ldm_decoder_layers(names, 4, 11)
    decoder = _decoder_self_attention(names)
    if not decoder:
        return []
    lowest = min(p.block for _, p in decoder)
    first = min(p.position for _, p in decoder if p.block == lowest)
    return [n for n, p in decoder if not (p.block == lowest and p.position == first)]


def pnp_feature_module(unet) -> str:
    """PnP's residual feature layer: SD's `up_blocks.1.resnets.1` ("decoder layer 4"), i.e. the second
    resnet of the lowest-resolution decoder block that has attention (the same rule on any UNet)."""
    for i, block in enumerate(unet.up_blocks):
        if getattr(block, "attentions", None):
            return f"up_blocks.{i}.resnets.{min(1, len(block.resnets) - 1)}"
    raise ValueError("the UNet's decoder has no attention blocks; Plug-and-Play needs an SD-style UNet")
