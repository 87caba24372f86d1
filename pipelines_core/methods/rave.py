"""RAVE (Kara et al., CVPR'24): randomized noise shuffling over grids of frames.

At every denoising step:
  1. draw a fresh random permutation of all frames (`randperm`, from the plan's own generator seeded by the
     sampler's seed, so a seed gives the same edit);
  2. tile the permuted frames' latents into n x n grids (default 3 x 3): each grid is one "frame" of
     n*h x n*w latents for the UNet, so plain self-attention inside a grid spans n^2 frames;
  3. denoise the grids (the run's VideoDenoiser sees the grids as its frames: CFG, chunks, ControlNet);
  4. cut the grids' noise predictions back into frames and undo the permutation.
Shuffling differently at every step mixes information across the whole clip without an attention patch;
ControlNet hints are gridded with the same permutation, so every latent cell keeps its own frame's hint.

The step is a denoiser wrapper (`InjectionPlan.wrap_denoiser`), not a copy of the loop: the scheduler step,
hooks and x0 estimates all see the frames in their own order. The official code keeps the latents in
shuffled grid order between steps and tracks the indices; with a per-frame scheduler step the two are the
same computation.

Padding: when the frame count is not a multiple of n^2, the last grid is filled by repeating frames of the
step's order (cyclically, so a clip shorter than one grid still fills it), and the predictions of those
repeated cells are dropped (cropped) before unpermuting. The official code needs a multiple of n^2 (the
ComfyUI port clamps to the last frame).

Where we differ from the official pipeline (`pipelines/sd_controlnet_rave.py`):
  * SD-1.5-class models through our sampler; any scheduler the sampler offers (the paper: DDIM);
  * ControlNet during inversion (`give_control_inversion`): connect the same ControlNet Condition to DDIM Invert
    (rave_edit.json does), which then steers every inversion step; the official inversion runs frame by frame,
    ours under DDIM Invert's own rule and chunks (per frame with its default `none`: the same);
  * the grids are batched by the sampler's chunk_size counted in frames (`chunk_size // n^2` grids per chunk,
    at least one; the denoiser may put several chunks in one UNet call as it does for frames) instead of a
    fixed batch of 4 grids (configs/truck.yaml `batch_size: 4`); with attention `none` this changes nothing
    but memory. A grid has n^2 frames' tokens, so its self-attention scores are n^4 times a frame's (n^2 times
    per frame it holds): memory where the kernel materialises them (the CPU's math path), time everywhere;
  * the sampler's cross-frame rule (if not `none`) acts between grids, as it would between frames;
  * the code's `cond_step_start` (guidance off for the first fraction of steps) is left out: its configs set
    0.0, guidance on throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from einops import rearrange

from ..models.controlnet import ControlStack
from ..sampling.chunks import plan_chunks
from ..sampling.hooks import StepState
from ..sampling.injection import Injection, InjectionPlan, PlanContext

MAX_GRID = 8  # 8x8 frames per grid: already 64 frames in one self-attention


@dataclass(frozen=True)
class RAVEParams:
    grid: int = 3  # RAVE configs: grid_size 3 (3x3 grids)
    shuffle: bool = True  # the paper's randomized shuffling; False = fixed grids (the paper's ablation)

    def check(self) -> None:
        if not 1 <= self.grid <= MAX_GRID:
            raise ValueError(f"RAVE: grid_size must be from 1 to {MAX_GRID} (got {self.grid}); 3 is the paper's")


# --- the grid and the shuffle ---------------------------------------------------------------------------

def grid(x: torch.Tensor, n: int) -> torch.Tensor:
    """(G*n*n, c, h, w) frames -> (G, c, n*h, n*w) grids, row-major: frame r*n + s of a grid sits in cell (r, s)."""
    return rearrange(x, "(g r s) c h w -> g c (r h) (s w)", r=n, s=n)


def ungrid(x: torch.Tensor, n: int) -> torch.Tensor:
    """(G, c, n*h, n*w) grids -> (G*n*n, c, h, w) frames: the inverse of `grid`."""
    return rearrange(x, "g c (r h) (s w) -> (g r s) c h w", r=n, s=n)


def grid_order(frame_count: int, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Which frame fills each grid cell (slot), for G = ceil(F / n^2) grids: a random permutation of all frames
    drawn from `generator` (identity without one), then repeated frames of that order up to G*n^2 slots."""
    order = torch.randperm(frame_count, generator=generator) if generator is not None else torch.arange(frame_count)
    slots = -(-frame_count // (n * n)) * n * n
    return order[torch.arange(slots) % frame_count]  # slots past F repeat the order from its start


def shuffle(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Frames (F, ...) in slot order (len(order), ...), padded slots included."""
    return x[order.to(x.device)]


def unshuffle(slots: torch.Tensor, order: torch.Tensor, frame_count: int) -> torch.Tensor:
    """Slot values back to frames (F, ...): the padded slots (past F) are cropped off, and slot k of the first
    F (a permutation of all frames) goes back to frame order[k]."""
    out = torch.empty_like(slots[:frame_count])
    out[order[:frame_count].to(slots.device)] = slots[:frame_count]
    return out


def gridded_control(control: Optional[ControlStack], order: torch.Tensor, n: int) -> Optional[ControlStack]:
    """The stack whose hints are the grids of this step's order: hint g is the grid of the frames in grid g's
    cells, at n x the size, so a grid's latent cell and its hint cell hold the same frame."""
    if control is None:
        return None
    return ControlStack(tuple(replace(unit, hints=grid(shuffle(unit.hints, order), n)) for unit in control.units))


# --- the step ------------------------------------------------------------------------------------------

class ShuffledGrids:
    """The denoiser the loop calls under RAVE: per step, shuffle -> grid -> the run's denoiser on the grids ->
    ungrid -> unshuffle. Fresh per run (its generator is the run's)."""

    def __init__(self, denoiser, n: int, generator: Optional[torch.Generator], grids_per_chunk: int, rule: str):
        if denoiser.source is not None:  # a live source chunk is read per frame; RAVE plans none
            raise ValueError("RAVE: a live source branch cannot be shuffled into grids")
        self.denoiser, self.n, self.generator = denoiser, n, generator
        self.grids_per_chunk, self.rule = grids_per_chunk, rule

    def __call__(self, latents: torch.Tensor, state: StepState) -> torch.Tensor:
        frames, n = latents.shape[0], self.n
        order = grid_order(frames, n, self.generator)
        grids = len(order) // (n * n)
        # The run's denoiser with the grids as its frames: chunks over grids, hints gridded like the latents.
        inner = replace(self.denoiser, chunks=plan_chunks(grids, self.grids_per_chunk, self.rule),
                        control=gridded_control(self.denoiser.control, order, n))
        seen = replace(state, latents=grid(shuffle(state.latents, order), n))
        eps = inner(grid(shuffle(latents, order), n), seen)
        return unshuffle(ungrid(eps, n), order, frames)


def rave_planner(injection: Injection, context: PlanContext) -> InjectionPlan:
    params: RAVEParams = injection.params
    n = params.grid
    generator = torch.Generator().manual_seed(context.seed) if params.shuffle else None
    # The sampler's chunk_size counts frames; a grid carries n^2 frames' tokens.
    grids_per_chunk = max(1, context.chunk_size // (n * n))
    return InjectionPlan(
        wrap_denoiser=lambda denoiser: ShuffledGrids(denoiser, n, generator, grids_per_chunk, context.attention))


def rave_injection(inversion=None, params: RAVEParams = RAVEParams()) -> Injection:
    """VE_INJECTION for RAVE; with an inversion (the paper: DDIM inversion, strength 1.0) sampling starts from
    it, without one from whatever the sampler is given (images + strength, or noise)."""
    params.check()
    return Injection("rave", inversion, params, rave_planner)
