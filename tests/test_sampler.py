"""The Cross-Frame Sampler against diffusers' own pipelines, and its invariants (methods.md §6 B8, H)."""

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from comfyui_video_edit.pipelines_core.models.backbone import SD
from comfyui_video_edit.pipelines_core.attention.processor import VideoAttnProcessor
from comfyui_video_edit.pipelines_core.models.model import decode_latents
from comfyui_video_edit.pipelines_core.sampling.chunks import plan_chunks
from comfyui_video_edit.pipelines_core.sampling.hooks import Hooks
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.sampling.schedulers import make_scheduler

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


def pipeline(cls, model, scheduler):
    pipe = cls(
        unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        scheduler=make_scheduler(scheduler, model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", list(SD.schedulers))  # the noise-predicting models' schedulers
def test_sdedit_without_temporal_features_equals_diffusers_img2img(tiny_model, clip_frames, scheduler):
    """Frame f equals StableDiffusionImg2ImgPipeline run on that frame alone with generator seed + f."""
    s = SamplerSettings(PROMPT, NEGATIVE, seed=11, steps=6, cfg=7.5, scheduler=scheduler, strength=0.7,
                        attention="none", chunk_size=2)
    ours = decode_latents(tiny_model, edit_video(tiny_model, s, clip_frames))
    pipe = pipeline(StableDiffusionImg2ImgPipeline, tiny_model, scheduler)
    for f in range(clip_frames.shape[0]):
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=clip_frames[f:f + 1].permute(0, 3, 1, 2), strength=0.7,
                   num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(11 + f),
                   output_type="pt").images
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


@pytest.mark.parametrize("scheduler", list(SD.schedulers))  # the noise-predicting models' schedulers
def test_generation_from_noise_equals_diffusers_txt2img(tiny_model, scheduler):
    s = SamplerSettings(PROMPT, NEGATIVE, seed=3, steps=5, cfg=6.0, scheduler=scheduler, attention="none")
    ours = decode_latents(tiny_model, edit_video(tiny_model, s, frame_count=2, size=(64, 48)))
    pipe = pipeline(StableDiffusionPipeline, tiny_model, scheduler)
    for f in range(2):
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=48, num_inference_steps=5, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(3 + f), output_type="pt").images
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


def test_H1_same_seed_same_latents(tiny_model, clip_frames):
    s = SamplerSettings(PROMPT, seed=4, steps=3, strength=0.5, attention="first+previous")
    assert torch.equal(edit_video(tiny_model, s, clip_frames), edit_video(tiny_model, s, clip_frames))


@pytest.mark.parametrize("rule", ["first", "first+previous", "all"])
def test_H2_shared_noise_and_identical_inputs_give_identical_frames(tiny_model, rule):
    s = SamplerSettings(PROMPT, seed=4, steps=3, noise="shared", attention=rule)
    latents = edit_video(tiny_model, s, frame_count=3, size=(32, 32))
    assert (latents - latents[:1]).abs().max() <= 1e-4  # float summation order only


def test_cross_frame_attention_changes_later_frames_only(tiny_model, clip_frames):
    base = SamplerSettings(PROMPT, seed=4, steps=3, strength=0.8, attention="none")
    plain = edit_video(tiny_model, base, clip_frames)
    linked = edit_video(tiny_model, SamplerSettings(**{**base.__dict__, "attention": "first"}), clip_frames)
    assert (plain[0] - linked[0]).abs().max() <= 1e-5  # frame 0 attends to itself either way
    assert (plain[1:] - linked[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_B8_chunked_first_frame_attention_equals_unchunked(tiny_model):
    frames = torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(9))
    s = SamplerSettings(PROMPT, seed=2, steps=3, strength=0.8, attention="first", chunk_size=5)
    whole = edit_video(tiny_model, s, frames)
    chunked = edit_video(tiny_model, SamplerSettings(**{**s.__dict__, "chunk_size": 2}), frames)
    assert (whole - chunked).abs().max() <= 1e-5


def test_chunk_plans_carry_anchor_and_previous_frame():
    plans = plan_chunks(7, 3, "first+previous")
    assert [c.frames for c in plans] == [(0, 1, 2), (0, 2, 3, 4, 5), (0, 5, 6)]
    assert [c.keep for c in plans] == [(0, 1, 2), (2, 3, 4), (2,)]
    assert [c.frames for c in plan_chunks(5, 2, "none")] == [(0, 1), (2, 3), (4,)]
    assert [c.frames for c in plan_chunks(5, 2, "previous")] == [(0, 1), (1, 2, 3), (3, 4)]


def test_H4_cfg_one_ignores_the_negative_prompt(tiny_model, clip_frames):
    a = SamplerSettings(PROMPT, "", seed=1, steps=3, cfg=1.0)
    b = SamplerSettings(PROMPT, "something else entirely", seed=1, steps=3, cfg=1.0)
    assert torch.equal(edit_video(tiny_model, a, clip_frames), edit_video(tiny_model, b, clip_frames))


def test_after_step_hook_result_is_what_the_loop_returns(tiny_model, clip_frames):
    zero_last = Hooks(after_step=[lambda st: st.latents * 0 if st.index == st.total - 1 else st.latents])
    out = edit_video(tiny_model, SamplerSettings(PROMPT, steps=3), clip_frames, hooks=zero_last)
    assert out.abs().sum() == 0


@pytest.mark.parametrize("scheduler", list(SD.schedulers))  # the noise-predicting models' schedulers
def test_identity_x0_hook_changes_nothing_and_a_real_one_does(tiny_model, clip_frames, scheduler):
    s = SamplerSettings(PROMPT, steps=4, scheduler=scheduler, strength=0.9)
    plain = edit_video(tiny_model, s, clip_frames)
    seen = []
    identity = Hooks(on_x0=[lambda st: seen.append(st.index) or st.x0])
    assert (edit_video(tiny_model, s, clip_frames, hooks=identity) - plain).abs().max() <= 1e-4
    assert seen == list(range(len(seen))) and len(seen) >= 3
    to_zero = Hooks(on_x0=[lambda st: torch.zeros_like(st.x0)])
    assert (edit_video(tiny_model, s, clip_frames, hooks=to_zero) - plain).abs().max() > 1e-2


def test_interrupt_mid_sampling_restores_processors(tiny_model, clip_frames, cancel_at):
    before = dict(tiny_model.unet.attn_processors)
    with pytest.raises(cancel_at.error):
        edit_video(tiny_model, SamplerSettings(PROMPT, steps=5, attention="all"), clip_frames, progress=cancel_at(2))
    after = tiny_model.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, VideoAttnProcessor) for p in after.values())


def test_progress_reports_every_step(tiny_model, clip_frames):
    calls = []
    edit_video(tiny_model, SamplerSettings(PROMPT, steps=10, strength=0.5), clip_frames,
               progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 5) for i in range(1, 6)]


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps"), (dict(strength=0.0), "strength"), (dict(strength=0.05, steps=10), "runs no step"),
    (dict(scheduler="plms"), "scheduler"), (dict(attention="diagonal"), "attention rule"), (dict(noise="pink"), "noise"),
])
def test_bad_settings_fail_before_any_step(tiny_model, clip_frames, bad, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        edit_video(tiny_model, SamplerSettings(PROMPT, **bad), clip_frames, progress=lambda d, t: calls.append(d))
    assert calls == []


def test_size_not_multiple_of_8_is_refused(tiny_model):
    with pytest.raises(ValueError, match="multiple of 8"):
        edit_video(tiny_model, SamplerSettings(PROMPT), torch.rand(2, 36, 32, 3))


def test_decoder_only_attention_differs_from_all_layers_and_from_none(tiny_model, clip_frames):
    base = dict(prompt=PROMPT, seed=4, steps=3, strength=0.8, attention="first")
    everywhere = edit_video(tiny_model, SamplerSettings(**base), clip_frames)
    decoder = edit_video(tiny_model, SamplerSettings(**base, attention_layers="decoder"), clip_frames)
    plain = edit_video(tiny_model, SamplerSettings(**{**base, "attention": "none"}), clip_frames)
    assert (decoder[1:] - everywhere[1:]).abs().max() > 1e-3
    assert (decoder[1:] - plain[1:]).abs().max() > 1e-3
    assert (decoder[0] - plain[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("rule", ["first+previous", "all"])
def test_H3_one_frame_with_any_rule_equals_diffusers_img2img(tiny_model, clip_frames, rule):
    s = SamplerSettings(PROMPT, NEGATIVE, seed=8, steps=5, strength=0.8, attention=rule)
    ours = decode_latents(tiny_model, edit_video(tiny_model, s, clip_frames[:1]))
    pipe = pipeline(StableDiffusionImg2ImgPipeline, tiny_model, "ddim")
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=clip_frames[:1].permute(0, 3, 1, 2), strength=0.8,
               num_inference_steps=5, guidance_scale=7.5, generator=torch.Generator().manual_seed(8),
               output_type="pt").images
    assert (ref[0].permute(1, 2, 0) - ours[0]).abs().max() <= 1e-4
