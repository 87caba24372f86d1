"""FRESCO: keyframe batches, flows between a batch's frames, the feature optimisation (methods.md E4), the three
attentions, and the run: every part switchable, the UNet untouched by the optimisation."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from comfyui_video_edit.pipelines_core.attention.processor import FrameLayout, VideoAttnProcessor
from comfyui_video_edit.pipelines_core.attention.rules import first_frame, own_frame
from comfyui_video_edit.pipelines_core.flow.estimate import translation_flow
from comfyui_video_edit.pipelines_core.flow.warp import FlowField
from comfyui_video_edit.pipelines_core.methods.fresco import (
    FrescoAttention, FrescoParams, FrescoRun, PairFlows, adam_steps, batch_pairs, cosine_gram,
    fresco_attention_layers, fresco_injection, fresco_loss, keyframe_batches, optimize_features, pair_flows,
    sample_features, spatial_guided_query, spatial_loss, visible_mask,
)
from comfyui_video_edit.pipelines_core.sampling.injection import PlanContext
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

STEPS = 4
HEIGHT, WIDTH = 48, 64  # latent 6x8, then 3x4
OFF = dict(spatial_attention=False, cross_frame_attention=False, temporal_attention=False, temporal_loss=False,
           spatial_loss=False)


def pan_clip(frames: int, height: int = HEIGHT, width: int = WIDTH, dx: int = 8, seed: int = 0) -> torch.Tensor:
    """A smooth picture panning right by dx pixels a frame (ComfyUI IMAGE), which translation_flow(dx) describes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8, (width + dx * frames) // 8, generator=g)
    base = F.interpolate(coarse, size=(height, width + dx * frames), mode="bilinear", align_corners=False)[0]
    start = dx * frames
    return torch.stack([base[:, :, start - dx * k:start - dx * k + width] for k in range(frames)]).permute(0, 2, 3, 1)


def still_clip(frames: int, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.rand(1, height, width, 3, generator=g).expand(frames, -1, -1, -1).clone()


def zero_flow(frames: int, height: int = HEIGHT, width: int = WIDTH) -> FlowField:
    zeros = torch.zeros(frames - 1, 2, height, width)
    return FlowField.from_flows(zeros, zeros, "zero")


def zero_pairs(count: int, h: int, w: int) -> PairFlows:
    return PairFlows(torch.zeros(count, 2, h, w), torch.zeros(count, 2, h, w), torch.zeros(count, h, w),
                     torch.zeros(count, h, w))


# --- batches ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,batch", [(20, 8), (17, 8), (8, 8), (5, 8), (9, 4), (4, 3), (30, 6)])
def test_keyframe_batches_carry_the_first_frame_and_the_previous_batch_s_last(frames, batch):
    chunks = keyframe_batches(frames, batch)
    kept = [c.frames[k] for c in chunks for k in c.keep]
    assert sorted(kept) == list(range(frames))  # every frame denoised for the output exactly once
    first_batch = chunks[0].frames
    assert first_batch == tuple(range(min(batch, frames))) and chunks[0].keep == tuple(range(len(first_batch)))
    for before, chunk in zip(chunks, chunks[1:]):
        assert chunk.frames[:2] == (0, before.frames[-1]) and chunk.keep == tuple(range(2, len(chunk.frames)))
        assert 3 <= len(chunk.frames) <= batch  # at least one new frame
        assert list(chunk.frames[2:]) == list(range(chunk.frames[2], chunk.frames[-1] + 1))
    if len(chunks) > 1:  # a short last batch takes frames from the one before (the code: at least 3 new frames)
        assert len(chunks[-1].frames) - 2 >= min(3, batch - 2)


def test_code_s_batches_for_a_20_and_a_17_frame_clip():
    """run_fresco.py's sublists for keys 0..19 with batch_size 8, and a short last batch borrowing frames."""
    assert [c.frames for c in keyframe_batches(20, 8)] == [tuple(range(8)), (0, 7, *range(8, 14)),
                                                          (0, 13, *range(14, 20))]
    assert [c.frames for c in keyframe_batches(16, 8)] == [tuple(range(8)), (0, 7, *range(8, 13)),
                                                          (0, 12, 13, 14, 15)]


# --- flows between a batch's frames ---------------------------------------------------------------------

def test_batch_pairs_wrap_around_and_chained_flows_follow_the_pan():
    assert batch_pairs((0, 7, 8, 9)) == [(0, 7), (7, 8), (8, 9), (9, 0)]
    frames = pan_clip(4)
    flow = translation_flow(4, HEIGHT, WIDTH, 8.0, 0.0)
    images = frames.permute(0, 3, 1, 2)
    pairs = pair_flows(flow, images, [(0, 1), (0, 2), (3, 0), (2, 2)])
    assert torch.equal(pairs.bwd[0], flow.bwd[0]) and torch.equal(pairs.fwd[0], flow.fwd[0])
    interior = (slice(None), slice(4, -4), slice(24, -24))
    # content moves right: frame 2 points 16 px left into frame 0, frame 0 16 px right into frame 2
    assert torch.allclose(pairs.bwd[1][0][interior[1:]], torch.full((40, 16), -16.0), atol=1e-4)
    assert torch.allclose(pairs.fwd[1][0][interior[1:]], torch.full((40, 16), 16.0), atol=1e-4)
    assert torch.allclose(pairs.fwd[2][0][interior[1:]], torch.full((40, 16), -24.0), atol=1e-4)
    # newly visible: frame 2's first 16 columns are not in frame 0; the centre is seen
    assert pairs.occ_bwd[1][:, :16].mean() > 0.9 and pairs.occ_bwd[1][:, 24:-24].max() == 0
    assert pairs.fwd[3].abs().max() == 0 and pairs.occ_bwd[3].max() == 0


def test_visible_tokens_are_frame_0_and_the_newly_uncovered_strip():
    flow = translation_flow(3, HEIGHT, WIDTH, 16.0, 0.0)
    pairs = pair_flows(flow, pan_clip(3, dx=16).permute(0, 3, 1, 2), batch_pairs((0, 1, 2)))
    mask = visible_mask(pairs, (6, 8)).view(3, 6, 8)
    assert mask[0].all()
    for frame in (1, 2):  # 16 px = 2 cells uncovered at the left edge, nothing else
        assert mask[frame][:, :2].all() and not mask[frame][:, 2:].any()


# --- the optimisation (E4) --------------------------------------------------------------------------------

def test_e4_identical_frames_zero_flow_own_gram_loss_0_and_features_unchanged():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, 8, 6, 8, generator=g)
    features = one.expand(2 * 3, -1, -1, -1).clone()  # 2 CFG chunks x 3 identical frames
    pairs = zero_pairs(3, 6, 8)
    assert float(fresco_loss(features, 3, pairs, cosine_gram(features))) == 0.0
    out = optimize_features(features, 3, pairs, features)
    assert (out - features).abs().max() <= 1e-5


def test_e4_the_loss_falls_over_20_adam_steps_on_random_features():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2 * 4, 8, 6, 8, generator=g)
    target = torch.randn(2 * 4, 8, 6, 8, generator=g)
    flows = torch.randn(4, 2, 6, 8, generator=g)
    occ = (torch.rand(4, 6, 8, generator=g) > 0.8).float()
    pairs = PairFlows(flows, -flows, occ, occ.flip(-1))
    gram = cosine_gram(target)
    with torch.enable_grad():
        start = float(fresco_loss(features, 4, pairs, gram))
        end = float(fresco_loss(adam_steps(features, 4, pairs, gram), 4, pairs, gram))
        temporal_only = float(fresco_loss(adam_steps(features, 4, pairs, None), 4, pairs, None))
        spatial_only = float(fresco_loss(adam_steps(features, 4, None, gram), 4, None, gram))
    assert end < 0.7 * start
    assert temporal_only < 0.7 * float(fresco_loss(features, 4, pairs, None))
    assert spatial_only < 0.7 * float(fresco_loss(features, 4, None, gram))
    out = optimize_features(features, 4, pairs, target)  # AdaIN back to the features' own statistics
    assert torch.allclose(out.mean((-2, -1)), features.mean((-2, -1)), atol=1e-4)
    assert torch.allclose(out.std((-2, -1)), features.std((-2, -1)), rtol=1e-3)
    assert (out - features).abs().mean() > 0.05


def test_the_gram_gradient_taken_row_by_row_is_the_whole_loss_s():
    g = torch.Generator().manual_seed(11)
    features, target = torch.randn(6, 8, 6, 8, generator=g), torch.randn(6, 8, 6, 8, generator=g)
    gram = cosine_gram(target)
    with torch.enable_grad():
        whole = features.clone().requires_grad_()
        fresco_loss(whole, 3, None, gram).backward()
        rows = features.clone().requires_grad_()
        for row in range(6):
            (100.0 * spatial_loss(rows, gram, slice(row, row + 1))).backward()
    assert torch.allclose(whole.grad, rows.grad, rtol=1e-4, atol=1e-7) and whole.grad.abs().max() > 0


def test_temporal_loss_is_zero_on_features_that_follow_an_integer_flow():
    """Features panning 1 cell a frame with that flow: the temporal loss is exactly 0 off the occluded columns
    (the wrap-around pair included), since `sample_features` copies at integer displacements."""
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(1, 4, 6, 12, generator=g)
    frames = torch.cat([wide[..., 3 - k:11 - k] for k in range(3)])  # content moves right 1 cell a frame
    fwd = torch.tensor([1.0, 1.0, -2.0]).view(3, 1, 1, 1) * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    fwd = fwd.expand(3, 2, 6, 8).clone()
    occ_fwd = torch.zeros(3, 6, 8)
    occ_fwd[:2, :, -1:] = 1
    occ_fwd[2, :, :2] = 1
    occ_bwd = torch.zeros(3, 6, 8)
    occ_bwd[:2, :, :1] = 1
    occ_bwd[2, :, -2:] = 1
    pairs = PairFlows(fwd, -fwd, occ_fwd, occ_bwd)
    assert torch.equal(sample_features(frames[:1], -fwd[:1])[..., 1:], frames[1:2][..., 1:])
    assert float(fresco_loss(frames, 3, pairs, None)) == 0.0
    assert float(fresco_loss(frames, 3, PairFlows(fwd, -fwd, occ_fwd * 0, occ_bwd * 0), None)) > 0.1


def test_optimisation_runs_under_inference_mode_and_leaves_inputs_alone():
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        features = torch.randn(4, 8, 6, 8, generator=g)
        target = torch.randn(4, 8, 6, 8, generator=g)
        pairs = zero_pairs(2, 6, 8)
        before = features.clone()
        out = optimize_features(features, 2, pairs, target, iterations=3)
    assert torch.equal(features, before) and not out.requires_grad and (out - features).abs().max() > 1e-3


# --- the attentions ----------------------------------------------------------------------------------------

def attention_layer(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def run_for(frames, flow, params: FrescoParams, model=None) -> FrescoRun:
    context = PlanContext(model, flow.frame_count, STEPS, (999, 749, 499, 249), 7.5, 0, "")
    return FrescoRun(params, flow, frames, context)


def layout(frames: int, step: int = 0, timestep: int = 999) -> FrameLayout:
    return FrameLayout(frames, tuple(range(frames)), ("uncond", "cond"), timestep, step)


def test_spatial_guided_query_identities():
    g = torch.Generator().manual_seed(5)
    q, q_ref, k_ref = (torch.randn(2, 2, 12, 8, generator=g) for _ in range(3))
    by_hand = torch.softmax(q_ref @ (0.2 * k_ref).transpose(-1, -2) / 8 ** 0.5, dim=-1) @ q
    assert torch.allclose(spatial_guided_query(q, q_ref, k_ref), by_hand, atol=1e-6)
    constant = q[:, :, :1].expand_as(q)  # every token the same query: any convex mix gives it back
    assert torch.allclose(spatial_guided_query(constant, q_ref, k_ref), constant, atol=1e-6)
    mean = q.mean(2, keepdim=True).expand_as(q)  # scale 0: uniform weights, the mean query
    assert torch.allclose(spatial_guided_query(q, q_ref, k_ref, 0.0), mean, atol=1e-6)


def test_spatial_guided_attention_reads_the_recorded_pass_of_the_input():
    """Record on x, then attend on y: the queries are to_q(y) re-mixed by softmax(to_q(x) 0.2 to_k(x)^T/sqrt(d));
    keys and values stay y's own. Outside its steps (step 1) the layer is plain attention."""
    attn = attention_layer()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 12, 16, generator=g), torch.randn(6, 12, 16, generator=g)
    frames = still_clip(3, 24, 32)
    run = run_for(frames, zero_flow(3, 24, 32), FrescoParams(**{**OFF, "spatial_attention": True}))
    processor = VideoAttnProcessor(own_frame, "up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor",
                                   (FrescoAttention(run),))
    run.recording = True
    processor(attn, x, layout=layout(3))
    run.recording = False
    guided = processor(attn, y, layout=layout(3, step=0))

    def heads(t):
        return t.view(6, 12, 2, 8).transpose(1, 2)

    q = spatial_guided_query(heads(attn.to_q(y)), heads(attn.to_q(x)), heads(attn.to_k(x)), 0.2)
    expected = F.scaled_dot_product_attention(q, heads(attn.to_k(y)), heads(attn.to_v(y)))
    expected = attn.to_out[0](expected.transpose(1, 2).reshape(6, 12, 16))
    assert torch.allclose(guided, expected, atol=1e-5)
    plain = VideoAttnProcessor(own_frame)(attn, y)
    assert torch.allclose(processor(attn, y, layout=layout(3, step=1)), plain, atol=1e-6)
    assert (guided - plain).abs().max() > 1e-3


def test_cross_frame_attention_without_occlusion_is_first_frame_attention():
    attn = attention_layer(1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2 * 3, 12, 16, generator=g)  # 2 CFG chunks x 3 frames, 3x4 tokens (a 24x32 clip)
    run = run_for(still_clip(3, 24, 32), zero_flow(3, 24, 32), FrescoParams(**{**OFF, "cross_frame_attention": True}))
    name = "up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor"
    ours = VideoAttnProcessor(own_frame, name, (FrescoAttention(run),))(attn, x, layout=layout(3))
    first = VideoAttnProcessor(first_frame, name)(attn, x, layout=layout(3))
    assert torch.allclose(ours, first, atol=1e-6)
    assert (ours - VideoAttnProcessor(own_frame)(attn, x)).abs().max() > 1e-3


def test_cross_frame_attention_adds_the_newly_visible_tokens():
    """A pan uncovers a strip at the left of frames 1, 2: their keys join frame 0's for every frame."""
    attn = attention_layer(2)
    frames, flow = pan_clip(3, 24, 32, dx=8), translation_flow(3, 24, 32, 8.0, 0.0)
    run = run_for(frames, flow, FrescoParams(**{**OFF, "cross_frame_attention": True}))
    visible = run.visible((0, 1, 2), 12, torch.device("cpu"))
    assert visible.sum() == 12 + 2 * 3  # frame 0's 12 tokens, one uncovered column of 3 tokens in frames 1 and 2
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2 * 3, 12, 16, generator=g)
    name = "up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor"
    ours = VideoAttnProcessor(own_frame, name, (FrescoAttention(run),))(attn, x, layout=layout(3))
    rows = x.view(2, 3, 12, 16)
    keys = torch.cat([rows[:, 0], rows[:, 1][:, visible[1]], rows[:, 2][:, visible[2]]], dim=1)  # (2, 18, 16)
    expected = []
    for chunk in range(2):
        q = attn.to_q(rows[chunk]).view(3, 12, 2, 8).transpose(1, 2)
        k = attn.to_k(keys[chunk]).view(1, 18, 2, 8).transpose(1, 2).expand(3, -1, -1, -1)
        v = attn.to_v(keys[chunk]).view(1, 18, 2, 8).transpose(1, 2).expand(3, -1, -1, -1)
        expected.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 12, 16))
    assert torch.allclose(ours, attn.to_out[0](torch.cat(expected)), atol=1e-5)


def test_temporal_guided_attention_keeps_identical_frames_and_mixes_along_the_flow():
    attn = attention_layer(3)
    name = "up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor"
    params = FrescoParams(**{**OFF, "temporal_attention": True})
    run = run_for(still_clip(3, 24, 32), zero_flow(3, 24, 32), params)
    processor = VideoAttnProcessor(own_frame, name, (FrescoAttention(run),))
    g = torch.Generator().manual_seed(9)
    same = torch.randn(2, 1, 12, 16, generator=g).expand(2, 3, 12, 16).reshape(6, 12, 16)
    plain = VideoAttnProcessor(own_frame)
    assert torch.allclose(processor(attn, same, layout=layout(3)), plain(attn, same), atol=1e-6)
    varied = torch.randn(6, 12, 16, generator=g)
    moved = processor(attn, varied, layout=layout(3))
    assert (moved - plain(attn, varied)).abs().max() > 1e-3
    # below the timestep threshold (350) the layer is plain attention
    assert torch.allclose(processor(attn, varied, layout=layout(3, timestep=249)), plain(attn, varied), atol=1e-6)


# --- the run ---------------------------------------------------------------------------------------------

def settings(**changes) -> SamplerSettings:
    return SamplerSettings(**{**dict(prompt="an oil painting of a dragon", steps=STEPS, cfg=5.0, strength=0.8,
                                     attention="none"), **changes})


@pytest.fixture(scope="module")
def pan():
    return pan_clip(5), translation_flow(5, HEIGHT, WIDTH, 8.0, 0.0)


def test_fresco_layers_are_the_two_finest_decoder_levels(tiny_model):
    from comfyui_video_edit.pipelines_core.models.single_file import SD15_CONFIG_DIR
    from diffusers import UNet2DConditionModel

    assert fresco_attention_layers(tiny_model.unet.attn_processors) == [
        f"up_blocks.{b}.attentions.{p}.transformer_blocks.0.attn1.processor" for b in (0, 1) for p in (0, 1)]
    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR, subfolder="unet"))
    layers = fresco_attention_layers(sd15.attn_processors)
    assert len(layers) == 6 and all(n.startswith(("up_blocks.2.", "up_blocks.3.")) and ".attn1." in n for n in layers)


def test_each_part_changes_the_edit_and_all_off_is_per_frame_sampling(tiny_model, pan):
    frames, flow = pan
    full = edit_video(tiny_model, settings(), images=frames, injection=fresco_injection(frames, flow))
    again = edit_video(tiny_model, settings(), images=frames, injection=fresco_injection(frames, flow))
    assert torch.equal(full, again)  # one seed, one edit
    for part in OFF:
        without = edit_video(tiny_model, settings(), images=frames,
                             injection=fresco_injection(frames, flow, params=FrescoParams(**{part: False})))
        assert (full - without).abs().mean() > 1e-2, part
    off = edit_video(tiny_model, settings(), images=frames,
                     injection=fresco_injection(frames, flow, params=FrescoParams(**OFF, batch_size=3)))
    plain = edit_video(tiny_model, settings(), images=frames)
    assert torch.allclose(off, plain, atol=1e-5)
    assert (full - plain).abs().mean() > 0.1


def test_batches_and_the_input_pass_reach_the_unet(tiny_model, pan):
    """5 frames in batches of 4 ((0,1,2), (0,2,3,4)): per step one UNet call a batch, plus one call a batch at the
    schedule's last timestep before the first step (the input frames' pass), nothing more."""
    frames, flow = pan
    calls = []

    def spy(module, args, kwargs):
        layout = kwargs["cross_attention_kwargs"]["layout"]
        calls.append((int(args[1]), layout.frame_ids))

    handle = tiny_model.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        edit_video(tiny_model, settings(), images=frames,
                   injection=fresco_injection(frames, flow, params=FrescoParams(batch_size=4)))
    finally:
        handle.remove()
    b0, b1 = (0, 1, 2), (0, 2, 3, 4)
    last, t0, t1 = calls[0][0], calls[1][0], calls[4][0]
    assert calls == [(last, b0), (t0, b0), (last, b1), (t0, b1), (t1, b0), (t1, b1), (last, b0), (last, b1)]
    assert t0 > t1 > last  # the pass runs at the schedule's last timestep, which the run's last step shares


def test_optimisation_leaves_the_unet_untouched_under_inference_mode(tiny_model, pan):
    frames, flow = pan
    before = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    params = FrescoParams(**{**OFF, "temporal_loss": True, "spatial_loss": True})
    with torch.inference_mode():  # as ComfyUI samples
        out = edit_video(tiny_model, settings(), images=frames, injection=fresco_injection(frames, flow, params=params))
    after = tiny_model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_model.unet.parameters())
    plain = edit_video(tiny_model, settings(), images=frames)
    assert (out - plain).abs().mean() > 1e-2


def test_any_multiple_of_8_size_and_a_longer_clip(tiny_model):
    frames, flow = pan_clip(7, 40, 56), translation_flow(7, 40, 56, 8.0, 0.0)
    out = edit_video(tiny_model, settings(steps=2), images=frames,
                     injection=fresco_injection(frames, flow, params=FrescoParams(batch_size=4, iterations=3)))
    assert out.shape == (7, 4, 5, 7) and torch.isfinite(out).all()


def test_bad_inputs_are_refused_before_sampling(pan):
    frames, flow = pan
    with pytest.raises(ValueError, match="batch_size must be at least 3"):
        fresco_injection(frames, flow, params=FrescoParams(batch_size=2))
    with pytest.raises(ValueError, match="optimize_until"):
        fresco_injection(frames, flow, params=FrescoParams(optimize_until=1.5))
    with pytest.raises(ValueError, match="connect Flow Warp to the same frames"):
        fresco_injection(frames[:4], flow)
    with pytest.raises(ValueError, match="connect Flow Warp's flow"):
        fresco_injection(frames, None)


def test_node_builds_the_injection(pan):
    from comfyui_video_edit.nodes.method_fresco import METHOD, VE_InjectFRESCO

    frames, flow = pan
    types = VE_InjectFRESCO.INPUT_TYPES()
    required = types["required"]
    assert list(types["optional"]) == ["inversion"]
    defaults = {name: spec[1]["default"] for name, spec in required.items() if "default" in spec[1]}
    assert FrescoParams(**defaults) == FrescoParams()
    (injection,) = VE_InjectFRESCO().build(frames, flow, **{**defaults, "temporal_loss": False})
    assert injection.mode == "fresco" and injection.params == FrescoParams(temporal_loss=False)
    assert injection.inversion is None and METHOD.node is VE_InjectFRESCO
