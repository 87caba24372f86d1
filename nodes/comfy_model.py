"""Use ComfyUI Model: the MODEL, CLIP and VAE a ComfyUI graph loaded (and patched) as a VE_MODEL.

The weights are read the way ComfyUI's own checkpoint save reads them (comfy.sd.save_checkpoint): the
patchers are loaded with `force_patch_weights=True`, so every LoRA / merge patch is baked into the weights
(also in low-VRAM mode, where ComfyUI otherwise applies patches on the fly during the forward pass), then
`model.model.state_dict_for_saving(clip_sd, vae_sd)` gives one state dict in the original SD-1.x checkpoint
layout. pipelines_core converts that exactly as it converts a file, into weights of its own.

What this leaves in ComfyUI is what a KSampler run leaves: the MODEL's and CLIP's patchers are ComfyUI's
"currently loaded" models, their shared torch modules hold the patched weights, and ComfyUI keeps the
originals in its backup and restores them itself before it loads a clone with other patches (e.g. the
checkpoint loader's output used without the LoRA by another branch). The patch lists, options and hooks of
the objects we were given are not touched.

ComfyUI's modules are imported inside the function only: the pack also runs headless, without ComfyUI.
"""

from __future__ import annotations

from . import comfy_bridge
from ..pipelines_core.models.model import DEVICES, DTYPES, model_from_state_dict

# ComfyUI's supported-model classes we convert: plain SD-1.x (SD15 covers 1.4/1.5 and their fine-tunes).
# Subclasses such as SD15_instructpix2pix have other inputs, so the match is on the exact class name.
SD1_MODEL_CONFIGS = ("SD15",)


def _extras(patcher) -> list[str]:
    """What a ModelPatcher changes besides weights (model options, object patches, hooks, wrappers...).

    These act while ComfyUI samples (FreeU, IPAdapter, model-sampling overrides, scheduled hook LoRAs, ...);
    our sampler cannot reproduce them, so a model carrying any is refused rather than silently converted
    without them.
    """
    found = []
    options = dict(getattr(patcher, "model_options", {}))
    transformer_options = options.pop("transformer_options", {}) or {}
    found += [f"model option '{k}'" for k in options]
    found += [f"transformer option '{k}'" for k in transformer_options]
    found += [f"object patch '{k}'" for k in getattr(patcher, "object_patches", {})]
    for attribute in ("hook_patches", "weight_wrapper_patches", "wrappers", "callbacks", "injections",
                      "additional_models"):
        if getattr(patcher, attribute, None):
            found.append(attribute.replace("_", " "))
    if getattr(patcher, "forced_hooks", None):
        found.append("hooks")
    return found


def _refuse_extras(what: str, patcher) -> None:
    extras = _extras(patcher)
    if extras:
        raise ValueError(
            f"Use ComfyUI Model: the {what} carries {', '.join(extras)}, which act only inside ComfyUI's own sampler; "
            "remove the node that adds them (only weight patches such as LoRAs and model merges carry over)."
        )


def comfy_checkpoint_state(model, clip, vae) -> tuple[dict, object, str]:
    """(state dict in the original SD-1.x checkpoint layout with all weight patches baked in, the CLIP
    tokenizer, a source name) from ComfyUI's MODEL, CLIP and VAE. Refuses non-SD-1.x inputs by name."""
    import comfy.model_management  # only ever called inside ComfyUI

    family = type(model.model.model_config).__name__
    if family not in SD1_MODEL_CONFIGS:
        raise ValueError(
            f"Use ComfyUI Model: the MODEL is ComfyUI's '{family}', not SD-1.x ({', '.join(SD1_MODEL_CONFIGS)}): "
            "the video sampler runs SD-1.5-class models only."
        )
    text_model = type(clip.cond_stage_model).__name__
    if text_model != "SD1ClipModel" or not hasattr(clip.tokenizer, "clip_l"):
        raise ValueError(
            f"Use ComfyUI Model: the CLIP is '{text_model}', not SD-1.x's CLIP-L (SD1ClipModel): connect the CLIP "
            "of the same SD-1.5 checkpoint."
        )
    if clip.layer_idx not in (None, -1):  # -1 is the last layer, i.e. no clip skip
        raise ValueError(
            f"Use ComfyUI Model: CLIP Set Last Layer ({clip.layer_idx}) is not supported: the video sampler uses "
            "CLIP's last layer; remove that node (or set -1) on this branch."
        )
    autoencoder = type(vae.first_stage_model).__name__
    if autoencoder != "AutoencoderKL" or vae.latent_channels != 4:
        raise ValueError(
            f"Use ComfyUI Model: the VAE is '{autoencoder}' with {vae.latent_channels} latent channels, "
            "not SD-1.x's KL autoencoder with 4: connect an SD-1.5 VAE."
        )
    _refuse_extras("MODEL", model)
    _refuse_extras("CLIP", clip.patcher)

    # As comfy.sd.save_checkpoint: load both patchers with their patches written into the weights, then
    # read the state dicts (after loading: patching replaces the parameter tensors).
    comfy.model_management.load_models_gpu([model, clip.patcher], force_patch_weights=True)
    state = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
    patched = len(model.patches) + len(clip.patcher.patches)
    source = f"comfyui:{family}" + (f"+{patched} patched weights" if patched else "")
    return state, clip.tokenizer.clip_l.tokenizer, source


class VE_FromComfyModel:
    DESCRIPTION = (
        "Use the SD-1.5 model a ComfyUI graph loaded (Load Checkpoint, then LoRA loaders / model merges) for video "
        "editing, with every weight patch baked in and without reading the file again. Costs one more copy of the "
        "weights in the chosen dtype (SD-1.5: about 4 GiB in fp32, 2 GiB in fp16/bf16) and the time to copy them "
        "(measured 3-13 s on a shared 2-core CPU, plus about 7 s the first time diffusers' converters load); "
        "ComfyUI keeps its own copy for its other nodes. Weights come in the precision ComfyUI holds them (its text "
        "encoder is fp16 unless ComfyUI runs with --fp32-text-enc): fp32 here restores nothing. Only weight patches "
        "carry over: sampling-time patches (FreeU, IPAdapter, ...) and CLIP Set Last Layer are refused."
    )
    CATEGORY = "video edit/models"
    RETURN_TYPES = ("VE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("UNet, VAE, text encoder and tokenizer with ComfyUI's patches baked in, on the chosen device.",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD-1.5 MODEL from Load Checkpoint (after LoRA loaders or model "
                                               "merges: their patches are baked in)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint (its LoRA patches too); its tokenizer "
                                             "is used as well."}),
                "vae": ("VAE", {"tooltip": "An SD-1.5 VAE (the checkpoint's, or one from Load VAE)."}),
                "dtype": (list(DTYPES), {
                    "default": "fp32",
                    "tooltip": "Weights precision: fp16/bf16 halve memory on a GPU; use fp32 on a CPU.",
                }),
                "device": (list(DEVICES), {
                    "default": "auto",
                    "tooltip": "Where to run: auto = ComfyUI's device (GPU if any), or force one.",
                }),
            },
            "optional": {
                "keep_loaded": ("BOOLEAN", {"default": False,
                                            "tooltip": "Off = ComfyUI's model manager moves this copy off the GPU when "
                                                       "it needs the memory or is told to free it; on = it stays."}),
            },
        }

    def convert(self, model, clip, vae, dtype, device, keep_loaded=False):
        state, tokenizer, source = comfy_checkpoint_state(model, clip, vae)
        converted = model_from_state_dict(state, tokenizer, dtype=dtype, device=comfy_bridge.device_choice(device),
                                          source=source)
        if not keep_loaded:
            comfy_bridge.manage_memory([converted.unet, converted.vae, converted.text_encoder], converted.device)
        return (converted,)
