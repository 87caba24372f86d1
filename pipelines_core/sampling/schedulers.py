"""The samplers a user can pick, as diffusers schedulers built from the model's own config.

All are deterministic (no ancestral/SDE noise), so a seed fully fixes a result and every one of
them could in principle be run backwards. `space` says how a latent relates to the clean latent x0
and the noise eps, which the x0 hooks need:
  "vp": x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps        (DDIM, DPM-Solver++)
  "ve": x_t = x0 + sigma_t eps                         (Euler, k-diffusion style)
  "flow": x_t = (1 - sigma_t) x0 + sigma_t n, the model predicting the velocity v = n - x0 (flow matching,
          Flux): x0 = x_t - sigma_t v, the "ve" formulas with v in eps's place
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SchedulerKind:
    cls_name: str
    space: str
    overrides: tuple = ()


SCHEDULERS: dict[str, SchedulerKind] = {
    "ddim": SchedulerKind("DDIMScheduler", "vp"),
    "euler": SchedulerKind("EulerDiscreteScheduler", "ve"),
    "dpmpp_2m": SchedulerKind(
        "DPMSolverMultistepScheduler", "vp", (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
    ),
    "flow_euler": SchedulerKind("FlowMatchEulerDiscreteScheduler", "flow"),  # flow-matching models (Flux)
}


def add_noise(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """`clean` brought to the noise level of `timesteps` with `noise`: the scheduler's forward process (a
    flow-matching scheduler calls it `scale_noise`: (1 - sigma) x0 + sigma n)."""
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(clean, noise, timesteps)
    return scheduler.scale_noise(clean, timesteps, noise)


def make_scheduler(name: str, model_config: dict):
    """A fresh scheduler of kind `name` configured from the model's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    kind = SCHEDULERS[name]
    config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    config.update(dict(kind.overrides))
    return getattr(diffusers, kind.cls_name).from_config(config)


def _sigma(scheduler, index: int) -> torch.Tensor:
    return scheduler.sigmas[index]


def _alpha_bar(scheduler, timestep) -> torch.Tensor:
    return scheduler.alphas_cumprod[int(timestep)]


def predicted_x0(name: str, scheduler, x: torch.Tensor, eps: torch.Tensor, timestep, index: int) -> torch.Tensor:
    """x0 implied by noise prediction eps at x (DDIM eq. 12's first term; k-diffusion's `denoised`)."""
    if SCHEDULERS[name].space in ("ve", "flow"):
        return x - _sigma(scheduler, index).to(x) * eps
    a = _alpha_bar(scheduler, timestep).to(x)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(name: str, scheduler, x: torch.Tensor, x0: torch.Tensor, timestep, index: int) -> torch.Tensor:
    """The noise prediction that makes `x0` the clean estimate at x (the inverse of `predicted_x0`)."""
    if SCHEDULERS[name].space in ("ve", "flow"):
        return (x - x0) / _sigma(scheduler, index).to(x)
    a = _alpha_bar(scheduler, timestep).to(x)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()
