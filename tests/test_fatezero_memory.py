"""FateZero's memory at its default setting (8 frames x 512x512, 50 steps), by the code's own accounting
(methods.md §3 "Memory of stored attention", "Recommendation").

The default FateZero reads a live source branch, so DDIM Invert keeps latents only: that fits the 4 GiB
default budget. The paper-exact option ("stored" maps) does not fit, and DDIM Invert refuses it before
any step, naming the size. That the estimate equals the bytes a real recording stores is
test_store.py's `test_estimate_equals_the_recorded_bytes_exactly`; the latents' part is checked here.
"""

import dataclasses
import inspect
import re

import pytest
import torch
from test_store import fatezero_bytes, sd15_meta_unet

from comfyui_video_edit.nodes.ddim_invert import RECORD_CHOICES, VE_DDIMInvert
from comfyui_video_edit.nodes.method_fatezero import VE_InjectFateZero
from comfyui_video_edit.pipelines_core.attention.store import StoreBudgetError, estimate_bytes, gib
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video, open_store
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

GiB = 2**30
FRAMES, HEIGHT, WIDTH, STEPS = 8, 512, 512, 50  # FateZero's defaults
SPARSE_CAUSAL = "first+previous"  # FateZero's [first, previous] key frames


def node_defaults(node) -> dict:
    return {name: spec[1]["default"] for name, spec in node.INPUT_TYPES()["required"].items()
            if len(spec) > 1 and "default" in spec[1]}


def default_budget() -> int:
    return inspect.signature(invert_video).parameters["budget_bytes"].default


def latents_bytes(frames: int, height: int, width: int, steps: int, channels: int = 4, itemsize: int = 4) -> int:
    """DDIM Invert keeps x_0 and the latent at each of the `steps` timesteps: (steps + 1) x F x C x h x w."""
    return (steps + 1) * frames * channels * (height // 8) * (width // 8) * itemsize


def held_bytes(inversion) -> int:
    latents = sum(x.numel() * x.element_size() for x in inversion.latents.values())
    return latents + (inversion.store.nbytes if inversion.store is not None else 0)


@pytest.fixture(scope="module")
def small_inversion(tiny_model):
    """DDIM Invert with the node's defaults (latents only) on 3 frames of 32x40, 4 steps."""
    frames = torch.rand(3, 32, 40, 3, generator=torch.Generator().manual_seed(3))
    spec = RECORD_CHOICES[node_defaults(VE_DDIMInvert)["record"]]
    return invert_video(tiny_model, frames, "a fox", steps=4, record=spec)


def test_the_default_fatezero_is_live_on_a_latents_only_inversion(small_inversion):
    injector = node_defaults(VE_InjectFateZero)
    injection, = VE_InjectFateZero().build(inversion=small_inversion, **injector)
    assert injection.params.source == "live"
    invert = node_defaults(VE_DDIMInvert)
    assert RECORD_CHOICES[invert["record"]].is_empty and small_inversion.store is None
    assert int(invert["budget_gb"] * GiB) == default_budget() == 4 * GiB


def test_the_accounting_is_exact_on_a_real_inversion(tiny_model, small_inversion):
    spec = small_inversion.record
    estimate = estimate_bytes(spec, tiny_model.unet, 3, 32, 40, 4) + latents_bytes(3, 32, 40, 4)
    assert estimate == held_bytes(small_inversion) == 5 * 3 * 4 * 4 * 5 * 4


def test_the_default_fatezero_inversion_fits_the_default_budget():
    unet = sd15_meta_unet()
    spec = RECORD_CHOICES[node_defaults(VE_DDIMInvert)["record"]]
    stored = estimate_bytes(spec, unet, FRAMES, HEIGHT, WIDTH, STEPS, SPARSE_CAUSAL)
    total = stored + latents_bytes(FRAMES, HEIGHT, WIDTH, STEPS)
    assert stored == 0 and total == 51 * 8 * 4 * 64 * 64 * 4  # 25.5 MiB
    assert total < default_budget()


def test_the_paper_exact_stored_maps_do_not_fit_and_are_refused_with_their_size():
    """Self and cross probabilities of every layer up to 32x32 at 50 steps, under sparse-causal attention
    (the Cross-Frame Sampler's default, which stored maps must be recorded with)."""
    assert SamplerSettings(prompt="").attention == SPARSE_CAUSAL
    unet = sd15_meta_unet()
    invert = node_defaults(VE_DDIMInvert)
    spec = dataclasses.replace(RECORD_CHOICES["attention maps (FateZero)"], max_tokens=invert["max_tokens"],
                               storage=invert["storage"])
    assert spec.self_probs and spec.cross_probs and spec.max_tokens == 1024 and spec.storage == "cpu"
    needed = estimate_bytes(spec, unet, FRAMES, HEIGHT, WIDTH, STEPS, SPARSE_CAUSAL)
    assert needed == fatezero_bytes(key_frames=2) > default_budget()  # 74.5e9 B = 69.4 GiB, 17x the budget
    with pytest.raises(StoreBudgetError, match=re.escape(f"recording needs {gib(needed)} but the budget is 4.0 GiB")):
        open_store(spec, unet, FRAMES, HEIGHT, WIDTH, STEPS, SPARSE_CAUSAL, 77, default_budget())
