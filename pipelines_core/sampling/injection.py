"""What an Attention Injector hands the sampler: a declarative injection, turned into a plan per run.

An `Injection` (the VE_INJECTION socket value) is frozen data: the method, the inversion it reads, and
the method's parameters. At sampling time `Injection.plan(...)` builds a fresh `InjectionPlan` (stateful
objects live only for that run, so a cached VE_INJECTION is never altered). The sampler asks the plan
  * `edits_for(layer_name)` - AttnEdits for the video attention processor of that layer;
  * `rule_for(layer_name)`  - a cross-frame rule overriding the sampler's for that layer (or None);
  * `hooks`                 - sampler hooks (latent blend, x0 guidance, ...);
  * `patches(unet)`         - a context manager installing module-level patches (feature injection)
                              and removing them afterwards;
  * `source_branch`         - whether the UNet batch carries a live source chunk ([source, uncond, cond]):
                              the inverted latent at each step with the source prompt (Plug-and-Play);
  * `wrap_denoiser(d)`      - the denoiser the loop calls, given the run's `VideoDenoiser` (the identity by
                              default): a method that changes how frames reach the UNet (RAVE's shuffled
                              grids, Fairy's anchors computed once per step) wraps it.
A method is a configuration of these, never a copy of the loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Protocol, Sequence

from ..attention.processor import AttnEdit
from ..attention.rules import Rule
from .hooks import Hooks

if TYPE_CHECKING:
    from .denoiser import VideoDenoiser
    from .loop import Denoiser
    from ..models.model import VEModel
    from .inversion import Inversion
    from .settings import SamplerSettings


@dataclass
class InjectionPlan:
    edits_for: Callable[[str], Sequence[AttnEdit]] = lambda name: ()
    rule_for: Callable[[str], Optional[Rule]] = lambda name: None
    hooks: Hooks = field(default_factory=Hooks)
    patches: Callable[[object], ContextManager] = lambda unet: nullcontext()
    source_branch: bool = False
    wrap_denoiser: Callable[["VideoDenoiser"], "Denoiser"] = lambda denoiser: denoiser


class MethodParams(Protocol):
    """A method's parameters: frozen data that checks itself."""

    def check(self) -> None: ...


@dataclass(frozen=True)
class PlanContext:
    """What a planner may need to know about the run it plans for."""

    model: "VEModel"
    frame_count: int
    steps: int  # steps this run takes (after strength)
    timesteps: tuple  # the run's timesteps, in order
    cfg: float
    seed: int
    target_prompt: str
    attention: str = "none"  # the sampler's cross-frame rule, its layers and chunking (recorded maps must match)
    attention_layers: str = "all"
    chunk_size: int = 8


Planner = Callable[["Injection", PlanContext], InjectionPlan]


@dataclass(frozen=True, eq=False)
class Injection:
    """VE_INJECTION: method `mode` with its `params`, reading `inversion`; `planner(injection, context)` builds
    the plan of one run. `start`: where the run starts, for a method that brings its own (the sampler is then given
    no other start)."""

    mode: str
    inversion: Optional["Inversion"]
    params: MethodParams
    planner: Planner = field(repr=False, default=None)
    start: Optional[object] = field(repr=False, default=None)  # a start of the method's own (FlowEdit, RF-Inversion)

    def plan(self, context: PlanContext) -> InjectionPlan:
        return self.planner(self, context)

    def check_run(self, settings: "SamplerSettings", frame_count: int) -> None:
        """What every injection needs of the run, checked before any step."""
        if settings.chunk_overlap > 0 and frame_count > settings.chunk_size:
            # Injections are planned for the anchor chunks (PlanContext carries chunk_size only; FateZero's recorded
            # maps are keyed by those chunks' frames), so overlapping windows would misread them.
            raise ValueError("seamless chunks (chunk_overlap > 0) do not work with an injection yet: set "
                             "chunk_overlap to 0, or chunk_size to at least the frame count")

    def __repr__(self) -> str:
        return f"Injection({self.mode}, {self.params!r})"
