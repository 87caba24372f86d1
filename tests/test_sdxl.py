"""SDXL through the backbone seam: the sampler and DDIM Invert against diffusers' SDXL pipelines on builtin:tiny-sdxl
(two text encoders, pooled text and size/crop ids added to the timestep embedding)."""

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from comfyui_video_edit.pipelines_core.models.backbone import SD, SDXL, blank_unet_kwargs
from comfyui_video_edit.pipelines_core.models.model import decode_latents, encode_text, load_model
from comfyui_video_edit.pipelines_core.sampling.inversion import ddim_schedulers, invert_video, reconstruct
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.schedulers import make_scheduler
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


@pytest.fixture(scope="module")
def sdxl():
    return load_model("builtin:tiny-sdxl", dtype="fp32", device="cpu")


def pipeline(cls, model, scheduler):
    pipe = cls(vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
               tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
               scheduler=make_scheduler(scheduler, model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sdxl_is_recognised_as_sdxl(sdxl):
    assert sdxl.backbone is SDXL and "SDXL" in sdxl.kind and "SDXL" in repr(sdxl)
    text = encode_text(sdxl, PROMPT)
    # both encoders' penultimate hidden states side by side, the second encoder's projection pooled
    assert text.hidden.shape[-1] == sdxl.unet.config.cross_attention_dim
    assert text.pooled.shape == (1, sdxl.text_encoder_2.config.projection_dim)


@pytest.mark.parametrize("scheduler", list(SD.schedulers))  # the noise-predicting models' schedulers
def test_generation_with_attention_none_equals_diffusers_sdxl_pipeline(sdxl, scheduler):
    s = SamplerSettings(PROMPT, NEGATIVE, seed=3, steps=4, cfg=6.0, scheduler=scheduler, attention="none")
    ours = decode_latents(sdxl, edit_video(sdxl, s, frame_count=2, size=(64, 48)))
    pipe = pipeline(StableDiffusionXLPipeline, sdxl, scheduler)
    for f in range(2):
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=48, num_inference_steps=4, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(3 + f), output_type="pt").images
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sdedit_with_attention_none_equals_diffusers_sdxl_img2img(sdxl, clip_frames, scheduler):
    s = SamplerSettings(PROMPT, NEGATIVE, seed=11, steps=5, cfg=7.5, scheduler=scheduler, strength=0.7,
                        attention="none", chunk_size=2)
    ours = decode_latents(sdxl, edit_video(sdxl, s, clip_frames))
    pipe = pipeline(StableDiffusionXLImg2ImgPipeline, sdxl, scheduler)
    for f in range(clip_frames.shape[0]):
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=clip_frames[f:f + 1].permute(0, 3, 1, 2), strength=0.7,
                   num_inference_steps=5, guidance_scale=7.5, generator=torch.Generator().manual_seed(11 + f),
                   output_type="pt").images
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


def test_the_added_conditioning_is_read(sdxl, clip_frames):
    """The pooled embedding and the size ids reach the UNet: zeroing them changes the prediction."""
    x = torch.randn(1, 4, 8, 8)
    text = encode_text(sdxl, PROMPT)
    real = SDXL.added_conditioning(sdxl, {"cond": text.pooled}, (64, 64)).unet_kwargs(("cond",), 1, x)
    eps = sdxl.unet(x, 500, encoder_hidden_states=text.hidden, **real).sample
    blank = sdxl.unet(x, 500, encoder_hidden_states=text.hidden, **blank_unet_kwargs(sdxl.unet.config, 1)).sample
    assert (eps - blank).abs().max() > 1e-3


def test_cross_frame_attention_on_sdxl_changes_later_frames_only(sdxl, clip_frames):
    base = SamplerSettings(PROMPT, seed=4, steps=3, strength=0.6, attention="none")
    plain = edit_video(sdxl, base, clip_frames)
    anchored = edit_video(sdxl, SamplerSettings(PROMPT, seed=4, steps=3, strength=0.6, attention="first"),
                          clip_frames)
    assert torch.allclose(plain[0], anchored[0], atol=1e-5)
    assert (plain[1:] - anchored[1:]).abs().max() > 1e-3


def test_ddim_inversion_on_sdxl_reads_the_prompt_as_diffusers_sdxl_does(sdxl, clip_frames):
    """x_T of DDIM Invert equals inverse DDIM steps run by hand with the conditioning diffusers' SDXL pipeline
    computes (`encode_prompt`, `_get_add_time_ids`): hidden states, pooled embedding and size ids all reach
    every inversion step."""
    inversion = invert_video(sdxl, clip_frames[:2], PROMPT, steps=3)
    pipe = pipeline(StableDiffusionXLPipeline, sdxl, "ddim")
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=hidden.dtype,
                                 text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    _, inverse = ddim_schedulers(sdxl.scheduler_config, 3)
    x = inversion.latents[0].clone()
    with torch.no_grad():
        for t in inverse.timesteps:
            eps = sdxl.unet(x, t, encoder_hidden_states=hidden.expand(2, -1, -1),
                            added_cond_kwargs={"text_embeds": pooled.expand(2, -1), "time_ids": ids.expand(2, -1)}).sample
            x = inverse.step(eps, t, x).prev_sample
    assert (x - inversion.x_T).abs().max() <= 1e-4
    assert torch.equal(inversion.prompt_pooled, pooled)


def test_null_text_inversion_on_sdxl_follows_the_trajectory_at_cfg(sdxl, clip_frames):
    """Null-text inversion tunes SDXL's unconditional hidden states (its pooled embedding stays): sampling at
    CFG 7.5 with them lands nearer the clip than without (Mokady's 10 Adam steps at 1e-2)."""
    from dataclasses import replace

    def error(inversion):
        return (reconstruct(sdxl, inversion) - inversion.latents[0]).pow(2).mean().sqrt().item()

    tuned = invert_video(sdxl, clip_frames[:1], PROMPT, steps=4, cfg=7.5, null_text=True)
    assert error(tuned) < 0.75 * error(replace(tuned, null_embeds=None))


@pytest.mark.parametrize("method", ["fatezero", "pnp", "flatten", "vidtome"])
def test_a_method_tied_to_sd15_layers_is_refused_on_sdxl_before_any_step(sdxl, clip_frames, method):
    """Methods that pick SD-1.5's UNet layers by position say so by name, before the UNet runs once."""
    from comfyui_video_edit.pipelines_core.sampling.injection import Injection

    calls = []
    handle = sdxl.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    name = {"fatezero": "FateZero", "pnp": "Plug-and-Play", "flatten": "FLATTEN", "vidtome": "VidToMe"}[method]
    try:
        with pytest.raises(ValueError, match=f"{name} does not run on SDXL models"):
            edit_video(sdxl, SamplerSettings(PROMPT, steps=2, strength=0.5), clip_frames,
                       injection=Injection(method, None, None, None))
    finally:
        handle.remove()
    assert not calls


def test_tune_on_clip_is_refused_on_sdxl(sdxl, clip_frames):
    from comfyui_video_edit.pipelines_core.methods.tune_a_video import TuneSettings, tune_on_clip

    with pytest.raises(ValueError, match="Tune on Clip trains SD-1.5 UNets"):
        tune_on_clip(sdxl, clip_frames, TuneSettings(prompt=PROMPT, steps=1))


def test_rave_and_fairy_run_on_sdxl_and_change_the_edit(sdxl):
    """The injections that work through the denoiser and the attention rule alone run on SDXL: RAVE's grids and
    Fairy's anchors each change a 4-frame SDEdit against the same run without them."""
    from comfyui_video_edit.pipelines_core.methods.fairy import FairyParams, fairy_injection
    from comfyui_video_edit.pipelines_core.methods.rave import RAVEParams, rave_injection

    frames = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    s = SamplerSettings(PROMPT, seed=5, steps=2, strength=0.6, attention="none")
    plain = edit_video(sdxl, s, frames)
    for injection in (rave_injection(params=RAVEParams(grid=2)), fairy_injection(params=FairyParams(anchors=2))):
        edited = edit_video(sdxl, s, frames, injection=injection)
        assert edited.shape == plain.shape and (edited - plain).abs().max() > 1e-3


def test_an_sdxl_diffusers_folder_loads_with_both_text_encoders(sdxl, tmp_path, clip_frames):
    """A folder saved by diffusers' StableDiffusionXLPipeline is read as SDXL (model_index.json) and samples as
    builtin:tiny-sdxl does."""
    pipeline(StableDiffusionXLPipeline, sdxl, "euler").save_pretrained(tmp_path / "sdxl", safe_serialization=True)
    loaded = load_model(str(tmp_path / "sdxl"), dtype="fp32", device="cpu")
    assert loaded.backbone is SDXL and loaded.text_encoder_2 is not None and "SDXL" in loaded.kind
    s = SamplerSettings(PROMPT, seed=1, steps=2, strength=0.5, attention="first")
    assert torch.equal(edit_video(loaded, s, clip_frames), edit_video(sdxl, s, clip_frames))


@pytest.mark.parametrize("kind, message", [("StableDiffusion3Pipeline", "holds a StableDiffusion3Pipeline"),
                                           ("CogVideoXPipeline", "holds a CogVideoXPipeline")])
def test_a_folder_of_another_family_is_refused_by_name(tmp_path, kind, message):
    import json

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": kind}))
    with pytest.raises(ValueError, match=message):
        load_model(str(tmp_path), device="cpu")


def test_an_sdxl_refiner_folder_is_refused(tmp_path):
    import json

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline",
                                                           "text_encoder": [None, None]}))
    with pytest.raises(ValueError, match="SDXL refiner"):
        load_model(str(tmp_path), device="cpu")
