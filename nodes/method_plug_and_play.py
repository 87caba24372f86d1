"""Attention Injector (Plug-and-Play): the source's decoder features and self-attention Q/K, from a live branch."""

from __future__ import annotations

from ..pipelines_core.methods.plug_and_play import PnPParams, pnp_injection
from .methods import FRACTION, INVERSION, InjectorNode, MethodNode, Paper


class VE_InjectPlugAndPlay(InjectorNode):
    DESCRIPTION = (
        "What the Cross-Frame Sampler injects from DDIM Invert, the Plug-and-Play way: decoder residual features "
        "and self-attention Q/K from a live source branch, so the edit keeps the source's layout (sample with "
        "DDIM Invert's steps). Defaults are the paper's (Tumanyan et al., CVPR 2023)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion": INVERSION,
                "pnp_f_t": ("FLOAT", {"default": 0.8, **FRACTION,
                                      "tooltip": "Inject residual features for this fraction of steps."}),
                "pnp_attn_t": ("FLOAT", {"default": 0.5, **FRACTION,
                                         "tooltip": "Inject self-attention Q/K for this fraction."}),
            }
        }

    def build(self, inversion, pnp_f_t, pnp_attn_t):
        return (pnp_injection(inversion, PnPParams(pnp_f_t, pnp_attn_t)),)


METHOD = MethodNode(
    name="Plug-and-Play", display_name="Attention Injector (Plug-and-Play)", node=VE_InjectPlugAndPlay,
    paper=Paper("Plug-and-Play Diffusion Features for Text-Driven Image-to-Image Translation", "Tumanyan et al.",
                "CVPR 2023", "https://arxiv.org/abs/2211.12572"),
    mechanism="decoder residual features and self-attention Q/K copied from a live source branch",
    workflows=("vidtome_edit.json",),
)
