"""Attach attention processors to a UNet or ControlNet and always give the originals back."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def attention_processors(module, make: Callable[[str], object]) -> Iterator[dict]:
    """Install `make(name)` on every attention layer of `module` for the duration of the block.

    `name` is the diffusers processor key (e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"):
    attn1 is self-attention, attn2 cross-attention. The original processors are restored on exit,
    also when the block raises (an error or a user interrupt mid-sampling).
    """
    original = dict(module.attn_processors)
    installed = {name: make(name) for name in original}
    module.set_attn_processor(dict(installed))  # diffusers consumes the dict it is given
    try:
        yield installed
    finally:
        module.set_attn_processor(dict(original))


def is_self_attention(name: str) -> bool:
    return ".attn1." in name or name.startswith("attn1.")
