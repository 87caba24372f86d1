"""Attention for video: cross-frame rules, the video attention processor, attach/restore."""

from .attach import attention_processors, is_self_attention
from .processor import AttnCall, AttnEdit, FrameLayout, VideoAttnProcessor, attention_probs, select_kv
from .rules import NEEDS_ANCHOR, NEEDS_PREVIOUS, RULES, get_rule

__all__ = [
    "attention_processors",
    "is_self_attention",
    "AttnCall",
    "AttnEdit",
    "attention_probs",
    "FrameLayout",
    "VideoAttnProcessor",
    "select_kv",
    "NEEDS_ANCHOR",
    "NEEDS_PREVIOUS",
    "RULES",
    "get_rule",
]
