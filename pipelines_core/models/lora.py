"""LoRA Apply's engine: LoRA files stacked on a VE_MODEL without changing it.

A LoRA adds a low-rank update to chosen layers:  W' = W + s · (α / r) · B · A  (A: r×in, B: out×r,
s: the strength). Apply nodes never touch the modules: `add_lora` returns a new VEModel whose
`loras` names the file and strength. `lora_scope(model)` makes exactly those LoRAs active on the
shared UNet and text encoder(s) (SDXL: both) for the duration of a block, and hands the modules back computing
what they computed before (the base model, outside any scope), so other branches of the graph
that run the same weights see no LoRA.

Mechanism: on entering a scope each file is loaded into the shared modules as a named peft adapter
(name from the file's path, size and mtime) with diffusers' loaders and activated at its strength;
the scope's exit removes every wrapper it added, so the modules are plain diffusers/transformers
layers again with untouched base weights (a model object is shared by every later graph and must
come back exactly as it was lent). Nothing is fused into the base weights. Nested scopes load into
the outer scope's wrappers and hand them back as they found them.

Layouts read: kohya/A1111 (`lora_unet_…lora_down.weight`, `.lora_up.weight`, `.alpha`,
`lora_te_…`; SDXL: `lora_te1_…`, `lora_te2_…` and the UNet's sgm block names `input_blocks_4_1_…`),
converted by diffusers (`StableDiffusionXLLoraLoaderMixin.lora_state_dict` with the UNet's config maps
SDXL's sgm blocks); diffusers/peft (`unet.….lora_A.weight`, `….lora.down.weight`, `text_encoder.…`,
`text_encoder_2.…`), with the adapter config diffusers writes into the file header when there is one.

Families: the family is the model's (`VEModel.backbone`). A file is read against it and refused, in one
line naming the file and the family, when its layers are not the model's: an SD-1.5 LoRA's UNet layers do
not exist in SDXL's UNet (or have other widths) and an SDXL LoRA's `text_encoder_2` layers have no home in
SD-1.5. (A LoRA of CLIP ViT-L alone cannot be told apart: SD-1.5's text encoder is SDXL's first one.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .model import VEModel

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PARTS = ("unet", "text_encoder", "text_encoder_2")  # the modules a LoRA may change, as diffusers names them
OTHER_FAMILIES = {"SD-1.5": "SDXL, SD3, Flux, …", "SDXL": "SD-1.5, SD3, Flux, …"}  # for "made for another family"
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
HEADER_CONFIG_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfig


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA in a model's stack. `adapter_name` identifies the file's content, so the same file
    is loaded into the modules once however many specs (strengths, branches) name it."""

    path: str
    strength: float
    adapter_name: str
    parts: tuple  # which of PARTS the file changes


@dataclass(frozen=True)
class LoraLayers:
    """A LoRA file in peft's layout, per model part: {part: {"<module path>.lora_A.weight": …}},
    plus the adapter config the file declares for a part (diffusers' header), if any."""

    name: str  # the file name, for messages
    weights: dict
    configs: dict


# --- public API -----------------------------------------------------------------------------------

def adapter_name_for(path: str) -> str:
    """A stable peft adapter name for a file: readable stem + hash of (path, size, mtime)."""
    path = os.path.abspath(path)
    stat = os.stat(path)
    digest = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])[:40]
    return f"lora_{stem}_{digest}"  # peft names become module keys: no dots allowed


def check_lora(model: VEModel, path: str) -> dict:
    """Validate a LoRA file against `model` without changing anything; returns layers per part.
    Raises FileNotFoundError / ValueError with a one-line message."""
    if model.backbone.joint_attention:
        raise ValueError(f"LoRA Apply: '{os.path.basename(path)}' would go on a {model.backbone.name} model, and "
                         "LoRAs load into SD-1.5 and SDXL models only for now: disconnect LoRA Apply")
    layers = read_lora(path, model)
    return {part: _check_fit(_module(model, part), layers, part, _family(model)) for part in layers.weights}


def add_lora(model: VEModel, path: str, strength: float = 1.0) -> VEModel:
    """`model` with one more LoRA on its stack; `model` itself is not changed (LoRA Apply)."""
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number (got {strength})")
    counts = check_lora(model, path)
    spec = LoraSpec(os.path.abspath(path), strength, adapter_name_for(path), tuple(p for p in PARTS if p in counts))
    return model.with_changes(loras=tuple(model.loras) + (spec,))


@contextmanager
def lora_scope(model: VEModel) -> Iterator[VEModel]:
    """Inside the block, the UNet and text encoder compute `model` with exactly `model.loras`
    active at their strengths; on exit they compute what they computed before (the base model)."""
    weights = adapter_weights(model.loras)
    modules = [_module(model, part) for part in _parts(model)]
    # The modules are shared by every model built from the same Load Model output (ComfyUI caches it
    # and hands it to every later graph), so a scope that found them plain leaves them plain: no peft
    # wrapper may outlive it (a ControlNet built from the UNet would copy the wrappers' keys).
    plain = [not _tuner_layers(module) for module in modules]
    saved = [_snapshot(module) for module in modules]  # before loading: new layers end disabled
    try:
        for spec in model.loras:
            _ensure_loaded(model, spec)
        for module in modules:
            _activate(module, weights)
        yield model
    finally:
        for module, was_plain, state in zip(modules, plain, saved):
            if was_plain:
                _remove_adapters(module)
            else:  # an enclosing scope loaded them: hand them back to it as they were
                _restore(module, state)


def adapter_weights(loras) -> dict:
    """Adapter name -> total strength. A file stacked twice adds up: (B·A)·s1 + (B·A)·s2 = (B·A)·(s1+s2)."""
    weights: dict = {}
    for spec in loras:
        weights[spec.adapter_name] = weights.get(spec.adapter_name, 0.0) + spec.strength
    return weights


# --- reading a file ------------------------------------------------------------------------------

def read_lora(path: str, model: Optional[VEModel] = None) -> LoraLayers:
    """Read a LoRA file (either layout) into peft's layout per model part, for `model`'s family (SD-1.5 when
    none is given): SDXL's kohya files name the UNet's sgm blocks, which only its UNet config can map."""
    name = os.path.basename(path)
    family = _family(model)
    state, header_configs = _read_file(path, family)
    if not any("lora" in key for key in state):
        raise ValueError(
            f"not a LoRA for {family}: '{name}' holds no LoRA weights (expected keys like "
            f"'lora_unet_…lora_down.weight' or 'unet.….lora_A.weight'; is it a checkpoint or an embedding?)"
        )
    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in state):
        raise ValueError(f"'{name}' is a DoRA, which LoRA Apply does not support; use a plain LoRA")
    others = [key for key in state if not key.startswith(KOHYA_PREFIXES)]
    if others and len(others) < len(state):
        raise ValueError(f"not a LoRA for {family}: '{name}' mixes kohya layers with keys LoRA Apply cannot read "
                         f"(e.g. '{others[0]}')")
    if not others:
        state = _fold_kohya_alphas(state)
    state = _diffusers_layout(state, name, model)
    return LoraLayers(name, _split_parts(state, name, _parts(model), family), header_configs)


def _read_file(path: str, family: str) -> tuple[dict, dict]:
    """The file's tensors (on the CPU; pickles load with weights_only) and any header LoraConfigs."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: '{path}'; put it in ComfyUI's models/loras folder")
    if not path.lower().endswith(LORA_SUFFIXES):
        raise ValueError(f"'{name}' is not a LoRA file: expected one of {', '.join(LORA_SUFFIXES)}")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                state = {key: f.get_tensor(key) for key in f.keys()}
                header = f.metadata() or {}
            return state, _header_configs(header)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors/pickle raise many types; the message is what matters
        raise ValueError(f"cannot read LoRA '{name}': {str(error).splitlines()[0]}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"not a LoRA for {family}: '{name}' is not a flat dict of tensors")
    return state, {}


def _header_configs(header: dict) -> dict:
    """diffusers' header {"unet.r": 4, "unet.lora_alpha": 8, …} -> {"unet": {"r": 4, …}}."""
    raw = header.get(HEADER_CONFIG_KEY)
    flat = json.loads(raw) if raw else {}
    return {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
            for part in PARTS if any(k.startswith(part + ".") for k in flat)}


def _fold_kohya_alphas(state: dict) -> dict:
    """kohya scales each layer by α/r (r = rank of lora_down); fold it into lora_up so every
    layer loads with scale 1, whatever α each layer has."""
    out = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            layer = key[: -len(".lora_up.weight")]
            down = state.get(layer + ".lora_down.weight")
            if down is not None and layer + ".alpha" in state:
                alpha = float(state[layer + ".alpha"])
                value = (value.float() * (alpha / down.shape[0])).to(value.dtype)
        out[key] = value
    return out


def _diffusers_layout(state: dict, name: str, model: Optional[VEModel]) -> dict:
    """kohya -> diffusers names with diffusers' own converter; diffusers/peft files pass through. For SDXL,
    diffusers' SDXL loader with the UNet's config, which maps kohya's sgm block names (`input_blocks_4_1_…`)
    to the UNet's; SD-1.5 kohya files name diffusers' blocks already, and are read as diffusers' SD loader does."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    family = _family(model)
    try:
        if family == "SDXL":
            state, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(state), unet_config=model.unet.config)
        else:
            state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state))
    except ValueError as error:  # kohya layers diffusers cannot rename (LoHa, LoKr, …)
        raise ValueError(
            f"not a LoRA for {family}: '{name}' has layers LoRA Apply cannot read "
            f"({str(error).split(':')[-1].strip().split(',')[0]}); only plain LoRA is supported"
        ) from error
    return state


def _split_parts(state: dict, name: str, parts_here: tuple, family: str) -> dict:
    """{"unet.….lora_A.weight": …} -> {"unet": {"….lora_A.weight": …}, "text_encoder": {…}, …}, peft names;
    a part the model does not have (`text_encoder_2` on SD-1.5) refuses the file."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    parts: dict = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")  # peft's own PeftModel state dicts
        part, _, rest = key.partition(".")
        if part not in parts_here:
            if not key.startswith(UNET_ROOTS):
                raise ValueError(
                    f"not a LoRA for {family}: '{name}' has layers for '{part}', which {family} does not have "
                    f"(a LoRA for another model family: {OTHER_FAMILIES.get(family, '…')})"
                )
            part, rest = "unet", key
        parts.setdefault(part, {})[rest] = value
    if "unet" in parts:
        parts["unet"] = convert_unet_state_dict_to_peft(parts["unet"])
    for part in ("text_encoder", "text_encoder_2"):  # old diffusers names (to_q_lora, lora_linear_layer), lora.down
        if part in parts:
            te = convert_state_dict_to_peft(parts[part], original_type=StateDictType.DIFFUSERS_OLD)
            parts[part] = convert_unet_state_dict_to_peft(te)
    if not parts:
        raise ValueError(f"not a LoRA for {family}: '{name}' has no LoRA layers (only alphas or empty)")
    for part, weights in parts.items():
        odd = [k for k in weights if not re.search(r"\.lora_[AB]\.(weight|bias)$", k)]
        if odd:
            raise ValueError(
                f"not a LoRA for {family}: '{name}' has {part} keys LoRA Apply cannot read (e.g. '{odd[0]}')"
            )
    return parts


# --- checking a file against a model -----------------------------------------------------------------

def _family(model: Optional[VEModel]) -> str:
    return model.backbone.name if model is not None else "SD-1.5"


def _parts(model: Optional[VEModel]) -> tuple:
    """The PARTS `model` has (SD-1.5: UNet and text encoder; SDXL: both text encoders too)."""
    if model is None:
        return PARTS[:2]
    return tuple(part for part in PARTS if getattr(model, part, None) is not None)


def _module(model: VEModel, part: str) -> torch.nn.Module:
    return getattr(model, part)


def _for_module(module: torch.nn.Module, weights: dict) -> dict:
    """Recent transformers flatten CLIPTextModel (no `text_model.` level); older LoRAs still name it."""
    if hasattr(module, "text_model") or not any(k.startswith("text_model.") for k in weights):
        return weights
    return {k.removeprefix("text_model."): v for k, v in weights.items()}


def _layer_pairs(weights: dict) -> dict:
    """{module path: (A, B)} for every LoRA layer (A: r×in[×k×k], B: out×r[×1×1])."""
    pairs = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            pairs[path] = (a, weights.get(path + ".lora_B.weight"))
    return pairs


def _check_fit(module: torch.nn.Module, layers: LoraLayers, part: str, family: str) -> int:
    """Every LoRA layer names a Linear/Conv2d of `module` with matching shapes; else one clear error."""
    weights = _for_module(module, layers.weights[part])
    pairs = _layer_pairs(weights)
    named = dict(module.named_modules())
    orphans = [k for k in weights if k.endswith(".lora_B.weight") and k.removesuffix(".lora_B.weight") not in pairs]
    if orphans:
        raise ValueError(f"LoRA '{layers.name}' is damaged: '{orphans[0]}' has no matching lora_A")
    missing = [path for path in pairs if path not in named]
    if missing:
        raise ValueError(
            f"LoRA '{layers.name}' does not fit this model ({family}): {len(missing)} of its {len(pairs)} {part} "
            f"layers do not exist here (e.g. '{missing[0]}'); it was made for another base model, use an {family} LoRA"
        )
    for path, (a, b) in pairs.items():
        base = getattr(named[path], "base_layer", named[path])  # already wrapped by an earlier LoRA
        if b is None or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA '{layers.name}' is damaged: layer '{path}' lacks lora_B or its rank disagrees")
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            raise ValueError(f"LoRA '{layers.name}' changes '{path}', a {type(base).__name__}; only Linear/Conv2d")
        w = base.weight
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[2:] != w.shape[2:]:
            raise ValueError(
                f"LoRA '{layers.name}' does not fit this model ({family}): {part} layer '{path}' has "
                f"out={w.shape[0]}, in={w.shape[1]} but the LoRA has out={b.shape[0]}, in={a.shape[1]}; it was made "
                f"for another base model ({OTHER_FAMILIES.get(family, '…')}), use an {family} LoRA"
            )
    return len(pairs)


# --- loading into the modules -----------------------------------------------------------------------

def _peft_config(weights: dict) -> dict:
    """LoraConfig kwargs naming every layer with its own rank and α = rank, so each layer's scale
    is exactly 1 (kohya's α/r is already folded into B)."""
    ranks = {path: a.shape[0] for path, (a, _) in _layer_pairs(weights).items()}
    exact = {"^" + re.escape(path): r for path, r in ranks.items()}  # peft matches these as regexes
    first = next(iter(ranks.values()))
    return {
        "r": first, "lora_alpha": first, "rank_pattern": exact, "alpha_pattern": dict(exact),
        "target_modules": sorted(ranks), "lora_bias": any(k.endswith("lora_B.bias") for k in weights),
    }


def _has_adapter(module: torch.nn.Module, adapter_name: str) -> bool:
    return adapter_name in (getattr(module, "peft_config", None) or {})


def _ensure_loaded(model: VEModel, spec: LoraSpec) -> None:
    """Load `spec`'s file into the modules it changes, once per module (diffusers' loaders)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    todo = [part for part in spec.parts if not _has_adapter(_module(model, part), spec.adapter_name)]
    if not todo:
        return
    layers = read_lora(spec.path, model)
    missing = [part for part in todo if part not in layers.weights]
    if missing:  # the file was replaced since add_lora read it
        raise ValueError(f"LoRA '{layers.name}' no longer has {missing[0]} layers: it changed since LoRA Apply read it")
    for part in todo:  # check everything before changing anything
        _check_fit(_module(model, part), layers, part, _family(model))
    for part in todo:
        module = _module(model, part)
        weights = _for_module(module, layers.weights[part])
        config = layers.configs.get(part) or _peft_config(weights)
        prefixed = {f"{part}.{k}": v for k, v in weights.items()}
        header = {f"{part}.{k}": v for k, v in config.items()}  # the loaders read it per prefix
        if part == "unet":
            Loader.load_lora_into_unet(prefixed, None, module, adapter_name=spec.adapter_name, metadata=header)
        else:
            Loader.load_lora_into_text_encoder(prefixed, None, module, prefix=part, adapter_name=spec.adapter_name,
                                               metadata=header)


# --- activating adapters --------------------------------------------------------------------------------

def _tuner_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _activate(module: torch.nn.Module, weights: dict) -> None:
    """Exactly `weights` (adapter -> strength) active; layers holding none of them are disabled,
    so peft runs their base layer alone (bit-exact)."""
    for layer in _tuner_layers(module):
        names = [name for name in weights if name in layer.scaling]
        layer.enable_adapters(bool(names))
        if names:
            layer.set_adapter(names, inference_mode=True)  # inference: adapter weights stay frozen
            for name in names:
                layer.set_scale(name, weights[name])


def _remove_adapters(module: torch.nn.Module) -> None:
    """Every peft wrapper replaced by the layer it wraps, and the module's peft bookkeeping gone."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    if _tuner_layers(module):
        recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if getattr(module, "_hf_peft_config_loaded", False):
        module._hf_peft_config_loaded = False


def _snapshot(module: torch.nn.Module) -> dict:
    return {layer: (layer.disable_adapters, list(layer.active_adapters), dict(layer.scaling))
            for layer in _tuner_layers(module)}


def _restore(module: torch.nn.Module, saved: dict) -> None:
    """Put every layer back as it was; layers created since (new adapters) end disabled."""
    for layer in _tuner_layers(module):
        if layer not in saved:
            layer.enable_adapters(False)
            continue
        disabled, active, scaling = saved[layer]
        layer.enable_adapters(not disabled)
        layer.set_adapter(active, inference_mode=True)
        layer.scaling.update(scaling)
