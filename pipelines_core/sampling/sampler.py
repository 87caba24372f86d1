"""The Cross-Frame Sampler: one denoising loop for every method, extended by hooks and processors.

The loop (`denoise_loop`) is a plain function in the spirit of k-diffusion's samplers: it takes a
model callable, latents, a scheduler and its timesteps, and a progress callback. A method changes
it only through
  * attention processors installed on the UNet for the duration of sampling (cross-frame rules;
    later: injection), and
  * hooks at three named points of every step (`Hooks`): before the model call, on the clean
    estimate x0, and after the scheduler step. A hook gets the step's `StepState` and returns the
    tensor the loop goes on with.
`edit_video` is the recipe that reads top to bottom: check -> encode prompts -> starting latents ->
attach processors -> sample.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from ..attention import NEEDS_ANCHOR, NEEDS_PREVIOUS, FrameLayout, VideoAttnProcessor, attention_processors, get_rule
from ..attention.attach import is_self_attention
from ..attention.processor import gathered_kv_bytes
from ..attention.rules import own_frame
from ..models.model import VEModel, encode_frames, encode_prompt
from .progress import Progress, or_silent
from .hooks import Hooks, StepState, fold  # noqa: F401  (StepState: part of the sampler's API)
from .injection import InjectionPlan, PlanContext
from .masking import edit_mask, inverted_source, masked_blend_hook, noised_source
from .schedulers import SCHEDULERS, eps_from_x0, make_scheduler, predicted_x0

NOISE_MODES = ("per_frame", "shared")
ATTENTION_LAYERS = {"all": "", "decoder": "up_blocks."}  # processor-name prefix the cross-frame rule applies to


@dataclass(frozen=True)
class SamplerSettings:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.5
    scheduler: str = "ddim"
    strength: float = 0.6  # used when starting from images or a latent (SDEdit): fraction of the schedule re-run
    noise: str = "per_frame"  # "per_frame": frame f uses seed + f; "shared": every frame the same noise
    attention: str = "first+previous"
    attention_layers: str = "all"  # "all" self-attention layers, or only the "decoder" (up blocks; Rerender)
    chunk_size: int = 8  # frames denoised together; the anchor frame joins every chunk
    chunk_overlap: int = 0  # > 0: overlapping windows whose noise predictions are blended (seamless chunks)

    def check(self, frame_count: int, from_images: bool) -> None:
        """Every setting checked before the first step; messages say what to change."""
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"unknown noise mode {self.noise!r}; choose one of {', '.join(NOISE_MODES)}")
        get_rule(self.attention)
        if self.attention_layers not in ATTENTION_LAYERS:
            raise ValueError(f"unknown attention_layers {self.attention_layers!r}; choose one of {', '.join(ATTENTION_LAYERS)}")
        if not math.isfinite(self.cfg):  # ComfyUI's own validation lets NaN through (every comparison is False)
            raise ValueError(f"cfg must be a finite number (got {self.cfg})")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {self.chunk_size})")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(f"chunk_overlap must be from 0 to chunk_size - 1 = {self.chunk_size - 1} "
                             f"(got {self.chunk_overlap}); lower chunk_overlap or raise chunk_size")
        if frame_count < 1:
            raise ValueError("no frames to sample")
        if from_images:
            if not 0.0 < self.strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1] (got {self.strength})")
            if int(self.steps * self.strength) < 1:
                raise ValueError(
                    f"strength {self.strength} with {self.steps} steps runs no step; raise strength or steps"
                )


# --- the loop ----------------------------------------------------------------------------------

Denoiser = Callable[[torch.Tensor, StepState], torch.Tensor]  # (model input, step) -> guided eps


def denoise_loop(
    denoise: Denoiser,
    latents: torch.Tensor,
    scheduler,
    scheduler_name: str,
    timesteps: torch.Tensor,
    hooks: Hooks = Hooks(),
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """Run `scheduler` over `timesteps` from `latents`; the one denoising loop of the pack."""
    progress = or_silent(progress)
    total = len(timesteps)
    first_index = getattr(scheduler, "begin_index", None) or 0
    for i, t in enumerate(timesteps):
        state = StepState(i, t, total, latents)
        latents = fold(hooks.before_model, state, "latents")
        eps = denoise(scheduler.scale_model_input(latents, t), replace(state, latents=latents))
        if hooks.on_x0:
            sigma_index = first_index + i  # where Euler's sigma table stands at this step
            x0 = predicted_x0(scheduler_name, scheduler, latents, eps, t, sigma_index)
            x0 = fold(hooks.on_x0, StepState(i, t, total, latents, eps, x0), "x0")
            eps = eps_from_x0(scheduler_name, scheduler, latents, x0, t, sigma_index)
        latents = scheduler.step(eps, t, latents).prev_sample
        latents = fold(hooks.after_step, StepState(i, t, total, latents, eps), "latents")
        progress(i + 1, total)
    return latents


# --- frames in chunks ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Frames denoised in one model call: `frames` in batch order; outputs of `keep` positions are used,
    each scaled by its entry in `weights` (a kept frame's weights over all chunks sum to 1)."""

    frames: tuple
    keep: tuple
    weights: tuple = ()  # one per `keep` position; empty: every kept output counts fully (weight 1)


def window_starts(frame_count: int, chunk_size: int, chunk_overlap: int = 0) -> list[int]:
    """First frame of each chunk's own frames.

    Overlap 0: back-to-back chunks, the last one possibly shorter (the anchor chunks the sampler always
    had, kept as they were so that existing edits do not change). Overlap > 0: windows of `chunk_size`
    frames every `chunk_size - chunk_overlap` frames, the last one moved back to end at the last frame,
    so that no window is short (a short window would see fewer neighbours than the ones it blends with).
    """
    if chunk_overlap == 0:
        return list(range(0, frame_count, chunk_size))
    last = max(frame_count - chunk_size, 0)
    return list(range(0, last, chunk_size - chunk_overlap)) + [last]


def blend_weights(windows: Sequence[range], frame_count: int, chunk_overlap: int) -> list[tuple]:
    """Per window, the weight of each of its own frames in the blend of the windows' noise predictions.

    MultiDiffusion's per-step solution is the average of the windows' predictions. Averaging uniformly
    would switch a frame from a half-and-half mix to one window alone where an overlap ends, which is
    itself a small jump; and a window's edge frames are the ones with neighbours on one side only, so
    their predictions are the least informed. So each window weighs its frames by a trapezoid: rising
    linearly over its first `chunk_overlap + 1` frames, falling over its last, flat between; then each
    frame's weights are divided by their sum. With the regular stride two overlapping windows cross-fade
    linearly (weights k/(overlap+1) and 1 - k/(overlap+1)); a frame in one window only gets exactly 1.
    """
    ramp = chunk_overlap + 1
    profiles = [[min(p + 1, len(w) - p, ramp) / ramp for p in range(len(w))] for w in windows]
    totals = [0.0] * frame_count
    for window, profile in zip(windows, profiles):
        for frame, weight in zip(window, profile):
            totals[frame] += weight
    return [tuple(weight / totals[frame] for frame, weight in zip(window, profile))
            for window, profile in zip(windows, profiles)]


def plan_chunks(frame_count: int, chunk_size: int, rule_name: str, chunk_overlap: int = 0) -> list[Chunk]:
    """Split frames into chunks; the anchor (frame 0) and, when the rule reads it, the frame before a
    chunk join every later chunk as context, so rules see the frames they expect at fixed positions.

    With `chunk_overlap` > 0 the chunks are overlapping windows (seamless chunks, MultiDiffusion-style):
    a frame in several windows gets the weighted average of their predictions at every step, so no
    frame pair is split between two separately denoised chunks.
    """
    windows = [range(start, min(start + chunk_size, frame_count))
               for start in window_starts(frame_count, chunk_size, chunk_overlap)]
    chunks = []
    for own, weights in zip(windows, blend_weights(windows, frame_count, chunk_overlap)):
        start = own.start
        context = []
        if start > 0 and rule_name in NEEDS_ANCHOR:
            context.append(0)
        if start > 0 and rule_name in NEEDS_PREVIOUS and start - 1 not in context:
            context.append(start - 1)
        frames = tuple(context) + tuple(own)
        chunks.append(Chunk(frames, tuple(range(len(context), len(frames))), weights))
    return chunks


@dataclass(frozen=True)
class SourceBranch:
    """A live source chunk (Plug-and-Play): at the step with timestep t the UNet also denoises the
    inverted latent `latents[t]` under the source prompt, so injections can read its features."""

    latents: dict  # timestep -> (F, 4, h, w)
    embeds: torch.Tensor  # (1, 77, D)

    def at(self, t: torch.Tensor, frame_ids: tuple, like: torch.Tensor) -> torch.Tensor:
        key = int(t)
        if key not in self.latents:
            raise ValueError(f"the inversion has no latent at timestep {key}: sample with DDIM Invert's steps")
        return self.latents[key][list(frame_ids)].to(like.device, like.dtype)


@dataclass
class VideoDenoiser:
    """Classifier-free-guided noise prediction for all frames, chunk by chunk.

    The UNet batch of a chunk is laid out (chunk, frame) with chunks [uncond, cond] — [source, uncond,
    cond] with a live source branch — so the attention processors gather frames only within one chunk.
    With cfg == 1 the uncond chunk is skipped. `uncond` may be a dict timestep -> embedding
    (null-text inversion's per-step unconditional embeddings).
    """

    unet: torch.nn.Module
    cond: torch.Tensor  # (1, 77, D)
    uncond: object  # (1, 77, D), or {timestep: (1, 77, D)}
    cfg: float
    chunks: list
    control: Optional[object] = None  # a ControlStack: gives ControlNet residuals per UNet call
    source: Optional[SourceBranch] = None

    def __call__(self, latents: torch.Tensor, state: StepState) -> torch.Tensor:
        # Blending eps, not the stepped latents, is MultiDiffusion's average all the same (every scheduler here
        # steps linearly in eps) and leaves the x0 hooks one prediction per frame. The sum runs in at least
        # fp32 so fp16/bf16 rounding of the weights does not bias it, and starts from -0.0, the exact additive
        # identity (a +0.0 start would turn a -0.0 prediction into +0.0), so a frame with weight 1 in one chunk
        # gets its prediction bit for bit, as before chunks overlapped.
        blended = torch.full(latents.shape, -0.0, dtype=torch.promote_types(latents.dtype, torch.float32),
                             device=latents.device)
        for chunk in self.chunks:
            eps_chunk = self._guided(latents[list(chunk.frames)], chunk.frames, state)
            keep = list(chunk.keep)
            weights = torch.tensor(chunk.weights or (1.0,) * len(keep), dtype=blended.dtype, device=latents.device)
            blended[[chunk.frames[k] for k in keep]] += eps_chunk[keep].to(blended.dtype) * weights.view(-1, 1, 1, 1)
        return blended.to(latents.dtype)

    def _guided(self, x: torch.Tensor, frame_ids: tuple, state: StepState) -> torch.Tensor:
        n = x.shape[0]
        inputs, contexts, roles = [x], [self.cond], ["cond"]
        if self.cfg != 1.0:
            uncond = self.uncond[int(state.timestep)] if isinstance(self.uncond, dict) else self.uncond
            inputs, contexts, roles = [x] + inputs, [uncond] + contexts, ["uncond"] + roles
        if self.source is not None:
            inputs = [self.source.at(state.timestep, frame_ids, x)] + inputs
            contexts, roles = [self.source.embeds] + contexts, ["source"] + roles
        context = torch.cat([c.to(x.device, x.dtype).expand(n, -1, -1) for c in contexts])
        out = self._unet(torch.cat(inputs), context, frame_ids, tuple(roles), state).chunk(len(roles))
        if self.cfg == 1.0:
            return out[-1]
        uncond_eps, cond_eps = out[-2], out[-1]
        return uncond_eps + self.cfg * (cond_eps - uncond_eps)

    def _unet(self, x: torch.Tensor, context: torch.Tensor, frame_ids: tuple, roles: tuple, state: StepState):
        layout = FrameLayout(len(frame_ids), tuple(frame_ids), roles, int(state.timestep), state.index)
        extra = self.control.unet_kwargs(x, context, layout, state) if self.control is not None else {}
        return self.unet(
            x, state.timestep, encoder_hidden_states=context, cross_attention_kwargs={"layout": layout}, **extra
        ).sample


# --- starting latents ---------------------------------------------------------------------------

def frame_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per frame, frame f seeded `seed + f`: a frame's noise does not depend on how
    many frames are loaded, and frame f matches diffusers' pipelines run with `seed + f`."""
    return [torch.Generator("cpu").manual_seed(seed + f) for f in range(count)]


def initial_noise(shape: tuple, settings: SamplerSettings, generators: Sequence[torch.Generator],
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    one = (1,) + tuple(shape[1:])
    if settings.noise == "shared":
        g = torch.Generator("cpu").manual_seed(settings.seed)
        return randn_tensor(one, generator=g, device=device, dtype=dtype).expand(shape).clone()
    return torch.cat([randn_tensor(one, generator=g, device=device, dtype=dtype) for g in generators])


def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule SDEdit re-runs (same arithmetic as diffusers' img2img pipeline)."""
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order:]


# --- the recipe ---------------------------------------------------------------------------------

def check_one_start(images=None, latent=None, inversion=None, injection=None) -> None:
    """A run starts from one thing; two connected starts would silently drop one, so refuse them."""
    if images is not None and inversion is not None:
        raise ValueError("connect either images (SDEdit) or an inversion, not both")
    if latent is not None and images is not None:
        raise ValueError("connect either images or a latent as the start, not both "
                         "(the latent replaces encoding images)")
    if latent is not None and (inversion is not None or injection is not None):
        raise ValueError("connect either a latent or an inversion (an injection brings its inversion) "
                         "as the start, not both")


def latent_samples(latent, channels: Optional[int] = None) -> torch.Tensor:
    """The UNSCALED samples (F, C, h, w) of a ComfyUI LATENT, checked; `channels`: the UNet's input channels
    (None: the layout only, for callers that have no model)."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise ValueError("latent must be a ComfyUI LATENT: a dict with a 'samples' tensor "
                         "(frames, 4, height/8, width/8)")
    samples = latent["samples"]
    image_layout = samples.ndim == 4 and min(samples.shape) >= 1  # a video model's (B, C, T, h, w) is not ours
    if not image_layout or (channels is not None and samples.shape[1] != channels):
        raise ValueError(f"latent samples must be (frames, {channels or 4}, height/8, width/8) for this model, "
                         f"got {tuple(samples.shape)}")
    return samples


def skip_posterior_draws(generators: Sequence[torch.Generator], shape: tuple, model: VEModel) -> None:
    """Advance each frame's generator past the VAE posterior sample `encode_frames` draws for images, so a
    latent start then draws the very noise an images start would: the LATENT of the posterior sample the
    images path would have drawn gives the same edit."""
    from diffusers.utils.torch_utils import randn_tensor

    posterior_shape = (1, model.vae.config.latent_channels) + tuple(shape[-2:])
    for g in generators:  # the shape, device and dtype of encode_frames' draw (the VAE's), so the same stream
        randn_tensor(posterior_shape, generator=g, device=model.device, dtype=model.vae.dtype)


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors on `device`: CUDA's own figure, MemAvailable on a Linux CPU; None where
    neither can be read (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def check_attention_memory(model: VEModel, settings: SamplerSettings, frame_count: int, size: tuple,
                           available: Optional[int], copies: int) -> None:
    """Refuse, with the figure, a run whose cross-frame keys/values alone do not fit: the gather of the
    largest self-attention layer (the first level: most tokens) for one chunk. `all` attention grows with the
    square of the chunk, so a long clip in one chunk is the case this catches before any step."""
    if available is None:
        return
    chunk = min(settings.chunk_size, frame_count)
    context = (1 if settings.attention in NEEDS_ANCHOR else 0) + (1 if settings.attention in NEEDS_PREVIOUS else 0)
    frames = min(chunk + context, frame_count)
    tokens = (size[0] // 8) * (size[1] // 8)
    channels = model.unet.config.block_out_channels[0]
    need = gathered_kv_bytes(get_rule(settings.attention), frames, frames * copies, tokens, channels,
                             torch.tensor([], dtype=model.dtype).element_size())
    if need > available:
        raise ValueError(
            f"attention {settings.attention!r} over {frames}-frame chunks at {size[1]}x{size[0]} gathers "
            f"{need / 2**30:.1f} GiB of keys/values in one layer, and {available / 2**30:.1f} GiB is free on "
            f"{model.device}: lower chunk_size (or the size), or use first+previous attention")


def check_frames(frames: torch.Tensor) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"images must be a ComfyUI IMAGE batch (frames, height, width, 3), got {tuple(frames.shape)}")
    h, w = frames.shape[1:3]
    if h % 8 or w % 8:
        raise ValueError(f"frame size {w}x{h} is not a multiple of 8; set Load Video's size to a multiple of 8")


def edit_video(model: VEModel, settings: "SamplerSettings", *args, **kwargs) -> torch.Tensor:
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
    injection=None,
    motion: Optional[tuple] = None,
    latent: Optional[dict] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sample a video's latents (F, 4, H/8, W/8), scaled as diffusers' latents are.

    Starts from one of:
      * an `inversion` (DDIM Invert; also the one an `injection` reads): from the inverted latent at the
        first timestep `settings.strength` selects (1.0 = from x_T);
      * `images` (ComfyUI IMAGE) partly noised by `settings.strength` (SDEdit);
      * `latent` (ComfyUI LATENT, unscaled, as this sampler outputs it): SDEdit from its samples in place of
        encoded images, with the same noise; frame count and size come from it;
      * noise, for `frame_count` frames of `size` (height, width); with `motion` = (strength_x, strength_y)
        Text2Video-Zero's motion dynamics: frame 0 denoised part way, translated for every later frame.
    `mask` (ComfyUI MASK, 1 = edit) and the latent's "noise_mask" keep the source outside the mask
    (`masking.py`); they need a source to keep (images, latent or inversion).
    """
    # 1. Check inputs
    check_one_start(images, latent, inversion, injection)
    if inversion is None and injection is not None:
        inversion = injection.inversion
    start_samples = latent_samples(latent, model.unet.config.in_channels) if latent is not None else None
    frame_count, size = clip_extent(images, inversion, frame_count, size, latent)
    if inversion is not None:
        _check_inversion_settings(settings, inversion)
    elif images is not None:
        check_frames(images)
    has_source = inversion is not None or images is not None or latent is not None
    if motion is not None and has_source:
        raise ValueError("motion dynamics starts from noise: disconnect the images (or the latent or the inversion) "
                         "or turn motion off")
    if not has_source and (frame_count is None or size is None):
        raise ValueError("give images to edit, or a frame count and size to generate from noise")
    settings.check(frame_count, from_images=has_source)
    if injection is not None and settings.chunk_overlap > 0 and frame_count > settings.chunk_size:
        # Injections are planned for the anchor chunks (PlanContext carries chunk_size only; FateZero's recorded
        # maps are keyed by those chunks' frames), so overlapping windows would misread them.
        raise ValueError("seamless chunks (chunk_overlap > 0) do not work with an injection yet: set chunk_overlap "
                         "to 0, or chunk_size to at least the frame count")
    noise_mask = latent.get("noise_mask") if latent is not None else None
    if (mask is not None or noise_mask is not None) and not has_source:
        raise ValueError("a mask keeps part of a source, but the sampler is generating from noise: connect images, "
                         "a latent or an inversion, or disconnect the mask")
    keep_mask = edit_mask(mask, noise_mask, frame_count, (size[0] // 8, size[1] // 8))
    if control is not None:
        control.check(frame_count, size)
    check_attention_memory(model, settings, frame_count, size, free_bytes(model.device),
                           copies=(2 if settings.cfg != 1.0 else 1) + (1 if injection is not None else 0))
    device, dtype = model.device, model.dtype

    # 2. Encode the prompts
    cond = encode_prompt(model, settings.prompt)
    uncond = encode_prompt(model, settings.negative_prompt)

    # 3. Timesteps and starting latents
    scheduler = make_scheduler(settings.scheduler, model.scheduler_config)
    if inversion is not None:
        scheduler = make_scheduler("ddim", {**model.scheduler_config, "clip_sample": False})
    scheduler.set_timesteps(settings.steps, device=device)
    generators = frame_generators(settings.seed, frame_count)
    latent_shape = (frame_count, model.unet.config.in_channels, size[0] // 8, size[1] // 8)
    if inversion is not None:
        timesteps = img2img_timesteps(scheduler, settings.steps, settings.strength)
        latents = inversion.latents[int(timesteps[0])].to(device, dtype)
        if inversion.null_embeds:
            uncond = inversion.null_embeds  # per-step unconditional embeddings that reproduce the source
    elif images is not None or latent is not None:
        timesteps = img2img_timesteps(scheduler, settings.steps, settings.strength)
        if images is not None:
            clean = encode_frames(model, images, generators)
        else:
            clean = start_samples.to(device, dtype) * model.vae_scale  # ComfyUI latents are unscaled
            skip_posterior_draws(generators, latent_shape, model)
        noise = initial_noise(latent_shape, settings, generators, device, dtype)
        latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(frame_count))
    else:
        timesteps = scheduler.timesteps
        latents = initial_noise(latent_shape, settings, generators, device, dtype) * scheduler.init_noise_sigma
    keep_hooks = Hooks()
    if keep_mask is not None:
        # The source at the level each step moves to: what the inversion recorded, else the clean latent noised
        # with this run's own noise (inpaint pipeline's init_latents_proper).
        source_at = (inverted_source(inversion.latents, timesteps) if inversion is not None
                     else noised_source(scheduler, clean, noise, timesteps))
        keep_hooks = Hooks(after_step=[masked_blend_hook(keep_mask, source_at)])

    # 4. Plan the injection, attach attention processors (UNet, and ControlNets when asked), sample
    plan = InjectionPlan()
    if injection is not None:
        plan = injection.plan(PlanContext(model, frame_count, len(timesteps), tuple(int(t) for t in timesteps),
                                          settings.cfg, settings.seed, settings.prompt, settings.attention,
                                          settings.attention_layers, settings.chunk_size))
    source = SourceBranch(inversion.latents, inversion.prompt_embeds) if plan.source_branch else None
    denoiser = VideoDenoiser(
        model.unet, cond, uncond, settings.cfg,
        plan_chunks(frame_count, settings.chunk_size, settings.attention, settings.chunk_overlap), control, source,
    )
    rule, prefix = get_rule(settings.attention), ATTENTION_LAYERS[settings.attention_layers]

    def sampler_rule(name: str):
        return rule if is_self_attention(name) and name.startswith(prefix) else own_frame

    def unet_processor(name: str) -> VideoAttnProcessor:
        chosen = plan.rule_for(name)
        return VideoAttnProcessor(sampler_rule(name) if chosen is None else chosen, name, plan.edits_for(name))

    def controlnet_processor(name: str) -> VideoAttnProcessor:
        return VideoAttnProcessor(sampler_rule(name), name)  # injections read UNet layers only

    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(attention_processors(model.unet, unet_processor))
        for module in control.attention_modules() if control is not None else ():
            stack.enter_context(attention_processors(module, controlnet_processor))
        stack.enter_context(plan.patches(model.unet))
        if motion is not None:
            latents, timesteps = _motion_start(denoiser, scheduler, settings, latents, motion)
        return denoise_loop(denoiser, latents, scheduler, settings.scheduler, timesteps,
                            hooks + plan.hooks + keep_hooks, progress)  # the blend last: nothing moves the kept region


def _motion_start(denoiser: VideoDenoiser, scheduler, settings: SamplerSettings, noise: torch.Tensor, motion: tuple):
    """Text2Video-Zero's start: frame 0 alone (with the same prompts and control) to t1 and t0, then moved."""
    from dataclasses import replace as replace_field

    from ..methods.text2video_zero import motion_dynamics_start

    if settings.scheduler != "ddim":
        raise ValueError(f"motion dynamics needs the 'ddim' scheduler (Text2Video-Zero's), not {settings.scheduler!r}")
    first = replace_field(denoiser, chunks=plan_chunks(1, 1, "none"))
    generator = torch.Generator("cpu").manual_seed(settings.seed + 1)
    return motion_dynamics_start(first, scheduler, noise[:1], noise.shape[0], motion[0], motion[1],
                                 generator=generator, shared_noise=settings.noise == "shared")


def clip_extent(images=None, inversion=None, frame_count=None, size=None, latent=None) -> tuple:
    """(frame count, (height, width)) of what will be sampled: the inversion's, else the images', else the
    latent's (a ComfyUI LATENT), else as given."""
    if inversion is not None:
        return inversion.latents[0].shape[0], tuple(8 * d for d in inversion.latents[0].shape[-2:])
    if images is not None:
        return images.shape[0], tuple(images.shape[1:3])
    if latent is not None:
        samples = latent_samples(latent)
        return samples.shape[0], tuple(8 * d for d in samples.shape[-2:])
    return frame_count, size


def _check_inversion_settings(settings: SamplerSettings, inversion) -> None:
    if settings.scheduler != "ddim":
        raise ValueError(f"sampling from a DDIM inversion needs the 'ddim' scheduler (got {settings.scheduler!r})")
    if settings.steps != inversion.steps:
        raise ValueError(f"the inversion ran {inversion.steps} steps but the sampler is set to {settings.steps}: "
                         "set the sampler's steps to DDIM Invert's")
