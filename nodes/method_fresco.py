"""Attention Injector (FRESCO): spatial-guided, efficient cross-frame and temporal-guided attention in the finest
decoder layers, and feature optimisation at the decoder blocks' inputs, over batches of keyframes."""

from __future__ import annotations

from ..pipelines_core.methods.fresco import FrescoParams, fresco_injection
from .methods import FRACTION, InjectorNode, MethodNode, Paper

SWITCH = "BOOLEAN"


class VE_InjectFRESCO(InjectorNode):
    DESCRIPTION = (
        "FRESCO for the Cross-Frame Sampler (SDEdit from the same frames, with a ControlNet): in the two finest "
        "decoder levels, queries guided by the input frames' own self-attention (first step), keys/values of the "
        "batch's first frame plus each later frame's newly visible tokens, and attention along optical-flow "
        "trajectories; decoder features optimised (Adam) toward flow-warped neighbours and the input frames' "
        "spatial correlations. Frames go in batches of batch_size that carry the first frame and the previous "
        "batch's last (the sampler's chunk_size does not apply). Defaults are the paper's code (Yang et al., "
        "CVPR 2024)."
    )
    CATEGORY = "video edit/sampling"

    @classmethod
    def INPUT_TYPES(cls):
        defaults = FrescoParams()
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The source clip (the frames the sampler edits and Flow Warp saw): "
                                                "their features guide the spatial attention and loss."}),
                "flow": ("VE_FLOW", {"tooltip": "From Flow Warp on the same frames."}),
                "spatial_attention": (SWITCH, {"default": defaults.spatial_attention,
                                               "tooltip": "Spatial-guided attention: queries re-assembled with the "
                                                          "input frames' own attention pattern."}),
                "cross_frame_attention": (SWITCH, {"default": defaults.cross_frame_attention,
                                                   "tooltip": "Keys/values of the batch's first frame plus only the "
                                                              "newly visible (occluded) tokens of later frames."}),
                "temporal_attention": (SWITCH, {"default": defaults.temporal_attention,
                                                "tooltip": "Attention along optical-flow trajectories (FLATTEN's)."}),
                "temporal_loss": (SWITCH, {"default": defaults.temporal_loss,
                                           "tooltip": "Optimise decoder features toward their flow-warped "
                                                      "neighbours (occlusion-masked)."}),
                "spatial_loss": (SWITCH, {"default": defaults.spatial_loss,
                                          "tooltip": "Optimise decoder features toward the input frames' token "
                                                     "correlations (Gram matrices)."}),
                "spatial_steps": ("INT", {"default": defaults.spatial_steps, "min": 0, "max": 1000,
                                          "tooltip": "Spatial-guided attention for this many first steps."}),
                "temporal_until": ("INT", {"default": defaults.temporal_until, "min": 0, "max": 1000,
                                           "tooltip": "Temporal-guided attention while the timestep is at least "
                                                      "this (0..1000)."}),
                "optimize_until": ("FLOAT", {"default": defaults.optimize_until, **FRACTION,
                                             "tooltip": "Optimise the features for this fraction of the steps."}),
                "iterations": ("INT", {"default": defaults.iterations, "min": 0, "max": 200,
                                       "tooltip": "Adam iterations per optimisation."}),
                "lr": ("FLOAT", {"default": defaults.lr, "min": 0.0, "max": 10.0, "step": 0.01,
                                 "tooltip": "Adam's learning rate."}),
                "spatial_weight": ("FLOAT", {"default": defaults.spatial_weight, "min": 0.0, "max": 10000.0,
                                             "step": 1.0, "tooltip": "Weight of the spatial (Gram) loss."}),
                "attention_scale": ("FLOAT", {"default": defaults.attention_scale, "min": 0.0, "max": 10.0,
                                              "step": 0.01,
                                              "tooltip": "Scale on the keys of the spatial- and temporal-guided "
                                                         "attention (lower = softer)."}),
                "batch_size": ("INT", {"default": defaults.batch_size, "min": 3, "max": 64,
                                       "tooltip": "Frames per batch (each batch after the first carries 2)."}),
            },
            "optional": {
                "inversion": ("VE_INVERSION", {"tooltip": "From DDIM Invert, to start from it. Leave unconnected to "
                                                          "edit the sampler's images (the paper's SDEdit)."}),
            },
        }

    def build(self, frames, flow, spatial_attention, cross_frame_attention, temporal_attention, temporal_loss,
              spatial_loss, spatial_steps, temporal_until, optimize_until, iterations, lr, spatial_weight,
              attention_scale, batch_size, inversion=None):
        params = FrescoParams(spatial_attention, cross_frame_attention, temporal_attention, temporal_loss,
                              spatial_loss, spatial_steps, temporal_until, optimize_until, iterations, lr,
                              spatial_weight, attention_scale, batch_size)
        return (fresco_injection(frames, flow, inversion, params),)


METHOD = MethodNode(
    name="FRESCO", display_name="Attention Injector (FRESCO)", node=VE_InjectFRESCO,
    paper=Paper("FRESCO: Spatial-Temporal Correspondence for Zero-Shot Video Translation", "Yang et al.",
                "CVPR 2024", "https://arxiv.org/abs/2403.12962"),
    mechanism="spatial-guided, first-frame + newly-visible-token and flow-trajectory attention in the finest "
              "decoder levels; decoder features optimised toward warped neighbours and the input's correlations "
              "(Adam); batches carrying 2 frames",
    workflows=("fresco_edit.json",),
)
