"""Pix2Video: anchor + previous decoder attention, x0 guidance toward the previous frame, causality."""

from dataclasses import replace

import pytest
import torch

from comfyui_video_edit.pipelines_core.sampling.windows import first
from comfyui_video_edit.pipelines_core.sampling.hooks import StepState
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.methods.pix2video import (
    Pix2VideoParams, PreviousFrameGuidance, pix2video_injection, x0_guidance,
)
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

SOURCE = "a photo of a street"
STEPS = 6



@pytest.fixture(scope="module")
def inversion(tiny_model):
    frames = torch.rand(3, 32, 48, 3, generator=torch.Generator().manual_seed(5))
    return invert_video(tiny_model, frames, prompt=SOURCE, steps=STEPS)


def settings(**kw) -> SamplerSettings:
    base = dict(prompt="an oil painting of a dragon", steps=STEPS, cfg=5.0, strength=1.0, attention="first+previous")
    return SamplerSettings(**{**base, **kw})


# --- E7: the guidance update ------------------------------------------------------------------------

def test_guidance_is_the_gradient_of_the_weighted_mse_to_the_previous_frame():
    x0 = torch.randn(4, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    update = x0_guidance(x0, 100.0)
    assert torch.equal(update[0], torch.zeros_like(update[0]))  # the anchor is not moved
    for i in range(1, 4):
        current = x0[i].clone().requires_grad_(True)
        loss = 100.0 * torch.nn.functional.mse_loss(x0[i - 1], current)  # one frame, as the code does
        loss.backward()
        assert torch.allclose(update[i], -current.grad)


def test_equal_estimates_or_weight_zero_move_nothing():
    one = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x0_guidance(one.expand(3, -1, -1, -1), 100.0), torch.zeros(3, 4, 5, 6))
    distinct = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x0_guidance(distinct, 0.0), torch.zeros(3, 4, 5, 6))


def test_guidance_acts_only_inside_its_window():
    x0 = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    latents = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    guidance = PreviousFrameGuidance(10.0, first(0.5).of(6))
    moved = []
    for step in range(6):
        guidance.keep_x0(StepState(step, torch.tensor(999), 6, latents, x0=x0))
        moved.append(not torch.equal(guidance.pull(StepState(step, torch.tensor(999), 6, latents)), latents))
    assert moved == [True, True, True, False, False, False]
    assert torch.equal(guidance.pull(StepState(0, torch.tensor(999), 6, latents)), latents + x0_guidance(x0, 10.0))


# --- sampling ---------------------------------------------------------------------------------------

def test_without_guidance_it_is_first_plus_previous_attention_in_the_decoder(tiny_model, inversion):
    """Weight 0: exactly the sampler's first+previous rule on decoder self-attention only."""
    pix2video = edit_video(tiny_model, settings(), injection=pix2video_injection(inversion, Pix2VideoParams(0.0)))
    decoder_rule = edit_video(tiny_model, settings(attention_layers="decoder"), inversion=inversion)
    everywhere = edit_video(tiny_model, settings(), inversion=inversion)
    assert torch.equal(pix2video, decoder_rule)
    assert (pix2video - everywhere).abs().max() > 1e-3  # the encoder stays per-frame


def test_guidance_pulls_consecutive_frames_together(tiny_model, inversion):
    # the paper's weight 100 is tuned for 64x64 latents (MSE averages over c*h*w); these are 4x6
    spread = lambda x: (x[1:] - x[:-1]).pow(2).mean().item()
    free = edit_video(tiny_model, settings(), injection=pix2video_injection(inversion, Pix2VideoParams(0.0)))
    pulled = edit_video(tiny_model, settings(), injection=pix2video_injection(inversion, Pix2VideoParams(3.0)))
    assert spread(pulled) < 0.8 * spread(free)


def test_batched_run_is_causal_like_sequential_editing(tiny_model, inversion):
    """Perturbing frame 2's inverted latent leaves frames 0 and 1 unchanged (they never read later frames)."""
    x_T = int(inversion.timesteps[0])
    latents = dict(inversion.latents)
    latents[x_T] = latents[x_T].clone()
    latents[x_T][2] += torch.randn(latents[x_T][2].shape, generator=torch.Generator().manual_seed(6))
    perturbed = replace(inversion, latents=latents)
    params = Pix2VideoParams(guidance_weight=1.0)
    base = edit_video(tiny_model, settings(), injection=pix2video_injection(inversion, params))
    changed = edit_video(tiny_model, settings(), injection=pix2video_injection(perturbed, params))
    assert (changed[:2] - base[:2]).abs().max() <= 1e-6
    assert (changed[2] - base[2]).abs().max() > 1e-2
    # control: with attention to all frames, frame 0 does see frame 2
    joint = edit_video(tiny_model, settings(attention="all"), inversion=inversion)
    joint_changed = edit_video(tiny_model, settings(attention="all"), inversion=perturbed)
    assert (joint_changed[0] - joint[0]).abs().max() > 1e-2


def test_chunks_without_the_anchor_are_refused(tiny_model, inversion):
    with pytest.raises(ValueError, match="first\\+previous"):
        edit_video(tiny_model, settings(attention="none", chunk_size=2), injection=pix2video_injection(inversion))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="guidance_until"):
        pix2video_injection(None, Pix2VideoParams(guidance_until=2.0))
    with pytest.raises(ValueError, match="guidance_weight"):
        pix2video_injection(None, Pix2VideoParams(guidance_weight=-1.0))
