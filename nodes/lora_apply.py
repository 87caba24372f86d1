"""LoRA Apply: a model with a LoRA added, leaving the incoming model as it was."""

from __future__ import annotations

from . import comfy_bridge
from ..pipelines_core.models.lora import add_lora


def lora_choices() -> list[str]:
    return comfy_bridge.model_files("loras") + ["tiny_style_lora.safetensors"]


def resolve_lora(name: str) -> str:
    found = comfy_bridge.find_file(name, "loras")
    if found:
        return found
    raise FileNotFoundError(f"LoRA Apply: LoRA {name!r} not found; pick one from models/loras or give a file path")


class VE_LoRAApply:
    DESCRIPTION = (
        "Add a LoRA (kohya/A1111 or diffusers/peft layout) at a strength. Chain several to stack them. "
        "Non-destructive: the incoming model is unchanged, so a branch without the LoRA still gives the base result."
    )
    CATEGORY = "video edit/models"
    RETURN_TYPES = ("VE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA active whenever it samples.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("VE_MODEL", {"tooltip": "From Load Model or another LoRA Apply."}),
                "lora": (lora_choices(), {"tooltip": "A LoRA from ComfyUI's models/loras, or a file path "
                                                    "(tiny_style_lora.safetensors is bundled for builtin:tiny)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                       "tooltip": "Scale of the LoRA's change (0 = off, 1 = as trained)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora):
        try:
            resolve_lora(lora)
        except FileNotFoundError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, lora, **_):
        return comfy_bridge.file_fingerprint(comfy_bridge.find_file(lora, "loras"))

    def apply(self, model, lora, strength):
        return (add_lora(model, resolve_lora(lora), strength),)
