"""The one test of whether an API-prompt input is a link, as ComfyUI's executor decides it."""

from __future__ import annotations

from typing import Any


def is_link(value: Any) -> bool:
    """In an API prompt a list input is a link `[node_id, slot]` (ComfyUI's rule; list constants are wrapped).
    Whether a link is well formed (two items, a known node, an int slot) is validation's business."""
    return isinstance(value, list)
