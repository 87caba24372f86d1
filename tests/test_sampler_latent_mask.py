"""The Cross-Frame Sampler's LATENT start and MASK-limited edit (pipelines_core/masking.py).

The mask is checked against diffusers' StableDiffusionInpaintPipeline run with the tiny 4-channel UNet (its
latent blend after every step is the mechanism), then by its invariants: the kept region ends exactly on the
source, is on the source's noise level at every step, survives chunking, and a mask of ones changes nothing.
"""

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

from comfyui_video_edit.pipelines_core.models.backbone import SD
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS
from comfyui_video_edit.pipelines_core.sampling.hooks import Hooks
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.masking import mask_on_latent_grid
from comfyui_video_edit.pipelines_core.models.model import encode_frames, frames_to_pixels
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.sampling.starts import frame_generators, img2img_timesteps
from comfyui_video_edit.pipelines_core.sampling.schedulers import SCHEDULERS, make_scheduler

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


def block_mask(frames: int, cells: int = 8, seed: int = 5) -> torch.Tensor:
    """A random 0/1 mask that is constant on every 8x8 pixel block, so it means the same latent cells to
    diffusers (binarise, nearest resize) and to the sampler (bilinear resize, ComfyUI's): (F, 8*cells, 8*cells)."""
    on_grid = (torch.rand(frames, cells, cells, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
    on_grid[:, 0, 0], on_grid[:, -1, -1] = 1.0, 0.0  # every frame has both an edited and a kept cell
    return on_grid.repeat_interleave(8, 1).repeat_interleave(8, 2)


def latent_keep(mask: torch.Tensor) -> torch.Tensor:
    """Where a block mask keeps the source, on the latent grid, broadcast over channels: (F, 1, h, w) bool."""
    return (mask[:, ::8, ::8] == 0)[:, None]


def settings(**kw) -> SamplerSettings:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, steps=6, cfg=7.5, strength=0.7, attention="none",
                chunk_size=3)
    return SamplerSettings(**{**base, **kw})


def posterior_latent(model, frames: torch.Tensor, seed: int) -> dict:
    """The UNSCALED VAE posterior sample the images path draws (frame f from generator seed + f), as a LATENT."""
    dist = model.vae.encode(frames_to_pixels(frames, model)).latent_dist
    generators = frame_generators(seed, frames.shape[0])
    samples = [dist.mean[f:f + 1] + dist.std[f:f + 1] * randn_tensor(dist.mean[f:f + 1].shape, generator=generators[f])
               for f in range(frames.shape[0])]
    return {"samples": torch.cat(samples)}


# --- (a) the oracle --------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", list(SD.schedulers))  # the noise-predicting models' schedulers
def test_masked_sdedit_equals_diffusers_inpaint_pipeline(tiny_model, clip_frames, scheduler):
    """Attention none: frame f equals StableDiffusionInpaintPipeline (4-channel UNet) on that frame, seed + f."""
    mask = block_mask(3)
    s = settings(scheduler=scheduler)
    ours = edit_video(tiny_model, s, clip_frames, mask=mask)
    plain = edit_video(tiny_model, s, clip_frames)
    pipe = StableDiffusionInpaintPipeline(
        unet=tiny_model.unet, vae=tiny_model.vae, text_encoder=tiny_model.text_encoder, tokenizer=tiny_model.tokenizer,
        scheduler=make_scheduler(scheduler, tiny_model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for f in range(3):
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=clip_frames[f:f + 1].permute(0, 3, 1, 2),
                   mask_image=mask[f:f + 1], height=64, width=64, strength=0.7, num_inference_steps=6,
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(11 + f), output_type="latent").images
        assert (ref[0] - ours[f]).abs().max() <= 1e-4  # measured <= 1.8e-5 (batch-size rounding)
        assert (ref[0] - plain[f]).abs().max() > 1.0  # without the mask it is another result altogether


# --- (b) the kept region -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", list(SD.schedulers))  # the noise-predicting models' schedulers
def test_outside_the_mask_ends_exactly_on_the_source(tiny_model, clip_frames, scheduler):
    mask = block_mask(3)
    s = settings(scheduler=scheduler)
    out = edit_video(tiny_model, s, clip_frames, mask=mask)
    clean = encode_frames(tiny_model, clip_frames, frame_generators(s.seed, 3))  # what the run started from
    keep = latent_keep(mask).expand_as(out)
    assert torch.equal(out[keep], clean[keep])
    inside = (out - clean).abs().masked_fill(keep, 0).amax(dim=(1, 2, 3))
    assert inside.min() > 1e-1
    ones = edit_video(tiny_model, s, clip_frames, mask=torch.ones(3, 64, 64))
    assert torch.equal(ones, edit_video(tiny_model, s, clip_frames))


@pytest.mark.parametrize("scheduler", list(SD.schedulers))  # the noise-predicting models' schedulers
def test_kept_region_is_the_source_noised_to_each_steps_level(tiny_model, clip_frames, scheduler):
    """Before every step after the first, the kept cells hold clean + noise at that step's level in the
    scheduler's own convention: VP sqrt(a) x0 + sqrt(1 - a) n (DDIM, DPM++), VE x0 + sigma n (Euler)."""
    s = settings(scheduler=scheduler, noise="shared")
    latent = posterior_latent(tiny_model, clip_frames, s.seed)
    mask = block_mask(3)
    seen = []
    edit_video(tiny_model, s, latent=latent, mask=mask,
               hooks=Hooks(before_model=[lambda st: seen.append(st.latents.clone()) or st.latents]))
    clean = latent["samples"] * tiny_model.vae_scale
    noise = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(s.seed))  # shared noise
    table = make_scheduler(scheduler, tiny_model.scheduler_config)
    table.set_timesteps(s.steps)
    timesteps = img2img_timesteps(table, s.steps, s.strength)
    first = s.steps - len(timesteps)
    keep = latent_keep(mask).expand_as(clean)
    for i in range(1, len(timesteps)):
        if SCHEDULERS[scheduler].space == "ve":
            expected = clean + table.sigmas[first + i] * noise
        else:
            a = table.alphas_cumprod[int(timesteps[i])]
            expected = a.sqrt() * clean + (1 - a).sqrt() * noise
        assert (seen[i] - expected)[keep].abs().max() <= 1e-5  # measured <= 1.2e-7
        assert (seen[i] - expected)[~keep].abs().max() > 1e-2  # the edited cells go their own way


def test_inversion_start_keeps_the_inverted_latents(tiny_model):
    frames = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    inversion = invert_video(tiny_model, frames, prompt="a photo of a street", steps=5)
    mask = block_mask(2, cells=4)
    s = settings(steps=5, strength=1.0, cfg=5.0, prompt="an oil painting")
    seen = []
    out = edit_video(tiny_model, s, inversion=inversion, mask=mask,
                     hooks=Hooks(before_model=[lambda st: seen.append((int(st.timestep), st.latents.clone()))
                                               or st.latents]))
    keep = latent_keep(mask).expand_as(out)
    assert torch.equal(out[keep], inversion.latents[0][keep])
    for t, latents in seen:  # every step starts, in the kept cells, on the inversion's own latent
        assert torch.equal(latents[keep], inversion.latents[t][keep])
    assert (out - inversion.latents[0]).abs().masked_fill(keep, 0).max() > 1e-1


def test_the_blend_runs_after_every_other_after_step_hook(tiny_model, clip_frames):
    mask = block_mask(3)
    zero = Hooks(after_step=[lambda st: torch.zeros_like(st.latents)])
    out = edit_video(tiny_model, settings(), clip_frames, mask=mask, hooks=zero)
    keep = latent_keep(mask).expand_as(out)
    clean = encode_frames(tiny_model, clip_frames, frame_generators(11, 3))
    assert torch.equal(out[keep], clean[keep]) and out[~keep].abs().max() == 0


def test_mask_sizes_and_layouts_mean_the_same_cells(tiny_model, clip_frames):
    """A pixel-size mask, the same on the latent grid, a LATENT noise_mask (F, 1, H, W), and one (H, W) mask for
    all frames; other sizes are resized bilinearly (ComfyUI's noise-mask resize)."""
    pixel = block_mask(3)
    grid = pixel[:, ::8, ::8]
    assert torch.equal(mask_on_latent_grid(pixel, 3, (8, 8)), mask_on_latent_grid(grid, 3, (8, 8)))
    assert torch.equal(mask_on_latent_grid(pixel[:, None], 3, (8, 8)), mask_on_latent_grid(pixel, 3, (8, 8)))
    assert torch.equal(mask_on_latent_grid(pixel[0], 3, (8, 8)), mask_on_latent_grid(pixel[:1], 3, (8, 8)))
    assert mask_on_latent_grid(pixel[0], 3, (8, 8)).shape == (3, 1, 8, 8)
    half = mask_on_latent_grid(torch.tensor([[0.0, 1.0]]), 1, (2, 4))  # a 1x2 mask on a 2x4 grid
    assert torch.allclose(half[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    s = settings()
    on_pixels = edit_video(tiny_model, s, clip_frames, mask=pixel)
    assert torch.equal(on_pixels, edit_video(tiny_model, s, clip_frames, mask=grid))


def test_latent_noise_mask_limits_the_edit_and_combines_with_the_mask(tiny_model, clip_frames):
    s = settings()
    latent = posterior_latent(tiny_model, clip_frames, s.seed)
    clean = latent["samples"] * tiny_model.vae_scale
    first, second = block_mask(3, seed=5), block_mask(3, seed=6)
    out = edit_video(tiny_model, s, latent={**latent, "noise_mask": first[:, None]})
    keep = latent_keep(first).expand_as(out)
    assert torch.equal(out[keep], clean[keep]) and (out - clean)[~keep].abs().max() > 1e-1
    both = edit_video(tiny_model, s, latent={**latent, "noise_mask": first[:, None]}, mask=second)
    assert torch.equal(both, edit_video(tiny_model, s, latent=latent, mask=first * second))


# --- (c) chunks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["first", "none"])
def test_chunked_masked_edit_equals_unchunked(tiny_model, rule):
    frames = torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(9))
    mask = block_mask(5, cells=4)
    s = settings(attention=rule, strength=0.8, chunk_size=5)
    whole = edit_video(tiny_model, s, frames, mask=mask)
    chunked = edit_video(tiny_model, settings(attention=rule, strength=0.8, chunk_size=2), frames, mask=mask)
    assert (whole - chunked).abs().max() <= 1e-5  # measured 0 (first), 4.4e-6 (none): batch-size rounding
    keep = latent_keep(mask).expand_as(chunked)
    clean = encode_frames(tiny_model, frames, frame_generators(s.seed, 5))
    assert torch.equal(chunked[keep], clean[keep]) and (chunked - clean)[~keep].abs().max() > 1e-1


# --- (d) the LATENT start -------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", ["per_frame", "shared"])
def test_latent_of_the_posterior_sample_gives_the_images_result_bit_for_bit(tiny_model, clip_frames, noise):
    """The LATENT path skips the posterior draw on each frame's generator, so it draws the same noise."""
    s = settings(noise=noise, attention="first+previous", chunk_size=2)
    latent = posterior_latent(tiny_model, clip_frames, s.seed)
    assert torch.equal(edit_video(tiny_model, s, latent=latent), edit_video(tiny_model, s, clip_frames))
    mask = block_mask(3)
    masked = edit_video(tiny_model, s, latent=latent, mask=mask)
    assert torch.equal(masked, edit_video(tiny_model, s, clip_frames, mask=mask))


def test_latent_start_takes_its_frame_count_and_size_and_strength(tiny_model):
    latent = {"samples": torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(3))}
    seen = []
    out = edit_video(tiny_model, settings(steps=10, strength=0.5), latent=latent, frame_count=7, size=(512, 512),
                     progress=lambda d, t: seen.append(t))
    assert out.shape == (2, 4, 5, 6) and seen[-1] == 5


def test_node_round_trip_through_its_own_latent_output(tiny_model, clip_frames):
    """The node's LATENT output fed back with a mask of zeros (keep everything) comes back unchanged."""
    node = NODE_CLASS_MAPPINGS["VE_CrossFrameSampler"]()
    widgets = dict(prompt=PROMPT, negative_prompt="", seed=2, steps=4, cfg=3.0, scheduler="euler", strength=0.5,
                   noise="per_frame", attention="first+previous", attention_layers="all", chunk_size=8)
    frames, latent = node.sample(tiny_model, images=clip_frames, **widgets)
    again_frames, again = node.sample(tiny_model, latent=latent, mask=torch.zeros(64, 64), **widgets)
    assert (again["samples"] - latent["samples"]).abs().max() <= 1e-6  # measured 0
    assert again_frames.shape == frames.shape == clip_frames.shape


# --- (e) errors before any step ---------------------------------------------------------------------------

def bad_calls(frames, latent):
    return {
        "images and latent": (dict(images=frames, latent=latent), "images or a latent"),
        "latent and inversion": (dict(latent=latent, inversion=object()), "latent or an inversion"),
        "images and inversion": (dict(images=frames, inversion=object()), "images .SDEdit. or an inversion"),
        "mask frame count": (dict(images=frames, mask=torch.ones(2, 64, 64)), "2 frames but the clip has 3"),
        "noise_mask frame count": (dict(latent={**latent, "noise_mask": torch.ones(2, 1, 64, 64)}),
                                   "2 frames but the clip has 3"),
        "mask on noise": (dict(frame_count=3, size=(64, 64), mask=torch.ones(64, 64)), "generating from noise"),
        "mask out of range": (dict(images=frames, mask=torch.full((64, 64), 255.0)), r"0\.\.1"),
        "not a LATENT": (dict(latent=latent["samples"]), "ComfyUI LATENT"),
        "video latent": (dict(latent={"samples": torch.zeros(1, 4, 3, 8, 8)}), "frames, 4, height/8"),
    }


@pytest.mark.parametrize("case", list(bad_calls(None, {"samples": None})))
def test_bad_starts_and_masks_fail_before_any_step(tiny_model, clip_frames, case):
    latent = {"samples": torch.zeros(3, 4, 8, 8)}
    kwargs, message = bad_calls(clip_frames, latent)[case]
    calls = []
    with pytest.raises(ValueError, match=message):
        edit_video(tiny_model, settings(), progress=lambda d, t: calls.append(d), **kwargs)
    assert calls == []
