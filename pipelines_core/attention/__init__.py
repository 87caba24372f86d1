"""Attention for video: cross-frame rules, the video attention processor, attach/restore."""

from .attach import attention_processors, is_self_attention
from .processor import (
    AttnCall, AttnEdit, FrameLayout, TokenRestore, VideoAttnProcessor, attention_probs, select_kv,
)
from .rules import RULES, Rule, get_rule

__all__ = [
    "attention_processors",
    "is_self_attention",
    "AttnCall",
    "AttnEdit",
    "attention_probs",
    "FrameLayout",
    "TokenRestore",
    "VideoAttnProcessor",
    "select_kv",
    "Rule",
    "RULES",
    "get_rule",
]
