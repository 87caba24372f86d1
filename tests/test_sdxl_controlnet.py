"""ControlNet Condition on SDXL: a ControlStack on builtin:tiny-sdxl against diffusers'
StableDiffusionXLControlNetPipeline, the SDXL ControlNet reading the added conditioning (pooled text, size ids),
the node's builtin:tiny ControlNet matching its model, and a ControlNet of the other family refused in one line."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLControlNetPipeline

from comfyui_video_edit.nodes.controlnet_condition import load_named_controlnet
from comfyui_video_edit.pipelines_core.attention import FrameLayout
from comfyui_video_edit.pipelines_core.models.backbone import SDXL, blank_unet_kwargs
from comfyui_video_edit.pipelines_core.models.controlnet import ControlStack, ControlUnit
from comfyui_video_edit.pipelines_core.models.model import decode_latents, encode_text, load_model
from comfyui_video_edit.pipelines_core.models.tiny import tiny_controlnet, tiny_sdxl_controlnet
from comfyui_video_edit.pipelines_core.sampling.hooks import StepState
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.sampling.schedulers import make_scheduler

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
SIZE = (64, 48)  # (height, width)


@pytest.fixture(scope="module")
def sdxl():
    return load_model("builtin:tiny-sdxl", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def cn(sdxl):
    return tiny_sdxl_controlnet(sdxl.unet)


@pytest.fixture(scope="module")
def hints():
    return torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(4))


# --- equivalence with diffusers' SDXL ControlNet pipeline ----------------------------------------------

@pytest.mark.parametrize("scheduler, guess_mode", [("euler", False), ("euler", True), ("ddim", False)])
def test_each_frame_equals_diffusers_sdxl_controlnet_pipeline(sdxl, cn, hints, scheduler, guess_mode):
    """No temporal feature on: frame f is StableDiffusionXLControlNetPipeline (txt2img) on hint f with seed + f,
    step window, strength and guess mode included (guess mode: the ControlNet sees the conditional rows' added
    conditioning only, as diffusers' SDXL pipeline hands it)."""
    s = SamplerSettings(PROMPT, NEGATIVE, seed=3, steps=4, cfg=6.0, scheduler=scheduler, attention="none")
    unit = ControlUnit(cn, hints, strength=0.8, start=0.1, end=0.8, guess_mode=guess_mode)
    ours = decode_latents(sdxl, edit_video(sdxl, s, frame_count=2, size=SIZE, control=ControlStack().add(unit)))
    plain = decode_latents(sdxl, edit_video(sdxl, s, frame_count=2, size=SIZE))
    assert (ours - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the ControlNet steers every frame
    pipe = StableDiffusionXLControlNetPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2, tokenizer=sdxl.tokenizer,
        tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet, controlnet=cn,
        scheduler=make_scheduler(scheduler, sdxl.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    for f in range(2):
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=hints[f:f + 1], height=SIZE[0], width=SIZE[1],
                   num_inference_steps=4, guidance_scale=6.0, generator=torch.Generator().manual_seed(3 + f),
                   controlnet_conditioning_scale=0.8, control_guidance_start=0.1, control_guidance_end=0.8,
                   guess_mode=guess_mode, output_type="pt").images
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


# --- the SDXL ControlNet reads the added conditioning ------------------------------------------------------

def call_inputs(sdxl, hints):
    """One CFG UNet call's inputs on 2 frames: latents, hidden states and SDXL's added-conditioning kwargs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, SIZE[0] // 8, SIZE[1] // 8, generator=g)
    cond, uncond = encode_text(sdxl, PROMPT), encode_text(sdxl, NEGATIVE)
    context = torch.cat([uncond.hidden.expand(2, -1, -1), cond.hidden.expand(2, -1, -1)])
    added = SDXL.added_conditioning(sdxl, {"cond": cond.pooled, "uncond": uncond.pooled}, SIZE)
    return x, context, added.unet_kwargs(("uncond", "cond"), 2, x)


def test_the_stack_hands_the_sdxl_controlnet_the_unet_calls_added_conditioning(sdxl, cn, hints):
    x, context, added = call_inputs(sdxl, hints)
    layout, t = FrameLayout(2, (0, 1), ("uncond", "cond")), torch.tensor(601)
    stack = ControlStack().add(ControlUnit(cn, hints, strength=0.7, cross_frame_attention=False))
    ours = stack.unet_kwargs(x, context, layout, StepState(0, t, 4, x), added)
    with torch.no_grad():
        down, mid = cn(x, t, encoder_hidden_states=context, controlnet_cond=hints.repeat(2, 1, 1, 1),
                       conditioning_scale=0.7, added_cond_kwargs=added["added_cond_kwargs"], return_dict=False)
        blank_down, blank_mid = cn(x, t, encoder_hidden_states=context, controlnet_cond=hints.repeat(2, 1, 1, 1),
                                   conditioning_scale=0.7, return_dict=False, **blank_unet_kwargs(cn.config, 4))
    assert (ours["mid_block_additional_residual"] - mid).abs().max() <= 1e-6
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(ours["down_block_additional_residuals"], down))
    assert (mid - blank_mid).abs().max() > 1e-3  # other pooled text / size ids give other residuals
    with pytest.raises((TypeError, ValueError)):  # and an SDXL ControlNet cannot run without them (diffusers'
        stack.unet_kwargs(x, context, layout, StepState(0, t, 4, x))  # `"text_embeds" not in added_cond_kwargs`)


def test_the_size_ids_reach_the_controlnet(sdxl, cn, hints):
    """Only the time ids differ (another size): the residuals differ, so the ControlNet reads them."""
    x, context, added = call_inputs(sdxl, hints)
    other = {"added_cond_kwargs": {**added["added_cond_kwargs"],
                                   "time_ids": added["added_cond_kwargs"]["time_ids"] * 2}}
    layout, t = FrameLayout(2, (0, 1), ("uncond", "cond")), torch.tensor(601)
    stack = ControlStack().add(ControlUnit(cn, hints, cross_frame_attention=False))
    a = stack.unet_kwargs(x, context, layout, StepState(0, t, 4, x), added)["mid_block_additional_residual"]
    b = stack.unet_kwargs(x, context, layout, StepState(0, t, 4, x), other)["mid_block_additional_residual"]
    assert (a - b).abs().max() > 1e-4


# --- the node's builtin ControlNet and the other family's ---------------------------------------------------

def test_builtin_tiny_controlnet_matches_its_model(sdxl):
    xl = load_named_controlnet("builtin:tiny", sdxl)
    assert xl.config.addition_embed_type == "text_time"
    assert xl.config.cross_attention_dim == sdxl.unet.config.cross_attention_dim
    sd = load_model("builtin:tiny", dtype="fp32", device="cpu")
    plain = load_named_controlnet("builtin:tiny", sd)
    assert plain.config.addition_embed_type is None
    assert plain.config.cross_attention_dim == sd.unet.config.cross_attention_dim
    ip2p = load_model("builtin:tiny-ip2p", dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="only fits the builtin:tiny and builtin:tiny-sdxl models") as info:
        load_named_controlnet("builtin:tiny", ip2p)
    assert "\n" not in str(info.value)


def test_tiny_sdxl_controlnet_refuses_an_sd15_unet():
    sd = load_model("builtin:tiny", dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="needs an SDXL UNet"):
        tiny_sdxl_controlnet(sd.unet)


def test_a_controlnet_of_the_other_family_is_refused_in_one_line(sdxl, cn, hints):
    """An SD-1.5 ControlNet on SDXL (text width 32 vs 80) and an SDXL one on SD-1.5: one clear line, at the first
    UNet call, naming the ControlNet."""
    sd = load_model("builtin:tiny", dtype="fp32", device="cpu")
    s = SamplerSettings(PROMPT, NEGATIVE, seed=3, steps=2, attention="none")
    cases = ((sdxl, tiny_controlnet(sd.unet), sd.unet.config.cross_attention_dim, sdxl.unet.config.cross_attention_dim),
             (sd, cn, sdxl.unet.config.cross_attention_dim, sd.unet.config.cross_attention_dim))
    for model, controlnet, expects, gives in cases:
        stack = ControlStack().add(ControlUnit(controlnet, hints[:, :, :32, :32], name="other_family"))
        with pytest.raises(ValueError) as info:
            edit_video(model, s, frame_count=2, size=(32, 32), control=stack)
        message = str(info.value)
        assert "\n" not in message and "'other_family'" in message, message
        assert f"expects text features of width {expects} but the model gives {gives}" in message, message


def test_cross_frame_attention_reaches_inside_the_sdxl_controlnet(sdxl, cn, hints):
    """Text2Video-Zero's link inside the ControlNet works on SDXL too: with first-frame attention, letting the rule
    act in the ControlNet changes the later frames and leaves frame 0 (which attends to itself) as it was."""
    s = SamplerSettings(PROMPT, NEGATIVE, seed=3, steps=2, cfg=6.0, attention="first")
    small = hints[:, :, :32, :32]
    out = {linked: edit_video(sdxl, s, frame_count=2, size=(32, 32), control=ControlStack().add(
        ControlUnit(cn, small, cross_frame_attention=linked))) for linked in (False, True)}
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert (out[True][1] - out[False][1]).abs().max() > 1e-4
