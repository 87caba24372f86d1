"""RF-Inversion Invert: a clip driven up a flow-matching model's schedule by the controlled forward ODE (Flux)."""

from __future__ import annotations

from . import comfy_bridge
from ..pipelines_core.attention import RULES
from ..pipelines_core.methods.rf_inversion import rf_invert


class VE_RFInvert:
    DESCRIPTION = (
        "RF-Inversion's controlled forward ODE (Rout et al., ICLR 2025) for Flux models: from the clip's latents up "
        "the sampling schedule, following the model's velocity (empty prompt, no guidance) pulled by gamma towards "
        "a seeded noise sample. Feed it to Controlled Reverse ODE (RF-Inversion) and the Cross-Frame Sampler, with "
        "the same steps. gamma 0 is plain flow inversion."
    )
    CATEGORY = "video edit/inversion"
    RETURN_TYPES = ("VE_INVERSION",)
    RETURN_NAMES = ("inversion",)
    OUTPUT_TOOLTIPS = ("The inverted latents and the clip's own, for Controlled Reverse ODE (RF-Inversion).",)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("VE_MODEL", {"tooltip": "A Flux model (Load Model)."}),
                "frames": ("IMAGE", {"tooltip": "The source clip (sizes a multiple of 16)."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The inversion's prompt; the paper inverts with an empty one."}),
                "steps": ("INT", {"default": 28, "min": 2, "max": 1000,
                                  "tooltip": "Steps of the schedule; the sampler must use the same number."}),
                "gamma": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "Pull towards the noise sample: 0 = plain inversion (faithful, harder "
                                               "to edit), 1 = the noise itself (free, forgets the clip). Paper: 0.5."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seeds the noise sample, frame f with seed + f."}),
                "attention": (list(RULES), {"default": "none",
                                            "tooltip": "Cross-frame rule on the image tokens during inversion."}),
                "chunk_size": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "Frames inverted together."}),
            },
        }

    def invert(self, model, frames, prompt, steps, gamma, seed, attention, chunk_size):
        return (rf_invert(model, frames, prompt, steps, gamma, seed, attention, chunk_size,
                          progress=comfy_bridge.progress("RF-Inversion Invert")),)
