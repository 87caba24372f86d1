"""Use ComfyUI Model: the MODEL, CLIP and VAE a ComfyUI graph loaded (and patched) as a VE_MODEL.

The weights are read the way ComfyUI's own checkpoint save reads them (comfy.sd.save_checkpoint): the
patchers are loaded with `force_patch_weights=True`, so every LoRA / merge patch is baked into the weights
(also in low-VRAM mode, where ComfyUI otherwise applies patches on the fly during the forward pass), then
`model.model.state_dict_for_saving(clip_sd, vae_sd)` gives one state dict in the original checkpoint layout of
the family: SD-1.x's, or SDXL base's (`conditioner.embedders.0.transformer.*` for CLIP-L,
`conditioner.embedders.1.model.*` for OpenCLIP bigG in OpenCLIP's names), or FLUX.1's (the transformer in Black
Forest Labs' names under `model.diffusion_model.`, ae under `vae.`, DualCLIPLoader's CLIP-L and T5-XXL under
`text_encoders.clip_l.transformer.` / `text_encoders.t5xxl.transformer.` in transformers' names). pipelines_core
converts that exactly as it converts the files of that family, into weights of its own.

Tokenizers: ComfyUI's CLIP-L tokenizer object is handed over as it is. SDXL's second tokenizer pads with "!"
(id 0), as diffusers' SDXL `tokenizer_2` and ComfyUI's own clip_g tokenizer do; ComfyUI does that padding in its
wrapper, while the transformers tokenizer inside pads with the end token, so a copy of it padding with "!" is
handed over instead (ComfyUI's object is not changed). Flux's second tokenizer is ComfyUI's T5 one as it is (the
SentencePiece T5 tokenizer of comfy/text_encoders/t5_tokenizer, T5-v1.1's vocabulary, 512 tokens: what
FluxPipeline's tokenizer_2 is; the video sampler pads it to 512 as FluxPipeline does, where ComfyUI pads to 256).

Precision: quantised MODEL weights (Load Diffusion Model's weight_dtype fp8_*, scaled fp8, GGUF) are refused by
name: the video sampler would need them in bf16/fp16/fp32, a copy twice their size or more. A T5 kept in fp8 (the
t5xxl_fp8_e4m3fn file DualCLIPLoader loads) is upcast, which is exact, as Load Model does with that file.

What this leaves in ComfyUI is what a KSampler run leaves: the MODEL's and CLIP's patchers are ComfyUI's
"currently loaded" models, their shared torch modules hold the patched weights, and ComfyUI keeps the
originals in its backup and restores them itself before it loads a clone with other patches (e.g. the
checkpoint loader's output used without the LoRA by another branch). The patch lists, options and hooks of
the objects we were given are not touched.

ComfyUI's modules are imported inside the function only: the pack also runs headless, without ComfyUI.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from . import comfy_bridge
from ..pipelines_core.models.model import DEVICES, DTYPES, model_from_state_dict
from ..pipelines_core.models.sdxl_single_file import SECOND_PAD_TOKEN


@dataclass(frozen=True)
class _Family:
    """What a convertible ComfyUI model family's CLIP is, and which CLIP layer its denoiser reads."""

    name: str  # in messages
    text_model: str  # ComfyUI's class of clip.cond_stage_model
    tokenizers: tuple  # attributes of clip.tokenizer
    plain_layers: tuple  # clip.layer_idx values that read the layer the pack's encoder reads
    layer_said: str  # that layer, in words
    prediction: str = "EPS"  # ComfyUI's ModelType the shipped scheduler configs describe
    autoencoder: str = "AutoencoderKL"  # ComfyUI's class of vae.first_stage_model
    latent_channels: int = 4


# ComfyUI's supported-model classes we convert, by exact class name: subclasses (SD15_instructpix2pix, the SDXL
# refiner, SSD-1B, Segmind Vega, KOALA, SDXL_instructpix2pix, ...) have other inputs or other UNet shapes.
# SD15 covers 1.4/1.5 and their fine-tunes. SDXL's CLIP reads the penultimate layer of both encoders by default
# (ComfyUI: clip.layer_idx None; CLIP Set Last Layer -2 selects that same layer), as diffusers' SDXL pipeline does.
FAMILIES = {
    "SD15": _Family("SD-1.x", "SD1ClipModel", ("clip_l",), (None, -1), "CLIP's last layer"),
    "SDXL": _Family("SDXL base", "SDXLClipModel", ("clip_l", "clip_g"), (None, -2),
                    "the penultimate layer of both text encoders"),
    # FLUX.1 dev (guidance-distilled: ModelType.FLUX) and schnell (FLOW): DualCLIPLoader type flux (its class is
    # flux_clip()'s FluxClipModel_), ae (an AutoencodingEngine: no quant convs) with 16 latent channels. Flux reads
    # CLIP-L's pooled output and T5's last hidden states; a CLIP Set Last Layer would change both.
    "Flux": _Family("FLUX.1 dev", "FluxClipModel_", ("clip_l", "t5xxl"), (None,),
                    "the last layers of CLIP-L and T5-XXL", "FLUX", "AutoencodingEngine", 16),
    "FluxSchnell": _Family("FLUX.1 schnell", "FluxClipModel_", ("clip_l", "t5xxl"), (None,),
                           "the last layers of CLIP-L and T5-XXL", "FLOW", "AutoencodingEngine", 16),
}
# ComfyUI's names for families people connect by mistake, said in words.
OTHER_FAMILIES = {
    "SDXLRefiner": "the SDXL refiner (it only finishes SDXL base's images)",
    "SD20": "SD-2.x", "SD21UnclipL": "SD-2.x unCLIP", "SD21UnclipH": "SD-2.x unCLIP",
    "SD3": "Stable Diffusion 3",
    "SSD1B": "SSD-1B (a distilled SDXL with another UNet)", "Segmind_Vega": "Segmind Vega (a distilled SDXL)",
    "KOALA_700M": "KOALA (a distilled SDXL)", "KOALA_1B": "KOALA (a distilled SDXL)",
    "SD15_instructpix2pix": "InstructPix2Pix", "SDXL_instructpix2pix": "SDXL InstructPix2Pix",
    "FluxInpaint": "Flux.1 Fill", "Chroma": "Chroma (a Flux variant)", "SVD_img2vid": "Stable Video Diffusion",
}


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


def _family_of(model, clip, vae) -> tuple[str, _Family]:
    """ComfyUI's class name of the MODEL's family and what we know of it; refuses, in one line each, a family we
    do not convert, a CLIP or VAE of another family, a clip skip and a prediction type the configs cannot run."""
    import comfy.model_base  # only ever called inside ComfyUI

    name = type(model.model.model_config).__name__
    family = FAMILIES.get(name)
    if family is None:
        said = f"{OTHER_FAMILIES[name]}, ComfyUI's '{name}'" if name in OTHER_FAMILIES else f"ComfyUI's '{name}'"
        raise ValueError(
            f"Use ComfyUI Model: the MODEL is {said}, not SD-1.x, SDXL base or FLUX.1 dev/schnell "
            f"({', '.join(FAMILIES)}): the video sampler converts those families only; connect one of them."
        )
    # Playground v2.5 (EDM) and v-prediction fine-tunes keep the family's class; the shipped scheduler configs
    # predict noise (SD) or velocity (Flux). (A v-prediction model's saved state would say so with a 'v_pred' key;
    # EDM's says nothing.)
    model_type = getattr(model.model, "model_type", comfy.model_base.ModelType.EPS)
    if model_type.name != family.prediction:
        raise ValueError(
            f"Use ComfyUI Model: the MODEL is {family.name} with '{model_type.name}' prediction (Playground v2.5 is "
            f"EDM, some fine-tunes V_PREDICTION); the video sampler runs {family.name} with its own "
            f"'{family.prediction}' prediction only: connect a checkpoint that predicts that."
        )
    # Checked before any weight is loaded or copied: a 12B Flux transformer is too big to find out afterwards.
    weights = str(getattr(model.model, "get_dtype", lambda: None)()).removeprefix("torch.")
    if weights.startswith(("float8", "float4")) or getattr(model.model.model_config, "scaled_fp8", None) is not None:
        raise ValueError(
            f"Use ComfyUI Model: the MODEL holds {weights} (fp8-quantised) weights; the video sampler converts "
            "bf16/fp16/fp32 weights only: set Load Diffusion Model's weight_dtype to 'default' (and start ComfyUI "
            "without --fp8 options), or use the fp16/bf16 file."
        )
    text_model = type(clip.cond_stage_model).__name__
    if text_model != family.text_model or not all(hasattr(clip.tokenizer, t) for t in family.tokenizers):
        raise ValueError(
            f"Use ComfyUI Model: the CLIP is '{text_model}', not {family.name}'s ({family.text_model}): connect the "
            f"CLIP of the same {family.name} checkpoint as the MODEL."
        )
    if clip.layer_idx not in family.plain_layers:
        plain = " or ".join(str(v) for v in family.plain_layers if v is not None)
        raise ValueError(
            f"Use ComfyUI Model: CLIP Set Last Layer ({clip.layer_idx}) is not supported: the video sampler reads "
            f"{family.layer_said} of {family.name}; remove that node (or set {plain}) on this branch."
        )
    autoencoder = type(vae.first_stage_model).__name__
    if autoencoder != family.autoencoder or vae.latent_channels != family.latent_channels:
        wanted = "ae (ae.safetensors, from Load VAE)" if family.latent_channels == 16 else "checkpoint's VAE"
        raise ValueError(
            f"Use ComfyUI Model: the VAE is '{autoencoder}' with {vae.latent_channels} latent channels, "
            f"not {family.name}'s KL autoencoder with {family.latent_channels}: connect the {family.name} {wanted}."
        )
    return name, family


def _second_tokenizer(clip):
    """SDXL's tokenizer_2: a copy of ComfyUI's clip_g tokenizer padding with "!" (see the module docstring)."""
    tokenizer = copy.deepcopy(clip.tokenizer.clip_g.tokenizer)
    if SECOND_PAD_TOKEN not in tokenizer.get_vocab():  # else transformers would add it as a new, untrained token
        raise ValueError(
            f"Use ComfyUI Model: the CLIP's clip_g tokenizer has no '{SECOND_PAD_TOKEN}' token, which SDXL's second "
            "tokenizer pads with: connect the CLIP of an SDXL base checkpoint (CLIP's own vocabulary)."
        )
    tokenizer.pad_token = SECOND_PAD_TOKEN
    return tokenizer


def comfy_checkpoint_state(model, clip, vae) -> tuple[dict, object, object, str]:
    """(state dict in the original SD-1.x / SDXL base / FLUX.1 layout with all weight patches baked in, the
    CLIP(-L) tokenizer, the second tokenizer (SDXL: a copy of clip_g's padding with "!"; Flux: ComfyUI's T5
    tokenizer; None for SD-1.x), a source name) from ComfyUI's MODEL, CLIP and VAE: what `model_from_state_dict`
    takes. Refuses other families, mismatched parts, fp8 MODEL weights and clip skips by name."""
    import comfy.model_management  # only ever called inside ComfyUI

    name, family = _family_of(model, clip, vae)
    _refuse_extras("MODEL", model)
    _refuse_extras("CLIP", clip.patcher)
    tokenizer_2 = (_second_tokenizer(clip) if "clip_g" in family.tokenizers
                   else clip.tokenizer.t5xxl.tokenizer if "t5xxl" in family.tokenizers else None)

    # As comfy.sd.save_checkpoint: load both patchers with their patches written into the weights, then
    # read the state dicts (after loading: patching replaces the parameter tensors).
    comfy.model_management.load_models_gpu([model, clip.patcher], force_patch_weights=True)
    state = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
    patched = len(model.patches) + len(clip.patcher.patches)
    source = f"comfyui:{name}" + (f"+{patched} patched weights" if patched else "")
    return state, clip.tokenizer.clip_l.tokenizer, tokenizer_2, source


class VE_FromComfyModel:
    DESCRIPTION = (
        "Use the SD-1.x, SDXL base or FLUX.1 dev/schnell model a ComfyUI graph loaded (Load Checkpoint; for Flux "
        "Load Diffusion Model + DualCLIPLoader type flux (clip_l, t5xxl) + Load VAE (ae), or a Flux checkpoint; then "
        "LoRA loaders / model merges) for video editing, with every weight patch baked in and without reading the "
        "files again. Costs one more copy of the weights in the chosen dtype (SD-1.5: about 4 GiB in fp32, 2 GiB in "
        "fp16/bf16; SDXL: about 13 GiB in fp32, 6.5 GiB in fp16/bf16; FLUX.1: about 31 GiB in bf16 with T5-XXL, "
        "twice that in fp32) and the time to copy them (SD-1.5: measured 3-13 s on a shared 2-core CPU, plus about "
        "7 s the first time diffusers' converters load; SDXL copies about 3.5 times as much, FLUX.1 about 16 times); "
        "ComfyUI keeps its own copy for its other nodes. Weights come in the precision ComfyUI holds them (its text "
        "encoders are fp16 unless ComfyUI runs with --fp32-text-enc): fp32 here restores nothing. fp8 MODEL weights "
        "(weight_dtype fp8_*) are refused: load Flux with weight_dtype 'default'; an fp8 T5 is upcast exactly. Only "
        "weight patches carry over: sampling-time patches (FreeU, IPAdapter, ModelSamplingFlux, ...) are refused, and "
        "so is a CLIP Set Last Layer other than the family's own (SD-1.x: -1, the last layer; SDXL: -2, the "
        "penultimate; Flux: none)."
    )
    CATEGORY = "video edit/models"
    RETURN_TYPES = ("VE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("UNet (Flux: transformer), VAE, text encoder(s) and tokenizer(s) (SDXL: both CLIPs; Flux: "
                       "CLIP-L and T5-XXL) with ComfyUI's patches baked in, on the chosen device.",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD-1.x or SDXL base MODEL from Load Checkpoint, or a FLUX.1 dev/"
                                               "schnell one from Load Diffusion Model (weight_dtype default) or a Flux "
                                               "checkpoint (after LoRA loaders or model merges: their patches are "
                                               "baked in)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint (its LoRA patches too; SDXL: both "
                                             "text encoders; Flux: DualCLIPLoader type flux with clip_l and t5xxl); "
                                             "its tokenizers are used as well."}),
                "vae": ("VAE", {"tooltip": "The same family's VAE (the checkpoint's, or one from Load VAE; Flux: "
                                           "ae)."}),
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
        state, tokenizer, tokenizer_2, source = comfy_checkpoint_state(model, clip, vae)
        converted = model_from_state_dict(state, tokenizer, dtype=dtype, device=comfy_bridge.device_choice(device),
                                          source=source, tokenizer_2=tokenizer_2)
        if not keep_loaded:
            modules = [converted.unet, converted.vae, converted.text_encoder, converted.text_encoder_2]
            comfy_bridge.manage_memory([m for m in modules if m is not None], converted.device)
        return (converted,)
