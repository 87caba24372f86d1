"""DDIM Invert: a video's latents run back up the noise schedule, keyed by timestep.

Inversion is the sampler's loop run backwards: `denoise_loop` with diffusers' DDIMInverseScheduler
(always clip_sample=False: clamping x0 breaks SD latents) and an after-step hook that keeps every
latent. The step with timestep t moves x from noise level t - T/N to level t using eps(x, t)
(DDIM eq. 12 read backwards), so latents[t] is exactly what the sampling step with timestep t
starts from; latents[0] is the encoded video. Only DDIM is inverted: Euler and DPM++ 2M are
deterministic too, but their inverse steps are not implemented.

Options: recording attention/features into an AttentionStore (checked against a byte budget before
the first step), null-text inversion (Mokady et al.) for faithful reconstruction at CFG > 1, and a
reconstruction PSNR readout. Results are memoised, so re-running a graph reuses the inversion.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import uuid
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..attention import VideoAttnProcessor, attention_processors, get_rule, is_self_attention
from ..attention.rules import own_frame
from ..attention.store import (
    DISK_FIX, AttentionStore, RecordSpec, StepBuffer, StoreBudgetError, attention_layers, estimate_bytes,
    feature_recording, key_frames, over_budget_message, recording_edits,
)
from ..models.model import VEModel, decode_latents, encode_frames, encode_text
from ..progress import Progress, or_silent
from ..video.frames import check_image_batch
from .chunks import plan_chunks
from .denoiser import VideoDenoiser
from .hooks import Hooks, StepState
from .loop import denoise_loop
from .gradients import local_gradients

__all__ = [
    "INVERTIBLE", "Inversion", "RecordSpec", "check_invertible", "clear_inversion_cache", "ddim_invert",
    "ddim_sample", "invert_video", "latent_at", "reconstruct", "reconstruction_psnr",
]

INVERTIBLE = ("ddim",)
CACHE_SIZE = 2  # each entry may hold a recorded store up to its budget
_CACHE: "OrderedDict[tuple, Inversion]" = OrderedDict()


def check_invertible(name: str) -> None:
    if name not in INVERTIBLE:
        raise ValueError(f"scheduler {name!r} cannot be inverted; DDIM Invert (and sampling from an inversion) "
                         "uses 'ddim'")


# --- the loop, both ways -------------------------------------------------------------------

def ddim_schedulers(scheduler_config: dict, steps: int, device=None):
    """(DDIMScheduler, DDIMInverseScheduler) from the model's config, clip_sample off, timesteps set."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config["clip_sample"] = False
    forward, inverse = DDIMScheduler.from_config(config), DDIMInverseScheduler.from_config(config)
    forward.set_timesteps(steps, device=device)
    inverse.set_timesteps(steps, device=device)
    if not torch.equal(inverse.timesteps.cpu(), forward.timesteps.cpu().flip(0)):
        raise ValueError("the scheduler's timestep spacing has no DDIM inverse; use 'leading' or 'trailing' spacing")
    if 0 in forward.timesteps.tolist():
        raise ValueError("a sampling step at timestep 0 (steps_offset 0) collides with the clean latent's key 0; "
                         "set the scheduler's steps_offset to 1")
    return forward, inverse


def ddim_invert(denoise, x0: torch.Tensor, scheduler_config: dict, steps: int, hooks: Hooks = Hooks(),
                progress: Optional[Progress] = None) -> dict[int, torch.Tensor]:
    """Run `denoise` (the sampler's noise predictor) backwards from x0; every latent on the CPU by timestep."""
    _, inverse = ddim_schedulers(scheduler_config, steps, x0.device)
    latents = {0: x0.detach().cpu().clone()}

    def keep(state: StepState) -> torch.Tensor:
        latents[int(state.timestep)] = state.latents.detach().cpu().clone()
        return state.latents

    denoise_loop(denoise, x0, inverse, "ddim", inverse.timesteps, hooks + Hooks(after_step=[keep]), progress)
    return latents


def ddim_sample(denoise, x_t: torch.Tensor, scheduler_config: dict, steps: int, hooks: Hooks = Hooks(),
                progress: Optional[Progress] = None) -> torch.Tensor:
    """The forward DDIM loop with the same schedule (clip_sample off), from the largest timestep down."""
    forward, _ = ddim_schedulers(scheduler_config, steps, x_t.device)
    return denoise_loop(denoise, x_t, forward, "ddim", forward.timesteps, hooks, progress)


# --- the result ------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Inversion:
    """An inverted video. `latents[t]` is the latent the sampling step with timestep t starts from.

    timesteps: the sampling timesteps, descending (DDIMScheduler.set_timesteps(steps)).
    latents: {0: encoded frames x0, t: latent at noise level t, ..., max(t): x_T}, on the CPU.
    cfg: guidance that reproduces the video from x_T (with `null_embeds` when present).
    null_embeds: per sampling timestep, the optimised unconditional embedding (null-text inversion).
    store: recorded attention/features keyed (layer, t, kind), recorded at the inversion step with
        timestep t (the UNet saw the latent one level below t, with timestep t, as FateZero stores).
    """

    timesteps: torch.Tensor
    latents: dict
    prompt: str
    prompt_embeds: torch.Tensor
    steps: int
    cfg: float
    source: str
    attention: str = "none"
    chunk_size: int = 8
    null_embeds: Optional[dict] = None
    store: Optional[AttentionStore] = None
    reconstruction_psnr: Optional[float] = None
    record: RecordSpec = field(default_factory=RecordSpec)
    control: Optional[object] = None  # the ControlStack that steered every inversion step (RAVE), or None
    prompt_pooled: Optional[torch.Tensor] = None  # the prompt's pooled embedding, for families with one (SDXL)

    @property
    def x_T(self) -> torch.Tensor:
        return self.latents[int(self.timesteps[0])]

    def __repr__(self) -> str:
        psnr = "" if self.reconstruction_psnr is None else f", {self.reconstruction_psnr:.1f} dB"
        return f"Inversion({self.steps} steps, {self.latents[0].shape[0]} frames, cfg {self.cfg}{psnr})"


def latent_at(inversion: Inversion, t) -> torch.Tensor:
    key = int(t)
    if key not in inversion.latents:
        raise KeyError(f"the inversion has no latent at timestep {key}; it ran {inversion.steps} steps "
                       f"(timesteps {int(inversion.timesteps[-1])}..{int(inversion.timesteps[0])}): "
                       "sample with the same number of steps as DDIM Invert")
    return inversion.latents[key]


# --- DDIM Invert -----------------------------------------------------------------------------

def invert_video(
    model: VEModel,
    frames: torch.Tensor,
    prompt: str = "",
    steps: int = 50,
    cfg: float = 1.0,
    record: RecordSpec = RecordSpec(),
    budget_bytes: int = 4 * 2**30,
    null_text: bool = False,
    null_inner_steps: int = 10,
    null_lr: float = 1e-2,
    measure: bool = False,
    attention: str = "none",
    chunk_size: int = 8,
    scheduler: str = "ddim",
    progress: Optional[Progress] = None,
    control=None,
) -> Inversion:
    """Invert a ComfyUI IMAGE batch (F, H, W, 3) with DDIM, per frame (rule "none") in chunks by default.

    With null_text the trajectory is inverted at CFG 1 and unconditional embeddings are optimised so
    that sampling at `cfg` follows it (`null_inner_steps` Adam steps at `null_lr` per timestep,
    Mokady's defaults). `budget_bytes` bounds a "cpu" recording; a "disk" one is
    bounded by free space. `control` (a ControlStack, hints for these frames) steers every inversion step, whatever
    its units' start/end, as RAVE inverts (`give_control_inversion`); the inversion keeps it so its reconstruction
    is steered alike. Everything is checked before the first step.
    """
    # 1. Check inputs
    if model.is_instruction:
        raise ValueError("DDIM Invert: an instruction model (InstructPix2Pix) edits from the source frames "
                         "themselves and is not inverted: connect the frames to the Cross-Frame Sampler instead")
    check_invertible(scheduler)
    check_image_batch(frames, "images", multiple_of=8)
    model.backbone.check_run(None, tuple(frames.shape[1:3]), control, invert=True)
    _check_settings(steps, cfg, chunk_size, attention, record)
    frame_count, height, width = frames.shape[:3]
    if control is not None and len(control):
        control.check(frame_count, (height, width), model)
        if null_text:
            raise ValueError("DDIM Invert: null-text inversion does not take a ControlNet yet; disconnect control "
                             "or turn null_text off")
        control = type(control)(tuple(replace(unit, start=0.0, end=1.0) for unit in control.units))
    else:
        control = None
    chunks = plan_chunks(frame_count, chunk_size, attention)
    null_options = (null_inner_steps, null_lr) if null_text else None
    key = _cache_key(model, frames, prompt, steps, cfg, record, null_options, attention, chunk_size) + (
        _control_key(control),)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _measured(model, _CACHE[key], frames, key) if measure else _CACHE[key]
    _check_recordable(record, attention, chunks)
    store = open_store(record, model.unet, frame_count, height, width, steps, attention,
                       model.tokenizer.model_max_length, budget_bytes)

    # 2. Encode the prompt and the frames (VAE mean: deterministic)
    cond_text, uncond_text = encode_text(model, prompt), encode_text(model, "")
    cond, uncond = cond_text.hidden, uncond_text.hidden
    added = model.backbone.added_conditioning(model, {"cond": cond_text.pooled, "uncond": uncond_text.pooled},
                                              (height, width))
    x0 = encode_frames(model, frames)

    # 3. Run the loop backwards, recording what was asked
    denoiser = VideoDenoiser(model.unet, cond, uncond, 1.0 if null_text else cfg, chunks, control, added=added)
    with torch.no_grad(), _cross_frame_controlnets(control, attention):
        latents = _recorded_inversion(model, denoiser, x0, steps, attention, record, store, progress)
    timesteps = ddim_schedulers(model.scheduler_config, steps)[0].timesteps

    # 4. Null-text: unconditional embeddings that make CFG sampling follow the trajectory
    null = None
    if null_text:
        null = null_text_embeddings(model, latents, timesteps, cond, uncond, cfg, chunks, attention,
                                    null_inner_steps, null_lr, progress, added)

    pooled = None if cond_text.pooled is None else cond_text.pooled.detach().cpu()
    inversion = Inversion(timesteps, latents, prompt, cond.detach().cpu(), steps, cfg, model.source, attention,
                          chunk_size, null, store, None, record, control, pooled)
    _remember(key, inversion)
    return _measured(model, inversion, frames, key) if measure else inversion


def _check_settings(steps: int, cfg: float, chunk_size: int, attention: str, record: RecordSpec) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps})")
    if cfg < 1.0:
        raise ValueError(f"cfg must be at least 1 (got {cfg}); DDIM Invert normally uses 1")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {chunk_size})")
    get_rule(attention)
    record.check()


def _check_recordable(record: RecordSpec, attention: str, chunks) -> None:
    """Recorded self-attention keys must have one length for every frame to be stacked."""
    if record.records_self_keys and len({key_frames(attention, len(c.frames)) for c in chunks}) > 1:
        raise ValueError(f"recording self-attention under rule {attention!r} needs every frame in one chunk; "
                         "raise chunk_size to the frame count")


def open_store(record: RecordSpec, unet, frames: int, height: int, width: int, steps: int, attention: str,
               text_tokens: int, budget_bytes: int) -> Optional[AttentionStore]:
    """An empty store for `record`, or a StoreBudgetError before anything runs when it cannot fit."""
    if record.is_empty:
        return None
    needed = estimate_bytes(record, unet, frames, height, width, steps, attention, text_tokens)
    if record.storage == "disk":
        folder = record.disk_folder()
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise StoreBudgetError(over_budget_message(needed, free, "the free disk space", DISK_FIX))
        return AttentionStore(free, folder)
    if needed > budget_bytes:
        raise StoreBudgetError(over_budget_message(needed, budget_bytes))
    return AttentionStore(budget_bytes)


def _recorded_inversion(model: VEModel, denoiser, x0, steps, attention, record, store, progress):
    """ddim_invert with the cross-frame rule attached and recorders on the selected layers."""
    frames, height, width = x0.shape[0], x0.shape[2] * 8, x0.shape[3] * 8
    buffer = StepBuffer(store, frames) if store is not None else None
    tokens = {}
    if record.records_attention:
        tokens = {layer.name: layer.tokens for layer in attention_layers(model.unet, height, width)}

    def processor_for(name: str) -> VideoAttnProcessor:
        edits = recording_edits(name, tokens[name], record, buffer) if tokens else []
        return _rule_processor(attention, name, edits)

    def flush(state: StepState) -> torch.Tensor:
        buffer.flush(int(state.timestep))
        return state.latents

    hooks = Hooks(after_step=[flush]) if buffer is not None else Hooks()
    with attention_processors(model.unet, processor_for), feature_recording(model.unet, record.features, buffer):
        return ddim_invert(denoiser, x0, model.scheduler_config, steps, hooks, progress)


@contextmanager
def _cross_frame_controlnets(control, attention: str):
    """The inversion's cross-frame rule inside the ControlNets that follow the sampler's (as sampling does)."""
    with ExitStack() as stack:
        for module in control.attention_modules() if control is not None else ():
            stack.enter_context(attention_processors(module, lambda name: _rule_processor(attention, name)))
        yield


def _control_key(control) -> tuple:
    """What about a ControlStack changes an inversion: each unit's weights, hints and settings."""
    if control is None:
        return ()
    return tuple((weights_token(unit.controlnet), _content_hash(unit.hints), unit.strength, unit.guess_mode,
                  unit.cross_frame_attention) for unit in control.units)


def _rule_processor(attention: str, name: str, edits=()) -> VideoAttnProcessor:
    """The cross-frame rule on self-attention layers; cross-attention stays per frame."""
    return VideoAttnProcessor(get_rule(attention) if is_self_attention(name) else own_frame, name, edits)


def _cross_frame(unet, attention: str):
    """Attach the cross-frame rule (no recorders) to `unet` for the duration of a block."""
    return attention_processors(unet, lambda name: _rule_processor(attention, name))


# --- null-text inversion (Mokady et al. 2023) -----------------------------------------------

def null_text_embeddings(model: VEModel, latents: dict, timesteps: torch.Tensor, cond, uncond, cfg: float,
                         chunks, attention: str, inner_steps: int = 10, lr: float = 1e-2,
                         progress: Optional[Progress] = None, added=None) -> dict[int, torch.Tensor]:
    """Per sampling timestep t, the unconditional embedding that makes the CFG step from the
    trajectory's latent at t land on its latent one level below; each starts from the last. `added`: the
    family's added conditioning (SDXL: the pooled embeddings stay fixed; only the hidden states are tuned).

    Runs with gradients even under ComfyUI's inference mode (tensors are cloned into normal ones).
    """
    progress = or_silent(progress)
    device, dtype = model.device, model.dtype
    levels = [int(t) for t in timesteps] + [0]
    null_added = None if added is None else added.reading("uncond")
    out = {}
    with local_gradients(), _cross_frame(model.unet, attention):
        forward, _ = ddim_schedulers(model.scheduler_config, len(timesteps), device)
        unet = _autograd_unet(model.unet)
        x, cond = latents[levels[0]].to(device).clone(), cond.clone()
        null = uncond.to(torch.promote_types(dtype, torch.float32)).clone()  # optimise in at least fp32

        def guided_step(null_emb: torch.Tensor, eps_cond: torch.Tensor, state: StepState) -> torch.Tensor:
            eps_null = VideoDenoiser(unet, null_emb.to(dtype), null_emb.to(dtype), 1.0, chunks,
                                     added=null_added)(state.latents, state)
            return forward.step(eps_null + cfg * (eps_cond - eps_null), state.timestep, state.latents).prev_sample

        for i, t in enumerate(timesteps):
            state = StepState(i, t, len(timesteps), x)
            with torch.no_grad():
                eps_cond = VideoDenoiser(unet, cond, cond, 1.0, chunks, added=added)(x, state)
            target = latents[levels[i + 1]].to(device).clone()
            early_stop = 1e-5 + i * 2e-5  # Mokady's threshold, looser as the noise falls
            null = _fit(lambda e: guided_step(e, eps_cond, state), null, target, inner_steps, lr, early_stop)
            out[int(t)] = null.to(dtype).cpu().clone()
            with torch.no_grad():
                x = guided_step(null, eps_cond, state)  # go on from where the tuned step lands
            progress(i + 1, len(timesteps))
    return out


def _fit(step, start: torch.Tensor, target: torch.Tensor, inner_steps: int, lr: float, early_stop: float):
    """Adam on an embedding so that `step(embedding)` lands on `target` (mean squared error)."""
    embedding = start.detach().clone().requires_grad_(True)  # a fresh leaf: embeddings already kept stay put
    optimiser = torch.optim.Adam([embedding], lr=lr)
    for _ in range(inner_steps):
        loss = torch.nn.functional.mse_loss(step(embedding), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if loss.item() < early_stop:
            break
    return embedding.detach()


def _autograd_unet(unet):
    """The UNet, or (when its weights are inference tensors) a call with cloned weights, so that
    backpropagating to the embedding works inside ComfyUI's torch.inference_mode()."""
    frozen = {n: p.clone() for n, p in [*unet.named_parameters(), *unet.named_buffers()] if p.is_inference()}
    if not frozen:
        return unet

    def call(*args, **kwargs):
        return torch.func.functional_call(unet, frozen, args, kwargs, strict=False)

    return call


# --- reconstruction readout ------------------------------------------------------------------

def reconstruct(model: VEModel, inversion: Inversion, progress: Optional[Progress] = None) -> torch.Tensor:
    """Sample forward from x_T with the source prompt and the inversion's steps, cfg and rule."""
    chunks = plan_chunks(latent_at(inversion, 0).shape[0], inversion.chunk_size, inversion.attention)
    cond = inversion.prompt_embeds.to(model.device, model.dtype)
    empty = encode_text(model, "")
    x_T = inversion.x_T
    added = model.backbone.added_conditioning(model, {"cond": inversion.prompt_pooled, "uncond": empty.pooled},
                                              (x_T.shape[-2] * 8, x_T.shape[-1] * 8))
    base = VideoDenoiser(model.unet, cond, empty.hidden, inversion.cfg, chunks, inversion.control, added=added)

    def denoise(x: torch.Tensor, state: StepState) -> torch.Tensor:
        if inversion.null_embeds is None:
            return base(x, state)
        null = inversion.null_embeds[int(state.timestep)].to(model.device, model.dtype)
        return replace(base, uncond=null)(x, state)

    x_t = inversion.x_T.to(model.device, model.dtype)
    with torch.no_grad(), _cross_frame(model.unet, inversion.attention), \
            _cross_frame_controlnets(inversion.control, inversion.attention):
        return ddim_sample(denoise, x_t, model.scheduler_config, inversion.steps, progress=progress)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = (images.double().cpu() - reference.double().cpu()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def reconstruction_psnr(model: VEModel, inversion: Inversion, frames: torch.Tensor) -> float:
    """PSNR (dB) of the decoded reconstruction against the input frames (VAE loss included)."""
    return psnr(decode_latents(model, reconstruct(model, inversion)), frames)


def _measured(model: VEModel, inversion: Inversion, frames: torch.Tensor, key: tuple) -> Inversion:
    if inversion.reconstruction_psnr is None:
        inversion = replace(inversion, reconstruction_psnr=reconstruction_psnr(model, inversion, frames))
        _remember(key, inversion)
    return inversion


# --- cache -------------------------------------------------------------------------------------

def _content_hash(frames: torch.Tensor) -> str:
    data = frames.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest() + f"{tuple(frames.shape)}{frames.dtype}"


def _cache_key(model: VEModel, frames, prompt, steps, cfg, record, null_text, attention, chunk_size) -> tuple:
    weights = (model.source, str(model.dtype), str(model.device), repr(model.loras), weights_token(model.unet))
    return (_content_hash(frames), weights, prompt, steps, float(cfg), record, null_text, attention, chunk_size)


def weights_token(unet) -> str:
    """A name for this UNet object that is never reused: `id()` is, once the object is freed, so a cache keyed
    on it could hand a new model's run an old model's inversion."""
    token = getattr(unet, "_video_edit_token", None)
    if token is None:
        token = uuid.uuid4().hex
        unet._video_edit_token = token
    return token


def _remember(key: tuple, inversion: Inversion) -> None:
    _CACHE[key] = inversion
    _CACHE.move_to_end(key)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)


def clear_inversion_cache() -> None:
    _CACHE.clear()
