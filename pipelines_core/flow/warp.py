"""Optical flow for the pack: one warping convention, occlusion, latent-resolution flow, metrics.

The convention (every module of the pack uses it):

- A flow is a field of pixel displacements, float32 ``(N, 2, H, W)``; channel 0 is x (columns),
  channel 1 is y (rows).
- For a clip of F frames, ``fwd[i]`` lives on frame i and points into frame i+1; ``bwd[i]`` lives on
  frame i+1 and points into frame i. Both are ``(F-1, 2, H, W)``. ``occ_fwd[i]`` marks pixels of
  frame i that have no match in frame i+1, ``occ_bwd[i]`` pixels of frame i+1 with no match in
  frame i; both are ``(F-1, H, W)``, 1 = occluded.
- ``warp(image, flow)`` is backward warping, ``out(p) = image(p + flow(p))``, done with
  ``grid_sample(align_corners=True)`` and the normalisation ``2x/(W-1) - 1``, so integer shifts are
  exact in the interior. Hence ``warp(frame[i], bwd[i]) ≈ frame[i+1]`` and
  ``warp(frame[i+1], fwd[i]) ≈ frame[i]``.
- Images are ``(N, C, H, W)`` here; ComfyUI IMAGE ``(F, H, W, 3)`` is converted at the edges.

Estimators (OpenCV DIS / Farneback, RAFT from a user file) live in ``flow.estimate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Forward-backward consistency thresholds (UnFlow's values, also Rerender-A-Video's defaults).
OCC_ALPHA = 0.01
OCC_BETA = 0.5


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """(1, 2, H, W) pixel coordinates: channel 0 = x (column), channel 1 = y (row)."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack((xs, ys))[None]


def _to_unit_range(coord: Tensor, size: int) -> Tensor:
    """Pixel coordinate -> grid_sample's [-1, 1] with align_corners=True (pixel centres at the ends).

    Written as 2x/(W-1) - 1 in this order, which of the fp32 forms we tried round-trips best through
    grid_sample's un-normalisation: integer shifts come out exact to ~1e-6 at 20 px, ~1e-5 at 512 px.
    """
    return coord * 2.0 / max(size - 1, 1) - 1.0


def warp(image: Tensor, flow: Tensor, mode: str = "bilinear", padding: str = "zeros") -> Tensor:
    """Backward warp: out(p) = image(p + flow(p)). image (N, C, H, W), flow (N, 2, H, W).

    mode: "bilinear" or "nearest"; padding: "zeros", "border" or "reflection".
    """
    shapes = f"image {tuple(image.shape)}, flow {tuple(flow.shape)}"
    if image.ndim != 4 or flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"warp needs image (N, C, H, W) and flow (N, 2, H, W); got {shapes}")
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"warp: image and flow differ in frames or size ({shapes})")
    height, width = flow.shape[-2:]
    target = pixel_grid(height, width, flow.device, torch.float32) + flow.float()
    grid = torch.stack((_to_unit_range(target[:, 0], width), _to_unit_range(target[:, 1], height)), dim=-1)
    # Sample in fp32 at least: a half-precision grid would misplace samples by ~0.1 px at 512 px.
    work = image if image.dtype in (torch.float32, torch.float64) else image.float()
    out = F.grid_sample(work, grid.to(work.dtype), mode=mode, padding_mode=padding, align_corners=True)
    return out.to(image.dtype)


def chain_flows(flow_ab: Tensor, flow_bc: Tensor) -> Tensor:
    """Flow a -> c from a -> b and b -> c (both (N, 2, H, W), the first defined on a).

    flow_ac(p) = flow_ab(p) + flow_bc(p + flow_ab(p)), so
    warp(image_c, flow_ac) == warp(warp(image_c, flow_bc), flow_ab) up to interpolation.
    """
    return flow_ab + warp(flow_bc, flow_ab, padding="border")


def _inconsistent(flow: Tensor, back_flow: Tensor, alpha: float, beta: float) -> Tensor:
    """1 where following `flow` and then `back_flow` does not return to the start (squared form)."""
    back = warp(back_flow, flow)  # zeros off-frame: pixels leaving the frame by > ~0.7 px are flagged
    residual = (flow + back).square().sum(1)
    bound = alpha * (flow.square().sum(1) + back.square().sum(1)) + beta
    return (residual > bound).float()


def occlusion_masks(
    fwd: Tensor, bwd: Tensor, alpha: float = OCC_ALPHA, beta: float = OCC_BETA
) -> tuple[Tensor, Tensor]:
    """Forward-backward consistency check in UnFlow's squared form (Meister et al. 2018).

    A pixel p of frame i is occluded in fwd when, with w = warp(bwd, fwd)(p),
        |fwd(p) + w|^2 > alpha * (|fwd(p)|^2 + |w|^2) + beta,
    and symmetrically for bwd (pixels of frame i+1). Returns (occ_fwd, occ_bwd), (N, H, W) float 0/1.
    (Rerender's GMFlow code uses the unsquared |f + w| > alpha(|f| + |b|) + beta, which flags a little
    more: residuals above ~0.5 px instead of ~0.7 px.)
    """
    if fwd.shape != bwd.shape:
        raise ValueError(f"fwd {tuple(fwd.shape)} and bwd {tuple(bwd.shape)} flows differ in shape")
    if fwd.shape[0] == 0:
        empty = fwd.new_zeros((0, *fwd.shape[-2:]))
        return empty, empty.clone()
    return _inconsistent(fwd, bwd, alpha, beta), _inconsistent(bwd, fwd, alpha, beta)


def _check_multiple(size: tuple[int, int], factor: int) -> None:
    if size[0] % factor or size[1] % factor:
        raise ValueError(
            f"flow size {size[1]}x{size[0]} is not a multiple of {factor}; resize the video to a multiple of {factor}"
        )


def latent_flow(flow: Tensor, factor: int = 8) -> Tensor:
    """Pixel flow (N, 2, H, W) -> latent flow (N, 2, H/f, W/f): displacements / f, area-averaged."""
    _check_multiple(flow.shape[-2:], factor)
    return F.avg_pool2d(flow / factor, factor)


def latent_occlusion(occ: Tensor, factor: int = 8) -> Tensor:
    """Pixel occlusion (N, H, W) -> latent occlusion (N, H/f, W/f): a cell is occluded if any pixel is."""
    _check_multiple(occ.shape[-2:], factor)
    return F.max_pool2d(occ[:, None], factor)[:, 0]


def motion_field(
    frame_count: int,
    latent_h: int,
    latent_w: int,
    strength_x: float = 12.0,
    strength_y: float = 12.0,
    frame_ids=None,
) -> Tensor:
    """Text2Video-Zero motion dynamics: frame k is displaced by k * (strength_x, strength_y).

    Strengths are in T2V-Zero's 512-pixel reference units (a fraction strength/512 of the frame),
    so at 512 px (64 latent cells) strength 8 is one latent cell per frame. Returns the latent flow
    (F, 2, latent_h, latent_w) in cells; frame_ids (global indices, for chunks) default to 0..F-1.
    """
    ids = torch.arange(frame_count) if frame_ids is None else torch.as_tensor(list(frame_ids))
    if ids.numel() != frame_count:
        raise ValueError(f"motion_field: {ids.numel()} frame_ids for {frame_count} frames")
    cells_per_frame = torch.tensor([strength_x * latent_w / 512.0, strength_y * latent_h / 512.0])
    field = ids.float()[:, None, None, None] * cells_per_frame[None, :, None, None]
    return field.expand(frame_count, 2, latent_h, latent_w).contiguous()


def warp_latents_motion(latent: Tensor, field: Tensor) -> Tensor:
    """Apply a motion field to latents (F, C, h, w): frame k at x takes the content at x + k*delta.

    Nearest sampling with reflection padding, as T2V-Zero. Reflection is about the border cell centres
    (our align_corners=True convention), so the revealed band mirrors without repeating the edge cell.
    """
    return warp(latent, field.to(latent.device), mode="nearest", padding="reflection")


def _hsv_to_rgb(hue: Tensor, sat: Tensor, value: Tensor) -> Tensor:
    """HSV in [0, 1] -> RGB in [0, 1], stacked on the last axis."""
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6.0) % 6.0
        channels.append(value - value * sat * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=-1)


def flow_to_image(flow: Tensor, max_magnitude: float | None = None) -> Tensor:
    """Colour-wheel picture of a flow (N, 2, H, W) -> (N, H, W, 3) in [0, 1].

    Hue is the direction (+x red), saturation the magnitude over max_magnitude (default: the largest
    in the whole batch, so frames share one scale); no motion is white.
    """
    magnitude = flow.norm(dim=1)
    if max_magnitude is None:
        max_magnitude = float(magnitude.max()) if magnitude.numel() else 1.0
    hue = (torch.atan2(flow[:, 1], flow[:, 0]) / (2 * math.pi)) % 1.0
    sat = (magnitude / max(max_magnitude, 1e-6)).clamp(0.0, 1.0)
    return _hsv_to_rgb(hue, sat, torch.ones_like(sat))


def interpolate_midframe(
    prev_image: Tensor, next_image: Tensor, flow_prev_to_next: Tensor, flow_next_to_prev: Tensor
) -> Tensor:
    """In-between frame at t = 1/2 from two neighbours (N, C, H, W) and their flows both ways.

    Flows from the middle to each neighbour assume linear motion (Super SloMo, eq. 4 at t = 1/2):
    mid->prev = (f_next->prev - f_prev->next) / 4 and mid->next = -mid->prev. Both neighbours are
    warped there and averaged, except where the check says the content exists in only one of them.
    """
    mid_to_prev = 0.25 * (flow_next_to_prev - flow_prev_to_next)
    mid_to_next = -mid_to_prev
    occ_prev, occ_next = occlusion_masks(flow_prev_to_next, flow_next_to_prev)
    only_in_prev = warp(occ_prev[:, None], mid_to_prev, mode="nearest")  # covered on the way: not in next
    only_in_next = warp(occ_next[:, None], mid_to_next, mode="nearest")  # revealed on the way: not in prev
    weight_prev = (1.0 - only_in_next).to(prev_image.dtype)
    weight_next = (1.0 - only_in_prev).to(prev_image.dtype)
    neither = (weight_prev + weight_next) == 0  # contradictory masks: fall back to the plain average
    weight_prev = torch.where(neither, 0.5, weight_prev)
    weight_next = torch.where(neither, 0.5, weight_next)
    blended = weight_prev * warp(prev_image, mid_to_prev, padding="border") + weight_next * warp(
        next_image, mid_to_next, padding="border"
    )
    return blended / (weight_prev + weight_next)


@dataclass(frozen=True, eq=False)
class FlowField:
    """Consecutive-frame flows of a clip, both directions, with their occlusion masks (see module doc)."""

    fwd: Tensor
    bwd: Tensor
    occ_fwd: Tensor
    occ_bwd: Tensor
    method: str

    def __post_init__(self):
        pairs, height, width = self.fwd.shape[0], *self.fwd.shape[-2:]
        if self.fwd.shape != (pairs, 2, height, width) or self.bwd.shape != self.fwd.shape:
            shapes = f"fwd {tuple(self.fwd.shape)}, bwd {tuple(self.bwd.shape)}"
            raise ValueError(f"FlowField: fwd and bwd must both be (F-1, 2, H, W); got {shapes}")
        if self.occ_fwd.shape != (pairs, height, width) or self.occ_bwd.shape != (pairs, height, width):
            raise ValueError(f"FlowField: occlusion masks must be {(pairs, height, width)}")

    @classmethod
    def from_flows(cls, fwd: Tensor, bwd: Tensor, method: str, alpha: float = OCC_ALPHA, beta: float = OCC_BETA):
        """Wrap given fwd/bwd flows, computing occlusion with the forward-backward check."""
        fwd, bwd = fwd.float(), bwd.float()
        occ_fwd, occ_bwd = occlusion_masks(fwd, bwd, alpha, beta)
        return cls(fwd, bwd, occ_fwd, occ_bwd, method)

    @property
    def pairs(self) -> int:
        return self.fwd.shape[0]

    @property
    def frame_count(self) -> int:
        return self.pairs + 1

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return tuple(self.fwd.shape[-2:])

    def __repr__(self) -> str:
        height, width = self.size
        if self.pairs == 0:
            return f"FlowField(method={self.method!r}, frames=1, size={width}x{height}, no pairs)"
        mean_motion = float(self.fwd.norm(dim=1).mean())
        occluded = float(self.occ_fwd.mean() + self.occ_bwd.mean()) / 2
        return (
            f"FlowField(method={self.method!r}, frames={self.frame_count}, size={width}x{height}, "
            f"mean |fwd|={mean_motion:.2f}px, occluded={occluded:.1%})"
        )


def image_to_nchw(frames: Tensor) -> Tensor:
    """ComfyUI IMAGE (F, H, W, C) -> (F, C, H, W)."""
    return frames.permute(0, 3, 1, 2)


def warp_error(video: Tensor, flow: FlowField) -> float:
    """Temporal warp error of an edited clip against the SOURCE clip's flow (lower = more consistent).

    E_warp = (1 / (F-1)) * sum_i  sum_p v_i(p) * ||warp(e_i, bwd_i)(p) - e_{i+1}(p)||^2 / (C * sum_p v_i(p)),
    with e the edited frames (IMAGE (F, H, W, C), values 0..1), v_i = 1 - occ_bwd[i] the pixels of
    frame i+1 seen in frame i. Pairs with no visible pixel are skipped; no pairs gives 0.0.
    """
    if video.shape[0] != flow.frame_count or tuple(video.shape[1:3]) != flow.size:
        raise ValueError(
            f"warp_error: video {tuple(video.shape)} does not match the flow ({flow.frame_count} frames, "
            f"{flow.size[1]}x{flow.size[0]}); compute the flow on the source clip of the same size"
        )
    if flow.pairs == 0:
        return 0.0
    edited = image_to_nchw(video).float()
    bwd = flow.bwd.to(edited.device)
    visible = (1.0 - flow.occ_bwd.to(edited.device))[:, None]
    squared = (warp(edited[:-1], bwd) - edited[1:]).square()
    per_pair = (visible * squared).sum((1, 2, 3)) / (visible.sum((1, 2, 3)) * edited.shape[1])
    counted = visible.sum((1, 2, 3)) > 0
    return float(per_pair[counted].mean()) if counted.any() else 0.0
