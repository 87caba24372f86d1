"""Flow estimators: OpenCV DIS (default) and Farneback, RAFT from a user-supplied weights file.

All follow the convention of ``flow``: the flow from frame a to frame b lives on a and points into b,
so ``warp(b, flow) ≈ a``. Frames come in as ComfyUI IMAGE (F, H, W, 3) float 0..1.
Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..video.frames import check_image_batch
from .warp import OCC_ALPHA, OCC_BETA, FlowField, image_to_nchw
from ..progress import Progress, or_silent

METHODS = ("dis", "farneback", "raft")
RAFT_MIN_SIZE = 128  # RAFT's correlation pyramid needs feature maps of at least 16 cells
RAFT_ITERATIONS = 12


def _gray_uint8(frames: Tensor) -> list[np.ndarray]:
    """IMAGE frames (N, H, W, 3) float 0..1 -> uint8 grey arrays, what OpenCV's estimators take."""
    rgb = np.rint(frames.detach().float().cpu().numpy().clip(0.0, 1.0) * 255.0).astype(np.uint8)
    return [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in rgb]


class _OpenCVEstimator:
    """Pair-at-a-time estimator around an OpenCV function of two grey uint8 images.

    OpenCV's (H, W, 2) flow already has the x, y channel order of our convention.
    """

    batch = 1

    def __init__(self, pair_flow: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        self.pair_flow = pair_flow

    def __call__(self, first: Tensor, second: Tensor) -> Tensor:
        flows = np.stack([self.pair_flow(a, b) for a, b in zip(_gray_uint8(first), _gray_uint8(second))])
        return torch.from_numpy(flows).permute(0, 3, 1, 2)


def dis_pair(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """DIS optical flow (Kroeger et al. 2016), MEDIUM preset: ~0.1 px error on a clean pan, ~50 ms at 512 px.

    (setFinestScale(0) would refine to full resolution: ~0.01 px there, but ~4x the time.)
    """
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(first, second, None)


def farneback_pair(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Farneback polynomial-expansion flow; a wide window keeps textureless regions from sticking at 0."""
    return cv2.calcOpticalFlowFarneback(
        first, second, None, pyr_scale=0.5, levels=5, winsize=45, iterations=3, poly_n=7, poly_sigma=1.5, flags=0
    )


def load_raft(weights_path) -> torch.nn.Module:
    """torchvision RAFT (large or small, told apart by the state dict) with weights from a local file."""
    from torchvision.models.optical_flow import raft_large, raft_small

    if weights_path is None:
        raise ValueError(
            "flow method 'raft' needs a RAFT weights file (raft_weights); nothing is downloaded. "
            "Use 'dis' or 'farneback' otherwise"
        )
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"RAFT weights file not found: {path}; give the path of a torchvision raft_large/raft_small .pth, "
            "or use method 'dis'"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for build in (raft_large, raft_small):
        model = build(weights=None, progress=False)
        if set(model.state_dict()) == set(state):
            model.load_state_dict(state)
            return model.eval()
    raise ValueError(f"{path} is not a torchvision RAFT state dict (raft_large or raft_small)")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _RaftEstimator:
    """Batched RAFT on a device; frames are padded (replicate) to RAFT's size needs and cropped back."""

    batch = 4

    def __init__(self, weights_path, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_raft(weights_path).to(self.device)

    def _prepare(self, frames: Tensor) -> Tensor:
        images = image_to_nchw(frames).float().to(self.device) * 2 - 1  # RAFT takes [-1, 1]
        height, width = images.shape[-2:]
        pad_h = max(RAFT_MIN_SIZE, _round_up(height, 8)) - height
        pad_w = max(RAFT_MIN_SIZE, _round_up(width, 8)) - width
        return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")

    @torch.inference_mode()
    def __call__(self, first: Tensor, second: Tensor) -> Tensor:
        height, width = first.shape[1:3]
        flows = self.model(self._prepare(first), self._prepare(second), num_flow_updates=RAFT_ITERATIONS)
        return flows[-1][..., :height, :width].float().cpu()


def _make_estimator(method: str, raft_weights=None, device=None):
    if method == "dis":
        return _OpenCVEstimator(dis_pair)
    if method == "farneback":
        return _OpenCVEstimator(farneback_pair)
    if method == "raft":
        return _RaftEstimator(raft_weights, device)
    raise ValueError(f"unknown flow method {method!r}; choose one of {', '.join(METHODS)}")


def estimate_pair_flow(
    first: Tensor,
    second: Tensor,
    method: str = "dis",
    raft_weights=None,
    progress: Progress | None = None,
    device=None,
) -> Tensor:
    """Flows (N, 2, H, W) from each frame of `first` into the matching frame of `second` (both IMAGE)."""
    check_image_batch(first, "first", min_frames=0)  # a one-frame clip has no pairs
    check_image_batch(second, "second", min_frames=0)
    if first.shape != second.shape:
        raise ValueError(f"frame batches differ: {tuple(first.shape)} vs {tuple(second.shape)}")
    estimator = _make_estimator(method, raft_weights, device)
    report = or_silent(progress)
    total = first.shape[0]
    chunks = []
    for start in range(0, total, estimator.batch):
        stop = min(start + estimator.batch, total)
        chunks.append(estimator(first[start:stop], second[start:stop]))
        report(stop, total)
    if not chunks:
        return torch.zeros((0, 2, *first.shape[1:3]))
    return torch.cat(chunks)


def estimate_flow(
    frames: Tensor,
    method: str = "dis",
    raft_weights=None,
    progress: Progress | None = None,
    alpha: float = OCC_ALPHA,
    beta: float = OCC_BETA,
    device=None,
) -> FlowField:
    """Forward and backward flows between consecutive frames of an IMAGE clip, with occlusion masks.

    method: "dis" (default), "farneback" or "raft" (needs raft_weights, a local torchvision RAFT file;
    device picks where RAFT runs). progress(done, total) is called after each estimated flow.
    """
    check_image_batch(frames, "frames")
    earlier, later = frames[:-1], frames[1:]
    sources, targets = torch.cat((earlier, later)), torch.cat((later, earlier))  # fwd pairs, then bwd pairs
    both = estimate_pair_flow(sources, targets, method, raft_weights, progress, device)
    fwd, bwd = both.split(frames.shape[0] - 1) if frames.shape[0] > 1 else (both, both.clone())
    return FlowField.from_flows(fwd, bwd, method, alpha, beta)


def translation_flow(
    frame_count: int, height: int, width: int, dx: float, dy: float, alpha: float = OCC_ALPHA, beta: float = OCC_BETA
) -> FlowField:
    """Synthetic flow of content moving by (dx, dy) pixels per frame: frame[i+1](p) = frame[i](p - d).

    fwd = +d and bwd = -d everywhere; occlusion marks the strips entering and leaving the frame.
    """
    pairs = max(frame_count - 1, 0)
    step = torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1)
    fwd = step.expand(pairs, 2, height, width).contiguous()
    return FlowField.from_flows(fwd, -fwd, "translation", alpha, beta)
