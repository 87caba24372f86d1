"""ControlNet Condition: structure guidance for the sampler from per-frame hint maps."""

from __future__ import annotations

import os

from . import comfy_bridge
from ..pipelines_core.models.controlnet import ControlStack, ControlUnit, check_unit_settings, load_controlnet, place
from ..pipelines_core.models.hints import PREPROCESSORS, make_hints
from ..pipelines_core.models.model import BUILTIN_TINY, BUILTIN_TINY_SDXL
from ..pipelines_core.models.tiny import tiny_controlnet, tiny_sdxl_controlnet

BUILTIN_TINY_CONTROLNET = "builtin:tiny"
TINY_CONTROLNETS = {BUILTIN_TINY: tiny_controlnet, BUILTIN_TINY_SDXL: tiny_sdxl_controlnet}  # model -> its ControlNet


def controlnet_choices() -> list[str]:
    return [BUILTIN_TINY_CONTROLNET] + comfy_bridge.model_files("controlnet")


def resolve_controlnet(name: str) -> str:
    """A ControlNet in ComfyUI's models/controlnet, or a path (file or diffusers folder)."""
    path = comfy_bridge.model_path("controlnet", name) or os.path.expanduser(name)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"ControlNet Condition: {name!r} not found; pick one from models/controlnet or give a path")
    return path


def load_named_controlnet(name: str, model):
    if name == BUILTIN_TINY_CONTROLNET:
        if model.source not in TINY_CONTROLNETS:
            raise ValueError(f"ControlNet Condition: the builtin:tiny ControlNet only fits the "
                             f"{' and '.join(TINY_CONTROLNETS)} models, not {model.source!r}: pick a ControlNet "
                             f"made for its family")
        controlnet = place(TINY_CONTROLNETS[model.source](model.unet), model.device, model.dtype)
    else:
        controlnet = load_controlnet(resolve_controlnet(name), dtype=model.dtype, device=model.device)
    if comfy_bridge.is_managed(model.unet):  # follows its model's keep_loaded choice
        comfy_bridge.manage_memory([controlnet], model.device)
    return controlnet


class VE_ControlNetCondition:
    DESCRIPTION = (
        "Guide the sampler with a ControlNet from per-frame hints: the frames themselves, Canny edges, or a "
        "controlnet-aux detector (depth, HED, lineart, openpose) whose weights you keep in a local folder. "
        "Chain several to stack ControlNets."
    )
    CATEGORY = "video edit/control"
    RETURN_TYPES = ("VE_CONTROL", "IMAGE")
    RETURN_NAMES = ("control", "hints")
    OUTPUT_TOOLTIPS = ("The ControlNet(s) with their hints, for the sampler (and DDIM Invert).",
                       "The hint maps, to look at.")
    FUNCTION = "condition"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("VE_MODEL", {"tooltip": "The model the ControlNet guides (gives its device and dtype)."}),
                "frames": ("IMAGE", {"tooltip": "The clip the hints are made from (same size as the sampled frames)."}),
                "controlnet": (controlnet_choices(), {
                    "tooltip": "A ControlNet from models/controlnet (diffusers folder or single file), a path, "
                               "or builtin:tiny (random, for the builtin:tiny and builtin:tiny-sdxl models)."}),
                "preprocessor": (list(PREPROCESSORS), {"default": "canny",
                                                       "tooltip": "none: the frames already are hints; canny: edges; "
                                                                  "others need annotator weights in annotator_dir."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                       "tooltip": "How strongly the ControlNet steers (0 = off)."}),
                "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Fraction of the steps after which the ControlNet starts acting."}),
                "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Fraction of the steps after which it stops acting."}),
                "guess_mode": ("BOOLEAN", {"default": False,
                                           "tooltip": "Apply only to the conditional half (works without a prompt)."}),
                "cross_frame_attention": ("BOOLEAN", {"default": True,
                                                      "tooltip": "Use the sampler's cross-frame attention inside the "
                                                                 "ControlNet too (Text2Video-Zero does)."}),
            },
            "optional": {
                "control": ("VE_CONTROL", {"tooltip": "An earlier ControlNet Condition to stack with."}),
                "annotator_dir": ("STRING", {"default": "",
                                             "tooltip": "Folder with the detector weights (e.g. dpt_hybrid-midas-501f0c75.pt, "
                                                        "ControlNetHED.pth); never downloaded."}),
                "low_threshold": ("INT", {"default": 100, "min": 0, "max": 255, "tooltip": "Canny low threshold."}),
                "high_threshold": ("INT", {"default": 200, "min": 0, "max": 255, "tooltip": "Canny high threshold."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, controlnet):
        if controlnet == BUILTIN_TINY_CONTROLNET:
            return True
        try:
            resolve_controlnet(controlnet)
        except FileNotFoundError as e:
            return str(e)
        return True

    def condition(self, model, frames, controlnet, preprocessor, strength, start, end, guess_mode,
                  cross_frame_attention, control=None, annotator_dir="", low_threshold=100, high_threshold=200):
        check_unit_settings(strength, start, end)
        hints = make_hints(frames, preprocessor, annotator_dir=annotator_dir or None, device=str(model.device),
                           low_threshold=low_threshold, high_threshold=high_threshold,
                           progress=comfy_bridge.progress("ControlNet hints"))
        unit = ControlUnit(load_named_controlnet(controlnet, model), hints, strength, start, end, guess_mode,
                           cross_frame_attention, name=controlnet)
        stack = (control if control is not None else ControlStack()).add(unit)
        return (stack, hints.permute(0, 2, 3, 1).contiguous())
