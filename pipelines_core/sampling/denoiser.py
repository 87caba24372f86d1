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


@dataclass
class VideoDenoiser:
    """Classifier-free-guided noise prediction for all frames, chunk by chunk.

    The UNet batch of a chunk is laid out (chunk, frame) with chunks [uncond, cond] — [source, uncond,
    cond] with a live source branch — so the attention processors gather frames only within one chunk.
    With cfg == 1 the uncond chunk is skipped. `uncond` may be a dict timestep -> embedding
    (null-text inversion's per-step unconditional embeddings). `batch`: up to this many consecutive chunks of
    equal frame count share one UNet call (`chunks.batched`), laid out (role, chunk, frame) with the layout's
    `groups` telling the attention processors where each chunk's frames are; each chunk's rows compute what
    its own call would, so `batch` changes speed and memory, not the result.
    """

    unet: torch.nn.Module
    cond: torch.Tensor  # (1, 77, D)
    uncond: object  # (1, 77, D), or {timestep: (1, 77, D)}
    cfg: float
    chunks: list
    control: Optional[object] = None  # a ControlStack: gives ControlNet residuals per UNet call
    source: Optional[SourceBranch] = None
    batch: int = 1

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

    def _guided(self, x: torch.Tensor, frame_ids: tuple, state: StepState, groups: int = 1) -> torch.Tensor:
        n = x.shape[0]
        inputs, contexts, roles = [x], [self.cond], ["cond"]
        if self.cfg != 1.0:
            uncond = self.uncond[state.timestep_value] if isinstance(self.uncond, dict) else self.uncond
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

    def _unet(self, x: torch.Tensor, context: torch.Tensor, frame_ids: tuple, roles: tuple, state: StepState,
              groups: int = 1):
        layout = FrameLayout(len(frame_ids), tuple(frame_ids), roles, state.timestep_value, state.index, groups)
        extra = self.control.unet_kwargs(x, context, layout, state) if self.control is not None else {}
        return self.unet(
            x, state.timestep, encoder_hidden_states=context, cross_attention_kwargs={"layout": layout}, **extra
        ).sample
