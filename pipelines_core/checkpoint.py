"""Single-file Stable Diffusion 1.5 checkpoints (original CompVis/LDM layout), loaded fully offline.

A `.safetensors`/`.ckpt` file holds only weights. The architecture comes from the SD-1.5 diffusers configs
shipped in `configs/sd15` (no weights, no tokenizer), handed to diffusers' single-file converters with
`local_files_only=True` and the Hub forced offline: without a local config diffusers would fetch one from the
Hub. The CLIP tokenizer is not inside such files, so it is looked up next to the checkpoint or in folders the
caller names (ComfyUI ships one).
"""

from __future__ import annotations

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
CLIP_PREFIX = "cond_stage_model.transformer."
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
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
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


def _check_layout(state: dict[str, torch.Tensor], unet_config: dict, path: str) -> None:
    """Fail early, in one line, on files that are not original-layout checkpoints shaped like the configs."""
    name = os.path.basename(path)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        diffusers_like = any(k.startswith("down_blocks.") for k in state)
        hint = "a diffusers or component-only file" if diffusers_like else "not a full SD model"
        raise ValueError(
            f"'{name}' has no 'model.diffusion_model.*' weights ({hint}): "
            "pick a full SD-1.5 checkpoint or a diffusers folder."
        )
    if not any(k.startswith(CLIP_PREFIX) for k in state):
        raise ValueError(
            f"'{name}' has no SD-1.x CLIP text encoder (cond_stage_model.transformer.*): "
            "only SD-1.5 checkpoints are supported (SD-2.x and SDXL are not)."
        )
    widths = {v.shape[-1] for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    text_width = unet_config["cross_attention_dim"]
    if widths and widths != {text_width}:
        raise ValueError(
            f"'{name}' expects text features of width {sorted(widths)}, not SD-1.5's {text_width}: "
            "only SD-1.5 checkpoints are supported."
        )
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != unet_config["in_channels"]:
        raise ValueError(
            f"'{name}' takes {conv_in.shape[1]} latent channels, not {unet_config['in_channels']} "
            "(an inpainting or instruct model?): only plain SD-1.5 text-to-image checkpoints are supported."
        )


def _incomplete(path: str, component: str, missing: Sequence[str] = ()) -> ValueError:
    detail = f" ({len(missing)}, e.g. {missing[0]})" if missing else ""
    return ValueError(
        f"'{os.path.basename(path)}' lacks {component} weights{detail}: "
        "it is not an SD-1.5 checkpoint matching the configs."
    )


def _load_component(component: str, path: str, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run one converter; weights it did not find stay on the meta device, so report them in one line."""
    try:
        model = load()
    except NotImplementedError as err:  # diffusers moves the half-loaded model off meta and fails there
        if "meta tensor" not in str(err):
            raise
        raise _incomplete(path, component) from None
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise _incomplete(path, component, missing)
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


def load_single_file(
    path: str,
    *,
    config_dir: str | None = None,
    tokenizer_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    tokenizer_candidates: Sequence[str] = (),
) -> dict:
    """Load an SD-1.5 single-file checkpoint (original layout) offline.

    Returns {"unet", "vae", "text_encoder", "tokenizer", "scheduler_config"} like `tiny.build_tiny_components`
    (CPU, eval mode, no grad). `config_dir` is a diffusers-style folder of configs (default: the shipped SD-1.5
    ones); the tokenizer is resolved by `find_tokenizer_dir(path, tokenizer_dir, tokenizer_candidates)`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    config_dir = str(config_dir or SD15_CONFIG_DIR)
    _check_config_dir(config_dir)
    tokenizer_folder = find_tokenizer_dir(path, tokenizer_dir, tokenizer_candidates)  # fail before reading GBs
    unet_config = _read_json(os.path.join(config_dir, "unet", "config.json"))
    scheduler_config = _read_json(os.path.join(config_dir, "scheduler", "scheduler_config.json"))

    state = _normalise_clip_keys(read_state_dict(path))
    _check_layout(state, unet_config, path)
    common = {"config": config_dir, "local_files_only": True, "torch_dtype": torch_dtype}
    with hub_offline(), _quiet_dtype_cast():
        unet = _load_component(
            "UNet", path, lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
        )
        vae = _load_component("VAE", path, lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common))
        # The text encoder has no from_single_file; this is the converter diffusers' pipeline loader uses.
        text_encoder = _load_component(
            "text encoder",
            path,
            lambda: create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder", **common),
        )
        tokenizer = load_tokenizer(tokenizer_folder, text_encoder.config.max_position_embeddings)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": scheduler_config,
    }
