"""Flux's transformer behind the UNet call the sampler makes.

The sampler, the attention rules and the loop speak in latents (frames, channels, h, w) and in one call
`net(x, t, encoder_hidden_states=..., cross_attention_kwargs={"layout": ...}, added_cond_kwargs=...)`. Flux's
`FluxTransformer2DModel` reads 2x2 patches of the latent as tokens ("packed"), position ids for the image and text
tokens, the timestep divided by 1000, the CLIP pooled embedding and, on guidance-distilled models (Flux-dev), the
guidance scale. `FluxNetwork` packs, calls and unpacks exactly as diffusers' `FluxPipeline` does, so everything
around it runs unchanged; its prediction is a velocity (flow matching), which the flow-matching scheduler steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

PATCH = 2  # Flux packs 2x2 latent pixels into one token


@dataclass
class FluxOutput:
    sample: Tensor


def pack(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): diffusers' `FluxPipeline._pack_latents`."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): diffusers' `FluxPipeline._unpack_latents`."""
    b, _, channels = x.shape
    x = x.view(b, h // PATCH, w // PATCH, channels // 4, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column), as `_prepare_latent_image_ids`."""
    ids = torch.zeros(h // PATCH, w // PATCH, 3)
    ids[..., 1] += torch.arange(h // PATCH)[:, None]
    ids[..., 2] += torch.arange(w // PATCH)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxNetwork(torch.nn.Module):
    """A `FluxTransformer2DModel` called like a diffusers UNet (see the module docstring)."""

    family = "flux"

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def attn_processors(self) -> dict:
        return self.transformer.attn_processors

    def set_attn_processor(self, processors) -> None:
        self.transformer.set_attn_processor(processors)

    def forward(self, x: Tensor, timestep, encoder_hidden_states: Tensor, cross_attention_kwargs: Optional[dict] = None,
                added_cond_kwargs: Optional[dict] = None, **unused) -> FluxOutput:
        if unused:
            raise TypeError(f"Flux takes no {', '.join(sorted(unused))} (ControlNet residuals are UNet-only)")
        b, _, h, w = x.shape
        added = added_cond_kwargs or {}
        text = encoder_hidden_states.shape[1]
        t = torch.as_tensor(timestep, device=x.device).expand(b).to(x.dtype)
        kwargs = dict(cross_attention_kwargs or {})
        if "layout" in kwargs:
            kwargs["text_tokens"] = text  # the single-stream blocks get text and image joined; the rule needs the split
        out = self.transformer(
            hidden_states=pack(x), timestep=t / 1000, guidance=added.get("guidance"),
            pooled_projections=added["pooled"], encoder_hidden_states=encoder_hidden_states,
            txt_ids=torch.zeros(text, 3, device=x.device, dtype=encoder_hidden_states.dtype),
            img_ids=image_ids(h, w, x.device, x.dtype), joint_attention_kwargs=kwargs or None, return_dict=False,
        )[0]
        return FluxOutput(unpack(out, h, w))
