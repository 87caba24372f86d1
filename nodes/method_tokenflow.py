"""Attention Injector (TokenFlow): Plug-and-Play on keyframes, propagated to every frame by nearest neighbours."""

from __future__ import annotations

from ..pipelines_core.methods.tokenflow import TokenFlowParams, tokenflow_injection
from .method_plug_and_play import VE_InjectPlugAndPlay
from .methods import InjectorNode, MethodNode, Paper


class VE_InjectTokenFlow(InjectorNode):
    DESCRIPTION = (
        "What the Cross-Frame Sampler injects from DDIM Invert, the TokenFlow way: Plug-and-Play + keyframe "
        "extended attention propagated to every frame by nearest neighbours (sample with DDIM Invert's steps). "
        "Defaults are the paper's (Geyer et al., ICLR 2024)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **VE_InjectPlugAndPlay.INPUT_TYPES()["required"],  # inversion, pnp_f_t, pnp_attn_t
                "keyframe_every": ("INT", {"default": 8, "min": 1, "max": 256,
                                           "tooltip": "One random keyframe per this many frames, every step."}),
                "keyframe_weights": (["linear", "sigmoid"], {"default": "linear",
                                                             "tooltip": "The paper's linear blend of the two nearest "
                                                                        "keyframes, or the official code's sigmoid."}),
            }
        }

    def build(self, inversion, pnp_f_t, pnp_attn_t, keyframe_every, keyframe_weights):
        return (tokenflow_injection(inversion, TokenFlowParams(pnp_f_t, pnp_attn_t, keyframe_every, keyframe_weights)),)


METHOD = MethodNode(
    name="TokenFlow", display_name="Attention Injector (TokenFlow)", node=VE_InjectTokenFlow,
    paper=Paper("TokenFlow: Consistent Diffusion Features for Consistent Video Editing", "Geyer et al.", "ICLR 2024",
                "https://arxiv.org/abs/2307.10373"),
    mechanism="Plug-and-Play + random keyframes edited with extended attention, their outputs propagated to every "
              "frame by nearest-neighbour source features",
    workflows=("tokenflow_edit.json",),
)
