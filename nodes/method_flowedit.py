"""Velocity Difference Edit (FlowEdit): inversion-free editing with a flow-matching model."""

from __future__ import annotations

from ..pipelines_core.methods.flowedit import FlowEditParams, flowedit_injection
from .methods import InjectorNode, MethodNode, Paper


class VE_InjectFlowEdit(InjectorNode):
    DESCRIPTION = (
        "FlowEdit for Flux models, with no inversion: from the clip's latents, each step noises the clip afresh and "
        "moves the edit by the difference of the model's velocities under the sampler's prompt (the target, guided "
        "by its cfg) and the source prompt. It brings its own start: connect the clip here and nothing as the "
        "sampler's start. Defaults are the paper's for Flux (28 sampler steps, n_max 24, source guidance 1.5, cfg 5.5)."
    )
    CATEGORY = "video edit/sampling"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The clip to edit (sizes a multiple of 16)."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "",
                                             "tooltip": "Describes the clip; the sampler's prompt is the edit."}),
                "n_max": ("INT", {"default": 24, "min": 1, "max": 1000,
                                  "tooltip": "Steps FlowEdit runs: the last n_max of the sampler's. More = a stronger "
                                             "edit, less of the clip kept."}),
                "n_min": ("INT", {"default": 0, "min": 0, "max": 1000,
                                  "tooltip": "Of those, the last n_min sample plainly (extra detail; 0 on Flux)."}),
                "n_avg": ("INT", {"default": 1, "min": 1, "max": 16,
                                  "tooltip": "Noise draws averaged per step (slower, smoother)."}),
                "source_guidance": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                              "tooltip": "Guidance of the source velocity (the target's is cfg)."}),
            },
        }

    def build(self, images, source_prompt, n_max, n_min, n_avg, source_guidance):
        return (flowedit_injection(images, FlowEditParams(source_prompt, n_max, n_min, n_avg, source_guidance)),)


METHOD = MethodNode(
    name="FlowEdit", display_name="Velocity Difference Edit (FlowEdit)", node=VE_InjectFlowEdit,
    paper=Paper("FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models",
                "Kulikov et al.", "arXiv 2024", "https://arxiv.org/abs/2412.08629"),
    mechanism="Flux, no inversion: from the clip, each step noises it afresh and moves the edit by the difference "
              "of the target- and source-prompt velocities",
    workflows=("flux_flowedit.json",),
)
