"""FlowEdit (Kulikov et al., 2024): inversion-free editing with a flow-matching model (Flux here).

Rather than invert the source and sample back, FlowEdit integrates an ODE in clean-latent space from the source
itself: at each noise level t it noises the source, z_src = (1 - t) x_src + t n (fresh noise n), shifts that by the
edit so far, z_tar = z_edit + z_src - x_src, and moves z_edit by the difference of the model's velocities under the
target and the source prompt, averaged over `n_avg` noise draws:

    z_edit <- z_edit + (t_next - t) * mean_n [v(z_tar, t, target) - v(z_src, t, source)],   z_edit(start) = x_src

over the last `n_max` of the schedule's steps. For its last `n_min` steps it samples plainly from the noised
z_tar (the paper's option for extra detail; 0 on Flux). The paper's Flux defaults: 28 steps, n_max 24, n_min 0,
n_avg 1, source guidance 1.5, target guidance 5.5 (Flux-dev embeds guidance: each prompt's is embedded).

In this pack the ODE's state is the loop's latents, and `FlowEditDenoiser` returns the averaged velocity
difference, which the flow-matching scheduler's Euler step applies exactly as the update above; `FlowEditStart`
begins from the encoded clip (the VAE posterior mean, as the code's `latent_dist.mode()`) at the step n_max
selects. Cross-frame attention rules act in both velocity calls, so every frame's edit sees the same frames. Noise
is drawn per frame, frame f from a generator seeded `seed + f`, so a frame's edit does not depend on the clip's
length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..models.model import encode_frames, encode_text
from ..sampling.hooks import Hooks, StepState
from ..sampling.injection import Injection, InjectionPlan, PlanContext
from ..sampling.starts import Begun, Start, StartContext, frame_generators, per_frame_noise
from ..video.frames import check_image_batch


@dataclass(frozen=True)
class FlowEditParams:
    source_prompt: str  # describes the clip; the sampler's prompt is the target
    n_max: int = 24  # steps of the schedule FlowEdit runs (the last n_max of `steps`)
    n_min: int = 0  # of those, the last n_min sample plainly from the noised edit
    n_avg: int = 1  # noise draws averaged per step
    source_guidance: float = 1.5  # the source velocity's guidance (the target's is the sampler's cfg)

    def check(self) -> None:
        if not self.source_prompt.strip():
            raise ValueError("FlowEdit: source_prompt is empty: describe the clip (the sampler's prompt is the edit)")
        if self.n_max < 1 or not 0 <= self.n_min < self.n_max:
            raise ValueError(f"FlowEdit: need 0 <= n_min < n_max and n_max >= 1 (got n_min {self.n_min}, "
                             f"n_max {self.n_max})")
        if self.n_avg < 1:
            raise ValueError(f"FlowEdit: n_avg must be at least 1 (got {self.n_avg})")


@dataclass(frozen=True, eq=False)
class FlowEditStart(Start):
    """The clean source latents at the step where FlowEdit begins (n_max steps before the end)."""

    images: torch.Tensor
    n_max: int
    has_source = True

    def extent(self) -> tuple:
        return self.images.shape[0], tuple(self.images.shape[1:3])

    def check(self, settings, model) -> None:
        check_image_batch(self.images, "FlowEdit: images", multiple_of=8)
        if self.n_max > settings.steps:
            raise ValueError(f"FlowEdit: n_max ({self.n_max}) is more than the sampler's steps ({settings.steps}): "
                             "lower n_max or raise the steps")

    def timesteps(self, scheduler, settings) -> torch.Tensor:
        first = settings.steps - self.n_max
        scheduler.set_begin_index(first)
        return scheduler.timesteps[first:]

    def begin(self, context: StartContext) -> Begun:
        clean = encode_frames(context.model, self.images)  # the posterior mean: FlowEdit's latent_dist.mode()
        return Begun(clean, context.timesteps)  # no source_at: the state is a clean latent, not a noised one


def noised(clean: torch.Tensor, noise: torch.Tensor, state: StepState) -> torch.Tensor:
    """(1 - sigma) x + sigma n at the step's noise level (the flow-matching forward process)."""
    sigma = state.scheduler.sigmas[state.position].to(clean)
    return (1 - sigma) * clean + sigma * noise


class FlowEditDenoiser:
    """The velocity difference v(z_tar, target) - v(z_src, source), averaged over `n_avg` noise draws; on the plain
    steps (the last n_min), the target velocity alone."""

    def __init__(self, target, source, run: "FlowEditRun"):
        self.target, self.source, self.run = target, source, run

    def __call__(self, latents: torch.Tensor, state: StepState) -> torch.Tensor:
        run = self.run
        if run.plain(state.index):
            return self.target(latents, state)
        x_src = run.clean.to(latents.device, latents.dtype)
        delta = torch.zeros_like(latents)
        for _ in range(run.params.n_avg):
            z_src = noised(x_src, run.noise(latents), state)
            z_tar = latents + z_src - x_src
            delta += (self.target(z_tar, state) - self.source(z_src, state)) / run.params.n_avg
        return delta


class FlowEditRun:
    """One run's state: the clean source, the noise generators, where the plain steps begin."""

    def __init__(self, params: FlowEditParams, steps: int, seed: int, frames: int):
        self.params, self.steps = params, steps
        self.generators = frame_generators(seed, frames)
        self.clean: Optional[torch.Tensor] = None

    def plain(self, index: int) -> bool:
        return index >= self.steps - self.params.n_min

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        return per_frame_noise(like.shape, self.generators, like.device, like.dtype)

    def keep_source(self, state: StepState) -> torch.Tensor:
        """Before the first step: the loop's latents are the clean source."""
        if state.index == 0:
            self.clean = state.latents.detach().clone()
        return state.latents

    def to_plain(self, state: StepState) -> torch.Tensor:
        """Before the first plain step: z_tar = z_edit + (the source noised to this level) - x_src."""
        if state.index != self.steps - self.params.n_min:
            return state.latents
        x_src = self.clean.to(state.latents)
        return state.latents + noised(x_src, self.noise(x_src), state) - x_src


def flowedit_planner(injection: Injection, context: PlanContext) -> InjectionPlan:
    params: FlowEditParams = injection.params
    model = context.model
    run = FlowEditRun(params, context.steps, context.seed, context.frame_count)
    source_text = encode_text(model, params.source_prompt)

    def wrap(denoiser):
        added = denoiser.added
        source_added = None
        if added is not None:  # the source prompt's pooled embedding and its own guidance
            source_added = replace(added, pooled={**added.pooled, "cond": source_text.pooled})
            source_added = source_added.with_guidance(cond=params.source_guidance)
        source = replace(denoiser, cond=source_text.hidden, added=source_added)
        return FlowEditDenoiser(denoiser, source, run)

    return InjectionPlan(wrap_denoiser=wrap, hooks=Hooks(before_model=[run.keep_source, run.to_plain]))


def flowedit_injection(images: torch.Tensor, params: FlowEditParams) -> Injection:
    """VE_INJECTION for FlowEdit on `images` (ComfyUI IMAGE): it brings its own start (connect nothing else as the
    sampler's start); the sampler's prompt and cfg are the target's."""
    params.check()
    return Injection("flowedit", None, params, flowedit_planner, start=FlowEditStart(images, params.n_max))
