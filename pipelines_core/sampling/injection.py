"""What an Attention Injector hands the sampler: a declarative injection, turned into a plan per run.

An `Injection` (the VE_INJECTION socket value) is frozen data: a mode, the inversion it reads, and the
mode's parameters. At sampling time `Injection.plan(...)` builds a fresh `InjectionPlan` (stateful
objects live only for that run, so a cached VE_INJECTION is never altered). The sampler asks the plan
  * `edits(layer_name)`   - AttnEdits for the video attention processor of that layer;
  * `rule(layer_name)`    - a cross-frame rule overriding the sampler's for that layer (or None);
  * `hooks`               - sampler hooks (latent blend, x0 guidance, ...);
  * `patches(unet)`       - a context manager installing module-level patches (feature injection,
                            block-level propagation) and removing them afterwards;
  * `source_branch`       - whether the UNet batch carries a live source chunk ([source, uncond, cond]):
                            the inverted latent at each step with the source prompt (Plug-and-Play).
A mode is a configuration of these, never a copy of the loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..attention.processor import AttnEdit
from ..attention.rules import Rule
from .hooks import Hooks


@dataclass
class InjectionPlan:
    edits_for: Callable[[str], Sequence[AttnEdit]] = lambda name: ()
    rule_for: Callable[[str], Optional[Rule]] = lambda name: None
    hooks: Hooks = field(default_factory=Hooks)
    patches: Callable = lambda unet: nullcontext()
    source_branch: bool = False


@dataclass(frozen=True, eq=False)
class Injection:
    """VE_INJECTION: `mode` with its `params`, reading `inversion`. `planner(injection, context)` builds the plan."""

    mode: str
    inversion: object
    params: object
    planner: Callable = field(repr=False, default=None)

    def plan(self, context: "PlanContext") -> InjectionPlan:
        return self.planner(self, context)

    def __repr__(self) -> str:
        return f"Injection({self.mode}, {self.params!r})"


@dataclass(frozen=True)
class PlanContext:
    """What a planner may need to know about the run it plans for."""

    model: object
    frame_count: int
    steps: int  # steps this run takes (after strength)
    timesteps: tuple  # the run's timesteps, in order
    cfg: float
    seed: int
    target_prompt: str
    attention: str = "none"  # the sampler's cross-frame rule, its layers and chunking (recorded maps must match)
    attention_layers: str = "all"
    chunk_size: int = 8
