"""The recipe benchmark's setup (benchmarks/bench_recipes.py): its bare baseline is diffusers' DEFAULT attention
(SDPA, `AttnProcessor2_0`), not the classic explicit-softmax `AttnProcessor` that `set_default_attn_processor()`
installs, and its FLOP counting sees the work a recipe call adds. No timing is asserted."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_recipes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_recipes", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def unet():
    from comfyui_video_edit.pipelines_core.models.tiny import tiny_components

    return tiny_components()["unet"]


def test_bare_baseline_is_diffusers_default_sdpa(bench, unet):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from comfyui_video_edit.pipelines_core.attention.processor import VideoAttnProcessor

    unet.set_attn_processor(VideoAttnProcessor())  # what a recipe leaves installed, say
    bench.set_bare_baseline(unet)
    processors = unet.attn_processors
    assert processors, "the tiny UNet has attention layers"
    assert all(type(p) is AttnProcessor2_0 for p in processors.values()), {type(p) for p in processors.values()}
    assert not any(type(p) is AttnProcessor for p in processors.values())
    # the same processor type a freshly built diffusers UNet has
    from comfyui_video_edit.pipelines_core.models.tiny import tiny_components

    fresh = tiny_components()["unet"].attn_processors
    assert {k: type(v) for k, v in fresh.items()} == {k: type(v) for k, v in processors.items()}


def test_bare_rows_drop_only_a_live_source_chunk(bench):
    from comfyui_video_edit.pipelines_core.attention.processor import FrameLayout

    assert bench.bare_rows(12, FrameLayout(4, roles=("source", "uncond", "cond"))) == 8
    assert bench.bare_rows(8, FrameLayout(4, roles=("uncond", "cond"))) == 8
    assert bench.bare_rows(4, None) == 4


def test_flop_counting_sees_the_source_chunk(bench, unet):
    from comfyui_video_edit.pipelines_core.attention.processor import FrameLayout

    bench.set_bare_baseline(unet)
    frames, cross = 2, unet.config.cross_attention_dim
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else 8
    size = min(size, 16)

    def call(chunks):
        x = torch.randn(chunks * frames, unet.config.in_channels, size, size)
        ctx = torch.randn(chunks * frames, 77, cross)
        with torch.inference_mode():
            return bench.count_flops(unet, x, torch.tensor(500), encoder_hidden_states=ctx)[0]

    bare = call(2)  # [uncond, cond] x frames
    assert bare > 0
    recipe = call(3)  # [source, uncond, cond] x frames, as FateZero's live source branch runs
    assert recipe > bare
    layout = FrameLayout(frames, roles=("source", "uncond", "cond"))
    assert bench.bare_rows(3 * frames, layout) == 2 * frames


def test_cpu_sdpa_attention_is_counted(bench):
    """torch's FlopCounterMode has no formula for the CPU SDPA kernel; the benchmark adds one, so SDPA and the
    explicit softmax path count the same attention work."""
    import torch.nn.functional as F

    q = torch.randn(1, 2, 16, 8)
    fused = bench.count_flops(F.scaled_dot_product_attention, q, q, q)[0]
    explicit = bench.count_flops(lambda: (q @ q.transpose(-1, -2)).softmax(-1) @ q)[0]
    assert fused == explicit > 0
