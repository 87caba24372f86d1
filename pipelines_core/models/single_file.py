"""Single-file Stable Diffusion 1.5 checkpoints (original CompVis/LDM layout), loaded fully offline.

A `.safetensors`/`.ckpt` file holds only weights. The architecture comes from the SD-1.5 diffusers configs
shipped in `configs/sd15` (no weights, no tokenizer), handed to diffusers' single-file converters with
`local_files_only=True` and the Hub forced offline: without a local config diffusers would fetch one from the
Hub. The CLIP tokenizer is not inside such files, so it is looked up next to the checkpoint or in folders the
caller names (ComfyUI ships one).

Two ways in, one conversion (`components_from_state_dict`): a file is read into a state dict first
(`load_single_file`); a state dict in the same layout can also come from elsewhere, e.g. what ComfyUI's
checkpoint save writes for the model it holds (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.text_model.*`). What the SD-1.5 configs cannot describe (other families,
quantised weights) is refused in one line before any conversion. An InstructPix2Pix file is SD-1.5 with an
8-channel conv_in (noisy latent + source latent): recognised by that weight's shape and loaded with the same
configs, `in_channels` overridden. SDXL base files are `sdxl_single_file.py`'s (its own shipped configs, this
module's machinery); its `load_checkpoint_file` reads a file once and routes it to either.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

SD15_CONFIG_DIR = str(Path(__file__).resolve().parent / "configs" / "sd15")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
MODEL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")


# --- tokenizer ---------------------------------------------------------------------------------------

def _holds_tokenizer(folder: str) -> bool:
    """A CLIP tokenizer folder: BPE vocab + merges (what SD and ComfyUI ship), or a fast tokenizer.json."""
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(folder, name))

    return (has("vocab.json") and has("merges.txt")) or has("tokenizer.json")


def _tokenizer_in(folder: str) -> str | None:
    """`folder` itself or its `tokenizer/` subfolder (a diffusers pipeline folder), if it holds a tokenizer."""
    for candidate in (os.path.join(folder, "tokenizer"), folder):
        if os.path.isdir(candidate) and _holds_tokenizer(candidate):
            return candidate
    return None


def find_tokenizer_dir(
    checkpoint_path: str, tokenizer_dir: str | None = None, extra_candidates: Sequence[str] = ()
) -> str:
    """The CLIP tokenizer folder for a checkpoint; never downloads.

    Order: the explicit `tokenizer_dir`; a `tokenizer/` folder (or vocab.json + merges.txt) next to the
    checkpoint; each of `extra_candidates` (e.g. ComfyUI's `comfy/sd1_tokenizer`).
    """
    if tokenizer_dir:
        found = _tokenizer_in(tokenizer_dir)
        if found is None:
            raise FileNotFoundError(
                f"Tokenizer folder '{tokenizer_dir}' has no vocab.json + merges.txt: point the 'tokenizer' input "
                "at SD-1.5's tokenizer folder (or leave it empty to search next to the checkpoint)."
            )
        return found
    for folder in (os.path.dirname(os.path.abspath(checkpoint_path)), *extra_candidates):
        if folder and (found := _tokenizer_in(folder)):
            return found
    raise FileNotFoundError(
        f"No CLIP tokenizer found for '{os.path.basename(checkpoint_path)}': put SD-1.5's 'tokenizer' folder "
        "(vocab.json + merges.txt) next to the checkpoint, or name a folder in the Load Model node's "
        "'tokenizer' input."
    )


def load_tokenizer(folder: str, max_length: int):
    """CLIPTokenizer from a local folder; caps model_max_length at the text encoder's positions."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.model_max_length > max_length:  # vocab+merges alone leave it "unlimited"; SD pads to 77
        tokenizer.model_max_length = max_length
    return tokenizer


# --- weights -----------------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint on CPU; pickles load with weights_only=True (no code runs)."""
    suffix = Path(path).suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"'{path}' is not a checkpoint file: expected one of {', '.join(CHECKPOINT_SUFFIXES)}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist: check the path in the Load Model node.")
    # Imported here: this function alone turns the readers' raw errors into one line naming the file.
    import pickle
    import re
    import zipfile

    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as err:  # "header too large", "incomplete metadata": a damaged or foreign file
            raise ValueError(f"'{path}' is not a valid checkpoint ({err}): re-download it or choose another "
                             "file.") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises weights_only=False, i.e. running the file's code: never pass that on. The
        # type stays UnpicklingError (callers catch it); only the message is replaced.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise pickle.UnpicklingError(
                f"'{path}' is not a plain weights file: it holds the Python object {found.group(1)}, which is "
                "refused because loading it could run code; use the model's .safetensors file instead.") from err
        raise pickle.UnpicklingError(f"'{path}' is not a valid checkpoint (not PyTorch weights, or damaged): "
                                     "re-download it or choose another file.") from err
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError, zipfile.BadZipFile) as err:  # what torch.load raises on text, cut or foreign files
        raise ValueError(f"'{path}' is not a valid checkpoint (not PyTorch weights, or damaged: "
                         f"{type(err).__name__}): re-download it or choose another file.") from err
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning wraps it
        state = state["state_dict"]
    return state


def _normalise_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some early SD-1.x files store CLIP without the `text_model.` level; the converters expect it."""
    out = {}
    for key, value in state.items():
        if key.startswith(CLIP_PREFIX) and not key.startswith(CLIP_PREFIX + "text_model."):
            key = CLIP_PREFIX + "text_model." + key[len(CLIP_PREFIX):]
        out[key] = value
    return out


# Markers of quantised weights: ComfyUI's scaled fp8 (`scaled_fp8`, `scale_weight`, `scale_input`),
# NVIDIA ModelOpt / TensorRT fp8 (`weight_scale`, `input_scale`), bitsandbytes NF4/FP4 (`absmax`, `quant_map`,
# `quant_state.*`). Their weights only mean something together with these scales, which diffusers' SD-1.5
# converters know nothing about.
_QUANT_KEY_MARKERS = ("scaled_fp8", "scale_weight", "scale_input", "weight_scale", "input_scale", "absmax",
                      "quant_map", "quant_state")


def _family(state: dict) -> str | None:
    """The model family a non-SD-1.x state dict belongs to, when its keys say so; None if SD-1.x-like."""
    keys = state.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders."):  # SDXL's two text encoders (the refiner has only OpenCLIP bigG)
        return "SDXL" if has("conditioner.embedders.1.") else "SDXL refiner"
    if has("cond_stage_model.model."):  # OpenCLIP ViT-H under cond_stage_model: SD-2.x (and SD-2 unCLIP)
        return "SD-2.x"
    for prefix in ("", UNET_PREFIX):
        if has(prefix + "double_blocks.") and has(prefix + "single_blocks."):
            return "Flux"
        if has(prefix + "joint_blocks."):
            return "SD3"
    if has(UNET_PREFIX + "label_emb."):  # class/size-conditioned UNet without SDXL's text encoders
        return "SDXL (UNet only)"
    if any(".time_stack." in k for k in keys if k.startswith(UNET_PREFIX)):
        return "Stable Video Diffusion"
    if has(UNET_PREFIX) and not has(UNET_PREFIX + "input_blocks."):
        return "a non-UNet (DiT) model"
    widths = {state[k].shape[-1] for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    if widths == {1024}:
        return "SD-2.x"
    return None


def _check_not_quantised(state: dict, label: str, prefixes: tuple = MODEL_PREFIXES, family: str = "SD-1.5") -> None:
    """Quantised weights cannot go through the converters: they would load as garbage or fail deep inside.
    `prefixes`: where the family's converted weights live; `family` names it in the messages."""
    for key, value in state.items():
        marked = any(m in part for part in key.split(".") for m in _QUANT_KEY_MARKERS)
        if not key.startswith(prefixes) and not marked:
            continue  # schedule buffers, v_pred/EMA markers, ...: not converted, so not our concern here
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{label}: '{key}' is a {type(value).__name__}, not a tensor: not a plain {family} state dict."
            )
        if type(value) not in (torch.Tensor, torch.nn.Parameter):  # GGUF's GGMLTensor, torchao's quantised tensors
            raise ValueError(
                f"{label} holds quantised tensors ({type(value).__name__} at '{key}', e.g. GGUF): only plain "
                f"fp32/fp16/bf16 {family} weights can be converted; load the unquantised checkpoint."
            )
        dtype_name = str(value.dtype).removeprefix("torch.")
        if dtype_name.startswith(("float8", "float4")):
            raise ValueError(
                f"{label} holds {dtype_name} weights ('{key}'): quantised (fp8) weights cannot be converted; load "
                "the checkpoint in fp16/fp32 (in ComfyUI: weight_dtype 'default', no --fp8 options)."
            )
        if marked:
            raise ValueError(
                f"{label} holds quantisation scales ('{key}'): scaled-fp8/NF4 quantised weights cannot be "
                "converted; load the unquantised checkpoint."
            )
        if not value.is_floating_point() and key.endswith((".weight", ".bias")):
            raise ValueError(
                f"{label} holds {dtype_name} weights ('{key}'): int8/NF4-quantised weights cannot be converted; "
                "load the unquantised checkpoint."
            )


def check_convertible(state: dict, unet_config: dict, vae_config: dict, label: str) -> None:
    """Fail early, in one line, on state dicts that are not original-layout SD-1.x shaped like the configs.

    `label` names the source in the messages (e.g. "'model.safetensors'" or "ComfyUI's model").
    """
    family = _family(state)
    if family is not None:
        raise ValueError(f"{label} is {family}, not SD-1.5: only SD-1.5 checkpoints are supported.")
    _check_not_quantised(state, label)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        diffusers_like = any(k.startswith("down_blocks.") for k in state)
        hint = "a diffusers or component-only file" if diffusers_like else "not a full SD model"
        raise ValueError(
            f"{label} has no 'model.diffusion_model.*' weights ({hint}): "
            "pick a full SD-1.5 checkpoint or a diffusers folder."
        )
    if not any(k.startswith(CLIP_PREFIX) for k in state):
        raise ValueError(
            f"{label} has no SD-1.x CLIP text encoder (cond_stage_model.transformer.*): "
            "only SD-1.5 checkpoints are supported (SD-2.x and SDXL are not)."
        )
    if "v_pred" in state:  # written by ComfyUI's checkpoint save for v-prediction models
        raise ValueError(
            f"{label} is a v-prediction model ('v_pred' key): the SD-1.5 scheduler config predicts noise (epsilon), "
            "so only epsilon-prediction SD-1.5 checkpoints are supported."
        )
    widths = {v.shape[-1] for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    text_width = unet_config["cross_attention_dim"]
    if widths and widths != {text_width}:
        raise ValueError(
            f"{label} expects text features of width {sorted(widths)}, not SD-1.5's {text_width}: "
            "only SD-1.5 checkpoints are supported."
        )
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] not in (unet_config["in_channels"], instruct_channels(vae_config)):
        raise ValueError(
            f"{label} takes {conv_in.shape[1]} latent channels, not {unet_config['in_channels']} "
            "(an inpainting model?): only SD-1.5 text-to-image and InstructPix2Pix checkpoints are supported."
        )
    moments = state.get(VAE_PREFIX + "encoder.conv_out.weight")  # mean and log-variance per latent channel
    if moments is not None and moments.shape[0] != 2 * vae_config["latent_channels"]:
        raise ValueError(
            f"{label} has a VAE with {moments.shape[0] // 2} latent channels, not {vae_config['latent_channels']}: "
            "not an SD-1.5 VAE."
        )


def instruct_channels(vae_config: dict) -> int:
    """The UNet input channels of an InstructPix2Pix model: the noisy latent and the source latent side by side."""
    return 2 * int(vae_config["latent_channels"])


def unet_overrides(state: dict, unet_config: dict, vae_config: dict) -> dict:
    """What the UNet config must change for this state dict: InstructPix2Pix's 8-channel conv_in is SD-1.5's UNet
    otherwise, so an instruct file loads with the same configs (diffusers' converter maps the weights alike)."""
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    channels = instruct_channels(vae_config)
    if conv_in is not None and conv_in.shape[1] == channels != unet_config["in_channels"]:
        return {"in_channels": channels}
    return {}


def _incomplete(label: str, component: str, missing: Sequence[str] = (), family: str = "SD-1.5") -> ValueError:
    detail = f" ({len(missing)}, e.g. {missing[0]})" if missing else ""
    return ValueError(
        f"{label} lacks {component} weights{detail}: "
        f"it is not an {family} checkpoint matching the configs."
    )


def _load_component(component: str, label: str, load: Callable[[], torch.nn.Module],
                    family: str = "SD-1.5") -> torch.nn.Module:
    """Run one converter; weights it did not find stay on the meta device, so report them in one line."""
    try:
        model = load()
    except NotImplementedError as err:  # diffusers moves the half-loaded model off meta and fails there
        if "meta tensor" not in str(err):
            raise
        raise _incomplete(label, component, family=family) from None
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise _incomplete(label, component, missing, family)
    return model.eval().requires_grad_(False)


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers warns on every `from_single_file(torch_dtype=...)` even when no module needs float32."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextmanager
def _quiet_dtype_cast() -> Iterator[None]:
    log = logging.getLogger("diffusers.models.modeling_utils")
    noise = _DropEmptyFp32Warning()
    log.addFilter(noise)
    try:
        yield
    finally:
        log.removeFilter(noise)


@contextmanager
def hub_offline() -> Iterator[None]:
    """Force huggingface_hub (and so diffusers/transformers) offline for the duration: any Hub request raises.

    The flag is process-wide, so a download another thread starts meanwhile is refused too.
    """
    import huggingface_hub.constants as hub_constants

    saved_flag, saved_env = hub_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hub_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _check_config_dir(config_dir: str) -> None:
    """Every component config must be local: a missing one would otherwise send transformers to the Hub."""
    missing = [name for name in CONFIG_FILES if not os.path.isfile(os.path.join(config_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"Config folder '{config_dir}' lacks {', '.join(missing)}: point it at a diffusers-style SD-1.5 "
            "folder (or leave it unset to use the shipped SD-1.5 configs)."
        )


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _owned_copy(state: dict, torch_dtype: torch.dtype, prefixes: tuple = MODEL_PREFIXES) -> dict:
    """The model tensors of `state`, copied to the CPU in `torch_dtype` (floating point only).

    The converters put the tensors they are given into the new modules as they are (no copy when the
    dtype already matches), so modules built from someone else's tensors would share their storage and
    change whenever the owner writes into them (ComfyUI writes patched and restored weights into its
    tensors in place for hook patches and `weight_inplace_update` models). Casting while copying costs one
    copy, not two, and rounds exactly as the converters' own cast would.
    """
    owned = {}
    for key, value in state.items():
        if key.startswith(prefixes):
            dtype = torch_dtype if value.is_floating_point() else value.dtype
            owned[key] = value.detach().to(device="cpu", dtype=dtype, copy=True)
    return owned


def _capped_tokenizer(tokenizer, max_length: int):
    """The tokenizer, padding/truncating to the text encoder's positions; a capped copy if it allows more.

    A tokenizer handed in may be shared (ComfyUI's own says 8192), so it is never changed in place.
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit <= max_length:
        return tokenizer
    capped = copy.deepcopy(tokenizer)
    capped.model_max_length = max_length
    return capped


def components_from_state_dict(
    state: dict[str, torch.Tensor],
    tokenizer,
    *,
    config_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    label: str = "the state dict",
    copy_tensors: bool = True,
) -> dict:
    """SD-1.5 components from a state dict in the original single-file layout, offline.

    Returns {"unet", "vae", "text_encoder", "tokenizer", "scheduler_config"} like `tiny.build_tiny_components`
    (CPU, eval mode, no grad). `config_dir` is a diffusers-style folder of configs (default: the shipped SD-1.5
    ones); `tokenizer` is a CLIP tokenizer object (capped to the text encoder's 77 positions on a copy if
    needed). With `copy_tensors` (the default) the modules own their weights; a caller whose tensors are
    fresh and its own (a file just read) passes False and saves a copy. `label` names the source in errors.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    config_dir = str(config_dir or SD15_CONFIG_DIR)
    _check_config_dir(config_dir)
    unet_config = _read_json(os.path.join(config_dir, "unet", "config.json"))
    vae_config = _read_json(os.path.join(config_dir, "vae", "config.json"))
    text_config = _read_json(os.path.join(config_dir, "text_encoder", "config.json"))
    scheduler_config = _read_json(os.path.join(config_dir, "scheduler", "scheduler_config.json"))

    check_convertible(state, unet_config, vae_config, label)  # before copying gigabytes
    overrides = unet_overrides(state, unet_config, vae_config)
    if copy_tensors:
        state = _owned_copy(state, torch_dtype)
    state = _normalise_clip_keys(state)
    common = {"config": config_dir, "local_files_only": True, "torch_dtype": torch_dtype}
    with hub_offline(), _quiet_dtype_cast():
        unet = _load_component(
            "UNet", label, lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common,
                                                                 **overrides)
        )
        vae = _load_component("VAE", label, lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common))
        # The text encoder has no from_single_file; this is the converter diffusers' pipeline loader uses.
        text_encoder = _load_component(
            "text encoder",
            label,
            lambda: create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder", **common),
        )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": _capped_tokenizer(tokenizer, text_config["max_position_embeddings"]),
        "scheduler_config": scheduler_config,
    }


def load_single_file(
    path: str,
    *,
    config_dir: str | None = None,
    tokenizer_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    tokenizer_candidates: Sequence[str] = (),
) -> dict:
    """Load an SD-1.5 single-file checkpoint (original layout) offline: read it, then `components_from_state_dict`.

    `config_dir` is a diffusers-style folder of configs (default: the shipped SD-1.5 ones); the tokenizer is
    resolved by `find_tokenizer_dir(path, tokenizer_dir, tokenizer_candidates)`.
    """
    config_dir = str(config_dir or SD15_CONFIG_DIR)
    _check_config_dir(config_dir)
    tokenizer_folder = find_tokenizer_dir(path, tokenizer_dir, tokenizer_candidates)  # fail before reading GBs
    state = read_state_dict(path)
    return components_from_file_state(state, tokenizer_folder, config_dir=config_dir, torch_dtype=torch_dtype,
                                      label=f"'{os.path.basename(path)}'")


def components_from_file_state(
    state: dict[str, torch.Tensor],
    tokenizer_folder: str,
    *,
    config_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    label: str = "the checkpoint",
) -> dict:
    """What `load_single_file` does once the file is read: the tokenizer from `tokenizer_folder`, then
    `components_from_state_dict` taking the tensors over (a file just read belongs to nobody else)."""
    config_dir = str(config_dir or SD15_CONFIG_DIR)
    _check_config_dir(config_dir)
    text_config = _read_json(os.path.join(config_dir, "text_encoder", "config.json"))
    tokenizer = load_tokenizer(tokenizer_folder, text_config["max_position_embeddings"])
    return components_from_state_dict(
        state, tokenizer, config_dir=config_dir, torch_dtype=torch_dtype, label=label, copy_tensors=False,
    )
