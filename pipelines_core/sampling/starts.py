"""Where sampling starts: a start is a value the sampler calls, never a branch inside it.

A start knows the clip's extent (frame count and size), which scheduler the run needs, which timesteps
it will take, and how to make the latents of the first of them (`begin`). Those here are the pack's
own: SDEdit from images (`ImagesStart`) or from a ComfyUI LATENT (`LatentStart`), pure noise
(`NoiseStart`), and a DDIM inversion (`InversionStart`). A method adds its own next to its mechanism
(Text2Video-Zero's `MotionStart` lives in `methods/text2video_zero.py`); the sampler needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..models.model import encode_frames
from ..video.frames import check_image_batch
from .masking import SourceAt, inverted_source, noised_source
from .schedulers import add_noise, make_scheduler

if TYPE_CHECKING:
    from ..models.model import VEModel
    from .denoiser import VideoDenoiser
    from .settings import SamplerSettings


@dataclass(frozen=True)
class Begun:
    """The latents at `timesteps[0]` and the steps still to run."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    first_position: Optional[int] = None  # where timesteps[0] stands in the scheduler's tables (None: its begin index)
    source_at: Optional[SourceAt] = None  # the source at each step's target level, for a mask to keep (None: no source)
    uncond: object = None  # per-timestep unconditional embeddings replacing the negative prompt's (null-text)


@dataclass(frozen=True)
class StartContext:
    """What a start may use to begin: the run's model, settings, scheduler (timesteps set) and the timesteps
    `Start.timesteps` chose, one generator per frame, the latent shape, and the run's denoiser with the
    attention processors attached."""

    model: "VEModel"
    settings: "SamplerSettings"
    scheduler: object
    timesteps: torch.Tensor
    generators: Sequence[torch.Generator]
    shape: tuple  # (frames, channels, h, w)
    denoiser: "VideoDenoiser"


class Start:
    """Base for starts. `has_source`: a clip exists to keep under a mask and to re-noise by strength;
    `noise_mask`: a mask the start brings itself (a ComfyUI LATENT's), limiting the edit like a MASK."""

    has_source = False
    noise_mask: Optional[torch.Tensor] = None

    def extent(self) -> tuple:
        """(frame count, (height, width)) of what will be sampled."""
        raise NotImplementedError

    def check(self, settings: "SamplerSettings", model: "VEModel") -> None:
        """Refuse settings this start cannot run with, before any step."""

    def make_scheduler(self, settings: "SamplerSettings", model: "VEModel"):
        return make_scheduler(settings.scheduler, model.scheduler_config)

    def timesteps(self, scheduler, settings: "SamplerSettings") -> torch.Tensor:
        """The timesteps the run will take (set on the scheduler; SDEdit also sets its begin index)."""
        return scheduler.timesteps

    def begin(self, context: StartContext) -> Begun:
        raise NotImplementedError


# --- noise ---------------------------------------------------------------------------------------

def frame_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per frame, frame f seeded `seed + f`: a frame's noise does not depend on how
    many frames are loaded, and frame f matches diffusers' pipelines run with `seed + f`."""
    return [torch.Generator("cpu").manual_seed(seed + f) for f in range(count)]


def per_frame_noise(shape: tuple, generators: Sequence[torch.Generator], device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """Noise of `shape` (frames, ...), frame f drawn from `generators[f]` (diffusers' draw, per frame)."""
    from diffusers.utils.torch_utils import randn_tensor

    one = (1,) + tuple(shape[1:])
    return torch.cat([randn_tensor(one, generator=g, device=device, dtype=dtype) for g in generators])


def initial_noise(shape: tuple, settings: "SamplerSettings", generators: Sequence[torch.Generator],
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if settings.noise == "shared":
        from diffusers.utils.torch_utils import randn_tensor

        g = torch.Generator("cpu").manual_seed(settings.seed)
        return randn_tensor((1,) + tuple(shape[1:]), generator=g, device=device, dtype=dtype).expand(shape).clone()
    return per_frame_noise(shape, generators, device, dtype)


def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule SDEdit re-runs (same arithmetic as diffusers' img2img pipeline for the model:
    Flux's img2img rounds the skipped steps down where SD's rounds the kept ones down)."""
    if not hasattr(scheduler, "add_noise"):  # flow matching: FluxImg2ImgPipeline.get_timesteps
        start = int(max(steps - min(steps * strength, steps), 0))
    else:
        init = min(int(steps * strength), steps)
        start = max(steps - init, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order:]


@dataclass(frozen=True)
class NoiseStart(Start):
    """Generate `frame_count` frames of `size` (height, width) from noise (per-frame or shared)."""

    frame_count: int
    size: tuple

    def extent(self) -> tuple:
        return self.frame_count, tuple(self.size)

    def check(self, settings, model) -> None:
        height, width = self.size
        if height % 8 or width % 8:
            raise ValueError(f"size {width}x{height} must be a multiple of 8 to generate")

    def begin(self, context: StartContext) -> Begun:
        model = context.model
        noise = initial_noise(context.shape, context.settings, context.generators, model.device, model.dtype)
        sigma = getattr(context.scheduler, "init_noise_sigma", 1.0)  # flow matching starts from noise itself
        return Begun(noise * sigma, context.timesteps)


# --- SDEdit: images or a latent, partly noised -----------------------------------------------------

class _SDEdit(Start):
    has_source = True

    def timesteps(self, scheduler, settings) -> torch.Tensor:
        return img2img_timesteps(scheduler, settings.steps, settings.strength)

    def clean(self, context: StartContext) -> torch.Tensor:
        raise NotImplementedError

    def begin(self, context: StartContext) -> Begun:
        model, scheduler, settings, timesteps = context.model, context.scheduler, context.settings, context.timesteps
        clean = self.clean(context)
        noise = initial_noise(context.shape, settings, context.generators, model.device, model.dtype)
        latents = add_noise(scheduler, clean, noise, timesteps[:1].repeat(context.shape[0]))
        return Begun(latents, timesteps, source_at=noised_source(scheduler, clean, noise, timesteps))


@dataclass(frozen=True, eq=False)
class ImagesStart(_SDEdit):
    """SDEdit: `images` (ComfyUI IMAGE) encoded and noised to the level `strength` selects."""

    images: torch.Tensor

    def extent(self) -> tuple:
        return self.images.shape[0], tuple(self.images.shape[1:3])

    def check(self, settings, model) -> None:
        check_image_batch(self.images, "images", multiple_of=8)

    def clean(self, context: StartContext) -> torch.Tensor:
        return encode_frames(context.model, self.images, context.generators)


@dataclass(frozen=True, eq=False)
class LatentStart(_SDEdit):
    """SDEdit from a ComfyUI LATENT (unscaled, as this sampler outputs it) in place of encoded images, with the
    same noise; its "noise_mask" limits the edit like a MASK."""

    latent: dict

    def extent(self) -> tuple:
        samples = latent_samples(self.latent)
        return samples.shape[0], tuple(8 * d for d in samples.shape[-2:])

    @property
    def noise_mask(self) -> Optional[torch.Tensor]:
        return self.latent.get("noise_mask")

    def check(self, settings, model) -> None:
        latent_samples(self.latent, model.latent_channels)

    def clean(self, context: StartContext) -> torch.Tensor:
        model = context.model
        skip_posterior_draws(context.generators, context.shape, model)
        return model.scaled(latent_samples(self.latent).to(model.device, model.dtype))  # ComfyUI latents are unscaled


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


def skip_posterior_draws(generators: Sequence[torch.Generator], shape: tuple, model: "VEModel") -> None:
    """Advance each frame's generator past the VAE posterior sample `encode_frames` draws for images, so a
    latent start then draws the very noise an images start would: the LATENT of the posterior sample the
    images path would have drawn gives the same edit."""
    from diffusers.utils.torch_utils import randn_tensor

    posterior_shape = (1, model.vae.config.latent_channels) + tuple(shape[-2:])
    for g in generators:  # the shape, device and dtype of encode_frames' draw (the VAE's), so the same stream
        randn_tensor(posterior_shape, generator=g, device=model.device, dtype=model.vae.dtype)


# --- a DDIM inversion --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class InversionStart(Start):
    """From a DDIM inversion's latent at the first timestep `strength` selects (1.0 = from x_T), with the
    deterministic DDIM scheduler it was made with; null-text inversion's per-step unconditional embeddings
    replace the negative prompt's."""

    inversion: object  # sampling.inversion.Inversion
    has_source = True

    def extent(self) -> tuple:
        first = self.inversion.latents[0]
        return first.shape[0], tuple(8 * d for d in first.shape[-2:])

    def check(self, settings, model) -> None:
        if settings.scheduler != "ddim":
            raise ValueError(f"sampling from a DDIM inversion needs the 'ddim' scheduler (got {settings.scheduler!r})")
        if settings.steps != self.inversion.steps:
            raise ValueError(f"the inversion ran {self.inversion.steps} steps but the sampler is set to "
                             f"{settings.steps}: set the sampler's steps to DDIM Invert's")

    def make_scheduler(self, settings, model):
        return make_scheduler("ddim", {**model.scheduler_config, "clip_sample": False})

    def timesteps(self, scheduler, settings) -> torch.Tensor:
        return img2img_timesteps(scheduler, settings.steps, settings.strength)

    def begin(self, context: StartContext) -> Begun:
        model, timesteps = context.model, context.timesteps
        latents = self.inversion.latents[int(timesteps[0])].to(model.device, model.dtype)
        return Begun(latents, timesteps, source_at=inverted_source(self.inversion.latents, timesteps),
                     uncond=self.inversion.null_embeds or None)


# --- from what a node or a caller connected ---------------------------------------------------------

def start_from(images=None, latent=None, inversion=None, frame_count=None, size=None) -> Start:
    """The start for what is connected: an inversion, else images, else a latent, else noise of the given
    extent. Two sources would silently drop one, so they are refused."""
    if images is not None and inversion is not None:
        raise ValueError("connect either images (SDEdit) or an inversion, not both")
    if latent is not None and images is not None:
        raise ValueError("connect either images or a latent as the start, not both "
                         "(the latent replaces encoding images)")
    if latent is not None and inversion is not None:
        raise ValueError("connect either a latent or an inversion (an injection brings its inversion) "
                         "as the start, not both")
    if inversion is not None:
        return InversionStart(inversion)
    if images is not None:
        return ImagesStart(images)
    if latent is not None:
        return LatentStart(latent)
    if frame_count is None or size is None:
        raise ValueError("give images to edit, or a frame count and size to generate from noise")
    return NoiseStart(frame_count, tuple(size))

