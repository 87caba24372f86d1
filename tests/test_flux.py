"""Flux through the backbone seam: the sampler against diffusers' FluxPipeline / FluxImg2ImgPipeline on
builtin:tiny-flux (MMDiT on 2x2-packed 16-channel latents, flow matching, T5 + CLIP, embedded guidance), and
cross-frame attention on the image tokens of its joint attention."""

import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline

from comfyui_video_edit.pipelines_core.models.backbone import FLUX
from comfyui_video_edit.pipelines_core.models.model import decode_latents, load_model
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.schedulers import make_scheduler
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def flux():
    return load_model("builtin:tiny-flux", dtype="fp32", device="cpu")


def pipeline(cls, model):
    pipe = cls(scheduler=make_scheduler("flow_euler", model.scheduler_config), vae=model.vae,
               text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
               tokenizer_2=model.tokenizer_2, transformer=model.unet.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_flux_is_recognised_as_flux(flux):
    assert flux.backbone is FLUX and "Flux" in flux.kind and flux.latent_channels == 16 and flux.vae_shift != 0


def test_generation_with_attention_none_equals_diffusers_flux_pipeline(flux):
    s = SamplerSettings(PROMPT, seed=3, steps=4, cfg=3.5, scheduler="flow_euler", attention="none")
    ours = decode_latents(flux, edit_video(flux, s, frame_count=2, size=(64, 48)))
    pipe = pipeline(FluxPipeline, flux)
    for f in range(2):
        ref = pipe(PROMPT, height=64, width=48, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=77,
                   generator=torch.Generator().manual_seed(3 + f), output_type="pt").images
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sdedit_with_attention_none_equals_diffusers_flux_img2img(flux, strength):
    frames = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    s = SamplerSettings(PROMPT, seed=11, steps=5, cfg=3.5, scheduler="flow_euler", strength=strength,
                        attention="none")
    ours = decode_latents(flux, edit_video(flux, s, frames))
    pipe = pipeline(FluxImg2ImgPipeline, flux)
    for f in range(2):
        ref = pipe(PROMPT, image=frames[f:f + 1].permute(0, 3, 1, 2), height=64, width=64, strength=strength,
                   num_inference_steps=5,
                   guidance_scale=3.5, max_sequence_length=77, generator=torch.Generator().manual_seed(11 + f),
                   output_type="pt").images
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


def test_cross_frame_attention_on_flux_changes_later_frames_only(flux):
    frames = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    s = SamplerSettings(PROMPT, seed=4, steps=3, strength=0.6, scheduler="flow_euler", attention="none")
    plain = edit_video(flux, s, frames)
    for rule in ("first", "first+previous", "all"):
        ruled = edit_video(flux, SamplerSettings(PROMPT, seed=4, steps=3, strength=0.6, scheduler="flow_euler",
                                                 attention=rule), frames)
        if rule != "all":
            assert torch.allclose(plain[0], ruled[0], atol=1e-5), rule
        assert (plain[1:] - ruled[1:]).abs().max() > 1e-3, rule


def test_first_frame_attention_on_identical_frames_with_shared_noise_gives_identical_frames(flux):
    """H2 on Flux: identical inputs attending to frame 0's image tokens stay identical (the text tokens, per
    frame, are the same prompt's)."""
    frames = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(5)).expand(3, -1, -1, -1).clone()
    s = SamplerSettings(PROMPT, seed=4, steps=3, strength=0.8, scheduler="flow_euler", attention="first",
                        noise="shared")
    out = edit_video(flux, s, frames)
    assert (out - out[:1]).abs().max() < 1e-5


@pytest.mark.parametrize("change, message", [
    (dict(scheduler="ddim"), "does not step Flux models"),
    (dict(attention_layers="decoder"), "Flux's blocks have none"),
])
def test_what_flux_cannot_run_is_refused_before_any_step(flux, change, message):
    frames = torch.rand(2, 32, 32, 3)
    settings = dict(prompt=PROMPT, steps=2, strength=0.5, scheduler="flow_euler", attention="first")
    with pytest.raises(ValueError, match=message):
        edit_video(flux, SamplerSettings(**{**settings, **change}), frames)


def test_a_size_that_does_not_pack_is_refused(flux):
    with pytest.raises(ValueError, match="multiple of 16"):
        edit_video(flux, SamplerSettings(PROMPT, steps=2, scheduler="flow_euler"), frame_count=1, size=(40, 48))
