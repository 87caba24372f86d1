"""Plug-and-Play (Tumanyan et al., CVPR'23) as an injection: structure copied from a live source branch.

The UNet batch is [source, uncond, cond] (cfg 1: [source, cond]); the source chunk denoises the DDIM
inversion's latent at the current timestep under the source prompt. While a step is inside its
window, the source chunk's
  * residual feature of SD's `up_blocks[1].resnets[1]` (the conv2 output, before the skip add) and
  * self-attention queries and keys (not values) of decoder layers 4-11
replace the uncond and cond chunks' own, so the edit keeps the source's layout and the target
prompt only chooses the appearance (values and cross-attention stay the edit's).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from einops import rearrange, repeat

from ..attention.layers import pnp_attention_layers, pnp_feature_module
from ..attention.processor import AttnCall, AttnEdit, FrameLayout
from ..sampling.injection import Injection, InjectionPlan, PlanContext
from ..sampling.windows import RunWindow, first


@dataclass(frozen=True)
class PnPParams:
    """Injection windows as fractions of the run's steps (a step i is inside while i < fraction * steps)."""

    pnp_f_t: float = 0.8  # residual features: PnP injects 40 of 50 steps; TokenFlow's config_pnp.yaml pnp_f_t 0.8
    pnp_attn_t: float = 0.5  # self-attention Q/K: PnP 25 of 50 steps; TokenFlow's pnp_attn_t 0.5

    def check(self) -> None:
        for name in ("pnp_f_t", "pnp_attn_t"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction of the steps in [0, 1] (got {value})")


def injects(layout: Optional[FrameLayout], window: RunWindow) -> bool:
    """Whether a UNet call with this layout carries a source chunk and sits inside the window."""
    return layout is not None and "source" in layout.roles and layout.step in window


def from_source(x: torch.Tensor, layout: FrameLayout) -> torch.Tensor:
    """Every chunk of a (chunk frame)-major batch replaced by the source chunk (PnP's copy into uncond and cond)."""
    chunks = rearrange(x, "(c f) ... -> c f ...", f=layout.frames)
    if chunks.shape[0] != len(layout.roles):
        raise RuntimeError(f"batch {x.shape[0]} does not match the layout {layout.roles} x {layout.frames} frames")
    source = chunks[layout.roles.index("source")]
    return repeat(source, "f ... -> (c f) ...", c=len(layout.roles))


class SourceQK(AttnEdit):
    """Self-attention queries and keys taken from the source chunk inside the window (values stay the edit's)."""

    def __init__(self, window: RunWindow):
        self.window = window

    def qkv(self, call: AttnCall, q, k, v):
        if call.is_self and injects(call.layout, self.window):
            return from_source(q, call.layout), from_source(k, call.layout), v
        return q, k, v


@contextmanager
def source_features(unet, resnet_name: str, window: RunWindow) -> Iterator[None]:
    """Replace the residual branch of resnet `resnet_name` by the source chunk's inside the window.

    diffusers' ResnetBlock2D returns (shortcut(x) + conv2(...)) / scale, so a hook on the resnet itself
    would see the sum; the hook sits on its `conv2`, whose output is exactly the feature PnP copies.
    The call's layout comes from the UNet's `cross_attention_kwargs` (a pre-hook on the UNet).
    Both hooks are removed on exit, also when sampling raises.
    """
    conv2 = unet.get_submodule(resnet_name).conv2
    current: dict = {}

    def remember_layout(module, args, kwargs):
        current["layout"] = (kwargs.get("cross_attention_kwargs") or {}).get("layout")

    def inject(module, args, output):
        layout = current.get("layout")
        return from_source(output, layout) if injects(layout, window) else output

    handles = [unet.register_forward_pre_hook(remember_layout, with_kwargs=True), conv2.register_forward_hook(inject)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pnp_plan_for(params: PnPParams, context: PlanContext) -> InjectionPlan:
    """The PnP plan: Q/K edits on the decoder 4-11 layers, the feature patch, a live source branch."""
    layers = frozenset(pnp_attention_layers(context.model.unet.attn_processors))
    qk = SourceQK(first(params.pnp_attn_t, "pnp_attn_t").of(context.steps))
    features = first(params.pnp_f_t, "pnp_f_t").of(context.steps)
    return InjectionPlan(
        edits_for=lambda name: (qk,) if name in layers else (),
        patches=lambda unet: source_features(unet, pnp_feature_module(unet), features),
        source_branch=True,
    )


def pnp_planner(injection: Injection, context: PlanContext) -> InjectionPlan:
    return pnp_plan_for(injection.params, context)


def check_inversion(inversion, method: str) -> None:
    if inversion is None or not getattr(inversion, "latents", None):
        raise ValueError(f"{method} reads a DDIM inversion: connect DDIM Invert to the Attention Injector")


def pnp_injection(inversion, params: PnPParams = PnPParams()) -> Injection:
    """VE_INJECTION for Plug-and-Play on `inversion` (sample with DDIM Invert's steps, strength 1.0)."""
    check_inversion(inversion, "Plug-and-Play")
    params.check()
    return Injection("pnp", inversion, params, pnp_planner)
