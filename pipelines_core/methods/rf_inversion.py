"""RF-Inversion (Rout et al., "Semantic Image Inversion and Editing using Rectified Stochastic Differential
Equations", ICLR 2025) on Flux.

Inversion, the controlled forward ODE (the paper's Algorithm 1): from the clean latents y0 towards a noise sample
y1, each Euler step follows the model's velocity (empty prompt, guidance 0) pulled towards the straight path to y1:

    Y <- Y + (s_next - s) * [u(Y, s) + gamma * ((y1 - Y) / (1 - s) - u(Y, s))]

gamma = 0 is plain flow inversion; gamma = 1 lands on y1 exactly. Editing, the controlled reverse ODE (Algorithm
2): sampling from the inverted latents with the edit prompt, the velocity is pulled towards the straight path back
to y0 on the steps [start, stop) of the schedule:

    v <- v + eta * ((X - y0) / sigma - v)         ((X - y0) / sigma is the velocity that lands on y0)

eta = 0 is plain sampling from the inversion. Defaults are those of the paper and of diffusers' community
pipeline's example: gamma 0.5, eta 0.9, control on the first 38 % of 28 steps.

Difference from the community pipeline: its inversion evaluates the model at the uniform times i/N but steps by
the shifted sampling schedule's intervals; here the inversion walks that very schedule backwards (levels 0 ->
sigma_max), model time and step sizes alike, so inversion and editing discretise the same path. Cross-frame rules
act in both directions as in the sampler. The noise y1 is drawn per frame, frame f from a generator seeded
`seed + f`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

from ..attention import attention_processors
from ..attention.joint import JointVideoAttnProcessor
from ..attention.rules import get_rule
from ..models.model import VEModel, encode_frames, encode_text
from ..progress import Progress
from ..sampling.chunks import plan_chunks
from ..sampling.denoiser import VideoDenoiser
from ..sampling.hooks import StepState
from ..sampling.injection import Injection, InjectionPlan, PlanContext
from ..sampling.loop import denoise_loop
from ..sampling.schedulers import make_scheduler
from ..sampling.starts import Begun, Start, StartContext, frame_generators, per_frame_noise
from ..video.frames import check_image_batch


@dataclass(frozen=True, eq=False)
class FlowInversion:
    """VE_INVERSION of a flow-matching model: the inverted latents (the edit's start), the clean latents y0 the edit
    is pulled back to, and the schedule both follow."""

    latents: torch.Tensor  # (F, C, h, w) at the schedule's first level, on the CPU
    clean: torch.Tensor  # y0
    steps: int
    prompt: str
    gamma: float
    attention: str

    def __repr__(self) -> str:
        return f"FlowInversion({self.steps} steps, {self.clean.shape[0]} frames, gamma {self.gamma})"


class ForwardFlow:
    """Euler steps of a flow ODE from the clean end up the sampling schedule (what a scheduler's `step` does in
    the loop, run the other way)."""

    order = 1

    def __init__(self, sampling_sigmas: torch.Tensor):
        self.sigmas = sampling_sigmas.flip(0)  # 0, ..., sigma_max
        self.timesteps = self.sigmas[:-1] * 1000
        self.begin_index = 0
        self._index = 0

    def step(self, velocity: torch.Tensor, timestep, sample: torch.Tensor):
        i = self._index
        self._index += 1
        return SimpleNamespace(prev_sample=sample + (self.sigmas[i + 1] - self.sigmas[i]).to(sample) * velocity)


def controlled_forward(denoise, target: torch.Tensor, gamma: float):
    """u + gamma * ((y1 - Y) / (1 - s) - u): the model's velocity pulled towards the straight path to `target`."""
    def velocity(latents: torch.Tensor, state: StepState) -> torch.Tensor:
        u = denoise(latents, state)
        if gamma == 0:
            return u
        level = state.scheduler.sigmas[state.position].to(latents)
        return u + gamma * ((target.to(latents) - latents) / (1 - level) - u)
    return velocity


@torch.no_grad()
def rf_invert(model: VEModel, frames: torch.Tensor, prompt: str = "", steps: int = 28, gamma: float = 0.5,
              seed: int = 0, attention: str = "none", chunk_size: int = 8,
              progress: Optional[Progress] = None) -> FlowInversion:
    """RF-Inversion of a ComfyUI IMAGE batch with a flow-matching model (see the module docstring)."""
    # 1. Check everything before the first step
    check_image_batch(frames, "RF-Inversion: images", multiple_of=8)
    size = tuple(frames.shape[1:3])
    backbone = model.backbone
    backbone.check_method("rf_inversion")
    backbone.check_run(None, size)
    if steps < 2:
        raise ValueError(f"RF-Inversion: steps must be at least 2 (got {steps})")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"RF-Inversion: gamma must be in [0, 1] (got {gamma})")
    rule = get_rule(attention)

    # 2. The clean latents, the noise they are driven to, the prompt
    clean = encode_frames(model, frames)
    shape = tuple(clean.shape)
    target = per_frame_noise(shape, frame_generators(seed, shape[0]), model.device, model.dtype)
    text = encode_text(model, prompt)
    _, guidance = backbone.guidance_split(0.0)  # the paper inverts without guidance
    added = backbone.added_conditioning(model, {"cond": text.pooled}, size, guidance)
    denoiser = VideoDenoiser(model.unet, text.hidden, text.hidden, 1.0, plan_chunks(shape[0], chunk_size, attention),
                             added=added)

    # 3. Up the sampling schedule, controlled towards the noise
    schedule = make_scheduler("flow_euler", model.scheduler_config)
    backbone.set_timesteps(schedule, steps, size, model.device)
    forward = ForwardFlow(schedule.sigmas)
    with attention_processors(model.unet, lambda name: JointVideoAttnProcessor(rule, name)):
        latents = denoise_loop(controlled_forward(denoiser, target, gamma), clean, forward, "flow_euler",
                               forward.timesteps, progress=progress)
    return FlowInversion(latents.cpu(), clean.cpu(), steps, prompt, gamma, attention)


# --- editing: the controlled reverse ODE -------------------------------------------------------------------

@dataclass(frozen=True)
class RFInversionParams:
    eta: float = 0.9  # how strongly the velocity is pulled back towards the source
    start: float = 0.0  # fraction of the steps where the control begins
    stop: float = 0.38  # ... and where it ends

    def check(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"RF-Inversion: eta must be in [0, 1] (got {self.eta})")
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise ValueError(f"RF-Inversion: need 0 <= start <= stop <= 1 (got start {self.start}, stop {self.stop})")

    def controls(self, index: int, steps: int) -> bool:
        return int(self.start * steps) <= index < min(int(self.stop * steps), steps)


@dataclass(frozen=True, eq=False)
class RFInversionStart(Start):
    """From the inverted latents, over the whole schedule the inversion walked."""

    inversion: FlowInversion
    has_source = False  # the state is not the source noised step by step: a mask has nothing to keep

    def extent(self) -> tuple:
        latents = self.inversion.latents
        return latents.shape[0], tuple(8 * d for d in latents.shape[-2:])

    def check(self, settings, model) -> None:
        if settings.steps != self.inversion.steps:
            raise ValueError(f"RF-Inversion ran {self.inversion.steps} steps but the sampler is set to "
                             f"{settings.steps}: set the sampler's steps to the inversion's")

    def begin(self, context: StartContext) -> Begun:
        return Begun(self.inversion.latents.to(context.model.device, context.model.dtype), context.timesteps)


def rf_inversion_planner(injection: Injection, context: PlanContext) -> InjectionPlan:
    params: RFInversionParams = injection.params
    clean = injection.start.inversion.clean

    def wrap(denoise):
        def velocity(latents: torch.Tensor, state: StepState) -> torch.Tensor:
            v = denoise(latents, state)
            if not params.controls(state.index, state.total) or params.eta == 0:
                return v
            sigma = state.scheduler.sigmas[state.position].to(latents)
            return v + params.eta * ((latents - clean.to(latents)) / sigma - v)
        return velocity

    return InjectionPlan(wrap_denoiser=wrap)


def rf_inversion_injection(inversion: FlowInversion, params: RFInversionParams = RFInversionParams()) -> Injection:
    """VE_INJECTION: edit from an RF-Inversion with the controlled reverse ODE (the sampler's prompt is the edit)."""
    if not isinstance(inversion, FlowInversion):
        raise ValueError("RF-Inversion edits need an RF-Inversion (RF Invert node), not a DDIM inversion")
    params.check()
    return Injection("rf_inversion", None, params, rf_inversion_planner, start=RFInversionStart(inversion))
