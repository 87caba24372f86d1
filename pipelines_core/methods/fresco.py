"""FRESCO (Yang et al., CVPR'24): spatial-temporal correspondence for zero-shot video translation
(methods.md §2.4; the official code FRESCO 736a714, src/diffusion_hacked.py, src/pipe_FRESCO.py, run_fresco.py, and
diffusers' community port examples/community/fresco_v2v.py).

Five parts, each switchable (`FrescoParams`), as the code does them:
  * Spatial-guided attention. Before the first step of a batch, the input frames -- their latents noised to the
    schedule's last (lowest-noise) timestep -- go once through the UNet with plain attention (no ControlNet, as the
    code's `get_intraframe_paras`), and each FRESCO layer keeps what its self-attention projects from its inputs:
    Q_ref = to_q(h_ref), K_ref = to_k(h_ref) (the code stores h_ref and projects it again; the same numbers).
    For the first `spatial_steps` (the code's num_intraattn_steps 1) steps the layer's queries become
        Q <- SDPA(Q_ref, 0.2 K_ref, Q) = softmax(Q_ref (0.2 K_ref)^T / sqrt(d)) Q,
    each query re-assembled from the queries of the tokens the input frame's own layout relates it to (the
    code's `intraattn_scale_factor` 0.2; its bias term is 0, i.e. no mask).
  * Efficient cross-frame attention. Keys and values of every frame = all tokens of the batch's first frame plus
    only the newly visible tokens of each later frame: those occluded in the backward flow from the frame before
    it in the batch (bilinear-resized to the layer's grid, > 0.5, as the code's `attn_mask`). Every frame of a
    CFG chunk reads the same set, within its chunk.
  * Temporal-guided attention (FLATTEN's flow-guided attention, `flatten.trajectory_attention`): after the
    attention, each token attends to the tokens on its optical-flow trajectory across the batch, with the
    layer's own per-frame Q and K (before the cross-frame gather and the spatial guidance), K scaled by 0.2,
    and the attention output as V (the code's `interattn_scale_factor` 0.2), while the timestep is >= 350 (the
    code's step_interattn_end).
  * Feature optimisation at the input of every decoder block (the code's layers [0, 1, 2, 3]), for the first
    0.75 of the steps (end_opt_step 15 of 20): the block's input features cs of the whole UNet call are
    optimised with Adam (lr 0.2, 20 iterations) on
        L = 2 mean(|c_{i+1} - warp(c_i, bwd)| (1 - occ_bwd) + |c_i - warp(c_{i+1}, fwd)| (1 - occ_fwd))
            + 100 L1(Gram(cs), Gram(input frames' features)),
    pairs (i, i+1) over the batch's frames with wrap-around (the last frame pairs with the first), Gram the
    cosine-similarity matrix of a frame's tokens, the target the same block's input in the input frames' pass;
    then AdaIN back to the features' own per-channel statistics. The optimisation runs with gradients enabled
    locally, on fresh tensors made outside inference mode (ComfyUI samples under torch.inference_mode); the only
    tensor that requires grad is the features' copy, so the UNet's weights neither change nor collect grads.
  * Keyframe batches (run_fresco.py): the first batch is the first `batch_size` (8) frames; each later batch is
    the clip's first frame and the previous batch's last frame followed by the next batch_size - 2 frames (a last
    batch of fewer than 3 new frames takes some from the one before). Implemented by this module's own chunking
    in `InjectionPlan.wrap_denoiser` (the sampler's chunk_size does not apply). The code denoises batch after
    batch and replays the carried frames' recorded latents at every step (`record_latents`); here all batches
    advance one step at a time, so a carried frame's latent at step s is exactly the one its own batch produced,
    which is what the replay gives; its prediction in the later batch is dropped, as the code drops it.

Where we differ from the code, on purpose:
  * Every frame is a keyframe: no keyframe selection by frame difference and no EbSynth propagation between
    keyframes; background smoothing with a saliency model (EGNet) is left out. SD-1.5-class UNets of diffusers;
    FRESCO's layers are the self-attention layers of the two finest decoder blocks with attention (SD's
    up_blocks.2 and .3), its optimisation points the inputs of every decoder block, on any UNet.
  * Flows come from Flow Warp (consecutive frames); the flow between two frames of a batch that are not
    neighbours in the clip (the carried ones, the wrap-around pair) is chained from the consecutive flows
    (`flow.warp.chain_flows`) with occlusion from the forward-backward check (Flow Warp's default thresholds);
    the code runs GMFlow on each such pair. As the code, a pixel whose warped colour differs by more than 25% is
    also occluded.
  * Trajectories are FLATTEN's (forward flow, conflicts broken by the sampler's seed; `flatten.FlowTrajectories`)
    on both FRESCO grids; the code builds its index maps from the backward flow with occlusion and breaks
    conflicts by colour.
  * Feature warping in the temporal loss samples bilinearly from the four neighbours (`sample_features`), so an
    integer displacement, zero included, copies features exactly; grid_sample's normalised coordinates are off by
    ~1e-6, and Adam turns even such a gradient into lr-sized steps.
  * The optimisation window is a fraction of the run's steps (the code counts its 15 of the full 20-step
    schedule, of which SDEdit runs the last ones). AdaIN is the pack's (`rerender.adain`, biased variance; the
    code uses the unbiased one on both sides). The input frames' latents are the VAE posterior mean (the code
    samples it), noised with the sampler's seed. Deterministic samplers instead of the code's DDPM.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from ..attention.attach import is_self_attention
from ..attention.layers import decoder_self_attention, parse_layer
from ..attention.processor import AttnCall, AttnEdit, FrameLayout
from ..attention.rules import own_frame
from ..flow.warp import FlowField, chain_flows, image_to_nchw, occlusion_masks, pixel_grid, warp
from ..models.model import encode_frames
from ..sampling.chunks import Chunk
from ..sampling.hooks import StepState
from ..sampling.injection import Injection, InjectionPlan, PlanContext
from ..sampling.windows import first
from .flatten import LATENT_FACTOR, FlowGuidedAttention, FlowTrajectories, trajectory_attention
from .rerender import adain
from ..sampling.gradients import local_gradients

COLOUR_OCCLUSION = 0.25  # the code: a warped pixel more than 25% of the range off its target is occluded


@dataclass(frozen=True)
class FrescoParams:
    spatial_attention: bool = True  # spatial-guided attention (the code's enable_intraattn)
    cross_frame_attention: bool = True  # first frame + newly visible tokens (enable_cfattn)
    temporal_attention: bool = True  # attention along flow trajectories (enable_interattn)
    temporal_loss: bool = True  # optimisation: warped features (optimize_temporal)
    spatial_loss: bool = True  # optimisation: Gram matrices of the input frames' features (correlation_matrix)
    spatial_steps: int = 1  # num_intraattn_steps: spatial guidance in the first steps
    temporal_until: int = 350  # step_interattn_end: temporal attention while the timestep is >= this
    optimize_until: float = 0.75  # end_opt_step 15 of 20 steps
    iterations: int = 20  # Adam iterations per optimisation
    lr: float = 0.2  # Adam's learning rate
    spatial_weight: float = 100.0  # intra_weight
    attention_scale: float = 0.2  # intraattn_scale_factor and interattn_scale_factor
    batch_size: int = 8  # keyframes per batch, 2 of them carried from the batch before

    def check(self) -> None:
        if self.batch_size < 3:
            raise ValueError(f"batch_size must be at least 3: 2 frames are carried into every batch after the "
                             f"first (got {self.batch_size})")
        if not 0.0 <= self.optimize_until <= 1.0:
            raise ValueError(f"optimize_until must be a fraction of the steps in [0, 1] (got {self.optimize_until})")
        for name in ("spatial_steps", "temporal_until", "iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0 (got {getattr(self, name)})")
        for name in ("lr", "spatial_weight", "attention_scale"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be at least 0 (got {getattr(self, name)})")


# --- layers and batches ------------------------------------------------------------------------------------

def fresco_attention_layers(names) -> list:
    """FRESCO's attention layers: the self-attention of the two finest decoder blocks with attention (SD's
    up_blocks.2 and up_blocks.3, the 32^2 and 64^2 grids at 512 px; the code's `startswith("up_blocks.2")`)."""
    decoder = [(name, parse_layer(name)) for name in decoder_self_attention(names)]
    finest = sorted({p.block for _, p in decoder})[-2:]
    return [name for name, p in decoder if p.block in finest]


def keyframe_batches(frame_count: int, batch_size: int) -> list:
    """FRESCO's batches as sampler chunks (run_fresco.py's `sublists`): frames 0..batch_size-1, then runs of
    batch_size - 2 new frames, each led by frame 0 and the previous batch's last frame (kept out of the output);
    a last run of fewer than 3 new frames takes frames from the end of the run before."""
    if frame_count <= batch_size:
        return [Chunk(tuple(range(frame_count)), tuple(range(frame_count)))]
    step = batch_size - 2
    runs = [list(range(start, min(start + step, frame_count))) for start in range(2, frame_count, step)]
    runs[0] = [0, 1] + runs[0]
    want = min(3, step)  # the code's 3, for batches that hold that many new frames
    if len(runs) > 1 and len(runs[-1]) < want:
        borrowed = min(want - len(runs[-1]), len(runs[-2]) - 1)
        runs[-1] = runs[-2][-borrowed:] + runs[-1]
        runs[-2] = runs[-2][:-borrowed]
    chunks = [Chunk(tuple(runs[0]), tuple(range(len(runs[0]))))]
    for before, own in zip(runs, runs[1:]):
        frames = (0, before[-1]) + tuple(own)
        chunks.append(Chunk(frames, tuple(range(2, len(frames)))))
    return chunks


# --- flows between the frames of a batch ---------------------------------------------------------------------

@dataclass(frozen=True)
class PairFlows:
    """Flows of frame pairs (a_j, b_j), pixel or cell units: `fwd[j]` lives on a_j and points into b_j, `bwd[j]`
    lives on b_j and points into a_j (so warp(x_a, bwd) ~ x_b); `occ_fwd[j]` marks a_j's pixels not seen in b_j,
    `occ_bwd[j]` b_j's pixels not seen in a_j (1 = occluded)."""

    fwd: Tensor  # (P, 2, h, w)
    bwd: Tensor
    occ_fwd: Tensor  # (P, h, w)
    occ_bwd: Tensor

    def on_grid(self, grid: tuple) -> "PairFlows":
        """On a feature grid: flows bilinear-resized and scaled per axis to cells, occlusion max-pooled (a cell is
        occluded when any of its pixels is), as the code's interpolate(flow * scale) and max_pool2d(occ)."""
        height, width = self.fwd.shape[-2:]
        scale = torch.tensor([grid[1] / width, grid[0] / height], device=self.fwd.device).view(1, 2, 1, 1)

        def flows(f: Tensor) -> Tensor:
            return F.interpolate(f, size=tuple(grid), mode="bilinear", align_corners=False) * scale

        def occlusion(o: Tensor) -> Tensor:
            return F.adaptive_max_pool2d(o[:, None], tuple(grid))[:, 0]

        return PairFlows(flows(self.fwd), flows(self.bwd), occlusion(self.occ_fwd), occlusion(self.occ_bwd))

    def to(self, device, dtype=torch.float32) -> "PairFlows":
        return PairFlows(*(t.to(device, dtype) for t in (self.fwd, self.bwd, self.occ_fwd, self.occ_bwd)))

    def fresh(self) -> "PairFlows":
        """Normal tensors (not inference tensors), which autograd may save for backward."""
        return PairFlows(*(t.detach().clone() for t in (self.fwd, self.bwd, self.occ_fwd, self.occ_bwd)))


def chained_flow(flow: FlowField, a: int, b: int) -> Tensor:
    """The flow living on frame a and pointing into frame b, (1, 2, H, W), chained from consecutive flows."""
    if a == b:
        return torch.zeros_like(flow.fwd[:1])
    if a < b:
        pieces = [flow.fwd[f:f + 1] for f in range(a, b)]
    else:
        pieces = [flow.bwd[f - 1:f] for f in range(a, b, -1)]
    out = pieces[0]
    for piece in pieces[1:]:
        out = chain_flows(out, piece)
    return out


def pair_flows(flow: FlowField, frames: Optional[Tensor], pairs: list) -> PairFlows:
    """PairFlows of (a, b) clip frame pairs: Flow Warp's own for neighbours, chained (with a forward-backward
    occlusion check) for others, zero for a == b. With the clip's frames (N, C, H, W, 0..1), pixels whose warped
    colour is more than 25% off are occluded too (the code's check after GMFlow)."""
    fwd, bwd, occ_fwd, occ_bwd = [], [], [], []
    for a, b in pairs:
        if b == a + 1:
            parts = (flow.fwd[a:a + 1], flow.bwd[a:a + 1], flow.occ_fwd[a:a + 1], flow.occ_bwd[a:a + 1])
        elif a == b + 1:
            parts = (flow.bwd[b:b + 1], flow.fwd[b:b + 1], flow.occ_bwd[b:b + 1], flow.occ_fwd[b:b + 1])
        else:
            f_ab, f_ba = chained_flow(flow, a, b), chained_flow(flow, b, a)
            parts = (f_ab, f_ba, *occlusion_masks(f_ab, f_ba))
        f, bk, of, ob = (t.float() for t in parts)
        if frames is not None and a != b:
            src, dst = frames[a:a + 1].float(), frames[b:b + 1].float()
            ob = torch.maximum(ob, ((warp(src, bk) - dst).abs().mean(1) > COLOUR_OCCLUSION).float())
            of = torch.maximum(of, ((warp(dst, f) - src).abs().mean(1) > COLOUR_OCCLUSION).float())
        fwd.append(f), bwd.append(bk), occ_fwd.append(of), occ_bwd.append(ob)
    return PairFlows(torch.cat(fwd), torch.cat(bwd), torch.cat(occ_fwd), torch.cat(occ_bwd))


def batch_pairs(frame_ids: tuple) -> list:
    """The code's pairs of a batch: each frame with the next, the last with the first (wrap-around)."""
    ids = list(frame_ids)
    return list(zip(ids, ids[1:] + ids[:1]))


# --- the optimisation (pure functions) ---------------------------------------------------------------------

def sample_features(x: Tensor, flow: Tensor) -> Tensor:
    """Backward warp out(p) = x(p + flow(p)), bilinear with zero padding (the pack's `warp` convention),
    computed from the four gathered neighbours so that integer displacements copy values exactly.
    x (N, C, h, w), flow (N, 2, h, w) in cells."""
    n, c, h, w = x.shape
    pos = pixel_grid(h, w, x.device) + flow.float()
    base = pos.floor()
    frac = pos - base
    base = base.long()
    flat = x.reshape(n, c, h * w)
    out = 0
    for dy in (0, 1):
        for dx in (0, 1):
            col, row = base[:, 0] + dx, base[:, 1] + dy
            inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
            weight = (frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1]) * inside
            index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).reshape(n, 1, h * w).expand(n, c, h * w)
            out = out + flat.gather(2, index).reshape(n, c, h, w) * weight[:, None].to(x.dtype)
    return out


def cosine_gram(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, hw, hw): cosine similarities between a frame's token features (the code's
    correlation matrix, the Gram matrix of the normalised features)."""
    tokens = F.normalize(rearrange(x, "n c h w -> n (h w) c"), dim=-1)
    return tokens @ tokens.transpose(-1, -2)


def temporal_loss(cs: Tensor, frames: int, pairs: PairFlows) -> Tensor:
    """2 mean(|c2 - warp(c1, bwd)| (1 - occ_bwd) + |c1 - warp(c2, fwd)| (1 - occ_fwd)) over cs ((roles frames), C,
    h, w), c2 the next frame of c1 in the batch (the last frame's next is the first), every CFG chunk alike; pairs:
    the batch's wrap-around pairs on cs's grid, one per frame."""
    roles = cs.shape[0] // frames
    c1 = cs
    c2 = rearrange(torch.roll(rearrange(cs, "(r f) c h w -> r f c h w", f=frames), -1, dims=1),
                   "r f c h w -> (r f) c h w")
    fwd, bwd = (repeat(t, "p x h w -> (r p) x h w", r=roles) for t in (pairs.fwd, pairs.bwd))
    occ_fwd, occ_bwd = (repeat(t, "p h w -> (r p) 1 h w", r=roles) for t in (pairs.occ_fwd, pairs.occ_bwd))
    return 2 * ((c2 - sample_features(c1, bwd)).abs() * (1 - occ_bwd)
                + (c1 - sample_features(c2, fwd)).abs() * (1 - occ_fwd)).mean()


def spatial_loss(cs: Tensor, gram: Tensor, rows: slice = slice(None)) -> Tensor:
    """L1(Gram(cs), gram), the mean over all rows' entries, counting only the entries of `rows` (so the terms of
    all row slices sum to the loss, and each slice's backward needs one slice's Gram matrices)."""
    return (cosine_gram(cs[rows]) - gram[rows]).abs().sum() / gram.numel()


def fresco_loss(cs: Tensor, frames: int, pairs: Optional[PairFlows], gram: Optional[Tensor],
                spatial_weight: float = 100.0) -> Tensor:
    """FRESCO's objective on one UNet call's features cs ((roles frames), C, h, w): `temporal_loss` with the
    batch's `pairs` + spatial_weight * `spatial_loss` against `gram`, the input frames' cosine Gram matrices (one
    per row of cs); a missing part counts 0."""
    loss = cs.new_zeros(())
    if pairs is not None:
        loss = loss + temporal_loss(cs, frames, pairs)
    if gram is not None and spatial_weight > 0:
        loss = loss + spatial_weight * spatial_loss(cs, gram)
    return loss


def optimize_features(sample: Tensor, frames: int, pairs: Optional[PairFlows], target: Optional[Tensor],
                      iterations: int = 20, lr: float = 0.2, spatial_weight: float = 100.0) -> Tensor:
    """FRESCO's feature optimisation of one decoder block's input `sample` ((roles frames), C, h, w): Adam on
    `fresco_loss` (target: the input frames' features of the same block, for the Gram term), then AdaIN back to
    the sample's per-channel statistics. Gradients are enabled here only, on copies made outside inference mode
    (the sampler runs under no_grad, ComfyUI under inference_mode); nothing but the copy requires grad."""
    if pairs is None and target is None:
        return sample
    with local_gradients():
        original = sample.detach().clone().float()
        gram = cosine_gram(target.detach().clone().float()) if target is not None else None
        optimised = adam_steps(original, frames, pairs.fresh() if pairs is not None else None, gram, iterations, lr,
                               spatial_weight)
        result = adain(optimised, original)
    return result.to(sample.dtype)


def adam_steps(start: Tensor, frames: int, pairs: Optional[PairFlows], gram: Optional[Tensor], iterations: int = 20,
               lr: float = 0.2, spatial_weight: float = 100.0) -> Tensor:
    """`iterations` Adam steps on `fresco_loss` from `start` (a normal tensor; call with gradients enabled). The
    gradient of the Gram term is accumulated one row at a time: a 64x64 grid's Gram matrix is 64 MiB a frame, and
    the whole call's, with its gradient, would be 2 GiB for 8 frames with CFG."""
    cs = torch.nn.Parameter(start.detach().clone())
    optimizer = torch.optim.Adam([cs], lr=lr)
    for _ in range(iterations):
        optimizer.zero_grad()
        if pairs is not None:
            temporal_loss(cs, frames, pairs).backward()
        if gram is not None and spatial_weight > 0:
            for row in range(cs.shape[0]):
                (spatial_weight * spatial_loss(cs, gram, slice(row, row + 1))).backward()
        if cs.grad is not None:
            optimizer.step()
    return cs.detach()


# --- the attention (pure functions) ---------------------------------------------------------------------------

def spatial_guided_query(q: Tensor, q_ref: Tensor, k_ref: Tensor, scale: float = 0.2) -> Tensor:
    """Q <- SDPA(Q_ref, scale K_ref, Q) = softmax(Q_ref (scale K_ref)^T / sqrt(d)) Q; all (batch, heads, n, d)."""
    return F.scaled_dot_product_attention(q_ref.to(q.dtype), k_ref.to(q.dtype) * scale, q)


def visible_tokens(x: Tensor, visible: Tensor, frames: int) -> Tensor:
    """Keys or values for efficient cross-frame attention: x ((roles frames), heads, n, d) per frame; visible
    (frames, n) bool (frame 0's row all True). Every frame of a role reads that role's visible tokens of all its
    frames: ((roles frames), heads, k, d)."""
    per_role = rearrange(x, "(r f) h n d -> r h (f n) d", f=frames)
    picked = per_role[:, :, visible.reshape(-1).to(x.device)]
    return repeat(picked, "r h k d -> (r f) h k d", f=frames)


def visible_mask(pairs: PairFlows, grid: tuple) -> Tensor:
    """(frames, h*w) bool for a batch from its wrap-around pairs (pixel units): frame 0 all visible, frame j the
    tokens occluded in the backward flow from frame j-1 (bilinear-resized, > 0.5: the code's attn_mask)."""
    occ = F.interpolate(pairs.occ_bwd[:-1, None], size=tuple(grid), mode="bilinear", align_corners=False)[:, 0]
    newly = rearrange(occ > 0.5, "f h w -> f (h w)")
    return torch.cat([torch.ones(1, newly.shape[1], dtype=torch.bool, device=newly.device), newly])


# --- one run ------------------------------------------------------------------------------------------------

class FrescoRun:
    """One run's FRESCO state, shared by its attention edit, its feature patch and its denoiser wrapper: the
    input frames' recordings (per layer or block, batch frames and roles), the flows per batch, and whether the
    UNet call under way is the input frames' pass (`recording`). Made per plan, so a cached VE_INJECTION never
    changes."""

    def __init__(self, params: FrescoParams, flow: FlowField, frames: Tensor, context: PlanContext):
        self.params, self.flow, self.frames, self.context = params, flow, frames, context
        self.recording = False
        self.refs: dict = {}  # (layer, frame_ids, roles) -> (Q_ref, K_ref)
        self.features: dict = {}  # (block, frame_ids, roles) -> the input frames' block input
        self.recorded: set = set()  # batches whose input frames' pass has run
        # FLATTEN's edit, for its trajectories per call (built once per grid and batch, checked against the flow)
        self.trajectories = FlowGuidedAttention(FlowTrajectories(flow), context.seed, "all")
        self.optimize_window = first(params.optimize_until, "optimize_until").of(context.steps)
        self._pixels: dict = {}
        self._grids: dict = {}
        self._masks: dict = {}
        self._source: Optional[Tensor] = None
        self._noise: Optional[Tensor] = None

    # what the batches' frames need
    def pairs(self, frame_ids: tuple, grid: Optional[tuple] = None) -> PairFlows:
        if frame_ids not in self._pixels:
            images = image_to_nchw(self.frames).float()
            self._pixels[frame_ids] = pair_flows(self.flow, images, batch_pairs(frame_ids))
        if grid is None:
            return self._pixels[frame_ids]
        key = (frame_ids, tuple(grid))
        if key not in self._grids:
            self._grids[key] = self._pixels[frame_ids].on_grid(grid)
        return self._grids[key]

    def visible(self, frame_ids: tuple, tokens: int, device) -> Tensor:
        key = (frame_ids, tokens, str(device))
        if key not in self._masks:
            self._masks[key] = visible_mask(self.pairs(frame_ids), self.grid_of(tokens)).to(device)
        return self._masks[key]

    def grid_of(self, tokens: int) -> tuple:
        """The token grid (h, w) of a layer with `tokens` tokens on this clip."""
        return self.trajectories.trajectories.grid_of(tokens)

    # which parts act on a call
    def spatial_active(self, layout: FrameLayout) -> bool:
        return self.params.spatial_attention and layout.step is not None and layout.step < self.params.spatial_steps

    def temporal_active(self, layout: FrameLayout) -> bool:
        return self.params.temporal_attention and layout.timestep is not None and (
            layout.timestep >= self.params.temporal_until)

    @property
    def optimising(self) -> bool:
        return self.params.temporal_loss or self.params.spatial_loss

    @property
    def records(self) -> bool:
        """Whether the input frames' pass is needed (spatial guidance and the Gram loss read it)."""
        return self.params.spatial_attention or self.params.spatial_loss

    # the input frames' pass
    def input_latents(self, state: StepState, like: Tensor) -> Tensor:
        """All input frames' latents noised to the schedule's last timestep (variance-preserving, the UNet's input
        whatever the scheduler): sqrt(a) x0 + sqrt(1 - a) noise, the noise drawn once from the sampler's seed."""
        if self._source is None:
            self._source = encode_frames(self.context.model, self.frames).cpu()
            generator = torch.Generator("cpu").manual_seed(self.context.seed)
            self._noise = torch.randn(self._source.shape, generator=generator)  # fp32 whatever the model's dtype
        t = int(state.scheduler.timesteps[-1])
        alpha = state.scheduler.alphas_cumprod[t].to(torch.float32)
        noised = alpha.sqrt() * self._source.float() + (1 - alpha).sqrt() * self._noise.float()
        return noised.to(like.device, like.dtype)

    def record(self, denoiser, chunk: Chunk, latents: Tensor, state: StepState) -> None:
        """Run the input frames of `chunk` once through the UNet at the last timestep with plain attention and no
        ControlNet (the code's get_intraframe_paras), keeping Q_ref/K_ref and the decoder blocks' inputs."""
        last = state.scheduler.timesteps[-1]
        seen = replace(state, timestep=last, t=int(last))
        self.recording = True
        try:
            replace(denoiser, control=None)(self.input_latents(state, latents), seen)  # reads chunk's rows
        finally:
            self.recording = False
        self.recorded.add(chunk.frames)

    def release(self, frame_ids: tuple, step: int) -> None:
        """Drop a batch's recordings once no later step reads them."""
        if step + 1 >= self.params.spatial_steps:
            for key in [k for k in self.refs if k[1] == frame_ids]:
                del self.refs[key]
        if (step + 1) not in self.optimize_window:
            for key in [k for k in self.features if k[1] == frame_ids]:
                del self.features[key]

    # the feature optimisation at a decoder block's input
    def block_input(self, block: int, hidden: Tensor, layout: Optional[FrameLayout]) -> Tensor:
        if layout is None:
            return hidden
        key = (block, tuple(layout.frame_ids), tuple(layout.roles))
        if self.recording:
            if self.params.spatial_loss:
                self.features[key] = hidden.detach().clone()
            return hidden
        if layout.step not in self.optimize_window:
            return hidden
        grid = tuple(hidden.shape[-2:])
        pairs = self.pairs(tuple(layout.frame_ids), grid).to(hidden.device) if self.params.temporal_loss else None
        target = self.features.get(key) if self.params.spatial_loss else None
        return optimize_features(hidden, layout.frames, pairs, target, self.params.iterations, self.params.lr,
                                 self.params.spatial_weight)


class FrescoAttention(AttnEdit):
    """FRESCO's self-attention in its layers: spatial-guided queries, efficient cross-frame keys/values
    (`qkv`), then temporal-guided attention along trajectories (`out`). In the input frames' pass it only records
    Q_ref and K_ref and leaves the attention plain."""

    def __init__(self, run: FrescoRun):
        self.run = run
        self._raw: Optional[tuple] = None  # (layer, q, k) of the call between its qkv and out points

    def qkv(self, call: AttnCall, q, k, v):
        layout = call.layout
        if not call.is_self or layout is None:
            return q, k, v
        if layout.groups != 1:
            raise ValueError("FRESCO reads one batch per UNet call")
        run, frame_ids = self.run, tuple(layout.frame_ids) or tuple(range(layout.frames))
        key = (call.name, frame_ids, tuple(layout.roles))
        self._raw = None
        if run.recording:
            run.refs[key] = (q.detach().clone(), k.detach().clone())
            return q, k, v
        self._raw = (call.name, q, k) if run.temporal_active(layout) else None
        if run.spatial_active(layout) and key in run.refs:
            q_ref, k_ref = run.refs[key]
            q = spatial_guided_query(q, q_ref, k_ref, run.params.attention_scale)
        if run.params.cross_frame_attention and layout.frames > 1:
            visible = run.visible(frame_ids, k.shape[2], k.device)
            k, v = visible_tokens(k, visible, layout.frames), visible_tokens(v, visible, layout.frames)
        return q, k, v

    def out(self, call: AttnCall, h):
        if self._raw is None or self._raw[0] != call.name:
            return h
        _, q, k = self._raw
        self._raw = None
        layout = call.layout
        frame_ids = tuple(layout.frame_ids) or tuple(range(layout.frames))
        traj = self.run.trajectories.for_call(h.shape[1], frame_ids, h.device)
        query = rearrange(q, "b h n d -> b n (h d)")
        key = rearrange(k * self.run.params.attention_scale, "b h n d -> b n (h d)")
        return trajectory_attention(h, traj, call.heads, query=query, key=key)


@contextmanager
def feature_optimisation(unet, run: FrescoRun) -> Iterator[None]:
    """FRESCO's optimisation (or, in the input frames' pass, recording) at the input of every decoder block: a
    forward pre-hook per up block; the call's layout comes from the UNet's `cross_attention_kwargs` (a pre-hook
    on the UNet; up blocks without attention are not given it). All hooks are removed on exit."""
    current: dict = {}

    def remember_layout(module, args, kwargs):
        current["layout"] = (kwargs.get("cross_attention_kwargs") or {}).get("layout")

    def at_block(index: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            new = run.block_input(index, hidden, current.get("layout"))
            if new is hidden:
                return None
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": new}
            return (new,) + tuple(args[1:]), kwargs
        return hook

    handles = [unet.register_forward_pre_hook(remember_layout, with_kwargs=True)]
    handles += [block.register_forward_pre_hook(at_block(i), with_kwargs=True)
                for i, block in enumerate(unet.up_blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class FrescoBatches:
    """The denoiser the loop calls under FRESCO: the keyframe batches one UNet call each, and before a batch's
    first step its input frames' pass. Fresh per run."""

    def __init__(self, denoiser, run: FrescoRun, chunks: list):
        if denoiser.source is not None:
            raise ValueError("FRESCO plans no live source branch")
        self.denoiser, self.run, self.chunks = denoiser, run, chunks

    def __call__(self, latents: Tensor, state: StepState) -> Tensor:
        total = None
        for chunk in self.chunks:
            one = replace(self.denoiser, chunks=[chunk])
            if self.run.records and chunk.frames not in self.run.recorded:
                self.run.record(one, chunk, latents, state)
            eps = one(latents, state)  # other frames' rows are -0.0, so the sum is each frame's own prediction
            total = eps if total is None else total + eps
            self.run.release(chunk.frames, state.index)
        return total


# --- the plan ------------------------------------------------------------------------------------------------

def fresco_planner(injection: Injection, context: PlanContext, flow: FlowField, frames: Tensor) -> InjectionPlan:
    params: FrescoParams = injection.params
    if context.frame_count != flow.frame_count:
        raise ValueError(f"Attention Injector (FRESCO): the sampler runs {context.frame_count} frames, the flow has "
                         f"{flow.frame_count}: connect Flow Warp and the sampler to the same clip")
    run = FrescoRun(params, flow, frames, context)
    layers = frozenset(fresco_attention_layers(context.model.unet.attn_processors))
    edit = FrescoAttention(run)
    chunks = keyframe_batches(context.frame_count, params.batch_size)

    def rule_for(name: str):
        return own_frame if is_self_attention(name) else None  # the code: AttnProcessor2_0 outside its layers

    return InjectionPlan(
        edits_for=lambda name: (edit,) if name in layers else (),
        rule_for=rule_for,
        patches=(lambda unet: feature_optimisation(unet, run)) if run.optimising else (lambda unet: nullcontext()),
        wrap_denoiser=lambda denoiser: FrescoBatches(denoiser, run, chunks),
    )


def check_inputs(frames, flow, inversion) -> None:
    if not isinstance(flow, FlowField):
        raise ValueError("Attention Injector (FRESCO): connect Flow Warp's flow")
    if frames is None or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError("Attention Injector (FRESCO): frames must be an IMAGE batch (F, H, W, 3): connect the "
                         "source clip")
    if frames.shape[0] != flow.frame_count or tuple(frames.shape[1:3]) != tuple(flow.size):
        raise ValueError(f"Attention Injector (FRESCO): the frames are {frames.shape[0]} of "
                         f"{frames.shape[2]}x{frames.shape[1]}, the flow {flow.frame_count} of "
                         f"{flow.size[1]}x{flow.size[0]}: connect Flow Warp to the same frames")
    if inversion is not None:
        x0 = inversion.latents[0]
        size = (x0.shape[-2] * LATENT_FACTOR, x0.shape[-1] * LATENT_FACTOR)
        if x0.shape[0] != frames.shape[0] or size != tuple(frames.shape[1:3]):
            raise ValueError("Attention Injector (FRESCO): the inversion is of other frames than the flow's: "
                             "connect DDIM Invert to the same clip")


def fresco_injection(frames: Tensor, flow: FlowField, inversion=None,
                     params: FrescoParams = FrescoParams()) -> Injection:
    """VE_INJECTION for FRESCO on the source clip `frames` (ComfyUI IMAGE) with Flow Warp's `flow` on the same
    frames; sampling starts from `inversion` when given, else from whatever the sampler is given (the paper:
    SDEdit from the frames under a ControlNet)."""
    params.check()
    check_inputs(frames, flow, inversion)
    return Injection("fresco", inversion, params, partial(fresco_planner, flow=flow, frames=frames))
