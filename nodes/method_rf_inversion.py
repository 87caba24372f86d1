"""Controlled Reverse ODE (RF-Inversion): sampling from an RF-Inversion pulled back towards the clip."""

from __future__ import annotations

from ..pipelines_core.methods.rf_inversion import RFInversionParams, rf_inversion_injection
from .methods import FRACTION, InjectorNode, MethodNode, Paper


class VE_InjectRFInversion(InjectorNode):
    DESCRIPTION = (
        "RF-Inversion's controlled reverse ODE for Flux models: the Cross-Frame Sampler starts from RF-Inversion "
        "Invert's latents (connect nothing else as its start) and, on the steps from start to stop, its velocity is "
        "pulled by eta towards the straight path back to the clip, keeping its layout while the prompt edits. "
        "eta 0 is plain sampling from the inversion. Defaults: eta 0.9 on the first 38 % of the steps (Rout et al.)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion": ("VE_INVERSION", {"tooltip": "From RF-Inversion Invert (same model and steps)."}),
                "eta": ("FLOAT", {"default": 0.9, **FRACTION,
                                  "tooltip": "Pull towards the clip: higher keeps more of it, lower edits more."}),
                "start": ("FLOAT", {"default": 0.0, **FRACTION, "tooltip": "Fraction of the steps where the pull begins."}),
                "stop": ("FLOAT", {"default": 0.38, **FRACTION, "tooltip": "Fraction of the steps where it ends."}),
            },
        }

    def build(self, inversion, eta, start, stop):
        return (rf_inversion_injection(inversion, RFInversionParams(eta, start, stop)),)


METHOD = MethodNode(
    name="RF-Inversion", display_name="Controlled Reverse ODE (RF-Inversion)", node=VE_InjectRFInversion,
    paper=Paper("Semantic Image Inversion and Editing using Rectified Stochastic Differential Equations",
                "Rout et al.", "ICLR 2025", "https://arxiv.org/abs/2410.10792"),
    mechanism="Flux: a controlled forward ODE (pulled by gamma towards noise) inverts the clip; sampling back, the "
              "velocity is pulled by eta towards the straight path to the clip on the first steps",
    workflows=("flux_rf_inversion_edit.json",),
)
