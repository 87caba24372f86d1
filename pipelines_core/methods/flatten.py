"""FLATTEN (Cong et al., ICLR'24): optical-flow-guided attention on top of dense all-frames attention, with the
source's decoder features and self-attention Q/K injected (methods.md §1.4, §2.5).

Three parts, each as the official code (yrcong/flatten, models/util.py, attention.py, pipeline_flatten.py) does it:
  * Trajectories. The flow between consecutive frames (Flow Warp's `fwd[i]`, frame i -> i+1) is brought to
    every token grid a self-attention layer uses: nearest-sampled onto the grid and scaled to cells
    (the code's `round(r * interpolate(flow / 512, scale_factor=r / 512))`), rounded. Each cell of frame t links to
    the cell its rounded flow lands on in frame t+1 (none when it leaves the frame); when several cells land on
    one cell, a seeded random one of them keeps the link. Following the links frame after frame chains the
    cells into trajectories; a cell no link reaches starts a new one. Every (frame, position) lies on exactly
    one trajectory (`check_partition`, as the code asserts). `build_trajectories` is a pure function of the
    flow, the grid and the seed; `FlowTrajectories` keeps its result per grid for a run.
  * Flow-guided attention (`FlowGuidedAttention`, an AttnEdit at the `out` point). Every self-attention layer
    first runs dense attention over all frames of its chunk (the rule `all`, set by the plan's `rule_for`);
    its output, before the output projection, then goes through a second attention in which each token
    attends only to the tokens on its own trajectory (padding masked), with queries, keys and values all equal
    to the dense output, split into the layer's heads, scale 1/sqrt(head dim) -- the code's `old_qk=0`, its
    default in inference.py (`old_qk=1` would take the original q, k; v is the dense output either way). The
    layer's `to_out` follows as usual. A token alone on its trajectory gets its own value back.
  * Injection. For the first `inject` (0.8: the code's inject_step 40 of 50) of the steps, the source's
    residual features of SD's up_blocks[1].resnets[0, 1] and up_blocks[2].resnets[0] (conv2 output, before the
    skip add) and its attn1 queries and keys of LDM decoder layers 4-9 (up_blocks[1].attentions[1, 2],
    up_blocks[2].attentions[*], up_blocks[3].attentions[0]) replace the edit's, in the uncond and cond chunks.
    The machinery is Plug-and-Play's (`plug_and_play.source_features`, `SourceQK`).

Where we differ from the paper, on purpose:
  * Source features come from a live source branch ([source, uncond, cond], the inverted latent at the step's
    timestep under the inversion's prompt, with the same dense + flow-guided attention) instead of features
    stored during a 100-step inversion and read back. It computes the features FLATTEN stores: the same UNet and
    attention at the same timestep, on the latent at level t (FLATTEN's inverse step at t reads the latent one
    100-step level below t); the pack keeps only latents in memory. The inversion latents themselves come from
    DDIM Invert at the sampler's step count (FLATTEN inverts 100 steps with its own dense + flow-guided
    attention; `workflows/flatten_edit.json` inverts with the `all` rule, without the flow part). Invert with
    an empty prompt, as FLATTEN does.
  * Flow-guided attention acts on every self-attention layer by default (`flow_layers="all"`: the paper's
    trajectories at every latent resolution, here at whatever grids the clip's size gives); the code applies
    it on the 64x64 layers only (`if h in [64]`), which is `flow_layers="finest"` (the latent's own grid, at
    any size). Any multiple-of-8 size works; the code resizes everything to 512x512.
  * Conflicts are broken by a generator seeded with the sampler's seed (the code uses Python's global
    `random`), so a run repeats. SD-1.5/2.1 UNets of diffusers, not the inflated 3D UNet.
  * Frames are chunked by the sampler: a chunk's tokens attend to the tokens of their trajectory that are in
    the chunk (the code runs all frames at once).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from ..attention.attach import is_self_attention
from ..attention.layers import parse_layer, pnp_attention_layers
from ..attention.processor import AttnCall, AttnEdit
from ..attention.rules import all_frames
from ..flow.warp import FlowField
from ..sampling.injection import Injection, InjectionPlan, PlanContext
from ..sampling.windows import RunWindow, first
from .plug_and_play import SourceQK, check_inversion, source_features

FLOW_LAYERS = ("all", "finest", "none")
LATENT_FACTOR = 8  # SD's VAE: a latent cell is 8x8 pixels


@dataclass(frozen=True)
class FlattenParams:
    inject: float = 0.8  # features and Q/K for the first 0.8 of the steps: FLATTEN's inject_step 40 of 50
    flow_layers: str = "all"  # "all" self-attention layers, the "finest" grid only (the code's h == 64), "none"

    def check(self) -> None:
        if not 0.0 <= self.inject <= 1.0:
            raise ValueError(f"inject must be a fraction of the steps in [0, 1] (got {self.inject})")
        if self.flow_layers not in FLOW_LAYERS:
            raise ValueError(f"unknown flow_layers {self.flow_layers!r}; choose one of {', '.join(FLOW_LAYERS)}")


# --- trajectories (pure functions) -------------------------------------------------------------------

def token_grids(size: tuple) -> list:
    """The token grids (h, w) of a UNet's levels for a clip of `size` (height, width) pixels: the latent grid,
    then each downsampling (SD's stride-2 conv with padding 1 gives ceil(n / 2)), down to 1x1."""
    h, w = size[0] // LATENT_FACTOR, size[1] // LATENT_FACTOR
    grids = [(h, w)]
    while (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
        grids.append((h, w))
    return grids


def flow_on_grid(fwd: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Pixel flows (P, 2, H, W) -> whole-cell displacements (P, 2, h, w) on a token grid: nearest-sampled and
    scaled per axis (x by w/W, y by h/H), then rounded, as FLATTEN's round(r * interpolate(flow / 512))."""
    height, width = fwd.shape[-2:]
    sampled = F.interpolate(fwd.float(), size=tuple(grid), mode="nearest")
    scale = torch.tensor([grid[1] / width, grid[0] / height]).view(1, 2, 1, 1)
    return torch.round(sampled * scale).long()


def link_frames(cells: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each pair t and each position p of frame t: the position in frame t+1 its displacement lands on, or -1
    (leaves the frame, or lost a conflict). Of several positions landing on one cell, one drawn at random keeps
    the link (the maximum of a random permutation is uniform among them). cells: (P, 2, h, w) -> (P, h*w)."""
    pairs, _, h, w = cells.shape
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    links = torch.full((pairs, h * w), -1, dtype=torch.long)
    for t in range(pairs):
        y, x = rows + cells[t, 1].reshape(-1), cols + cells[t, 0].reshape(-1)
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        target, priority = (y * w + x)[inside], torch.randperm(h * w, generator=generator)[inside]
        best = torch.full((h * w,), -1, dtype=torch.long).scatter_reduce(0, target, priority, "amax")
        won = priority == best[target]
        links[t, inside.nonzero()[:, 0][won]] = target[won]
    return links


def chain_links(links: torch.Tensor) -> torch.Tensor:
    """Trajectory ids (F, N) from links (F-1, N): frame 0 opens N trajectories; a position of frame t+1 that a link
    reaches continues its source's trajectory, any other opens a new one."""
    pairs, n = links.shape
    ids = torch.empty((pairs + 1, n), dtype=torch.long)
    ids[0] = torch.arange(n)
    opened = n
    for t in range(pairs):
        linked = links[t] >= 0
        nxt = torch.full((n,), -1, dtype=torch.long)
        nxt[links[t][linked]] = ids[t][linked]
        fresh = nxt < 0
        count = int(fresh.sum())
        nxt[fresh] = torch.arange(opened, opened + count)
        opened += count
        ids[t + 1] = nxt
    return ids


@dataclass(frozen=True, eq=False)
class Trajectories:
    """The trajectories of one token grid: `ids[f, p]` is the trajectory of position p of frame f; `table[k, f]`
    is the position of trajectory k in frame f, -1 where it has none (padding)."""

    grid: tuple
    ids: torch.Tensor  # (F, h*w)
    table: torch.Tensor  # (trajectories, F)

    @property
    def lengths(self) -> torch.Tensor:
        return (self.table >= 0).sum(1)


def trajectory_table(ids: torch.Tensor) -> torch.Tensor:
    frames, n = ids.shape
    table = torch.full((int(ids.max()) + 1, frames), -1, dtype=torch.long)
    table[ids, torch.arange(frames)[:, None].expand(frames, n)] = torch.arange(n).expand(frames, n)
    return table


def check_partition(traj: Trajectories) -> None:
    """Every (frame, position) lies on exactly one trajectory, at most once per frame (FLATTEN asserts the same:
    no duplicates, and every point of the video in some trajectory)."""
    frames, n = traj.ids.shape
    present = traj.table >= 0
    if int(present.sum()) != frames * n or not bool(present.any(1).all()):
        raise AssertionError(f"trajectories on {traj.grid} hold {int(present.sum())} points, the clip {frames * n}")
    back = traj.table[traj.ids, torch.arange(frames)[:, None]]  # where each point's trajectory says it is
    if not torch.equal(back, torch.arange(n).expand(frames, n)):
        raise AssertionError(f"trajectories on {traj.grid} do not partition the (frame, position) points")


def build_trajectories(fwd: torch.Tensor, grid: tuple, seed: int) -> Trajectories:
    """FLATTEN's trajectories of a clip on one token grid from its forward flows (F-1, 2, H, W) (frame i -> i+1)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    ids = chain_links(link_frames(flow_on_grid(fwd.cpu(), grid), generator))
    traj = Trajectories(tuple(grid), ids, trajectory_table(ids))
    check_partition(traj)
    return traj


class FlowTrajectories:
    """A clip's flow and its trajectories, built once per (grid, seed) on first use. Each run makes its own (the
    VE_INJECTION, shared by later graphs, stays as it was made); building all grids of 16 frames at 512x512 takes
    about 0.2 s on a CPU."""

    def __init__(self, flow: FlowField):
        self.flow = flow
        self.grids = token_grids(flow.size)
        self._built: dict = {}

    def at(self, grid: tuple, seed: int) -> Trajectories:
        key = (tuple(grid), int(seed))
        if key not in self._built:
            self._built[key] = build_trajectories(self.flow.fwd, grid, seed)
        return self._built[key]

    def grid_of(self, tokens: int) -> tuple:
        for grid in self.grids:
            if grid[0] * grid[1] == tokens:
                return grid
        raise ValueError(f"FLATTEN: an attention layer has {tokens} tokens, which matches no token grid of the "
                         f"flow's {self.flow.size[1]}x{self.flow.size[0]} clip ({self.grids}); connect Flow Warp to "
                         "the frames DDIM Invert inverts")


# --- flow-guided attention ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CallTrajectories:
    """The trajectories of one attention call's frames: `table[k, j]` = position of trajectory k in the call's
    frame j (-1: none); only trajectories with at least two members in the call (a lone token attends to
    itself, which gives back its value)."""

    table: torch.Tensor  # (shared trajectories, frames)
    members: tuple  # (trajectory rows, frame columns) of every real entry of `table`


def call_trajectories(ids: torch.Tensor) -> CallTrajectories:
    """From the trajectory ids (f, n) of a call's frames."""
    _, slot = torch.unique(ids, return_inverse=True)
    table = trajectory_table(slot)
    table = table[(table >= 0).sum(1) > 1]
    return CallTrajectories(table, (table >= 0).nonzero(as_tuple=True))


def trajectory_attention(x: torch.Tensor, traj: CallTrajectories, heads: int, query: Optional[torch.Tensor] = None,
                         key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention along trajectories: token (j, p) attends to the tokens of its trajectory in the call's frames,
    with queries, keys and values all `x` split into heads (FLATTEN's old_qk=0), padding masked. `query` and
    `key` (same shape as x), when given, replace x as queries and keys (old_qk=1; FRESCO's temporal attention).

    x: ((chunk frame), tokens, channels); the same trajectories in every chunk. Returns the same shape.
    """
    frames = traj.table.shape[1]
    if traj.table.shape[0] == 0:
        return x
    table = traj.table.to(x.device)
    present = table >= 0
    frame_index = torch.arange(frames, device=x.device)[None, :]

    def along(t: torch.Tensor) -> torch.Tensor:  # the members of every trajectory, split into heads
        members = rearrange(t, "(c f) n d -> c f n d", f=frames)[:, frame_index, table.clamp(min=0)]  # c k f d
        return rearrange(members, "c k f (h e) -> (c k) h f e", h=heads)

    tokens = rearrange(x, "(c f) n d -> c f n d", f=frames)
    v = along(x)
    q = v if query is None else along(query)
    k = v if key is None else along(key)
    mask = repeat(present, "k f -> (c k) 1 1 f", c=tokens.shape[0])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(e), as FLATTEN
    out = rearrange(out, "(c k) h f e -> c k f (h e)", c=tokens.shape[0])
    rows, cols = (m.to(x.device) for m in traj.members)
    result = tokens.clone()
    result[:, cols, table[rows, cols]] = out[:, rows, cols]
    return rearrange(result, "c f n d -> (c f) n d")


class FlowGuidedAttention(AttnEdit):
    """FLATTEN's second attention, on the dense attention's output before `to_out` (self-attention only).

    `flow_layers`: "all" self-attention layers, or only those on the "finest" grid (the latent's own).
    Trajectory tables per call are kept for the run (one per grid and set of frames).
    """

    def __init__(self, trajectories: FlowTrajectories, seed: int, flow_layers: str = "all"):
        self.trajectories = trajectories
        self.seed = seed
        self.flow_layers = flow_layers
        self._calls: dict = {}

    def acts_on(self, call: AttnCall, tokens: int) -> bool:
        if not call.is_self or call.layout is None or self.flow_layers == "none":
            return False
        finest = self.trajectories.grids[0]
        return self.flow_layers == "all" or tokens == finest[0] * finest[1]

    def for_call(self, tokens: int, frame_ids: tuple, device) -> CallTrajectories:
        key = (tokens, frame_ids, str(device))
        if key not in self._calls:
            if max(frame_ids) >= self.trajectories.flow.frame_count:
                raise ValueError(f"FLATTEN: the sampler reads frame {max(frame_ids)}, the flow has "
                                 f"{self.trajectories.flow.frame_count} frames; connect Flow Warp to the same clip")
            traj = self.trajectories.at(self.trajectories.grid_of(tokens), self.seed)
            found = call_trajectories(traj.ids[list(frame_ids)])
            self._calls[key] = CallTrajectories(found.table.to(device), tuple(m.to(device) for m in found.members))
        return self._calls[key]

    def out(self, call: AttnCall, h):
        tokens = h.shape[1]
        if not self.acts_on(call, tokens):
            return h
        layout = call.layout
        frame_ids = tuple(layout.frame_ids) or tuple(range(layout.frames))
        x = h if call.attn is None or call.attn.group_norm is None else (
            call.attn.group_norm(h.transpose(1, 2)).transpose(1, 2))  # FLATTEN norms again when the layer has one
        return trajectory_attention(x, self.for_call(tokens, frame_ids, h.device), call.heads)


# --- injection layers -------------------------------------------------------------------------------------

def flatten_qk_layers(names) -> list:
    """FLATTEN's Q/K injection layers: LDM decoder layers 4-9 on SD (up_blocks.1.attentions.1-2,
    up_blocks.2.attentions.0-2, up_blocks.3.attentions.0), i.e. Plug-and-Play's 4-11 without the finest
    block's layers after its first; the same rule on other UNets."""
    layers = pnp_attention_layers(names)
    if not layers:
        return []
    parsed = {name: parse_layer(name) for name in layers}
    finest = max(p.block for p in parsed.values())
    return [n for n in layers if not (parsed[n].block == finest and parsed[n].position > 0)]


def flatten_feature_modules(unet) -> list:
    """FLATTEN's injected residual features: on SD up_blocks.1.resnets.0-1 and up_blocks.2.resnets.0, i.e. the
    first two resnets of the lowest-resolution decoder block with attention and the first of the next one."""
    blocks = [i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)]
    if not blocks:
        raise ValueError("the UNet's decoder has no attention blocks; FLATTEN needs an SD-style UNet")
    names = [f"up_blocks.{blocks[0]}.resnets.{j}" for j in range(min(2, len(unet.up_blocks[blocks[0]].resnets)))]
    if len(blocks) > 1:
        names.append(f"up_blocks.{blocks[1]}.resnets.0")
    return names


@contextmanager
def source_feature_patches(unet, modules: list, window: RunWindow) -> Iterator[None]:
    """Plug-and-Play's feature injection on each of `modules`; all removed on exit."""
    with ExitStack() as stack:
        for name in modules:
            stack.enter_context(source_features(unet, name, window))
        yield


# --- the plan ------------------------------------------------------------------------------------------------

def flatten_planner(injection: Injection, context: PlanContext, flow: FlowField) -> InjectionPlan:
    params: FlattenParams = injection.params
    trajectories = FlowTrajectories(flow)
    unet = context.model.unet
    qk_layers = frozenset(flatten_qk_layers(unet.attn_processors))
    window = first(params.inject, "inject").of(context.steps)
    qk = SourceQK(window)
    along = FlowGuidedAttention(trajectories, context.seed, params.flow_layers)
    modules = flatten_feature_modules(unet)

    def edits_for(name: str) -> tuple:
        if not is_self_attention(name):
            return ()
        return ((qk,) if name in qk_layers else ()) + (along,)  # injected q/k feed the dense attention

    def rule_for(name: str) -> Optional[object]:
        return all_frames if is_self_attention(name) else None  # FLATTEN's dense attention in every attn1

    return InjectionPlan(edits_for=edits_for, rule_for=rule_for,
                         patches=lambda unet: source_feature_patches(unet, modules, window), source_branch=True)


def check_flow(flow, inversion) -> None:
    """The flow must describe the inverted clip: same frame count and size."""
    if not isinstance(flow, FlowField):
        raise ValueError("FLATTEN reads optical flow: connect Flow Warp's flow to the Attention Injector (FLATTEN)")
    x0 = inversion.latents[0]
    frames, size = x0.shape[0], (x0.shape[-2] * LATENT_FACTOR, x0.shape[-1] * LATENT_FACTOR)
    if flow.frame_count != frames or tuple(flow.size) != size:
        raise ValueError(f"Attention Injector (FLATTEN): the flow is {flow.frame_count} frames of "
                         f"{flow.size[1]}x{flow.size[0]}, the inversion {frames} frames of {size[1]}x{size[0]}: "
                         "connect Flow Warp and DDIM Invert to the same frames")


def flatten_injection(inversion, flow: FlowField, params: FlattenParams = FlattenParams()) -> Injection:
    """VE_INJECTION for FLATTEN on `inversion` (empty source prompt; sample with DDIM Invert's steps, strength 1.0)
    along `flow` (Flow Warp's, on the same frames)."""
    check_inversion(inversion, "FLATTEN")
    params.check()
    check_flow(flow, inversion)
    return Injection("flatten", inversion, params, partial(flatten_planner, flow=flow))
