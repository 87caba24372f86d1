"""InstructPix2Pix (Brooks et al., CVPR 2023) on video: an instruction model edits every frame of a clip, the
frames held together by the sampler's cross-frame attention (Text2Video-Zero's "instruct-pix2pix video" mode:
3-chunk CFG, first-frame attention, chunks with frame 0 as anchor).

  * The model: an SD-1.5 UNet whose conv_in takes 8 channels, the noisy latent and the source frame's VAE latent
    side by side (`VEModel.is_instruction`). The source latent is the VAE posterior's mode, UNSCALED, as
    diffusers' `StableDiffusionInstructPix2PixPipeline.prepare_image_latents` takes it; a ComfyUI LATENT is
    unscaled already and is taken as it is (Load Video as Latents gives a posterior sample, not the mode).
  * Guidance (the paper's eq. 3, diffusers' row order): per chunk the UNet sees three roles, "cond" (prompt,
    source latent), "image" (negative prompt, source latent), "uncond" (negative prompt, zero latent), and
        eps = uncond + cfg (cond - image) + image_guidance (image - uncond).
    It lives in the engine as `sampling.denoiser.ImageConditioning` (extra UNet input channels per frame plus
    the third guidance role), so chunks, batched chunks and every cross-frame rule see the three roles as they
    see [uncond, cond]: each role's frames gather keys/values within that role.
  * The start (`InstructStart`): at strength 1 pure noise, drawn per frame from `seed + f` (or shared), as the
    pipeline's `prepare_latents` draws it, so with attention `none` frame f is diffusers' pipeline run on frame
    f with seed + f. Below 1 (not in the paper or diffusers): the source latent noised to the level strength
    selects, SDEdit-style, with the same noise, for edits that keep more of the clip's layout.

Differs from the paper: SD-1.5-class instruction checkpoints only (as the pack); no ControlNet-specific
handling (a ControlNet reads the noisy latent alone, as diffusers' ControlNet pipelines give it); temporal
guidance, DDIM inversion and injections are refused with an instruction model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..models.model import VEModel, encode_frame_stream
from ..sampling.denoiser import ImageConditioning
from ..sampling.masking import noised_source
from ..sampling.sampler import edit_video
from ..sampling.settings import SamplerSettings
from ..sampling.starts import Begun, Start, StartContext, img2img_timesteps, initial_noise, latent_samples
from ..video.frames import check_image_batch


@dataclass(frozen=True, eq=False)
class InstructStart(Start):
    """Noise at strength 1 (the pipeline's start), else the source latent partly noised (SDEdit); `source` is
    the UNSCALED source latent (F, 4, h, w), the same the UNet reads as its conditioning."""

    source: torch.Tensor
    noise_mask: Optional[torch.Tensor] = None  # a LATENT's, limiting the edit like a MASK
    has_source = True

    def extent(self) -> tuple:
        return self.source.shape[0], tuple(8 * d for d in self.source.shape[-2:])

    def check(self, settings, model) -> None:
        if self.source.shape[1] != model.latent_channels:
            raise ValueError(f"the source latents have {self.source.shape[1]} channels, the model's VAE "
                             f"{model.latent_channels}: encode the source with this model")

    def timesteps(self, scheduler, settings) -> torch.Tensor:
        if settings.strength >= 1.0:
            return scheduler.timesteps  # the whole schedule from noise, as the pipeline runs it
        return img2img_timesteps(scheduler, settings.steps, settings.strength)

    def begin(self, context: StartContext) -> Begun:
        model, scheduler, timesteps = context.model, context.scheduler, context.timesteps
        noise = initial_noise(context.shape, context.settings, context.generators, model.device, model.dtype)
        clean = model.scaled(self.source.to(model.device, model.dtype))
        source_at = noised_source(scheduler, clean, noise, timesteps)  # what a mask keeps
        if context.settings.strength >= 1.0:
            return Begun(noise * scheduler.init_noise_sigma, timesteps, source_at=source_at)
        latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(context.shape[0]))
        return Begun(latents, timesteps, source_at=source_at)


def source_latents(model: VEModel, images: Optional[torch.Tensor] = None, latent: Optional[dict] = None) -> torch.Tensor:
    """The UNSCALED source latents (F, 4, h, w) an instruction model reads: the VAE posterior's mode of `images`
    (ComfyUI IMAGE; diffusers' `retrieve_latents(..., sample_mode="argmax")`), or a ComfyUI LATENT's samples."""
    if images is not None and latent is not None:
        raise ValueError("connect either images or a latent as the instruction model's source, not both")
    if latent is not None:
        return latent_samples(latent, model.latent_channels)
    if images is None:
        raise ValueError("the model is an instruction model (InstructPix2Pix) and edits source frames: connect "
                         "images or a latent to the sampler")
    check_image_batch(images, "images", multiple_of=8)
    return encode_frame_stream(model, [images])  # no generators: the posterior mean, which is its mode


def instruct_edit(model: VEModel, settings: SamplerSettings, guidance=None, images: Optional[torch.Tensor] = None,
                  frame_count: Optional[int] = None, size: Optional[tuple] = None, progress=None, *,
                  image_guidance: float = 1.5, latent: Optional[dict] = None, inversion=None, injection=None,
                  **sampler_inputs) -> torch.Tensor:
    """Edit a clip with an instruction model: `settings.prompt` is the instruction, `settings.cfg` the text
    guidance and `image_guidance` (>= 1) the image guidance of InstructPix2Pix. The arguments are
    `temporal_guidance.guided_edit`'s, so a caller can hand either the same inputs; `guidance` (temporal guidance)
    must be None, and the extent comes from the source (`frame_count`/`size` only say what to generate when
    nothing is connected, which an instruction model refuses). `sampler_inputs` go to the sampler (control,
    mask, hooks). Returns scaled latents (F, 4, H/8, W/8) like `edit_video`."""
    if not model.is_instruction:
        raise ValueError(f"{model!r} is not an instruction (InstructPix2Pix) model: load one, or use the plain sampler")
    if guidance is not None:
        raise ValueError("temporal guidance does not run with an instruction (InstructPix2Pix) model: disconnect it")
    if inversion is not None or injection is not None:
        raise ValueError("an instruction (InstructPix2Pix) model starts from noise conditioned on the source frames: "
                         "disconnect the inversion/injection and connect the images")
    if not (math.isfinite(image_guidance) and image_guidance >= 1.0):
        raise ValueError(f"image_guidance must be 1 or more (got {image_guidance}): below 1 InstructPix2Pix turns "
                         "all guidance off")
    source = source_latents(model, images, latent)
    start = InstructStart(source, latent.get("noise_mask") if latent is not None else None)
    return edit_video(model, settings, start=start, conditioning=ImageConditioning(source, image_guidance),
                      progress=progress, **sampler_inputs)
