"""The sampler started from a DDIM inversion, with and without a live source branch."""

import pytest
import torch

from comfyui_video_edit.pipelines_core.sampling.injection import Injection, InjectionPlan
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

SOURCE = "a photo of a street"


@pytest.fixture(scope="module")
def inversion(tiny_model):
    frames = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    return invert_video(tiny_model, frames, prompt=SOURCE, steps=5)


def settings(**kw):
    base = dict(prompt=SOURCE, steps=5, cfg=1.0, strength=1.0, attention="none")
    return SamplerSettings(**{**base, **kw})


def test_starts_from_the_latent_at_the_chosen_timestep(tiny_model, inversion):
    seen = []
    edit_video(tiny_model, settings(strength=0.6), inversion=inversion,
               progress=lambda d, t: seen.append(t))
    assert seen[-1] == 3  # int(5 * 0.6) steps re-run


def test_source_prompt_sampling_returns_near_the_source(tiny_model, inversion):
    """Invert then sample back with the source prompt: close to the encoded frames (A2 on the real loop)."""
    out = edit_video(tiny_model, settings(), inversion=inversion)
    x0 = inversion.latents[0]
    other = edit_video(tiny_model, settings(prompt="an oil painting of a dragon"), inversion=inversion)
    assert (out - x0).pow(2).mean() < (other - x0).pow(2).mean()


def test_a_source_branch_alone_changes_nothing(tiny_model, inversion):
    """The live source chunk is computed beside uncond/cond; without edits it must not leak into them (B5)."""
    plain = edit_video(tiny_model, settings(prompt="a snowy street", cfg=5.0), inversion=inversion)
    with_source = Injection("none", inversion, None, lambda inj, ctx: InjectionPlan(source_branch=True))
    branched = edit_video(tiny_model, settings(prompt="a snowy street", cfg=5.0), injection=with_source)
    assert (plain - branched).abs().max() <= 1e-4  # batch-size rounding only (CFG 5 amplifies it)


def test_inversion_needs_matching_steps_and_ddim(tiny_model, inversion):
    with pytest.raises(ValueError, match="steps to DDIM Invert's"):
        edit_video(tiny_model, settings(steps=7), inversion=inversion)
    with pytest.raises(ValueError, match="'ddim' scheduler"):
        edit_video(tiny_model, settings(scheduler="euler"), inversion=inversion)
