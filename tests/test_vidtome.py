"""VidToMe: token merging across frames in self-attention (methods.md §1.5, §6 F1), its layers, chunks, shared
matching across the source/uncond/cond rows, determinism, composition with Plug-and-Play, and token counts."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from comfyui_video_edit.nodes.method_vidtome import VE_InjectVidToMe
from comfyui_video_edit.pipelines_core.attention.processor import AttnCall, AttnEdit, FrameLayout, VideoAttnProcessor
from comfyui_video_edit.pipelines_core.attention.rules import all_frames, own_frame
from comfyui_video_edit.pipelines_core.methods.plug_and_play import pnp_injection
from comfyui_video_edit.pipelines_core.methods.tokenflow import tokenflow_injection
from comfyui_video_edit.pipelines_core.methods.vidtome import (
    MergedLayout, TokenMerge, VidToMeParams, VidToMeRun, attention_bytes, bipartite_matching, draw_chunks,
    frame_matching, merge_layers, merged_token_count, vidtome_injection, vidtome_planner,
)
from comfyui_video_edit.pipelines_core.sampling.injection import Injection, InjectionPlan, PlanContext
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

FRAMES, TOKENS, DIM, HEADS = 4, 12, 16, 2
PNP_ROLES = ("source", "uncond", "cond")
STEPS = 3


# --- one attention layer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=DIM, heads=HEADS, dim_head=8).eval()


def run_layer(attn, processor, x, **kw):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x, **kw)


def tokens(rows: int, frames: int = FRAMES, seed: int = 3, identical_frames: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if identical_frames:  # every frame of a row the same; rows differ
        return torch.randn(rows, 1, TOKENS, DIM, generator=g).expand(-1, frames, -1, -1).reshape(-1, TOKENS, DIM)
    return torch.randn(rows * frames, TOKENS, DIM, generator=g)


def layout(roles=PNP_ROLES, frame_ids=tuple(range(FRAMES)), step=0) -> FrameLayout:
    return FrameLayout(len(frame_ids), frame_ids, roles, 500, step)


def merge_run(seed=0, **params) -> VidToMeRun:
    return VidToMeRun(VidToMeParams(**params), seed, aligned=params.get("align_batch", True))


def merging(run: VidToMeRun, name="attn1") -> VideoAttnProcessor:
    return VideoAttnProcessor(own_frame, name, [TokenMerge(run)])


# --- F1: merge / unmerge ------------------------------------------------------------------------

def test_ratio_zero_matching_is_the_identity():
    x = torch.randn(3, FRAMES * TOKENS, DIM)
    m = frame_matching(x, FRAMES, 0, 0.0, dst_frame=1, stride=4)
    assert m.merged.shape[1] == 0 and m.merged_length == x.shape[1]
    assert torch.equal(m.unmerge(m.merge(x)), x)


def test_unmerge_of_merge_keeps_shape_order_and_destination_tokens():
    x = torch.randn(3, FRAMES * TOKENS, DIM)
    m = frame_matching(x, FRAMES, 0, 0.5, dst_frame=2, stride=4)
    merged = m.merge(x)
    r = int(3 * TOKENS * 0.5)
    assert merged.shape == (3, FRAMES * TOKENS - r, DIM)
    back = m.unmerge(merged)
    assert back.shape == x.shape
    dst = torch.arange(2 * TOKENS, 3 * TOKENS)  # the destination frame's tokens, in place and unchanged
    assert torch.equal(m.dst, dst)
    assert torch.equal(back[:, dst], x[:, dst])
    kept = m.src[m.kept[0]]  # source tokens left alone are back where they were
    assert torch.equal(back[:, kept], x[:, kept])
    merged_at, into = m.src[m.merged[0]], m.dst[m.into[0]]  # a merged token takes its destination's value
    assert torch.equal(back[:, merged_at], x[:, into])
    assert set(kept.tolist()) | set(merged_at.tolist()) | set(dst.tolist()) == set(range(x.shape[1]))


def test_merged_tokens_go_to_their_most_similar_destination():
    x = torch.randn(1, 2 * TOKENS, DIM)
    m = frame_matching(x, 2, 0, 1.0, dst_frame=0, stride=4)
    src, dst = F.normalize(x[0, TOKENS:], dim=-1), F.normalize(x[0, :TOKENS], dim=-1)
    assert torch.equal(m.into[0], (src @ dst.T).argmax(-1)[m.merged[0]])
    # the most similar ones merge first: with ratio 0.5 the merged half scores above the kept half
    half = frame_matching(x, 2, 0, 0.5, dst_frame=0, stride=4)
    best = (src @ dst.T).max(-1).values
    assert best[half.merged[0]].min() >= best[half.kept[0]].max()


def test_mean_mode_averages_what_merges_into_a_destination():
    x = torch.randn(1, 2 * TOKENS, DIM)
    m = bipartite_matching(x, torch.arange(TOKENS, 2 * TOKENS), torch.arange(TOKENS), 1.0, mode="mean")
    merged = m.merge(x)
    d = int(m.into[0, 0])
    sources = m.merged[0][m.into[0] == d] + TOKENS
    expected = torch.cat([x[0, d:d + 1], x[0, sources]]).mean(0)
    assert torch.allclose(merged[0, d], expected, atol=1e-6)


def test_ratio_zero_attends_over_all_frames_of_the_chunk(attn):
    """Nothing merged: the chunk's tokens are one sequence, i.e. every frame attends to all the chunk's frames."""
    x, lay = tokens(3), layout()
    out = run_layer(attn, merging(merge_run(local_merge_ratio=0.0, merge_global=False)), x, layout=lay)
    full = run_layer(attn, VideoAttnProcessor(all_frames, "attn1"), x, layout=lay)
    assert (out - full).abs().max() <= 1e-5


def test_identical_frames_with_ratio_one_give_per_frame_attention(attn):
    """F1: frames all alike, every source token merged (locally and globally): per-frame attention, also for the
    second chunk of a step, which merges with the first's global tokens."""
    run = merge_run(local_merge_ratio=1.0, global_merge_ratio=1.0)
    processor = merging(run)
    vanilla = AttnProcessor2_0()
    for ids in ((0, 1, 2, 3), (4, 5, 6)):
        x = tokens(3, len(ids), seed=5, identical_frames=True)  # the same content as the chunk before
        out = run_layer(attn, processor, x, layout=layout(frame_ids=ids))
        assert (out - run_layer(attn, vanilla, x)).abs().max() <= 1e-5
    assert "attn1" in run.globals  # the second chunk did meet global tokens
    # distinct frames: the merge changes the output (the property above is not trivially met)
    x = tokens(3)
    out = run_layer(attn, merging(merge_run(local_merge_ratio=1.0, merge_global=False)), x, layout=layout())
    assert (out - run_layer(attn, vanilla, x)).abs().max() > 1e-2


class Probe(AttnEdit):
    """Records the keys each call attends to and the layout it sees."""

    def __init__(self):
        self.calls = []

    def qkv(self, call, q, k, v):
        self.calls.append((call.name, call.layout, tuple(k.shape), k.element_size()))
        return q, k, v


def token_sources(x: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """For each row and token of `restored`, the token of the same row of `x` whose value it carries."""
    return torch.stack([(restored[r][:, None, :] == x[r][None, :, :]).all(-1).float().argmax(-1)
                        for r in range(x.shape[0])])


@pytest.mark.parametrize("aligned", [True, False])
def test_source_uncond_and_cond_rows_share_one_matching(aligned):
    """align_batch: which token takes which token's output is the same in the source, uncond and cond rows."""
    x, lay = tokens(3), layout()
    run = merge_run(align_batch=aligned, merge_global=False, local_merge_ratio=0.6)
    merged, merged_call, restore = TokenMerge(run).tokens(AttnCall("attn1", True, HEADS, lay), x)
    assert isinstance(merged_call.layout, MergedLayout) and merged_call.layout.frames == 1
    assert merged.shape[0] == 3 and merged_call.layout.merged_from == lay.frame_ids
    joined = x.reshape(3, FRAMES * TOKENS, DIM)
    sources = token_sources(joined, restore(merged).reshape(3, -1, DIM))
    assert not torch.equal(sources[0], torch.arange(FRAMES * TOKENS))  # tokens were merged
    same = torch.equal(sources[0], sources[1]) and torch.equal(sources[1], sources[2])
    assert same == aligned  # per-row matchings differ on distinct rows: the check can fail


def test_global_tokens_join_the_next_chunk_and_clear_each_step(attn):
    run = merge_run(local_merge_ratio=0.9, global_merge_ratio=0.8)
    probe = Probe()
    processor = VideoAttnProcessor(own_frame, "attn1", [TokenMerge(run), probe])
    x = tokens(3)
    run_layer(attn, processor, x, layout=layout(step=0))
    run_layer(attn, processor, tokens(3, seed=4), layout=layout(frame_ids=(4, 5, 6, 7), step=0))
    run_layer(attn, processor, x, layout=layout(step=1))
    local = merged_token_count(TOKENS, FRAMES, 0.9)
    first, second, next_step = (shape[2] for _, _, shape, _ in probe.calls)
    assert first == next_step == local  # no globals in a step's first chunk
    flip = run.draws[(0, (4, 5, 6, 7))][("global",)] > 0.5
    assert second == merged_token_count(TOKENS, FRAMES, 0.9, global_tokens=local, global_ratio=0.8,
                                        local_is_src=flip) > local


# --- layers and chunks --------------------------------------------------------------------------


def test_sd15_merges_the_64_and_32_levels(sd15_unet):
    expected = {f"{b}.attentions.{j}.transformer_blocks.0.attn1.processor"
                for b, n in (("down_blocks.0", 2), ("down_blocks.1", 2), ("up_blocks.2", 3), ("up_blocks.3", 3))
                for j in range(n)}
    assert merge_layers(sd15_unet, 2) == expected
    assert merge_layers(sd15_unet, 1) == {n for n in expected if n.startswith(("down_blocks.0", "up_blocks.3"))}
    assert len(merge_layers(sd15_unet, 8)) == 16  # every self-attention layer


def test_tiny_levels_follow_its_samplers(tiny_model):
    # builtin:tiny has two levels: full resolution (down 0, up 1) and half (down 1, mid, up 0)
    full = merge_layers(tiny_model.unet, 1)
    assert full and all(n.startswith(("down_blocks.0.", "up_blocks.1.")) for n in full)
    assert merge_layers(tiny_model.unet, 2) == {n for n in tiny_model.unet.attn_processors if ".attn1." in n}


@pytest.mark.parametrize("order", ["mix", "seq", "rand"])
def test_chunks_cover_every_frame_once_and_depend_on_the_seed(order):
    draws = [draw_chunks(23, 4, order, True, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    for chunks in draws:
        assert sorted(f for c in chunks for f in c) == list(range(23))
        assert all(1 <= len(c) <= 4 and c == list(range(c[0], c[0] + len(c))) for c in chunks)
    assert draws[0] == draws[1]
    plans = [draw_chunks(23, 4, order, True, torch.Generator().manual_seed(s)) for s in range(8)]
    assert len({str(p) for p in plans}) > 1  # first length, direction and order are drawn


# --- the sampler --------------------------------------------------------------------------------

def clip(count=5, seed=1):
    return torch.rand(count, 32, 48, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def inversion(tiny_model):
    return invert_video(tiny_model, clip(), prompt="a photo of a street", steps=STEPS)


def settings(**kw) -> SamplerSettings:
    base = dict(prompt="an oil painting of a dragon", steps=STEPS, cfg=5.0, strength=1.0, attention="none")
    return SamplerSettings(**{**base, **kw})


def test_with_plug_and_play_deterministic_for_a_seed_and_visible(tiny_model, inversion):
    pnp = pnp_injection(inversion)
    vidtome = vidtome_injection(VidToMeParams(), pnp)
    assert vidtome.inversion is inversion  # the sampler starts from PnP's inversion
    a = edit_video(tiny_model, settings(), injection=vidtome)
    b = edit_video(tiny_model, settings(), injection=vidtome)
    assert torch.equal(a, b)
    other_seed = edit_video(tiny_model, settings(seed=7), injection=vidtome)
    assert not torch.equal(a, other_seed)  # the seed draws the chunks and destination frames
    alone = edit_video(tiny_model, settings(), injection=pnp)
    assert (a - alone).abs().mean() > 1e-2  # switched off -> the output differs


def test_works_alone_on_an_sdedit_start(tiny_model):
    quick = settings(strength=0.7)
    merged = edit_video(tiny_model, quick, images=clip(), injection=vidtome_injection())
    plain = edit_video(tiny_model, quick, images=clip())
    assert merged.shape == plain.shape and (merged - plain).abs().mean() > 1e-2


def probed(injection: Injection, probe: Probe) -> Injection:
    """The same injection, its plan observed by `probe` on every attention layer (after every other edit)."""

    def planner(inj, context: PlanContext) -> InjectionPlan:
        plan = vidtome_planner(inj, context)
        return replace(plan, edits_for=lambda name: tuple(plan.edits_for(name)) + (probe,))

    return replace(injection, planner=planner)


def test_merged_calls_attend_with_the_counted_tokens(tiny_model, inversion):
    """Measured on builtin:tiny (PnP rows [source, uncond, cond]): every merged self-attention call attends one
    row per role over `merged_token_count` tokens; unmerged calls keep a row per frame."""
    probe = Probe()
    params = VidToMeParams(merge_global=False, max_downsample=1)
    edit_video(tiny_model, settings(), injection=probed(vidtome_injection(params, pnp_injection(inversion)), probe))
    layers = merge_layers(tiny_model.unet, 1)
    merged = [(name, lay, shape) for name, lay, shape, _ in probe.calls if name in layers]
    assert merged and all(isinstance(lay, MergedLayout) and shape[0] == 3 for _, lay, shape in merged)
    for name, lay, shape in merged:  # 32x48 px: a 4x6 latent, 24 tokens per frame at full resolution
        assert shape[2] == merged_token_count(24, len(lay.merged_from), 0.9), (name, lay.merged_from, shape)
    other = [(name, lay, shape) for name, lay, shape, _ in probe.calls if ".attn1." in name and name not in layers]
    assert other and all(shape[0] == 3 * lay.frames for _, lay, shape in other)


def test_token_counts_and_memory_at_sd15_512():
    """The figures in the docs: SD-1.5 at 512 px, one chunk of 4 frames with PnP's 3 rows, fp16."""
    local = merged_token_count(4096, 4, 0.9)
    assert local == 4096 + (3 * 4096 - int(3 * 4096 * 0.9))
    assert merged_token_count(4096, 8, 0.9) < 2 * local  # 8 frames: 8 -> 2 -> 1
    with_globals = merged_token_count(4096, 4, 0.9, global_tokens=local, global_ratio=0.8)
    assert with_globals == local + local - int(local * 0.8)
    merged = attention_bytes(3, with_globals, with_globals, 320, 8, 2)
    every_frame = attention_bytes(12, 4096, 4 * 4096, 320, 8, 2)  # all-frames attention in the chunk
    assert merged["kv"] < every_frame["kv"] / 8 and merged["probs"] < every_frame["probs"] / 5


# --- composition and the node -------------------------------------------------------------------

def test_refuses_an_inner_injection_that_edits_the_merged_tokens(tiny_model, inversion):
    injection = vidtome_injection(VidToMeParams(), tokenflow_injection(inversion))
    with pytest.raises(ValueError, match="tokenflow injection also changes tokens"):
        edit_video(tiny_model, settings(), injection=injection)


def test_plan_is_the_inner_plan_plus_the_merge(tiny_model, inversion):
    context = PlanContext(tiny_model, 5, STEPS, tuple(range(STEPS)), 5.0, 0, "x")
    inner = pnp_injection(inversion).plan(context)
    plan = vidtome_planner(vidtome_injection(VidToMeParams(max_downsample=1), pnp_injection(inversion)), context)
    assert plan.source_branch and plan.patches is not None
    layers = merge_layers(tiny_model.unet, 1)
    for name in tiny_model.unet.attn_processors:
        ours, theirs = plan.edits_for(name), tuple(inner.edits_for(name))
        assert [type(e) for e in ours] == [type(e) for e in theirs] + ([TokenMerge] if name in layers else [])
        assert plan.rule_for(name) is (own_frame if ".attn1." in name else None)


def test_node_defaults_are_the_papers_and_errors_name_the_input():
    required = VE_InjectVidToMe.INPUT_TYPES()["required"]
    defaults = {name: spec[1]["default"] for name, spec in required.items()}
    assert VidToMeParams(**defaults) == VidToMeParams()
    (alone,) = VE_InjectVidToMe().build(**defaults)
    assert alone.inversion is None and alone.mode == "vidtome"
    with pytest.raises(ValueError, match="local_merge_ratio"):
        VE_InjectVidToMe().build(**{**defaults, "local_merge_ratio": 1.5})
