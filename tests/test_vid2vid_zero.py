"""vid2vid-zero: null-text reconstruction, spatial-temporal attention, cross-attention guidance (methods.md §1.7)."""

import pytest
import torch

from comfyui_video_edit.pipelines_core.attention import is_self_attention
from comfyui_video_edit.pipelines_core.attention.processor import AttnCall, FrameLayout
from comfyui_video_edit.pipelines_core.attention.rules import all_frames, first_and_previous
from comfyui_video_edit.pipelines_core.methods.vid2vid_zero import (
    CrossAttentionGuidance, Vid2VidZeroParams, plan_vid2vid_zero, self_attention_rule, uses_null_text,
    vid2vid_zero_injection,
)
from comfyui_video_edit.pipelines_core.models.model import encode_prompt
from comfyui_video_edit.pipelines_core.sampling.chunks import plan_chunks
from comfyui_video_edit.pipelines_core.sampling.denoiser import VideoDenoiser
from comfyui_video_edit.pipelines_core.sampling.injection import PlanContext
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video, reconstruct
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

SOURCE = "a red car on a road"
TARGET = "a blue car on a road"
STEPS, CFG = 4, 7.5


def clip(frames: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.rand(frames, 32, 48, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def inversion(tiny_model):
    """Null-text inversion under all-frames attention, as the workflow runs it (Mokady's 10 inner steps)."""
    return invert_video(tiny_model, clip(), prompt=SOURCE, steps=STEPS, cfg=CFG, null_text=True, attention="all")


def settings(prompt: str = TARGET, **kw) -> SamplerSettings:
    base = dict(prompt=prompt, negative_prompt="", steps=STEPS, cfg=CFG, strength=1.0, attention="all")
    return SamplerSettings(**{**base, **kw})


def edit(model, inversion, prompt: str = TARGET, **params) -> torch.Tensor:
    return edit_video(model, settings(prompt), injection=vid2vid_zero_injection(inversion, Vid2VidZeroParams(**params)))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


# --- null-text: source prompt == edit prompt reproduces the source --------------------------------------------

def test_same_prompt_reproduces_the_source(tiny_model):
    """With the edit prompt equal to the source prompt and the null-text embeddings on every step (ratio 1), the
    edit lands on the encoded clip as closely as null-text inversion's own reconstruction does, far closer than
    CFG sampling without the tuned embeddings (ratio 0). Strong inner optimisation, as in test_inversion: the
    tiny random UNet's weak text response needs it. Measured: 0.349 vs 0.344 (reconstruction) vs 2.09."""
    strong = invert_video(tiny_model, clip(), prompt=SOURCE, steps=STEPS, cfg=CFG, null_text=True, attention="all",
                          null_inner_steps=30, null_lr=0.05)
    x0 = strong.latents[0]
    reproduced = rms(edit(tiny_model, strong, SOURCE, null_uncond_ratio=1.0), x0)
    reconstruction = rms(reconstruct(tiny_model, strong), x0)
    untuned = rms(edit(tiny_model, strong, SOURCE, null_uncond_ratio=0.0), x0)
    code_default = rms(edit(tiny_model, strong, SOURCE), x0)  # -0.5: tuned embeddings on the second half only
    print(f"\nrms to x0: ratio 1 {reproduced:.4g}, reconstruct {reconstruction:.4g}, ratio -0.5 {code_default:.4g}, "
          f"ratio 0 {untuned:.4g}")
    assert reproduced < 1.1 * reconstruction
    assert reproduced < 0.25 * untuned
    assert reproduced < code_default < untuned


def test_without_guidance_it_is_null_text_sampling_under_all_frames_attention(tiny_model, inversion):
    """cross_replace 0 and ratio 1: exactly the sampler from the null-text inversion with the rule `all`."""
    plain = edit_video(tiny_model, settings(SOURCE), inversion=inversion)
    assert torch.equal(edit(tiny_model, inversion, SOURCE, cross_replace=0.0, null_uncond_ratio=1.0), plain)
    assert torch.equal(plain, reconstruct(tiny_model, inversion))


def test_null_uncond_ratio_follows_the_code():
    """The code's use_uncond_this_step: r > 0 -> steps i <= r*N; r < 0 -> steps i >= (1 + r)*N."""
    assert [uses_null_text(i, 50, -0.5) for i in range(50)] == [False] * 25 + [True] * 25
    assert all(uses_null_text(i, 50, 1.0) for i in range(50))
    assert [uses_null_text(i, 50, 0.5) for i in range(50)] == [True] * 26 + [False] * 24
    assert not any(uses_null_text(i, 50, 0.0) for i in range(50))


def test_the_denoiser_gets_the_empty_prompt_where_null_text_is_off(tiny_model, inversion):
    plan = plan_vid2vid_zero(vid2vid_zero_injection(inversion), context(tiny_model, inversion))
    denoiser = VideoDenoiser(tiny_model.unet, encode_prompt(tiny_model, TARGET), dict(inversion.null_embeds), CFG,
                             plan_chunks(4, 8, "all"))
    wrapped = plan.wrap_denoiser(denoiser)
    empty = encode_prompt(tiny_model, "")
    timesteps = [int(t) for t in inversion.timesteps]
    for i, t in enumerate(timesteps):  # 4 steps, -0.5: the last two use the tuned embeddings
        expected = inversion.null_embeds[t] if i >= 2 else empty
        assert torch.equal(wrapped.uncond[t], expected)


# --- spatial-temporal attention ---------------------------------------------------------------------------------

def context(model, inversion, **kw) -> PlanContext:
    timesteps = tuple(int(t) for t in inversion.timesteps)
    base = dict(model=model, frame_count=4, steps=STEPS, timesteps=timesteps, cfg=CFG, seed=0, target_prompt=TARGET,
                attention="all", chunk_size=8)
    return PlanContext(**{**base, **kw})


def test_every_self_attention_reads_all_frames_and_cross_attention_is_left_alone(tiny_model, inversion):
    plan = plan_vid2vid_zero(vid2vid_zero_injection(inversion), context(tiny_model, inversion))
    names = list(tiny_model.unet.attn_processors)
    assert all(plan.rule_for(n) is all_frames for n in names if is_self_attention(n))
    assert all(plan.rule_for(n) is None for n in names if not is_self_attention(n))
    # the guidance sits on cross-attention only
    assert all(len(plan.edits_for(n)) == (0 if is_self_attention(n) else 1) for n in names)
    assert plan.source_branch


def test_code_attention_is_dense_in_three_blocks_and_sparse_causal_elsewhere():
    sd = [f"{b}.attentions.{i}.transformer_blocks.0.attn1.processor" for b, n in
          (("down_blocks.0", 2), ("down_blocks.1", 2), ("down_blocks.2", 2), ("up_blocks.1", 3), ("up_blocks.2", 3),
           ("up_blocks.3", 3), ("mid_block", 1)) for i in range(n)]
    dense = [n for n in sd if self_attention_rule(n, "code") is all_frames]
    sparse = [n for n in sd if self_attention_rule(n, "code") is first_and_previous]
    assert {n.split(".attentions")[0] for n in dense} == {"down_blocks.0", "mid_block", "up_blocks.1"}
    assert len(dense) == 6 and len(sparse) == 10
    assert self_attention_rule("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", "code") is None


def test_all_frames_attention_lets_frame_0_see_the_last_frame(tiny_model):
    """Bidirectional: changing only the last source frame changes the edit of frame 0 (a causal or per-frame rule
    could not). Null-text off (ratio 0): its embedding is fitted to the whole clip and would carry the change."""
    frames = clip()
    changed = frames.clone()
    changed[-1] = torch.rand(changed[-1].shape, generator=torch.Generator().manual_seed(9))
    outputs = []
    for source in (frames, changed):
        inv = invert_video(tiny_model, source, prompt=SOURCE, steps=STEPS, cfg=CFG, null_text=True, attention="all",
                           null_inner_steps=2)
        outputs.append(edit(tiny_model, inv, null_uncond_ratio=0.0))
    moved = (outputs[0][0] - outputs[1][0]).abs().mean().item()
    print(f"\nframe 0 moved by {moved:.3g} (mean abs) when frame 3 changed")
    assert moved > 1e-3


# --- cross-attention guidance ----------------------------------------------------------------------------------

def call(is_self: bool, step: int, frames: int = 2) -> AttnCall:
    layout = FrameLayout(frames, tuple(range(frames)), ("source", "uncond", "cond"), 981, step)
    return AttnCall("up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", is_self, 2, layout)


def test_guidance_replaces_only_the_conditional_rows_inside_its_window():
    tokens = 5
    matrix = torch.eye(tokens)[[0, 2, 1, 3, 4]]  # a replace mapper swapping tokens 1 and 2
    guidance = CrossAttentionGuidance(2, replace_matrix=matrix)
    p = torch.rand(6, 2, 3, tokens, generator=torch.Generator().manual_seed(0)).softmax(-1)
    fused = guidance.probs(call(False, 1), p)
    assert torch.equal(fused[:4], p[:4])  # source and uncond rows untouched
    assert torch.equal(fused[4:], p[:2] @ matrix)  # cond rows read the source rows' maps, re-indexed
    assert torch.equal(guidance.probs(call(False, 2), p), p)  # step 2 is outside int(f*(N+1)) = 2 steps
    assert not guidance.wants_probs(call(False, 2)) and guidance.wants_probs(call(False, 0))
    assert not guidance.wants_probs(call(True, 0))
    assert torch.equal(guidance.probs(call(True, 0), p), p)  # self-attention is never guided


def test_refine_keeps_new_words_own_maps():
    mapper, alphas = torch.tensor([0, 1, 1, 2]), torch.tensor([1.0, 1.0, 0.0, 1.0])  # target token 2 is new
    guidance = CrossAttentionGuidance(1, mapper=mapper, alphas=alphas)
    p = torch.rand(6, 2, 3, 4, generator=torch.Generator().manual_seed(1)).softmax(-1)
    fused = guidance.probs(call(False, 0), p)
    assert torch.equal(fused[4:, ..., 2], p[4:, ..., 2])
    assert torch.equal(fused[4:, ..., 3], p[:2, ..., 2])


def test_guidance_changes_the_edit_and_switching_it_off_differs(tiny_model, inversion):
    guided = edit(tiny_model, inversion)
    off = edit(tiny_model, inversion, cross_replace=0.0)
    effect = (guided - off).abs().mean().item()
    print(f"\nguidance effect (mean abs) {effect:.3g}")
    assert effect > 1e-2
    refined = edit(tiny_model, inversion, mode="refine")  # same word count: auto is replace
    assert (refined - guided).abs().mean().item() > 1e-4


def test_guidance_at_step_0_is_the_identity_for_the_source_prompt_only(tiny_model, inversion):
    """C2/C3: at step 0 the edit's latent is the inverted x_T, so with the source prompt its maps are the source
    branch's and replacing them changes nothing; with another prompt it does. 0.2 of 4 steps: p2p guides 1 step."""
    same_on = edit(tiny_model, inversion, SOURCE, cross_replace=0.2)
    same_off = edit(tiny_model, inversion, SOURCE, cross_replace=0.0)
    assert (same_on - same_off).abs().max().item() < 1e-4  # explicit-softmax rounding only
    other_on = edit(tiny_model, inversion, TARGET, cross_replace=0.2)
    other_off = edit(tiny_model, inversion, TARGET, cross_replace=0.0)
    assert (other_on - other_off).abs().mean().item() > 1e-3


# --- checks before the first step -------------------------------------------------------------------------------

def test_refuses_what_cannot_reconstruct(tiny_model, inversion):
    plain = invert_video(tiny_model, clip(), prompt=SOURCE, steps=STEPS, attention="all")
    with pytest.raises(ValueError, match="turn on DDIM Invert's null_text"):
        vid2vid_zero_injection(plain)
    per_frame = invert_video(tiny_model, clip(), prompt=SOURCE, steps=STEPS, cfg=CFG, null_text=True,
                             null_inner_steps=1)
    with pytest.raises(ValueError, match="set its attention to 'all'"):
        vid2vid_zero_injection(per_frame)
    vid2vid_zero_injection(per_frame, Vid2VidZeroParams(st_attention="code"))  # the code inverts frame by frame
    with pytest.raises(ValueError, match="null_text_cfg"):
        edit_video(tiny_model, settings(cfg=5.0), injection=vid2vid_zero_injection(inversion))
    with pytest.raises(ValueError, match="chunk_size to at least the frame count"):
        edit_video(tiny_model, settings(chunk_size=2), injection=vid2vid_zero_injection(inversion))
    for bad, match in ((dict(st_attention="dense"), "st_attention 'dense' is unknown"),
                       (dict(cross_replace=1.5), "cross_replace must be"), (dict(mode="swap"), "mode 'swap'"),
                       (dict(null_uncond_ratio=2.0), "null_uncond_ratio")):
        with pytest.raises(ValueError, match=match):
            vid2vid_zero_injection(inversion, Vid2VidZeroParams(**bad))


def test_null_text_under_cross_frame_attention_runs_in_inference_mode():
    """ComfyUI and the headless runner run nodes under torch.inference_mode(); null-text inversion's autograd then
    gathers keys/values with the rule's cached index table, which must not be an inference tensor."""
    from comfyui_video_edit.pipelines_core.attention.rules import placed_index
    from comfyui_video_edit.pipelines_core.models.model import load_model

    placed_index.cache_clear()  # so the table is made here, inside inference mode
    with torch.inference_mode():
        model = load_model("builtin:tiny", device="cpu")
        inv = invert_video(model, clip(2), "a fox", steps=2, cfg=CFG, null_text=True, attention="all",
                           null_inner_steps=1)
    assert set(inv.null_embeds) == set(inv.timesteps.tolist())
