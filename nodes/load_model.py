"""Load Model: a Stable Diffusion model (builtin:tiny, a diffusers folder or a single-file checkpoint)."""

from __future__ import annotations

import logging
import os

from . import comfy_bridge
from ..pipelines_core.models.model import (BUILTIN_SD15_RANDOM, BUILTIN_TINY, BUILTIN_TINY_FLUX, BUILTIN_TINY_IP2P,
                                            BUILTIN_TINY_SDXL, DEVICES, DTYPES, load_model)

BUILTINS = (BUILTIN_TINY, BUILTIN_SD15_RANDOM, BUILTIN_TINY_IP2P, BUILTIN_TINY_SDXL, BUILTIN_TINY_FLUX)
log = logging.getLogger(__name__)


def model_choices() -> list[str]:
    return (list(BUILTINS) + comfy_bridge.model_files("checkpoints") + sorted(comfy_bridge.diffusers_folders())
            + comfy_bridge.model_files("diffusion_models"))  # FLUX.1 transformers live there


def resolve_model(name: str) -> str:
    if name in BUILTINS:
        return name
    found = (comfy_bridge.model_path("checkpoints", name) or comfy_bridge.diffusers_folders().get(name)
             or comfy_bridge.model_path("diffusion_models", name))
    if found:
        return found
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    raise FileNotFoundError(
        f"Load Model: {name!r} not found; pick a checkpoint, a diffusers folder, or give a path (builtin:tiny runs anywhere)"
    )


class VE_LoadModel:
    DESCRIPTION = (
        "Load an SD-1.5-class, SDXL or FLUX.1 model for video editing: a checkpoint from ComfyUI's checkpoints "
        "folder, a diffusers folder, a FLUX.1 transformer from models/diffusion_models (its ae, clip_l and t5xxl "
        "files are found in models/vae and models/text_encoders), a path, or a builtin (random weights, for trying "
        "graphs; not a real edit). The family is read from the weights and said in the log. InstructPix2Pix models "
        "(8-channel UNet; builtin:tiny-ip2p) edit by instruction; SDXL (builtin:tiny-sdxl) runs the sampler's own "
        "mechanisms, ControlNet, LoRA, RAVE and Fairy; Flux (builtin:tiny-flux) runs the sampler, FlowEdit and "
        "RF-Inversion. Methods a family cannot serve are refused by name before any step."
    )
    CATEGORY = "video edit/models"
    RETURN_TYPES = ("VE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("UNet, VAE, text encoder and tokenizer, on the chosen device.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (model_choices(), {
                    "tooltip": "An SD-1.5 or SDXL .safetensors checkpoint, a FLUX.1 transformer file, a diffusers "
                               "folder (models/diffusers), a path, or a builtin (builtin:tiny, -sdxl, -flux).",
                }),
                "dtype": (list(DTYPES), {"default": "fp32",
                                         "tooltip": "Weights precision: fp16/bf16 halve memory on a GPU; use fp32 on a CPU."}),
                "device": (list(DEVICES), {"default": "auto",
                                           "tooltip": "Where to run: auto = ComfyUI's device (GPU if any), or force one."}),
            },
            "optional": {
                "tokenizer": ("STRING", {"default": "",
                                         "tooltip": "Folder with CLIP's tokenizer (vocab.json, merges.txt) for a "
                                                    "single-file checkpoint; empty = next to the checkpoint or ComfyUI's own."}),
                "keep_loaded": ("BOOLEAN", {"default": False,
                                            "tooltip": "Inside ComfyUI: off = ComfyUI's model manager moves this model "
                                                       "off the GPU when it needs the memory or is told to free it "
                                                       "(loaded again when a node uses it); on = it stays on the device."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint):
        try:
            resolve_model(checkpoint)
        except FileNotFoundError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, checkpoint, **_):
        try:
            return comfy_bridge.file_fingerprint(resolve_model(checkpoint))
        except FileNotFoundError:
            return ""

    def load(self, checkpoint, dtype, device, tokenizer="", keep_loaded=False):
        source = resolve_model(checkpoint)
        # Only a single file lacks a tokenizer of its own; asking ComfyUI for one costs a tokenizer load.
        fallback = comfy_bridge.comfy_tokenizer_dirs() if os.path.isfile(source) and not tokenizer else []
        single = os.path.isfile(source)
        model = load_model(
            source, dtype=dtype, device=comfy_bridge.device_choice(device),
            tokenizer_dir=tokenizer or None, tokenizer_candidates=fallback,
            flux_search_dirs=comfy_bridge.flux_part_dirs() if single else (),
            t5_tokenizer_candidates=comfy_bridge.comfy_t5_tokenizer_dirs() if single else (),
        )
        log.info("Load Model: %s is %s", checkpoint, model.kind)  # say which recipe the sampler will run
        if not keep_loaded:
            modules = [model.unet, model.vae, model.text_encoder, model.text_encoder_2]
            comfy_bridge.manage_memory([m for m in modules if m is not None], model.device)
        return (model,)
