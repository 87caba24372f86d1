"""DDIM Invert steered by a ControlNet at every step (RAVE's `give_control_inversion`)."""

import pytest
import torch

from comfyui_video_edit.pipelines_core.models.controlnet import ControlStack, ControlUnit
from comfyui_video_edit.pipelines_core.sampling.inversion import (
    clear_inversion_cache,
    invert_video,
    reconstruct,
)

from test_control import tiny_controlnet

SIZE = (32, 24)


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_inversion_cache()
    yield
    clear_inversion_cache()


@pytest.fixture(scope="module")
def frames():
    return torch.rand(3, *SIZE, 3, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def hints():
    return torch.rand(3, 3, *SIZE, generator=torch.Generator().manual_seed(5))


def stack(controlnet, hints, **unit):
    return ControlStack().add(ControlUnit(controlnet, hints, **unit))


def test_a_controlnet_steers_every_inversion_step(tiny_model, frames, hints):
    plain = invert_video(tiny_model, frames, "", steps=3)
    steered = invert_video(tiny_model, frames, "", steps=3, control=stack(tiny_controlnet(tiny_model.unet), hints))
    assert torch.equal(plain.latents[0], steered.latents[0])  # the encoded frames: no step yet
    for t in plain.timesteps.tolist():  # every level above x0 moved
        assert (plain.latents[t] - steered.latents[t]).abs().max() > 1e-4, t
    # the window is for sampling: a unit steering only the last tenth of sampling still steers all of inversion
    late = invert_video(tiny_model, frames, "", steps=3,
                        control=stack(tiny_controlnet(tiny_model.unet), hints, start=0.9, end=1.0))
    assert all(torch.equal(late.latents[t], steered.latents[t]) for t in plain.timesteps.tolist())


def test_a_zero_initialised_controlnet_changes_nothing(tiny_model, frames, hints):
    plain = invert_video(tiny_model, frames, "", steps=3)
    zero = invert_video(tiny_model, frames, "", steps=3, control=stack(tiny_controlnet(tiny_model.unet, None), hints))
    assert all(torch.allclose(plain.latents[t], zero.latents[t], atol=1e-6) for t in plain.latents)


def test_the_cache_tells_controls_apart_and_the_reconstruction_is_steered_alike(tiny_model, frames, hints):
    cn = tiny_controlnet(tiny_model.unet)
    steered = invert_video(tiny_model, frames, "", steps=4, control=stack(cn, hints))
    assert invert_video(tiny_model, frames, "", steps=4, control=stack(cn, hints)) is steered  # same inputs: cached
    assert invert_video(tiny_model, frames, "", steps=4) is not steered
    other = invert_video(tiny_model, frames, "", steps=4, control=stack(cn, hints.flip(0)))
    assert other is not steered and not torch.equal(other.x_T, steered.x_T)
    # sampling back with the same ControlNet retraces the inversion better than sampling back without it
    with_control = reconstruct(tiny_model, steered)
    from dataclasses import replace

    without = reconstruct(tiny_model, replace(steered, control=None))
    x0 = steered.latents[0]
    assert (with_control - x0).abs().mean() < (without - x0).abs().mean()


def test_hints_for_other_frames_and_null_text_are_refused_before_any_step(tiny_model, frames, hints):
    cn = tiny_controlnet(tiny_model.unet)
    with pytest.raises(ValueError, match="hints for 2 frames"):
        invert_video(tiny_model, frames, "", steps=2, control=stack(cn, hints[:2]))
    with pytest.raises(ValueError, match="null-text inversion does not take a ControlNet"):
        invert_video(tiny_model, frames, "", steps=2, null_text=True, cfg=7.5, control=stack(cn, hints))
