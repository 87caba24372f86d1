"""FLATTEN: trajectories from Flow Warp's flow at every token grid, attention along them, the injection plan."""

from dataclasses import replace

import pytest
import torch

from comfyui_video_edit.pipelines_core.attention.processor import AttnEdit, FrameLayout, VideoAttnProcessor
from comfyui_video_edit.pipelines_core.attention.rules import all_frames, own_frame
from comfyui_video_edit.pipelines_core.flow.estimate import translation_flow
from comfyui_video_edit.pipelines_core.flow.warp import FlowField
from comfyui_video_edit.pipelines_core.methods.flatten import (
    FlattenParams, FlowGuidedAttention, FlowTrajectories, build_trajectories, call_trajectories, check_partition,
    flatten_feature_modules, flatten_injection, flatten_qk_layers, flow_on_grid, link_frames,
    token_grids, trajectory_attention,
)
from comfyui_video_edit.pipelines_core.sampling.injection import Injection
from comfyui_video_edit.pipelines_core.sampling.hooks import Hooks
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

STEPS = 4
HEIGHT, WIDTH = 32, 48  # non-square: latent grid 4x6, then 2x3


def random_flow(frames: int, height: int, width: int, scale: float, seed: int) -> FlowField:
    """Smooth-ish random flows (many cells landing on one cell: conflicts to break)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(frames - 1, 2, 3, 4, generator=g) * scale
    fwd = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return FlowField.from_flows(fwd, -fwd, "random")


def clip(count: int, seed: int, static: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if static:
        return torch.rand(1, HEIGHT, WIDTH, 3, generator=g).expand(count, -1, -1, -1).clone()
    return torch.rand(count, HEIGHT, WIDTH, 3, generator=g)


# --- trajectories --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(96, 128), (40, 56), (64, 64), (8, 8)])
def test_trajectories_partition_every_point_and_follow_the_flow(size):
    """Every (frame, position) on exactly one trajectory (methods.md D8), at every grid the UNet uses (odd,
    non-square ones too); each step of a trajectory is a link the rounded flow makes; conflicts occurred and
    were resolved (more trajectories than positions)."""
    flow = random_flow(5, *size, scale=30.0, seed=3)
    grids = token_grids(size)
    assert grids[0] == (size[0] // 8, size[1] // 8) and grids[-1] == (1, 1)
    conflicts = 0
    for grid in grids:
        traj = build_trajectories(flow.fwd, grid, seed=0)
        frames, n = traj.ids.shape
        assert (frames, n) == (5, grid[0] * grid[1])
        check_partition(traj)
        table = traj.table
        present = table >= 0
        assert int(present.sum()) == frames * n
        points = [(f, int(p)) for k in range(table.shape[0]) for f in range(frames) if (p := table[k, f]) >= 0]
        assert len(set(points)) == frames * n  # no point twice, every point once
        cells = flow_on_grid(flow.fwd, grid)
        h, w = grid
        for k in range(table.shape[0]):
            on = present[k].nonzero()[:, 0].tolist()
            assert on == list(range(on[0], on[-1] + 1))  # consecutive frames
            for f in on[:-1]:
                p, q = int(table[k, f]), int(table[k, f + 1])
                y, x = divmod(p, w)
                assert q == (y + int(cells[f, 1, y, x])) * w + (x + int(cells[f, 0, y, x]))
        conflicts += table.shape[0] - n
    assert conflicts > 0  # the random flow did make trajectories end (out of frame or a lost conflict)


@pytest.mark.parametrize("size,shift", [((96, 128), (8, 0)), ((96, 128), (16, -8)), ((48, 80), (-8, 8))])
def test_an_integer_translation_gives_straight_trajectories(size, shift):
    """Content moving (dx, dy) pixels a frame: on the latent grid every trajectory moves by (dx/8, dy/8) cells a
    frame, and those starting in frame 0 far enough from the edge run through all frames."""
    frames = 4
    flow = translation_flow(frames, *size, *shift)
    for grid, factor in [(token_grids(size)[0], 8), (token_grids(size)[1], 16)]:
        dx, dy = shift[0] / factor, shift[1] / factor
        if dx != int(dx) or dy != int(dy):
            continue
        dx, dy = int(dx), int(dy)
        traj = build_trajectories(flow.fwd, grid, seed=0)
        h, w = grid
        full = 0
        for y in range(h):
            for x in range(w):
                inside = all(0 <= y + t * dy < h and 0 <= x + t * dx < w for t in range(frames))
                row = traj.table[traj.ids[0, y * w + x]]
                if inside:
                    assert row.tolist() == [(y + t * dy) * w + x + t * dx for t in range(frames)]
                    full += 1
        assert full > 0
        assert (traj.lengths == frames).sum() == full  # only those: a shift has no conflicts to cut others


def test_trajectories_repeat_for_a_seed_and_are_kept_per_grid():
    flow = random_flow(4, 64, 96, scale=30.0, seed=5)
    cache = FlowTrajectories(flow)
    first = cache.at((8, 12), 1)
    assert cache.at((8, 12), 1) is first  # built once per grid and seed
    assert torch.equal(build_trajectories(flow.fwd, (8, 12), 1).ids, first.ids)  # a pure function of its inputs
    assert not torch.equal(cache.at((8, 12), 2).ids, first.ids)  # conflicts are broken by the seed
    assert cache.grid_of(8 * 12) == (8, 12) and cache.grid_of(4 * 6) == (4, 6)
    with pytest.raises(ValueError, match="matches no token grid"):
        cache.grid_of(7)


def test_conflicts_keep_one_link_drawn_by_the_seed():
    """Three cells of a row land on one cell: exactly one keeps the link, each of them for some seed."""
    cells = torch.zeros(1, 2, 1, 5, dtype=torch.long)
    cells[0, 0, 0, :3] = torch.tensor([2, 1, 0])  # cells 0, 1, 2 -> cell 2; cells 3, 4 stay
    winners = []
    for seed in range(40):
        links = link_frames(cells, torch.Generator().manual_seed(seed))[0]
        assert links[3:].tolist() == [3, 4]
        assert (links[:3] == 2).sum() == 1 and (links[:3] == -1).sum() == 2
        winners.append(int((links[:3] == 2).nonzero()))
    assert set(winners) == {0, 1, 2}


# --- attention along trajectories ----------------------------------------------------------------------------

def reference_attention(x, ids, heads, chunks):
    """Token by token: softmax over the tokens of the same trajectory in the call's frames (per head)."""
    frames, n = ids.shape
    d = x.shape[-1] // heads
    tokens = x.view(chunks, frames, n, heads, d)
    out = torch.empty_like(tokens)
    for f in range(frames):
        for p in range(n):
            mates = (ids == ids[f, p]).nonzero()
            keys = tokens[:, mates[:, 0], mates[:, 1]]  # c m h d
            q = tokens[:, f, p]  # c h d
            weights = torch.einsum("chd,cmhd->chm", q, keys).div(d ** 0.5).softmax(-1)
            out[:, f, p] = torch.einsum("chm,cmhd->chd", weights, keys)
    return out.reshape_as(x)


@pytest.mark.parametrize("frame_ids", [(0, 1, 2, 3), (0, 2, 3)])
def test_trajectory_attention_matches_a_token_by_token_reference(frame_ids):
    """Each token attends exactly to its trajectory's tokens among the call's frames (a chunk of the clip too)."""
    flow = random_flow(4, 48, 64, scale=20.0, seed=7)
    traj = build_trajectories(flow.fwd, (6, 8), seed=0)
    ids = traj.ids[list(frame_ids)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * len(frame_ids), 48, 8, generator=g, dtype=torch.float64)
    out = trajectory_attention(x, call_trajectories(ids), heads=2)
    assert (out - reference_attention(x, ids, 2, 2)).abs().max() <= 1e-10
    assert (out - x).abs().max() > 1e-2


def attn_layer():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def run_layer(attn, processor, x, layout):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x, layout=layout)


def test_lone_tokens_leave_the_dense_attention_as_it_is():
    """Content leaving the frame at once: every trajectory is one token, which attends only to itself, so the
    layer's output is the dense all-frames attention's."""
    frames, size = 3, (24, 32)
    flow = translation_flow(frames, *size, 10000.0, 0.0)
    cache = FlowTrajectories(flow)
    assert (cache.at((3, 4), 0).lengths == 1).all()
    attn = attn_layer()
    x = torch.randn(2 * frames, 12, 16, generator=torch.Generator().manual_seed(1))
    layout = FrameLayout(frames, tuple(range(frames)), ("uncond", "cond"), 500, 0)
    dense = run_layer(attn, VideoAttnProcessor(all_frames, "attn1"), x, layout)
    flow_guided = run_layer(attn, VideoAttnProcessor(all_frames, "attn1", [FlowGuidedAttention(cache, 0)]), x, layout)
    assert torch.equal(flow_guided, dense)
    moved = FlowTrajectories(translation_flow(frames, *size, 8.0, 0.0))  # one cell a frame: real trajectories
    along = run_layer(attn, VideoAttnProcessor(all_frames, "attn1", [FlowGuidedAttention(moved, 0)]), x, layout)
    assert (along - dense).abs().max() > 1e-3


def test_identical_frames_with_zero_flow_equal_per_frame_attention():
    """methods.md B3: identical frames, zero flow -> dense and trajectory attention both give vanilla."""
    frames = 3
    attn = attn_layer()
    one = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(2))
    x = one.expand(2 * frames, -1, -1).clone()
    layout = FrameLayout(frames, tuple(range(frames)), ("uncond", "cond"), 500, 0)
    cache = FlowTrajectories(translation_flow(frames, 24, 32, 0.0, 0.0))
    vanilla = run_layer(attn, VideoAttnProcessor(own_frame), x, layout)
    flattened = run_layer(attn, VideoAttnProcessor(all_frames, "attn1", [FlowGuidedAttention(cache, 0)]), x, layout)
    assert (flattened - vanilla).abs().max() <= 1e-6


def test_flow_layers_choose_the_grids_and_cross_attention_is_untouched():
    frames = 2
    cache = FlowTrajectories(translation_flow(frames, 24, 32, 8.0, 0.0))  # grids 3x4, 2x2, 1x1
    layout = FrameLayout(frames, (0, 1), ("cond",), 500, 0)
    attn = attn_layer()
    g = torch.Generator().manual_seed(3)
    for tokens, finest in [(12, True), (4, False)]:
        x = torch.randn(frames, tokens, 16, generator=g)
        dense = run_layer(attn, VideoAttnProcessor(all_frames, "attn1"), x, layout)
        for mode, acts in [("all", True), ("finest", finest), ("none", False)]:
            out = run_layer(attn, VideoAttnProcessor(all_frames, "attn1", [FlowGuidedAttention(cache, 0, mode)]),
                            x, layout)
            assert torch.equal(out, dense) != acts, (tokens, mode)
    text = torch.randn(frames, 5, 16, generator=g)
    x = torch.randn(frames, 12, 16, generator=g)
    attn.set_processor(VideoAttnProcessor(all_frames, "attn2", [FlowGuidedAttention(cache, 0)]))
    with torch.no_grad():
        edited = attn(x, encoder_hidden_states=text, layout=layout)
    attn.set_processor(VideoAttnProcessor(all_frames, "attn2"))
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=text, layout=layout)
    assert torch.equal(edited, plain)


# --- injection layers ------------------------------------------------------------------------------------


def test_injection_layers_are_flattens_on_sd15_and_fall_back_on_the_tiny_unet(sd15_unet, tiny_model):
    sd = [f"up_blocks.{b}.attentions.{j}.transformer_blocks.0.attn1.processor"
          for b, j in [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]]  # LDM decoder layers 4-9
    assert flatten_qk_layers(list(sd15_unet.attn_processors)) == sd
    assert flatten_feature_modules(sd15_unet) == ["up_blocks.1.resnets.0", "up_blocks.1.resnets.1",
                                                  "up_blocks.2.resnets.0"]
    assert flatten_qk_layers(list(tiny_model.unet.attn_processors)) == [
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
    ]
    assert flatten_feature_modules(tiny_model.unet) == ["up_blocks.0.resnets.0", "up_blocks.0.resnets.1",
                                                        "up_blocks.1.resnets.0"]


class SourceEquality(AttnEdit):
    """Observer after FLATTEN's edits: logs (layer, step) where the cond chunk's q and k equal the source's."""

    def __init__(self, log):
        self.log = log

    def qkv(self, call, q, k, v):
        layout = call.layout
        rows = lambda x, role: x[layout.rows(role, x.shape[0])]
        if torch.equal(rows(q, "source"), rows(q, "cond")) and torch.equal(rows(k, "source"), rows(k, "cond")):
            self.log.append((call.name, layout.step))
        return q, k, v


# --- sampling ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moving(tiny_model):
    return invert_video(tiny_model, clip(3, 1), prompt="", steps=STEPS)


@pytest.fixture(scope="module")
def pan():
    return translation_flow(3, HEIGHT, WIDTH, 8.0, 0.0)


def settings(**kw) -> SamplerSettings:
    return SamplerSettings(**{**dict(prompt="an oil painting of a dragon", steps=STEPS, cfg=5.0, strength=1.0,
                                     attention="none"), **kw})


def test_flatten_changes_the_edit_and_each_part_acts(tiny_model, moving, pan):
    full = edit_video(tiny_model, settings(), injection=flatten_injection(moving, pan))
    assert torch.equal(full, edit_video(tiny_model, settings(), injection=flatten_injection(moving, pan)))
    no_flow = edit_video(tiny_model, settings(), injection=flatten_injection(moving, pan, FlattenParams(0.8, "none")))
    no_inject = edit_video(tiny_model, settings(), injection=flatten_injection(moving, pan, FlattenParams(0.0)))
    plain = edit_video(tiny_model, settings(attention="all"), inversion=moving)
    distance = lambda a, b: (a - b).abs().max().item()
    assert distance(full, no_flow) > 1e-3  # the trajectory attention switched off
    assert distance(full, no_inject) > 1e-2  # the feature and Q/K injection switched off
    assert distance(no_flow, plain) > 1e-2
    # with neither, FLATTEN is dense all-frames attention (the live source branch changes nothing by itself)
    neither = edit_video(tiny_model, settings(), injection=flatten_injection(moving, pan, FlattenParams(0.0, "none")))
    assert distance(neither, plain) <= 1e-4


def test_qk_injection_fires_on_its_layers_inside_the_window(tiny_model, moving, pan):
    log = []
    base = flatten_injection(moving, pan, FlattenParams(0.5))

    def planner(injection, context):
        plan = base.planner(injection, context)
        watch = SourceEquality(log)
        watched = lambda name: tuple(plan.edits_for(name)) + ((watch,) if ".attn1." in name else ())
        return replace(plan, edits_for=watched)

    edit_video(tiny_model, settings(), injection=Injection("flatten", moving, base.params, planner))
    injected = set(flatten_qk_layers(tiny_model.unet.attn_processors))
    attn1 = [n for n in tiny_model.unet.attn_processors if ".attn1." in n]
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"  # sees x_T alike in both chunks at step 0
    for name in attn1:
        steps = [step for layer, step in log if layer == name and not (layer == first and step == 0)]
        assert steps == ([0, 1] if name in injected else []), name


def test_replay_identity_and_off_by_one_control(tiny_model, moving, pan):
    """Source prompt as target, edit latent forced onto the source's: the source and edit chunks compute the same
    features, so injecting changes nothing (C2); read one timestep off, it does (C3)."""
    def replay(injection):
        estimates = []

        def onto_source(state):
            return moving.latents[int(state.timestep)].to(state.latents)

        def keep(state):
            estimates.append(state.x0.clone())
            return state.x0

        edit_video(tiny_model, settings(prompt="", cfg=1.0), injection=injection,
                   hooks=Hooks(before_model=[onto_source], on_x0=[keep]))
        return torch.stack(estimates)

    keys = [int(t) for t in moving.timesteps] + [0]
    off = replace(moving, latents={**moving.latents, **{t: moving.latents[n] for t, n in zip(keys[:-1], keys[1:])}})
    baseline = replay(flatten_injection(moving, pan, FlattenParams(0.0)))
    injected = replay(flatten_injection(moving, pan, FlattenParams(0.8)))
    misread = replay(flatten_injection(off, pan, FlattenParams(0.8)))
    assert (injected - baseline).abs().max() <= 1e-5
    assert (misread - baseline).abs().max() > 1e-2


def test_any_multiple_of_8_size_and_chunks(tiny_model):
    """40x56 px: latent 5x7, then 3x4 (odd grids); chunks of 2 frames read the anchor frame and their own."""
    frames = torch.rand(3, 40, 56, 3, generator=torch.Generator().manual_seed(4))
    inversion = invert_video(tiny_model, frames, prompt="", steps=2)
    flow = random_flow(3, 40, 56, scale=10.0, seed=1)
    whole = edit_video(tiny_model, settings(steps=2), injection=flatten_injection(inversion, flow))
    chunked = edit_video(tiny_model, settings(steps=2, chunk_size=2), injection=flatten_injection(inversion, flow))
    assert whole.shape == chunked.shape == (3, 4, 5, 7)
    assert torch.isfinite(chunked).all()


def hook_counts(unet) -> list:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in unet.modules()]


def test_patches_are_removed_after_sampling_and_after_an_error(tiny_model, moving, pan):
    before = hook_counts(tiny_model.unet)
    processors = dict(tiny_model.unet.attn_processors)

    def fail(state):
        if state.index == 1:
            raise RuntimeError("interrupted")
        return state.latents

    with pytest.raises(RuntimeError, match="interrupted"):
        edit_video(tiny_model, settings(), injection=flatten_injection(moving, pan), hooks=Hooks(after_step=[fail]))
    assert hook_counts(tiny_model.unet) == before
    kinds = lambda procs: {name: type(p) for name, p in procs.items()}
    assert kinds(tiny_model.unet.attn_processors) == kinds(processors)


# --- checks before any step, and the node ----------------------------------------------------------------------

def test_mismatched_flow_and_bad_params_are_refused(moving):
    with pytest.raises(ValueError, match=r"FLATTEN.*4 frames of 48x32, the inversion 3 frames of 48x32"):
        flatten_injection(moving, translation_flow(4, HEIGHT, WIDTH, 8.0, 0.0))
    with pytest.raises(ValueError, match=r"the flow is 3 frames of 56x32.*connect Flow Warp and DDIM Invert"):
        flatten_injection(moving, translation_flow(3, HEIGHT, 56, 8.0, 0.0))
    with pytest.raises(ValueError, match="connect Flow Warp"):
        flatten_injection(moving, None)
    with pytest.raises(ValueError, match="inject must be"):
        flatten_injection(moving, translation_flow(3, HEIGHT, WIDTH, 8.0, 0.0), FlattenParams(1.5))
    with pytest.raises(ValueError, match="unknown flow_layers"):
        flatten_injection(moving, translation_flow(3, HEIGHT, WIDTH, 8.0, 0.0), FlattenParams(0.8, "some"))
    with pytest.raises(ValueError, match="DDIM Invert"):
        flatten_injection(None, translation_flow(3, HEIGHT, WIDTH, 8.0, 0.0))


def test_node_builds_the_injection(moving, pan):
    from comfyui_video_edit.nodes.method_flatten import METHOD, VE_InjectFLATTEN

    required = VE_InjectFLATTEN.INPUT_TYPES()["required"]
    assert list(required) == ["inversion", "flow", "inject", "flow_layers"]
    assert required["inject"][1]["default"] == 0.8
    (injection,) = VE_InjectFLATTEN().build(moving, pan, 0.8, "finest")
    assert injection.mode == "flatten" and injection.params == FlattenParams(0.8, "finest")
    assert injection.inversion is moving and METHOD.node is VE_InjectFLATTEN
