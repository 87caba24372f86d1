"""Attention for video: cross-frame rules, the video attention processor, attach/restore."""

from .attach import attention_processors, is_self_attention
from .processor import FrameLayout, VideoAttnProcessor, select_kv
from .rules import NEEDS_ANCHOR, NEEDS_PREVIOUS, RULES, get_rule

__all__ = [
    "attention_processors",
    "is_self_attention",
    "FrameLayout",
    "VideoAttnProcessor",
    "select_kv",
    "NEEDS_ANCHOR",
    "NEEDS_PREVIOUS",
    "RULES",
    "get_rule",
]
