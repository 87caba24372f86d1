"""InstructPix2Pix video: the 8-channel instruction model, its two guidance scales, cross-frame rules and chunks.

The reference is diffusers' StableDiffusionInstructPix2PixPipeline run on each frame alone with seed + f."""

import json
import logging
from contextlib import ExitStack

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from safetensors.torch import save_file

from comfyui_video_edit.nodes.cross_frame_sampler import VE_CrossFrameSampler
from comfyui_video_edit.nodes.load_model import VE_LoadModel
from comfyui_video_edit.pipelines_core.attention import attention_processors
from comfyui_video_edit.pipelines_core.methods.instruct_pix2pix import instruct_edit
from comfyui_video_edit.pipelines_core.models.controlnet import ControlStack, ControlUnit
from comfyui_video_edit.pipelines_core.models import single_file as ckpt
from comfyui_video_edit.pipelines_core.models.model import decode_latents, encode_prompt, load_model
from comfyui_video_edit.pipelines_core.models.tiny import (build_tiny_components, save_tiny_pipeline,
                                                           tiny_controlnet, write_tiny_tokenizer)
from comfyui_video_edit.pipelines_core.sampling.chunks import plan_chunks
from comfyui_video_edit.pipelines_core.sampling.denoiser import ImageConditioning, VideoDenoiser
from comfyui_video_edit.pipelines_core.sampling.hooks import StepState
from comfyui_video_edit.pipelines_core.sampling.injection import InjectionPlan
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video, processors
from comfyui_video_edit.pipelines_core.sampling.schedulers import make_scheduler
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

from ldm_layout import UNET_PREFIX, to_ldm_checkpoint

INSTRUCTION, NEGATIVE = "make it snow", "blurry"


@pytest.fixture(scope="module")
def ip2p():
    return load_model("builtin:tiny-ip2p", dtype="fp32", device="cpu")


@pytest.fixture
def frames():
    """Three distinct 64x48 frames (ComfyUI IMAGE): not square, so height and width cannot be swapped unseen."""
    return torch.rand(3, 64, 48, 3, generator=torch.Generator().manual_seed(1))


def settings(**changes) -> SamplerSettings:
    base = dict(prompt=INSTRUCTION, negative_prompt=NEGATIVE, seed=11, steps=4, cfg=7.5, strength=1.0,
                attention="none", chunk_size=2)
    return SamplerSettings(**{**base, **changes})


# --- the model ----------------------------------------------------------------------------------------------

def test_builtin_tiny_ip2p_is_an_instruction_model_and_tiny_is_not(ip2p, tiny_model):
    assert ip2p.unet.config.in_channels == 8 and ip2p.latent_channels == 4 and ip2p.is_instruction
    assert not tiny_model.is_instruction
    assert "InstructPix2Pix" in ip2p.kind and "instruction" in repr(ip2p) and "instruction" not in repr(tiny_model)


def test_load_model_node_offers_and_names_the_instruction_model(caplog):
    assert "builtin:tiny-ip2p" in VE_LoadModel.INPUT_TYPES()["required"]["checkpoint"][0]
    with caplog.at_level(logging.INFO):
        (model,) = VE_LoadModel().load("builtin:tiny-ip2p", "fp32", "cpu", keep_loaded=True)
    assert model.is_instruction
    assert any("InstructPix2Pix" in r.getMessage() and "builtin:tiny-ip2p" in r.getMessage() for r in caplog.records)


def test_a_diffusers_instruct_pix2pix_folder_loads_as_the_builtin(ip2p, tmp_path):
    folder = save_tiny_pipeline(str(tmp_path / "ip2p"), instruct=True)
    assert json.loads((tmp_path / "ip2p" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInstructPix2PixPipeline"
    loaded = load_model(folder, device="cpu")
    assert loaded.is_instruction
    for a, b in zip(ip2p.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_single_file_with_an_8_channel_conv_in_loads_as_an_instruction_model(tmp_path, no_network):
    """The configs say 4 input channels (as SD-1.5's shipped ones do): the file's conv_in decides."""
    plain = build_tiny_components(str(tmp_path / "tok_a"))
    config_dir = tmp_path / "configs"
    plain["unet"].save_config(str(config_dir / "unet"))
    plain["vae"].save_config(str(config_dir / "vae"))
    plain["text_encoder"].config.save_pretrained(str(config_dir / "text_encoder"))
    (config_dir / "scheduler").mkdir()
    (config_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(plain["scheduler_config"]))
    instruct = build_tiny_components(str(tmp_path / "tok_b"), unet_in_channels=8)
    state = to_ldm_checkpoint(instruct["unet"], instruct["vae"], instruct["text_encoder"])
    assert state[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1] == 8
    save_file(state, str(tmp_path / "ip2p.safetensors"))
    write_tiny_tokenizer(str(tmp_path / "tokenizer"))

    loaded = ckpt.load_single_file(str(tmp_path / "ip2p.safetensors"), config_dir=str(config_dir))

    assert loaded["unet"].config.in_channels == 8
    reference = instruct["unet"].state_dict()
    for name, value in loaded["unet"].state_dict().items():
        assert torch.equal(value, reference[name]), name
    x = torch.randn(2, 8, 8, 6, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded["unet"](x, 500, text).sample, instruct["unet"](x, 500, text).sample)
    # Other channel counts (inpainting's 9) are still refused, in one line.
    conv_in = state[UNET_PREFIX + "input_blocks.0.0.weight"]
    state[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.cat([conv_in, conv_in[:, :1]], dim=1)
    save_file(state, str(tmp_path / "inpaint.safetensors"))
    with pytest.raises(ValueError, match="takes 9 latent channels"):
        ckpt.load_single_file(str(tmp_path / "inpaint.safetensors"), config_dir=str(config_dir))


# --- the sampling -------------------------------------------------------------------------------------------

def ip2p_pipeline(model) -> StableDiffusionInstructPix2PixPipeline:
    pipe = StableDiffusionInstructPix2PixPipeline(
        unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        scheduler=make_scheduler("ddim", model.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cfg, image_guidance", [(7.5, 1.5), (4.0, 1.0)])
def test_attention_none_equals_diffusers_instruct_pix2pix_frame_by_frame(ip2p, frames, cfg, image_guidance):
    """Frame f equals StableDiffusionInstructPix2PixPipeline on that frame alone with generator seed + f."""
    ours = instruct_edit(ip2p, settings(cfg=cfg), images=frames, image_guidance=image_guidance)
    pixels = decode_latents(ip2p, ours)
    pipe = ip2p_pipeline(ip2p)
    for f in range(frames.shape[0]):
        kwargs = dict(image=frames[f:f + 1].permute(0, 3, 1, 2), num_inference_steps=4, guidance_scale=cfg,
                      image_guidance_scale=image_guidance, negative_prompt=NEGATIVE,
                      generator=torch.Generator().manual_seed(11 + f))
        ref_latents = pipe(INSTRUCTION, output_type="latent", **kwargs).images
        assert (ref_latents[0] - ours[f]).abs().max() <= 1e-4
        kwargs["generator"] = torch.Generator().manual_seed(11 + f)
        ref = pipe(INSTRUCTION, output_type="pt", **kwargs).images
        assert (ref[0].permute(1, 2, 0) - pixels[f]).abs().max() <= 1e-4


def test_image_guidance_moves_the_edit_and_the_source_frames_condition_it(ip2p, frames):
    base = instruct_edit(ip2p, settings(), images=frames, image_guidance=1.5)
    stronger = instruct_edit(ip2p, settings(), images=frames, image_guidance=3.0)
    assert (base - stronger).abs().mean() > 1e-2
    other_source = instruct_edit(ip2p, settings(), images=frames.flip(0), image_guidance=1.5)
    # same noise per frame, another source frame: the conditioning, not the start, makes the difference
    assert (base - other_source).abs().mean() > 1e-2


def test_a_cross_frame_rule_changes_later_frames_and_leaves_the_anchor(ip2p, frames):
    none = instruct_edit(ip2p, settings(chunk_size=3), images=frames)
    first = instruct_edit(ip2p, settings(chunk_size=3, attention="first"), images=frames)
    assert (none[0] - first[0]).abs().max() <= 1e-5  # frame 0 attends to itself under both rules
    for f in (1, 2):
        assert (none[f] - first[f]).abs().mean() > 1e-2


@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_batched_chunks_with_three_roles_equal_one_call_per_chunk(ip2p, cfg):
    """Two chunks in one UNet call, rows (role, chunk, frame) with three roles, compute what two calls do."""
    latents = torch.randn(7, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    source = torch.randn(7, 4, 8, 6, generator=torch.Generator().manual_seed(3))
    chunks = plan_chunks(7, 2, "first")  # [0,1], [0,2,3], [0,4,5], [0,6]: the two middle ones share a call
    unet_processor, _ = processors(settings(attention="first"), InjectionPlan())
    t = torch.tensor(601)
    outputs, calls = [], []
    for batch in (1, 2):
        denoiser = VideoDenoiser(ip2p.unet, encode_prompt(ip2p, INSTRUCTION), encode_prompt(ip2p, NEGATIVE), cfg,
                                 chunks, batch=batch, image=ImageConditioning(source, 1.5))
        rows = []
        with torch.no_grad(), ExitStack() as stack:
            stack.enter_context(attention_processors(ip2p.unet, unet_processor))
            handle = ip2p.unet.register_forward_pre_hook(lambda m, a: rows.append(tuple(a[0].shape[:2])))
            stack.callback(handle.remove)
            outputs.append(denoiser(latents, StepState(0, t, 1, latents, t=601)))
        calls.append(rows)
    roles = 3 if cfg > 1 else 1
    assert calls == [[(roles * 2, 8), (roles * 3, 8), (roles * 3, 8), (roles * 2, 8)],
                     [(roles * 2, 8), (roles * 6, 8), (roles * 2, 8)]]  # 8 channels: noisy + source latent
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5


def test_node_image_guidance_is_the_last_widget_and_drives_only_instruction_models(ip2p, tiny_model, frames):
    optional = VE_CrossFrameSampler.INPUT_TYPES()["optional"]
    name, (kind, options) = list(optional.items())[-1]
    assert (name, kind, options["default"], options["min"]) == ("image_guidance", "FLOAT", 1.5, 1.0)
    node = VE_CrossFrameSampler()
    args = dict(prompt=INSTRUCTION, negative_prompt=NEGATIVE, seed=3, steps=2, cfg=7.5, scheduler="ddim",
                strength=1.0, noise="per_frame", attention="first", attention_layers="all", chunk_size=8,
                images=frames[:2])
    low = node.sample(ip2p, image_guidance=1.2, **args)[1]["samples"]
    high = node.sample(ip2p, image_guidance=2.5, **args)[1]["samples"]
    assert (low - high).abs().mean() > 1e-2
    # A text-to-image model has no image guidance: the widget is ignored, the result bit for bit the same.
    plain = dict(args, strength=0.6)
    assert torch.equal(node.sample(tiny_model, image_guidance=1.2, **plain)[1]["samples"],
                       node.sample(tiny_model, image_guidance=2.5, **plain)[1]["samples"])


def test_an_instruction_model_without_a_source_is_refused_before_any_step(ip2p):
    class Stop(Exception):
        pass

    def progress(done, total):
        raise Stop  # a step ran

    node = VE_CrossFrameSampler()
    with pytest.raises(ValueError, match="instruction model.*connect images or a latent") as err:
        node.sample(ip2p, INSTRUCTION, NEGATIVE, 0, 2, 7.5, "ddim", 1.0, "per_frame", "first", "all", 8,
                    frame_count=2, width=48, height=64)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="instruction model.*connect images or a latent"):  # the engine, directly
        edit_video(ip2p, settings(), frame_count=2, size=(64, 48), progress=progress)


def test_bad_combinations_are_refused_in_one_line(ip2p, tiny_model, frames):
    with pytest.raises(ValueError, match="image_guidance must be 1 or more"):
        instruct_edit(ip2p, settings(), images=frames, image_guidance=0.5)
    with pytest.raises(ValueError, match="needs an instruction"):
        edit_video(tiny_model, settings(), start=None, frame_count=2, size=(64, 48),
                   conditioning=ImageConditioning(torch.zeros(2, 4, 8, 6)))
    with pytest.raises(ValueError, match="one source frame per sampled frame"):
        from comfyui_video_edit.pipelines_core.methods.instruct_pix2pix import InstructStart

        edit_video(ip2p, settings(), start=InstructStart(torch.zeros(3, 4, 8, 6)),
                   conditioning=ImageConditioning(torch.zeros(2, 4, 8, 6)))
    with pytest.raises(ValueError, match="temporal guidance"):
        instruct_edit(ip2p, settings(), object(), images=frames)


def test_a_latent_source_equals_its_images(ip2p, frames):
    """A LATENT of the posterior mode (unscaled, ComfyUI's convention) is the very conditioning images give."""
    from comfyui_video_edit.pipelines_core.methods.instruct_pix2pix import source_latents

    latent = {"samples": source_latents(ip2p, frames)}
    assert torch.equal(instruct_edit(ip2p, settings(), latent=latent), instruct_edit(ip2p, settings(), images=frames))


def test_strength_below_one_starts_from_the_source(ip2p, frames):
    """Below 1 the source latent is partly noised (SDEdit): the result lies nearer it than the edit from noise."""
    from comfyui_video_edit.pipelines_core.methods.instruct_pix2pix import source_latents

    source = source_latents(ip2p, frames) * ip2p.vae_scale
    kept = instruct_edit(ip2p, settings(strength=0.3, steps=10), images=frames)
    from_noise = instruct_edit(ip2p, settings(steps=10), images=frames)
    assert (kept - source).abs().mean() < 0.5 * (from_noise - source).abs().mean()


def test_a_controlnet_reads_the_noisy_latent_beside_the_instruction_model(ip2p, tiny_model, frames):
    hints = frames.permute(0, 3, 1, 2)
    controlnet = tiny_controlnet(ip2p.unet)
    assert controlnet.config.in_channels == 4
    controlled = instruct_edit(ip2p, settings(), images=frames, control=ControlStack().add(ControlUnit(controlnet, hints)))
    assert (controlled - instruct_edit(ip2p, settings(), images=frames)).abs().mean() > 1e-2
    wide = tiny_controlnet(tiny_model.unet)
    wide.register_to_config(in_channels=8)  # what the check reads: a ControlNet made for an 8-channel input
    with pytest.raises(ValueError, match="reads 8 latent channels"):
        instruct_edit(ip2p, settings(), images=frames, control=ControlStack().add(ControlUnit(wide, hints)))


def test_a_mask_keeps_the_source_where_it_is_zero(ip2p, frames):
    """The start brings its source to the mask blend: a mask of 0 on the right half keeps the source there."""
    from comfyui_video_edit.pipelines_core.methods.instruct_pix2pix import source_latents

    mask = torch.ones(frames.shape[0], 64, 48)
    mask[:, :, 24:] = 0.0
    edited = instruct_edit(ip2p, settings(), images=frames, mask=mask)
    source = (source_latents(ip2p, frames) * ip2p.vae_scale).to(edited)
    assert torch.allclose(edited[..., 3:], source[..., 3:], atol=1e-6)  # latent columns 3.. are pixels 24..
    assert (edited[..., :3] - source[..., :3]).abs().mean() > 1e-1


def test_ddim_invert_refuses_an_instruction_model_before_any_step():
    from comfyui_video_edit.pipelines_core.models.model import load_model
    from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video

    model = load_model("builtin:tiny-ip2p", dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="DDIM Invert: an instruction model"):
        invert_video(model, torch.rand(2, 32, 32, 3), "", steps=2)
