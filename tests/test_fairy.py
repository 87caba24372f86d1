"""Fairy's anchor attention (methods.md §6 F4): anchors' K/V cached per step, other frames in independent chunks."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from einops import rearrange

from comfyui_video_edit.pipelines_core.attention.processor import FrameLayout, VideoAttnProcessor
from comfyui_video_edit.pipelines_core.attention.rules import Rule, own_frame
from comfyui_video_edit.pipelines_core.methods.fairy import (
    AnchorAttention, FairyParams, FairyRun, anchor_frames, fairy_injection, fairy_planner,
)
from comfyui_video_edit.pipelines_core.sampling.injection import Injection
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

FRAMES = 5
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
ROLES = ("uncond", "cond")
WHOLE = FrameLayout(FRAMES, tuple(range(FRAMES)), ROLES)  # every frame in one call


@pytest.fixture(scope="module")
def clip():
    return torch.rand(FRAMES, 32, 48, 3, generator=torch.Generator().manual_seed(5))


def settings(**kw) -> SamplerSettings:
    base = dict(prompt="an oil painting of a dragon", steps=4, cfg=5.0, strength=0.8, attention="none", chunk_size=2)
    return SamplerSettings(**{**base, **kw})


def fairy(anchors: int, inversion=None):
    return fairy_injection(inversion, FairyParams(anchors))


# --- anchors ------------------------------------------------------------------------------------------------

def test_anchors_are_evenly_spaced_with_both_ends():
    assert anchor_frames(120, 3) == (0, 60, 119)
    assert anchor_frames(10, 4) == (0, 3, 6, 9)
    assert anchor_frames(5, 1) == (0,)
    assert anchor_frames(4, 4) == anchor_frames(4, 9) == (0, 1, 2, 3)
    for frames in range(1, 40):
        for k in range(1, frames + 1):
            chosen = anchor_frames(frames, k)
            assert len(set(chosen)) == k and list(chosen) == sorted(chosen)
            assert chosen[0] == 0 and (k == 1 or chosen[-1] == frames - 1)
            gaps = [b - a for a, b in zip(chosen, chosen[1:])]
            assert not gaps or max(gaps) - min(gaps) <= 1


def test_bad_anchor_count_is_refused_naming_the_node():
    with pytest.raises(ValueError, match=r"Attention Injector \(Fairy\): anchors must be at least 1"):
        fairy(0)


# --- one attention layer --------------------------------------------------------------------------------------

def layer_and_tokens(frames=FRAMES, tokens=6):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(len(ROLES) * frames, tokens, 16, generator=torch.Generator().manual_seed(1))
    return attn, x


def rows_of(x, frames, ids):
    """The rows of frames `ids` in every role of a (role frame)-major batch."""
    return rearrange(rearrange(x, "(c f) n d -> c f n d", f=frames)[:, list(ids)], "c k n d -> (c k) n d")


@torch.no_grad()
def two_pass(attn, x, anchors, chunk_size):
    """Fairy on one layer: the anchor call (records), then the other frames in chunks (read the cache)."""
    run = FairyRun(anchors)
    processor = VideoAttnProcessor(own_frame, LAYER, [AnchorAttention(run)])
    out = torch.empty_like(x)
    out_view = rearrange(out, "(c f) n d -> c f n d", f=FRAMES)
    run.phase = FairyRun.ANCHORS
    anchor_out = processor(attn, rows_of(x, FRAMES, anchors), layout=FrameLayout(len(anchors), anchors, ROLES))
    out_view[:, list(anchors)] = rearrange(anchor_out, "(c k) n d -> c k n d", k=len(anchors))
    cached = dict(run.cache.kv)
    run.phase = FairyRun.CHUNKS
    others = [f for f in range(FRAMES) if f not in anchors]
    for s in range(0, len(others), chunk_size):
        ids = tuple(others[s:s + chunk_size])
        chunk_out = processor(attn, rows_of(x, FRAMES, ids), layout=FrameLayout(len(ids), ids, ROLES))
        out_view[:, list(ids)] = rearrange(chunk_out, "(c k) n d -> c k n d", k=len(ids))
    return out, cached


def live_anchor_rule(anchors):
    """Every frame reads the anchors' keys/values within the same batch (the processor's own gather)."""
    return Rule("anchors", lambda frames: torch.tensor(anchors).expand(frames, len(anchors)).clone())


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_cached_anchor_kv_equal_kv_computed_in_the_same_batch(chunk_size):
    attn, x = layer_and_tokens()
    anchors = (0, 2, 4)
    fairy_out, cached = two_pass(attn, x, anchors, chunk_size)
    # the cache holds exactly the anchors' projected keys/values, per role, frames in order
    anchor_rows = rows_of(x, FRAMES, anchors)
    with torch.no_grad():
        for c, role in enumerate(ROLES):
            rows = anchor_rows[c * len(anchors):(c + 1) * len(anchors)]
            k, v = cached[(LAYER, role)]
            assert torch.equal(k, rearrange(attn.to_k(rows), "f n (h d) -> h (f n) d", h=2))
            assert torch.equal(v, rearrange(attn.to_v(rows), "f n (h d) -> h (f n) d", h=2))
        # every frame, anchors included, as if all frames had read the anchors live in one batch
        live = VideoAttnProcessor(live_anchor_rule(anchors), LAYER)(attn, x, layout=WHOLE)
        plain = VideoAttnProcessor(own_frame, LAYER)(attn, x, layout=WHOLE)
    assert (fairy_out - live).abs().max() <= 1e-6
    assert (fairy_out - plain).abs().max() > 1e-2  # not per-frame attention


def test_each_cfg_row_reads_its_own_anchors():
    attn, x = layer_and_tokens()
    anchors = (0, 4)
    base, _ = two_pass(attn, x, anchors, 2)
    moved = x.clone()
    moved[FRAMES + 4] += 1.0  # the cond copy of anchor 4
    changed, _ = two_pass(attn, moved, anchors, 2)
    assert torch.equal(changed[:FRAMES], base[:FRAMES])  # uncond rows never read cond anchors
    assert (changed[FRAMES:FRAMES + 4] - base[FRAMES:FRAMES + 4]).abs().min() > 0  # every cond frame did


def test_chunks_without_the_anchor_pass_are_refused_and_other_calls_pass():
    attn, x = layer_and_tokens()
    run = FairyRun((0, 4))
    processor = VideoAttnProcessor(own_frame, LAYER, [AnchorAttention(run)])
    run.phase = FairyRun.CHUNKS
    with pytest.raises(RuntimeError, match="anchor pass must run before the chunks"):
        processor(attn, rows_of(x, FRAMES, (1, 2)), layout=FrameLayout(2, (1, 2), ROLES))
    # outside both passes (a start's own UNet call) a frame attends to itself, as without the edit
    run.phase = None
    with torch.no_grad():
        plain = VideoAttnProcessor(own_frame, LAYER)(attn, x, layout=WHOLE)
        assert torch.equal(processor(attn, x, layout=WHOLE), plain)


def test_cross_attention_is_unchanged():
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    x = torch.randn(2 * FRAMES, 6, 16)
    text = torch.randn(2 * FRAMES, 7, 8)
    run = FairyRun((0, 4))
    run.phase = FairyRun.CHUNKS  # the cache is empty: a cross-attention call must not read it
    with torch.no_grad():
        edited = VideoAttnProcessor(own_frame, LAYER, [AnchorAttention(run)])(attn, x, text, layout=WHOLE)
        plain = VideoAttnProcessor(own_frame, LAYER)(attn, x, text, layout=WHOLE)
    assert torch.equal(edited, plain)


# --- sampling ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_all_frames_as_anchors_is_all_frames_attention(tiny_model, clip, cfg):
    """F4: k = every frame -> the dense `all` rule, however the sampler chunks."""
    anchored = edit_video(tiny_model, settings(cfg=cfg, chunk_size=2), images=clip, injection=fairy(FRAMES))
    dense = edit_video(tiny_model, settings(cfg=cfg, attention="all", chunk_size=FRAMES), images=clip)
    assert (anchored - dense).abs().max() <= 1e-5
    plain = edit_video(tiny_model, settings(cfg=cfg), images=clip)
    assert (anchored - plain).abs().mean() > 1e-2


def test_all_frames_as_anchors_from_an_inversion(tiny_model, clip):
    inversion = invert_video(tiny_model, clip, prompt="a street", steps=4)
    anchored = edit_video(tiny_model, settings(strength=1.0), injection=fairy(FRAMES, inversion))
    dense = edit_video(tiny_model, settings(strength=1.0, attention="all", chunk_size=FRAMES), inversion=inversion)
    assert (anchored - dense).abs().max() <= 1e-5


def test_chunked_equals_unchunked(tiny_model, clip):
    """Given the anchors, the other frames are independent: any chunk size gives the same clip."""
    one_call = edit_video(tiny_model, settings(chunk_size=FRAMES), images=clip, injection=fairy(2))
    for chunk_size in (1, 2):
        chunked = edit_video(tiny_model, settings(chunk_size=chunk_size), images=clip, injection=fairy(2))
        assert (chunked - one_call).abs().max() <= 1e-5


def test_a_frame_outside_the_anchors_changes_only_itself(tiny_model, clip):
    anchors = anchor_frames(FRAMES, 3)  # (0, 2, 4)
    base = edit_video(tiny_model, settings(), images=clip, injection=fairy(3))
    moved = clip.clone()
    moved[1] = 1.0 - moved[1]
    changed = edit_video(tiny_model, settings(), images=moved, injection=fairy(3))
    for f in range(FRAMES):
        shift = (changed[f] - base[f]).abs().max()
        assert shift > 1e-2 if f == 1 else shift <= 1e-6, (f, float(shift))
    # control: moving an anchor moves every frame (all of them read it)
    moved = clip.clone()
    moved[anchors[1]] = 1.0 - moved[anchors[1]]
    changed = edit_video(tiny_model, settings(), images=moved, injection=fairy(3))
    assert min((changed[f] - base[f]).abs().max() for f in range(FRAMES)) > 1e-3


def test_the_anchors_change_the_edit(tiny_model, clip):
    """Switched off (no injection, per-frame attention) the output differs, frame by frame."""
    anchored = edit_video(tiny_model, settings(), images=clip, injection=fairy(3))
    plain = edit_video(tiny_model, settings(), images=clip)
    per_frame = [(anchored[f] - plain[f]).abs().mean() for f in range(FRAMES)]
    assert min(per_frame) > 1e-2, per_frame
    # ...and the sampler's own rule no longer acts on the UNet: it is Fairy's attention whatever it is set to
    ruled = edit_video(tiny_model, settings(attention="first+previous"), images=clip, injection=fairy(3))
    assert torch.equal(ruled, anchored)


def test_it_composes_with_a_start_that_runs_the_unet_itself(tiny_model):
    """Text2Video-Zero's motion start denoises frame 0 alone before the loop, outside Fairy's passes (that call
    attends per frame instead of failing)."""
    from comfyui_video_edit.pipelines_core.methods.text2video_zero import MotionStart

    start = MotionStart(4, (32, 48))
    anchored = edit_video(tiny_model, settings(strength=1.0, chunk_size=1), start=start, injection=fairy(4))
    dense = edit_video(tiny_model, settings(strength=1.0, attention="all", chunk_size=4), start=start)
    assert (anchored - dense).abs().max() <= 1e-5  # F4 holds from this start too


# --- the cache per step --------------------------------------------------------------------------------------

def observed_run(tiny_model, clip, anchors, **kw):
    """Sample with Fairy and, after every step, what its cache holds; returns (per-step entries, peak bytes, run)."""
    seen = {}

    def planner(injection, context):
        plan = fairy_planner(injection, context)
        wrap = plan.wrap_denoiser

        def keep(denoiser):
            seen["denoiser"] = wrap(denoiser)
            return seen["denoiser"]

        plan.wrap_denoiser = keep
        return plan

    after_steps = []

    def progress(done, total):
        after_steps.append(len(seen["denoiser"].run.cache.kv))

    injection = Injection("fairy", None, FairyParams(anchors), planner)
    edit_video(tiny_model, settings(**kw), images=clip, injection=injection, progress=progress)
    return after_steps, seen["denoiser"].run.cache.peak_bytes


def expected_cache_bytes(unet, size, anchors, roles):
    """K and V of `anchors` frames in every UNet self-attention layer, per CFG role, fp32."""
    total = 0
    levels = len(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if ".attn1." not in name:
            continue
        part, index = name.split(".")[:2]
        level = int(index) if part == "down_blocks" else levels - 1 - int(index) if part == "up_blocks" else levels - 1
        tokens = (size[0] // 8 >> level) * (size[1] // 8 >> level)
        channels = unet.get_submodule(name[:-len(".processor")]).to_k.out_features
        total += 2 * roles * anchors * tokens * channels * 4
    return total


def test_the_cache_is_emptied_after_every_step_and_holds_k_frames_per_layer(tiny_model, clip):
    after_steps, peak = observed_run(tiny_model, clip, 2)
    assert after_steps == [0, 0, 0]  # strength 0.8 of 4 steps: 3 steps, each ends with an empty cache
    assert peak == expected_cache_bytes(tiny_model.unet, (32, 48), anchors=2, roles=2)
    # bounded by the anchors, not the clip: 3 frames or 5, chunks of 1 or 5, the same peak
    assert observed_run(tiny_model, clip[:3], 2, chunk_size=1)[1] == peak
    assert observed_run(tiny_model, clip, 2, chunk_size=FRAMES)[1] == peak
    assert observed_run(tiny_model, clip, 1)[1] * 2 == peak
    assert observed_run(tiny_model, clip, 2, cfg=1.0)[1] * 2 == peak  # without CFG one role only


# --- the node ------------------------------------------------------------------------------------------------

def test_the_node_builds_the_papers_injection_with_or_without_an_inversion(tiny_model, clip):
    from comfyui_video_edit.nodes.method_fairy import METHOD, VE_InjectFairyAnchors

    spec = VE_InjectFairyAnchors.INPUT_TYPES()
    assert list(spec["required"]) == ["anchors"] and list(spec["optional"]) == ["inversion"]
    injection, = VE_InjectFairyAnchors().build(anchors=spec["required"]["anchors"][1]["default"])
    assert injection.params == FairyParams() and injection.inversion is None and injection.mode == "fairy"
    assert METHOD.node_id == "VE_InjectFairyAnchors" and VE_InjectFairyAnchors.RETURN_TYPES == ("VE_INJECTION",)
    inversion = invert_video(tiny_model, clip[:2], prompt="", steps=2)
    assert VE_InjectFairyAnchors().build(anchors=2, inversion=inversion)[0].inversion is inversion
    with pytest.raises(ValueError, match="anchors"):
        VE_InjectFairyAnchors().build(anchors=0)
