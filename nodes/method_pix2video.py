"""Attention Injector (Pix2Video): anchor + previous-frame decoder attention and x̂0 guidance."""

from __future__ import annotations

from ..pipelines_core.methods.pix2video import Pix2VideoParams, pix2video_injection
from .methods import FRACTION, INVERSION, InjectorNode, MethodNode, Paper


class VE_InjectPix2Video(InjectorNode):
    DESCRIPTION = (
        "What the Cross-Frame Sampler injects from DDIM Invert, the Pix2Video way: decoder self-attention on the "
        "anchor (first) and previous frames + x̂0 guidance toward the previous frame. Defaults are the paper's "
        "(Ceylan et al., ICCV 2023)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion": INVERSION,
                "guidance_weight": ("FLOAT", {"default": 100.0, "min": 0.0, "max": 10000.0, "step": 1.0,
                                              "tooltip": "x̂0 guidance weight (100 at 512 px; smaller latents need "
                                                         "less)."}),
                "guidance_until": ("FLOAT", {"default": 0.5, **FRACTION,
                                             "tooltip": "Guide for this fraction of the steps."}),
            }
        }

    def build(self, inversion, guidance_weight, guidance_until):
        return (pix2video_injection(inversion, Pix2VideoParams(guidance_weight, guidance_until)),)


METHOD = MethodNode(
    name="Pix2Video", display_name="Attention Injector (Pix2Video)", node=VE_InjectPix2Video,
    paper=Paper("Pix2Video: Video Editing using Image Diffusion", "Ceylan et al.", "ICCV 2023",
                "https://arxiv.org/abs/2303.12688"),
    mechanism="decoder self-attention on the anchor and previous frames + x̂0 guidance toward the previous frame",
    workflows=("pix2video_edit.json",),
)
