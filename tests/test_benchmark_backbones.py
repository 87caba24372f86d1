"""The benchmark's real-size random models (builtin:sdxl-random, builtin:flux-random) are the published
architectures' sizes, and the recipe benchmark replays SDXL's and Flux's network calls with what they read besides
latent, timestep and text. Built on the meta device: no memory, no arithmetic. No timing is asserted."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_recipes.py"


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_random_is_sdxl_base_sized():
    from comfyui_video_edit.pipelines_core.models.tiny import sdxl_random_components

    with torch.device("meta"):
        parts = sdxl_random_components()
    assert parameters(parts["unet"]) == pytest.approx(2.567e9, rel=0.01)
    assert parameters(parts["text_encoder_2"]) == pytest.approx(0.695e9, rel=0.01)
    assert parts["unet"].config.addition_embed_type == "text_time"


def test_flux_random_is_flux_dev_sized():
    from comfyui_video_edit.pipelines_core.models.tiny import flux_random_components

    with torch.device("meta"):
        parts = flux_random_components()
    assert parameters(parts["unet"]) == pytest.approx(11.9e9, rel=0.01)
    assert parts["unet"].config.guidance_embeds and parts["vae"].config.latent_channels == 16


@pytest.mark.parametrize("name", ["builtin:tiny-sdxl", "builtin:tiny-flux"])
def test_replays_give_the_network_what_it_reads(name):
    """The bare replay's inputs run the network (a missing pooled embedding or size ids would raise)."""
    spec = importlib.util.spec_from_file_location("bench_recipes", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from comfyui_video_edit.pipelines_core.models.model import load_model

    net = load_model(name, device="cpu").unet
    bench.set_bare_baseline(net)
    channels = 16 if "flux" in name else 4
    width = net.config.cross_attention_dim if "sdxl" in name else net.config.joint_attention_dim
    inputs = bench.unet_inputs((2, channels, 8, 8), (2, 77, width), torch.float32, "cpu")
    with torch.no_grad():
        out = net(*inputs, **bench.added_inputs(net, 2, torch.float32, "cpu")).sample
    assert out.shape == (2, channels, 8, 8)
