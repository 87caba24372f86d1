"""Test helper: a diffusers Flux model written as the four single files ComfyUI users keep.

- the transformer in Black Forest Labs' layout (`flux1-dev.safetensors`): the inverse of diffusers'
  `convert_flux_transformer_checkpoint_to_diffusers`: q/k/v fused (`img_attn.qkv`, `txt_attn.qkv`; in the single
  blocks q/k/v and the MLP input fused in `linear1`), `img_mod.lin` / `txt_mod.lin` / `modulation.lin`, RMS norms
  as `*.norm.query_norm.scale`, the final AdaLN with BFL's (shift, scale) order where diffusers has (scale, shift);
- the VAE in the LDM layout without prefix (`ae.safetensors`);
- CLIP-L under transformers' `text_model.*` names (`clip_l.safetensors`, with the text projection and
  position ids a real file also carries, which CLIPTextModel does not use);
- the T5 encoder under transformers' T5 names with the embedding once, as `shared.weight`
  (`t5xxl_fp16.safetensors`).

Every diffusers key is mapped or the helper raises, so a layout change in diffusers shows up here.
"""

from __future__ import annotations

import json
import os
import re

import torch

from ldm_layout import VAE_PREFIX, vae_to_ldm

_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def transformer_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers `FluxTransformer2DModel` state dict -> BFL's layout (optionally under `prefix`, e.g.
    `model.diffusion_model.` as ComfyUI saves it)."""
    left = dict(state)
    out = {}

    def take(key):
        return left.pop(key)

    for new, old in _TOP.items():
        for leaf in ("weight", "bias"):
            if f"{new}.{leaf}" in left:
                out[f"{old}.{leaf}"] = take(f"{new}.{leaf}")
    for leaf in ("weight", "bias"):  # diffusers (scale, shift) -> BFL (shift, scale)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap_halves(take(f"norm_out.linear.{leaf}"))
    doubles = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    singles = sorted({int(m.group(1)) for k in state if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    for i in doubles:
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            for new, old in _DOUBLE.items():
                out[f"{dst}{old}.{leaf}"] = take(f"{src}{new}.{leaf}")
            for old, parts in _FUSED.items():
                out[f"{dst}{old}.{leaf}"] = torch.cat([take(f"{src}{p}.{leaf}") for p in parts])
        for new, old in _DOUBLE_NORMS.items():
            out[f"{dst}{old}.scale"] = take(f"{src}{new}.weight")
    for i in singles:
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            for new, old in _SINGLE.items():
                out[f"{dst}{old}.{leaf}"] = take(f"{src}{new}.{leaf}")
            out[f"{dst}linear1.{leaf}"] = torch.cat([take(f"{src}{p}.{leaf}") for p in _SINGLE_FUSED])
        for new, old in _SINGLE_NORMS.items():
            out[f"{dst}{old}.scale"] = take(f"{src}{new}.weight")
    if left:
        raise KeyError(f"unmapped Flux transformer keys: {sorted(left)[:5]}")
    return {prefix + k: v.contiguous() for k, v in out.items()}


def vae_to_ae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` -> BFL's ae.safetensors: the LDM layout without `first_stage_model.`."""
    return {k[len(VAE_PREFIX):]: v.contiguous() for k, v in vae_to_ldm(state).items()}


def clip_to_comfy(text_encoder) -> dict[str, torch.Tensor]:
    """transformers `CLIPTextModel` -> clip_l.safetensors: `text_model.*`, plus the projection and position ids."""
    out = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_encoder.state_dict().items()}
    width, positions = text_encoder.config.hidden_size, text_encoder.config.max_position_embeddings
    out["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    out["text_projection.weight"] = torch.eye(width)
    return {k: v.contiguous() for k, v in out.items()}


def t5_to_comfy(text_encoder) -> dict[str, torch.Tensor]:
    """transformers `T5EncoderModel` -> t5xxl_fp16.safetensors: T5 names, the embedding once as `shared.weight`."""
    return {k: v.contiguous() for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}


SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                     "base_image_seq_len": 256, "max_image_seq_len": 4096}


def write_configs(root: str, components: dict) -> str:
    """Config folders for `components`' sizes laid out like the shipped ones (flux-dev/, flux-schnell/,
    flux-vae/, t5xxl/), plus clip-l/ (the shipped configs use SD-1.5's CLIP-L config); returns `root`."""
    transformer = components["unet"].transformer
    for variant, guidance, scheduler in (("dev", True, components["scheduler_config"]),
                                         ("schnell", False, SCHNELL_SCHEDULER)):
        folder = os.path.join(root, f"flux-{variant}")
        config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
        config.update(_class_name="FluxTransformer2DModel", guidance_embeds=guidance)
        os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
        os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
        with open(os.path.join(folder, "transformer", "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
            json.dump(scheduler, f)
    components["vae"].save_config(os.path.join(root, "flux-vae"))
    components["text_encoder_2"].config.save_pretrained(os.path.join(root, "t5xxl"))
    components["text_encoder"].config.save_pretrained(os.path.join(root, "clip-l"))
    return root
