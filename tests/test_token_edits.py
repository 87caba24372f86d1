"""The token edit point (`AttnEdit.tokens`: merge before attention, restore after) on one diffusers Attention
layer, and TokenFlow's keyframe calls built on it without module hooks."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from comfyui_video_edit.pipelines_core.attention import AttnEdit, FrameLayout, VideoAttnProcessor, is_self_attention
from comfyui_video_edit.pipelines_core.attention.rules import all_frames, own_frame
from comfyui_video_edit.pipelines_core.methods.tokenflow import (
    KeyframeCall, KeyframeLayout, TokenFlowParams, tokenflow_injection, tokenflow_planner,
)
from comfyui_video_edit.pipelines_core.sampling.injection import Injection
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

FRAMES, TOKENS, DIM, HEADS = 4, 6, 16, 2
ROLES = ("uncond", "cond")


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=DIM, heads=HEADS, dim_head=8).eval()


def two_chunks() -> torch.Tensor:
    return torch.randn(len(ROLES) * FRAMES, TOKENS, DIM, generator=torch.Generator().manual_seed(3))


def layout() -> FrameLayout:
    return FrameLayout(FRAMES, tuple(range(FRAMES)), ROLES, 500, 0)


def run(attn, processor, x, **kw):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x, **kw)


def attention_by_hand(attn, x: torch.Tensor) -> torch.Tensor:
    """to_out(softmax(q k^T * scale) v) per head, written out from the layer's weights."""
    q, k, v = (F.linear(x, p.weight, p.bias) for p in (attn.to_q, attn.to_k, attn.to_v))
    heads = lambda t: t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)
    q, k, v = heads(q), heads(k), heads(v)
    out = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1) @ v
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)


class EveryOtherFrame(AttnEdit):
    """Toy merge: attention sees frames 0, 2, ... of every chunk; restore repeats each into the frame after it."""

    def tokens(self, call, hidden_states):
        full = call.layout
        kept = FrameLayout(full.frames // 2, full.frame_ids[::2], full.roles, full.timestep, full.step)

        def repeat_frames(out):
            return out.repeat_interleave(2, dim=0)

        return hidden_states[::2], replace(call, layout=kept), repeat_frames


class Seen(AttnEdit):
    """Records what the later points of a call see."""

    def __init__(self):
        self.calls = []

    def qkv(self, call, q, k, v):
        self.calls.append((call, q.shape, k.shape))
        return q, k, v


class Tagged(AttnEdit):
    """Keeps the tokens, logs its merge and restore, and restores with `change` (applied to the output)."""

    def __init__(self, tag, log, change):
        self.tag, self.log, self.change = tag, log, change

    def tokens(self, call, hidden_states):
        self.log.append((self.tag, "merge", hidden_states.shape[0], call.layout.frames))

        def restore(out):
            self.log.append((self.tag, "restore", out.shape[0]))
            return self.change(out)

        return hidden_states, call, restore


def test_a_toy_merge_gives_attention_over_the_kept_frames_repeated(attn):
    x = two_chunks()
    seen = Seen()
    out = run(attn, VideoAttnProcessor(own_frame, "attn1", [EveryOtherFrame(), seen]), x, layout=layout())
    expected = attention_by_hand(attn, x[::2]).repeat_interleave(2, dim=0)
    assert out.shape == x.shape
    assert (out - expected).abs().max() <= 1e-6
    assert (out - run(attn, AttnProcessor2_0(), x)).abs().max() > 1e-3  # the merge is not a no-op here
    (call, q_shape, _), = seen.calls
    assert call.layout.frames == FRAMES // 2 and call.layout.frame_ids == (0, 2)  # later points see the merge
    assert q_shape[0] == len(ROLES) * FRAMES // 2
    assert call.attn is attn  # the layer itself, for edits that read its projections


def test_the_rule_reads_the_merged_layout(attn):
    """`all` over the merged call = every kept frame attends to the kept frames of its chunk."""
    x = two_chunks()
    merged = run(attn, VideoAttnProcessor(all_frames, "attn1", [EveryOtherFrame()]), x, layout=layout())
    kept = FrameLayout(FRAMES // 2, (0, 2), ROLES, 500, 0)
    on_kept = run(attn, VideoAttnProcessor(all_frames, "attn1"), x[::2].contiguous(), layout=kept)
    assert (merged - on_kept.repeat_interleave(2, dim=0)).abs().max() <= 1e-6


def test_restores_run_in_reverse_order(attn):
    x = two_chunks()
    log = []
    edits = [EveryOtherFrame(), Tagged("double", log, lambda o: o * 2), Tagged("shift", log, lambda o: o + 1)]
    out = run(attn, VideoAttnProcessor(own_frame, "attn1", edits), x, layout=layout())
    merged_rows = len(ROLES) * FRAMES // 2
    assert log == [("double", "merge", merged_rows, FRAMES // 2), ("shift", "merge", merged_rows, FRAMES // 2),
                   ("shift", "restore", merged_rows), ("double", "restore", merged_rows)]
    plain = run(attn, VideoAttnProcessor(own_frame, "attn1"), x[::2], layout=replace(layout(), frames=FRAMES // 2))
    assert (out - ((plain + 1) * 2).repeat_interleave(2, dim=0)).abs().max() <= 1e-5


@pytest.mark.parametrize("text", [False, True])
def test_edits_without_tokens_are_bit_identical_to_diffusers(attn, text):
    x = two_chunks()
    kw = {"encoder_hidden_states": torch.randn(len(ROLES) * FRAMES, 5, DIM)} if text else {}
    seen = Seen()
    ours = run(attn, VideoAttnProcessor(own_frame, "attn1", [seen]), x, layout=layout(), **kw)
    assert seen.calls and not seen.calls[0][0].has_mask
    assert torch.equal(ours, run(attn, AttnProcessor2_0(), x, **kw))


def test_a_token_edit_that_keeps_the_tokens_changes_nothing(attn):
    x = two_chunks()
    keep = Tagged("keep", [], lambda o: o)
    ours = run(attn, VideoAttnProcessor(own_frame, "attn1", [keep]), x, layout=layout())
    assert torch.equal(ours, run(attn, AttnProcessor2_0(), x))


class Renamed(AttnEdit):
    def tokens(self, call, hidden_states):
        return hidden_states, replace(call, name="elsewhere"), None


def test_token_edits_are_refused_where_the_call_cannot_follow(attn):
    x = two_chunks()
    with pytest.raises(ValueError, match="only the call's layout"):
        run(attn, VideoAttnProcessor(own_frame, "attn1", [Renamed()]), x, layout=layout())
    text = torch.randn(len(ROLES) * FRAMES, 5, DIM)
    with pytest.raises(ValueError, match="rows of cross-attention"):
        run(attn, VideoAttnProcessor(own_frame, "attn2", [EveryOtherFrame()]), x, layout=layout(),
            encoder_hidden_states=text)
    mask = torch.zeros(len(ROLES) * FRAMES, 1, TOKENS)
    with pytest.raises(ValueError, match="attention mask"):
        run(attn, VideoAttnProcessor(own_frame, "attn1", [EveryOtherFrame()]), x, layout=layout(),
            attention_mask=mask)


# --- TokenFlow on the token edit point --------------------------------------------------------------------

STEPS = 3


@pytest.fixture(scope="module")
def moving(tiny_model):
    clip = torch.rand(3, 32, 48, 3, generator=torch.Generator().manual_seed(1))
    return invert_video(tiny_model, clip, prompt="a photo of a street", steps=STEPS)


def settings() -> SamplerSettings:
    return SamplerSettings(prompt="an oil painting of a dragon", steps=STEPS, cfg=5.0, strength=1.0,
                           attention="none")


class HookWatch(AttnEdit):
    """Placed after TokenFlow's edits: logs every self-attention call's layout and its layer's module hooks."""

    def __init__(self):
        self.calls = []

    def qkv(self, call, q, k, v):
        if call.is_self:
            self.calls.append((call.name, call.layout, len(call.attn._forward_hooks),
                               len(call.attn._forward_pre_hooks), q.shape[0]))
        return q, k, v


def test_tokenflow_runs_keyframe_calls_on_every_attn1_without_module_hooks(tiny_model, moving):
    unet = tiny_model.unet
    watch = HookWatch()
    installed = {}

    def planner(injection, context):
        plan = tokenflow_planner(injection, context)
        installed.update({name: plan.edits_for(name) for name in unet.attn_processors})
        return replace(plan, edits_for=lambda name: tuple(plan.edits_for(name)) + (watch,))

    params = TokenFlowParams(kf_every=2)
    watched = edit_video(tiny_model, settings(), injection=Injection("tokenflow", moving, params, planner))

    self_attention = {name for name in unet.attn_processors if is_self_attention(name)}
    assert self_attention and all(any(isinstance(e, KeyframeCall) for e in installed[name]) for name in self_attention)
    assert not any(isinstance(e, KeyframeCall) for name in set(installed) - self_attention for e in installed[name])
    assert {name for name, *_ in watch.calls} == self_attention
    assert len(watch.calls) == STEPS * len(self_attention)  # one UNet call per step, every attn1 once
    for name, call_layout, hooks, pre_hooks, rows in watch.calls:
        assert (hooks, pre_hooks) == (0, 0), f"{name} has module hooks during sampling"
        assert isinstance(call_layout, KeyframeLayout) and call_layout.frames == len(call_layout.keyframes) == 2
        assert rows == 3 * 2  # [source, uncond, cond] x the keyframes
    # the watcher only observes: the result is TokenFlow's own
    assert torch.equal(watched, edit_video(tiny_model, settings(), injection=tokenflow_injection(moving, params)))
