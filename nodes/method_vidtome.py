"""Attention Injector (VidToMe): self-attention over each chunk's tokens merged across frames, around an optional
inner injection (e.g. Plug-and-Play)."""

from __future__ import annotations

from ..pipelines_core.methods.vidtome import CHUNK_ORDERS, MERGE_MODES, VidToMeParams, vidtome_injection
from .methods import FRACTION, InjectorNode, MethodNode, Paper


class VE_InjectVidToMe(InjectorNode):
    DESCRIPTION = (
        "VidToMe: in the self-attention of the high-resolution UNet levels, the tokens of each chunk of frames are "
        "merged into one set by similarity (and with the previous chunk's), attended together, and unmerged, so "
        "frames share their attention outputs. Wraps an optional injection (Plug-and-Play from DDIM Invert, as in "
        "the paper) or works alone on any start. Defaults are the paper's (Li et al., CVPR 2024)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "local_merge_ratio": ("FLOAT", {"default": 0.9, **FRACTION,
                                                "tooltip": "Share of each chunk's non-destination tokens merged "
                                                           "into their most similar destination-frame token."}),
                "merge_global": ("BOOLEAN", {"default": True,
                                             "tooltip": "Also merge each chunk with the previous chunk's tokens "
                                                        "(consistency across chunks)."}),
                "global_merge_ratio": ("FLOAT", {"default": 0.8, **FRACTION,
                                                 "tooltip": "Share of the source side merged in the global merge."}),
                "global_rand": ("FLOAT", {"default": 0.5, **FRACTION,
                                          "tooltip": "Probability that the global tokens are the source side."}),
                "chunk_size": ("INT", {"default": 4, "min": 1, "max": 64,
                                       "tooltip": "Frames per chunk (one UNet call); replaces the sampler's "
                                                  "chunk_size while VidToMe runs."}),
                "chunk_order": (list(CHUNK_ORDERS), {"default": "mix",
                                                     "tooltip": "Order of the chunks each step: mix (a quarter "
                                                                "random, then in sequence), seq, or rand."}),
                "target_stride": ("INT", {"default": 4, "min": 1, "max": 64,
                                          "tooltip": "One random destination frame per this many frames."}),
                "max_downsample": ("INT", {"default": 2, "min": 1, "max": 8,
                                           "tooltip": "Merge in levels downsampled at most this much (2: SD's 64² "
                                                      "and 32² levels at 512 px)."}),
                "merge_mode": (list(MERGE_MODES), {"default": "replace",
                                                   "tooltip": "replace: a merged token takes its destination's "
                                                              "value; mean: destinations average what merges in."}),
                "align_batch": ("BOOLEAN", {"default": True,
                                            "tooltip": "One matching for the source, uncond and cond rows (always "
                                                       "on with Plug-and-Play's source branch)."}),
            },
            "optional": {
                "injection": ("VE_INJECTION", {"tooltip": "An injection VidToMe wraps (Plug-and-Play, as in the "
                                                          "paper); leave empty for VidToMe alone."}),
            },
        }

    def build(self, local_merge_ratio, merge_global, global_merge_ratio, global_rand, chunk_size, chunk_order,
              target_stride, max_downsample, merge_mode, align_batch, injection=None):
        params = VidToMeParams(local_merge_ratio, merge_global, global_merge_ratio, global_rand, chunk_size,
                               chunk_order, target_stride, max_downsample, merge_mode, align_batch)
        return (vidtome_injection(params, injection),)


METHOD = MethodNode(
    name="VidToMe", display_name="Attention Injector (VidToMe)", node=VE_InjectVidToMe,
    paper=Paper("VidToMe: Video Token Merging for Zero-Shot Video Editing", "Li et al.", "CVPR 2024",
                "https://arxiv.org/abs/2312.10656"),
    mechanism="self-attention tokens of each chunk merged across frames (and with the previous chunk) by "
              "bipartite soft matching, attended once and unmerged, around an optional Plug-and-Play injection",
    workflows=("vidtome_edit.json",),
)
