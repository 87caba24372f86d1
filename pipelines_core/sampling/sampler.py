"""The Cross-Frame Sampler: one recipe for every method, reading top to bottom.

`sample_video` is a short numbered script: check everything -> encode the prompts -> the scheduler and the
timesteps the start chooses -> plan the injection -> attach the attention processors -> begin the start ->
run the one loop (`loop.denoise_loop`) with every hook. A method changes it only through values it hands
in: a start (`starts.py`, or its own), hooks (`hooks.py`), attention rules and edits, an injection plan.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Optional

import torch

from ..attention import VideoAttnProcessor, attention_processors, get_rule
from ..attention.attach import is_self_attention
from ..attention.joint import JointVideoAttnProcessor
from ..attention.processor import FrameLayout, gathered_kv_bytes
from ..attention.rules import Rule, own_frame
from ..models.model import VEModel, encode_text
from .budget import accounting_available, chunk_batch, free_bytes, unet_call_bytes
from .chunks import Chunk, plan_chunks
from .denoiser import ImageConditioning, SourceBranch, VideoDenoiser
from .hooks import Hooks, last
from .injection import Injection, InjectionPlan, PlanContext
from .loop import denoise_loop
from .masking import edit_mask, masked_blend_hook
from ..progress import Progress
from .settings import ATTENTION_LAYERS, SamplerSettings
from .starts import InversionStart, Start, StartContext, frame_generators, start_from

def check_attention_memory(model: VEModel, settings: SamplerSettings, frame_count: int, size: tuple,
                           available: Optional[int], copies: int, widest: Optional[Rule] = None) -> None:
    """Refuse, with the figure, a run whose cross-frame keys/values alone do not fit: the gather of the
    largest self-attention layer (the first level: most tokens) for one chunk. `all` attention grows with the
    square of the chunk, so a long clip in one chunk is the case this catches before any step. `widest`: the
    rule reading the most frames among the run's processors, where a method sets its own (default: the
    sampler's)."""
    if available is None or model.backbone.joint_attention:  # counted for UNets (Flux's MMDiT: not yet)
        return
    chunk = min(settings.chunk_size, frame_count)
    planned = get_rule(settings.attention)
    rule = widest or planned
    context = int(planned.needs_anchor) + int(planned.needs_previous)
    frames = min(chunk + context, frame_count)
    tokens = (size[0] // 8) * (size[1] // 8)
    channels = model.unet.config.block_out_channels[0]
    need = gathered_kv_bytes(rule, frames, frames * copies, tokens, channels,
                             torch.tensor([], dtype=model.dtype).element_size())
    if need > available:
        raise ValueError(
            f"attention {rule.name!r} over {frames}-frame chunks at {size[1]}x{size[0]} gathers "
            f"{need / 2**30:.1f} GiB of keys/values in one layer, and {available / 2**30:.1f} GiB is free on "
            f"{model.device}: lower chunk_size (or the size), or use first+previous attention")


def edit_video(model: VEModel, settings: SamplerSettings, *args, **kwargs) -> torch.Tensor:
    """Sample a video's latents with the model's LoRAs active (see `sample_video` for the arguments)."""
    from ..models.lora import lora_scope

    with lora_scope(model):
        return sample_video(model, settings, *args, **kwargs)


def sample_video(
    model: VEModel,
    settings: SamplerSettings,
    images: Optional[torch.Tensor] = None,
    frame_count: Optional[int] = None,
    size: Optional[tuple] = None,
    hooks: Hooks = Hooks(),
    progress: Optional[Progress] = None,
    control=None,
    inversion=None,
    injection: Optional[Injection] = None,
    latent: Optional[dict] = None,
    mask: Optional[torch.Tensor] = None,
    start: Optional[Start] = None,
    conditioning: Optional[ImageConditioning] = None,
) -> torch.Tensor:
    """Sample a video's latents (F, 4, H/8, W/8), scaled as diffusers' latents are.

    Starts from `start` when given (e.g. Text2Video-Zero's `MotionStart`), else from what is connected
    (`starts.start_from`): an `inversion` (or the one an `injection` reads) from the level `settings.strength`
    selects (1.0 = from x_T); `images` (ComfyUI IMAGE) or a `latent` (ComfyUI LATENT, unscaled) partly noised by
    `settings.strength` (SDEdit); else noise for `frame_count` frames of `size` (height, width) -- with a
    ControlNet and no extent given, the hints' count and size. `mask` (ComfyUI MASK, 1 = edit) and a latent's
    "noise_mask" keep the source outside the mask (`masking.py`); they need a source to keep. `conditioning`:
    what an instruction model (InstructPix2Pix, `VEModel.is_instruction`) reads beside the noisy latent, one
    per frame, and its image guidance; such a model needs it and others refuse it
    (`methods/instruct_pix2pix.py` builds it with its start).
    """
    # 1. Check everything before the first step
    start = resolve_start(start, images, latent, inversion, injection, frame_count, size, control)
    frame_count, size = start.extent()
    model.backbone.check_run(settings, size, control)
    start.check(settings, model)
    settings.check(frame_count, from_images=start.has_source)
    if injection is not None:
        model.backbone.check_method(injection.mode)
        injection.check_run(settings, frame_count)
    noise_mask = start.noise_mask
    if (mask is not None or noise_mask is not None) and not start.has_source:
        raise ValueError("a mask keeps part of a source, but the sampler is generating from noise: connect images, "
                         "a latent or an inversion, or disconnect the mask")
    keep_mask = edit_mask(mask, noise_mask, frame_count, (size[0] // 8, size[1] // 8))
    if control is not None:
        control.check(frame_count, size, model)
    check_conditioning(model, conditioning, injection, frame_count, size, control)
    # 2. Encode the prompts
    cond_text, uncond_text = encode_text(model, settings.prompt), encode_text(model, settings.negative_prompt)
    cond, uncond = cond_text.hidden, uncond_text.hidden

    # 3. The scheduler and the timesteps the start will run
    scheduler = start.make_scheduler(settings, model)
    model.backbone.set_timesteps(scheduler, settings.steps, size, model.device)
    timesteps = start.timesteps(scheduler, settings)

    # 4. Plan the injection; the denoiser with its chunks, ControlNet and live source branch
    plan = InjectionPlan()
    if injection is not None:
        plan = injection.plan(PlanContext(model, frame_count, len(timesteps), tuple(int(t) for t in timesteps.tolist()),
                                          settings.cfg, settings.seed, settings.prompt, settings.attention,
                                          settings.attention_layers, settings.chunk_size))
    source = SourceBranch(injection.inversion.latents, injection.inversion.prompt_embeds) if plan.source_branch else None
    chunks = plan_chunks(frame_count, settings.chunk_size, settings.attention, settings.chunk_overlap)
    unet_processor, controlnet_processor = processors(settings, plan, model.backbone.joint_attention)
    cfg, guidance = model.backbone.guidance_split(settings.cfg)  # a distilled model embeds its guidance
    copies = (cfg != 1.0) + 1 + (source is not None)
    if conditioning is not None:
        copies = 3 if conditioning.guided(settings.cfg) else 1  # InstructPix2Pix: prompt+image, image, neither
    check_attention_memory(model, settings, frame_count, size, free_bytes(model.device), copies,
                           widest_rule(model.unet, unet_processor))
    batch = chunks_per_call(model, chunks, unet_processor, copies, size)
    pooled = {"cond": cond_text.pooled, "uncond": uncond_text.pooled, "image": uncond_text.pooled}
    if source is not None:
        pooled["source"] = injection.inversion.prompt_pooled
    added = model.backbone.added_conditioning(model, pooled, size, guidance)
    denoiser = VideoDenoiser(model.unet, cond, uncond, cfg, chunks, control, source, batch, conditioning, added)

    # 5. Attach the attention processors (UNet, and ControlNets when asked), begin, and run the loop
    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(attention_processors(model.unet, unet_processor))
        for module in control.attention_modules() if control is not None else ():
            stack.enter_context(attention_processors(module, controlnet_processor))
        stack.enter_context(plan.patches(model.unet))
        shape = (frame_count, model.latent_channels, size[0] // 8, size[1] // 8)  # not the UNet's input (IP2P: 8)
        begun = start.begin(StartContext(model, settings, scheduler, timesteps,
                                         frame_generators(settings.seed, frame_count), shape, denoiser))
        if begun.uncond is not None:
            denoiser.uncond = begun.uncond  # null-text inversion's per-step embeddings reproduce the source
        keep = Hooks()
        if keep_mask is not None and begun.source_at is None:
            raise ValueError(f"{type(start).__name__} keeps no source at each step's noise level, so a mask cannot "
                             "keep part of it: disconnect the mask")
        if keep_mask is not None:
            keep = Hooks(after_step=[last(masked_blend_hook(keep_mask, begun.source_at))])  # nothing moves it after
        return denoise_loop(plan.wrap_denoiser(denoiser), begun.latents, scheduler, settings.scheduler, begun.timesteps,
                            hooks + plan.hooks + keep, progress, begun.first_position)


def check_conditioning(model: VEModel, conditioning: Optional[ImageConditioning], injection, frame_count: int,
                       size: tuple, control=None) -> None:
    """An instruction model gets its per-frame conditioning, one for each frame at the latent size; no other model
    takes any; no injection reads a run whose UNet also reads the source (nor does DDIM Invert run such a UNet);
    its ControlNets read the noisy latent alone (SD-1.5 ControlNets beside InstructPix2Pix)."""
    if conditioning is None:
        if model.is_instruction:
            raise ValueError("the model is an instruction model (InstructPix2Pix) and edits source frames: connect "
                             "images or a latent to the sampler")
        return
    if not model.is_instruction:
        raise ValueError(f"image conditioning needs an instruction (InstructPix2Pix) model, and {model!r} is "
                         "text-to-image: load an InstructPix2Pix model")
    if injection is not None:
        raise ValueError("an instruction (InstructPix2Pix) model runs without an injection: disconnect it")
    for unit in control.units if control is not None else ():
        channels = unit.controlnet.config.in_channels
        if channels != model.latent_channels:
            which = f"ControlNet {unit.name!r}" if unit.name else "the ControlNet"
            raise ValueError(f"{which} reads {channels} latent channels; beside an instruction "
                             f"model it reads the noisy latent ({model.latent_channels}): use an SD-1.5 ControlNet")
    expected = (frame_count, int(model.unet.config.in_channels) - model.latent_channels, size[0] // 8, size[1] // 8)
    if tuple(conditioning.latents.shape) != expected:
        raise ValueError(f"the instruction model's source latents are {tuple(conditioning.latents.shape)}, "
                         f"the run needs {expected}: give one source frame per sampled frame")
    if not (math.isfinite(conditioning.scale) and conditioning.scale >= 1.0):
        raise ValueError(f"image_guidance must be 1 or more (got {conditioning.scale}): below 1 InstructPix2Pix "
                         "turns all guidance off")


def widest_rule(unet, unet_processor) -> Rule:
    """The rule that reads the most frames among the processors `unet_processor` gives the UNet's layers."""
    return max((unet_processor(name).rule for name in unet.attn_processors), key=lambda rule: rule(16).shape[1])


def chunks_per_call(model: VEModel, chunks: list[Chunk], unet_processor, copies: int, size: tuple) -> int:
    """How many chunks share one UNet call: 1 when there is one chunk, when an attention edit reads the call
    (edits know one chunk per call: frame ids, recorded maps) or when the memory cannot be counted; else as
    many as the free memory's budget and `budget.BATCH_FRAMES` hold at the largest chunk's counted activations
    (`budget.py`)."""
    if len(chunks) < 2 or not accounting_available() or model.backbone.joint_attention:
        return 1  # (the fake-tensor count builds UNets; Flux's calls stay one chunk each)
    installed = {name: unet_processor(name) for name in model.unet.attn_processors}
    if any(processor.edits for processor in installed.values()):
        return 1
    frames = max(len(chunk.frames) for chunk in chunks)
    roles = ("source", "uncond", "cond")[-copies:]
    per_chunk = unet_call_bytes(model.unet, FrameLayout(frames, (), roles), (size[0] // 8, size[1] // 8),
                                {name: processor.rule for name, processor in installed.items()})
    return chunk_batch(per_chunk, len(chunks), free_bytes(model.device), frames)


def resolve_start(start, images, latent, inversion, injection, frame_count, size, control) -> Start:
    """The run's start: the one given, else the one for what is connected. An injection brings its inversion,
    and a run with an injection must start from that very inversion. Generating under a ControlNet without an
    extent takes the hints' frame count and size."""
    read = injection.inversion if injection is not None else None
    brought = injection.start if injection is not None else None
    if brought is not None:
        if start is not None or any(v is not None for v in (images, latent, inversion)):
            raise ValueError(f"the {injection.mode} injection brings its own start (its source frames): disconnect "
                             "the sampler's images, latent and inversion")
        return brought
    if start is not None:
        if any(v is not None for v in (images, latent, inversion)):
            raise ValueError("a start was given and also images, a latent or an inversion: give one start")
        if read is not None and not (isinstance(start, InversionStart) and start.inversion is read):
            raise ValueError("the injection reads a DDIM inversion the run does not start from: start from it")
        return start
    if read is not None:
        if inversion is not None and inversion is not read:
            raise ValueError("the sampler's inversion and the injection's differ: connect the same DDIM Invert "
                             "to both (or only to the injection)")
        inversion = read
    generating = images is None and latent is None and inversion is None
    if generating and frame_count is None and size is None and control is not None and len(control):
        frame_count, size = control.units[0].frame_count, control.units[0].size
    return start_from(images, latent, inversion, frame_count, size)


def processors(settings: SamplerSettings, plan: InjectionPlan, joint: bool = False):
    """Attention processor factories for the UNet and for ControlNets: the sampler's cross-frame rule on the
    self-attention layers it covers, the plan's rule and edits where it has them (UNet layers only). `joint`: the
    network is an MMDiT (Flux) whose every attention joins text and image tokens; the rule acts on the image
    tokens of all of them, in every block (its blocks have no encoder/decoder for `attention_layers`)."""
    rule, prefix = get_rule(settings.attention), ATTENTION_LAYERS[settings.attention_layers]

    def sampler_rule(name: str):
        return rule if is_self_attention(name) and name.startswith(prefix) else own_frame

    def unet_processor(name: str) -> VideoAttnProcessor:
        if joint:
            return JointVideoAttnProcessor(plan.rule_for(name) or rule, name)
        chosen = plan.rule_for(name)
        return VideoAttnProcessor(sampler_rule(name) if chosen is None else chosen, name, plan.edits_for(name))

    def controlnet_processor(name: str) -> VideoAttnProcessor:
        return VideoAttnProcessor(sampler_rule(name), name)  # injections read UNet layers only

    return unet_processor, controlnet_processor
