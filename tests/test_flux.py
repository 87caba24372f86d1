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


# --- FlowEdit ---------------------------------------------------------------------------------------------

def flowedit(flux, frames, source_prompt, target_prompt, **params):
    from comfyui_video_edit.pipelines_core.methods.flowedit import FlowEditParams, flowedit_injection

    steps = params.pop("steps", 6)
    cfg = params.pop("cfg", 5.5)
    attention = params.pop("attention", "none")
    injection = flowedit_injection(frames, FlowEditParams(source_prompt, **params))
    s = SamplerSettings(target_prompt, seed=7, steps=steps, cfg=cfg, scheduler="flow_euler", attention=attention)
    return edit_video(flux, s, injection=injection)


def clip(count=2, size=32):
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(3))


def test_flowedit_with_the_source_prompt_as_target_returns_the_source(flux):
    """Same prompt, same guidance: every velocity difference is that of two identical calls, so the edit stays on
    the encoded source (the integrator adds nothing)."""
    from comfyui_video_edit.pipelines_core.models.model import encode_frames

    frames = clip()
    out = flowedit(flux, frames, PROMPT, PROMPT, n_max=5, source_guidance=5.5)
    source = encode_frames(flux, frames)
    error = (out - source).abs().max().item()
    print(f"\nFlowEdit, source prompt as target: max |edit - source| {error:.2e} (source max {source.abs().max():.2f})")
    assert error < 1e-5


def test_flowedit_moves_the_clip_by_the_velocity_difference(flux):
    """Another target prompt moves the edit away from the source; the FlowEdit update equals Euler steps of the
    velocity difference computed by hand with the same noise (one step: n_max 1)."""
    from comfyui_video_edit.pipelines_core.models.model import encode_frames, encode_text
    from comfyui_video_edit.pipelines_core.models.flux import pack, unpack, image_ids
    from comfyui_video_edit.pipelines_core.sampling.starts import frame_generators
    from diffusers.utils.torch_utils import randn_tensor

    frames = clip()
    out = flowedit(flux, frames, PROMPT, "a blue bird on a branch", steps=4, n_max=1, source_guidance=1.5)
    source = encode_frames(flux, frames)
    assert (out - source).abs().max() > 1e-3
    # by hand: the last step of a 4-step schedule, sigma -> 0
    scheduler = make_scheduler("flow_euler", flux.scheduler_config)
    FLUX.set_timesteps(scheduler, 4, (32, 32), "cpu")
    sigma, t = scheduler.sigmas[3], scheduler.timesteps[3]
    noise = torch.cat([randn_tensor((1, 16, 4, 4), generator=g) for g in frame_generators(7, 2)])
    z_src = (1 - sigma) * source + sigma * noise

    def velocity(z, prompt, guidance):
        text = encode_text(flux, prompt)
        with torch.no_grad():
            v = flux.unet.transformer(hidden_states=pack(z), timestep=t.expand(2) / 1000,
                                      guidance=torch.full((2,), guidance), pooled_projections=text.pooled.expand(2, -1),
                                      encoder_hidden_states=text.hidden.expand(2, -1, -1), txt_ids=torch.zeros(77, 3),
                                      img_ids=image_ids(4, 4, "cpu", torch.float32), return_dict=False)[0]
        return unpack(v, 4, 4)

    delta = velocity(z_src, "a blue bird on a branch", 5.5) - velocity(z_src, PROMPT, 1.5)
    assert (out - (source + (0 - sigma) * delta)).abs().max() < 1e-4


def test_flowedit_plain_tail_and_cross_frame_attention_change_the_edit(flux):
    frames = clip(3)
    base = flowedit(flux, frames, PROMPT, "a blue bird", n_max=4)
    tail = flowedit(flux, frames, PROMPT, "a blue bird", n_max=4, n_min=2)
    anchored = flowedit(flux, frames, PROMPT, "a blue bird", n_max=4, attention="first")
    assert (base - tail).abs().max() > 1e-3
    assert torch.allclose(base[0], anchored[0], atol=1e-5) and (base[1:] - anchored[1:]).abs().max() > 1e-3


def test_flowedit_is_refused_on_a_noise_predicting_model_and_with_another_start(flux, tiny_model):
    from comfyui_video_edit.pipelines_core.methods.flowedit import FlowEditParams, flowedit_injection

    frames = clip()
    injection = flowedit_injection(frames, FlowEditParams(PROMPT, n_max=2))
    with pytest.raises(ValueError, match="FlowEdit edits with a flow-matching model"):
        edit_video(tiny_model, SamplerSettings(PROMPT, steps=3), injection=injection)
    with pytest.raises(ValueError, match="brings its own start"):
        edit_video(flux, SamplerSettings(PROMPT, steps=3, scheduler="flow_euler"), frames, injection=injection)
    with pytest.raises(ValueError, match="source_prompt is empty"):
        FlowEditParams(" ").check()


# --- RF-Inversion ---------------------------------------------------------------------------------------------

def test_rf_inversion_with_gamma_0_is_plain_flow_inversion(flux):
    """gamma = 0: Euler steps of the model's velocity up the sampling schedule, as written by hand on diffusers'
    transformer; gamma = 1: the straight path lands on the noise sample itself."""
    from comfyui_video_edit.pipelines_core.methods.rf_inversion import rf_invert
    from comfyui_video_edit.pipelines_core.models.flux import image_ids, pack, unpack
    from comfyui_video_edit.pipelines_core.models.model import encode_text
    from comfyui_video_edit.pipelines_core.sampling.starts import frame_generators
    from diffusers.utils.torch_utils import randn_tensor

    frames = clip()
    plain = rf_invert(flux, frames, steps=4, gamma=0.0)
    scheduler = make_scheduler("flow_euler", flux.scheduler_config)
    FLUX.set_timesteps(scheduler, 4, (32, 32), "cpu")
    levels = scheduler.sigmas.flip(0)
    text = encode_text(flux, "")
    y = plain.clean.clone()
    with torch.no_grad():
        for s, s_next in zip(levels[:-1], levels[1:]):
            v = flux.unet.transformer(hidden_states=pack(y), timestep=s.expand(2), guidance=torch.zeros(2),
                                      pooled_projections=text.pooled.expand(2, -1),
                                      encoder_hidden_states=text.hidden.expand(2, -1, -1), txt_ids=torch.zeros(77, 3),
                                      img_ids=image_ids(4, 4, "cpu", torch.float32), return_dict=False)[0]
            y = y + (s_next - s) * unpack(v, 4, 4)
    assert (plain.latents - y).abs().max() < 1e-4
    straight = rf_invert(flux, frames, steps=4, gamma=1.0, seed=5)
    noise = torch.cat([randn_tensor((1, 16, 4, 4), generator=g) for g in frame_generators(5, 2)])
    assert (straight.latents - noise).abs().max() < 1e-5


def test_rf_inversion_editing_with_eta_0_ignores_the_source_and_with_eta_1_lands_on_it(flux):
    from comfyui_video_edit.pipelines_core.methods.rf_inversion import (RFInversionParams, RFInversionStart,
                                                                         rf_invert, rf_inversion_injection)

    inversion = rf_invert(flux, clip(), steps=4)
    s = SamplerSettings("a blue bird", seed=1, steps=4, cfg=3.5, scheduler="flow_euler")
    free = edit_video(flux, s, start=RFInversionStart(inversion))
    eta0 = edit_video(flux, s, injection=rf_inversion_injection(inversion, RFInversionParams(eta=0.0)))
    assert torch.equal(free, eta0)
    pulled = edit_video(flux, s, injection=rf_inversion_injection(inversion, RFInversionParams(eta=1.0, stop=1.0)))
    assert (pulled - inversion.clean).abs().max() < 1e-4  # the last step lands on y0 exactly
    default = edit_video(flux, s, injection=rf_inversion_injection(inversion))
    near, far = (default - inversion.clean).abs().mean(), (free - inversion.clean).abs().mean()
    print(f"\nRF-Inversion edit: distance to the source {near:.3g} with the control (eta 0.9, 38 %), {far:.3g} without")
    assert near < far


def test_rf_inversion_is_refused_where_it_cannot_run(flux, tiny_model):
    from comfyui_video_edit.pipelines_core.methods.rf_inversion import RFInversionParams, rf_invert

    with pytest.raises(ValueError, match="RF-Inversion edits with a flow-matching model"):
        rf_invert(tiny_model, clip(), steps=3)
    with pytest.raises(ValueError, match="eta must be in"):
        RFInversionParams(eta=1.5).check()
    inversion = rf_invert(flux, clip(), steps=3)
    from comfyui_video_edit.pipelines_core.methods.rf_inversion import rf_inversion_injection

    with pytest.raises(ValueError, match="ran 3 steps but the sampler is set to 5"):
        edit_video(flux, SamplerSettings(PROMPT, steps=5, scheduler="flow_euler"),
                   injection=rf_inversion_injection(inversion))


def test_lora_apply_on_flux_is_refused_in_one_line(flux, tmp_path):
    from safetensors.torch import save_file

    from comfyui_video_edit.pipelines_core.models.lora import add_lora

    path = tmp_path / "flux_lora.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)}, str(path))
    with pytest.raises(ValueError, match="LoRAs load into SD-1.5 and SDXL models only"):
        add_lora(flux, str(path))
