"""Tune on Clip (Tune-A-Video's one-shot tuning as a query LoRA): it learns the clip, changes nothing but its LoRA,
is reproducible, saves a file LoRA Apply reads back exactly, never overwrites, stops on Cancel with nothing
written, and runs under ComfyUI's inference mode.

builtin:tiny, 4 frames of 64x64; tiny runs use a large learning rate (1e-2) so 20 steps move its random weights.
Figures measured here are quoted next to each floor.
"""

import os

import pytest
import torch

from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS
from comfyui_video_edit.nodes import comfy_bridge
from comfyui_video_edit.nodes.lora_apply import VE_LoRAApply
from comfyui_video_edit.nodes.tune_on_clip import VE_TuneOnClip
from comfyui_video_edit.pipelines_core.methods.tune_a_video import (
    QUERY_LAYERS, TuneSettings, clip_loss, save_lora, tune_on_clip, tuning_step_bytes)
from comfyui_video_edit.pipelines_core.models.lora import read_lora
from comfyui_video_edit.pipelines_core.models.model import load_model
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

PROMPT = "a photo of an astronaut"
QUICK = dict(steps=20, learning_rate=1e-2, rank=4, seed=0)


@pytest.fixture
def clip():
    """Four 64x64 frames of a square moving right over a gradient: a clip with motion (ComfyUI IMAGE)."""
    frames = torch.linspace(0, 1, 64)[None, None, :, None].expand(4, 64, 64, 3).clone()
    for f in range(4):
        frames[f, 20:36, 8 + 8 * f:24 + 8 * f] = torch.tensor([0.9, 0.2, 0.1])
    return frames


def weights(model) -> dict:
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder", "vae")
            for k, v in getattr(model, part).state_dict().items()}


def assert_untouched(model, before: dict):
    """Every weight bit-identical, no peft layer left, nothing trainable, processors and checkpointing as loaded."""
    after = weights(model)
    assert set(after) == set(before), f"modules changed: {sorted(set(after) ^ set(before))[:3]}"
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert not moved, f"{len(moved)} base weights changed, e.g. {moved[0]}"
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not model.unet.is_gradient_checkpointing
    assert {type(p).__name__ for p in model.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def run_node(model, frames, **overrides):
    values = dict(prompt=PROMPT, gradient_checkpointing=True, filename_prefix="tune_a_video/clip", **QUICK)
    values.update(overrides)
    out = VE_TuneOnClip().tune(model, frames, **values)
    return out["result"]


# --- the mechanism -------------------------------------------------------------------------------------------

def test_tuning_lowers_the_denoising_loss_on_the_clip_and_only_the_query_lora_is_trained(tiny_model, clip):
    before = weights(tiny_model)
    result = tune_on_clip(tiny_model, clip, TuneSettings(PROMPT, **QUICK))
    # measured on the fixed evaluation draws: 1.1904 -> 1.1430 (-4.0%) in 20 steps
    print(f"\nloss on the clip {result.loss_before:.4f} -> {result.loss_after:.4f}; training losses "
          f"{result.losses[0]:.3f} .. {result.losses[-1]:.3f}")
    assert result.loss_after < 0.985 * result.loss_before, (result.loss_before, result.loss_after)
    assert len(result.losses) == QUICK["steps"] and all(map(torch.isfinite, torch.tensor(result.losses)))
    assert_untouched(tiny_model, before)
    # the LoRA covers exactly the query projections of every self- and cross-attention layer
    layers = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in result.lora}
    queries = {name for name, _ in tiny_model.unet.named_modules() if name.endswith(QUERY_LAYERS)}
    assert layers == queries and len(queries) == len(tiny_model.unet.attn_processors)
    trained = [k for k, v in result.lora.items() if k.endswith("lora_B.weight") and v.abs().max() > 0]
    assert len(trained) == len(queries), "some query LoRA stayed at its zero start"


def test_a_seed_gives_the_same_lora_and_another_seed_another(tiny_model, clip):
    settings = TuneSettings(PROMPT, **{**QUICK, "steps": 5})
    first = tune_on_clip(tiny_model, clip, settings)
    again = tune_on_clip(tiny_model, clip, settings)
    other = tune_on_clip(tiny_model, clip, TuneSettings(PROMPT, **{**QUICK, "steps": 5, "seed": 1}))
    assert first.lora.keys() == again.lora.keys()
    assert all(torch.equal(first.lora[k], again.lora[k]) for k in first.lora)
    assert first.losses == again.losses
    assert max(float((first.lora[k] - other.lora[k]).abs().max()) for k in first.lora) > 1e-3


def test_gradient_checkpointing_changes_the_memory_not_the_lora(tiny_model, clip):
    on = tune_on_clip(tiny_model, clip, TuneSettings(PROMPT, **{**QUICK, "steps": 3}, gradient_checkpointing=True))
    off = tune_on_clip(tiny_model, clip, TuneSettings(PROMPT, **{**QUICK, "steps": 3}, gradient_checkpointing=False))
    assert max(float((on.lora[k] - off.lora[k]).abs().max()) for k in on.lora) <= 1e-6
    # the fake-tensor count of one step: recomputing blocks in backward keeps fewer activations
    config = dict(tiny_model.unet.config)
    kept = tuning_step_bytes(config, 4, (8, 8), torch.float32, gradient_checkpointing=True)["Activation"]
    full = tuning_step_bytes(config, 4, (8, 8), torch.float32, gradient_checkpointing=False)["Activation"]
    print(f"\nactivations at the peak of one tuning step: {kept} B with checkpointing, {full} B without")
    assert 0 < kept < full


# --- the file and the model the node returns -------------------------------------------------------------------

def test_the_saved_file_is_what_was_trained_and_lora_apply_loads_it_to_the_same_outputs(tiny_model, clip, tmp_path):
    before = weights(tiny_model)
    tuned, path = run_node(tiny_model, clip)
    assert os.path.dirname(path) == str(tmp_path / "tune_a_video") and path.endswith("clip_00001.safetensors")
    assert_untouched(tiny_model, before)
    # the file holds the adapter as trained: its loss on the clip is the loss measured before the adapter was removed
    result = tune_on_clip(tiny_model, clip, TuneSettings(PROMPT, **QUICK))
    assert abs(clip_loss(tuned, clip, PROMPT, seed=0) - result.loss_after) <= 1e-5
    assert read_lora(path).configs["unet"]["r"] == QUICK["rank"]  # diffusers' header config
    # the returned model samples as LoRA Apply of the saved file does, and not as the base model does
    applied = VE_LoRAApply().apply(tiny_model, path, 1.0)[0]
    settings = SamplerSettings("a watercolor painting of an astronaut", seed=3, steps=2, strength=0.7)
    with torch.inference_mode():
        from_node, from_apply = edit_video(tuned, settings, clip), edit_video(applied, settings, clip)
        base = edit_video(tiny_model, settings, clip)
    assert float((from_node - from_apply).abs().max()) <= 1e-5
    effect = float((from_node - base).abs().mean())
    print(f"\ntuned vs base sample: mean |diff| {effect:.4g}")
    assert effect > 1e-3  # measured 0.0054
    assert_untouched(tiny_model, before)


def test_saving_never_overwrites(tiny_model, clip, tmp_path):
    result = tune_on_clip(tiny_model, clip, TuneSettings(PROMPT, **{**QUICK, "steps": 1}))
    folder = tmp_path / "loras"
    folder.mkdir()
    taken = folder / "mine_00001.safetensors"
    taken.write_bytes(b"someone else's file")
    first, second = save_lora(result, str(tmp_path), "loras/mine"), save_lora(result, str(tmp_path), "loras/mine")
    assert (first.name, second.name) == ("mine_00002.safetensors", "mine_00003.safetensors")
    assert taken.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in folder.iterdir()) == [taken.name, first.name, second.name]  # no .part left
    assert first.stat().st_mode & 0o777 == taken.stat().st_mode & 0o777  # the mode open() gives, not 0600
    one, two = read_lora(str(first)).weights["unet"], read_lora(str(second)).weights["unet"]
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_cancel_stops_tuning_with_no_file_written_and_the_model_as_it_was(tiny_model, clip, tmp_path, cancel_at,
                                                                          monkeypatch):
    before = weights(tiny_model)
    seen = []

    def cancelling(desc):  # what ComfyUI's bar does on Cancel: the progress callback raises
        cancel = cancel_at(3)

        def progress(done, total):
            seen.append((done, total))
            cancel(done, total)
        return progress

    monkeypatch.setattr(comfy_bridge, "progress", cancelling)
    with pytest.raises(cancel_at.error):
        run_node(tiny_model, clip)
    assert seen == [(1, 20), (2, 20), (3, 20)]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a file was written by a cancelled tuning"
    assert_untouched(tiny_model, before)


def test_runs_under_comfyuis_inference_mode(clip):
    """As in ComfyUI: the model is loaded and the node runs under torch.inference_mode(), so every base weight
    is an inference tensor."""
    with torch.inference_mode():
        model = load_model("builtin:tiny", dtype="fp32", device="cpu")
        frames = clip.clone()
        assert next(model.unet.parameters()).is_inference()
        before = weights(model)
        tuned, path = run_node(model, frames)
        assert_untouched(model, before)
        loss_base, loss_tuned = clip_loss(model, frames, PROMPT), clip_loss(tuned, frames, PROMPT)
    print(f"\nunder inference mode: loss on the clip {loss_base:.4f} -> {loss_tuned:.4f}")
    assert loss_tuned < 0.985 * loss_base  # measured 1.1904 -> 1.1430, as outside inference mode
    assert os.path.isfile(path)


def test_tuning_a_model_that_carries_a_lora_keeps_it_and_stacks_the_new_one(tiny_model, clip):
    styled = VE_LoRAApply().apply(tiny_model, "tiny_style_lora.safetensors", 1.0)[0]
    before = weights(tiny_model)
    tuned, path = run_node(styled, clip, steps=5)
    assert [spec.path for spec in tuned.loras] == [styled.loras[0].path, path]
    assert_untouched(tiny_model, before)


# --- inputs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (dict(prompt="  "), "prompt is empty"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(rank=0), "rank must be at least 1"),
])
def test_bad_settings_are_refused_before_tuning(tiny_model, clip, change, words):
    with pytest.raises(ValueError, match=words) as error:
        run_node(tiny_model, clip, **change)
    assert str(error.value).startswith("Tune on Clip:") and "\n" not in str(error.value)


def test_a_frame_size_off_the_vae_grid_is_refused(tiny_model):
    with pytest.raises(ValueError, match="multiple of 8"):
        run_node(tiny_model, torch.rand(2, 60, 64, 3))


def test_the_node_is_registered_and_refuses_a_prefix_outside_the_folder():
    assert NODE_CLASS_MAPPINGS["VE_TuneOnClip"] is VE_TuneOnClip
    assert VE_TuneOnClip.VALIDATE_INPUTS("../escape").startswith("Tune on Clip:")
    assert VE_TuneOnClip.VALIDATE_INPUTS("tune_a_video/clip") is True


def test_any_frame_size_on_the_vae_grid_tunes(tiny_model):
    """Not only squares or multiples of 64: 3 frames of 72x48 (latents 9x6, odd after the first level)."""
    frames = torch.rand(3, 48, 72, 3, generator=torch.Generator().manual_seed(4))
    result = tune_on_clip(tiny_model, frames, TuneSettings(PROMPT, **{**QUICK, "steps": 3}))
    assert len(result.losses) == 3 and all(v == v for v in result.losses)
