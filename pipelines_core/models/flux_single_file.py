"""Flux.1 from the single files ComfyUI users keep, loaded fully offline.

A Flux.1 model arrives as four files, not one checkpoint: the transformer (`flux1-dev.safetensors` /
`flux1-schnell.safetensors`, Black Forest Labs' layout: `double_blocks.N.*`, `single_blocks.N.*`, `img_in`,
`txt_in`, `time_in`, `vector_in`, `guidance_in` on dev, `final_layer`; sometimes under `model.diffusion_model.`),
the autoencoder (`ae.safetensors`, the LDM layout without prefix), CLIP-L (`clip_l.safetensors`, transformers'
`text_model.*` names) and the T5-XXL encoder (`t5xxl_fp16.safetensors`, transformers' T5 names) -- what ComfyUI's
`models/diffusion_models`, `models/vae` and `models/text_encoders` hold. Neither tokenizer is in them: CLIP's is
found as SD-1.5's is (`single_file.find_tokenizer_dir`; ComfyUI's `comfy/sd1_tokenizer`), T5's in a folder
holding a T5 tokenizer (tokenizer.json or spiece.model; ComfyUI's `comfy/text_encoders/t5_tokenizer`).

Each part goes through diffusers' own converters with the configs shipped in configs/ (flux-dev/,
flux-schnell/, flux-vae/, t5xxl/; CLIP-L's is SD-1.5's text encoder config), under `hub_offline()`, so nothing is
ever fetched. dev and schnell are told apart by the weights (dev embeds the guidance scale: `guidance_in`), and
each gets its own scheduler config (dev: resolution-dependent shift; schnell: none).

One departure from calling `from_single_file` on the raw file: diffusers' Flux converter hard-codes FLUX.1's
width (3072) where it splits the single-stream blocks' fused `linear1` into q, k, v and the MLP input. At that
width its split is used as it is; at any other width (the tests' tiny Flux) the same split is made at the width
the config gives (`split_linear1`, checked against diffusers' at FLUX.1's width by the tests). The converted state
dict, already in diffusers' names, then goes through `FluxTransformer2DModel.from_single_file` with the config.

Quantised weights are refused in one line naming the file (fp8 transformers, scaled fp8, NF4, GGUF), with one
exception: a plain fp8 T5 (`t5xxl_fp8_e4m3fn.safetensors`, fp8 tensors and no scales) is upcast to the model's
dtype, exactly (every fp8 value is representable in bf16/fp16/fp32): the text encoder runs once per prompt, so
its size in memory matters less than the transformer's, and this is the T5 file ComfyUI's Flux guides suggest.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .single_file import (
    SD15_CONFIG_DIR,
    _check_not_quantised,
    _load_component,
    _QUANT_KEY_MARKERS,
    _quiet_dtype_cast,
    _read_json,
    hub_offline,
    read_state_dict,
)

CONFIG_ROOT = str(Path(__file__).resolve().parent / "configs")
TRANSFORMER_PREFIX = "model.diffusion_model."
CLIP_LDM_PREFIX = "cond_stage_model.transformer."  # what diffusers' CLIP converter recognises (SD-1.x's place)
T5_PREFIX = "text_encoders.t5xxl.transformer."  # what diffusers' T5 converter strips (SD3's single files)
VAE_PREFIXES = ("first_stage_model.", "vae.")  # ComfyUI-saved VAEs; BFL's ae.safetensors has none
FLUX1_WIDTH = 3072  # the transformer width diffusers' converter assumes (24 heads x 128)
FLUX1_MLP_RATIO = 4  # FluxSingleTransformerBlock's MLP width over the model width (fixed in diffusers)

# The files of each part, as ComfyUI's guides and BFL name them; found next to the transformer or in given folders.
PART_PATTERNS = {"vae": ("VAE", "ae*.safetensors"), "clip": ("CLIP-L", "clip_l*.safetensors"),
                 "t5": ("T5-XXL", "t5xxl*.safetensors")}


@dataclass(frozen=True)
class FluxConfigs:
    """Where the configs of a Flux model's parts are: `root` holds flux-dev/ and flux-schnell/ (each transformer/
    and scheduler/), flux-vae/ and t5xxl/ (a config.json each); `clip` a folder with CLIP-L's config.json."""

    root: str = CONFIG_ROOT
    clip: str = os.path.join(SD15_CONFIG_DIR, "text_encoder")  # FLUX.1's text_encoder is SD-1.5's CLIP ViT-L/14

    def variant(self, name: str) -> str:
        return os.path.join(self.root, f"flux-{name}")

    @property
    def vae(self) -> str:
        return os.path.join(self.root, "flux-vae")

    @property
    def t5(self) -> str:
        return os.path.join(self.root, "t5xxl")

    @classmethod
    def at(cls, folder: str) -> "FluxConfigs":
        """Configs in `folder`, laid out like the shipped ones; CLIP-L's from its `clip-l/` if it has one, else
        SD-1.5's text encoder config (FLUX.1's CLIP-L)."""
        clip = os.path.join(folder, "clip-l")
        return cls(folder, clip) if os.path.isfile(os.path.join(clip, "config.json")) else cls(folder)

    def check(self) -> None:
        """Every config must be local: a missing one would otherwise send diffusers or transformers to the Hub."""
        files = [os.path.join(self.variant(v), f) for v in ("dev", "schnell")
                 for f in ("transformer/config.json", "scheduler/scheduler_config.json")]
        files += [os.path.join(d, "config.json") for d in (self.vae, self.t5, self.clip)]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"Flux config files missing: {', '.join(missing)}")


# --- what a state dict is --------------------------------------------------------------------------

def _bfl_keys(state: dict) -> dict:
    """The transformer's tensors under BFL's names: `model.diffusion_model.` taken off; when a file holds that prefix
    (a ComfyUI save), only those keys are the transformer's."""
    if any(k.startswith(TRANSFORMER_PREFIX) for k in state):
        return {k[len(TRANSFORMER_PREFIX):]: v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}
    return dict(state)


def is_flux_transformer(state: dict) -> bool:
    """A FLUX.1 transformer in BFL's layout (with or without `model.diffusion_model.`), by its keys."""
    keys = _bfl_keys(state).keys()
    return ("img_in.weight" in keys and "time_in.in_layer.weight" in keys
            and any(k.startswith("double_blocks.") for k in keys) and any(k.startswith("single_blocks.") for k in keys))


def flux_variant(state: dict) -> str:
    """"dev" for a guidance-distilled transformer (it embeds the guidance scale: `guidance_in`), else "schnell"."""
    return "dev" if any(k.startswith("guidance_in.") for k in _bfl_keys(state)) else "schnell"


def _blocks(keys, name: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


# --- quantisation ---------------------------------------------------------------------------------

def _refuse_gguf(path: str, part: str) -> None:
    if path.lower().endswith(".gguf"):
        raise ValueError(f"'{os.path.basename(path)}' is a GGUF-quantised {part}: only plain fp32/fp16/bf16 "
                         "safetensors can be converted; use the unquantised file.")


def _upcast_plain_fp8(state: dict, label: str, torch_dtype: torch.dtype) -> dict:
    """A plain fp8 T5 (fp8 tensors, no scales): each fp8 tensor cast to `torch_dtype`, which holds every fp8 value
    exactly. Scaled fp8 and other quantisations are refused (their weights mean something only with the scales)."""
    if any(m in part for k in state for part in k.split(".") for m in _QUANT_KEY_MARKERS):
        _check_not_quantised(state, label, prefixes=("",), family="T5")  # raises, naming the marker or fp8 key
    return {k: v.to(torch_dtype) if str(v.dtype).startswith("torch.float8") else v for k, v in state.items()}


# --- transformer -----------------------------------------------------------------------------------

def split_linear1(fused: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """A single-stream block's fused `linear1` (weight or bias) -> q, k, v, MLP input: diffusers' split, at `width`."""
    return torch.split(fused, (width, width, width, fused.shape[0] - 3 * width), dim=0)


def transformer_to_diffusers(bfl: dict, config: dict) -> tuple[dict, list]:
    """BFL-layout transformer tensors -> diffusers' names with diffusers' converter (see the module docstring for
    the width); returns the converted dict and the keys the converter did not know. `bfl` is not changed."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    work = dict(bfl)  # the converter pops what it converts
    fused = {}
    if width != FLUX1_WIDTH:
        rows = FLUX1_WIDTH * (3 + FLUX1_MLP_RATIO)
        for key in [k for k in work if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
            fused[key] = work[key]
            # A FLUX.1-shaped stand-in (no memory: a broadcast zero) for the converter to split; replaced below.
            work[key] = work[key].new_zeros(()).expand(rows, *work[key].shape[1:])
    out = convert_flux_transformer_checkpoint_to_diffusers(work)
    for key, tensor in fused.items():
        block, leaf = re.fullmatch(r"single_blocks\.(\d+)\.linear1\.(weight|bias)", key).groups()
        prefix = f"single_transformer_blocks.{block}."
        q, k, v, mlp = split_linear1(tensor, width)
        for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            out[f"{prefix}{name}.{leaf}"] = part
    return out, sorted(work)


def _check_transformer(bfl: dict, config: dict, label: str) -> None:
    if not is_flux_transformer(bfl):
        raise ValueError(f"{label} is not a FLUX.1 transformer (no double_blocks/single_blocks/img_in/time_in in "
                         "BFL's layout): pick flux1-dev or flux1-schnell from models/diffusion_models.")
    _check_not_quantised(bfl, label, prefixes=("",), family="Flux")
    img_in = bfl["img_in.weight"]
    if img_in.shape[1] != config["in_channels"]:
        kind = {384: " (Flux Fill)", 128: " (Flux Depth/Canny)"}.get(img_in.shape[1], "")
        raise ValueError(f"{label} reads {img_in.shape[1]} input channels{kind}, not FLUX.1's {config['in_channels']}: "
                         "only the text-to-image FLUX.1 dev and schnell transformers are supported.")
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    if img_in.shape[0] != width:
        raise ValueError(f"{label} is {img_in.shape[0]} wide, not {width} as the Flux config says: not a FLUX.1 "
                         "transformer matching the configs.")
    txt_in = bfl.get("txt_in.weight")
    if txt_in is not None and txt_in.shape[1] != config["joint_attention_dim"]:
        raise ValueError(f"{label} reads text features of width {txt_in.shape[1]}, not the T5 width "
                         f"{config['joint_attention_dim']} of the config: not a FLUX.1 transformer.")


def load_flux_transformer(state: dict, configs: FluxConfigs, torch_dtype: torch.dtype, label: str):
    """(FluxTransformer2DModel, variant, scheduler config) from a BFL-layout state dict, offline."""
    from diffusers import FluxTransformer2DModel

    bfl = _bfl_keys(state)
    variant = flux_variant(bfl)
    folder = configs.variant(variant)
    config = _read_json(os.path.join(folder, "transformer", "config.json"))
    _check_transformer(bfl, config, label)
    # Block counts from the weights, as diffusers' converter counts them (a pruned "lite" model has fewer).
    counts = {"num_layers": _blocks(bfl, "double_blocks"), "num_single_layers": _blocks(bfl, "single_blocks")}
    try:
        converted, unknown = transformer_to_diffusers(bfl, {**config, **counts})
    except KeyError as err:  # the converter indexes every weight of every block it counted
        raise ValueError(f"{label} lacks FLUX.1 transformer weights (e.g. {err.args[0]}): the file is cut or not a "
                         "FLUX.1 dev/schnell transformer.") from None
    if unknown:
        raise ValueError(f"{label} has {len(unknown)} weights FLUX.1's layout has not (e.g. '{unknown[0]}'): not a "
                         "plain FLUX.1 dev/schnell transformer.")
    with hub_offline(), _quiet_dtype_cast():
        transformer = _load_component(
            "transformer", label,
            lambda: FluxTransformer2DModel.from_single_file(converted, config=folder, subfolder="transformer",
                                                            local_files_only=True, torch_dtype=torch_dtype, **counts),
            "FLUX.1")
    scheduler = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    return transformer, variant, scheduler


# --- VAE, CLIP-L, T5 --------------------------------------------------------------------------------

def load_flux_vae(state: dict, configs: FluxConfigs, torch_dtype: torch.dtype, label: str):
    from diffusers import AutoencoderKL

    _check_not_quantised(state, label, prefixes=("",), family="Flux VAE")
    config = _read_json(os.path.join(configs.vae, "config.json"))
    moments = next((v for k, v in state.items() if k.endswith("encoder.conv_out.weight")
                    and not k.endswith("decoder.conv_out.weight")), None)
    if moments is None:
        raise ValueError(f"{label} is not an autoencoder in the LDM layout (no encoder.conv_out): use Flux's "
                         "ae.safetensors.")
    if moments.shape[0] != 2 * config["latent_channels"]:
        raise ValueError(f"{label} is a VAE with {moments.shape[0] // 2} latent channels, not Flux's "
                         f"{config['latent_channels']}: use Flux's ae.safetensors (an SD VAE does not fit).")
    with hub_offline(), _quiet_dtype_cast():
        return _load_component("VAE", label, lambda: AutoencoderKL.from_single_file(
            state, config=configs.vae, local_files_only=True, torch_dtype=torch_dtype), "Flux")


def _clip_ldm_keys(state: dict) -> dict:
    """CLIP-L under `cond_stage_model.transformer.text_model.` (where diffusers' converter looks), from the
    `text_model.*` names of ComfyUI's clip_l.safetensors (or an SD3-style `text_encoders.clip_l.transformer.`)."""
    out = {}
    for key, value in state.items():
        for prefix in ("text_encoders.clip_l.transformer.", CLIP_LDM_PREFIX, "transformer."):
            key = key.removeprefix(prefix)
        if key.startswith("text_model."):  # text_projection / logit_scale: CLIPTextModel has none
            out[CLIP_LDM_PREFIX + key] = value
    return out


def load_flux_clip(state: dict, configs: FluxConfigs, torch_dtype: torch.dtype, label: str):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    ldm = _clip_ldm_keys(state)
    _check_not_quantised(ldm, label, prefixes=("",), family="CLIP-L")
    position = ldm.get(CLIP_LDM_PREFIX + "text_model.embeddings.position_embedding.weight")
    width = _read_json(os.path.join(configs.clip, "config.json"))["hidden_size"]
    if position is None or position.shape[-1] != width:
        found = "no CLIP text model" if position is None else f"a text encoder of width {position.shape[-1]}"
        raise ValueError(f"{label} holds {found}, not CLIP-L ({width}): use clip_l.safetensors from "
                         "models/text_encoders.")
    with hub_offline(), _quiet_dtype_cast():
        return _load_component("text encoder", label, lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, ldm, config=os.path.dirname(configs.clip), subfolder=os.path.basename(configs.clip),
            local_files_only=True, torch_dtype=torch_dtype), "CLIP-L")


def load_flux_t5(state: dict, configs: FluxConfigs, torch_dtype: torch.dtype, label: str):
    from diffusers.loaders.single_file_utils import create_diffusers_t5_model_from_checkpoint
    from transformers import T5EncoderModel

    state = _upcast_plain_fp8(state, label, torch_dtype)
    _check_not_quantised(state, label, prefixes=("",), family="T5")
    sd3 = {k if k.startswith(T5_PREFIX) else T5_PREFIX + k: v for k, v in state.items()}
    shared = sd3.get(T5_PREFIX + "shared.weight")
    width = _read_json(os.path.join(configs.t5, "config.json"))["d_model"]
    if shared is None or shared.shape[-1] != width or not any(".block." in k for k in sd3):
        found = "no T5 encoder ('shared.weight')" if shared is None else f"a model of width {shared.shape[-1]}"
        raise ValueError(f"{label} holds {found}, not the T5-XXL encoder ({width}): use t5xxl_fp16.safetensors "
                         "from models/text_encoders.")

    def load():
        model = create_diffusers_t5_model_from_checkpoint(T5EncoderModel, sd3, config=os.path.dirname(configs.t5),
                                                          subfolder=os.path.basename(configs.t5),
                                                          local_files_only=True, torch_dtype=torch_dtype)
        model.encoder.embed_tokens = model.shared  # tied in T5 (files hold `shared` only); loading replaced it
        return model

    with hub_offline(), _quiet_dtype_cast():
        return _load_component("T5 encoder", label, load, "T5-XXL")


# --- tokenizers --------------------------------------------------------------------------------------

def _holds_t5_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("spiece.model", "tokenizer.json"))


def find_t5_tokenizer_dir(t5_path: str, t5_tokenizer_dir: str | None = None,
                          extra_candidates: Sequence[str] = ()) -> str:
    """The T5 tokenizer folder: the explicit one; a `tokenizer_2/` or `t5_tokenizer/` folder next to the T5 file;
    each of `extra_candidates` (inside ComfyUI: its `comfy/text_encoders/t5_tokenizer`). Never downloads."""
    if t5_tokenizer_dir:
        if not _holds_t5_tokenizer(t5_tokenizer_dir):
            raise FileNotFoundError(f"T5 tokenizer folder '{t5_tokenizer_dir}' has no tokenizer.json or spiece.model.")
        return t5_tokenizer_dir
    here = os.path.dirname(os.path.abspath(t5_path))
    for folder in (os.path.join(here, "tokenizer_2"), os.path.join(here, "t5_tokenizer"), *extra_candidates):
        if folder and os.path.isdir(folder) and _holds_t5_tokenizer(folder):
            return folder
    raise FileNotFoundError(
        f"No T5 tokenizer found for '{os.path.basename(t5_path)}': put a 't5_tokenizer' folder (tokenizer.json or "
        "spiece.model, e.g. FLUX.1's tokenizer_2 or ComfyUI's comfy/text_encoders/t5_tokenizer) next to it.")


def load_t5_tokenizer(folder: str):
    """The tokenizer in `folder` as its tokenizer_config names it (T5TokenizerFast for FLUX.1's and ComfyUI's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


# --- finding the parts ------------------------------------------------------------------------------

def find_flux_parts(transformer_path: str, search_dirs: Sequence[str] = ()) -> dict:
    """{"vae", "clip", "t5": path} for a Flux transformer file: by their usual names (ae*, clip_l*, t5xxl*
    .safetensors) next to the transformer, then in `search_dirs` (inside ComfyUI: models/vae and
    models/text_encoders). Where a folder holds several, a file without fp8 in its name is taken first."""
    folders = [os.path.dirname(os.path.abspath(transformer_path))]
    folders += [d for d in search_dirs if d and os.path.abspath(d) not in folders]
    found, missing = {}, []
    for part, (name, pattern) in PART_PATTERNS.items():
        for folder in folders:
            matches = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)),
                             key=lambda p: ("fp8" in os.path.basename(p).lower(), os.path.basename(p)))
            if matches:
                found[part] = matches[0]
                break
        else:
            missing.append(f"{name} ({pattern})")
    if missing:
        raise FileNotFoundError(f"Flux transformer '{os.path.basename(transformer_path)}' needs "
                                f"{', '.join(missing)}: none found in {', '.join(folders)}; put the files there.")
    return found


# --- everything --------------------------------------------------------------------------------------

def load_flux_single_files(transformer_path: str, vae_path: str, clip_path: str, t5_path: str,
                           clip_tokenizer_dir: str, t5_tokenizer_dir: str,
                           torch_dtype: torch.dtype = torch.float32, configs: FluxConfigs | None = None) -> dict:
    """A Flux.1 model's components from its four single files and two tokenizer folders, offline: what
    `model._assemble` takes ({"unet": FluxNetwork, "vae", "text_encoder", "tokenizer", "text_encoder_2",
    "tokenizer_2", "scheduler_config"}), like `model._load_flux_folder`. `configs`: the shipped FLUX.1 ones."""
    from .flux import FluxNetwork
    from .single_file import load_tokenizer

    configs = configs or FluxConfigs()
    configs.check()
    for path, part in ((transformer_path, "transformer"), (vae_path, "VAE"), (clip_path, "CLIP-L"), (t5_path, "T5")):
        _refuse_gguf(path, part)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Flux {part} file '{path}' does not exist.")
    # The tokenizers first: a missing one should not cost reading 30 GB of weights.
    clip_config = _read_json(os.path.join(configs.clip, "config.json"))
    tokenizer = load_tokenizer(clip_tokenizer_dir, clip_config["max_position_embeddings"])
    tokenizer_2 = load_t5_tokenizer(t5_tokenizer_dir)
    # One file at a time, each state dict dropped once its module is built (never all four files at once).
    label = f"'{os.path.basename(transformer_path)}'"
    transformer, _variant, scheduler_config = load_flux_transformer(read_state_dict(transformer_path), configs,
                                                                    torch_dtype, label)
    vae = load_flux_vae(read_state_dict(vae_path), configs, torch_dtype, f"'{os.path.basename(vae_path)}'")
    text_encoder = load_flux_clip(read_state_dict(clip_path), configs, torch_dtype, f"'{os.path.basename(clip_path)}'")
    text_encoder_2 = load_flux_t5(read_state_dict(t5_path), configs, torch_dtype, f"'{os.path.basename(t5_path)}'")
    return {"unet": FluxNetwork(transformer), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "scheduler_config": scheduler_config}


# ComfyUI's saved layout of a whole Flux model (`state_dict_for_saving` of supported_models.Flux / FluxSchnell):
# the transformer in BFL's names under `model.diffusion_model.`, ae under `vae.`, and its DualCLIPLoader text
# encoders under `text_encoders.`: CLIP-L in transformers' names (`clip_l.transformer.text_model.*`, plus a
# `text_projection` and `logit_scale` Flux does not use), T5 in transformers' T5 names (`t5xxl.transformer.*`).
STATE_PARTS = {"transformer": ("the transformer", TRANSFORMER_PREFIX), "vae": ("the VAE (ae)", "vae."),
               "clip": ("CLIP-L", "text_encoders.clip_l.transformer."), "t5": ("T5-XXL", T5_PREFIX)}


def _owned(part: dict, torch_dtype: torch.dtype) -> dict:
    """`part`'s tensors copied to the CPU, floating point ones cast to `torch_dtype` while copying: the converters
    put the tensors they get into the modules as they are, so a module built from the caller's tensors would change
    whenever the caller (ComfyUI) writes into them. Run after the quantisation checks: fp8 is never cast here."""
    return {k: v.detach().to(device="cpu", dtype=torch_dtype if v.is_floating_point() else v.dtype, copy=True)
            for k, v in part.items()}


def components_from_flux_state_dict(state: dict, tokenizer, tokenizer_2, *, configs: FluxConfigs | None = None,
                                    torch_dtype: torch.dtype = torch.float32, label: str = "the state dict") -> dict:
    """A Flux.1 model's components from one state dict in ComfyUI's saved layout (`STATE_PARTS`), each part through
    the converter its single file goes through; the dict `load_flux_single_files` returns. `tokenizer` is a CLIP
    tokenizer (capped to CLIP's positions on a copy if it allows more: ComfyUI's says 8192), `tokenizer_2` T5's
    (FluxPipeline pads it to 512). The modules own their weights: `state` is neither changed nor shared. Quantised
    weights are refused by name, except a plain fp8 T5, upcast exactly as its single file is."""
    from .flux import FluxNetwork
    from .single_file import _capped_tokenizer

    configs = configs or FluxConfigs()
    configs.check()
    parts = {name: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
             for name, (_said, prefix) in STATE_PARTS.items()}
    if not is_flux_transformer(parts["transformer"]):
        raise ValueError(f"{label} is Flux without a whole FLUX.1 transformer under '{TRANSFORMER_PREFIX}' (img_in, "
                         "time_in, double_blocks, single_blocks): connect a FLUX.1 dev or schnell MODEL.")
    missing = [f"{said} ('{prefix}')" for name, (said, prefix) in STATE_PARTS.items() if not parts[name]]
    if missing:
        raise ValueError(f"{label} is Flux without {', '.join(missing)}: a Flux model needs its transformer, ae and "
                         "both text encoders (clip_l and t5xxl).")
    # Every part is checked before any is copied or built: a refusal should not cost gigabytes of copies.
    _check_not_quantised(parts["transformer"], label, prefixes=("",), family="Flux")
    _check_not_quantised(parts["vae"], label, prefixes=("",), family="Flux VAE")
    _check_not_quantised(parts["clip"], label, prefixes=("",), family="CLIP-L")
    t5 = _upcast_plain_fp8(parts["t5"], label, torch_dtype)  # ComfyUI keeps a t5xxl_fp8 file's weights in fp8
    clip_config = _read_json(os.path.join(configs.clip, "config.json"))
    transformer, _variant, scheduler_config = load_flux_transformer(
        _owned(parts.pop("transformer"), torch_dtype), configs, torch_dtype, label)
    vae = load_flux_vae(_owned(parts.pop("vae"), torch_dtype), configs, torch_dtype, label)
    text_encoder = load_flux_clip(_owned(parts.pop("clip"), torch_dtype), configs, torch_dtype, label)
    text_encoder_2 = load_flux_t5(_owned(t5, torch_dtype), configs, torch_dtype, label)
    return {"unet": FluxNetwork(transformer), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": _capped_tokenizer(tokenizer, clip_config["max_position_embeddings"]),
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "scheduler_config": scheduler_config}


def is_flux_transformer_file(path: str) -> bool:
    """Whether `path` is a .safetensors FLUX.1 transformer, from its header alone (no weight is read), so Load Model
    can route a 23 GB file before reading it once. Other suffixes and unreadable files: False (the checkpoint
    loader then names what is wrong)."""
    if not path.lower().endswith(".safetensors") or not os.path.isfile(path):
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError):
        return False
    return is_flux_transformer(dict.fromkeys(keys))


def load_flux_model(transformer_path: str, *, search_dirs: Sequence[str] = (), clip_tokenizer_dir: str | None = None,
                    clip_tokenizer_candidates: Sequence[str] = (), t5_tokenizer_dir: str | None = None,
                    t5_tokenizer_candidates: Sequence[str] = (), torch_dtype: torch.dtype = torch.float32,
                    configs: FluxConfigs | None = None) -> dict:
    """Load Model's way in: a FLUX.1 transformer file, its VAE/CLIP-L/T5 files found by `find_flux_parts` (next
    to it, then `search_dirs`), CLIP's tokenizer by `single_file.find_tokenizer_dir` (next to clip_l, then the
    candidates: ComfyUI's sd1_tokenizer) and T5's by `find_t5_tokenizer_dir`; every lookup fails before a weight
    is read."""
    from .single_file import find_tokenizer_dir

    parts = find_flux_parts(transformer_path, search_dirs)
    clip_tokenizer = find_tokenizer_dir(parts["clip"], clip_tokenizer_dir, tuple(clip_tokenizer_candidates))
    t5_tokenizer = find_t5_tokenizer_dir(parts["t5"], t5_tokenizer_dir, tuple(t5_tokenizer_candidates))
    return load_flux_single_files(transformer_path, parts["vae"], parts["clip"], parts["t5"], clip_tokenizer,
                                  t5_tokenizer, torch_dtype=torch_dtype, configs=configs)
