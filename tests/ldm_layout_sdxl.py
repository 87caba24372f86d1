"""Test helper: write diffusers/transformers SDXL components in SDXL's original single-file layout.

An SDXL base `.safetensors` (Stability's "SGM" layout, also what ComfyUI's checkpoint save writes for SDXL) holds:

- `model.diffusion_model.*`: the UNet in LDM names (as SD-1.x, see ldm_layout.py), plus `label_emb.0.0` and
  `label_emb.0.2`: the two linears of the added text/time embedding (diffusers' `add_embedding.linear_1/2`);
- `first_stage_model.*`: the VAE in LDM names (as SD-1.x);
- `conditioner.embedders.0.transformer.text_model.*`: CLIP ViT-L's text tower in transformers' names;
- `conditioner.embedders.1.model.*`: OpenCLIP bigG's text tower in OpenCLIP's names: `token_embedding.weight`,
  `positional_embedding` (a bare tensor), `transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v stacked
  on the output axis), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection` stored as
  (width, projection), i.e. the transpose of transformers' linear weight, and CLIP's `logit_scale`.
"""

from __future__ import annotations

import re

import torch

from ldm_layout import UNET_PREFIX, sd_schedule_buffers, unet_to_ldm, vae_to_ldm

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

_ADDED_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_OPEN_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def sdxl_unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SDXL `UNet2DConditionModel` state dict -> `model.diffusion_model.*` keys (with `label_emb`)."""
    rest, out = {}, {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head in _ADDED_EMBEDDING:
            out[f"{UNET_PREFIX}{_ADDED_EMBEDDING[head]}.{leaf}"] = value
        else:
            rest[key] = value
    return {**unet_to_ldm(rest), **out}


def clip_l_to_sgm(state: dict[str, torch.Tensor], max_positions: int) -> dict[str, torch.Tensor]:
    """transformers `CLIPTextModel` -> `conditioner.embedders.0.transformer.text_model.*` (+ position_ids)."""
    out = {}
    for key, value in state.items():
        inner = key if key.startswith("text_model.") else "text_model." + key  # flattened in newer transformers
        out[CLIP_L_PREFIX + inner] = value
    out[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(max_positions)[None]
    return out


def open_clip_to_sgm(state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """transformers `CLIPTextModelWithProjection` -> OpenCLIP's text tower names under `prefix`."""
    out = {prefix + "logit_scale": torch.tensor(4.6052)}  # log(100): CLIP's, unused by the text tower
    stacked: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
        elif key in _OPEN_CLIP_TOP_LEVEL:
            out[prefix + _OPEN_CLIP_TOP_LEVEL[key]] = value
        elif m := _OPEN_CLIP_LAYER.match(key):
            layer, rest = m.groups()
            block = f"{prefix}transformer.resblocks.{layer}."
            if q := re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                stacked.setdefault((block, q.group(2)), {})[q.group(1)] = value
                continue
            for new, old in _OPEN_CLIP_LAYER_NAMES.items():
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            else:
                raise KeyError(f"unexpected CLIP layer key {key!r}")
            out[block + rest] = value
        else:
            raise KeyError(f"unexpected CLIP key {key!r}")
    for (block, kind), parts in stacked.items():
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_sgm_checkpoint(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """One SDXL-layout state dict from diffusers/transformers modules, like an SDXL base single file."""
    state = {}
    state.update(sdxl_unet_to_ldm(unet.state_dict()))
    state.update(vae_to_ldm(vae.state_dict()))
    state.update(clip_l_to_sgm(text_encoder.state_dict(), text_encoder.config.max_position_embeddings))
    state.update(open_clip_to_sgm(text_encoder_2.state_dict()))
    state.update(sd_schedule_buffers())
    return {k: v.contiguous() for k, v in state.items()}
