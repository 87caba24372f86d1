"""Attention Injector (vid2vid-zero): spatial-temporal attention + cross-attention guidance over null-text inversion."""

from __future__ import annotations

from ..pipelines_core.methods.vid2vid_zero import ATTENTION, MODES, Vid2VidZeroParams, vid2vid_zero_injection
from .methods import FRACTION, INVERSION, InjectorNode, MethodNode, Paper


class VE_InjectVid2VidZero(InjectorNode):
    DESCRIPTION = (
        "What the Cross-Frame Sampler injects from DDIM Invert (null-text on), the vid2vid-zero way: every frame's "
        "self-attention reads all frames (source and edit alike), and the edit's cross-attention maps follow the "
        "source's (prompt-to-prompt) for the first steps. Defaults are the paper's code (Wang et al., 2023)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion": INVERSION,
                "st_attention": (list(ATTENTION), {"default": "all",
                                                "tooltip": "all: every self-attention layer reads all frames (the "
                                                           "paper; DDIM Invert needs attention 'all'); code: the "
                                                           "official configs (all frames in the first down, the mid "
                                                           "and the second up block, first+previous elsewhere)."}),
                "cross_replace": ("FLOAT", {"default": 0.8, **FRACTION,
                                            "tooltip": "The edit uses the source's cross-attention maps for this "
                                                       "fraction of the steps (0 turns the guidance off)."}),
                "mode": (list(MODES), {"default": "auto",
                                       "tooltip": "How target words read source maps: replace (word i <-> word i), "
                                                  "refine (new words keep their own maps), auto (replace when "
                                                  "both prompts have as many words, as the code does)."}),
                "null_uncond_ratio": ("FLOAT", {"default": -0.5, "min": -1.0, "max": 1.0, "step": 0.05,
                                                "tooltip": "Steps that use the null-text embeddings: r > 0 the first "
                                                           "r of them, r < 0 the last -r (the code: -0.5), 1 all "
                                                           "(the closest reconstruction)."}),
            }
        }

    def build(self, inversion, st_attention, cross_replace, mode, null_uncond_ratio):
        params = Vid2VidZeroParams(st_attention, cross_replace, mode, null_uncond_ratio)
        return (vid2vid_zero_injection(inversion, params),)


METHOD = MethodNode(
    name="vid2vid-zero", display_name="Attention Injector (vid2vid-zero)", node=VE_InjectVid2VidZero,
    paper=Paper("Zero-Shot Video Editing Using Off-The-Shelf Image Diffusion Models", "Wang et al.", "arXiv 2023",
                "https://arxiv.org/abs/2303.17599"),
    mechanism="self-attention over all frames in the source and the edit + prompt-to-prompt cross-attention "
              "guidance from a live source branch, over null-text inversion",
    workflows=("vid2vid_zero_edit.json",),
)
