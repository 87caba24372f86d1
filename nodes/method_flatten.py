"""Attention Injector (FLATTEN): dense all-frames attention, then attention along optical-flow trajectories,
with the source's decoder features and Q/K injected."""

from __future__ import annotations

from ..pipelines_core.methods.flatten import FLOW_LAYERS, FlattenParams, flatten_injection
from .methods import FRACTION, INVERSION, InjectorNode, MethodNode, Paper


class VE_InjectFLATTEN(InjectorNode):
    DESCRIPTION = (
        "What the Cross-Frame Sampler injects from DDIM Invert (empty source prompt), the FLATTEN way: every "
        "self-attention layer attends to all frames, then each token attends to the tokens on its optical-flow "
        "trajectory (from Flow Warp on the same frames); the source's decoder features and self-attention Q/K are "
        "injected early (sample with DDIM Invert's steps, strength 1.0). Defaults are the paper's (Cong et al., "
        "ICLR 2024)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion": INVERSION,
                "flow": ("VE_FLOW", {"tooltip": "From Flow Warp, run on the same frames as DDIM Invert."}),
                "inject": ("FLOAT", {"default": 0.8, **FRACTION,
                                     "tooltip": "Inject the source's features and Q/K for this fraction of steps."}),
                "flow_layers": (list(FLOW_LAYERS), {"default": "all",
                                                    "tooltip": "Trajectory attention in every self-attention layer "
                                                               "(all), only at the latent's own resolution (finest: "
                                                               "the official code), or none."}),
            }
        }

    def build(self, inversion, flow, inject, flow_layers):
        return (flatten_injection(inversion, flow, FlattenParams(inject, flow_layers)),)


METHOD = MethodNode(
    name="FLATTEN", display_name="Attention Injector (FLATTEN)", node=VE_InjectFLATTEN,
    paper=Paper("FLATTEN: optical FLow-guided ATTENtion for consistent text-to-video editing", "Cong et al.",
                "ICLR 2024", "https://arxiv.org/abs/2310.05922"),
    mechanism="all-frames self-attention, then attention along optical-flow trajectories + source decoder "
              "features and Q/K from a live source branch",
    workflows=("flatten_edit.json",),
)
