"""Edit-A-Video's sparse-causal blending: frame i's latent-blend mask is M[0] | M[i-1] | M[i]; FateZero's latent blend
applies it across the whole clip; the node refuses a graph without blend words before anything runs; the shipped
workflow runs headless and its blending moves the edit (frame 0 excepted).

builtin:tiny (its queries scaled x8 where a blend mask must have structure, as in test_fatezero.py), 4 frames of
64x48 (engine) or 128x96 (workflow), 4-6 steps. Figures measured here are quoted next to each floor.
"""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from comfyui_video_edit.headless import WorkflowError, execute, object_info, ui_to_api, validate
from comfyui_video_edit.headless.cli import main
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_video_edit.nodes.method_edit_a_video import VE_InjectEditAVideo
from comfyui_video_edit.nodes.method_fatezero import VE_InjectFateZero
from comfyui_video_edit.pipelines_core.attention.store import RecordSpec
from comfyui_video_edit.pipelines_core.flow.estimate import estimate_flow
from comfyui_video_edit.pipelines_core.flow.warp import warp_error
from comfyui_video_edit.pipelines_core.methods.edit_a_video import SPARSE_CAUSAL, edit_a_video, sparse_causal_union
from comfyui_video_edit.pipelines_core.methods.fatezero import (
    FateZeroParams, FateZeroRun, blend_mask, fatezero_injection, latent_blend_active, word_map)
from comfyui_video_edit.pipelines_core.methods import prompt_to_prompt as p2p
from comfyui_video_edit.pipelines_core.sampling.hooks import StepState
from comfyui_video_edit.pipelines_core.sampling.injection import PlanContext
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "edit_a_video_edit.json"
INFO = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
SOURCE, TARGET = "a red car on a road", "a blue car on a road"
STEPS, CFG = 6, 3.0


# --- the rule ----------------------------------------------------------------------------------------------

def one_frame(frames: int, at: int, seed: int = 0) -> torch.Tensor:
    """Masks empty on every frame but `at`, which holds a random pattern."""
    masks = torch.zeros(frames, 6, 8, dtype=torch.bool)
    masks[at] = torch.rand(6, 8, generator=torch.Generator().manual_seed(seed)) > 0.5
    return masks


def test_sparse_causal_union_is_the_first_the_previous_and_the_own_frame():
    masks = torch.rand(6, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.7
    joined = sparse_causal_union(masks)
    assert joined.dtype == torch.bool and joined.shape == masks.shape
    assert torch.equal(joined[0], masks[0])  # frame 0 reads only itself
    for i in range(1, 6):
        assert torch.equal(joined[i], masks[0] | masks[i - 1] | masks[i]), i
    assert torch.equal(sparse_causal_union(masks[:1]), masks[:1])  # a single frame keeps its mask


def test_a_mask_on_frame_0_spreads_to_every_frame_and_one_on_frame_2_reaches_frames_2_and_3_only():
    first = one_frame(5, 0)
    assert torch.equal(sparse_causal_union(first), first[:1].expand(5, -1, -1))
    third = one_frame(5, 2)
    joined = sparse_causal_union(third)
    assert [bool(joined[k].any()) for k in range(5)] == [False, False, True, True, False]
    assert torch.equal(joined[2], third[2]) and torch.equal(joined[3], third[2])
    for at in range(1, 5):  # any later frame: itself and its successor, nothing else
        reached = [k for k in range(5) if sparse_causal_union(one_frame(5, at, seed=at))[k].any()]
        assert reached == ([at, at + 1] if at < 4 else [4]), (at, reached)


# --- in FateZero's latent blend ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_model(tiny_model):
    """Queries scaled x8: at random init the tiny model's attention is nearly uniform and every blend mask covers
    the whole frame; scaled, its maps peak as a trained model's do (test_fatezero.py's sharp model)."""
    unet = copy.deepcopy(tiny_model.unet)
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            module.to_q.weight.mul_(8.0)
    return tiny_model.with_changes(unet=unet, source="builtin:tiny (sharp attention)")


def recorded(model, frames):
    return invert_video(model, frames, prompt=SOURCE, steps=STEPS, record=RecordSpec(cross_probs=True),
                        attention="first+previous")


@pytest.fixture(scope="module")
def moving(sharp_model):
    """Four different 64x48 frames: each has its own blend mask."""
    return recorded(sharp_model, torch.rand(4, 48, 64, 3, generator=torch.Generator().manual_seed(7)))


@pytest.fixture(scope="module")
def still(sharp_model):
    """One 64x48 frame four times: every frame has the same blend mask."""
    frame = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(7))
    return recorded(sharp_model, frame.expand(4, -1, -1, -1))


def blended(model, inversion, blend_frames: str, index: int, th: float = 0.8):
    """FateZero's latent blend after step `index` on random latents (source words only, so M is the inverted
    maps' mask at that step), and that mask per frame."""
    params = FateZeroParams(self_replace=0.0, cross_replace=0.0, blend_words=("car",), blend_th=th, source="stored",
                            blend_frames=blend_frames)
    timesteps = tuple(int(t) for t in inversion.timesteps)
    context = PlanContext(model, 4, STEPS, timesteps, CFG, 0, TARGET, inversion.attention, "all", inversion.chunk_size)
    run = FateZeroRun(inversion, params, context)
    x = torch.randn(inversion.latents[0].shape, generator=torch.Generator().manual_seed(index))
    out = run.latent_blend(StepState(index, torch.tensor(timesteps[index]), STEPS, x))
    words = p2p.word_positions(model.tokenizer, SOURCE, ["car"], 77)
    maps = [inversion.store.get(layer.name, timesteps[index], "cross_probs") for layer in run.mask_layers]
    own = blend_mask(word_map(maps, words, run.mask_layers[0].grid), run.latent_size, th)
    x_src = inversion.latents[timesteps[index + 1]]
    return out, x, x_src, own


@pytest.mark.parametrize("index", [1, 2])
def test_the_latent_blend_keeps_exactly_the_sparse_causal_union(sharp_model, moving, index):
    assert latent_blend_active(index, STEPS, (0.2, 0.8))
    own_out, x, x_src, own = blended(sharp_model, moving, "own", index)
    sc_out, _, _, _ = blended(sharp_model, moving, SPARSE_CAUSAL, index)
    assert not all(torch.equal(own[0], own[k]) for k in range(4)), "the frames' masks must differ for this test"
    # kept: the edit's latent (x_src + 1*(x - x_src), up to rounding); restored: exactly the inverted latent
    kept = lambda out: torch.isclose(out, x, rtol=0, atol=1e-5).all(1)  # noqa: E731
    restored = lambda out: (out == x_src).all(1)  # noqa: E731
    joined = sparse_causal_union(own)
    assert torch.equal(kept(own_out), own) and torch.equal(restored(own_out), ~own)
    assert torch.equal(kept(sc_out), joined) and torch.equal(restored(sc_out), ~joined)
    assert torch.equal(sc_out[0], own_out[0])  # frame 0 keeps its own mask
    assert not torch.equal(sc_out, own_out)  # later frames keep more of the edit


def test_with_the_same_mask_on_every_frame_sparse_causal_blending_is_own_frame_blending(sharp_model, still):
    own_out, _, _, own = blended(sharp_model, still, "own", 2)
    sc_out, _, _, _ = blended(sharp_model, still, SPARSE_CAUSAL, 2)
    assert all(torch.equal(own[0], own[k]) for k in range(4)) and 0 < own.sum() < own.numel()
    assert torch.equal(sc_out, own_out)


def test_the_engine_refuses_sparse_causal_blending_without_a_latent_blend(tiny_model):
    inversion = invert_video(tiny_model, torch.rand(2, 32, 32, 3), prompt=SOURCE, steps=2)
    with pytest.raises(ValueError, match="blend_frames"):
        FateZeroParams(blend_frames="neighbours").check()
    for params in (FateZeroParams(), FateZeroParams(blend_words=("car",), latent_blend=None)):
        with pytest.raises(ValueError, match="sparse-causal blending .* give blend_words"):
            edit_a_video(fatezero_injection(inversion, params))
    injection = edit_a_video(fatezero_injection(inversion, FateZeroParams(blend_words=("car",))))
    assert injection.params == FateZeroParams(blend_words=("car",), blend_frames=SPARSE_CAUSAL)
    assert injection.inversion is inversion and injection.mode == "edit_a_video"


# --- the node ----------------------------------------------------------------------------------------------

def widget_defaults(cls) -> dict:
    return {k: spec[1]["default"] for k, spec in cls.INPUT_TYPES()["required"].items() if "default" in spec[1]}


def test_the_node_has_fatezeros_widgets_and_always_blends_sparse_causally(tiny_model):
    ours, theirs = VE_InjectEditAVideo.INPUT_TYPES()["required"], VE_InjectFateZero.INPUT_TYPES()["required"]
    assert list(ours) == list(theirs)
    for name in ours:  # same types, defaults and ranges; only the blend words' tooltip says they are required
        assert ours[name][0] == theirs[name][0]
        assert {**ours[name][1], "tooltip": ""} == {**theirs[name][1], "tooltip": ""}
    inversion = invert_video(tiny_model, torch.rand(2, 32, 32, 3), prompt=SOURCE, steps=2)
    widgets = {**widget_defaults(VE_InjectEditAVideo), "blend_words": "car", "target_blend_words": "car"}
    injection, = VE_InjectEditAVideo().build(inversion=inversion, **widgets)
    plain, = VE_InjectFateZero().build(inversion=inversion, **widgets)
    assert injection.params == FateZeroParams(blend_words=("car",), target_blend_words=("car",),
                                              blend_frames=SPARSE_CAUSAL)
    assert plain.params.blend_frames == "own"
    assert injection.params == dataclasses.replace(plain.params, blend_frames=SPARSE_CAUSAL)


def workflow(**injector) -> dict:
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), INFO)
    for node in prompt.values():
        if node["class_type"] == "VE_LoadVideo":
            node["inputs"].update(frame_cap=4, width=128, height=96)
        if node["class_type"] in ("VE_TuneOnClip", "VE_DDIMInvert", "VE_CrossFrameSampler"):
            node["inputs"]["steps"] = 4
        if node["class_type"] == "VE_InjectEditAVideo":
            node["inputs"].update(injector)
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


@pytest.mark.parametrize("words", ["", " , "])
def test_the_node_refuses_no_blend_words_before_anything_runs(tmp_path, capsys, words):
    assert VE_InjectEditAVideo.VALIDATE_INPUTS(blend_words="car") is True
    assert VE_InjectEditAVideo.VALIDATE_INPUTS(blend_words=None) is True  # linked: checked when it runs
    prompt = workflow(blend_words=words)
    problems = validate(prompt, NODE_CLASS_MAPPINGS)
    assert len(problems) == 1
    message = str(problems[0])
    assert "Attention Injector (Edit-A-Video): blend_words is empty" in message and "e.g. 'car'" in message
    assert "\n" not in message
    with pytest.raises(WorkflowError):  # validation stops the graph before Tune on Clip trains
        execute(prompt, NODE_CLASS_MAPPINGS)
    assert not list(tmp_path.rglob("*.safetensors")), "Tune on Clip ran before the refusal"
    with pytest.raises(ValueError, match=r"^Attention Injector \(Edit-A-Video\): blend_words is empty"):
        VE_InjectEditAVideo().build(inversion=None, **{**widget_defaults(VE_InjectEditAVideo), "blend_words": words})

    path = tmp_path / "no_words.json"
    data = json.loads(WORKFLOW.read_text())
    next(n for n in data["nodes"] if n["type"] == "VE_InjectEditAVideo")["widgets_values"][4] = words
    path.write_text(json.dumps(data))
    assert main(["run", str(path), "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "blend_words is empty" in err and "Traceback" not in err and "Tune on Clip:" not in err


# --- the workflow ------------------------------------------------------------------------------------------

def sampled(prompt: dict) -> tuple:
    """The sampler's latents and frames."""
    sampler = node_of(prompt, "VE_CrossFrameSampler")
    frames, latent = execute(prompt, NODE_CLASS_MAPPINGS, outputs=[sampler]).outputs[sampler][:2]
    return latent["samples"], frames


def test_the_workflow_runs_headless_and_its_blending_moves_every_frame_but_the_first(tmp_path):
    result = execute(workflow(), NODE_CLASS_MAPPINGS)
    written = [r[0] for node_id, r in result.outputs.items() if "images" in result.ui.get(node_id, {})]
    assert written and all(Path(p).exists() for p in written)
    # On builtin:tiny's flat attention every mask at the workflow's threshold 0.3 is the whole frame, so the
    # union changes nothing; the source words' masks at 0.98 differ across frames (measured per frame 0.38, 0.35,
    # 0.17, 0.35 of the latent at the first blended step). Per-frame blending is the same graph with FateZero's
    # injector, which has the same widgets.
    sharp = workflow(blend_threshold=0.98, target_blend_words="")
    own = copy.deepcopy(sharp)
    own[node_of(own, "VE_InjectEditAVideo")]["class_type"] = "VE_InjectFateZero"
    (with_sc, sc_frames), (without, own_frames) = sampled(sharp), sampled(own)
    per_frame = [float((with_sc[k] - without[k]).abs().mean()) for k in range(4)]
    print(f"\nedit-a-video: sparse-causal vs own-frame blending, per frame mean |diff| {per_frame}")
    # frame 0 reads only itself in the union and in first+previous attention: unchanged (measured 0.0)
    assert float((with_sc[0] - without[0]).abs().max()) <= 1e-4
    assert min(per_frame[1:]) > 0.5, per_frame  # measured 4.86, 8.16, 7.92
    # the edited region holds from frame to frame: steadier along the source clip's flow (measured warp error
    # 0.0231 with sparse-causal masks, 0.0309 with each frame's own)
    source = result.outputs[node_of(sharp, "VE_LoadVideo")][0]
    flow = estimate_flow(source)
    steady, flicker = warp_error(sc_frames, flow), warp_error(own_frames, flow)
    print(f"edit-a-video: warp error {steady:.4f} sparse-causal, {flicker:.4f} own-frame blend masks")
    assert steady < flicker
