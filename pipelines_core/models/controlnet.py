"""ControlNet Condition's engine: ControlNet loading and the ControlStack the sampler consumes.

A `ControlUnit` is one ControlNet with its per-frame hint images, strength and step window; a
`ControlStack` is the units a graph chained together. For every UNet call the sampler asks the stack
for `unet_kwargs(x, context, layout, state)`: each unit active at that step runs its ControlNet on the
frames of the call and the residuals of all units are summed (what diffusers' MultiControlNetModel
does), ready to pass to the UNet as `down_block_additional_residuals` / `mid_block_additional_residual`.

The step window, the strength and guess mode follow diffusers' StableDiffusionControlNetPipeline:
  keep_i = 1 - [i/total < start  or  (i+1)/total > end]       (step i of total)
and in guess mode the ControlNet sees only the conditional CFG chunk, the others get zero residuals
(diffusers' own 0.1..1 ramp over the residuals comes from `guess_mode=True` in the forward).

Text2Video-Zero also links frames inside the ControlNet: `attention_modules()` lists the ControlNets
whose self-attention should follow the sampler's cross-frame rule (per unit, `cross_frame_attention`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch

CONTROLNET_SD15_CONFIG_DIR = str(Path(__file__).resolve().parent / "configs" / "controlnet_sd15")
CONTROLNET_SDXL_CONFIG_DIR = str(Path(__file__).resolve().parent / "configs" / "controlnet_sdxl")
# The shipped config each family's single files are converted with when no config folder is given.
CONTROLNET_CONFIG_DIRS = {"SD-1.5": CONTROLNET_SD15_CONFIG_DIR, "SDXL": CONTROLNET_SDXL_CONFIG_DIR}
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
_LDM_PREFIX = "control_model."  # full ControlNet v1.0 training checkpoints nest the ControlNet here


# --- one ControlNet and its hints -----------------------------------------------------------------

def check_unit_settings(strength: float, start: float, end: float) -> None:
    """How a ControlNet steers, checked before any hint is made (ControlUnit checks it again)."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"ControlNet start/end must satisfy 0 <= start <= end <= 1 (got {start}, {end})")
    if strength < 0:
        raise ValueError(f"ControlNet strength must be 0 or more (got {strength})")


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet and how it steers sampling.

    hints: (F, 3, H, W) in 0..1 on the CPU, one per clip frame at the sampler's pixel size.
    strength scales the residuals; start/end is the active fraction of the steps; guess_mode runs the
    ControlNet on the conditional chunk only; cross_frame_attention lets the sampler's cross-frame rule
    act inside this ControlNet too (Text2Video-Zero, ControlVideo).
    """

    controlnet: torch.nn.Module
    hints: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    cross_frame_attention: bool = True
    name: str = ""  # what the user loaded, for messages

    def __post_init__(self) -> None:
        h = self.hints
        if not isinstance(h, torch.Tensor) or h.ndim != 4 or h.shape[1] != 3:
            shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"ControlNet hints must be (frames, 3, height, width), got {shape}")
        check_unit_settings(self.strength, self.start, self.end)
        # Kept on the CPU in float: only the frames of one call travel to the accelerator.
        object.__setattr__(self, "hints", h.detach().to("cpu", torch.float32).contiguous())

    @property
    def frame_count(self) -> int:
        return self.hints.shape[0]

    @property
    def size(self) -> tuple:
        return tuple(self.hints.shape[2:])

    @property
    def guesses(self) -> bool:
        """Guess mode as diffusers decides it: asked for, or forced by a global-pooling ControlNet (shuffle)."""
        return self.guess_mode or bool(getattr(self.controlnet.config, "global_pool_conditions", False))

    def active(self, index: int, total: int) -> bool:
        # diffusers' `controlnet_keep` rule, kept as it is so our ControlNet equals diffusers' (the whole step
        # [index, index + 1] / total inside [start, end]); the pack's own windows are sampling.windows'.
        return not (index / total < self.start or (index + 1) / total > self.end)

    def residuals(self, x: torch.Tensor, context: torch.Tensor, layout, timestep, with_layout: bool,
                  added: Optional[dict] = None):
        """(down residuals, mid residual) for the UNet batch `x`, or None when no chunk is controlled.
        `added`: the UNet's added conditioning rows (SDXL's `added_cond_kwargs`), which an SDXL ControlNet reads too."""
        roles = tuple(layout.roles) or ("cond",)
        if x.shape[0] != len(roles) * layout.frames:
            raise ValueError(f"UNet batch of {x.shape[0]} does not hold {len(roles)} chunks of {layout.frames} frames")
        # Guess mode: only the conditional chunk is controlled (diffusers' guess mode with CFG).
        chunks = [i for i, role in enumerate(roles) if role == "cond" or not self.guesses]
        if not chunks:
            return None
        self._check_text_width(context)
        if len(chunks) == len(roles):
            return self._run(x, context, layout, timestep, with_layout, added)
        rows = _chunk_rows(chunks, layout.frames, x.device)
        seen = replace(layout, roles=tuple(roles[i] for i in chunks))
        seen_added = None if added is None else {k: v[rows] for k, v in added.items()}
        down, mid = self._run(x[rows], context[rows], seen, timestep, with_layout, seen_added)
        # The chunks the ControlNet did not see get zero residuals.
        return [_scatter_rows(d, rows, x.shape[0]) for d in down], _scatter_rows(mid, rows, x.shape[0])

    def _run(self, x: torch.Tensor, context: torch.Tensor, layout, timestep, with_layout: bool,
             added: Optional[dict] = None):
        """The ControlNet on a (chunk, frame) batch, each frame with its own hint; hints travel per call."""
        model = self.controlnet
        device, dtype = model.device, model.dtype
        hint = self._hints_for(layout).to(device, dtype).repeat(x.shape[0] // layout.frames, 1, 1, 1)
        extra = {"cross_attention_kwargs": {"layout": layout}} if with_layout else {}
        if added is not None:
            extra["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in added.items()}
        down, mid = model(
            x.to(device, dtype), timestep, encoder_hidden_states=context.to(device, dtype), controlnet_cond=hint,
            conditioning_scale=self.strength, guess_mode=self.guesses, return_dict=False, **extra,
        )
        return [d.to(x) for d in down], mid.to(x)

    def _check_text_width(self, context: torch.Tensor) -> None:
        width = self.controlnet.config.cross_attention_dim
        if context.shape[-1] != width:
            raise ValueError(
                f"ControlNet{' ' + repr(self.name) if self.name else ''} expects text features of width {width} but the model gives "
                f"{context.shape[-1]}: use a ControlNet made for this model's family (SD-1.5 ControlNets with SD-1.5)"
            )

    def _hints_for(self, layout) -> torch.Tensor:
        ids = list(layout.frame_ids) or list(range(layout.frames))
        return self.hints[ids]

    def __repr__(self) -> str:
        n, h, w = self.frame_count, self.size[0], self.size[1]
        flags = (", guess mode" if self.guess_mode else "") + ("" if self.cross_frame_attention else ", own-frame attention")
        name = self.name or type(self.controlnet).__name__
        return f"ControlUnit({name!r}, {n} hints {w}x{h}, strength {self.strength:g}, steps {self.start:g}-{self.end:g}{flags})"


def _chunk_rows(chunks: list, frames: int, device) -> torch.Tensor:
    """Batch rows of the given CFG chunks in a (chunk, frame) layout."""
    return torch.tensor([c * frames + f for c in chunks for f in range(frames)], device=device)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """`values` placed at `rows` of a zero batch of size `batch`."""
    out = values.new_zeros((batch,) + tuple(values.shape[1:]))
    out[rows] = values
    return out


def controlnet_family(config) -> str:
    """The model family a ControlNet (or UNet) config belongs to, for messages: SDXL reads the added text/time
    embedding; otherwise the text width tells SD-2.x (1024) from SD-1.5 (768, and the pack's tiny models)."""
    if (config.get("addition_embed_type") if isinstance(config, dict) else getattr(config, "addition_embed_type", None)) == "text_time":
        return "SDXL"
    width = config["cross_attention_dim"] if isinstance(config, dict) else config.cross_attention_dim
    return "SD-2.x" if width == 1024 else "SD-1.5"


def _check_family(unit: "ControlUnit", n: int, model) -> None:
    """One line, before any step, when `unit`'s ControlNet reads text of another width than `model`'s UNet."""
    unet_config = getattr(getattr(model, "unet", None), "config", None)
    width = getattr(unet_config, "cross_attention_dim", None)
    if width is None:  # no model given, or a denoiser without UNet-style text width: the first call checks
        return
    expects = unit.controlnet.config.cross_attention_dim
    if expects != width:
        family = getattr(getattr(model, "backbone", None), "name", None) or controlnet_family(unet_config)
        label = f"ControlNet #{n}" + (f" {unit.name!r}" if unit.name else "")
        raise ValueError(
            f"{label} expects text features of width {expects} but the model gives {width}: it is an "
            f"{controlnet_family(unit.controlnet.config)} ControlNet and the model is {family}; "
            f"feed ControlNet Condition an {family} ControlNet"
        )


# --- the stack the sampler consumes -----------------------------------------------------------------

@dataclass(frozen=True)
class ControlStack:
    """ControlNets applied together; their residuals are summed. Immutable: `add` returns a new stack,
    so a stack another branch of the graph uses is never altered."""

    units: tuple = field(default=())

    def add(self, unit: ControlUnit) -> "ControlStack":
        return ControlStack(self.units + (unit,))

    def __len__(self) -> int:
        return len(self.units)

    def check(self, frame_count: int, size: tuple, model=None) -> None:
        """Fail before sampling when hints do not match the frames being sampled (size is (height, width)), and,
        given the `model` (a LoadedModel), when a ControlNet reads text features of another width than its UNet's
        (a ControlNet of another family), which would otherwise fail only at the first UNet call."""
        for n, unit in enumerate(self.units, 1):
            which = f"ControlNet #{n}" + (f" ({unit.name})" if unit.name else "")
            if unit.frame_count != frame_count:
                raise ValueError(
                    f"{which} has hints for {unit.frame_count} frames but the sampler makes {frame_count}: "
                    "feed ControlNet Condition the same frames as the Cross-Frame Sampler"
                )
            if tuple(unit.size) != tuple(size):
                (hh, hw), (h, w) = unit.size, size
                raise ValueError(
                    f"{which} has {hw}x{hh} hints but the sampler makes {w}x{h} frames: "
                    "resize the images fed to ControlNet Condition to the sampler's size"
                )
            _check_family(unit, n, model)

    def attention_modules(self) -> list:
        """The ControlNets whose attention should follow the sampler's cross-frame rule, each once (a model
        shared by several units is linked when any of them asks: processors belong to the model)."""
        modules = []
        for unit in self.units:
            if unit.cross_frame_attention and not any(unit.controlnet is m for m in modules):
                modules.append(unit.controlnet)
        return modules

    def unet_kwargs(self, x: torch.Tensor, context: torch.Tensor, layout, state, added: Optional[dict] = None) -> dict:
        """Summed ControlNet residuals for one UNet call, or {} when no ControlNet is active at this step. `added`:
        the UNet call's own added-conditioning kwargs (SDXL), handed to the ControlNets as well."""
        added = (added or {}).get("added_cond_kwargs")
        linked = self.attention_modules()
        down, mid = None, None
        for unit in self.units:
            if not unit.active(state.index, state.total):
                continue
            with_layout = any(unit.controlnet is m for m in linked)
            out = unit.residuals(x, context, layout, state.timestep, with_layout, added)
            if out is None:
                continue
            if down is None:
                down, mid = out
            else:
                down = [a + b for a, b in zip(down, out[0])]
                mid = mid + out[1]
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def __repr__(self) -> str:
        return f"ControlStack({', '.join(repr(u) for u in self.units) or 'empty'})"


# --- loading ----------------------------------------------------------------------------------------

def _resolve(dtype: Union[torch.dtype, str], device: Union[torch.device, str]) -> tuple:
    from .model import DTYPES, resolve_device

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return dtype, device if isinstance(device, torch.device) else resolve_device(device)


def _ldm_controlnet(state: dict) -> Optional[dict]:
    """The ControlNet weights of an original-layout file, prefix removed; None if the file is not one."""
    if "input_hint_block.0.weight" in state:
        return state
    if _LDM_PREFIX + "input_hint_block.0.weight" in state:
        return {k[len(_LDM_PREFIX):]: v for k, v in state.items() if k.startswith(_LDM_PREFIX)}
    return None


def single_file_family(keys) -> str:
    """The family a ControlNet single file's keys say it is for: SDXL when it has SDXL's added text/time embedding
    (diffusers layout `add_embedding.*`, the original layout `label_emb.*`, maybe under `control_model.`), SD-1.5
    otherwise (SD-1.5 ControlNets have neither)."""
    for key in keys:
        if key.startswith(("add_embedding.linear_1.", "label_emb.", _LDM_PREFIX + "label_emb.")):
            return "SDXL"
    return "SD-1.5"


def _read_config(config_dir: str) -> dict:
    import json

    path = os.path.join(config_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ControlNet config folder {config_dir!r} has no config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_single_file(state: dict, config: dict, path: str, family: str = "SD-1.5") -> None:
    """One-line errors for files that are not ControlNets shaped like the config; `family`: what the file's keys say."""
    name = os.path.basename(path)
    ldm = _ldm_controlnet(state)
    if ldm is None and "controlnet_cond_embedding.conv_in.weight" not in state:
        raise ValueError(
            f"'{name}' holds no ControlNet weights (no input_hint_block / controlnet_cond_embedding): "
            "pick a ControlNet file, not a Stable Diffusion checkpoint or LoRA"
        )
    weights = ldm if ldm is not None else state
    widths = {v.shape[-1] for k, v in weights.items() if k.endswith("attn2.to_k.weight")}
    wants = controlnet_family(config)
    if widths and widths != {config["cross_attention_dim"]}:
        raise ValueError(
            f"'{name}' is an {family} ControlNet for text features of width {sorted(widths)}, not "
            f"{config['cross_attention_dim']} (the {wants} config): pick an {wants} ControlNet, or a diffusers "
            "folder with its config"
        )
    if family == "SDXL" and config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"'{name}' is an SDXL ControlNet but the config is {wants}'s (no text_time added embedding): "
            "give an SDXL ControlNet config folder, or none"
        )


def _mismatch(source: str, missing: tuple = (), family: str = "SD-1.5") -> ValueError:
    detail = f" ({len(missing)} missing, e.g. {missing[0]})" if missing else ""
    return ValueError(
        f"'{os.path.basename(source)}' is incomplete or not shaped like the ControlNet config{detail}: "
        f"pick an {family} ControlNet file, or a diffusers ControlNet folder"
    )


def _converted_sdxl_ldm(state: dict, config: dict) -> dict:
    """An original-layout SDXL file in diffusers keys, or `state` itself for any other file. Such files keep SDXL's
    added text/time embedding as `label_emb.0.{0,2}`, which diffusers' ControlNet converter does not map (its key
    table names them, its ControlNet converter leaves them out), so the file is converted here with that converter
    and the embedding added; `from_single_file` then takes the result as diffusers keys. A missing tensor stays None
    and fails there (reported as a mismatch)."""
    ldm = _ldm_controlnet(state)
    if ldm is None or not any(k.startswith("label_emb.") for k in ldm):
        return state
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(checkpoint=ldm, config=config)
    for linear, index in ((1, 0), (2, 2)):
        for param in ("weight", "bias"):
            converted[f"add_embedding.linear_{linear}.{param}"] = ldm.get(f"label_emb.0.{index}.{param}")
    return converted


def _finish(model: torch.nn.Module, source: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    missing = tuple(n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta)
    if missing:
        raise _mismatch(source, missing)
    return place(model, device, dtype)


def place(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """`model` on `device` in `dtype`, ready for inference. A dtype is named to `.to()` only when it
    changes: diffusers warns "modules ... should be kept in float32: []" on every call that names one."""
    model = model.to(device=device)
    if model.dtype != dtype:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def load_controlnet(
    source: str,
    dtype: Union[torch.dtype, str] = torch.float32,
    device: Union[torch.device, str] = "cpu",
    config_dir: Optional[str] = None,
) -> torch.nn.Module:
    """Load a ControlNet offline from a diffusers folder (config.json + weights) or a single file.

    Single files (.safetensors/.pth, the original ControlNet layout or diffusers keys) are converted with
    the config in `config_dir`; without one, with the shipped config of the family the file's keys say
    (`single_file_family`: SDXL base ControlNet or SD-1.5 ControlNet v1.1). Nothing is downloaded.
    """
    from diffusers import ControlNetModel

    from .single_file import hub_offline, read_state_dict

    dtype, device = _resolve(dtype, device)
    load_dtype = None if dtype == torch.float32 else dtype  # fp32 is the default; naming it only adds a warning
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise FileNotFoundError(
                f"ControlNet folder {source!r} has no config.json: point at a diffusers ControlNet folder or a "
                ".safetensors/.pth file"
            )
        with hub_offline():
            try:
                model = ControlNetModel.from_pretrained(source, torch_dtype=load_dtype, local_files_only=True)
            except OSError:
                raise FileNotFoundError(
                    f"ControlNet folder {source!r} has a config.json but no diffusion_pytorch_model.safetensors "
                    "(or .bin) weights next to it"
                ) from None
        return _finish(model, source, dtype, device)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"ControlNet {source!r} not found: give a diffusers ControlNet folder or a .safetensors/.pth file")
    if not source.lower().endswith(CONTROLNET_SUFFIXES):
        raise ValueError(f"'{os.path.basename(source)}' is not a ControlNet file: expected one of {', '.join(CONTROLNET_SUFFIXES)}")
    state = read_state_dict(source)
    family = single_file_family(state)
    config_dir = str(config_dir or CONTROLNET_CONFIG_DIRS[family])
    config = _read_config(config_dir)
    _check_single_file(state, config, source, family)
    with hub_offline():
        try:
            model = ControlNetModel.from_single_file(
                _converted_sdxl_ldm(state, config), config=config_dir, local_files_only=True, torch_dtype=load_dtype
            )
        except (AttributeError, KeyError, NotImplementedError, RuntimeError) as err:
            # diffusers' converter meets a missing or misshapen tensor (None, meta or size mismatch)
            raise _mismatch(source, family=family) from err
    return _finish(model, source, dtype, device)
