"""Chunks batched into one UNet call compute what one call per chunk computes, and the sampler batches only
where the counted memory allows (budget.py)."""

from contextlib import ExitStack

import pytest
import torch

from comfyui_video_edit.pipelines_core.attention import VideoAttnProcessor, attention_processors, get_rule
from comfyui_video_edit.pipelines_core.attention.processor import AttnEdit, FrameLayout
from comfyui_video_edit.pipelines_core.attention.rules import placed_index
from comfyui_video_edit.pipelines_core.models.controlnet import ControlStack, ControlUnit
from comfyui_video_edit.pipelines_core.models.model import encode_prompt
from comfyui_video_edit.pipelines_core.sampling.budget import BATCH_FRAMES, chunk_batch, unet_call_bytes
from comfyui_video_edit.pipelines_core.sampling.chunks import Chunk, batched, plan_chunks
from comfyui_video_edit.pipelines_core.sampling.denoiser import SourceBranch, VideoDenoiser
from comfyui_video_edit.pipelines_core.sampling.hooks import StepState
from comfyui_video_edit.pipelines_core.sampling.injection import InjectionPlan
from comfyui_video_edit.pipelines_core.sampling.sampler import chunks_per_call, processors
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

from test_control import tiny_controlnet

FRAMES, SIZE = 9, (32, 24)


# --- which chunks share a call -----------------------------------------------------------------------------

def chunk(*frames, context=0):
    return Chunk(tuple(frames), tuple(range(context, len(frames))))


def test_batched_groups_consecutive_chunks_of_equal_size_in_order():
    a, b, c, d = chunk(0, 1), chunk(0, 2, 3, context=1), chunk(0, 4, 5, context=1), chunk(0, 6, context=1)
    assert batched([a, b, c, d], 1) == [(a,), (b,), (c,), (d,)]
    assert batched([a, b, c, d], 8) == [(a,), (b, c), (d,)]  # sizes 2, 3, 3, 2: only b and c match
    chunks = plan_chunks(20, 4, "first+previous")
    assert [len(call) for call in batched(chunks, 2)] == [1, 2, 2]  # the first chunk has no context
    assert sum(batched(chunks, 3), ()) == tuple(chunks)
    with pytest.raises(ValueError, match="at least 1"):
        batched(chunks, 0)


def test_layout_groups_must_split_the_frames():
    assert FrameLayout(12, groups=3).group_frames == 4
    with pytest.raises(ValueError, match="equal groups"):
        FrameLayout(10, groups=3)


# --- batched == one call per chunk -------------------------------------------------------------------------

def denoiser_eps(model, rule: str, batch: int, cfg=5.0, chunk_size=2, overlap=0, control=None, source=False):
    """Guided eps of one step for all frames, with the rule's processors attached, `batch` chunks per call."""
    settings = SamplerSettings("a fox", "blurry", attention=rule, cfg=cfg, chunk_size=chunk_size,
                               chunk_overlap=overlap)
    latents = torch.randn(FRAMES, 4, SIZE[0] // 8, SIZE[1] // 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(601)
    branch = None
    if source:
        branch = SourceBranch({601: torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))},
                              encode_prompt(model, "a photo"))
    chunks = plan_chunks(FRAMES, chunk_size, rule, overlap)
    denoiser = VideoDenoiser(model.unet, encode_prompt(model, "a fox"), encode_prompt(model, "blurry"), cfg, chunks,
                             control, branch, batch)
    calls = []
    unet_processor, controlnet_processor = processors(settings, InjectionPlan())
    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(attention_processors(model.unet, unet_processor))
        for module in control.attention_modules() if control is not None else ():
            stack.enter_context(attention_processors(module, controlnet_processor))
        handle = model.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        try:
            eps = denoiser(latents, StepState(0, t, 1, latents, t=601))
        finally:
            handle.remove()
    return eps, calls


@pytest.mark.parametrize("rule", ["none", "first", "previous", "first+previous", "all"])
def test_batched_chunks_equal_sequential_chunks(tiny_model, rule):
    sequential, one_each = denoiser_eps(tiny_model, rule, batch=1)
    together, fewer = denoiser_eps(tiny_model, rule, batch=4)
    assert len(fewer) < len(one_each) and sum(fewer) == sum(one_each)  # the batched path ran: same rows, fewer calls
    assert (together - sequential).abs().max() <= 1e-5


@pytest.mark.parametrize("rule", ["first", "all"])
def test_processor_gathers_within_each_group(rule):
    """Two chunks side by side in one call (groups=2) give each chunk's own call's output; read as one group the
    rule would reach into the other chunk (the result the groups are there to prevent)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    attn.set_processor(VideoAttnProcessor(get_rule(rule)))
    x = torch.randn(2 * 2 * 3, 5, 16)  # roles (uncond, cond) x 2 chunks x 3 frames
    rows = x.view(2, 2, 3, 5, 16)
    with torch.no_grad():
        together = attn(x, layout=FrameLayout(6, roles=("uncond", "cond"), groups=2)).view(2, 2, 3, 5, 16)
        blind = attn(x, layout=FrameLayout(6, roles=("uncond", "cond"))).view(2, 2, 3, 5, 16)
        for g in range(2):
            alone = attn(rows[:, g].reshape(6, 5, 16), layout=FrameLayout(3, roles=("uncond", "cond")))
            assert torch.allclose(together[:, g], alone.view(2, 3, 5, 16), atol=1e-6)
    assert (blind[:, 1] - together[:, 1]).abs().max() > 1e-3


def test_batched_chunks_with_overlap_controlnet_and_source_equal_sequential(tiny_model):
    hints = torch.rand(FRAMES, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    control = ControlStack().add(ControlUnit(tiny_controlnet(tiny_model.unet), hints))
    for kwargs in (dict(overlap=1, chunk_size=3), dict(control=control), dict(source=True), dict(cfg=1.0)):
        sequential, _ = denoiser_eps(tiny_model, "first+previous", batch=1, **kwargs)
        together, calls = denoiser_eps(tiny_model, "first+previous", batch=4, **kwargs)
        assert (together - sequential).abs().max() <= 1e-5, kwargs


# --- how many chunks a call may hold -------------------------------------------------------------------------

def test_chunk_batch_follows_the_budget_and_the_frame_cap():
    assert chunk_batch(100, 10, None, 2) == 1  # memory unknown: one chunk per call
    assert chunk_batch(100, 10, 1000, 2) == 5  # half of 1000 bytes holds 5 chunks of 100
    assert chunk_batch(100, 10, 150, 2) == 1  # not even one fits: still one (the chunk itself was allowed)
    assert chunk_batch(1, 100, 10**9, 4) == BATCH_FRAMES // 4  # plenty of memory: the frame cap holds
    assert chunk_batch(1, 3, 10**9, 2) == 3  # never more than there are chunks


def test_counted_activations_grow_with_the_rows_and_leave_no_fake_index_behind(tiny_model):
    unet = tiny_model.unet
    rules = {name: get_rule("first+previous" if ".attn1." in name else "none") for name in unet.attn_processors}
    two = unet_call_bytes(unet, FrameLayout(2, (), ("uncond", "cond")), (4, 4), rules)
    eight = unet_call_bytes(unet, FrameLayout(8, (), ("uncond", "cond")), (4, 4), rules)
    assert two > 0 and 3.5 < eight / two < 4.5  # activations are per row
    all_rules = {name: get_rule("all") if ".attn1." in name else get_rule("none") for name in unet.attn_processors}
    assert unet_call_bytes(unet, FrameLayout(8, (), ("uncond", "cond")), (4, 4), all_rules) > eight  # k = 8 frames
    index = placed_index(get_rule("first"), 8, torch.device("cpu"))
    assert type(index) is torch.Tensor and index.sum().item() == 0  # a real table, usable after the count


def test_sampler_batches_only_calls_no_edit_reads(tiny_model):
    settings = SamplerSettings("a fox", attention="first+previous", chunk_size=2)
    chunks = plan_chunks(FRAMES, 2, "first+previous")
    unet_processor, _ = processors(settings, InjectionPlan())
    assert chunks_per_call(tiny_model, chunks, unet_processor, 2, SIZE) > 1
    assert chunks_per_call(tiny_model, chunks[:1], unet_processor, 2, SIZE) == 1
    edited, _ = processors(settings, InjectionPlan(edits_for=lambda name: (AttnEdit(),)))
    assert chunks_per_call(tiny_model, chunks, edited, 2, SIZE) == 1
