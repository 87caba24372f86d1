"""Methods as values: starts the sampler calls, hooks that see the run's scheduler and say in data when they
run last, rules that carry what they need, and the checks the engine (not the nodes) makes."""

import pytest
import torch

from comfyui_video_edit.pipelines_core.attention.rules import RULES, Rule, get_rule
from comfyui_video_edit.pipelines_core.methods.pix2video import pix2video_injection
from comfyui_video_edit.pipelines_core.methods.text2video_zero import MotionStart
from comfyui_video_edit.pipelines_core.models.controlnet import ControlStack, ControlUnit
from comfyui_video_edit.pipelines_core.sampling.chunks import plan_chunks
from comfyui_video_edit.pipelines_core.sampling.hooks import Hooks, fold, in_order, last, StepState
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video, sample_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.sampling.starts import Begun, ImagesStart, NoiseStart, Start

PROMPT = "a red fox in the snow"


def settings(**kw):
    return SamplerSettings(**{**dict(prompt=PROMPT, seed=3, steps=4, strength=0.75, attention="first+previous"), **kw})


# --- hooks ---------------------------------------------------------------------------------------------------

def test_a_hook_marked_last_runs_after_every_other_wherever_it_was_added():
    seen = []

    def mark(name):
        def hook(state):
            seen.append(name)
            return state.latents
        return hook

    x = torch.zeros(1)
    hooks = Hooks(after_step=[mark("a"), last(mark("z")), mark("b")]) + Hooks(after_step=[mark("c")])
    fold(hooks.after_step, StepState(0, torch.tensor(1), 1, x), "latents")
    assert seen == ["a", "b", "c", "z"]
    marked = last(mark("y"))
    assert in_order([marked, mark("q")])[-1] is marked


def test_hooks_see_the_runs_scheduler_at_the_steps_position(tiny_model, clip_frames):
    """SDEdit starts mid-grid: position = begin index + step, and the scheduler is the run's own (no twin)."""
    seen = []

    def look(state):
        seen.append((state.index, state.position, state.scheduler, int(state.timestep)))
        assert state.t == int(state.timestep)  # read once per run, handed to every step as a Python int
        return state.x0

    s = settings(steps=5, strength=0.6, scheduler="euler")
    edit_video(tiny_model, s, clip_frames, hooks=Hooks(on_x0=[look]))
    schedulers = {id(entry[2]) for entry in seen}
    assert len(schedulers) == 1 and seen[0][2] is not None
    scheduler = seen[0][2]
    first = 5 - int(5 * 0.6)
    assert [p for _, p, _, _ in seen] == list(range(first, 5))
    assert all(int(scheduler.timesteps[p]) == t for _, p, _, t in seen)


# --- starts --------------------------------------------------------------------------------------------------

def test_a_start_value_gives_what_the_connected_inputs_give(tiny_model, clip_frames):
    s = settings()
    assert torch.equal(edit_video(tiny_model, s, start=ImagesStart(clip_frames)), edit_video(tiny_model, s, clip_frames))
    noise = settings(strength=1.0)
    assert torch.equal(edit_video(tiny_model, noise, start=NoiseStart(2, (32, 40))),
                       edit_video(tiny_model, noise, frame_count=2, size=(32, 40)))


class HalfwayStart(Start):
    """A start a method could add without touching the sampler: given latents at the middle of the grid."""

    def __init__(self, latents):
        self.latents = latents

    def extent(self):
        return self.latents.shape[0], tuple(8 * d for d in self.latents.shape[-2:])

    def timesteps(self, scheduler, settings):
        return scheduler.timesteps[settings.steps // 2:]

    def begin(self, context):
        return Begun(self.latents.to(context.model.device), context.timesteps, first_position=context.settings.steps // 2)


def test_a_new_start_plugs_in_without_changing_the_sampler(tiny_model):
    latents = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(8))
    seen = []
    out = sample_video(tiny_model, settings(steps=6), start=HalfwayStart(latents), progress=lambda d, t: seen.append(t))
    assert seen[-1] == 3 and out.shape == latents.shape
    assert not torch.equal(out, latents)


def test_motion_start_refuses_a_source_and_a_non_ddim_scheduler(tiny_model, clip_frames):
    with pytest.raises(ValueError, match="ddim"):
        sample_video(tiny_model, settings(scheduler="euler", strength=1.0), start=MotionStart(2, (32, 32)))
    with pytest.raises(ValueError, match="give one start"):
        sample_video(tiny_model, settings(), clip_frames, start=MotionStart(2, (32, 32)))


# --- rules carry their needs ---------------------------------------------------------------------------------

def test_rules_are_values_that_say_which_context_they_read():
    for name, rule in RULES.items():
        assert isinstance(rule, Rule) and rule.name == name and get_rule(rule) is rule
        index = rule(5)
        reads_anchor = bool((index[1:] == 0).any()) and name != "previous"
        reads_previous = name in ("previous", "first+previous")
        assert rule.needs_anchor == (reads_anchor or name == "all")
        assert rule.needs_previous == reads_previous
    half = Rule("second-half", lambda frames: torch.arange(frames)[:, None], needs_previous=True)
    chunks = plan_chunks(6, 3, half)
    assert chunks[1].frames == (2, 3, 4, 5)  # the frame before the chunk, and no anchor


# --- checks the engine makes --------------------------------------------------------------------------------

def test_generating_under_a_controlnet_takes_the_hints_extent(tiny_model):
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ControlNetModel.from_unet(tiny_model.unet, conditioning_embedding_out_channels=(4, 8, 8, 8))
    hints = torch.rand(3, 3, 32, 24, generator=torch.Generator().manual_seed(5))
    control = ControlStack().add(ControlUnit(net, hints))
    out = sample_video(tiny_model, settings(steps=2, strength=1.0), control=control)
    assert out.shape == (3, 4, 4, 3)
    with pytest.raises(ValueError, match="ControlNet|hints"):  # an extent given that the hints do not have
        sample_video(tiny_model, settings(steps=2, strength=1.0), frame_count=2, size=(32, 24), control=control)


def test_the_injections_inversion_must_be_the_samplers(tiny_model, clip_frames):
    frames = clip_frames[:2, :32, :32]
    one = invert_video(tiny_model, frames, prompt=PROMPT, steps=4)
    other = invert_video(tiny_model, frames, prompt="another prompt", steps=4)
    with pytest.raises(ValueError, match="inversion and the injection's differ"):
        edit_video(tiny_model, settings(strength=1.0, scheduler="ddim"), inversion=other,
                   injection=pix2video_injection(one))
    with pytest.raises(ValueError, match="either images"):
        edit_video(tiny_model, settings(), frames, inversion=one)


def test_size_to_generate_is_checked_by_the_engine(tiny_model):
    with pytest.raises(ValueError, match="multiple of 8"):
        sample_video(tiny_model, settings(strength=1.0), frame_count=2, size=(30, 32))
