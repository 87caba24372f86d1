"""Grid Shuffle (RAVE): frames tiled into grids, shuffled anew at every denoising step."""

from __future__ import annotations

from ..pipelines_core.methods.rave import MAX_GRID, RAVEParams, rave_injection
from .methods import InjectorNode, MethodNode, Paper


class VE_InjectRAVE(InjectorNode):
    DESCRIPTION = (
        "RAVE for the Cross-Frame Sampler (attention none): at every step the frames are shuffled at random and "
        "tiled into n x n grids, which the model denoises as single images, so self-attention inside a grid "
        "spans n^2 frames and the shuffle spreads it over the clip; ControlNet hints are gridded alike. "
        "Defaults are the paper's (Kara et al., CVPR 2024)."
    )
    CATEGORY = "video edit/sampling"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "grid_size": ("INT", {"default": 3, "min": 1, "max": MAX_GRID,
                                      "tooltip": "n: frames per grid side (n x n frames per grid). The frame count "
                                                 "is padded to a multiple of n^2 by repeating frames."}),
                "shuffle": ("BOOLEAN", {"default": True,
                                        "tooltip": "Shuffle frames into new grids at every step (seeded by the "
                                                   "sampler's seed). Off: fixed grids of consecutive frames."}),
            },
            "optional": {
                "inversion": ("VE_INVERSION", {"tooltip": "From DDIM Invert (the paper starts from it, strength "
                                                          "1). Leave unconnected to edit the sampler's images or "
                                                          "to generate."}),
            },
        }

    def build(self, grid_size, shuffle, inversion=None):
        return (rave_injection(inversion, RAVEParams(grid_size, shuffle)),)


METHOD = MethodNode(
    name="RAVE", display_name="Grid Shuffle (RAVE)", node=VE_InjectRAVE,
    paper=Paper("RAVE: Randomized Noise Shuffling for Fast and Consistent Video Editing with Diffusion Models",
                "Kara et al.", "CVPR 2024", "https://arxiv.org/abs/2312.04524"),
    mechanism="frames shuffled at random every step and tiled into n×n grids denoised as single images "
              "(ControlNet hints gridded alike)",
    workflows=("rave_edit.json",),
)
