"""Plug-and-Play and TokenFlow injections: layer selection, replay identity, step gating, keyframes, propagation."""

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from comfyui_video_edit.pipelines_core.attention.layers import (
    decoder_self_attention, ldm_decoder_layers, pnp_attention_layers, pnp_feature_module,
)
from comfyui_video_edit.pipelines_core.methods.plug_and_play import PnPParams, pnp_injection, pnp_planner
from comfyui_video_edit.pipelines_core.attention.processor import AttnEdit, FrameLayout, VideoAttnProcessor
from comfyui_video_edit.pipelines_core.attention.rules import all_frames, own_frame
from comfyui_video_edit.pipelines_core.methods.tokenflow import (
    ExtendedAttention, KeyframeLayout, TokenFlowParams, TokenFlowRun, keyframe_pairs, nearest_tokens,
    propagate_from_keyframes, tokenflow_injection, tokenflow_planner,
)
from comfyui_video_edit.pipelines_core.sampling.hooks import Hooks
from comfyui_video_edit.pipelines_core.sampling.injection import Injection, InjectionPlan
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

SOURCE = "a photo of a street"
TARGET = "an oil painting of a dragon"
STEPS = 5



def frames(count: int, seed: int, static: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if static:
        return torch.rand(1, 32, 48, 3, generator=g).expand(count, -1, -1, -1).clone()
    return torch.rand(count, 32, 48, 3, generator=g)


@pytest.fixture(scope="module")
def moving(tiny_model):
    return invert_video(tiny_model, frames(3, 1), prompt=SOURCE, steps=STEPS)


@pytest.fixture(scope="module")
def static(tiny_model):
    return invert_video(tiny_model, frames(3, 2, static=True), prompt=SOURCE, steps=STEPS)


def settings(**kw) -> SamplerSettings:
    base = dict(prompt=TARGET, steps=STEPS, cfg=5.0, strength=1.0, attention="none")
    return SamplerSettings(**{**base, **kw})


def source_branch_only(inversion) -> Injection:
    return Injection("none", inversion, None, lambda inj, ctx: InjectionPlan(source_branch=True))


# --- B9: layer selection ------------------------------------------------------------------------

SD15_DECODER_4_11 = [
    f"up_blocks.{b}.attentions.{j}.transformer_blocks.0.attn1.processor"
    for b, j in [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
]



def test_decoder_4_11_selects_the_papers_layers_on_sd15(sd15_unet):
    names = list(sd15_unet.attn_processors)
    assert len(names) == 32
    assert pnp_attention_layers(names) == SD15_DECODER_4_11
    assert ldm_decoder_layers(names, 4, 11) == SD15_DECODER_4_11
    assert len(decoder_self_attention(names)) == 9  # Pix2Video's COND_LAYER >= 7: every up-block attn1
    assert pnp_feature_module(sd15_unet) == "up_blocks.1.resnets.1"


def test_selectors_fall_back_by_level_on_the_tiny_unet(tiny_model):
    names = list(tiny_model.unet.attn_processors)
    assert pnp_attention_layers(names) == [  # all decoder attn1 but the lowest-resolution block's first
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor",
    ]
    assert pnp_feature_module(tiny_model.unet) == "up_blocks.0.resnets.1"


# --- C1/C2/C3: replay identity and its negative control -----------------------------------------

def replay(model, inversion, injection, follow):
    """Sample with the edit latent forced to `follow`'s inverted latent at every step (edit == source
    latent), the source prompt as target and cfg 1; return the clean estimates of every step."""
    estimates = []

    def onto_source(state):
        return follow.latents[int(state.timestep)].to(state.latents)

    def keep(state):
        estimates.append(state.x0.clone())
        return state.x0

    edit_video(model, settings(prompt=SOURCE, cfg=1.0), injection=injection,
               hooks=Hooks(before_model=[onto_source], on_x0=[keep]))
    return torch.stack(estimates)


def one_step_off(inversion):
    """The inversion with every latent moved to the neighbouring timestep (an index-vs-timestep bug)."""
    keys = [int(t) for t in inversion.timesteps] + [0]
    shifted = {t: inversion.latents[nxt] for t, nxt in zip(keys[:-1], keys[1:])}
    return replace(inversion, latents={**inversion.latents, **shifted})


@pytest.mark.parametrize("method", ["pnp", "tokenflow"])
def test_replay_identity_and_off_by_one_control(tiny_model, moving, static, method):
    """Target == source prompt and edit latent == source latent: injection changes nothing (C1/C2); the same
    injection read one timestep off changes the result (C3). TokenFlow's edit chunks use extended attention
    while its source chunk does not, so their features coincide only on a static clip: it is tested there."""
    if method == "pnp":
        inversion, make = moving, lambda inv, f, a: pnp_injection(inv, PnPParams(f, a))
    else:
        inversion, make = static, lambda inv, f, a: tokenflow_injection(inv, TokenFlowParams(f, a, kf_every=2))
    off = one_step_off(inversion)
    baseline = replay(tiny_model, inversion, make(inversion, 0.0, 0.0), inversion)
    injected = replay(tiny_model, inversion, make(inversion, 0.8, 0.5), inversion)
    misread = replay(tiny_model, inversion, make(off, 0.8, 0.5), inversion)
    assert (injected - baseline).abs().max() <= 1e-5
    assert (misread - baseline).abs().max() > 1e-2


def test_window_zero_is_no_injection(tiny_model, moving):
    plain = edit_video(tiny_model, settings(), injection=source_branch_only(moving))
    none = edit_video(tiny_model, settings(), injection=pnp_injection(moving, PnPParams(0.0, 0.0)))
    assert torch.equal(plain, none)


# --- C4: step gating ------------------------------------------------------------------------------

class SourceEquality(AttnEdit):
    """Observer placed after the injection: logs (layer, step) where the cond chunk's q and k equal the source's."""

    def __init__(self, log):
        self.log = log

    def qkv(self, call, q, k, v):
        layout = call.layout
        if call.is_self and layout is not None and "source" in layout.roles:
            src, cond = layout.roles.index("source"), layout.roles.index("cond")
            rows = lambda x, c: x[c * layout.frames:(c + 1) * layout.frames]
            if torch.equal(rows(q, src), rows(q, cond)) and torch.equal(rows(k, src), rows(k, cond)):
                self.log.append((call.name, layout.step))
            if torch.equal(rows(v, src), rows(v, cond)):
                self.log.append((call.name, "v"))
        return q, k, v


def observed_pnp(qk_log, feature_log):
    """The real PnP plan with observers added after its edits and patches."""
    def planner(injection, context):
        plan = pnp_planner(injection, context)
        watch = SourceEquality(qk_log)

        @contextmanager
        def patches(unet):
            with plan.patches(unet):
                conv2 = unet.get_submodule(pnp_feature_module(unet)).conv2
                chunks = lambda out: out.chunk(3)  # [source, uncond, cond]
                handle = conv2.register_forward_hook(
                    lambda m, a, out: feature_log.append(torch.equal(chunks(out)[0], chunks(out)[2])))
                try:
                    yield
                finally:
                    handle.remove()

        return replace(plan, edits_for=lambda name: tuple(plan.edits_for(name)) + (watch,), patches=patches)

    return planner


def test_injection_fires_on_exactly_the_window_steps(tiny_model):
    inversion = invert_video(tiny_model, frames(2, 3), prompt=SOURCE, steps=10)
    qk_log, feature_log = [], []
    injection = Injection("pnp", inversion, PnPParams(pnp_f_t=0.8, pnp_attn_t=0.5), observed_pnp(qk_log, feature_log))
    edit_video(tiny_model, settings(steps=10), injection=injection)
    injected = set(pnp_attention_layers(tiny_model.unet.attn_processors))
    for name in injected:
        assert [step for layer, step in qk_log if layer == name] == [0, 1, 2, 3, 4]  # values are never copied
    excluded = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"  # follows cross-attention
    assert not [step for layer, step in qk_log if layer == excluded]
    assert [i for i, same in enumerate(feature_log) if same] == list(range(8))  # one UNet call per step


# --- structure preservation -------------------------------------------------------------------------

def test_pnp_edits_while_keeping_the_source_structure(tiny_model, moving):
    reconstruction = edit_video(tiny_model, settings(prompt=SOURCE, cfg=1.0), inversion=moving)
    plain = edit_video(tiny_model, settings(), inversion=moving)
    pnp = edit_video(tiny_model, settings(), injection=pnp_injection(moving))
    distance = lambda a, b: (a - b).pow(2).mean().item()
    assert distance(pnp, reconstruction) > 1e-2  # the target prompt still edits
    assert distance(pnp, reconstruction) < 0.95 * distance(plain, reconstruction)


# --- F2: the TokenFlow nearest-neighbour field ---------------------------------------------------------

def layout_of(frames: int) -> FrameLayout:
    return FrameLayout(frames, tuple(range(frames)), ("source", "cond"), 500, 0)


def test_identical_frames_give_identity_correspondences_and_keyframe_outputs():
    g = torch.Generator().manual_seed(0)
    count, keyframes = 6, (1, 4)
    one = torch.randn(16, 8, generator=g)
    tokens = one.expand(2 * count, -1, -1).clone()  # two chunks of identical frames
    index = nearest_tokens(tokens[:count], tokens[:count])
    assert torch.equal(index, torch.arange(16).expand(count, -1))
    same_out = torch.randn(16, 8, generator=g).expand(2 * len(keyframes), -1, -1).clone()
    out = propagate_from_keyframes(tokens, layout_of(count), keyframes, same_out, "linear")
    assert torch.allclose(out, same_out[:1].expand(2 * count, -1, -1), atol=1e-6)
    # distinct keyframe outputs: every frame gets exactly w*T[before] + (1-w)*T[after], token by token
    kf_out = torch.randn(2 * len(keyframes), 16, 8, generator=g)
    out = propagate_from_keyframes(tokens, layout_of(count), keyframes, kf_out, "linear").view(2, count, 16, 8)
    before, after, w = keyframe_pairs(count, keyframes)
    kf = kf_out.view(2, len(keyframes), 16, 8)
    for i in range(count):
        expected = w[i].float() * kf[:, before[i]] + (1 - w[i].float()) * kf[:, after[i]]
        assert torch.allclose(out[:, i], expected, atol=1e-6)


def test_correspondences_follow_moved_tokens_and_stay_in_range():
    g = torch.Generator().manual_seed(1)
    key = torch.randn(1, 20, 8, generator=g)
    moves = torch.stack([torch.randperm(20, generator=g) for _ in range(4)])
    queries = key[0][moves] * 3.0  # each frame: the keyframe's tokens moved (and scaled: cosine ignores it)
    index = nearest_tokens(queries, key.expand(4, -1, -1))
    assert torch.equal(index, moves)
    random_index = nearest_tokens(torch.randn(5, 20, 8, generator=g), torch.randn(5, 12, 8, generator=g))
    assert random_index.min() >= 0 and random_index.max() < 12


def test_correspondences_come_from_the_source_chunk():
    """Source frames are moved copies of the keyframe; the cond chunk's own tokens are noise. Both chunks
    take the keyframe's outputs along the source's moves."""
    g = torch.Generator().manual_seed(2)
    count, keyframes = 3, (0,)
    key = torch.randn(10, 8, generator=g)
    moves = torch.stack([torch.arange(10)] + [torch.randperm(10, generator=g) for _ in range(count - 1)])
    tokens = torch.cat([key[moves], torch.randn(count, 10, 8, generator=g)])  # [source, cond]
    kf_out = torch.randn(2, 10, 8, generator=g)  # the keyframe's output in each chunk
    out = propagate_from_keyframes(tokens, layout_of(count), keyframes, kf_out, "linear").view(2, count, 10, 8)
    for i in range(count):
        assert torch.equal(out[:, i], kf_out[:, moves[i]])


def test_extended_attention_is_joint_for_edits_and_per_frame_for_the_source():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(3 * 4, 6, 16, generator=torch.Generator().manual_seed(1))  # [source, uncond, cond] x 4 keyframes
    roles = ("source", "uncond", "cond")

    def run(processor, layout):
        attn.set_processor(processor)
        with torch.no_grad():
            return attn(x, layout=layout)

    extended = run(VideoAttnProcessor(own_frame, "attn1", [ExtendedAttention()]),
                   KeyframeLayout(4, (0, 1, 2, 3), roles, 500, 0, keyframes=(0, 1, 2, 3)))
    per_frame = run(VideoAttnProcessor(own_frame), FrameLayout(4, (0, 1, 2, 3), roles))
    joint = run(VideoAttnProcessor(all_frames), FrameLayout(4, (0, 1, 2, 3), roles))
    assert (extended[:4] - per_frame[:4]).abs().max() <= 1e-6
    assert (extended[4:] - joint[4:]).abs().max() <= 1e-6
    assert (joint[:4] - per_frame[:4]).abs().max() > 1e-3  # the two references differ
    ordinary = run(VideoAttnProcessor(own_frame, "attn1", [ExtendedAttention()]), FrameLayout(4, (0, 1, 2, 3), roles))
    assert torch.equal(ordinary, per_frame)  # only the keyframe calls (TokenFlow's token edit) are extended


@pytest.mark.parametrize("blend", ["linear", "sigmoid"])
def test_keyframe_weights_are_convex(blend):
    for count, keyframes in [(8, (3,)), (16, (2, 9)), (17, (0, 8, 16)), (24, (7, 8, 23))]:
        before, after, w = keyframe_pairs(count, keyframes, blend)
        assert ((w >= 0) & (w <= 1)).all()
        kf = torch.tensor(keyframes)
        i = torch.arange(count)
        between = (kf[before] <= i) & (i < kf[after])
        assert between.sum() == (kf[-1] - kf[0])  # frames between two keyframes mix the pair around them
        if blend == "linear":
            assert torch.equal(w[kf], torch.ones(len(kf), dtype=w.dtype))  # a keyframe is its own source
            near_before = (i - kf[before]) < (kf[after] - i)
            assert (w[between & near_before] > 0.5).all()  # the nearer keyframe weighs more
        else:
            pair = before != after  # (a lone keyframe takes weight 1)
            assert ((w[pair] >= 0.5) & (w[pair] <= torch.sigmoid(torch.tensor(1.0, dtype=w.dtype)))).all()


# --- TokenFlow sampling -------------------------------------------------------------------------------

def test_keyframes_are_redrawn_every_step_and_repeat_for_a_seed():
    params = TokenFlowParams(kf_every=4)

    def draws(seed):
        run = TokenFlowRun(params, seed)
        return [run.keyframes_for(replace(layout_of(14), step=s)) for s in range(8)]

    first = draws(7)
    for keyframes in first:
        assert len(keyframes) == 4 and all(4 * g <= k < min(4 * g + 4, 14) for g, k in enumerate(keyframes))
    assert len(set(first)) > 1
    assert draws(7) == first
    assert draws(8) != first


def test_tokenflow_is_seeded_and_uses_its_keyframes(tiny_model, moving):
    run = lambda seed: edit_video(tiny_model, settings(seed=seed),
                                  injection=tokenflow_injection(moving, TokenFlowParams(kf_every=3)))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))  # an inversion start uses no noise: only the keyframes differ


def test_every_frame_is_made_of_keyframe_tokens(tiny_model, moving):
    """One keyframe for the clip: every frame's attn1 output (each chunk, each block) is a rearrangement of
    the keyframe's output tokens."""
    outputs = []

    def planner(injection, context):
        plan = tokenflow_planner(injection, context)

        @contextmanager
        def patches(unet):
            with plan.patches(unet):
                handles = [m.attn1.register_forward_hook(lambda mod, a, out: outputs.append(out))
                           for m in unet.modules() if hasattr(m, "attn1")]
                try:
                    yield
                finally:
                    for handle in handles:
                        handle.remove()

        return replace(plan, patches=patches)

    params = TokenFlowParams(kf_every=3)
    edit_video(tiny_model, settings(), injection=Injection("tokenflow", moving, params, planner))
    assert len(outputs) == STEPS * len(tokenflow_blocks(tiny_model.unet))
    for out in outputs:
        chunks = out.view(3, 3, *out.shape[1:])  # [source, uncond, cond] x 3 frames
        made_of = lambda frame, kf: all((chunks[:, frame, n, None] == chunks[:, kf]).all(-1).any(-1).all()
                                        for n in range(out.shape[1]))
        keyframe = [k for k in range(3) if all(made_of(f, k) for f in range(3))]
        assert keyframe, "a frame's self-attention output was not propagated from the keyframe"


def tokenflow_blocks(unet):
    return [m for m in unet.modules() if hasattr(m, "attn1")]


def test_tokenflow_on_a_static_clip_equals_pnp(tiny_model, static):
    """Identical frames: extended attention == per-frame and every correspondence is the identity."""
    pnp = edit_video(tiny_model, settings(), injection=pnp_injection(static))
    tokenflow = edit_video(tiny_model, settings(), injection=tokenflow_injection(static, TokenFlowParams(kf_every=2)))
    assert (tokenflow - pnp).abs().max() <= 1e-4  # CFG 5 amplifies rounding of the duplicated keys
    uninjected = edit_video(tiny_model, settings(), injection=pnp_injection(static, PnPParams(0.0, 0.0)))
    assert (uninjected - pnp).abs().max() > 1e-2  # (the comparison is not vacuous: PnP itself acts here)


def test_tokenflow_changes_a_moving_clip(tiny_model, moving):
    pnp = edit_video(tiny_model, settings(), injection=pnp_injection(moving))
    tokenflow = edit_video(tiny_model, settings(), injection=tokenflow_injection(moving, TokenFlowParams(kf_every=3)))
    assert (tokenflow - pnp).abs().max() > 1e-2


# --- attach / detach -------------------------------------------------------------------------------------

def hook_counts(unet) -> list:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m)) for m in unet.modules()]


@pytest.mark.parametrize("make", [pnp_injection, lambda inv: tokenflow_injection(inv, TokenFlowParams(kf_every=2))])
def test_patches_are_removed_after_sampling_and_after_an_error(tiny_model, moving, make):
    unet = tiny_model.unet
    before = hook_counts(unet)
    edit_video(tiny_model, settings(), injection=make(moving))
    assert hook_counts(unet) == before

    def fail(state):
        if state.index == 1:
            raise RuntimeError("interrupted")
        return state.latents

    with pytest.raises(RuntimeError, match="interrupted"):
        edit_video(tiny_model, settings(), injection=make(moving), hooks=Hooks(before_model=[fail]))
    assert hook_counts(unet) == before
    again = edit_video(tiny_model, settings(), injection=source_branch_only(moving))
    plain = edit_video(tiny_model, settings(), inversion=moving)
    assert (again - plain).abs().max() <= 1e-4  # nothing left acting on the UNet


def test_bad_parameters_are_refused(moving):
    with pytest.raises(ValueError, match="pnp_attn_t"):
        pnp_injection(moving, PnPParams(pnp_attn_t=1.5))
    with pytest.raises(ValueError, match="DDIM Invert"):
        pnp_injection(None)
    with pytest.raises(ValueError, match="blend"):
        tokenflow_injection(moving, TokenFlowParams(blend="cubic"))
    with pytest.raises(ValueError, match="kf_every"):
        tokenflow_injection(moving, TokenFlowParams(kf_every=0))
