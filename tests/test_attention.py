"""Cross-frame attention: the processor against diffusers' own, and the rules' invariants (methods.md §6 B)."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from comfyui_video_edit.pipelines_core.attention import (
    RULES, FrameLayout, VideoAttnProcessor, attention_processors, get_rule, select_kv,
)
from comfyui_video_edit.pipelines_core.attention.rules import own_frame

FRAMES, TOKENS, DIM = 4, 6, 16
CROSS_RULES = [name for name in RULES if name != "none"]


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=DIM, heads=2, dim_head=8).eval()


def distinct_frames(chunks=2):
    return torch.randn(chunks * FRAMES, TOKENS, DIM, generator=torch.Generator().manual_seed(3))


def run(attn, processor, x, **kw):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x, **kw)


def test_rules_are_index_tables():
    assert get_rule("first")(4).tolist() == [[0], [0], [0], [0]]
    assert get_rule("previous")(4).tolist() == [[0], [0], [1], [2]]
    assert get_rule("first+previous")(4).tolist() == [[0, 0], [0, 0], [0, 1], [0, 2]]
    assert get_rule("all")(3).tolist() == [[0, 1, 2]] * 3
    assert get_rule("none")(3).tolist() == [[0], [1], [2]]
    with pytest.raises(ValueError, match="choose one of"):
        get_rule("sideways")


def test_select_kv_gathers_within_each_chunk():
    x = torch.arange(2 * 3).float().view(6, 1, 1)  # chunk 0: frames 0,1,2 ; chunk 1: 3,4,5
    out = select_kv(x, get_rule("first+previous")(3), 3)
    assert out.view(6, 2).tolist() == [[0, 0], [0, 0], [0, 1], [3, 3], [3, 3], [3, 4]]


def test_B1_no_rule_equals_diffusers_processors(attn):
    x = distinct_frames()
    ours = run(attn, VideoAttnProcessor(), x, layout=FrameLayout(FRAMES))
    sdpa = run(attn, AttnProcessor2_0(), x)
    classic = run(attn, AttnProcessor(), x)
    assert (ours - sdpa).abs().max() <= 1e-6
    assert (ours - classic).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["first", "previous", "first+previous"])
def test_B2_frame_zero_is_plain_attention(attn, name):
    x = distinct_frames()
    plain = run(attn, AttnProcessor2_0(), x)
    ours = run(attn, VideoAttnProcessor(get_rule(name)), x, layout=FrameLayout(FRAMES))
    for chunk in range(2):
        assert (ours[chunk * FRAMES] - plain[chunk * FRAMES]).abs().max() <= 1e-6


@pytest.mark.parametrize("name", CROSS_RULES)
def test_B3_identical_frames_give_plain_attention(attn, name):
    one = torch.randn(2, 1, TOKENS, DIM, generator=torch.Generator().manual_seed(5))
    x = one.expand(2, FRAMES, TOKENS, DIM).reshape(2 * FRAMES, TOKENS, DIM)
    plain = run(attn, AttnProcessor2_0(), x)
    ours = run(attn, VideoAttnProcessor(get_rule(name)), x, layout=FrameLayout(FRAMES))
    assert (ours - plain).abs().max() <= 1e-6


@pytest.mark.parametrize("name", CROSS_RULES)
def test_B4_distinct_frames_change_later_frames(attn, name):
    x = distinct_frames()
    plain = run(attn, AttnProcessor2_0(), x)
    ours = run(attn, VideoAttnProcessor(get_rule(name)), x, layout=FrameLayout(FRAMES))
    later = [c * FRAMES + f for c in range(2) for f in range(2, FRAMES)]  # frame 1 under "previous"/"first" reads frame 0 too
    assert (ours[later] - plain[later]).abs().amax(dim=(1, 2)).min() > 1e-3


@pytest.mark.parametrize("name", CROSS_RULES)
def test_B5_chunks_do_not_see_each_other(attn, name):
    x = distinct_frames()
    y = x.clone()
    y[:FRAMES] += torch.randn(FRAMES, TOKENS, DIM)  # perturb only the uncond chunk
    proc = VideoAttnProcessor(get_rule(name))
    a = run(attn, proc, x, layout=FrameLayout(FRAMES))
    b = run(attn, proc, y, layout=FrameLayout(FRAMES))
    assert torch.equal(a[FRAMES:], b[FRAMES:])


@pytest.mark.parametrize("name", CROSS_RULES)
def test_B6_cross_attention_is_untouched(attn, name):
    x = distinct_frames()
    text = torch.randn(2 * FRAMES, 5, DIM)
    plain = run(attn, AttnProcessor2_0(), x, encoder_hidden_states=text)
    ours = run(attn, VideoAttnProcessor(get_rule(name)), x, encoder_hidden_states=text, layout=FrameLayout(FRAMES))
    assert (ours - plain).abs().max() <= 1e-6


def test_B7_all_frames_is_permutation_equivariant(attn):
    x = distinct_frames(chunks=1)
    perm = torch.tensor([2, 0, 3, 1])
    proc = VideoAttnProcessor(get_rule("all"))
    out = run(attn, proc, x, layout=FrameLayout(FRAMES))
    out_perm = run(attn, proc, x[perm], layout=FrameLayout(FRAMES))
    assert (out[perm] - out_perm).abs().max() <= 1e-6


def test_processors_restored_after_an_exception(tiny_model):
    unet = tiny_model.unet
    before = {k: id(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with attention_processors(unet, lambda name: VideoAttnProcessor(get_rule("all"))) as installed:
            assert all(isinstance(p, VideoAttnProcessor) for p in unet.attn_processors.values())
            assert set(installed) == set(before)
            raise RuntimeError("boom")
    assert {k: id(v) for k, v in unet.attn_processors.items()} == before


def test_own_frame_rule_is_the_identity_rule():
    assert own_frame is get_rule("none")
