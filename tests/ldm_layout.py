"""Test helper: write diffusers UNet / VAE / CLIP-text weights in the original CompVis/LDM single-file layout.

An SD-1.x `.ckpt`/`.safetensors` file holds the whole LatentDiffusion module in one state dict:

- `model.diffusion_model.*`: the UNet as `input_blocks` / `middle_block` / `output_blocks`. Every block is a
  list `[ResBlock, SpatialTransformer?, Down/Upsample?]`; `input_blocks.0` is `conv_in`; each down level holds
  `layers_per_block` blocks plus one more for its downsampler; each up level holds `layers_per_block + 1`, and
  the last of them also carries the upsampler.
- `first_stage_model.*`: the VAE with LDM names (`down.i.block.j`, `mid.block_1`, `mid.attn_1`, `up.i`); the
  decoder's `up` list runs from the lowest resolution upwards in reverse order, and the mid-block attention
  uses 1x1 convolutions (`q/k/v/proj_out` weights of shape `(C, C, 1, 1)`) where diffusers has linears.
- `cond_stage_model.transformer.*`: the transformers CLIP text model, always under `text_model.`.

The mapping is inferred from the state dict itself (levels, layers per block, which levels have attention),
so it serves any SD-like configuration.
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# ResBlock sublayers: LDM Sequential indices vs diffusers attribute names.
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_TOP_LEVEL = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}

_UNET_LEVEL_KEY = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_UNET_MID_KEY = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_VAE_LEVEL_KEY = re.compile(
    r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_VAE_MID_KEY = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _rename_head(rest: str, names: dict[str, str]) -> str:
    """Rename the leading module path of `rest` (e.g. `conv1.weight`) using `names`."""
    for new, old in names.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _count(state: dict, pattern: str) -> int:
    """Number of distinct indices captured by `pattern` (one group) among the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `UNet2DConditionModel` state dict -> LDM `model.diffusion_model.*` keys."""
    layers = _count(state, r"^down_blocks\.0\.resnets\.(\d+)\.")
    per_level = layers + 1  # LDM blocks per level: the resnets (+attention) and the resampler slot
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"^up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state.items():
        head = key.rsplit(".", 1)[0]
        if head in _UNET_TOP_LEVEL:
            out[UNET_PREFIX + _UNET_TOP_LEVEL[head] + key[len(head):]] = value
            continue
        if m := _UNET_MID_KEY.match(key):
            kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            slot = 1 if kind == "attentions" else 2 * idx  # [resnet, attention, resnet]
            rest = _rename_head(rest, _UNET_RESNET_NAMES) if kind == "resnets" else rest
            out[f"{UNET_PREFIX}middle_block.{slot}.{rest}"] = value
            continue
        m = _UNET_LEVEL_KEY.match(key)
        if m is None:
            raise KeyError(f"unexpected UNet key {key!r}")
        side, level, kind, idx, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down_blocks":
            block = 1 + level * per_level + (layers if kind == "downsamplers" else idx)
            sub = {"resnets": "0", "attentions": "1", "downsamplers": "0"}[kind]
            if kind == "downsamplers":
                rest = rest.replace("conv.", "op.", 1)
            name = f"input_blocks.{block}.{sub}"
        else:
            block = level * per_level + (layers if kind == "upsamplers" else idx)
            upsample_slot = "2" if level in up_has_attention else "1"
            sub = {"resnets": "0", "attentions": "1", "upsamplers": upsample_slot}[kind]
            name = f"output_blocks.{block}.{sub}"
        if kind == "resnets":
            rest = _rename_head(rest, _UNET_RESNET_NAMES)
        out[f"{UNET_PREFIX}{name}.{rest}"] = value
    return out


def _vae_attention_to_ldm(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """VAE mid attention: linear q/k/v/out become 1x1 convolutions in LDM."""
    rest = _rename_head(rest, _VAE_ATTENTION_NAMES)
    if value.ndim == 2:
        value = value[:, :, None, None]
    return rest, value


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` state dict -> LDM `first_stage_model.*` keys."""
    up_levels = _count(state, r"^decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in state.items():
        head = key.rsplit(".", 1)[0]
        if head in _VAE_TOP_LEVEL:
            out[VAE_PREFIX + _VAE_TOP_LEVEL[head] + key[len(head):]] = value
            continue
        if m := _VAE_MID_KEY.match(key):
            part, kind, idx, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if kind == "attentions":
                rest, value = _vae_attention_to_ldm(rest, value)
                out[f"{VAE_PREFIX}{part}.mid.attn_{idx + 1}.{rest}"] = value
            else:
                rest = _rename_head(rest, {"conv_shortcut": "nin_shortcut"})
                out[f"{VAE_PREFIX}{part}.mid.block_{idx + 1}.{rest}"] = value
            continue
        if m := _VAE_LEVEL_KEY.match(key):
            part, side, level, kind, idx, rest = m.groups()
            level = int(level)
            if side == "up_blocks":
                level = up_levels - 1 - level  # LDM lists decoder levels from the lowest resolution
            if kind == "resnets":
                rest = _rename_head(rest, {"conv_shortcut": "nin_shortcut"})
                name = f"{'down' if side == 'down_blocks' else 'up'}.{level}.block.{idx}"
            else:
                name = f"down.{level}.downsample" if kind == "downsamplers" else f"up.{level}.upsample"
            out[f"{VAE_PREFIX}{part}.{name}.{rest}"] = value
            continue
        out[VAE_PREFIX + key] = value  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], max_positions: int | None = None) -> dict[str, torch.Tensor]:
    """transformers `CLIPTextModel` state dict -> `cond_stage_model.transformer.text_model.*` keys.

    With `max_positions`, also writes the `embeddings.position_ids` buffer that real SD-1.x files carry.
    """
    out = {}
    for key, value in state.items():
        inner = key if key.startswith("text_model.") else "text_model." + key
        out[CLIP_PREFIX + inner] = value
    if max_positions is not None:
        out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(max_positions)[None]
    return out


def sd_schedule_buffers(num_train_timesteps: int = 1000) -> dict[str, torch.Tensor]:
    """The LatentDiffusion schedule buffers real files also carry (loaders must ignore them)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}


def to_ldm_checkpoint(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One original-layout state dict from diffusers/transformers modules, like an SD-1.x single file."""
    state = {}
    state.update(unet_to_ldm(unet.state_dict()))
    state.update(vae_to_ldm(vae.state_dict()))
    state.update(clip_to_ldm(text_encoder.state_dict(), text_encoder.config.max_position_embeddings))
    state.update(sd_schedule_buffers())
    return {k: v.contiguous() for k, v in state.items()}


def controlnet_to_ldm(cn, prefix: str = "") -> dict:
    """A diffusers ControlNet's weights under the original ControlNet key names (input_blocks, zero_convs,
    input_hint_block, middle_block_out; for SDXL the added text/time embedding as label_emb.0.{0,2}), as the
    original single files store them; `prefix` e.g. "control_model."."""
    state = {k: v.clone() for k, v in cn.state_dict().items()}
    out = {}
    blocks = len(cn.controlnet_cond_embedding.blocks)
    for key in [k for k in state if k.startswith(("controlnet_", "add_embedding."))]:
        head, param = key.rsplit(".", 1)
        if head == "controlnet_cond_embedding.conv_in":
            name = "input_hint_block.0"
        elif head == "controlnet_cond_embedding.conv_out":
            name = f"input_hint_block.{2 * (blocks + 1)}"
        elif head.startswith("controlnet_cond_embedding.blocks."):
            name = f"input_hint_block.{2 * (int(head.rsplit('.', 1)[1]) + 1)}"
        elif head.startswith("controlnet_down_blocks."):
            name = f"zero_convs.{head.rsplit('.', 1)[1]}.0"
        elif head.startswith("add_embedding.linear_"):
            name = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}[head]
        else:
            assert head == "controlnet_mid_block", head
            name = "middle_block_out.0"
        out[f"{name}.{param}"] = state.pop(key)
    out.update({k[len(UNET_PREFIX):]: v.contiguous() for k, v in unet_to_ldm(state).items()})
    return {prefix + k: v for k, v in out.items()}
