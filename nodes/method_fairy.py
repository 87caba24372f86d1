"""Attention Injector (Fairy): every frame's self-attention reads the keys/values of a few anchor frames, cached per
step, so the other frames run in independent chunks."""

from __future__ import annotations

from ..pipelines_core.methods.fairy import FairyParams, fairy_injection
from .methods import InjectorNode, MethodNode, Paper


class VE_InjectFairyAnchors(InjectorNode):
    DESCRIPTION = (
        "Fairy's anchor-based cross-frame attention for the Cross-Frame Sampler: at every step the anchor frames "
        "(evenly spaced) are denoised first and the keys/values of their self-attention cached; every other frame "
        "attends to those anchors only, in independent chunks of the sampler's chunk_size (no context frames). "
        "Replaces the sampler's attention rule in the UNet. Works from images (SDEdit) or, connected, an inversion. "
        "Default 3 anchors (Wu et al., CVPR 2024; the paper's fine-tuning is not part of this node)."
    )
    OUTPUT_TOOLTIPS = ("The injection, for the Cross-Frame Sampler (with the same inversion, if one is connected).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "anchors": ("INT", {"default": 3, "min": 1, "max": 64,
                                    "tooltip": "Anchor frames, evenly spaced over the clip (first and last "
                                               "included); every frame attends to them. More: steadier, more "
                                               "memory (their keys/values are held for one step)."}),
            },
            "optional": {
                "inversion": ("VE_INVERSION", {"tooltip": "From DDIM Invert: start from its latents. Leave "
                                                          "unconnected to edit the sampler's images (SDEdit)."}),
            },
        }

    def build(self, anchors, inversion=None):
        return (fairy_injection(inversion, FairyParams(anchors)),)


METHOD = MethodNode(
    name="Fairy", display_name="Attention Injector (Fairy)", node=VE_InjectFairyAnchors,
    paper=Paper("Fairy: Fast Parallelized Instruction-Guided Video-to-Video Synthesis", "Wu et al.", "CVPR 2024",
                "https://arxiv.org/abs/2312.13834"),
    mechanism="self-attention keys/values of a few anchor frames, computed first and cached per step; the other "
              "frames attend to them in independent chunks",
    workflows=("fairy_anchor_edit.json",),
)
