"""DDIM Invert: exactness, keying by timestep, clip_sample, null-text, readout, cache (methods.md §6 A)."""

import copy
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel

from comfyui_video_edit.pipelines_core.attention.processor import VideoAttnProcessor
from comfyui_video_edit.pipelines_core.sampling.inversion import (
    Inversion, check_invertible, clear_inversion_cache, ddim_invert, ddim_sample, ddim_schedulers, invert_video,
    latent_at, psnr, reconstruct, reconstruction_psnr,
)
from comfyui_video_edit.pipelines_core.models.model import decode_latents, encode_frames, encode_prompt, load_model
from comfyui_video_edit.pipelines_core.sampling.hooks import Hooks
from comfyui_video_edit.pipelines_core.models.tiny import SD_SCHEDULER_CONFIG

F64 = torch.float64



pytestmark = pytest.mark.usefixtures("fresh_inversion_cache")


@pytest.fixture(scope="module")
def tiny64(tiny_model):
    """builtin:tiny cast to fp64 (a copy: the session model stays fp32)."""
    return tiny_model.with_changes(unet=copy.deepcopy(tiny_model.unet).double(),
                                   vae=copy.deepcopy(tiny_model.vae).double(),
                                   text_encoder=copy.deepcopy(tiny_model.text_encoder).double(), dtype=F64)


def small_frames(count=2, size=16, seed=1, dtype=torch.float32):
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def latent(seed=0, scale=1.0):
    return scale * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


def round_trip(denoise, x0, steps, config=SD_SCHEDULER_CONFIG):
    with torch.no_grad():
        latents = ddim_invert(denoise, x0, config, steps)
        return ddim_sample(denoise, latents[max(latents)], config, steps), latents


# --- A1-A3: the loop backwards --------------------------------------------------------------

@pytest.mark.parametrize("steps", [5, 20, 50, 200])
def test_A1_round_trip_is_exact_when_eps_does_not_depend_on_x(steps):
    x0 = latent()
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    for eps in (lambda x, st: torch.zeros_like(x), lambda x, st: torch.cos(st.timestep / 300.0) * direction):
        back, latents = round_trip(eps, x0, steps)
        assert (back - x0).abs().max() < 1e-12
        assert (latents[max(latents)] - x0).abs().max() > 0.1  # it did travel up the schedule


def test_A2_round_trip_error_shrinks_with_steps_on_a_random_unet():
    """The UNet of methods.md §6, fp64, output scaled by 0.1 (raw output: same trend, ratio near 0.5)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2,
    ).double().eval()
    text = torch.randn(1, 7, 8, dtype=F64)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)

    def eps(x, st):
        return 0.1 * unet(x, st.timestep, encoder_hidden_states=text).sample

    errors = [(round_trip(eps, x0, n)[0] - x0).pow(2).mean().sqrt().item() for n in (25, 50, 100, 200)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[3] / errors[1] < 0.5, errors


@pytest.mark.parametrize("steps", [1, 10, 50, 999])
def test_A3_inverse_timesteps_are_the_forward_ones_reversed(steps):
    forward, inverse = ddim_schedulers(SD_SCHEDULER_CONFIG, steps)
    reference = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    reference.set_timesteps(steps)
    assert torch.equal(forward.timesteps, reference.timesteps)
    assert torch.equal(inverse.timesteps, reference.timesteps.flip(0))


# --- A4: keyed by timestep ---------------------------------------------------------------------

def test_A4_the_sampling_step_with_timestep_t_starts_from_latents_t():
    x0 = latent()
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=F64)

    def eps(x, st):
        return torch.sin(st.timestep / 200.0) * direction

    latents = ddim_invert(eps, x0, SD_SCHEDULER_CONFIG, 10)
    seen = {}
    ddim_sample(eps, latents[max(latents)], SD_SCHEDULER_CONFIG, 10,
                Hooks(before_model=[lambda st: seen.setdefault(int(st.timestep), st.latents)]))
    assert sorted(seen) == sorted(t for t in latents if t)
    for t, x in seen.items():
        assert (x - latents[t]).abs().max() < 1e-12
    ts = sorted(seen)
    assert min((latents[a] - latents[b]).abs().max() for a, b in zip(ts, ts[1:])) > 1e-3  # off by one would show


def test_A4_x_T_is_the_last_inverted_latent():
    last = []
    latents = ddim_invert(lambda x, st: 0.1 * x, latent(), SD_SCHEDULER_CONFIG, 7,
                          Hooks(after_step=[lambda st: last.append(st.latents) or st.latents]))
    assert torch.equal(latents[max(latents)], last[-1])


def test_A4_invert_video_keys_latents_by_timestep(tiny_model):
    frames = small_frames(3, 32)
    inv = invert_video(tiny_model, frames, "a fox", steps=4)
    assert isinstance(inv, Inversion)
    assert inv.timesteps.tolist() == [751, 501, 251, 1]
    assert set(inv.latents) == {0, 1, 251, 501, 751}
    assert torch.equal(inv.latents[0], encode_frames(tiny_model, frames))
    assert torch.equal(inv.x_T, inv.latents[751]) and torch.equal(latent_at(inv, torch.tensor(251)), inv.latents[251])

    # the step to t=251 by hand (DDIM eq. 12 backwards): eps(x at level 1, t=251) carries x from level 1 to 251
    a = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod
    with torch.no_grad():
        text = encode_prompt(tiny_model, "a fox").expand(3, -1, -1)
        eps = tiny_model.unet(inv.latents[1], 251, encoder_hidden_states=text).sample
    x0_hat = (inv.latents[1] - (1 - a[1]).sqrt() * eps) / a[1].sqrt()
    assert (a[251].sqrt() * x0_hat + (1 - a[251]).sqrt() * eps - inv.latents[251]).abs().max() < 1e-4


def test_latent_at_a_missing_timestep_says_how_to_fix_it(tiny_model):
    inv = invert_video(tiny_model, small_frames(), steps=2)
    with pytest.raises(KeyError, match="same number of steps"):
        latent_at(inv, 999)


# --- A5: clip_sample ---------------------------------------------------------------------------

def test_A5_clip_sample_is_forced_off():
    clipping = {**SD_SCHEDULER_CONFIG, "clip_sample": True}
    x0 = latent(scale=3.0)
    assert x0.abs().max() > 1
    zero = lambda x, st: torch.zeros_like(x)  # noqa: E731
    back, _ = round_trip(zero, x0, 20, clipping)
    assert (back - x0).abs().max() < 1e-12
    assert all(not s.config.clip_sample for s in ddim_schedulers(clipping, 20))

    # diffusers' inverse scheduler left at clip_sample=True clamps x0 and loses the latent
    inverse = DDIMInverseScheduler.from_config(clipping)
    inverse.set_timesteps(20)
    x = x0
    for t in inverse.timesteps:
        x = inverse.step(zero(x, None), t, x).prev_sample
    assert x.abs().max() < x0.abs().max() * 0.5


# --- schedulers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "plms"])
def test_only_ddim_is_invertible(tiny_model, name):
    check_invertible("ddim")
    with pytest.raises(ValueError, match="'ddim'"):
        check_invertible(name)
    calls = []
    with pytest.raises(ValueError, match="'ddim'"):
        invert_video(tiny_model, small_frames(), scheduler=name, progress=lambda d, t: calls.append(d))
    assert calls == []


# --- reconstruction readout ----------------------------------------------------------------------

def test_reconstruction_psnr_is_finite_and_rises_with_steps(tiny64):
    """Against the input frames the random tiny VAE dominates (about 9.5 dB at any step count), so
    the readout is compared against the VAE's own decoding of x0: that isolates the inversion error."""
    frames = small_frames(1, 16, dtype=F64)
    few = invert_video(tiny64, frames, "a fox", steps=5, measure=True)
    many = invert_video(tiny64, frames, "a fox", steps=50, measure=True)
    assert 0 < few.reconstruction_psnr < 60 and 0 < many.reconstruction_psnr < 60
    assert few.reconstruction_psnr == pytest.approx(psnr(decode_latents(tiny64, reconstruct(tiny64, few)), frames))
    vae_only = decode_latents(tiny64, few.latents[0])
    assert reconstruction_psnr(tiny64, many, vae_only) > reconstruction_psnr(tiny64, few, vae_only) + 0.5


# --- null-text inversion -------------------------------------------------------------------------

def latent_error(model, inversion: Inversion) -> float:
    return (reconstruct(model, inversion) - inversion.latents[0]).pow(2).mean().sqrt().item()


def test_null_text_reduces_reconstruction_error_at_cfg_7_5(tiny_model):
    """The usual path is to invert at CFG 1 and edit at 7.5; null-text makes that path reconstruct.
    Mokady's settings (10 Adam steps at 1e-2) halve the error of the untuned path on the tiny
    random UNet, whose weak text response needs a stronger inner optimisation to beat even an
    inversion run at 7.5 itself."""
    frames = small_frames(1, 16)
    pivot = invert_video(tiny_model, frames, "a red fox", steps=4, cfg=1.0)
    untuned = latent_error(tiny_model, replace(pivot, cfg=7.5))
    tuned = invert_video(tiny_model, frames, "a red fox", steps=4, cfg=7.5, null_text=True)
    assert set(tuned.null_embeds) == set(tuned.timesteps.tolist()) and pivot.null_embeds is None
    assert torch.equal(tuned.x_T, pivot.x_T)  # the trajectory is the CFG-1 one
    assert latent_error(tiny_model, tuned) < 0.75 * untuned

    inverted_at_cfg = latent_error(tiny_model, invert_video(tiny_model, frames, "a red fox", steps=4, cfg=7.5))
    strong = invert_video(tiny_model, frames, "a red fox", steps=4, cfg=7.5, null_text=True, null_inner_steps=30,
                          null_lr=0.05)
    assert latent_error(tiny_model, strong) < 0.2 * inverted_at_cfg


def test_null_text_runs_under_inference_mode():
    """ComfyUI runs nodes (and loads models) under torch.inference_mode()."""
    with torch.inference_mode():
        model = load_model("builtin:tiny", device="cpu")
        assert next(model.unet.parameters()).is_inference()  # so the cloned-weights path is the one tested
        inv = invert_video(model, small_frames(1, 16), "a fox", steps=2, cfg=7.5, null_text=True)
        empty = encode_prompt(model, "")
    assert all((e - empty).abs().max() > 0 for e in inv.null_embeds.values())


# --- cache --------------------------------------------------------------------------------------

def test_cache_returns_the_same_inversion_without_recomputing(tiny_model):
    frames = small_frames()
    calls = []
    progress = lambda d, t: calls.append(d)  # noqa: E731
    first = invert_video(tiny_model, frames, "a fox", steps=3, progress=progress)
    assert calls == [1, 2, 3]
    again = invert_video(tiny_model, frames.clone(), "a fox", steps=3, progress=progress)
    assert again is first and calls == [1, 2, 3]
    assert invert_video(tiny_model, frames, "a cat", steps=3) is not first
    changed = frames.clone()
    changed[0, 0, 0, 0] += 0.5
    assert invert_video(tiny_model, changed, "a fox", steps=3) is not first
    clear_inversion_cache()
    assert invert_video(tiny_model, frames, "a fox", steps=3, progress=progress) is not first
    assert calls == [1, 2, 3] * 2


def test_measure_on_a_cache_hit_fills_the_readout_once(tiny_model):
    frames = small_frames()
    plain = invert_video(tiny_model, frames, steps=2)
    assert plain.reconstruction_psnr is None
    measured = invert_video(tiny_model, frames, steps=2, measure=True)
    assert measured.reconstruction_psnr is not None
    assert torch.equal(measured.x_T, plain.x_T)
    assert invert_video(tiny_model, frames, steps=2, measure=True) is measured


def test_processors_are_restored_after_an_interrupted_inversion(tiny_model, cancel_at):
    before = dict(tiny_model.unet.attn_processors)
    with pytest.raises(cancel_at.error):
        invert_video(tiny_model, small_frames(), steps=4, attention="first", progress=cancel_at(2))
    after = tiny_model.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, VideoAttnProcessor) for p in after.values())


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps"), (dict(cfg=0.5), "cfg"), (dict(chunk_size=0), "chunk_size"),
    (dict(attention="diagonal"), "attention rule"),
])
def test_bad_settings_fail_before_any_step(tiny_model, bad, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        invert_video(tiny_model, small_frames(), progress=lambda d, t: calls.append(d), **bad)
    assert calls == []
