"""The video denoiser: classifier-free-guided noise prediction for all frames of a step, chunk by chunk,
with an optional live source branch (the inverted latent under the source prompt in the same UNet call)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..attention.processor import FrameLayout
from .chunks import batched
from .hooks import StepState


@dataclass(frozen=True)
class SourceBranch:
    """A live source chunk (Plug-and-Play): at the step with timestep t the UNet also denoises the
    inverted latent `latents[t]` under the source prompt, so injections can read its features."""

    latents: dict  # timestep -> (F, 4, h, w)
    embeds: torch.Tensor  # (1, 77, D)

    def at(self, t: int, frame_ids: tuple, like: torch.Tensor) -> torch.Tensor:
        key = int(t)
        if key not in self.latents:
            raise ValueError(f"the inversion has no latent at timestep {key}: sample with DDIM Invert's steps")
        return self.latents[key][list(frame_ids)].to(like.device, like.dtype)


@dataclass(frozen=True)
class ImageConditioning:
    """What an image-conditioned UNet reads beside the noisy latent, and how it is guided (InstructPix2Pix).

    `latents` (F, C, h, w) are concatenated to each frame's noisy latent on channels, after the scheduler's input
    scaling and after any ControlNet read the noisy latent (diffusers' InstructPix2Pix pipeline). With guidance
    the UNet batch has three roles, in that pipeline's order: "cond" (prompt + image), "image" (negative
    prompt + image) and "uncond" (negative prompt, zero image), and eps = uncond + cfg (cond - image) +
    scale (image - uncond) (Brooks et al. 2023, eq. 3). Guidance is off, one "cond" role, where the pipeline
    turns it off: cfg <= 1 or scale < 1.
    """

    latents: torch.Tensor
    scale: float = 1.5  # image guidance: how closely the edit keeps to the source frames

    def guided(self, cfg: float) -> bool:
        return cfg > 1.0 and self.scale >= 1.0

    def at(self, frame_ids: tuple, like: torch.Tensor) -> torch.Tensor:
        return self.latents[list(frame_ids)].to(like.device, like.dtype)


@dataclass
class VideoDenoiser:
    """Classifier-free-guided noise prediction for all frames, chunk by chunk.

    The UNet batch of a chunk is laid out (chunk, frame) with chunks [uncond, cond] — [source, uncond,
    cond] with a live source branch — so the attention processors gather frames only within one chunk.
    With cfg == 1 the uncond chunk is skipped. `uncond` may be a dict timestep -> embedding
    (null-text inversion's per-step unconditional embeddings). `batch`: up to this many consecutive chunks of
    equal frame count share one UNet call (`chunks.batched`), laid out (role, chunk, frame) with the layout's
    `groups` telling the attention processors where each chunk's frames are; each chunk's rows compute what
    its own call would, so `batch` changes speed and memory, not the result. `image`: an image-conditioned
    UNet's per-frame extra channels and three-role guidance (`ImageConditioning`); not with a source branch.
    """

    unet: torch.nn.Module
    cond: torch.Tensor  # (1, 77, D)
    uncond: object  # (1, 77, D), or {timestep: (1, 77, D)}
    cfg: float
    chunks: list
    control: Optional[object] = None  # a ControlStack: gives ControlNet residuals per UNet call
    source: Optional[SourceBranch] = None
    batch: int = 1
    image: Optional[ImageConditioning] = None
    added: Optional[object] = None  # the family's added conditioning per role (SDXL: models.backbone.AddedConditioning)

    def __call__(self, latents: torch.Tensor, state: StepState) -> torch.Tensor:
        # Blending eps, not the stepped latents, is MultiDiffusion's average all the same (every scheduler here
        # steps linearly in eps) and leaves the x0 hooks one prediction per frame. The sum runs in at least
        # fp32 so fp16/bf16 rounding of the weights does not bias it, and starts from -0.0, the exact additive
        # identity (a +0.0 start would turn a -0.0 prediction into +0.0), so a frame with weight 1 in one chunk
        # gets its prediction bit for bit, as before chunks overlapped.
        blended = torch.full(latents.shape, -0.0, dtype=torch.promote_types(latents.dtype, torch.float32),
                             device=latents.device)
        for call in batched(self.chunks, self.batch):
            frame_ids = sum((chunk.frames for chunk in call), ())
            eps_call = self._guided(latents[list(frame_ids)], frame_ids, state, groups=len(call))
            for eps_chunk, chunk in zip(eps_call.chunk(len(call)), call):
                keep = list(chunk.keep)
                weights = torch.tensor(chunk.weights or (1.0,) * len(keep), dtype=blended.dtype,
                                       device=latents.device)
                blended[[chunk.frames[k] for k in keep]] += (eps_chunk[keep].to(blended.dtype)
                                                             * weights.view(-1, 1, 1, 1))
        return blended.to(latents.dtype)

    def _uncond(self, state: StepState) -> torch.Tensor:
        return self.uncond[state.timestep_value] if isinstance(self.uncond, dict) else self.uncond

    def _guided(self, x: torch.Tensor, frame_ids: tuple, state: StepState, groups: int = 1) -> torch.Tensor:
        if self.image is not None:
            return self._image_guided(x, frame_ids, state, groups)
        n = x.shape[0]
        inputs, contexts, roles = [x], [self.cond], ["cond"]
        if self.cfg != 1.0:
            uncond = self._uncond(state)
            inputs, contexts, roles = [x] + inputs, [uncond] + contexts, ["uncond"] + roles
        if self.source is not None:
            inputs = [self.source.at(state.timestep_value, frame_ids, x)] + inputs
            contexts, roles = [self.source.embeds] + contexts, ["source"] + roles
        context = torch.cat([c.to(x.device, x.dtype).expand(n, -1, -1) for c in contexts])
        out = self._unet(torch.cat(inputs), context, frame_ids, tuple(roles), state, groups).chunk(len(roles))
        if self.cfg == 1.0:
            return out[-1]
        uncond_eps, cond_eps = out[-2], out[-1]
        return uncond_eps + self.cfg * (cond_eps - uncond_eps)

    def _image_guided(self, x: torch.Tensor, frame_ids: tuple, state: StepState, groups: int) -> torch.Tensor:
        if self.source is not None:
            raise ValueError("an image-conditioned (instruction) model takes no live source branch")
        n = x.shape[0]
        image = self.image.at(frame_ids, x)
        if not self.image.guided(self.cfg):
            context = self.cond.to(x.device, x.dtype).expand(n, -1, -1)
            return self._unet(x, context, frame_ids, ("cond",), state, groups, channels=image)
        uncond = self._uncond(state)
        context = torch.cat([c.to(x.device, x.dtype).expand(n, -1, -1) for c in (self.cond, uncond, uncond)])
        channels = torch.cat([image, image, torch.zeros_like(image)])
        cond_eps, image_eps, uncond_eps = self._unet(torch.cat([x] * 3), context, frame_ids, ("cond", "image", "uncond"),
                                                     state, groups, channels=channels).chunk(3)
        return uncond_eps + self.cfg * (cond_eps - image_eps) + self.image.scale * (image_eps - uncond_eps)

    def _unet(self, x: torch.Tensor, context: torch.Tensor, frame_ids: tuple, roles: tuple, state: StepState,
              groups: int = 1, channels: Optional[torch.Tensor] = None):
        layout = FrameLayout(len(frame_ids), tuple(frame_ids), roles, state.timestep_value, state.index, groups)
        added = self.added.unet_kwargs(roles, len(frame_ids), x) if self.added is not None else {}
        extra = self.control.unet_kwargs(x, context, layout, state, added) if self.control is not None else {}
        if channels is not None:  # after the ControlNets, which read the noisy latent alone
            x = torch.cat([x, channels], dim=1)
        return self.unet(
            x, state.timestep, encoder_hidden_states=context, cross_attention_kwargs={"layout": layout}, **added, **extra
        ).sample
