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


@pytest.fixture(scope="module")
def accounting():
    spec = importlib.util.spec_from_file_location("memory_accounting", BENCH.with_name("memory_accounting.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rule_name, explicit", [("none", False), ("first+previous", False), ("all", False),
                                                 ("none", True), ("first+previous", True), ("all", True)])
def test_attention_layer_count_is_its_queries_gathered_keys_values_and_probabilities(accounting, rule_name,
                                                                                     explicit):
    """The memory table's 'attn layer' column counts one attention layer's forward on fake tensors. Its peak is
    the sum of the terms it holds at once: Q, the K and V gathered for the rule's k frames (the rule's index
    table with them) and then either SDPA's output and the output projection, or on the explicit path the
    scores and probabilities (rows x heads x queries x k*tokens keys, two such tensors at once)."""
    from diffusers.models.attention_processor import Attention

    from comfyui_video_edit.pipelines_core.attention.processor import FrameLayout
    from comfyui_video_edit.pipelines_core.attention.rules import get_rule, own_frame
    from comfyui_video_edit.pipelines_core.sampling.budget import fake_tensors

    frames, roles, tokens, heads, head_dim, itemsize = 4, ("uncond", "cond"), 16, 2, 8, 4
    rows, channels, rule = len(roles) * frames, heads * head_dim, get_rule(rule_name)
    with fake_tensors():
        attn = Attention(channels, heads=heads, dim_head=head_dim).eval()
        counted = accounting.attention_layer_bytes(attn, rows, tokens, FrameLayout(frames, (), roles), rule,
                                                   explicit, torch.float32)
    k = rule(frames).shape[1]
    unit = rows * tokens * channels * itemsize  # one (rows, tokens, channels) tensor: Q, an output
    probs = rows * heads * tokens * k * tokens * itemsize
    index = 0 if rule is own_frame else frames * k * 8  # own-frame attention gathers nothing
    if explicit:  # scores and probabilities at the softmax; then probabilities, P @ V and its projection
        expected = (1 + 2 * k) * unit + max(2 * probs, probs + 2 * unit)
    else:  # SDPA keeps no probabilities: its output and the projection of it
        expected = (1 + 2 * k) * unit + 2 * unit
    assert counted == expected + index


def test_the_largest_attention_layer_of_an_sd15_call(accounting):
    """Over SD-1.5's layers at 512x512, the largest is the finest self-attention (4096 tokens, 320 channels)
    when no layer reads probabilities, and a 1024-token layer once an edit reads its probabilities there."""
    from comfyui_video_edit.pipelines_core.attention.processor import FrameLayout
    from comfyui_video_edit.pipelines_core.attention.rules import first_and_previous, own_frame
    from comfyui_video_edit.pipelines_core.sampling.budget import fake_tensors

    layout, rows, mib = FrameLayout(8, (), ("uncond", "cond")), 16, 2 ** 20
    with fake_tensors():
        unet = accounting.sd15("unet", torch.float16)
        names = list(unet.attn_processors)
        rules = {n: first_and_previous if ".attn1." in n else own_frame for n in names}
        fused = accounting.largest_attention_layer(unet, layout, (64, 64), rules, frozenset(), torch.float16, {})
        read = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
        explicit = accounting.largest_attention_layer(unet, layout, (64, 64), rules, frozenset({read}),
                                                      torch.float16, {})
    index = 8 * 2 * 8
    assert fused == ((3 + 2 * 2) * rows * 4096 * 320 * 2 + index, "down_blocks.0 attn1, 4096 tokens")
    assert fused[0] == 280 * mib + index
    probs = rows * 8 * 1024 * 2 * 1024 * 2  # 8 heads, 1024 queries, keys of 2 frames, fp16
    assert explicit == ((1 + 2 * 2) * rows * 1024 * 640 * 2 + 2 * probs + index, "down_blocks.1 attn1, 1024 tokens")
