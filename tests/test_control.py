"""ControlNet Condition: the ControlStack against diffusers' ControlNet pipeline, its invariants
(methods.md §6 G1-G3), offline loading, and the hint preprocessors."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

from comfyui_video_edit.pipelines_core.models import controlnet as ctl
from comfyui_video_edit.pipelines_core.attention import FrameLayout, VideoAttnProcessor
from comfyui_video_edit.pipelines_core.models.controlnet import ControlStack, ControlUnit, load_controlnet
from comfyui_video_edit.pipelines_core.models.hints import ANNOTATORS, make_hints
from comfyui_video_edit.pipelines_core.models.model import decode_latents
from comfyui_video_edit.pipelines_core.sampling.hooks import StepState
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.sampling.schedulers import make_scheduler
from ldm_layout import controlnet_to_ldm

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
SIZE = (64, 48)  # (height, width) of the comparison with diffusers
SMALL = (32, 24)  # everywhere else: small and fast


def tiny_controlnet(unet, seed: int | None = 7) -> ControlNetModel:
    """A ControlNet matching the tiny UNet. seed=None keeps diffusers' zero-initialised output convolutions;
    a seed re-draws them (and everything else random) deterministically, so the ControlNet does something."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 8))
        if seed is not None:
            for conv in (*cn.controlnet_down_blocks, cn.controlnet_mid_block):
                torch.nn.init.normal_(conv.weight, std=0.05)
                torch.nn.init.normal_(conv.bias, std=0.05)
            # He-initialised hint encoder, so the hint itself (not only the ControlNet's biases) steers the output.
            embedding = cn.controlnet_cond_embedding
            for conv in (embedding.conv_in, *embedding.blocks, embedding.conv_out):
                torch.nn.init.kaiming_normal_(conv.weight)
                torch.nn.init.zeros_(conv.bias)
    return cn.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def cn(tiny_model):
    return tiny_controlnet(tiny_model.unet)


@pytest.fixture(scope="module")
def hints():
    return torch.rand(3, 3, *SMALL, generator=torch.Generator().manual_seed(5))




def settings(**kw) -> SamplerSettings:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=3, cfg=6.0, attention="none")
    return SamplerSettings(**{**base, **kw})


def sample(model, s, frames=3, control=None, size=SMALL):
    return edit_video(model, s, frame_count=frames, size=size, control=control)


# --- equivalence with diffusers ------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler, guess_mode", [("ddim", False), ("ddim", True), ("euler", False)])
def test_each_frame_equals_diffusers_controlnet_pipeline(tiny_model, cn, scheduler, guess_mode):
    """No temporal feature on: frame f is StableDiffusionControlNetPipeline on hint f with seed + f."""
    s = settings(scheduler=scheduler, steps=5, seed=3)
    hints = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(4))
    unit = ControlUnit(cn, hints, strength=0.8, start=0.1, end=0.8, guess_mode=guess_mode)
    ours = decode_latents(tiny_model, sample(tiny_model, s, 2, ControlStack().add(unit), size=SIZE))
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_model.vae, text_encoder=tiny_model.text_encoder, tokenizer=tiny_model.tokenizer, unet=tiny_model.unet,
        controlnet=cn, scheduler=make_scheduler(scheduler, tiny_model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for f in range(2):
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=hints[f:f + 1], height=SIZE[0], width=SIZE[1],
                   num_inference_steps=5, guidance_scale=6.0, generator=torch.Generator().manual_seed(3 + f),
                   controlnet_conditioning_scale=0.8, control_guidance_start=0.1, control_guidance_end=0.8,
                   guess_mode=guess_mode, output_type="pt").images
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


# --- invariants (methods.md §6 G) ------------------------------------------------------------------------

def test_G1_zero_initialised_controlnet_changes_nothing(tiny_model, hints):
    zero = tiny_controlnet(tiny_model.unet, seed=None)
    stack = ControlStack().add(ControlUnit(zero, hints))
    layout = FrameLayout(3, (0, 1, 2), ("uncond", "cond"))
    x = torch.randn(6, 4, SMALL[0] // 8, SMALL[1] // 8, generator=torch.Generator().manual_seed(0))
    kw = stack.unet_kwargs(x, torch.randn(6, 77, 32), layout, StepState(0, torch.tensor(500), 4, x))
    assert len(kw["down_block_additional_residuals"]) == 4  # the ControlNet ran ...
    assert all(r.abs().max() == 0 for r in kw["down_block_additional_residuals"])  # ... and added zeros
    assert torch.equal(sample(tiny_model, settings()), sample(tiny_model, settings(), control=stack))


def test_G2_strength_zero_changes_nothing(tiny_model, cn, hints):
    stack = ControlStack().add(ControlUnit(cn, hints, strength=0.0))
    assert torch.equal(sample(tiny_model, settings()), sample(tiny_model, settings(), control=stack))


def test_random_controlnet_changes_every_frame(tiny_model, cn, hints):
    plain = sample(tiny_model, settings())
    steered = sample(tiny_model, settings(), control=ControlStack().add(ControlUnit(cn, hints)))
    assert (plain - steered).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_G3_two_half_strength_units_equal_one_full(tiny_model, cn, hints):
    one = ControlStack().add(ControlUnit(cn, hints, strength=1.0))
    two = ControlStack().add(ControlUnit(cn, hints, strength=0.5)).add(ControlUnit(cn, hints, strength=0.5))
    assert (sample(tiny_model, settings(), control=one) - sample(tiny_model, settings(), control=two)).abs().max() <= 1e-6


def test_several_units_sum_like_diffusers_multicontrolnet(tiny_model, cn, hints):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    other = tiny_controlnet(tiny_model.unet, seed=8)
    other_hints = hints.flip(0)
    stack = ControlStack().add(ControlUnit(cn, hints, strength=0.7)).add(ControlUnit(other, other_hints, strength=0.4))
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(6, 4, SMALL[0] // 8, SMALL[1] // 8, generator=g), torch.randn(6, 77, 32, generator=g)
    layout = FrameLayout(3, (0, 1, 2), ("uncond", "cond"))
    t = torch.tensor(601)
    ours = stack.unet_kwargs(x, context, layout, StepState(1, t, 4, x))
    with torch.no_grad():
        down, mid = MultiControlNetModel([cn, other])(
            x, t, context, controlnet_cond=[hints.repeat(2, 1, 1, 1), other_hints.repeat(2, 1, 1, 1)],
            conditioning_scale=[0.7, 0.4], return_dict=False,
        )
    assert len(ours["down_block_additional_residuals"]) == len(down)
    for a, b in zip(ours["down_block_additional_residuals"], down):
        assert (a - b).abs().max() <= 1e-5
    assert (ours["mid_block_additional_residual"] - mid).abs().max() <= 1e-5


def test_window_that_ends_at_zero_adds_nothing(tiny_model, cn, hints):
    stack = ControlStack().add(ControlUnit(cn, hints, start=0.0, end=0.0))
    x = torch.zeros(3, 4, SMALL[0] // 8, SMALL[1] // 8)
    assert all(stack.unet_kwargs(x, torch.zeros(3, 77, 32), FrameLayout(3, (0, 1, 2), ("cond",)),
                                 StepState(i, torch.tensor(1), 4, x)) == {} for i in range(4))
    assert torch.equal(sample(tiny_model, settings()), sample(tiny_model, settings(), control=stack))


def test_window_follows_diffusers_keep_rule(cn, hints):
    total = 10
    for start, end in [(0.0, 1.0), (0.1, 0.8), (0.25, 0.5), (0.0, 0.0)]:
        ours = [ctl.ControlUnit(cn, hints, 1.0, start, end).active(i, total) for i in range(total)]
        keep = [1.0 - float(i / total < start or (i + 1) / total > end) for i in range(total)]
        assert ours == [k == 1.0 for k in keep]


def test_guess_mode_differs_from_normal_mode(tiny_model, cn, hints):
    normal = sample(tiny_model, settings(), control=ControlStack().add(ControlUnit(cn, hints)))
    guess = sample(tiny_model, settings(), control=ControlStack().add(ControlUnit(cn, hints, guess_mode=True)))
    assert (normal - guess).abs().max() > 1e-3


def test_chunked_sampling_gives_each_frame_its_own_hint(tiny_model, cn, hints):
    stack = ControlStack().add(ControlUnit(cn, hints))
    whole = sample(tiny_model, settings(chunk_size=3), control=stack)
    one_by_one = sample(tiny_model, settings(chunk_size=1), control=stack)
    assert (whole - one_by_one).abs().max() <= 1e-4  # float summation order only


# --- cross-frame attention inside the ControlNet ---------------------------------------------------------

def test_cross_frame_attention_reaches_the_controlnet_and_is_undone(tiny_model, cn, hints):
    before = dict(cn.attn_processors)
    s = settings(attention="first")
    linked = sample(tiny_model, s, control=ControlStack().add(ControlUnit(cn, hints, cross_frame_attention=True)))
    after = cn.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, VideoAttnProcessor) for p in after.values())
    alone = sample(tiny_model, s, control=ControlStack().add(ControlUnit(cn, hints, cross_frame_attention=False)))
    assert (linked[0] - alone[0]).abs().max() <= 1e-5  # frame 0 attends to itself under "first" either way
    assert (linked[1:] - alone[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_attention_modules_lists_each_linked_controlnet_once(tiny_model, cn, hints):
    other = tiny_controlnet(tiny_model.unet, seed=9)
    stack = ControlStack().add(ControlUnit(cn, hints)).add(ControlUnit(cn, hints, strength=0.3))
    stack = stack.add(ControlUnit(other, hints, cross_frame_attention=False))
    modules = stack.attention_modules()
    assert len(modules) == 1 and modules[0] is cn


def test_controlnet_for_another_text_width_fails_clearly(tiny_model, hints):
    config = {**dict(tiny_controlnet(tiny_model.unet, seed=None).config), "cross_attention_dim": 16}
    other = ControlNetModel.from_config(config).eval()
    stack = ControlStack().add(ControlUnit(other, hints, name="sd21-depth"))
    with pytest.raises(ValueError, match="'sd21-depth' expects text features of width 16 but the model gives 32"):
        sample(tiny_model, settings(), control=stack)


# --- the stack as a value -----------------------------------------------------------------------------

def test_chaining_returns_a_new_stack_and_leaves_upstream_alone(cn, hints):
    upstream = ControlStack().add(ControlUnit(cn, hints, name="canny"))
    branch_a = upstream.add(ControlUnit(cn, hints, strength=0.5, name="depth"))
    branch_b = upstream.add(ControlUnit(cn, hints, strength=0.2))
    assert len(upstream) == 1 and len(branch_a) == 2 and len(branch_b) == 2
    assert branch_a.units[0] is upstream.units[0] and branch_a.units[1] is not branch_b.units[1]
    with pytest.raises(Exception):
        upstream.units = ()  # frozen
    text = repr(branch_a)
    assert "canny" in text and "depth" in text and "\n" not in text and len(text) < 300


@pytest.mark.parametrize("frames, size, message", [
    (2, SMALL, "hints for 3 frames but the sampler makes 2"),
    (3, (32, 32), "24x32 hints but the sampler makes 32x32"),
])
def test_mismatched_hints_fail_before_any_step(tiny_model, cn, hints, frames, size, message):
    calls = []
    with pytest.raises(ValueError, match=message) as err:
        edit_video(tiny_model, settings(), frame_count=frames, size=size,
                   control=ControlStack().add(ControlUnit(cn, hints)), progress=lambda d, t: calls.append(d))
    assert "ControlNet Condition" in str(err.value) and calls == []


@pytest.mark.parametrize("bad, message", [
    (dict(start=0.6, end=0.4), "start <= end"), (dict(end=1.5), "start <= end"), (dict(strength=-1), "strength"),
    (dict(hints=torch.rand(2, 32, 24, 3)), r"\(frames, 3, height, width\)"),
])
def test_bad_unit_settings_are_refused(cn, hints, bad, message):
    with pytest.raises(ValueError, match=message):
        ControlUnit(**{"controlnet": cn, "hints": hints, **bad})


# --- loading --------------------------------------------------------------------------------------------

def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diffusers_folder_loads_offline(cn, tmp_path, no_network):
    cn.save_pretrained(str(tmp_path / "cn"))
    loaded = load_controlnet(str(tmp_path / "cn"), "fp32", "cpu")
    _same_weights(cn, loaded)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("fmt, prefix", [("safetensors", ""), ("pth", ""), ("pth", "control_model.")])
def test_single_file_in_original_layout_converts_offline(cn, tmp_path, no_network, fmt, prefix):
    from safetensors.torch import save_file

    cn.save_config(str(tmp_path / "config"))
    path = str(tmp_path / f"control_tiny.{fmt}")
    state = controlnet_to_ldm(cn, prefix)
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    loaded = load_controlnet(path, torch.float32, "cpu", config_dir=str(tmp_path / "config"))
    _same_weights(cn, loaded)


def test_single_file_with_diffusers_keys_loads_too(cn, tmp_path, no_network):
    from safetensors.torch import save_file

    cn.save_config(str(tmp_path / "config"))
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    _same_weights(cn, load_controlnet(str(tmp_path / "cn.safetensors"), config_dir=str(tmp_path / "config")))


def test_loading_errors_are_one_line_and_say_what_to_do(cn, tmp_path, no_network):
    from safetensors.torch import save_file

    cases = []
    cases.append((str(tmp_path / "nowhere.safetensors"), "not found"))
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), "no config.json"))
    cn.save_config(str(tmp_path / "weightless"))
    cases.append((str(tmp_path / "weightless"), "no diffusion_pytorch_model.safetensors"))
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(tmp_path / "sd.safetensors"))
    cases.append((str(tmp_path / "sd.safetensors"), "holds no ControlNet weights"))
    # A tiny ControlNet (text width 32) against the shipped SD-1.5 config (768).
    save_file(controlnet_to_ldm(cn), str(tmp_path / "tiny.safetensors"))
    cases.append((str(tmp_path / "tiny.safetensors"), "pick an SD-1.5 ControlNet"))
    truncated = controlnet_to_ldm(cn)
    truncated.pop("zero_convs.0.0.weight")
    save_file(truncated, str(tmp_path / "truncated.safetensors"))
    cn.save_config(str(tmp_path / "config"))
    for source, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
            load_controlnet(source)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="incomplete or not shaped like the ControlNet config"):
        load_controlnet(str(tmp_path / "truncated.safetensors"), config_dir=str(tmp_path / "config"))


def test_shipped_config_is_sd15_controlnet_v11():
    from diffusers import UNet2DConditionModel

    sd15_unet = os.path.join(os.path.dirname(ctl.CONTROLNET_SD15_CONFIG_DIR), "sd15")
    with torch.device("meta"):
        shipped = ControlNetModel.from_config(ControlNetModel.load_config(ctl.CONTROLNET_SD15_CONFIG_DIR))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd15_unet, subfolder="unet"))
        of_unet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    assert round(sum(p.numel() for p in shipped.parameters()) / 1e6, 1) == 361.3  # ControlNet v1.1 SD-1.5
    assert {n: p.shape for n, p in shipped.named_parameters()} == {n: p.shape for n, p in of_unet.named_parameters()}
    assert tuple(shipped.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    assert len(shipped.attn_processors) == 14  # down_blocks 0-2 (2 each) + mid, self and cross


# --- hints ----------------------------------------------------------------------------------------------

def _square_frames(count=2, h=64, w=48):
    frames = torch.zeros(count, h, w, 3)
    for f in range(count):
        frames[f, 16:40, 8 + 4 * f:32 + 4 * f] = 1.0  # a bright square moving right
    return frames


def test_none_passes_frames_through_as_hints():
    frames = torch.rand(2, 16, 24, 3)
    out = make_hints(frames, "none")
    assert out.shape == (2, 3, 16, 24) and torch.equal(out, frames.permute(0, 3, 1, 2))


def test_canny_hints_are_binary_edges_at_frame_size():
    frames = _square_frames()
    out = make_hints(frames, "canny", low_threshold=50, high_threshold=150)
    assert out.shape == (2, 3, 64, 48) and out.dtype == torch.float32
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    edges = out[:, 0]
    assert edges[:, 28, :].sum() > 0 and edges[:, :10].sum() == 0 and edges[:, 50:].sum() == 0  # only at the square
    assert edges[0, 28, 6:12].sum() > 0 and edges[1, 28, 6:10].sum() == 0  # and it moved with the square
    assert edges[1, 28, 10:16].sum() > 0


def test_missing_annotator_folder_or_file_names_what_is_expected(tmp_path, no_network):
    frames = torch.rand(1, 32, 32, 3)
    with pytest.raises(FileNotFoundError, match="needs an annotator folder holding dpt_hybrid-midas-501f0c75.pt"):
        make_hints(frames, "depth")
    missing = str(tmp_path / "Annotators")
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        make_hints(frames, "openpose", annotator_dir=missing)
    assert missing in str(err.value) and "body_pose_model.pth" in str(err.value)
    os.makedirs(missing)
    open(os.path.join(missing, "sk_model.pth"), "wb").close()
    with pytest.raises(FileNotFoundError, match="expects sk_model2.pth in annotator folder") as err:
        make_hints(frames, "lineart", annotator_dir=missing)
    assert missing in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown preprocessor"):
        make_hints(frames, "scribble")


def test_lineart_detector_loads_from_a_local_folder_offline(tmp_path, no_network):
    """The real controlnet-aux loading path with random weights: local files only, hints at frame size."""
    from controlnet_aux.lineart import Generator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name in ANNOTATORS["lineart"].files:
            torch.save(Generator(3, 1, 3).state_dict(), str(tmp_path / name))
    frames = _square_frames(2, 40, 56)
    out = make_hints(frames, "lineart", annotator_dir=str(tmp_path), detect_resolution=64)
    assert out.shape == (2, 3, 40, 56) and 0 <= out.min() and out.max() <= 1
    assert "HF_HUB_OFFLINE" not in os.environ
