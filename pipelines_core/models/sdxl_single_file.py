"""Single-file SDXL base checkpoints (Stability's original "SGM" layout), loaded fully offline.

An SDXL `.safetensors` holds one state dict with four parts:

- `model.diffusion_model.*`: the UNet with LDM names; `label_emb.0.0` / `label_emb.0.2` are the added
  text/time embedding (diffusers' `add_embedding.linear_1/2`);
- `first_stage_model.*`: the VAE with LDM names;
- `conditioner.embedders.0.transformer.text_model.*`: CLIP ViT-L/14's text tower in transformers' names;
- `conditioner.embedders.1.model.*`: OpenCLIP ViT-bigG/14's text tower in OpenCLIP's names (q, k, v stacked in
  `attn.in_proj_weight`, `text_projection` stored as (width, projection), i.e. transposed).

The architecture comes from SDXL base 1.0's diffusers configs shipped in `configs/sdxl` (no weights, no
tokenizer). The conversion is diffusers' own single-file machinery, as for SD-1.5 (`single_file.py`): the UNet and
VAE through `from_single_file(config=<folder>, subfolder=...)`, both text encoders through
`create_diffusers_clip_model_from_ldm`, which converts CLIP-L by stripping its prefix and bigG with
`convert_open_clip_checkpoint` (prefix `conditioner.embedders.1.model.`); all with `local_files_only=True` under
`hub_offline()`. Each text encoder is handed only its own keys, so the converter cannot mistake one for the other.

Tokenizers: a single file holds none. SDXL's two tokenizers are the same CLIP BPE vocabulary (the files of
SD-1.5's tokenizer); the second pads with "!" (id 0 in CLIP's vocabulary) rather than the end token, as
stabilityai/stable-diffusion-xl-base-1.0's `tokenizer_2` does (OpenCLIP pads with 0), and as ComfyUI's SDXL
clip_g tokenizer does from its `sd1_tokenizer` folder. So both are built from the one folder
`single_file.find_tokenizer_dir` finds, the second with `pad_token="!"`.

Load Model's entry for a checkpoint file of either family is `load_checkpoint_file`: it reads the file once and
routes it by its keys, an SDXL base file here, anything else to `single_file` (which loads SD-1.5 and refuses
the rest by name). It lives here, not in `single_file.load_single_file`, because this module builds on that one
(an import back would be a cycle).

Refused in one line, before any conversion: the SDXL refiner (only OpenCLIP bigG, under
`conditioner.embedders.0.model.`), UNet-only files, inpainting (9-channel) and v-prediction UNets, and quantised
weights (fp8, scaled fp8, NF4, GGUF).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .single_file import (
    CONFIG_FILES,
    UNET_PREFIX,
    VAE_PREFIX,
    _capped_tokenizer,
    _check_config_dir,
    _check_not_quantised,
    _family,
    _incomplete,
    _load_component,
    _owned_copy,
    _quiet_dtype_cast,
    _read_json,
    components_from_file_state,
    find_tokenizer_dir,
    hub_offline,
    read_state_dict,
)

SDXL_CONFIG_DIR = str(Path(__file__).resolve().parent / "configs" / "sdxl")
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX)
SDXL_CONFIG_FILES = (*CONFIG_FILES, "text_encoder_2/config.json")
SECOND_PAD_TOKEN = "!"  # SDXL's tokenizer_2 pads with it (id 0), not with the end token

# The key each text encoder's width is read from (what diffusers' converter also checks).
_CLIP_L_WIDTH_KEY = CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight"
_OPEN_CLIP_WIDTH_KEY = OPEN_CLIP_PREFIX + "positional_embedding"


def _check_sdxl_config_dir(config_dir: str) -> None:
    """Every component config must be local: a missing one would otherwise send transformers to the Hub."""
    missing = [name for name in SDXL_CONFIG_FILES if not os.path.isfile(os.path.join(config_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"Config folder '{config_dir}' lacks {', '.join(missing)}: point it at a diffusers-style SDXL base "
            "folder (or leave it unset to use the shipped SDXL configs)."
        )


def sdxl_tokenizers(folder: str, max_length: int = 77, max_length_2: int = 77):
    """SDXL's two tokenizers from one CLIP BPE folder (vocab.json + merges.txt): the first as it is, the second
    padding with "!" as SDXL base's `tokenizer_2` (and ComfyUI's clip_g tokenizer) does."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if SECOND_PAD_TOKEN not in tokenizer.get_vocab():  # else transformers would add it as a new, untrained token
        raise ValueError(
            f"Tokenizer folder '{folder}' has no '{SECOND_PAD_TOKEN}' token, which SDXL's second tokenizer pads "
            "with: use CLIP's tokenizer files (SD-1.5's 'tokenizer' folder or ComfyUI's sd1_tokenizer)."
        )
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, local_files_only=True, pad_token=SECOND_PAD_TOKEN)
    return _capped_tokenizer(tokenizer, max_length), _capped_tokenizer(tokenizer_2, max_length_2)


def _width_mismatch(label: str, what: str, got, want) -> ValueError:
    return ValueError(f"{label} has {what} {got}, not SDXL base's {want}: it is not an SDXL base checkpoint "
                      "matching the configs.")


def check_sdxl_convertible(state: dict, configs: dict, label: str) -> None:
    """Fail early, in one line, on state dicts that are not original-layout SDXL base shaped like the configs.

    `configs`: the parsed "unet", "vae", "text_encoder", "text_encoder_2" configs; `label` names the source.
    """
    family = _family(state)
    if family == "SDXL refiner":
        raise ValueError(
            f"{label} is an SDXL refiner (one text encoder, OpenCLIP bigG under conditioner.embedders.0.model): it "
            "only finishes SDXL base's images; load the SDXL base checkpoint."
        )
    if family != "SDXL":
        raise ValueError(f"{label} is {family or 'SD-1.x'}, not SDXL base: only SDXL base checkpoints (both text "
                         "encoders) are loaded as SDXL.")
    _check_not_quantised(state, label, prefixes=(UNET_PREFIX, VAE_PREFIX, "conditioner.embedders."), family="SDXL")
    for prefix, part in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        if not any(k.startswith(prefix) for k in state):
            raise ValueError(f"{label} has no {part} weights ('{prefix}*'): pick a full SDXL base checkpoint.")
    encoders = ((_CLIP_L_WIDTH_KEY, "CLIP ViT-L text encoder"), (_OPEN_CLIP_WIDTH_KEY, "OpenCLIP bigG text encoder"))
    for key, part in encoders:
        if key not in state:
            raise ValueError(f"{label} has no {part} in SDXL's layout ('{key}' is missing): pick a full SDXL base "
                             "checkpoint.")
    if "v_pred" in state:  # written by ComfyUI's checkpoint save for v-prediction models
        raise ValueError(f"{label} is a v-prediction model ('v_pred' key): the SDXL scheduler config predicts noise "
                         "(epsilon), so only epsilon-prediction SDXL checkpoints are supported.")
    unet, vae = configs["unet"], configs["vae"]
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != unet["in_channels"]:
        raise ValueError(f"{label} takes {conv_in.shape[1]} latent channels, not {unet['in_channels']} (an "
                         "inpainting model?): only SDXL base text-to-image checkpoints are supported.")
    widths = {v.shape[-1] for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    if widths and widths != {unet["cross_attention_dim"]}:
        raise _width_mismatch(label, "a UNet reading text features of width", sorted(widths),
                              unet["cross_attention_dim"])
    # diffusers' converter indexes these four directly (a KeyError deep inside when one is missing)
    added_keys = [f"{UNET_PREFIX}label_emb.0.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")]
    missing = [key for key in added_keys if key not in state]
    if missing:
        raise _incomplete(label, "UNet", missing, "SDXL")
    added = state[added_keys[0]]
    if added.shape[-1] != unet["projection_class_embeddings_input_dim"]:
        raise _width_mismatch(label, "added-conditioning (label_emb) input features", added.shape[-1],
                              unet["projection_class_embeddings_input_dim"])
    for key, name in ((_CLIP_L_WIDTH_KEY, "text_encoder"), (_OPEN_CLIP_WIDTH_KEY, "text_encoder_2")):
        if state[key].shape[-1] != configs[name]["hidden_size"]:
            raise _width_mismatch(label, f"a {name} of width", state[key].shape[-1], configs[name]["hidden_size"])
    moments = state.get(VAE_PREFIX + "encoder.conv_out.weight")  # mean and log-variance per latent channel
    if moments is not None and moments.shape[0] != 2 * vae["latent_channels"]:
        raise _width_mismatch(label, "a VAE with latent channels", moments.shape[0] // 2, vae["latent_channels"])


def _sdxl_configs(config_dir: str) -> dict:
    _check_sdxl_config_dir(config_dir)
    names = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "text_encoder_2": "text_encoder_2/config.json", "scheduler": "scheduler/scheduler_config.json"}
    return {name: _read_json(os.path.join(config_dir, file)) for name, file in names.items()}


def components_from_sdxl_state_dict(
    state: dict[str, torch.Tensor],
    tokenizer,
    tokenizer_2,
    *,
    config_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    label: str = "the state dict",
    copy_tensors: bool = True,
) -> dict:
    """SDXL base components from a state dict in the original single-file layout, offline.

    Returns {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler_config"}, what
    `model._assemble` takes (CPU, eval mode, no grad). `config_dir` is a diffusers-style folder of configs
    (default: SDXL base 1.0's, shipped in configs/sdxl); `tokenizer` / `tokenizer_2` are CLIP tokenizer objects
    (SDXL's second pads with "!": see `sdxl_tokenizers`), capped to the text encoders' positions on a copy if
    needed. With `copy_tensors` (the default) the modules own their weights; a caller whose tensors are fresh and
    its own (a file just read) passes False and saves a copy. `label` names the source in errors.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config_dir = str(config_dir or SDXL_CONFIG_DIR)
    configs = _sdxl_configs(config_dir)
    check_sdxl_convertible(state, configs, label)  # before copying gigabytes
    if copy_tensors:
        state = _owned_copy(state, torch_dtype, prefixes=SDXL_PREFIXES)
    # Each text encoder sees only its own keys: diffusers' converter picks CLIP-L or OpenCLIP by which keys are
    # present and by width, which alone could not tell two equally wide encoders apart.
    clip_l = {k: v for k, v in state.items() if k.startswith(CLIP_L_PREFIX)}
    open_clip = {k: v for k, v in state.items() if k.startswith(OPEN_CLIP_PREFIX)}
    common = {"config": config_dir, "local_files_only": True, "torch_dtype": torch_dtype}
    with hub_offline(), _quiet_dtype_cast():
        unet = _load_component(
            "UNet", label, lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common), "SDXL")
        vae = _load_component(
            "VAE", label, lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common), "SDXL")
        text_encoder = _load_component(
            "text encoder", label,
            lambda: create_diffusers_clip_model_from_ldm(CLIPTextModel, clip_l, subfolder="text_encoder", **common),
            "SDXL")
        text_encoder_2 = _load_component(
            "second text encoder", label,
            lambda: create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, open_clip,
                                                         subfolder="text_encoder_2", **common),
            "SDXL")
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": _capped_tokenizer(tokenizer, configs["text_encoder"]["max_position_embeddings"]),
        "tokenizer_2": _capped_tokenizer(tokenizer_2, configs["text_encoder_2"]["max_position_embeddings"]),
        "scheduler_config": configs["scheduler"],
    }


def components_from_sdxl_file_state(
    state: dict[str, torch.Tensor],
    tokenizer_folder: str,
    *,
    config_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    label: str = "the checkpoint",
) -> dict:
    """A just-read file's state dict (its tensors belong to nobody else, so they are not copied) with both
    tokenizers built from `tokenizer_folder`: what `load_sdxl_single_file` and `single_file.load_single_file`
    do once the file is read."""
    config_dir = str(config_dir or SDXL_CONFIG_DIR)
    configs = _sdxl_configs(config_dir)
    check_sdxl_convertible(state, configs, label)  # a refiner is named before its tokenizers are looked at
    tokenizer, tokenizer_2 = sdxl_tokenizers(tokenizer_folder, configs["text_encoder"]["max_position_embeddings"],
                                             configs["text_encoder_2"]["max_position_embeddings"])
    return components_from_sdxl_state_dict(state, tokenizer, tokenizer_2, config_dir=config_dir,
                                           torch_dtype=torch_dtype, label=label, copy_tensors=False)


def load_sdxl_single_file(
    path: str,
    *,
    config_dir: str | None = None,
    tokenizer_dir: str | None = None,
    tokenizer_candidates: Sequence[str] = (),
    torch_dtype: torch.dtype = torch.float32,
) -> dict:
    """Load an SDXL base single-file checkpoint (original layout) offline.

    `config_dir`: a diffusers-style SDXL folder of configs (default: the shipped SDXL base 1.0 ones). The CLIP
    tokenizer folder is resolved by `single_file.find_tokenizer_dir(path, tokenizer_dir, tokenizer_candidates)`
    (next to the checkpoint, or e.g. ComfyUI's `comfy/sd1_tokenizer`); both tokenizers are built from it.
    """
    config_dir = str(config_dir or SDXL_CONFIG_DIR)
    _check_sdxl_config_dir(config_dir)
    tokenizer_folder = find_tokenizer_dir(path, tokenizer_dir, tokenizer_candidates)  # fail before reading GBs
    state = read_state_dict(path)
    return components_from_sdxl_file_state(state, tokenizer_folder, config_dir=config_dir, torch_dtype=torch_dtype,
                                           label=f"'{os.path.basename(path)}'")


def load_checkpoint_file(
    path: str,
    *,
    config_dir: str | None = None,
    tokenizer_dir: str | None = None,
    tokenizer_candidates: Sequence[str] = (),
    torch_dtype: torch.dtype = torch.float32,
) -> dict:
    """A single-file checkpoint of either family, read once and routed by its keys: SDXL base here, anything
    else through `single_file` (SD-1.5 and InstructPix2Pix load; the SDXL refiner, SD-2.x, ... are refused there
    by name). Same arguments as `single_file.load_single_file`; `config_dir`, if given, must describe the file's
    family (default: the shipped SD-1.5 or SDXL configs)."""
    if config_dir:
        _check_config_dir(config_dir)  # the files both families need, before reading gigabytes
    tokenizer_folder = find_tokenizer_dir(path, tokenizer_dir, tokenizer_candidates)  # fail before reading GBs
    state = read_state_dict(path)
    label = f"'{os.path.basename(path)}'"
    if _family(state) == "SDXL":
        return components_from_sdxl_file_state(state, tokenizer_folder, config_dir=config_dir,
                                               torch_dtype=torch_dtype, label=label)
    return components_from_file_state(state, tokenizer_folder, config_dir=config_dir, torch_dtype=torch_dtype,
                                      label=label)
