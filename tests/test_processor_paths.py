"""Which kernel the video attention processor runs: the fused SDPA kernel unless some edit wants the
probabilities of this very call (`AttnEdit.wants_probs`), then the explicit softmax path. Checked by
counting the kernels that ran, never by timing."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention

from comfyui_video_edit.pipelines_core.attention import RULES, AttnCall, AttnEdit, FrameLayout, VideoAttnProcessor, get_rule
from comfyui_video_edit.pipelines_core.attention import processor as processor_module
from comfyui_video_edit.pipelines_core.methods.fatezero import CrossAttentionFusion, Layer, SelfAttentionFusion

FRAMES, TOKENS, DIM = 4, 6, 16


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=DIM, heads=2, dim_head=8).eval()


@pytest.fixture
def kernels(monkeypatch):
    """Counts of the kernels the processor runs: {"sdpa": n, "explicit": n}."""
    counts = {"sdpa": 0, "explicit": 0}
    sdpa, explicit = processor_module.F.scaled_dot_product_attention, processor_module.attention_probs

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def counting_explicit(*args, **kwargs):
        counts["explicit"] += 1
        return explicit(*args, **kwargs)

    monkeypatch.setattr(processor_module.F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(processor_module, "attention_probs", counting_explicit)
    return counts


class IdentityProbs(AttnEdit):
    """Reads the probabilities and leaves them as they are: forces the explicit path on every call."""

    def __init__(self):
        self.seen = []

    def probs(self, call, p):
        self.seen.append(call.layout.step if call.layout is not None else None)
        return p


class SomeSteps(IdentityProbs):
    """Wants the probabilities only at the given steps."""

    def __init__(self, steps):
        super().__init__()
        self.steps = set(steps)

    def wants_probs(self, call):
        return call.layout.step in self.steps


class Scale(AttnEdit):
    """Changes probabilities (to tell the paths apart by value), but only where it says it wants them."""

    def __init__(self, steps):
        self.steps = set(steps)

    def wants_probs(self, call):
        return call.layout.step in self.steps

    def probs(self, call, p):
        return p * 0.5 if call.layout.step in self.steps else p


def distinct_frames(chunks=2):
    return torch.randn(chunks * FRAMES, TOKENS, DIM, generator=torch.Generator().manual_seed(3))


def run(attn, processor, x, **kw):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x, **kw)


@pytest.mark.parametrize("name", list(RULES))
def test_no_edits_take_sdpa_and_match_the_explicit_path(attn, kernels, name):
    x = distinct_frames()
    layout = FrameLayout(FRAMES, tuple(range(FRAMES)), ("uncond", "cond"), timestep=500, step=0)
    fast = run(attn, VideoAttnProcessor(get_rule(name)), x, layout=layout)
    assert kernels == {"sdpa": 1, "explicit": 0}
    explicit = run(attn, VideoAttnProcessor(get_rule(name), "attn1", [IdentityProbs()]), x, layout=layout)
    assert kernels == {"sdpa": 1, "explicit": 1}
    assert (fast - explicit).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(RULES))
def test_cross_attention_without_edits_takes_sdpa(attn, kernels, name):
    x, text = distinct_frames(), torch.randn(2 * FRAMES, 5, DIM, generator=torch.Generator().manual_seed(4))
    layout = FrameLayout(FRAMES, tuple(range(FRAMES)), ("uncond", "cond"), step=0)
    fast = run(attn, VideoAttnProcessor(get_rule(name)), x, encoder_hidden_states=text, layout=layout)
    explicit = run(attn, VideoAttnProcessor(get_rule(name), "attn2", [IdentityProbs()]), x,
                   encoder_hidden_states=text, layout=layout)
    assert kernels == {"sdpa": 1, "explicit": 1}
    assert (fast - explicit).abs().max() <= 1e-5


def test_edits_that_never_touch_probs_keep_sdpa(attn, kernels):
    class OutOnly(AttnEdit):
        def out(self, call, h):
            return h

    run(attn, VideoAttnProcessor(get_rule("first+previous"), "attn1", [OutOnly(), SomeSteps(())]),
        distinct_frames(), layout=FrameLayout(FRAMES, step=3))
    assert kernels == {"sdpa": 1, "explicit": 0}


def test_default_wants_probs_is_whether_probs_is_overridden():
    call = AttnCall("attn1", True, 2, FrameLayout(FRAMES, step=0))
    assert IdentityProbs().wants_probs(call) and not AttnEdit().wants_probs(call)


def test_only_the_calls_an_edit_wants_are_explicit(attn, kernels):
    x = distinct_frames()
    edit = SomeSteps({1, 3})
    processor = VideoAttnProcessor(get_rule("first"), "attn1", [edit])
    paths = []
    for step in range(5):
        before = dict(kernels)
        run(attn, processor, x, layout=FrameLayout(FRAMES, step=step))
        paths.append("explicit" if kernels["explicit"] > before["explicit"] else "sdpa")
    assert paths == ["sdpa", "explicit", "sdpa", "explicit", "sdpa"]
    assert edit.seen == [1, 3]  # probs ran only on the explicit calls
    assert kernels == {"sdpa": 3, "explicit": 2}


def test_one_edit_wanting_probs_runs_every_edits_probs(attn, kernels):
    x = distinct_frames()
    never, always = SomeSteps(()), IdentityProbs()
    run(attn, VideoAttnProcessor(get_rule("first"), "attn1", [never, always]), x, layout=FrameLayout(FRAMES, step=2))
    assert kernels == {"sdpa": 0, "explicit": 1}
    assert never.seen == [2] and always.seen == [2]  # as before: every edit's probs sees an explicit call


def test_per_call_edit_changes_only_its_calls(attn, kernels):
    x = distinct_frames()
    rule = get_rule("previous")
    plain = run(attn, VideoAttnProcessor(rule), x, layout=FrameLayout(FRAMES, step=0))
    processor = VideoAttnProcessor(rule, "attn1", [Scale({1})])
    outside = run(attn, processor, x, layout=FrameLayout(FRAMES, step=0))
    inside = run(attn, processor, x, layout=FrameLayout(FRAMES, step=1))
    assert torch.equal(outside, plain)  # the same kernel as without the edit: the same bits
    assert (inside - plain).abs().max() > 1e-3


# --- FateZero's edits keep the explicit path on every call they are installed on --------------------------
# Outside their windows their `probs` returns p unchanged, but moving those calls to SDPA changes the
# fatezero_edit workflow's bits (the two kernels round differently; measured: latents up to 2.3e-5, images
# up to 1.9e-6 at 6 frames x 6 steps), so they keep the default answer until a change of outputs is accepted.

def fatezero_call(step, is_self=True):
    layout = FrameLayout(2, (0, 1), ("source", "uncond", "cond"), timestep=900, step=step)
    return AttnCall("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor", is_self, 2, layout)


def test_fatezero_edits_stay_on_the_explicit_path_outside_their_windows():
    self_edit = SelfAttentionFusion(SimpleNamespace(self_steps=1), Layer("attn1", True, (2, 2)))
    cross_edit = CrossAttentionFusion(SimpleNamespace(cross_steps=1), Layer("attn2", False, (2, 2)))
    assert all(self_edit.wants_probs(fatezero_call(step)) for step in range(4))
    assert all(cross_edit.wants_probs(fatezero_call(step, is_self=False)) for step in range(4))
