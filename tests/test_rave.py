"""RAVE: the grid, the shuffle, padding, ControlNet hints gridded alike, and the sampler runs (methods.md §6 F3)."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from comfyui_video_edit.nodes.method_rave import VE_InjectRAVE
from comfyui_video_edit.pipelines_core.methods.rave import (
    RAVEParams, ShuffledGrids, grid, grid_order, gridded_control, rave_injection, shuffle, ungrid, unshuffle,
)
from comfyui_video_edit.pipelines_core.models.controlnet import ControlStack, ControlUnit
from comfyui_video_edit.pipelines_core.models.tiny import tiny_controlnet
from comfyui_video_edit.pipelines_core.sampling.chunks import plan_chunks
from comfyui_video_edit.pipelines_core.sampling.denoiser import VideoDenoiser
from comfyui_video_edit.pipelines_core.sampling.hooks import StepState
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

STEPS = 3
WIDTH = 8  # text width of the per-pixel test models


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def settings(**kw) -> SamplerSettings:
    base = dict(prompt="an oil painting of a dragon", steps=STEPS, cfg=5.0, strength=1.0, attention="none", seed=3)
    return SamplerSettings(**{**base, **kw})


# --- F3: the grid and the shuffle -------------------------------------------------------------------------

@pytest.mark.parametrize("frames, n", [(9, 3), (8, 2), (150, 3), (150, 5)])
def test_ungrid_inverts_grid_and_cells_are_frames_row_major(frames, n):
    slots = -(-frames // (n * n)) * n * n
    x = rand(slots, 4, 3, 5)
    grids = grid(x, n)
    assert grids.shape == (slots // (n * n), 4, 3 * n, 5 * n)
    assert torch.equal(ungrid(grids, n), x)
    g, r, s = grids.shape[0] - 1, n - 1, 1  # cell (r, s) of grid g holds frame g*n*n + r*n + s
    assert torch.equal(grids[g, :, r * 3:(r + 1) * 3, s * 5:(s + 1) * 5], x[g * n * n + r * n + s])


@pytest.mark.parametrize("frames, n", [(8, 3), (9, 3), (150, 3), (1, 3), (150, 4)])
def test_shuffle_then_unshuffle_is_identity_and_padding_repeats_frames(frames, n):
    order = grid_order(frames, n, torch.Generator().manual_seed(1))
    assert len(order) % (n * n) == 0 and len(order) - frames < n * n  # the fewest grids that hold every frame
    assert sorted(order[:frames].tolist()) == list(range(frames))  # every frame once, in the first F slots
    assert torch.equal(order[frames:], order[torch.arange(frames, len(order)) % frames])  # padding: repeats
    x = rand(frames, 4, 2, 3, seed=2)
    slots = shuffle(x, order)
    assert torch.equal(slots[frames:], x[order[frames:]])  # padded cells carry copies of real frames
    assert torch.equal(unshuffle(slots, order, frames), x)
    # the padded cells are cropped off: whatever they end up holding never reaches a frame
    spoiled = slots.clone()
    spoiled[frames:] = 1e6
    assert torch.equal(unshuffle(spoiled, order, frames), x)


def test_orders_are_fresh_each_step_and_reproducible_by_seed():
    first, again = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    steps = [grid_order(150, 3, first) for _ in range(3)]
    assert all(torch.equal(a, grid_order(150, 3, again)) for a in steps)
    assert not torch.equal(steps[0], steps[1])
    assert torch.equal(grid_order(10, 3), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7]))


# --- F3: a per-pixel denoiser is indifferent to the shuffle ---------------------------------------------------

class PixelUNet(torch.nn.Module):
    """A UNet stand-in that treats every latent pixel alone: a 1x1 conv, a text term (so CFG matters) and the
    ControlNet's mid residual added where it lands. `kernel` 3 makes it spatial (a control for the test)."""

    def __init__(self, kernel: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, kernel, padding=kernel // 2)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t, encoder_hidden_states, cross_attention_kwargs=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None):
        out = self.conv(x) + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if mid_block_additional_residual is not None:
            out = out + mid_block_additional_residual
        return SimpleNamespace(sample=out)


class PixelControlNet(torch.nn.Module):
    """A ControlNet stand-in whose residual at a latent pixel is the mean of the 8x8 hint pixels over it."""

    config = SimpleNamespace(cross_attention_dim=WIDTH, global_pool_conditions=False)

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(3.0))

    device, dtype = torch.device("cpu"), torch.float32

    def forward(self, x, t, encoder_hidden_states, controlnet_cond, conditioning_scale, guess_mode, return_dict,
                cross_attention_kwargs=None):
        mid = conditioning_scale * self.scale * F.avg_pool2d(controlnet_cond, 8).mean(1, keepdim=True).expand_as(x)
        return [mid], mid


def pixel_denoiser(frames: int, kernel: int = 1, control=None) -> VideoDenoiser:
    return VideoDenoiser(PixelUNet(kernel), rand(1, 77, WIDTH, seed=4), rand(1, 77, WIDTH, seed=5), 4.0,
                         plan_chunks(frames, 8, "none"), control)


def step(latents) -> StepState:
    return StepState(0, torch.tensor(500), STEPS, latents, t=500)


@pytest.mark.parametrize("frames", [8, 150])
def test_a_per_pixel_denoiser_gives_the_same_result_shuffled_or_not(frames):
    latents = rand(frames, 4, 3, 2, seed=6)
    denoiser = pixel_denoiser(frames)
    shuffled = ShuffledGrids(denoiser, 3, torch.Generator().manual_seed(8), 2, "none")
    assert torch.allclose(shuffled(latents, step(latents)), denoiser(latents, step(latents)), atol=1e-5)
    # control: a 3x3 kernel reads neighbouring cells, i.e. other frames of the grid, so there it differs
    spatial = pixel_denoiser(frames, kernel=3)
    mixed = ShuffledGrids(spatial, 3, torch.Generator().manual_seed(8), 2, "none")
    assert (mixed(latents, step(latents)) - spatial(latents, step(latents))).abs().max() > 1e-2


@pytest.mark.parametrize("frames", [8, 150])
def test_controlnet_hints_are_gridded_with_the_latents_permutation(frames):
    """Per-pixel UNet + per-pixel ControlNet: shuffled == unshuffled only if every latent cell meets its own
    frame's hint, at every step's fresh permutation."""
    latents = rand(frames, 4, 3, 2, seed=9)
    hints = torch.rand(frames, 3, 24, 16, generator=torch.Generator().manual_seed(10))  # 8x the latents
    control = ControlStack().add(ControlUnit(PixelControlNet(), hints))
    denoiser = pixel_denoiser(frames, control=control)
    shuffled = ShuffledGrids(denoiser, 3, torch.Generator().manual_seed(11), 1, "none")
    for _ in range(3):
        assert torch.allclose(shuffled(latents, step(latents)), denoiser(latents, step(latents)), atol=1e-5)
    uncontrolled = pixel_denoiser(frames)
    assert (uncontrolled(latents, step(latents)) - denoiser(latents, step(latents))).abs().max() > 1e-2


def test_gridded_hints_hold_the_frames_of_the_latent_grid():
    order = grid_order(8, 3, torch.Generator().manual_seed(12))
    latents = rand(8, 3, 2, 3, seed=13)
    hints = F.interpolate(latents, scale_factor=8, mode="nearest")  # each hint = its frame's latent, upsampled
    gridded = gridded_control(ControlStack().add(ControlUnit(PixelControlNet(), hints)), order, 3)
    assert torch.allclose(F.avg_pool2d(gridded.units[0].hints, 8), grid(shuffle(latents, order), 3), atol=1e-6)


# --- the sampler ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inversion(tiny_model):
    frames = torch.rand(12, 16, 24, 3, generator=torch.Generator().manual_seed(5))
    return invert_video(tiny_model, frames, prompt="", steps=STEPS)


def test_grid_of_one_is_the_plain_sampler_and_a_3x3_grid_changes_the_edit(tiny_model, inversion):
    plain = edit_video(tiny_model, settings(), inversion=inversion)
    one = edit_video(tiny_model, settings(), injection=rave_injection(inversion, RAVEParams(grid=1)))
    rave = edit_video(tiny_model, settings(), injection=rave_injection(inversion))
    assert torch.allclose(one, plain, atol=1e-5)  # shuffling single frames and back changes nothing
    assert (rave - plain).abs().mean() > 0.05


def test_a_seed_gives_the_same_edit_and_acts_through_the_shuffle_only(tiny_model, inversion):
    run = lambda seed, shuffled=True: edit_video(tiny_model, settings(seed=seed),
                                                  injection=rave_injection(inversion, RAVEParams(3, shuffled)))
    assert torch.equal(run(3), run(3))
    assert (run(3) - run(4)).abs().mean() > 0.05  # the inversion start is deterministic: only the order differs
    assert torch.equal(run(3, shuffled=False), run(4, shuffled=False))


def test_shuffling_spreads_information_across_the_clip_fixed_grids_do_not(tiny_model, inversion):
    """2x2 grids over 12 frames: fixed grids are [0-3], [4-7], [8-11], so frame 11 never reaches frame 0;
    reshuffled every step, it does."""
    x_T = int(inversion.timesteps[0])
    latents = dict(inversion.latents)
    latents[x_T] = latents[x_T].clone()
    latents[x_T][11] += rand(*latents[x_T][11].shape, seed=14)
    perturbed = replace(inversion, latents=latents)
    for shuffled, moved in ((False, False), (True, True)):
        params = RAVEParams(2, shuffled)
        base = edit_video(tiny_model, settings(), injection=rave_injection(inversion, params))
        changed = edit_video(tiny_model, settings(), injection=rave_injection(perturbed, params))
        assert ((changed[0] - base[0]).abs().max() > 1e-3) == moved
        assert (changed[11] - base[11]).abs().max() > 1e-2


def test_controlnet_steers_the_grids_and_grid_of_one_equals_the_plain_controlled_sampler(tiny_model, inversion):
    hints = torch.rand(12, 3, 16, 24, generator=torch.Generator().manual_seed(15))
    control = ControlStack().add(ControlUnit(tiny_controlnet(tiny_model.unet), hints))
    plain = edit_video(tiny_model, settings(), inversion=inversion, control=control)
    one = edit_video(tiny_model, settings(), control=control, injection=rave_injection(inversion, RAVEParams(1)))
    assert torch.allclose(one, plain, atol=1e-5)
    rave = edit_video(tiny_model, settings(), injection=rave_injection(inversion))
    steered = edit_video(tiny_model, settings(), control=control, injection=rave_injection(inversion))
    assert (steered - rave).abs().mean() > 0.05


def test_150_frames_of_8x8_pixels_edit_in_grids(tiny_model):
    images = torch.rand(150, 8, 8, 3, generator=torch.Generator().manual_seed(16))
    quick = settings(steps=2, cfg=1.0, strength=0.5, chunk_size=72)  # 8 grids (72 frames' worth) per UNet call
    rave = edit_video(tiny_model, quick, images=images, injection=rave_injection())
    assert rave.shape == (150, 4, 1, 1) and torch.isfinite(rave).all()
    assert torch.equal(rave, edit_video(tiny_model, quick, images=images, injection=rave_injection()))
    plain = edit_video(tiny_model, quick, images=images)
    assert (rave - plain).abs().mean() > 1e-3


# --- the node ---------------------------------------------------------------------------------------------------

def test_the_node_builds_the_papers_injection_and_refuses_a_bad_grid(inversion):
    defaults = {k: v[1]["default"] for k, v in VE_InjectRAVE.INPUT_TYPES()["required"].items()}
    injection, = VE_InjectRAVE().build(**defaults, inversion=inversion)
    assert injection.params == RAVEParams() and injection.inversion is inversion
    assert VE_InjectRAVE().build(**defaults)[0].inversion is None
    with pytest.raises(ValueError, match="grid_size"):
        VE_InjectRAVE().build(grid_size=0, shuffle=True)
