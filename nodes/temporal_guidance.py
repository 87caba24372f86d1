"""Temporal Guidance: how the sampler uses the source clip's optical flow to keep frames consistent."""

from __future__ import annotations

from ..pipelines_core.methods.temporal_guidance import TemporalGuidance


def _window(on: bool, start: float, end: float):
    return (start, end) if on else None  # TemporalGuidance checks the windows it is given


class VE_TemporalGuidance:
    DESCRIPTION = (
        "Flow-based temporal consistency for the Cross-Frame Sampler: Rerender-A-Video's x̂0 warp fusion, AdaIN "
        "colour matching and pixel-aware fusion; ControlVideo's interleaved-frame smoother; Text2Video-Zero's "
        "motion-dynamics start (follows the flow's mean motion; generation from noise only)."
    )
    CATEGORY = "video edit/flow"
    RETURN_TYPES = ("VE_TEMPORAL",)
    RETURN_NAMES = ("temporal",)
    OUTPUT_TOOLTIPS = ("Temporal guidance for the Cross-Frame Sampler.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        window = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "x0_warp": ("BOOLEAN", {"default": True,
                                        "tooltip": "Rerender shape-aware fusion: each frame's x̂0 takes the previous "
                                                   "frame's, warped by the flow, where not occluded."}),
                "x0_warp_start": ("FLOAT", {"default": 0.0, **window, "tooltip": "Start of the warp window (fraction of steps)."}),
                "x0_warp_end": ("FLOAT", {"default": 0.1, **window, "tooltip": "End of the warp window (Rerender: 0.1)."}),
                "adain": ("BOOLEAN", {"default": True,
                                      "tooltip": "Match every frame's x̂0 colour statistics to frame 0's."}),
                "adain_start": ("FLOAT", {"default": 0.8, **window, "tooltip": "Start of the AdaIN window."}),
                "adain_end": ("FLOAT", {"default": 1.0, **window, "tooltip": "End of the AdaIN window."}),
                "pixel_fusion": ("BOOLEAN", {"default": False,
                                             "tooltip": "Rerender pixel-aware fusion: a second pass re-noised toward "
                                                        "flow-fused frames (twice the sampling time)."}),
                "pixel_start": ("FLOAT", {"default": 0.5, **window, "tooltip": "Start of the re-noise window (Rerender: 0.5)."}),
                "pixel_end": ("FLOAT", {"default": 0.8, **window, "tooltip": "End of the re-noise window (Rerender: 0.8)."}),
                "pixel_strength": ("FLOAT", {"default": 0.5, **window, "tooltip": "Rerender mask_strength."}),
                "smoother": ("BOOLEAN", {"default": False,
                                         "tooltip": "ControlVideo interleaved-frame smoother at 60% of the steps "
                                                    "(flow interpolation stands in for RIFE)."}),
                "motion": ("BOOLEAN", {"default": False,
                                       "tooltip": "Text2Video-Zero motion dynamics: frames start from frame 0 moved by "
                                                  "the flow's mean motion (only when generating from noise, DDIM)."}),
            },
            "optional": {
                "flow": ("VE_FLOW", {"tooltip": "The SOURCE clip's flow from Flow Warp (needed by warp, pixel fusion, motion)."}),
            },
        }

    def build(self, x0_warp, x0_warp_start, x0_warp_end, adain, adain_start, adain_end, pixel_fusion, pixel_start,
              pixel_end, pixel_strength, smoother, motion, flow=None):
        guidance = TemporalGuidance(
            flow=flow,
            x0_warp=_window(x0_warp, x0_warp_start, x0_warp_end),
            adain=_window(adain, adain_start, adain_end),
            pixel_fusion=_window(pixel_fusion, pixel_start, pixel_end),
            pixel_strength=pixel_strength, smoother=smoother, motion=motion,
        )
        return (guidance,)
